"""Block benchmark (preset ``block``): the seven LoRA projections of one decoder layer, grouped and not.

Issue 21's case for grouped projections (docs/GROUPED.md): q/k/v read one input and gate/up another, so
``apply_lora(..., group_projections=True)`` runs each set as one ``lora_linear`` call over one shared base buffer.
This preset times what that changes, on one Llama-3-8B layer's projections (``presets.BlockCase``):

    q 4096->4096, k 4096->1024, v 4096->1024 (input x_attn), o 4096->4096 (x_o),
    gate 4096->14336, up 4096->14336 (x_mlp), down 14336->4096 (x_down)

forward + backward of those linear layers only: no attention or activation math between them, each projection
gets an input of its own width (q/k/v the same tensor, gate/up the same tensor), and the backward receives one
upstream gradient per output (``torch.autograd.backward`` of the seven outputs) and flows to the four inputs.
The preset also times q/k/v alone and gate/up alone (``BlockCase.part``): the issue's per-group targets are
ratios to the group's concatenated GEMM, so those cases' floor is ``floor_grouped``.

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

After the providers, ``measure_pairs`` times each grouped provider against the case's floor once more, the two
built side by side and their eager loops alternating in rounds (mode ``paired``, metric ``paired_ratio``: median
and p20 / p80 of the rounds' ratios), so that a drift of the lent machine's host or clocks between two providers'
timings cancels in each round. On CUDA the same pair is then captured in CUDA graphs and their replays alternate
the same way (mode ``paired_graph``, metric ``paired_graph_ratio``): device time alone, the instrument for a case
whose eager loop is host-bound. Each grouped provider is then paired the same two ways with its ungrouped twin
(``fused_grouped`` with ``fused``; metrics ``grouping_ratio`` and ``grouping_graph_ratio``): what grouping itself
changes, the evidence ``group_projections``' default waits for.

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

from .presets import BLOCK_PARTS, BlockCase, Case
from .providers import DTYPES, NF4_BLOCKSIZE, Built, WeightSet, _frozen_linear, implementation_name

TARGETS = BLOCK_PARTS["block"]
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

class _Parent(nn.Module):
    """A decoder layer's ``self_attn`` or ``mlp``: its projections as children (named as in transformers, so
    grouping and PEFT's target matching find them); ``forward(xs)`` calls each on its input (``xs``: input name
    -> tensor) and returns their outputs in order."""

    def __init__(self, members: List[Tuple[str, nn.Module, str]]):
        super().__init__()
        for name, module, _ in members:
            setattr(self, name, module)
        self._reads = [(name, x) for name, _, x in members]

    def forward(self, xs: Dict[str, Tensor]):
        return tuple(getattr(self, name)(xs[x]) for name, x in self._reads)


class Block(nn.Module):
    """The case's projections (``case.projections()``) under the parents a transformers decoder layer has
    (``self_attn``, ``mlp``). ``forward(inputs)`` takes the case's inputs (``case.inputs()`` order: x_attn, x_o,
    x_mlp, x_down for the whole block) and returns the projections' outputs in ``case.projections()`` order."""

    def __init__(self, case: BlockCase, linears: Dict[str, nn.Module]):
        super().__init__()
        parents: Dict[str, List] = {}
        for name, parent, x, _, _ in case.projections():
            parents.setdefault(parent, []).append((name, linears[name], x))
        for parent, members in parents.items():
            setattr(self, parent, _Parent(members))
        self._parents = list(parents)
        self._inputs = [x for x, _ in case.inputs()]

    def forward(self, inputs):
        xs = dict(zip(self._inputs, inputs))
        return tuple(y for parent in self._parents for y in getattr(self, parent)(xs))


class GroupedFloor(nn.Module):
    """The floor with the groups a grouped call forms (``lora_ops.grouped.DEFAULT_GROUPS``: q/k/v, gate/up), where
    all of a group's members are among the case's projections, each one frozen linear over the concatenated
    weights, outputs split; the other projections alone."""

    def __init__(self, case: BlockCase, ws: Dict[str, WeightSet]):
        from lora_ops.grouped import DEFAULT_GROUPS

        super().__init__()
        self._projections = [(name, x) for name, _, x, _, _ in case.projections()]
        self._inputs = [x for x, _ in case.inputs()]
        names = [name for name, _ in self._projections]
        self._calls = []  # (module name, member names, input, member output widths)
        for name, x in self._projections:
            group = next((g for g in DEFAULT_GROUPS if name in g and all(n in names for n in g)), (name,))
            if group[0] != name:
                continue
            key = "_".join(n[:-len("_proj")] for n in group) if len(group) > 1 else name
            setattr(self, key, _frozen_linear(torch.cat([ws[n].W for n in group])))
            self._calls.append((key, group, x, [ws[n].W.shape[0] for n in group]))

    def forward(self, inputs):
        xs = dict(zip(self._inputs, inputs))
        out = {}
        for key, group, x, sizes in self._calls:
            y = getattr(self, key)(xs[x])
            out.update(zip(group, y.split(sizes, dim=-1) if len(group) > 1 else (y,)))
        return tuple(out[name] for name, _ in self._projections)


def _names(case: BlockCase) -> List[str]:
    return [name for name, *_ in case.projections()]


def _base_block(case: BlockCase, ws: Dict[str, WeightSet]) -> Block:
    # Each provider clones the case's weights (_frozen_linear), so they are allocated after its memory baseline.
    return Block(case, {n: _frozen_linear(ws[n].W) for n in _names(case)})


# ----------------------------------------------------------------------------------------------- builders

def _need_block(case) -> None:
    if getattr(case, "kind", None) != "block":
        raise ValueError(f"this provider runs block cases, not {getattr(case, 'kind', '?')} cases")


def build_floor(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    block = _base_block(case, ws)
    return Built(forward=block, decode=block, module=block,
                 info={"module": f"{len(_names(case))} torch.nn.Linear (frozen), no adapter"})


def build_floor_grouped(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    block = GroupedFloor(case, ws)
    calls = ", ".join(key for key, *_ in block._calls)
    return Built(forward=block, decode=block, module=block,
                 info={"module": f"torch.nn.Linear (frozen), one per {calls}; grouped outputs split"})


def build_floor_repeat(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    """The case's floor timed again (its ratio is the run-to-run noise)."""
    return BUILDERS[case.floor](case, ws)


def _lora_params(model: nn.Module) -> Tuple[Tensor, ...]:
    return tuple(p for p in model.parameters() if p.requires_grad)


def _fused(case: BlockCase, ws: Dict[str, WeightSet], quantize: Optional[str], group: bool) -> Built:
    import lora_ops
    from lora_ops.grouped import explain_groups
    from lora_ops.inject import lora_layers

    _need_block(case)
    block = _base_block(case, ws)
    names = _names(case)
    lora_ops.apply_lora(block, names, r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0,
                        quantize=quantize, blocksize=NF4_BLOCKSIZE, double_quant=True, group_projections=group)
    layers = lora_layers(block)
    with torch.no_grad():
        for name, layer in layers.items():
            short = name.rsplit(".", 1)[-1]
            layer.lora_A.copy_(ws[short].A)
            layer.lora_B.copy_(ws[short].B)
    status = {r["parent"]: r["status"] for r in explain_groups(block)}
    if group and (not status or set(status.values()) != {"grouped"}):
        raise RuntimeError(f"group_projections=True left the projections ungrouped: {explain_groups(block)}")
    params = _lora_params(block)
    if len(params) != 2 * len(names) or {p.dtype for p in params} != {DTYPES[case.dtype]}:
        raise RuntimeError(f"apply_lora left {len(params)} trainable tensors of {({p.dtype for p in params})}, "
                           f"expected lora_A and lora_B of {len(names)} layers in {case.dtype}")
    dev = ws[names[0]].W.device.type
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

    names = _names(case)
    cfg = LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0, target_modules=names, bias="none")
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
    if len(params) != 2 * len(names):
        raise RuntimeError(f"peft left {len(params)} trainable tensors, expected lora_A and lora_B of "
                           f"{len(names)} layers")
    info = {"module": sorted(types), "peft": peft.__version__, "adapter_dtype": case.dtype}
    return Built(forward=inner, decode=inner, params=params, module=inner, info=info)


def build_peft(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    _need_block(case)
    return _peft(_base_block(case, ws), case, ws)


def build_peft_bnb(case: BlockCase, ws: Dict[str, WeightSet]) -> Built:
    from .model import bnb_unavailable, to_bnb_4bit

    _need_block(case)
    names = _names(case)
    device = ws[names[0]].W.device
    reason = bnb_unavailable(device)
    if reason:
        raise RuntimeError(reason)
    import bitsandbytes as bnb

    block = _base_block(case, ws)
    n = to_bnb_4bit(block, names, DTYPES[case.dtype])
    if n != len(names):
        raise RuntimeError(f"replaced {n} linear layers by Linear4bit, expected {len(names)}")
    built = _peft(block, case, ws)
    built.info.update(bitsandbytes=bnb.__version__, base="bitsandbytes Linear4bit nf4, double quant, blocksize 64")
    return built


BUILDERS: Dict[str, Callable[[BlockCase, Dict[str, WeightSet]], Built]] = {
    "floor": build_floor,
    "floor_grouped": build_floor_grouped,
    "floor_repeat": build_floor_repeat,
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


# ------------------------------------------------------------------------------------------------ paired rounds

# The grouped providers timed against the case's floor, and against their ungrouped twins, in interleaved rounds
# (``measure_pairs``).
PAIRED = ("fused_grouped", "fused_qlora_grouped")
TWIN = {"fused_grouped": "fused", "fused_qlora_grouped": "fused_qlora"}
PAIRED_ROUNDS = 15  # CUDA; the CPU quick mode runs 3
PAIRED_LOOP_MS = 25.0  # wall time of one provider's loop in a round
GRAPH_REPLAYS = 10  # CUDA-graph replays per provider in a round (mode paired_graph)
# The metrics of a pair, (eager rounds, CUDA-graph rounds), by what the provider is divided by.
PAIR_METRICS = {"floor": ("paired_ratio", "paired_graph_ratio"), "twin": ("grouping_ratio", "grouping_graph_ratio")}


def _paired_ready(rows: List[Dict], case: BlockCase) -> List[Tuple[str, str, str]]:
    """(provider, reference, 'floor' or 'twin'): each PAIRED provider whose full mode was timed in ``rows`` against
    the case's floor, then against its ungrouped twin, where those were timed too."""
    ok = {r["provider"] for r in rows if r["case"] == case.name and r["mode"] == "full" and r["metric"] == "time_ms"
          and r["status"] == "ok"}
    ready = [p for p in PAIRED if p in ok]
    return ([(p, case.floor, "floor") for p in ready if case.floor in ok]
            + [(p, TWIN[p], "twin") for p in ready if TWIN[p] in ok])


def interleaved(timers: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """{name: one time per round}: each round calls every timer once, in the given order in even rounds and in
    reverse in odd ones, so that drift of the host or the clocks falls on all of them alike."""
    out: Dict[str, List[float]] = {name: [] for name in timers}
    names = list(timers)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            out[name].append(timers[name]())
    return out


def measure_pairs(run, case: BlockCase, data: BlockData, rows: List[Dict]) -> List[Dict]:
    """Each grouped provider ÷ the case's floor, then ÷ its ungrouped twin (``fused_grouped`` ÷ ``fused``: what
    grouping itself changes), from interleaved rounds, the two built side by side.

    Mode ``paired`` (metrics ``paired_ratio`` against the floor, ``grouping_ratio`` against the twin): each round
    one loop of ``n`` eager fwd+bwd calls per provider (one synchronize at its end), the order alternating. Mode
    ``paired_graph`` (``paired_graph_ratio``, ``grouping_graph_ratio``; CUDA only): the same two fwd+bwd captured
    in CUDA graphs, each round ``GRAPH_REPLAYS`` replays per provider timed with CUDA events: device time alone,
    which a host-bound eager loop cannot show. Each gives the median and p20 / p80 of the per-round ratios.

    A do_bench median of each provider taken one after the other moves with the lent machine's host and clocks
    between the two measurements (a floor timed again has read 0.45x of itself at 2048 rows); rounds that
    alternate put both in the same conditions, so drift cancels in each round's ratio."""
    import time

    from .harness import Rows, _clear, _reason, _skip_rows, make_calls, quantiles

    dev = run.dev
    out: List[Dict] = []
    for provider, ref, kind in _paired_ready(rows, case):
        if run.deadline is not None and time.monotonic() > run.deadline:
            break  # budget: the pair is left out (its providers' own rows stand)
        eager_metric, graph_metric = PAIR_METRICS[kind]
        eager = {r["provider"]: r["value"] for r in rows if r["case"] == case.name and r["mode"] == "full"
                 and r["metric"] == "eager_ms" and r["provider"] in (provider, ref)}
        builts: Dict[str, Built] = {}
        calls: Dict[str, Tuple] = {}
        timers: Dict[str, Callable[[], float]] = {}
        try:
            for p in (ref, provider):
                builts[p] = run.block_builders[p](case, data.sets[0])
                calls[p] = make_calls(data, [builts[p]], "full")
            slowest = max(eager.values()) if len(eager) == 2 else PAIRED_LOOP_MS
            n = max(3, int(PAIRED_LOOP_MS / max(slowest, 1e-3))) if dev.cuda else 2
            rounds = PAIRED_ROUNDS if dev.cuda else 3
            for fn, grads, _ in calls.values():  # warm-up: first calls compile, autotune, allocate
                dev.loop_ms(fn, grads, 3)
            ms = interleaved({p: (lambda fn=fn, grads=grads: dev.loop_ms(fn, grads, n))
                              for p, (fn, grads, _) in calls.items()}, rounds)
            p50, p20, p80 = quantiles([a / b for a, b in zip(ms[provider], ms[ref])])
            order = f"{ref} first in even rounds, {provider} first in odd rounds"
            config = dict(case.config(), mode="paired", floor=case.floor, against=ref, rounds=rounds,
                          calls_per_loop=n, timer="time.perf_counter, one synchronize per loop", cuda_graphs=False,
                          order=order)
            r = Rows(run, case, provider, "paired", config)
            r.add(eager_metric, p50, "x", p20, p80,
                  note=f"median over {rounds} interleaved rounds of ({provider} loop ÷ {ref} loop), "
                       f"{n} eager fwd+bwd calls per loop, both built side by side")
            out += r.rows
            if dev.graphs:
                try:
                    for p, (fn, grads, _) in calls.items():
                        timers[p] = dev.graph_timer(fn, grads, GRAPH_REPLAYS)
                    gms = interleaved(timers, rounds)
                    p50, p20, p80 = quantiles([a / b for a, b in zip(gms[provider], gms[ref])])
                    config = dict(case.config(), mode="paired_graph", floor=case.floor, against=ref, rounds=rounds,
                                  replays_per_round=GRAPH_REPLAYS, cuda_graphs=True,
                                  timer="CUDA events around the replays of one captured fwd+bwd", order=order)
                    r = Rows(run, case, provider, "paired_graph", config)
                    r.add(graph_metric, p50, "x", p20, p80,
                          note=f"median over {rounds} interleaved rounds of ({provider} ÷ {ref}) device time, "
                               f"{GRAPH_REPLAYS} CUDA-graph replays of one fwd+bwd per provider a round")
                    out += r.rows
                except Exception as e:  # noqa: BLE001 - the eager pair stands; this one is recorded as skipped
                    out += _skip_rows(run, case, provider, ["paired_graph"],
                                      f"CUDA-graph rounds against {ref} failed: " + _reason(e))
        except Exception as e:  # noqa: BLE001 - recorded, the rest of the run goes on
            out += _skip_rows(run, case, provider, ["paired"], f"paired rounds against {ref} failed: " + _reason(e))
        finally:
            timers.clear()  # the graphs and their memory pools go with their timers
            for _, grads, keep in calls.values():
                keep.clear()
                _clear(grads)
            calls.clear()
            builts.clear()
            dev.free()
    return out
