"""Block benchmark (preset ``block``): the seven LoRA projections of one decoder layer, grouped and not.

Issue 21's case for grouped projections (docs/GROUPED.md): q/k/v read one input and gate/up another, so
``apply_lora(..., group_projections=True)`` runs each set as one ``lora_linear`` call over one shared base buffer.
This preset times what that changes, on one Llama-3-8B layer's projections (``presets.BlockCase``):

    q 4096->4096, k 4096->1024, v 4096->1024 (input x_attn), o 4096->4096 (x_o),
    gate 4096->14336, up 4096->14336 (x_mlp), down 14336->4096 (x_down)

forward + backward of those linear layers only: no attention or activation math between them, each projection
gets an input of its own width (q/k/v the same tensor, gate/up the same tensor), and the backward receives one
upstream gradient per output (``torch.autograd.backward`` of the seven outputs) and flows to the four inputs.

The harness (benchmarks/harness.py) times it like a layer case: the same do_bench median, eager loop, peak
memory (baseline before the provider's weights are built) and profile, on tensors drawn once per case
(``make_block_data``), so every provider starts from the same weights, adapters, inputs and gradients. Each
provider is a ``Block`` module (``self_attn`` holding q/k/v/o, ``mlp`` holding gate/up/down, the parents grouped
projections are found under, as in a transformers decoder layer) built from those tensors:

* ``floor``: the seven frozen ``nn.Linear`` without adapters; the inputs require grad, so its backward is the
  seven dX GEMMs: the least the block's fwd+bwd costs, the reference of every ratio;
* ``floor_grouped``: the floor with q/k/v and gate/up each one frozen ``nn.Linear`` over the concatenated weights,
  outputs split: the base GEMMs a grouped call runs (the floor the grouped targets of docs/GROUPED.md name);
* ``fused`` / ``fused_grouped``: ``lora_ops.apply_lora`` on the bf16 linears, ``group_projections`` off / on;
* ``fused_qlora`` / ``fused_qlora_grouped``: the same with ``quantize="nf4"`` (blocksize 64, double quant);
* ``peft``: PEFT LoRA on the bf16 linears; ``peft_bnb``: PEFT LoRA on bitsandbytes ``Linear4bit`` (NF4, double
  quant, quantized by bitsandbytes from the same weights), adapters cast to the case dtype as the layer presets do.

A grouped provider whose groups did not form (``lora_ops.grouped.explain_groups``) fails its build, so an
ungrouped model is never timed under a grouped name. FLOPs and bytes (TFLOP/s, GB/s columns) are the seven
layers' own (``harness.layer_cost`` per projection): a grouped call's extra work on the block-diagonal B is not
counted, so its TFLOP/s read as useful work per second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .presets import BlockCase, Case
from .providers import DTYPES, NF4_BLOCKSIZE, Built, WeightSet, _frozen_linear, implementation_name

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_PROVIDERS = ("peft_bnb", "fused_qlora", "fused_qlora_grouped")
NO_ADAPTER = ("floor", "floor_grouped", "floor_repeat")


@dataclass
class BlockData:
    """The case's shared tensors, in the shape the harness's ``make_calls`` reads: ``x`` the inputs (x_attn, x_o,
    x_mlp, x_down; leaves that require grad), ``dy`` one upstream gradient per projection output (in
    ``case.projections()`` order), ``sets`` one weight set: projection name -> WeightSet (W, A, B)."""

    x: Tuple[Tensor, ...]
    x_nograd: Tuple[Tensor, ...]
    dy: Tuple[Tensor, ...]
    sets: List[Dict[str, WeightSet]]


def make_block_data(case: BlockCase, device: torch.device, seed: int = 0) -> BlockData:
    """Random tensors as ``providers.make_case_data`` draws them (never zeros, B included; scales keeping y and the
    gradients O(1)), for the seven projections and four inputs."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    ws = {}
    for name, _, _, K, N in case.projections():
        ws[name] = WeightSet(randn(N, K, scale=K ** -0.5), randn(case.r, K, scale=K ** -0.5),
                             randn(N, case.r, scale=case.r ** -0.5))
    xs = [randn(case.M, width) for _, width in case.inputs()]
    dys = tuple(randn(case.M, N) for _, _, _, _, N in case.projections())
    return BlockData(tuple(x.clone().requires_grad_(True) for x in xs), tuple(xs), dys, [ws])


# ------------------------------------------------------------------------------------------------ modules

class _Attention(nn.Module):
    def __init__(self, q_proj, k_proj, v_proj, o_proj):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj

    def forward(self, x, x_o):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(x_o)


class _MLP(nn.Module):
    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x, x_down):
        return self.gate_proj(x), self.up_proj(x), self.down_proj(x_down)


class Block(nn.Module):
    """The seven projections under the parents a transformers decoder layer has (``self_attn``, ``mlp``), so
    ``apply_lora``'s grouping and PEFT's target matching find them by their usual names. ``forward(inputs)``
    takes (x_attn, x_o, x_mlp, x_down) and returns the seven outputs (q, k, v, o, gate, up, down)."""

    def __init__(self, linears: Dict[str, nn.Module]):
        super().__init__()
        self.self_attn = _Attention(*(linears[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")))
        self.mlp = _MLP(*(linears[n] for n in ("gate_proj", "up_proj", "down_proj")))

    def forward(self, inputs):
        x_attn, x_o, x_mlp, x_down = inputs
        return self.self_attn(x_attn, x_o) + self.mlp(x_mlp, x_down)


class GroupedFloor(nn.Module):
    """The floor with q/k/v and gate/up each one frozen linear over the concatenated weights."""

    def __init__(self, ws: Dict[str, WeightSet]):
        super().__init__()
        cat = lambda names: torch.cat([ws[n].W for n in names])  # noqa: E731
        self.qkv = _frozen_linear(cat(("q_proj", "k_proj", "v_proj")))
        self.o_proj = _frozen_linear(ws["o_proj"].W)
        self.gate_up = _frozen_linear(cat(("gate_proj", "up_proj")))
        self.down_proj = _frozen_linear(ws["down_proj"].W)
        self.qkv_sizes = [ws[n].W.shape[0] for n in ("q_proj", "k_proj", "v_proj")]
        self.gate_up_sizes = [ws[n].W.shape[0] for n in ("gate_proj", "up_proj")]

    def forward(self, inputs):
        x_attn, x_o, x_mlp, x_down = inputs
        q, k, v = self.qkv(x_attn).split(self.qkv_sizes, dim=-1)
        gate, up = self.gate_up(x_mlp).split(self.gate_up_sizes, dim=-1)
        return q, k, v, self.o_proj(x_o), gate, up, self.down_proj(x_down)


def _base_block(ws: Dict[str, WeightSet]) -> Block:
    # Each provider clones the case's weights (_frozen_linear), so they are allocated after its memory baseline.
    return Block({n: _frozen_linear(ws[n].W) for n in TARGETS})


# ----------------------------------------------------------------------------------------------- builders

def _need_block(case) -> None:
    if getattr(case, "kind", None) != "block":
        raise ValueError(f"this provider runs block cases, not {getattr(case, 'kind', '?')} cases")


def build_floor(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    block = _base_block(ws)
    return Built(forward=block, decode=block, module=block,
                 info={"module": "seven torch.nn.Linear (frozen), no adapter"})


def build_floor_grouped(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    block = GroupedFloor(ws)
    return Built(forward=block, decode=block, module=block,
                 info={"module": "torch.nn.Linear (frozen): qkv 1, o 1, gate_up 1, down 1; outputs split"})


def _lora_params(model: nn.Module) -> Tuple[Tensor, ...]:
    return tuple(p for p in model.parameters() if p.requires_grad)


def _fused(case: BlockCase, ws: Dict[str, WeightSet], quantize: Optional[str], group: bool) -> Built:
    import lora_ops
    from lora_ops.grouped import explain_groups
    from lora_ops.inject import lora_layers

    _need_block(case)
    block = _base_block(ws)
    lora_ops.apply_lora(block, list(TARGETS), r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0,
                        quantize=quantize, blocksize=NF4_BLOCKSIZE, double_quant=True, group_projections=group)
    layers = lora_layers(block)
    with torch.no_grad():
        for name, layer in layers.items():
            short = name.rsplit(".", 1)[-1]
            layer.lora_A.copy_(ws[short].A)
            layer.lora_B.copy_(ws[short].B)
    status = {r["parent"]: r["status"] for r in explain_groups(block)}
    if group and list(status.values()) != ["grouped", "grouped"]:
        raise RuntimeError(f"group_projections=True left the projections ungrouped: {explain_groups(block)}")
    params = _lora_params(block)
    if len(params) != 2 * len(TARGETS) or {p.dtype for p in params} != {DTYPES[case.dtype]}:
        raise RuntimeError(f"apply_lora left {len(params)} trainable tensors of {({p.dtype for p in params})}, "
                           f"expected lora_A and lora_B of 7 layers in {case.dtype}")
    dev = ws["q_proj"].W.device.type
    info = {op: implementation_name(op, dev) for op in ("lora_fwd", "lora_bwd")}
    if quantize:
        info["nf4_dequantize"] = implementation_name("nf4_dequantize", dev)
    info.update(module="lora_ops.apply_lora", quantize=quantize or "none", group_projections=group,
                groups=status)
    return Built(forward=block, decode=block, params=params, module=block, info=info)


def build_fused(case, ws):
    return _fused(case, ws, None, False)


def build_fused_grouped(case, ws):
    return _fused(case, ws, None, True)


def build_fused_qlora(case, ws):
    return _fused(case, ws, "nf4", False)


def build_fused_qlora_grouped(case, ws):
    return _fused(case, ws, "nf4", True)


def _peft(block: nn.Module, case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                     bias="none")
    model = get_peft_model(block, cfg)
    inner = model.base_model.model  # the Block itself is timed, not PEFT's wrapper (as the layer presets do)
    dtype = DTYPES[case.dtype]
    types = set()
    for name, m in inner.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        short = name.rsplit(".", 1)[-1]
        lora_A, lora_B = m.lora_A["default"], m.lora_B["default"]
        # On a 4-bit base PEFT creates the adapter in fp32 and casts x up to it; every provider here computes the
        # LoRA term in the case dtype (what bf16 autocast training would compute).
        lora_A.to(dtype)
        lora_B.to(dtype)
        with torch.no_grad():
            lora_A.weight.copy_(ws[short].A)
            lora_B.weight.copy_(ws[short].B)
        if abs(m.scaling["default"] - case.scaling) > 1e-12:
            raise RuntimeError(f"peft scaling {m.scaling['default']} != case scaling {case.scaling}")
        types.add(f"{type(m).__module__}.{type(m).__name__}")
    params = _lora_params(inner)
    if len(params) != 2 * len(TARGETS):
        raise RuntimeError(f"peft left {len(params)} trainable tensors, expected lora_A and lora_B of 7 layers")
    info = {"module": sorted(types), "peft": peft.__version__, "adapter_dtype": case.dtype}
    return Built(forward=inner, decode=inner, params=params, module=inner, info=info)


def build_peft(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    return _peft(_base_block(ws), case, ws)


def build_peft_bnb(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    from .model import bnb_unavailable, to_bnb_4bit

    _need_block(case)
    device = ws["q_proj"].W.device
    reason = bnb_unavailable(device)
    if reason:
        raise RuntimeError(reason)
    import bitsandbytes as bnb

    block = _base_block(ws)
    n = to_bnb_4bit(block, TARGETS, DTYPES[case.dtype])
    if n != len(TARGETS):
        raise RuntimeError(f"replaced {n} linear layers by Linear4bit, expected {len(TARGETS)}")
    built = _peft(block, case, ws)
    built.info.update(bitsandbytes=bnb.__version__, base="bitsandbytes Linear4bit nf4, double quant, blocksize 64")
    return built


BUILDERS: Dict[str, Callable[[BlockCase, Dict[str, WeightSet]], Built]] = {
    "floor": build_floor,
    "floor_grouped": build_floor_grouped,
    "floor_repeat": build_floor,
    "peft": build_peft,
    "fused": build_fused,
    "fused_grouped": build_fused_grouped,
    "peft_bnb": build_peft_bnb,
    "fused_qlora": build_fused_qlora,
    "fused_qlora_grouped": build_fused_qlora_grouped,
}


# ------------------------------------------------------------------------------------------------ cost

def block_cost(case: BlockCase, provider: str, mode: str) -> Tuple[float, float]:
    """(FLOPs, compulsory bytes) of one call: the sum of ``harness.layer_cost`` over the seven projections, as
    dense layers without adapter (floors), dense LoRA or NF4 LoRA layers."""
    from .harness import layer_cost

    weight = "nf4" if provider in NF4_PROVIDERS else "dense"
    as_provider = "floor" if provider in NO_ADAPTER else "fused"
    flops = nbytes = 0.0
    for name, _, _, K, N in case.projections():
        layer = Case(case.preset, name, "layer", case.M, K, N, case.r, weight, 0.0, case.dtype)
        f, b = layer_cost(layer, as_provider, mode)
        flops += f
        nbytes += b
    return flops, nbytes
