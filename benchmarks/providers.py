"""Providers: how each contender builds its layer from a case's shared tensors, and what the harness calls.

The case's setup factory (``make_case_data``) draws x (M, K), dy (M, N) and one or more weight sets
(W (N, K), A (r, K), B (N, r)) once; every provider of the case builds from those same tensors, cloning what
it owns (so its weights count in its peak memory) and quantizing NF4 weights from the same W.
A builder returns a ``Built``: callables for the modes it supports, the trainable tensors whose ``.grad`` the
harness clears before every timed call, and a context that must surround every call (``unfused`` runs inside
``lora_ops._backend.use_backend("reference")``, forward and backward alike).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import lora_ops
from lora_ops import _backend

from .presets import Case

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NF4_BLOCKSIZE = 64


@dataclass
class WeightSet:
    W: Tensor  # (N, K), the frozen base weight in the case dtype
    A: Optional[Tensor] = None  # (r, K)
    B: Optional[Tensor] = None  # (N, r)


@dataclass
class CaseData:
    x: Tensor  # (M, K) leaf; requires grad for the training modes
    x_nograd: Tensor  # the same values without grad (decode)
    dy: Optional[Tensor]  # (M, N) upstream gradient
    sets: List[WeightSet]


def make_case_data(case: Case, device: torch.device, n_sets: int = 1, seed: int = 0) -> CaseData:
    """The case's shared random tensors (never zeros: some kernels skip zero blocks, and B = 0 as PEFT
    initialises it would make the LoRA term free). Scales keep y and the gradients O(1)."""
    if n_sets < 1:
        raise ValueError(f"n_sets={n_sets} must be >= 1")
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    sets = []
    for _ in range(n_sets):
        W = randn(case.N, case.K, scale=case.K ** -0.5)
        if case.kind == "layer":
            sets.append(WeightSet(W, randn(case.r, case.K, scale=case.K ** -0.5), randn(case.N, case.r,
                                                                                      scale=case.r ** -0.5)))
        else:
            sets.append(WeightSet(W))
    if case.kind == "dequant":
        empty = torch.empty(0, device=device, dtype=dtype)
        return CaseData(empty, empty, None, sets)
    x = randn(case.M, case.K)
    dy = randn(case.M, case.N)
    return CaseData(x.clone().requires_grad_(True), x, dy, sets)


@dataclass
class Built:
    """One provider's layer on one weight set."""

    forward: Optional[Callable[[Tensor], Tensor]] = None  # training forward (autograd on)
    decode: Optional[Callable[[Tensor], Tensor]] = None  # inference forward; the caller holds no_grad
    dequant: Optional[Callable[[], Tensor]] = None
    params: Tuple[Tensor, ...] = ()  # trainable tensors: .grad set to None before every timed call
    context: Callable[[], ContextManager] = contextlib.nullcontext
    module: Optional[nn.Module] = None  # switched to train() / eval() by mode
    info: Dict = field(default_factory=dict)

    def supports(self, mode: str) -> bool:
        if mode in ("forward", "backward", "full", "host"):
            return self.forward is not None
        if mode == "decode":
            return self.decode is not None
        if mode == "dequant":
            return self.dequant is not None
        return False


def implementation_name(op: str, device_type: str) -> str:
    """The implementation ``op`` dispatches to right now for tensors on ``device_type`` ("reference" if none)."""
    fn = _backend.implementation(op, device_type)
    if fn is None:
        return "reference"
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _frozen_linear(W: Tensor, trainable: bool = False) -> nn.Linear:
    # Built on the meta device so no second random weight is drawn; the parameter is a clone of the case's W,
    # so the weight this provider holds is allocated after the memory baseline and counts.
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W.detach().clone(), requires_grad=trainable)
    return lin


def _lora_params(ws: WeightSet) -> Tuple[Tensor, Tensor]:
    return ws.A.detach().clone().requires_grad_(True), ws.B.detach().clone().requires_grad_(True)


def _need(case: Case, kind: str) -> None:
    if case.kind != kind:
        raise ValueError(f"this provider does not run {case.kind} cases")


# ----------------------------------------------------------------------------------------------- builders

def build_floor(case: Case, ws: WeightSet) -> Built:
    _need(case, "layer")
    lin = _frozen_linear(ws.W)
    return Built(forward=lin, decode=lin, module=lin, info={"module": "torch.nn.Linear (frozen)"})


def build_full_ft(case: Case, ws: WeightSet) -> Built:
    _need(case, "layer")
    lin = _frozen_linear(ws.W, trainable=True)
    return Built(forward=lin, params=(lin.weight,), module=lin, info={"module": "torch.nn.Linear (trainable)"})


def _lora_ops_weight(case: Case, W: Tensor):
    if case.weight == "nf4":
        return lora_ops.quantize_nf4(W, blocksize=NF4_BLOCKSIZE, double_quant=True)
    return W.detach().clone()


def _build_lora_ops(case: Case, ws: WeightSet, backend: Optional[str]) -> Built:
    context = (lambda: _backend.use_backend(backend)) if backend else contextlib.nullcontext
    dev = ws.W.device.type
    with context():
        if case.kind == "dequant":
            w4 = lora_ops.quantize_nf4(ws.W, blocksize=NF4_BLOCKSIZE, double_quant=True)
            dtype = DTYPES[case.dtype]
            info = {"nf4_dequantize": implementation_name("nf4_dequantize", dev), "backend": backend or "default"}
            return Built(dequant=lambda: w4.dequantize(dtype), context=context, info=info)
        weight = _lora_ops_weight(case, ws.W)
        info = {op: implementation_name(op, dev) for op in ("lora_fwd", "lora_bwd")}
        if case.weight == "nf4":
            info["nf4_dequantize"] = implementation_name("nf4_dequantize", dev)
    info["backend"] = backend or "default"
    A, B = _lora_params(ws)
    s, p = case.scaling, case.dropout

    def forward(x):
        return lora_ops.lora_linear(x, weight, A, B, s, dropout_p=p, training=True)

    def decode(x):
        return lora_ops.lora_linear(x, weight, A, B, s, dropout_p=p, training=False)

    return Built(forward=forward, decode=decode, params=(A, B), context=context, info=info)


def build_fused(case: Case, ws: WeightSet) -> Built:
    return _build_lora_ops(case, ws, None)


def build_unfused(case: Case, ws: WeightSet) -> Built:
    return _build_lora_ops(case, ws, "reference")


class _Wrap(nn.Module):
    """The smallest model get_peft_model accepts: one target module named ``proj``."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _peft_layer(base: nn.Module, case: Case, ws: WeightSet) -> Built:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.dropout, target_modules=["proj"],
                     bias="none")
    model = get_peft_model(_Wrap(base), cfg)
    # The LoRA layer itself is timed, not the wrapper, so no extra module call is charged to PEFT.
    layer = model.base_model.model.proj
    dtype = DTYPES[case.dtype]
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    # On a 4-bit base PEFT leaves the adapter in fp32 and casts x up to it; every provider here computes the
    # LoRA term in the case dtype, so the adapter is cast down (what bf16 autocast training would compute).
    lora_A.to(dtype)
    lora_B.to(dtype)
    with torch.no_grad():
        lora_A.weight.copy_(ws.A)
        lora_B.weight.copy_(ws.B)
    if abs(layer.scaling["default"] - case.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != case scaling {case.scaling}")
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    if {id(p) for p in params} != {id(lora_A.weight), id(lora_B.weight)}:
        raise RuntimeError("peft left parameters other than lora_A/lora_B trainable")
    import peft

    info = {"module": f"{type(layer).__module__}.{type(layer).__name__}", "peft": peft.__version__,
            "adapter_dtype": case.dtype}
    return Built(forward=layer, decode=layer, params=params, module=layer, info=info)


def build_peft(case: Case, ws: WeightSet) -> Built:
    _need(case, "layer")
    if case.weight != "dense":
        raise ValueError("peft runs dense cases; NF4 cases use peft_bnb")
    return _peft_layer(_frozen_linear(ws.W), case, ws)


def bnb_linear4bit(W: Tensor, compute_dtype: torch.dtype, bias: Optional[Tensor] = None) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quant, blocksize 64) holding W (out, in), quantized by bitsandbytes'
    own kernel on W's device (Params4bit quantizes on its first move to a device; W itself is left as it is);
    the bias, if any, frozen. The layer presets' peft_bnb and the model preset's build both use it."""
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=bias is not None, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(W.detach().clone(), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                   compress_statistics=True, quant_type="nf4")
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin.to(W.device)


def build_peft_bnb(case: Case, ws: WeightSet) -> Built:
    _need(case, "layer")
    if case.weight != "nf4":
        raise ValueError("peft_bnb runs NF4 cases; dense cases use peft")
    built = _peft_layer(bnb_linear4bit(ws.W, DTYPES[case.dtype]), case, ws)
    import bitsandbytes as bnb

    built.info["bitsandbytes"] = bnb.__version__
    return built


def build_bnb_dequant(case: Case, ws: WeightSet) -> Built:
    _need(case, "dequant")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(ws.W, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    return Built(dequant=lambda: bnbf.dequantize_4bit(packed, state, quant_type="nf4"),
                 info={"function": "bitsandbytes.functional.dequantize_4bit", "bitsandbytes": bnb.__version__})


def dequant_bytes(case: Case) -> int:
    """Compulsory DRAM traffic of one NF4 dequantization: read the NF4 bytes, write the dense weight."""
    from lora_ops.nf4 import nf4_bytes

    return nf4_bytes(case.N, case.K, NF4_BLOCKSIZE, True) + case.N * case.K * DTYPES[case.dtype].itemsize


def build_copy(case: Case, ws: WeightSet) -> Built:
    _need(case, "dequant")
    n = dequant_bytes(case) // 2  # read n + write n = the dequantization's traffic
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=ws.W.device)
    dst = torch.empty_like(src)
    return Built(dequant=lambda: dst.copy_(src), info={"bytes_copied": n})


BUILDERS: Dict[str, Callable[[Case, WeightSet], Built]] = {
    "floor": build_floor,
    "floor_repeat": build_floor,
    "full_ft": build_full_ft,
    "unfused": build_unfused,
    "peft": build_peft,
    "peft_bnb": build_peft_bnb,
    "fused": build_fused,
    "copy": build_copy,
    "bnb": build_bnb_dequant,
}
