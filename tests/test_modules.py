"""LoRALinear / QLoRALinear: forward and gradients against an fp64 oracle, init, dropout, merge, NF4 buffers,
bitsandbytes interop and checkpoint keys, bad input."""
import math
import warnings

import pytest
import torch
from torch import nn

from lora_ops import LoRALinear, QLoRALinear, quantize_nf4
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed

from helpers import assert_rel_close, rel_error

# Odd shapes: in/out not multiples of any block or tile; r = 1 and a prime.
SHAPES = [(37, 23, 5), (75, 29, 1)]


def _linear(in_f, out_f, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _randomize_adapter(layer, seed=1):
    # A fresh layer has B = 0, which would make every adapter test pass trivially.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _oracle(x, w, a, b, scaling, bias=None, mask=None, p=0.0):
    """fp64 y = x W^T + s * dropout(x) A^T B^T + bias, differentiable in x, A, B."""
    xd = x if mask is None else x * mask / (1.0 - p)
    y = x @ w.t() + scaling * (xd @ a.t()) @ b.t()
    return y if bias is None else y + bias


def _f64_leaves(layer, x):
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    return x64, a64, b64


@pytest.mark.parametrize("in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_forward_backward_matches_fp64_oracle(in_f, out_f, r, bias, use_rslora):
    lin = _linear(in_f, out_f, bias)
    layer = LoRALinear.from_linear(lin, r=r, lora_alpha=7, use_rslora=use_rslora)
    _randomize_adapter(layer)
    scaling = 7 / (math.sqrt(r) if use_rslora else r)
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(2, 3, in_f, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = _f64_leaves(layer, x)
    b_ = None if lin.bias is None else lin.bias.detach().double()
    y64 = _oracle(x64, lin.weight.detach().double(), a64, b64, scaling, b_)
    y64.backward(dy.double())
    assert_rel_close(y, y64, torch.float32, "y")
    assert_rel_close(x.grad, x64.grad, torch.float32, "dx")
    assert_rel_close(layer.lora_A.grad, a64.grad, torch.float32, "dA")
    assert_rel_close(layer.lora_B.grad, b64.grad, torch.float32, "dB")
    # The frozen base gets no gradient at all.
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    # Mutation control: the same helper rejects an output that forgot the scaling.
    wrong = _oracle(x64, lin.weight.detach().double(), a64, b64, 1.0, b_) if scaling != 1.0 else y64 * 1.01
    with pytest.raises(AssertionError):
        assert_rel_close(y, wrong, torch.float32, "missing scaling")


def test_only_lora_parameters_train_and_base_is_shared():
    lin = _linear(37, 23)
    layer = LoRALinear.from_linear(lin, r=4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.weight is lin.weight and layer.bias is lin.bias  # no copy: tied weights stay tied
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert tuple(layer.lora_A.shape) == (4, 37) and tuple(layer.lora_B.shape) == (23, 4)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_init_is_peft_default_and_fresh_layer_equals_base():
    lin = _linear(75, 29)
    layer = LoRALinear.from_linear(lin, r=7)
    bound = 1 / math.sqrt(75)  # kaiming_uniform(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), 1/sqrt(in))
    a = layer.lora_A.detach()
    assert float(a.abs().max()) <= bound
    # 525 draws of U(-b, b): P(max |a| < 0.9 b) = 0.9**525 ~ 1e-24 and the std is b/sqrt(3).
    assert float(a.abs().max()) > 0.9 * bound
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.15 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 75)
    assert torch.equal(layer(x), lin(x))


def test_dropout_only_in_training_and_uses_the_kernel_mask():
    lin = _linear(37, 23)
    p = 0.4
    layer = LoRALinear.from_linear(lin, r=5, lora_alpha=10, lora_dropout=p)
    _randomize_adapter(layer)
    x = torch.randn(6, 37)
    layer.eval()
    y_eval = layer(x)
    x64, a64, b64 = _f64_leaves(layer, x)
    w64, bias64 = lin.weight.detach().double(), lin.bias.detach().double()
    assert_rel_close(y_eval, _oracle(x64, w64, a64, b64, 2.0, bias64), torch.float32, "eval: no dropout")
    layer.train()
    seed = peek_dropout_seed(x.device)
    mask = materialize_dropout_mask(seed, 6, 37, p, x.device)
    y_train = layer(x)
    ref = _oracle(x64, w64, a64, b64, 2.0, bias64, mask.double(), p)
    assert_rel_close(y_train, ref, torch.float32, "train: dropout")
    # Mutation control: the mask of another seed does not fit.
    other = materialize_dropout_mask(seed + 1, 6, 37, p, x.device)
    with pytest.raises(AssertionError):
        assert_rel_close(y_train, _oracle(x64, w64, a64, b64, 2.0, bias64, other.double(), p), torch.float32,
                         "another seed")
    torch.manual_seed(123)
    y1 = layer(x)
    torch.manual_seed(123)
    assert torch.equal(y1, layer(x))  # manual_seed reproduces the mask


def test_dense_merge_unmerge():
    lin = _linear(37, 23)
    w0 = lin.weight.detach().clone()
    layer = LoRALinear.from_linear(lin, r=5, lora_alpha=9)
    _randomize_adapter(layer)
    x = torch.randn(5, 37)
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert_rel_close(layer.weight, w0.double() + layer.delta_weight().double(), torch.float32, "merged W")
    assert_rel_close(layer(x), y, torch.float32, "merged forward")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_rel_close(layer.weight, w0, torch.float32, "unmerged W")
    assert float((layer.weight - w0).abs().max()) < 1e-6
    assert_rel_close(layer(x), y, torch.float32, "unmerged forward")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    # Mutation control: a merge with the wrong sign gives another function.
    with torch.no_grad():
        layer.weight.sub_(layer.delta_weight())
    with pytest.raises(AssertionError):
        assert_rel_close(F_linear(x, layer.weight, lin.bias), y, torch.float32, "wrong-sign merge")


def F_linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


def test_to_merged_linear_is_plain_linear():
    lin = _linear(37, 23)
    layer = LoRALinear.from_linear(lin, r=3)
    _randomize_adapter(layer)
    x = torch.randn(4, 37)
    merged = layer.to_merged_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert_rel_close(merged(x), layer(x), torch.float32, "to_merged_linear")


def test_compute_dtype_and_output_dtype():
    lin = _linear(37, 23)
    layer = LoRALinear.from_linear(lin, r=5)
    _randomize_adapter(layer)
    x = torch.randn(4, 37)
    y32 = layer(x)
    y = layer(x.to(torch.bfloat16))  # computed in the weight's dtype (fp32), returned in x's dtype
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, layer(x.to(torch.bfloat16).float()), torch.bfloat16, "bf16 in, fp32 compute")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = layer(x)
    assert ya.dtype == torch.bfloat16
    assert_rel_close(ya, y32, torch.bfloat16, "autocast bf16")
    ya.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ QLoRA

@pytest.mark.parametrize("in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_from_linear_matches_dequantized_oracle(in_f, out_f, r, double_quant):
    lin = _linear(in_f, out_f)
    layer = QLoRALinear.from_linear(lin, r=r, lora_alpha=5, blocksize=64, double_quant=double_quant)
    w4 = quantize_nf4(lin.weight.detach(), blocksize=64, double_quant=double_quant)
    assert torch.equal(layer.weight, w4.data) and torch.equal(layer.weight_absmax, w4.absmax)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    _randomize_adapter(layer)
    x = torch.randn(3, in_f, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = _f64_leaves(layer, x)
    w64 = w4.dequantize(torch.float32).double()
    y64 = _oracle(x64, w64, a64, b64, 5 / r, lin.bias.detach().double())
    y64.backward(dy.double())
    assert_rel_close(y, y64, torch.float32, "y")
    assert_rel_close(x.grad, x64.grad, torch.float32, "dx")
    assert_rel_close(layer.lora_A.grad, a64.grad, torch.float32, "dA")
    assert_rel_close(layer.lora_B.grad, b64.grad, torch.float32, "dB")
    # Mutation control: the dense (unquantized) weight is another function at fp32 tolerance.
    with pytest.raises(AssertionError):
        assert_rel_close(y, _oracle(x64, lin.weight.detach().double(), a64, b64, 5 / r,
                                    lin.bias.detach().double()), torch.float32, "dense instead of NF4")


def test_qlora_dtype_cast_keeps_nf4_bytes_and_moves_compute_dtype():
    lin = _linear(75, 29)
    layer = QLoRALinear.from_linear(lin, r=3, double_quant=False)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    for n, b in layer.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    assert layer.nf4_weight.dtype == torch.float32  # the checkpoint's quant-state dtype is unchanged
    y = layer(torch.randn(2, 75, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32


def test_qlora_state_dict_has_bnb_keys_and_round_trips():
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(37, 23)
    layer = QLoRALinear.from_linear(lin, r=5)
    _randomize_adapter(layer)
    l4 = _bnb_linear4bit(bnb, lin)
    sd = layer.state_dict()
    assert set(sd) == set(l4.state_dict()) | {"lora_A", "lora_B"}
    # Another layer (other weights) takes all of it back, NF4 bytes included.
    other = QLoRALinear.from_linear(_linear(37, 23, seed=5), r=5)
    other.load_state_dict(sd)
    for a, b in zip(layer.nf4_weight.tensors(), other.nf4_weight.tensors()):
        assert torch.equal(a, b)
    x = torch.randn(3, 37)
    assert torch.equal(layer(x), other(x))
    # An NF4 base of another shape (same adapter tensors) is refused by load_state_dict, and nothing changes.
    wrong_base = QLoRALinear.from_linear(_linear(36, 23), r=5).state_dict()
    bad = {**sd, **{k: v for k, v in wrong_base.items() if k.startswith("weight")}}
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"NF4 weight has shape \(23, 36\)"):
        other.load_state_dict(bad)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def _bnb_linear4bit(bnb, lin, double_quant=True, blocksize=64):
    l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                           compute_dtype=lin.weight.dtype, compress_statistics=double_quant, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=double_quant,
                                  quant_type="nf4", blocksize=blocksize)
    if lin.bias is not None:
        l4.bias = nn.Parameter(lin.bias.data.clone())
    return l4.to("cpu")  # quantizes on CPU


@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_takes_bytes_and_matches_bnb_forward(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(75, 29)
    l4 = _bnb_linear4bit(bnb, lin, double_quant)
    layer = QLoRALinear.from_bnb(l4, r=5, lora_alpha=10)
    qs = l4.weight.quant_state
    assert torch.equal(layer.weight, l4.weight.data.reshape(-1, 1))  # the bytes, not a re-quantization
    assert torch.equal(layer.weight_absmax, qs.absmax)
    x = torch.randn(4, 75)
    l4.train()  # bnb's eval/no-grad CPU forward would repack its weight
    assert_rel_close(layer(x), l4(x), torch.float32, "fresh adapter == bnb Linear4bit")
    # And the bnb state dict (Hugging Face's pre-quantized format) loads into a QLoRALinear.
    target = QLoRALinear.from_linear(_linear(75, 29, seed=9), r=5, lora_alpha=10, double_quant=double_quant)
    missing, unexpected = target.load_state_dict(l4.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(target.weight, layer.weight) and torch.equal(target.weight_absmax, layer.weight_absmax)
    _randomize_adapter(layer)
    _randomize_adapter(target)
    assert torch.equal(target(x), layer(x))


def test_qlora_merge_warns_and_requantizes():
    lin = _linear(75, 29)
    layer = QLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    _randomize_adapter(layer)
    x = torch.randn(5, 75)
    y = layer(x)
    w_dq = layer.nf4_weight.dequantize(torch.float32)
    expect = quantize_nf4(w_dq + layer.delta_weight(), blocksize=64, double_quant=True)
    with pytest.warns(UserWarning, match="lossy.*merge_and_unload"):
        layer.merge()
    for a, b in zip(layer.nf4_weight.tensors(), expect.tensors()):
        assert torch.equal(a, b)
    # Cost of quantization (not the same computation): the merged output is within NF4's error, which is
    # far from zero (so merging really re-quantized) and far below a dropped adapter.
    err = rel_error(layer(x), y)
    dropped = rel_error(torch.nn.functional.linear(x, w_dq, lin.bias), y)
    assert 1e-4 < err < 0.25 * dropped
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.unmerge()
    # merge_and_unload's path is exact: dequantize, add in fp32, round once.
    layer2 = QLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    _randomize_adapter(layer2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = layer2.to_merged_linear()
    assert type(merged) is nn.Linear
    assert_rel_close(merged(x), layer2(x), torch.float32, "to_merged_linear of NF4")


def test_extra_repr_names_everything():
    q = QLoRALinear.from_linear(_linear(37, 23), r=3, lora_alpha=6, lora_dropout=0.1, blocksize=32)
    s = repr(q)
    for part in ("in_features=37", "out_features=23", "r=3", "lora_alpha=6", "lora_dropout=0.1",
                 "blocksize=32", "double_quant=True", "merged=False"):
        assert part in s, (part, s)
    d = repr(LoRALinear.from_linear(_linear(37, 23), r=2))
    assert "dtype=torch.float32" in d and "r=2" in d


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(r=0), ValueError, "r=0"),
    (dict(r=-3), ValueError, "r=-3"),
    (dict(r=2.5), TypeError, "r=2.5"),
    (dict(r=True), TypeError, "r=True"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout=1.0"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout=-0.1"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha=nan"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
])
def test_bad_hyperparameters(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls.from_linear(_linear(37, 23), **kwargs)


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_non_linear_input(cls):
    with pytest.raises(TypeError, match="Conv1d"):
        cls.from_linear(nn.Conv1d(3, 4, 1))
    layer = LoRALinear.from_linear(_linear(37, 23))
    with pytest.raises(TypeError, match="already carries"):
        cls.from_linear(layer)


def test_linear4bit_routed_to_from_bnb():
    bnb = pytest.importorskip("bitsandbytes")
    l4 = _bnb_linear4bit(bnb, _linear(37, 23))
    with pytest.raises(TypeError, match="from_bnb"):
        LoRALinear.from_linear(l4)
    with pytest.raises(TypeError, match="from_bnb"):
        QLoRALinear.from_linear(l4)
    with pytest.raises(TypeError, match="Linear4bit"):
        QLoRALinear.from_bnb(_linear(37, 23))


def test_bad_blocksize():
    with pytest.raises(ValueError):
        QLoRALinear.from_linear(_linear(37, 23), blocksize=48)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant", [False, True])
def test_gpu_modules_match_cpu_reference(cuda, dtype, quant):
    """The module on CUDA (fast kernels under LORA_OPS_BACKEND=auto) vs the same module on CPU (reference)."""
    lin = _linear(4096 + 37, 1024 + 5, dtype=torch.float32)
    make = (lambda l: QLoRALinear.from_linear(l, r=16, lora_alpha=32)) if quant else \
        (lambda l: LoRALinear.from_linear(l, r=16, lora_alpha=32))
    cpu_layer = make(lin).to(dtype)
    _randomize_adapter(cpu_layer)
    gpu_layer = make(_linear(4096 + 37, 1024 + 5)).to(dtype)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    gpu_layer.to(cuda)
    x = torch.randn(3, 333, 4096 + 37, dtype=dtype)
    xg = x.to(cuda).requires_grad_(True)
    xc = x.float().requires_grad_(True)
    cpu_f32 = make(lin)
    cpu_f32.load_state_dict({k: (v.float() if v.is_floating_point() and not k.startswith("weight") else v)
                             for k, v in cpu_layer.state_dict().items()})
    yc = cpu_f32(xc)
    yg = gpu_layer(xg)
    dy = torch.randn_like(yc)
    yc.backward(dy)
    yg.backward(dy.to(cuda, dtype))
    assert_rel_close(yg, yc, dtype, "y")
    assert_rel_close(xg.grad, xc.grad, dtype, "dx")
    assert_rel_close(gpu_layer.lora_A.grad, cpu_f32.lora_A.grad, dtype, "dA")
    assert_rel_close(gpu_layer.lora_B.grad, cpu_f32.lora_B.grad, dtype, "dB")
