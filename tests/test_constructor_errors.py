"""The module constructors take weights; handed a whole layer, they raise a TypeError that names the
classmethod to use (from_linear for torch.nn.Linear, from_bnb for a bitsandbytes Linear4bit)."""
import pytest
import torch
from torch import nn

import lora_ops


def _linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Linear4bit(16, 8, quant_type="nf4").to("cpu")


@pytest.mark.parametrize("cls, make, points_to", [
    (lora_ops.LoRALinear, lambda: nn.Linear(16, 8), r"LoRALinear\.from_linear\(layer"),
    (lora_ops.QLoRALinear, lambda: nn.Linear(16, 8), r"QLoRALinear\.from_linear\(layer.*quantizes"),
    (lora_ops.LoRALinear, _linear4bit, r"QLoRALinear\.from_bnb\(layer"),
    (lora_ops.QLoRALinear, _linear4bit, r"QLoRALinear\.from_bnb\(layer"),
    (lora_ops.QLoRALinear, lambda: nn.Conv1d(4, 4, 1), r"from_linear\(\.\.\.\) or .*from_bnb"),
    (lora_ops.QLoRALinear, lambda: torch.randn(8, 16), r"QLoRALinear\.from_linear\(nn\.Linear\) or "
                                                       r"lora_ops\.quantize_nf4"),
])
def test_constructor_given_a_layer_points_to_the_classmethod(cls, make, points_to):
    with pytest.raises(TypeError, match=points_to):
        cls(make(), r=4)


def test_constructors_still_take_weights():
    w = torch.randn(8, 16)
    assert lora_ops.LoRALinear(w, r=4).weight.shape == (8, 16)
    assert lora_ops.QLoRALinear(lora_ops.quantize_nf4(w), r=4).out_features == 8
