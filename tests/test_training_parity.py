"""Training parity with PEFT + bitsandbytes, as a QLoRA user trains.

One small Llama (3 layers, real attention: hidden 256, 4 query / 2 KV heads, intermediate 512, vocab 1000;
built from a config, random init) is quantized once by bitsandbytes (``Linear4bit``, NF4, double quant,
blocksize 64) on the device. PEFT wraps that model (its bitsandbytes LoRA layer, r=16, alpha=32 on q, k, v, o,
gate, up, down); lora_ops wraps a copy of it (``apply_lora`` -> ``QLoRALinear.from_bnb``: the same NF4 bytes,
checked byte for byte) and takes PEFT's initial adapters. Both train for ``STEPS`` AdamW steps on the same
batches (2 x 128 tokens each, causal-LM loss), with or without gradient checkpointing; the losses must agree
step by step and the final adapters tensor by tensor (relative Frobenius error).

* CPU, fp32 (bitsandbytes runs NF4 on the CPU): the two are the same computation up to float rounding, so the
  tolerances are tight. Runs in CI.
* GPU, bf16 (lora_ops' Triton kernels vs bitsandbytes + cuBLAS): tolerances for bf16 rounding in different
  summation orders, reasoned below. The same code also runs on the CPU in bf16 (lora_ops' PyTorch reference
  there), so its bf16 path and mutation control run in CI too.

Mutation controls run the same comparison against a deliberately wrong lora_ops run (one adapter element
perturbed before training; a wrong lora_alpha) and require it to fail, so the comparison can fail.
"""
import copy
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch
from torch import nn

import bitsandbytes as bnb  # noqa: F401 - a CPU CI without bitsandbytes must fail here, not skip the parity test
import lora_ops
from lora_ops import QLoRALinear
from lora_ops.inject import lora_layers

from helpers import rel_error

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
BATCH, SEQ, STEPS, N_BATCHES, LR = 2, 128, 20, 4, 1e-3
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, use_cache=False, attention_dropout=0.0, attn_implementation="sdpa")

# fp32 on the CPU: the same NF4 bytes dequantized bit-exactly, the same float32 math in another grouping (lora_ops
# adds the adapter term inside its op, PEFT adds a separate lora_B(lora_A(x)) * scaling): only float rounding
# separates them. Over the 20 steps the losses were 7.3e-8 apart at most and the adapters 1.1e-6 (relative) when
# these tolerances were set; one adapter element moved by 1e-2 before training leaves the adapters 6.4e-3 apart, a
# wrong alpha (24 for 32) moves the losses by 9.4e-3: both hundreds of times the tolerance.
LOSS_RTOL_FP32 = 1e-6
ADAPTER_RTOL_FP32 = 1e-5
# bf16 on the GPU: bf16 keeps 8 significant bits (unit roundoff 3.9e-3), and the two round in different places
# (bitsandbytes dequantizes W to bf16 for a cuBLAS GEMM and PEFT runs two more bf16 GEMMs for the adapter; lora_ops
# dequantizes inside its Triton kernels and accumulates the adapter term in the same fp32 accumulator), so every
# layer output differs by about one bf16 rounding. The loss is the fp32 mean of 256 per-token losses, which
# averages those independent roundings away: 5e-3 is ~100x the ~1e-4 such rounding gives a mean of 256 tokens
# (the two CPU bf16 paths, which also round differently, stayed within 5.3e-5 over the 20 steps). The adapters
# diverge more: AdamW divides each gradient element by its own running RMS, so a rounding-level difference in a
# near-zero gradient element can flip the sign of that element's update. Emulated on the CPU in bf16 by adding
# noise of 1% / 3% of the gradient's RMS to every gradient at every step, the final adapters ended 3.8e-2 /
# 6.8e-2 apart (relative Frobenius, worst tensor; 1.2e-2 without the noise): 0.1 leaves room for that, while the
# mutation control (lora_alpha 16 instead of 32) moved the CPU bf16 losses by 2.0e-2 and the adapters by 0.37, and
# must still fail on the GPU.
# These bounds are reasoned and emulated, not yet measured on a GPU.
LOSS_RTOL_BF16 = 5e-3
ADAPTER_RTOL_BF16 = 0.1


@dataclass
class Setup:
    """The bitsandbytes model both start from, PEFT's model (adapters as initialised) and the batches."""
    device: torch.device
    dtype: torch.dtype
    checkpointing: bool
    bnb_model: nn.Module
    peft_model: nn.Module
    init: Dict[str, torch.Tensor]  # "<module path>.lora_A" / ".lora_B" -> PEFT's initial adapter
    batches: List[torch.Tensor]


@dataclass
class Trained:
    losses: List[float]
    adapters: Dict[str, torch.Tensor]


def tiny_llama(dtype: torch.dtype, device: torch.device, checkpointing: bool) -> nn.Module:
    """The config's LlamaForCausalLM, random init from seed 0 (fp32 on the CPU, then cast and moved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device=device, dtype=dtype).train()
    if checkpointing:  # as QLoRA recipes do, before the adapters
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def to_bnb_4bit(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace the target linears by bitsandbytes Linear4bit (NF4, double quant, blocksize 64, compute dtype
    ``dtype``) quantized by bitsandbytes on the weights' device, and mark the model loaded in 4 bit as
    transformers does, so PEFT wraps them in its bitsandbytes LoRA layer."""
    import bitsandbytes as bnb

    for name, lin in list(model.named_modules()):
        if type(lin) is not nn.Linear or name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                               compress_statistics=True, quant_type="nf4", device="meta")
        l4.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, blocksize=64,
                                      compress_statistics=True, quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, l4.to(lin.weight.device))
    model.is_loaded_in_4bit = True
    return model


def _path(peft_name: str) -> str:
    """base_model.model.<path>.lora_A.default.weight -> <path>.lora_A"""
    return peft_name[len("base_model.model."):].replace(".default.weight", "")


def peft_adapters(pm: nn.Module) -> Dict[str, torch.Tensor]:
    return {_path(n): p.detach().clone() for n, p in pm.named_parameters() if ".lora_" in n}


def ours_adapters(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(model).items():
        out[name + ".lora_A"] = layer.lora_A.detach().clone()
        out[name + ".lora_B"] = layer.lora_B.detach().clone()
    return out


def make_setup(device: torch.device, dtype: torch.dtype, checkpointing: bool = False) -> Setup:
    bm = to_bnb_4bit(tiny_llama(dtype, device, checkpointing), dtype)
    torch.manual_seed(1)  # PEFT's adapter init (kaiming-uniform A, zero B)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(bm), cfg, autocast_adapter_dtype=False)
    from peft.tuners.lora import LoraLayer

    for m in pm.modules():
        if isinstance(m, LoraLayer):
            # PEFT makes 4-bit-base adapters fp32; in the model dtype they compute as lora_ops' do (like with like).
            m.lora_A.to(dtype)
            m.lora_B.to(dtype)
            assert type(m).__module__ == "peft.tuners.lora.bnb", type(m)  # PEFT's own bitsandbytes LoRA layer
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g).to(device) for _ in range(N_BATCHES)]
    return Setup(device, dtype, checkpointing, bm, pm, peft_adapters(pm), batches)


def make_ours(setup: Setup, lora_alpha: float = ALPHA) -> nn.Module:
    """lora_ops on a copy of the bitsandbytes model (its NF4 bytes taken as they are), PEFT's initial adapters."""
    ours = lora_ops.apply_lora(copy.deepcopy(setup.bnb_model), TARGETS, r=R, lora_alpha=lora_alpha)
    layers = lora_layers(ours)
    assert len(layers) == 7 * CONFIG["num_hidden_layers"]
    peft_inner = setup.peft_model.base_model.model
    with torch.no_grad():
        for name, layer in layers.items():
            assert isinstance(layer, QLoRALinear) and layer.compute_dtype == setup.dtype, name
            theirs = peft_inner.get_submodule(name).base_layer.state_dict()
            mine = layer.state_dict()
            for key, t in theirs.items():  # the packed codes and the whole quant state, byte for byte
                assert torch.equal(mine[key].cpu(), t.cpu()), f"{name}.{key}: not bitsandbytes' NF4 bytes"
            layer.lora_A.copy_(setup.init[name + ".lora_A"])
            layer.lora_B.copy_(setup.init[name + ".lora_B"])
            assert layer.lora_A.dtype == layer.lora_B.dtype == setup.dtype
    return ours


def train(model: nn.Module, setup: Setup) -> Trained:
    """STEPS AdamW steps (lr LR, torch's defaults otherwise) over the trainable parameters, cycling the batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == setup.dtype for p in params)
    hf = model.get_base_model() if hasattr(model, "peft_config") else model
    assert hf.is_gradient_checkpointing is setup.checkpointing
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = setup.batches[step % N_BATCHES]
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    adapters = peft_adapters(model) if hasattr(model, "peft_config") else ours_adapters(model)
    return Trained(losses, adapters)


def assert_same_training(ours: Trained, theirs: Trained, loss_rtol: float, adapter_rtol: float, what: str):
    """Every step's loss within loss_rtol (relative) and every final adapter tensor within adapter_rtol
    (relative Frobenius error); returns (worst loss error, worst adapter error)."""
    assert len(ours.losses) == len(theirs.losses) == STEPS
    loss_err = [abs(a - b) / abs(b) for a, b in zip(ours.losses, theirs.losses)]
    worst = max(range(STEPS), key=loss_err.__getitem__)
    assert loss_err[worst] <= loss_rtol, (f"{what}: loss of step {worst} differs by {loss_err[worst]:.2e} > "
                                          f"{loss_rtol:.0e} (lora_ops {ours.losses[worst]:.6f}, PEFT+bitsandbytes "
                                          f"{theirs.losses[worst]:.6f})")
    assert set(ours.adapters) == set(theirs.adapters) and len(ours.adapters) == 2 * 7 * CONFIG["num_hidden_layers"]
    errs = {k: rel_error(ours.adapters[k], theirs.adapters[k]) for k in theirs.adapters}
    name = max(errs, key=errs.get)
    assert errs[name] <= adapter_rtol, (f"{what}: final adapter {name} differs by {errs[name]:.2e} > "
                                        f"{adapter_rtol:.0e} (relative Frobenius)")
    return loss_err[worst], errs[name]


# ------------------------------------------------------------------------------------------------ CPU

@pytest.fixture(scope="module", params=[False, True], ids=["no-ckpt", "ckpt"])
def cpu_fp32(request):
    """The CPU fp32 setup and PEFT + bitsandbytes' training run, once per checkpointing setting."""
    setup = make_setup(torch.device("cpu"), torch.float32, checkpointing=request.param)
    return setup, train(setup.peft_model, setup)


def test_cpu_fp32_training_matches_peft_bnb(cpu_fp32):
    setup, theirs = cpu_fp32
    ours = train(make_ours(setup), setup)
    assert theirs.losses[-1] < theirs.losses[0] - 0.1  # the run trains: the comparison is of a real trajectory
    assert any(t.abs().max() > 0 for k, t in theirs.adapters.items() if k.endswith("lora_B"))
    loss_err, adapter_err = assert_same_training(ours, theirs, LOSS_RTOL_FP32, ADAPTER_RTOL_FP32, "CPU fp32")
    print(f"\n[training parity cpu fp32] worst loss {loss_err:.2e}, worst adapter {adapter_err:.2e}")


def test_cpu_fp32_mutations_fail_the_comparison(cpu_fp32):
    """A wrong lora_ops run must fail the same assertion: one adapter element moved by 1e-2 before training (the
    adapters end apart), and a wrong lora_alpha (the losses differ)."""
    setup, theirs = cpu_fp32
    ours = make_ours(setup)
    with torch.no_grad():
        next(iter(lora_layers(ours).values())).lora_A[0, 0] += 1e-2
    with pytest.raises(AssertionError, match="final adapter"):
        assert_same_training(train(ours, setup), theirs, LOSS_RTOL_FP32, ADAPTER_RTOL_FP32, "perturbed adapter")
    with pytest.raises(AssertionError, match="loss of step"):
        assert_same_training(train(make_ours(setup, lora_alpha=24), setup), theirs, LOSS_RTOL_FP32,
                             ADAPTER_RTOL_FP32, "wrong lora_alpha")


# ------------------------------------------------------------------------------------------------ bf16

def _bnb_on_cuda_or_skip():
    import bitsandbytes.functional as bnbf

    try:
        w = torch.randn(64, 64, device="cuda")
        bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                             quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - a bitsandbytes without its CUDA build: the reason is the skip
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run NF4 on CUDA here ({type(e).__name__}: {e}); "
                    "install its CUDA build (docs/DESIGN.md, Running on a GPU machine)")


def bf16_parity(device: torch.device, checkpointing: bool) -> None:
    """The training comparison in bf16 with the bf16 tolerances, then the mutation control: lora_alpha 16 instead
    of 32 must fail the same comparison."""
    setup = make_setup(device, torch.bfloat16, checkpointing)
    theirs = train(setup.peft_model, setup)
    ours = train(make_ours(setup), setup)
    assert theirs.losses[-1] < theirs.losses[0] - 0.1
    loss_err, adapter_err = assert_same_training(ours, theirs, LOSS_RTOL_BF16, ADAPTER_RTOL_BF16,
                                                 f"{device.type} bf16")
    print(f"\n[training parity {device.type} bf16, checkpointing={checkpointing}] worst loss {loss_err:.2e} "
          f"(tolerance {LOSS_RTOL_BF16:.0e}), worst adapter {adapter_err:.2e} (tolerance {ADAPTER_RTOL_BF16:.0e})")
    with pytest.raises(AssertionError):
        assert_same_training(train(make_ours(setup, lora_alpha=16), setup), theirs, LOSS_RTOL_BF16,
                             ADAPTER_RTOL_BF16, "wrong lora_alpha")


def test_cpu_bf16_training_matches_peft_bnb():
    """The GPU test's code on the CPU: bf16 adapters and compute on both sides (bitsandbytes' CPU path vs lora_ops'
    PyTorch reference, not its Triton kernels), the bf16 tolerances and their mutation control."""
    bf16_parity(torch.device("cpu"), checkpointing=False)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_gpu_bf16_training_matches_peft_bnb(cuda, checkpointing):
    """The same training in bf16 on the GPU, where lora_ops runs its Triton kernels."""
    _bnb_on_cuda_or_skip()
    bf16_parity(cuda, checkpointing)
