"""Drop-in LoRA layers: ``LoRALinear`` (dense frozen base) and ``QLoRALinear`` (NF4 frozen base).

Both compute, through ``lora_ops.lora_linear`` (so the fused kernels run wherever they are available),

    y = x @ W^T + scaling * dropout(x) @ A^T @ B^T (+ bias)

with x (..., in), W (out, in) frozen, A = ``lora_A`` (r, in) and B = ``lora_B`` (out, r) the only trainable
parameters, ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA) and dropout on the LoRA
branch input only, in training mode only. Initialisation is PEFT's default: A ~ kaiming-uniform(a=sqrt(5)),
i.e. U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so a fresh layer computes exactly its base layer.

Names follow ``nn.Linear`` (``weight``, ``bias``, ``in_features``, ``out_features``) and PEFT (``lora_A``,
``lora_B``, ``r``, ``lora_alpha``, ``scaling``, ``merge``/``unmerge``). PEFT stores A and B inside
``nn.Linear`` submodules (``lora_A.default.weight``); here they are plain parameters and
``lora_ops.save_adapter``/``load_adapter`` translate to PEFT's file keys.

Compute dtype: the autocast dtype when autocast is on for x's device, else the base weight's dtype
(``QLoRALinear``: the NF4 weight's logical dtype, bitsandbytes' ``compute_dtype``). x, A, B and the bias are
cast to it (A and B differentiably, so fp32 adapter weights may train under bf16 compute); without autocast the
output comes back in x's dtype, as bitsandbytes' ``Linear4bit`` does.
"""
from __future__ import annotations

import math
import warnings
from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import lora_linear
from .nf4 import (FLOAT_DTYPES, QUANT_STORAGE_DTYPES, NF4Weight, bytes_to_storage, check_quant_storage,
                  quantize_nf4, storage_to_bytes)

__all__ = ["LoRALinear", "QLoRALinear", "LoRALayerBase", "check_lora_hparams"]


def check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora) -> None:
    """Raise ValueError/TypeError naming the bad hyper-parameter and the fix."""
    if isinstance(r, bool) or not isinstance(r, Integral):
        raise TypeError(f"r={r!r} must be an int >= 1 (the LoRA rank)")
    if r <= 0:
        raise ValueError(f"r={r} must be >= 1 (the LoRA rank); use r=8 or another positive int")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, Real) or not math.isfinite(float(lora_alpha)):
        raise ValueError(f"lora_alpha={lora_alpha!r} must be a finite real number (scaling = lora_alpha / r)")
    if (isinstance(lora_dropout, bool) or not isinstance(lora_dropout, Real)
            or not (0.0 <= float(lora_dropout) < 1.0)):
        raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1); 1.0 would zero the adapter "
                         "(use 0.0 for no dropout)")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora={use_rslora!r} must be a bool")


def _is_bnb_linear4bit(module) -> bool:
    # Checked by class name and module so that bitsandbytes is only imported when it is already loaded.
    for cls in type(module).__mro__:
        if cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes"):
            return True
    return False


def _is_bnb_module(module) -> bool:
    return any(cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


def _check_plain_linear(linear, on_linear4bit: str) -> None:
    """from_linear's module check: a plain torch.nn.Linear, not a LoRA layer or a bitsandbytes module (TypeError;
    ``on_linear4bit`` is the message for a bitsandbytes Linear4bit, which has its own way in)."""
    if isinstance(linear, LoRALayerBase):
        raise TypeError(f"{type(linear).__name__} already carries a LoRA adapter; from_linear takes a plain "
                        "nn.Linear (use merge_and_unload first to get one)")
    if _is_bnb_linear4bit(linear):
        raise TypeError(on_linear4bit)
    if not isinstance(linear, nn.Linear) or _is_bnb_module(linear):
        raise TypeError(f"from_linear needs a torch.nn.Linear, got {type(linear).__name__}")


def _layer_given_to_constructor(cls_name: str, weight) -> Optional[str]:
    """The TypeError message when a constructor that takes a weight tensor got a whole layer (None otherwise):
    layers go through the classmethods, which reuse (from_linear) or keep (from_bnb) their tensors."""
    if not isinstance(weight, nn.Module):
        return None
    got = type(weight).__name__
    if _is_bnb_linear4bit(weight):
        return (f"{cls_name}(...) takes a weight, not a layer; for a bitsandbytes {got} use "
                f"QLoRALinear.from_bnb(layer, r=..., lora_alpha=...), which keeps its 4-bit bytes")
    if isinstance(weight, nn.Linear) and not _is_bnb_module(weight):
        return (f"{cls_name}(...) takes a weight, not a layer; for a torch.nn.Linear use "
                f"{cls_name}.from_linear(layer, r=..., lora_alpha=...)"
                + (", which quantizes its weight to NF4" if cls_name == "QLoRALinear" else
                   ", which reuses its weight and bias"))
    return (f"{cls_name}(...) takes a weight, not a layer ({got}); build it from a torch.nn.Linear with "
            f"{cls_name}.from_linear(...)" + (" or from a bitsandbytes Linear4bit with QLoRALinear.from_bnb(...)"
                                              if cls_name == "QLoRALinear" else ""))


def _autocast_on(device: torch.device) -> bool:
    return _autocast_on_type(device.type)


def _autocast_on_type(device_type: str) -> bool:
    # torch.is_autocast_enabled raises for device types without autocast ("meta": shape-only runs). Not
    # torch.amp.is_autocast_available: torch 2.11's dynamo cannot trace it (a graph break under
    # torch.compile(fullgraph=True), seen on the H200), while a device-type test traces.
    return device_type in ("cuda", "cpu", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device_type)


class LoRALayerBase(nn.Module):
    """What ``LoRALinear`` and ``QLoRALinear`` share: the adapter, its hyper-parameters, the forward.

    Subclasses provide ``_base_for(dtype)`` (the frozen weight as ``lora_linear`` takes it), ``_base_dtype``,
    ``_add_to_base(delta)`` (W += delta, delta an fp32 (out, in) tensor) and ``_dense_base(dtype)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, bias: Optional[torch.Tensor], device, dtype: torch.dtype):
        super().__init__()
        check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.merged = False
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=device, dtype=dtype))
        if bias is not None:
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
            bias.requires_grad_(False)
        self.register_parameter("bias", bias)
        self.reset_lora_parameters()

    # ---------------------------------------------------------------- hyper-parameters and init
    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's definition)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.

        A is drawn in fp32 and then rounded to its dtype, as PEFT does (its nn.Linear is created in fp32 and
        cast to the base layer's dtype afterwards).
        """
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32, device=self.lora_A.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    # ---------------------------------------------------------------- forward
    # A ``grouped.ProjectionGroup`` this layer belongs to (set with object.__setattr__, so it is a plain
    # reference and not a submodule), and this layer's place in it.
    _lora_group = None
    _lora_group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._lora_group
        if group is not None:
            y = group.member_output(self, x)
            if y is not None:
                return y
        return self._forward_alone(x)

    def _tensor(self, name: str):
        """Parameter ``name`` (or None) from the parameter dict, which is cheaper than nn.Module's attribute lookup
        on every call; through the attribute where something else provides it (torch.nn.utils.parametrize)."""
        params = self._parameters
        return params[name] if name in params else getattr(self, name)

    def _forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        # One autocast query and the parameter dict (_tensor): this runs for every layer call, and its host time
        # adds to each eager step.
        in_dtype = x.dtype
        device = x.device
        autocast = _autocast_on(device)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self._base_dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute dtype {dtype} is not supported; use float32, float16 or bfloat16")
        x = x if in_dtype == dtype else x.to(dtype)
        bias = self._tensor("bias")
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if self.merged:
            y = F.linear(x, self._dense_base(dtype), bias)
        else:
            a, b = self._tensor("lora_A"), self._tensor("lora_B")
            a = a if a.dtype == dtype else a.to(dtype)
            b = b if b.dtype == dtype else b.to(dtype)
            y = lora_linear(x, self._base_for(dtype), a, b, self.scaling, bias=bias,
                            dropout_p=self.lora_dropout, training=self.training)
        if not autocast and y.dtype != in_dtype and in_dtype in FLOAT_DTYPES:
            y = y.to(in_dtype)
        return y

    # ---------------------------------------------------------------- merging
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as an fp32 (out, in) tensor (no gradient)."""
        with torch.no_grad():
            return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merge(self) -> None:
        """W <- W + scaling * B @ A; the forward then runs the base alone. A second merge() warns, no-op."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(self.delta_weight(), merging=True)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - scaling * B @ A (undoes merge() up to rounding). Unmerging an unmerged layer warns, no-op."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        self._add_to_base(-self.delta_weight(), merging=False)
        self.merged = False

    def to_merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + scaling * B @ A (bias kept), in the base weight's dtype.

        The sum is formed in fp32 (an NF4 base is dequantized first) and rounded once to that dtype; the
        returned module's parameters are frozen, as the base was.
        """
        dtype = self._base_dtype
        with torch.no_grad():
            w = self._dense_base(torch.float32)
            if not self.merged:
                w = w + self.delta_weight()
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=w.device, dtype=dtype)
            lin.weight.copy_(w.to(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        lin.requires_grad_(False)
        return lin

    def _hparam_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"scaling={self.scaling:g}, bias={self.bias is not None}")


class LoRALinear(LoRALayerBase):
    """``nn.Linear`` + LoRA with a dense frozen base ``weight`` (out, in) (a Parameter with requires_grad=False).

    Build with ``LoRALinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False)``,
    which reuses the Linear's weight and bias tensors (no copy; tied weights stay tied) and freezes them.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False):
        if not isinstance(weight, torch.Tensor):
            raise TypeError(_layer_given_to_constructor("LoRALinear", weight)
                            or f"weight must be a 2-D (out, in) tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight.dtype={weight.dtype} is not supported; use float32, float16 or bfloat16")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (out_features={out_f},)")
        super().__init__(in_f, out_f, r, lora_alpha, lora_dropout, use_rslora, bias, weight.device, weight.dtype)
        weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach())
        weight.requires_grad_(False)
        self.weight = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``linear`` (its weight and bias are reused and frozen). Bad input -> TypeError/ValueError."""
        _check_plain_linear(linear, "LoRALinear.from_linear got a bitsandbytes Linear4bit; use "
                                    "QLoRALinear.from_bnb(...) to keep its 4-bit bytes")
        check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora)
        return cls(linear.weight, linear.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                   use_rslora=use_rslora)

    @property
    def _base_dtype(self) -> torch.dtype:
        return self._tensor("weight").dtype

    def _base_for(self, dtype):
        w = self._tensor("weight")
        return w if w.dtype == dtype else w.to(dtype)

    def _dense_base(self, dtype):
        return self._base_for(dtype)

    def _add_to_base(self, delta: torch.Tensor, merging: bool) -> None:
        # fp32 sum, one rounding: merge() then unmerge() returns W exactly for fp32 up to two roundings.
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{self._hparam_repr()}, dtype={self.weight.dtype}, merged={self.merged}"


# Names of the NF4 base's tensors, in NF4Weight.tensors() order. They are frozen Parameters
# (requires_grad=False), not buffers, because FSDP2's fully_shard shards Parameters only and keeps every buffer
# whole on every rank: as buffers, the 4-bit base (the bulk of a QLoRA model's memory) would be replicated. As
# Parameters they are sharded on dim 0 like any weight, DDP broadcasts them like buffers, and no optimizer
# touches them (no grad). bitsandbytes' Linear4bit keeps its packed weight as a frozen Parameter (Params4bit)
# too. state_dict() still writes bitsandbytes' Linear4bit keys for them (see _save_to_state_dict).
_NF4_PARAMS = ("weight", "weight_absmax", "weight_nested_absmax", "weight_nested_code", "weight_offset")
# Stored dtypes of the NF4 state besides the packed codes (quant_storage); anything else means a cast corrupted it.
_NF4_STATE_DTYPES = {"weight_nested_absmax": torch.float32, "weight_nested_code": torch.float32,
                     "weight_offset": torch.float32}


class QLoRALinear(LoRALayerBase):
    """LoRA over a frozen 4-bit NF4 base in bitsandbytes' exact format (QLoRA).

    The NF4 tensors are frozen Parameters (``weight`` holds the packed uint8 codes, as in a bnb
    ``Linear4bit``; ``weight_absmax``, ``weight_nested_absmax``, ``weight_nested_code`` and ``weight_offset``
    (shape (1,)) the quant state), so ``.to(device)`` moves them and FSDP2's ``fully_shard`` shards them; a
    dtype cast (``.to(torch.bfloat16)``, ``.half()``) never touches them and only changes the logical dtype the
    base dequantizes to. ``quant_storage`` (bitsandbytes' option of that name): the dtype that holds the packed
    codes and, double-quantized, the uint8 absmax codes: the same bytes as elements of ``weight`` of shape
    (elements, 1), zero-padded to a whole element. A float storage lets a ``fully_shard`` that refuses integer
    Parameters (torch 2.11's) shard the 4-bit base. ``state_dict()`` writes the base under bitsandbytes'
    ``Linear4bit`` keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ...) as uint8 bytes, so a Hugging
    Face bnb-4bit checkpoint loads with ``load_state_dict`` and vice versa. Under FSDP2 the state dict holds the
    NF4 tensors as DTensor shards, as stored (torch.distributed.checkpoint saves and loads them); each QLoRALinear
    must be sharded without a ``MixedPrecisionPolicy`` param_dtype, which would cast the fp32 quant state (the
    forward refuses that).
    """

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None, r: int = 8,
                 lora_alpha: float = 16, lora_dropout: float = 0.0, use_rslora: bool = False, *,
                 quant_storage: torch.dtype = torch.uint8):
        if not isinstance(weight, NF4Weight):
            raise TypeError(_layer_given_to_constructor("QLoRALinear", weight)
                            or f"weight must be an NF4Weight (see lora_ops.quantize_nf4), got {type(weight).__name__}"
                            + ("; for a dense weight tensor use QLoRALinear.from_linear(nn.Linear) or "
                               "lora_ops.quantize_nf4(weight) first" if isinstance(weight, torch.Tensor) else ""))
        out_f, in_f = weight.out_features, weight.in_features
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (out_features={out_f},)")
        check_quant_storage(quant_storage)
        super().__init__(in_f, out_f, r, lora_alpha, lora_dropout, use_rslora, bias, weight.device, weight.dtype)
        self.quant_storage = quant_storage
        for name in _NF4_PARAMS:
            self.register_parameter(name, None)
        self._set_nf4(weight)
        # The dtype the base dequantizes to and the forward computes in (bitsandbytes' compute_dtype); the NF4
        # quant state keeps the checkpoint's own dtype.
        self.compute_dtype = weight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True, *,
                    quant_storage: torch.dtype = torch.uint8) -> "QLoRALinear":
        """Quantize ``linear.weight`` to NF4 (bitsandbytes-identical bytes) and wrap it; the bias is kept."""
        _check_plain_linear(linear, "QLoRALinear.from_linear got a bitsandbytes Linear4bit, which is already "
                                    "quantized; use QLoRALinear.from_bnb(linear4bit, ...) to take its bytes without "
                                    "re-quantizing")
        check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora)
        check_quant_storage(quant_storage)
        w4 = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(w4, linear.bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                   quant_storage=quant_storage)

    @classmethod
    def from_bnb(cls, linear4bit, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False, *, quant_storage: Optional[torch.dtype] = None) -> "QLoRALinear":
        """Wrap a bitsandbytes ``Linear4bit`` (NF4), taking its bytes and quant state as they are.

        The compute dtype is the Linear4bit's ``compute_dtype`` when set, else its quant state's dtype.
        ``quant_storage`` None keeps the Linear4bit's own (its weight's dtype) where lora_ops has it
        (``QUANT_STORAGE_DTYPES``), else uint8.
        """
        if not _is_bnb_linear4bit(linear4bit):
            raise TypeError(f"from_bnb needs a bitsandbytes.nn.Linear4bit, got {type(linear4bit).__name__} "
                            "(for a torch.nn.Linear use QLoRALinear.from_linear)")
        check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora)
        if quant_storage is None:
            own = linear4bit.weight.dtype
            quant_storage = own if own in QUANT_STORAGE_DTYPES else torch.uint8
        check_quant_storage(quant_storage)
        w4 = NF4Weight.from_bnb(linear4bit.weight)
        compute = getattr(linear4bit, "compute_dtype", None)
        compute = compute if compute in FLOAT_DTYPES else w4.dtype
        bias = None if linear4bit.bias is None else linear4bit.bias.detach().to(compute)
        layer = cls(w4, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    quant_storage=quant_storage)
        if compute != w4.dtype:
            layer.compute_dtype = compute
            with torch.no_grad():
                layer.lora_A.data = layer.lora_A.data.to(compute)
                layer.lora_B.data = layer.lora_B.data.to(compute)
        return layer

    # ---------------------------------------------------------------- the NF4 base
    def _set_nf4(self, w4: NF4Weight) -> None:
        for name, t in zip(_NF4_PARAMS, w4.tensors()):
            if t is not None and name == "weight_offset":
                t = t.reshape(1)  # fully_shard shards dim 0, which a 0-d tensor lacks; nf4_weight gives it back 0-d
            elif t is not None and t.dtype == torch.uint8 and self.quant_storage != torch.uint8:
                t = bytes_to_storage(t, self.quant_storage)
                t = t.reshape(-1, 1) if name == "weight" else t  # bitsandbytes' (elements, 1)
            self._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=False)
        self._nf4_shape = torch.Size(w4.shape)
        self._nf4_dtype = w4.dtype
        self.blocksize = w4.blocksize

    @property
    def nf4_weight(self) -> NF4Weight:
        """The frozen base as an ``NF4Weight`` view of this module's parameters (no copy)."""
        return self._nf4_view(self._parameters["weight_offset"])

    def _nf4_view(self, offset, stored: bool = False) -> NF4Weight:
        """The NF4 Parameters in an NF4Weight record, as uint8 bytes the kernels read; with ``stored`` as stored
        (``quant_storage`` elements): what the sharded state dict holds, since a DTensor shard cannot be
        reinterpreted as bytes without a gather."""
        data, absmax, nabs, ncode = (self._parameters[n] for n in _NF4_PARAMS[:4])
        storage = self.quant_storage
        want = dict(_NF4_STATE_DTYPES, weight=storage, weight_absmax=storage if nabs is not None else torch.float32)
        for name, t in zip(_NF4_PARAMS, (data, absmax, nabs, ncode, offset)):
            if t is not None and t.dtype != want[name]:
                # FSDP2's MixedPrecisionPolicy(param_dtype=...) casts every floating Parameter, the fp32 quant
                # state included; a bf16-rounded absmax would silently dequantize another weight.
                raise TypeError(f"{name} of this QLoRALinear is {t.dtype}, but the NF4 format stores it as "
                                f"{want[name]}: something cast the quant state (FSDP2's MixedPrecisionPolicy "
                                "param_dtype does). Apply fully_shard(layer) to each QLoRALinear without a "
                                "param_dtype before sharding its parent with one; the layer casts A, B and x to "
                                "its compute dtype itself")
        offset = None if offset is None else offset.reshape(())
        if storage != torch.uint8 and not stored:
            n = self._nf4_shape.numel()
            data = storage_to_bytes(data, (n + 1) // 2).reshape(-1, 1)
            if nabs is not None:
                absmax = storage_to_bytes(absmax, -(-n // self.blocksize))
        return NF4Weight(data, absmax, self._nf4_shape, self._nf4_dtype, self.blocksize, nabs, ncode, offset)

    @property
    def double_quant(self) -> bool:
        return self._parameters["weight_nested_absmax"] is not None

    @property
    def _base_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def _base_for(self, dtype):
        return self.nf4_weight  # lora_fwd dequantizes to x's dtype inside the kernel

    def _dense_base(self, dtype):
        return self.nf4_weight.dequantize(dtype)

    def _add_to_base(self, delta: torch.Tensor, merging: bool) -> None:
        if merging:
            warnings.warn(
                "QLoRALinear.merge() re-quantizes W + scaling*B@A to NF4, which is lossy: the merged weight carries "
                "a fresh NF4 rounding error and unmerge() cannot restore the original bytes. For an exact merge use "
                "lora_ops.merge_and_unload(model), which dequantizes the base to its dtype (e.g. bf16) and merges "
                "there.", UserWarning, stacklevel=3)
        else:
            warnings.warn("QLoRALinear.unmerge() re-quantizes W - scaling*B@A to NF4 (lossy): the original NF4 "
                          "bytes are not restored exactly", UserWarning, stacklevel=3)
        w4 = self.nf4_weight
        with torch.no_grad():
            w = w4.dequantize(torch.float32) + delta
            new = quantize_nf4(w, blocksize=w4.blocksize, double_quant=w4.nested)
        self._set_nf4(NF4Weight(*new.tensors()[:2], w4.shape, w4.dtype, w4.blocksize, *new.tensors()[2:]))

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype)/.half() would cast the fp32 absmax / nested state like any float parameter, which
        # corrupts the NF4 format. Keep those tensors' dtype (moving them only to the new device), and let the
        # cast decide the logical dtype the base dequantizes to instead. ``detach()`` keeps an alias of the old
        # tensor: _apply may change a Parameter in place (param.data = fn(param)).
        before = {n: self._parameters[n].detach() for n in _NF4_PARAMS if self._parameters[n] is not None}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._parameters[n]
            if new is not None and new.dtype != old.dtype:
                self._parameters[n] = nn.Parameter(old.to(new.device), requires_grad=False)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._parameters["weight"].device))
        if isinstance(probe, torch.Tensor) and probe.dtype in FLOAT_DTYPES:
            self.compute_dtype = probe.dtype
        return self

    # ---------------------------------------------------------------- bitsandbytes checkpoint keys
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _NF4_PARAMS:  # written below under bitsandbytes' keys instead of the attribute names
            destination.pop(prefix + name, None)
        offset = self._parameters["weight_offset"]
        if offset is not None and self._sharded():
            # Under FSDP2 (outside the forward) the NF4 tensors are sharded DTensors and stay so in the state dict,
            # but the JSON quant state holds the offset's value: gather it (a collective; state_dict() runs on
            # every rank, as torch.distributed.checkpoint requires).
            offset = offset.full_tensor()
        # Unsharded: bitsandbytes' uint8 bytes whatever the storage. Sharded with a float storage: as stored (bnb
        # writes its weight in its quant_storage dtype too; the absmax codes so are lora_ops' own, read back by
        # load_state_dict of a layer sharded alike, as torch.distributed.checkpoint does).
        w4 = self._nf4_view(offset, stored=self._sharded())
        for k, v in w4.state_dict(prefix).items():
            destination[k] = v if keep_vars else v.detach()

    def _sharded(self) -> bool:
        """True when the NF4 tensors are DTensors (sharded by FSDP2's fully_shard, outside its forward)."""
        return hasattr(self._parameters["weight"], "full_tensor")

    def _nf4_keys(self, state_dict, prefix):
        w = prefix + "weight"
        return [k for k in state_dict if k == w or k.startswith(w + ".")]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        nf4_keys = self._nf4_keys(state_dict, prefix)
        w4 = None
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        else:
            stored_as = None
            if self._sharded() and hasattr(state_dict[prefix + "weight"], "full_tensor"):
                stored_as = self.quant_storage  # the sharded state dict holds the tensors as stored
            try:
                w4 = NF4Weight.from_state_dict(state_dict, prefix, stored_as=stored_as)
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
                return
            if tuple(w4.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: the checkpoint's NF4 weight has shape {tuple(w4.shape)}, this "
                                  f"layer is ({self.out_features}, {self.in_features})")
                return
            known = set(NF4Weight.state_dict(w4, prefix))
            unexpected_keys.extend(k for k in nf4_keys if k not in known)
        rest = {k: v for k, v in state_dict.items() if k not in set(nf4_keys)}
        n_err, n_missing = len(error_msgs), len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # nn.Module looks for the NF4 Parameters under their attribute names; they come from bnb's keys above.
        ours = {prefix + n for n in _NF4_PARAMS}
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in ours]
        if w4 is not None and len(error_msgs) == n_err:
            if self._sharded():
                problem = self._copy_into_shards(w4)
                if problem is not None:
                    error_msgs.append(f"{prefix}weight: {problem}")
            else:
                self._set_nf4(w4.to(self.lora_A.device))

    def _copy_into_shards(self, w4: NF4Weight) -> Optional[str]:
        """Copy a checkpoint's NF4 tensors into this FSDP2-sharded layer in place; a problem as a message.

        Replacing the Parameters would not do: fully_shard all-gathers its own shards in the next forward, so
        the load would be silently ignored. The checkpoint's tensors must be DTensors sharded like this layer's
        (what the sharded model's state_dict() holds and torch.distributed.checkpoint.load fills in place),
        except the offset: one value, read from the JSON quant state, that fills the local part of its shard.
        """
        srcs = dict(zip(_NF4_PARAMS, w4.tensors()))
        for name in _NF4_PARAMS[:4]:
            p, src = self._parameters[name], srcs[name]
            if (p is None) != (src is None):
                return ("the checkpoint's NF4 layout (double quantization) differs from this layer's, which "
                        "fully_shard has sharded; load such a checkpoint before calling fully_shard")
            if p is not None and not (hasattr(src, "full_tensor") and src.placements == p.placements
                                      and src.shape == p.shape and src.dtype == p.dtype):
                return (f"this QLoRALinear is sharded by FSDP2's fully_shard, and the checkpoint's {name!r} is "
                        "not a DTensor sharded like it; load a full state dict before calling fully_shard, or "
                        "the sharded model's own state_dict() filled by torch.distributed.checkpoint.load")
        if w4.blocksize != self.blocksize:
            return f"the checkpoint's blocksize {w4.blocksize} differs from this sharded layer's {self.blocksize}"
        with torch.no_grad():
            for name in _NF4_PARAMS[:4]:
                if srcs[name] is not None:
                    self._parameters[name].copy_(srcs[name])
            if srcs["weight_offset"] is not None:
                self._parameters["weight_offset"].to_local().fill_(srcs["weight_offset"].item())
        self._nf4_dtype = w4.dtype
        return None

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage == torch.uint8 else f", quant_storage={self.quant_storage}"
        return (f"{self._hparam_repr()}, base=NF4(blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={self._nf4_dtype}{storage}), compute_dtype={self.compute_dtype}, merged={self.merged}")
