"""Where one training step of the ``model`` preset goes: device time per category, GPU busy time and host gaps.

    python scripts/model_breakdown.py [--providers floor,peft_bnb,fused_qlora] [--layers 16] [--batch 1]
        [--seq 2048] [--checkpointing on|off] [--steps 5] [--warmup 3] [--vocab V] [--seed 0] [--cpu]
        [--threads N] [--top N] [--out breakdown.json]

The case is the ``model`` preset's (benchmarks/presets.py ``PRESETS["model"]``): the same defaults (GPU:
Llama-3-8B-shaped, 16 layers, 1 x 2048 tokens, bf16, r=16 on the seven projections; ``--cpu``: the quick mode's
tiny fp32 decoder), each option given replacing the preset's. Each provider is built by benchmarks/model.py's
``BUILDERS`` and checked by its ``check_model``, on its ``token_ids``, one provider at a time, every tensor of
it dropped and the allocator emptied before the next; a step is the preset's (``zero_grad(set_to_none=True)``,
``model(input_ids=ids, labels=ids).loss``, ``backward()``, ``AdamW(lr=case.lr).step()`` over the trainable
parameters, none for the floor), followed by a device synchronize. A provider that fails to build or to run
(missing bitsandbytes, OOM, ...) is reported as skipped with the reason; the others still run.

Per provider: ``--warmup`` untimed steps (first-call Triton autotuning happens there), ``--steps`` steps timed
without the profiler (the preset's own measurement: perf_counter + synchronize), then ``--steps`` steps under
``torch.profiler`` (CPU + CUDA activities; CPU only with ``--cpu``; ``record_shapes=True``), each synchronized
at its end. Reported per step (means over the profiled steps):

* wall: perf_counter time of the profiled steps, with the unprofiled wall next to it;
* GPU busy: the union of all kernel / memcpy / memset intervals (not their sum: overlapping work counts once);
* host gap: wall - busy, the time the GPU waits for the host (Python, dispatch, launches, the synchronize). The
  profiler adds host time per op but leaves kernel durations alone, so this is an upper bound; "unprofiled ~"
  (unprofiled wall - profiled busy) estimates the preset's own;
* per category: the summed duration of the kernels of that category and how many were launched.

How a kernel gets its category. Kernel names are the primary key, because they do not depend on how the host
code is organised: ``_lora_*`` / ``_nf4_*`` (lora_ops' Triton kernels; they compute the base GEMM too, fused
with the adapter, so compare providers on the "linear layers" subtotal, not on ``gemm``) -> ``lora_ops``;
``dequant`` / ``kDequantize`` -> ``bnb``; flash / fmha / sdpa / attention -> ``attention``; adam / multi_tensor /
foreach -> ``optimizer``; cuBLAS / nvjet / cutlass / xmma / gemm / gemv / matmul -> GEMMs; Memcpy / Memset ->
``memcpy``. A GEMM is then split by the input shapes of the dispatcher op that launched it (the kernel's linked
correlation id): one of its dimensions equal to the vocabulary -> ``lm_head``, equal to the LoRA rank r ->
``gemm_lora`` (PEFT's adapter GEMMs), else ``gemm`` (the projections' base GEMMs). Each split is used only where
that number is no other dimension of the model (hidden, intermediate, KV width, head dim, heads, batch, seq,
tokens, and r or the vocabulary): on the tiny CPU decoder, whose r equals its head dim and seq, adapter GEMMs stay
in ``gemm``. Kernels the name does not decide (elementwise, reductions, copies) take the category of the nearest
enclosing range that says what it is: lora_ops' autograd Function (``_EagerLoRA`` and its backward,
``lora_ops::`` ops) -> ``lora_ops``; bitsandbytes' ``MatMul4Bit`` or ``bitsandbytes::`` ops -> ``bnb``;
scaled_dot_product_attention and its backward -> ``attention``; ``Optimizer.step`` / ``zero_grad`` ranges ->
``optimizer``; cross_entropy / nll_loss / log_softmax and their backward -> ``loss``. Then an op with a
vocabulary-sized dimension (the logits' fp32 upcast) -> ``loss``, the embedding lookup excepted; any other kernel
of an ``aten::`` op -> ``norm_elementwise`` (RMSNorm, RoPE, SiLU, residual adds, casts); the rest -> ``other``.

Ranges were chosen over torch.profiler's module hierarchy (``with_modules`` covers TorchScript only, and Python
stacks cost a lot of host time per op) and over hooks on modules (they would change the step being measured).
One subtlety: with gradient checkpointing, a decoder layer's forward is recomputed inside the first backward
node of that layer that unpacks a saved tensor (a ``_EagerLoRABackward``, ``MmBackward0`` or
``MatMul4BitBackward``). The recomputed ops are recorded with a forward sequence number (autograd records
them), the backward's own ops without one, so a backward range's category never passes to ops under a
forward op nested in it: the recomputed attention stays attention, the recomputed RMSNorm stays elementwise.
tests/test_model_breakdown.py checks these rules on a hand-made CUDA trace.

``--cpu`` exercises the same code end to end without CUDA. There are no kernels, so the categories are the CPU
self time (time minus the children's) of each dispatcher op (``namespace::name``, autograd's own ranges
excepted), classified by the same rules applied to op names (``aten::mm`` / ``addmm`` / ``linear`` -> GEMMs,
``aten::scaled_dot_product_attention`` -> attention, ``bitsandbytes::dequantize_4bit`` -> ``bnb``, ...; views and
allocations -> ``other``); "busy" is the sum of those self times and the host gap the rest: Python, autograd
nodes and record_function ranges (their self time is Python, and for a backward node under checkpointing it
includes the recomputed layer's Python). The CPU run uses one torch thread unless ``--threads`` says otherwise,
as ``python -m benchmarks --cpu`` does; the profiler does not see intra-op threads anyway.

A provider that cannot be built or run is ``skipped``; one whose trace cannot be analysed (a torch that lays
its Kineto events out differently) is ``failed`` with its wall times kept. The table: one row per category, one
column per provider, ms per step and share of the step's wall time, the linear layers (``lora_ops`` + ``gemm`` +
``gemm_lora`` + ``bnb``) and the LM head + loss as subtotals; then a line per provider with wall / busy / host
gap and kernels (CPU: ops) per step. ``--top N`` prints each provider's N heaviest kernels with their category.
``--out PATH`` writes it all as JSON (with the 20 heaviest kernels per provider).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import model as bench_model  # noqa: E402
from benchmarks.harness import Device, Settings, _reason  # noqa: E402
from benchmarks.presets import MODEL_PROVIDERS, PRESETS, PROVIDER_ALIASES, ModelCase  # noqa: E402

# (key, label); the table's row order.
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    ("lora_ops", "lora_ops kernels (_lora_*, _nf4_*)"),
    ("gemm", "GEMMs: projections (base)"),
    ("gemm_lora", "GEMMs: LoRA adapters (dim r)"),
    ("bnb", "bitsandbytes dequant / 4-bit glue"),
    ("attention", "attention (sdpa / flash)"),
    ("norm_elementwise", "norms, elementwise, rope, silu"),
    ("lm_head", "LM head GEMMs (dim vocab)"),
    ("loss", "logits upcast, softmax, CE loss"),
    ("optimizer", "optimizer (AdamW, zero_grad)"),
    ("memcpy", "memcpy / memset"),
    ("other", "other"),
)
CATEGORY_KEYS = tuple(k for k, _ in CATEGORIES)
GROUPS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("linear", "= linear layers (base + LoRA)", ("lora_ops", "gemm", "gemm_lora", "bnb")),
    ("head_loss", "= LM head + loss", ("lm_head", "loss")),
)
# The grouped providers (issue 21) run only when named (--providers ... or all): by default the ungrouped ones.
DEFAULT_PROVIDERS = tuple(p for p in MODEL_PROVIDERS if p != "full_ft" and not p.endswith("_grouped"))

# Kernel-name and op-name rules, in the order they are tried.
_LORA_NAME = re.compile(r"^_lora_|^_nf4_|^_dropout_mask_kernel|lora_ops::")
_DEQUANT_NAME = re.compile(r"dequant", re.I)
_ATTN_NAME = re.compile(r"flash|fmha|sdpa|attention|attn", re.I)
_OPT_NAME = re.compile(r"adam|multi_tensor|_foreach_", re.I)
_GEMM_KERNEL = re.compile(r"gemm|gemv|nvjet|cutlass|cublas|xmma|matmul|splitkreduce|wgmma", re.I)
_GEMM_OP = re.compile(r"^aten::(mm|addmm_?|bmm|baddbmm_?|addbmm_?|matmul|linear|_addmm_activation|mv|addmv_?)$"
                      r"|gemm|mkldnn_linear|onednn.*(linear|matmul)", re.I)
_MEM_NAME = re.compile(r"^(Memcpy|Memset)")
_SKIP_ACTIVITIES = frozenset(("cuda_runtime", "cuda_driver", "python_function", "overhead", "gpu_user_annotation",
                              "external_correlation", "cpu_instant_event", "cuda_sync"))
# Enclosing ranges (forward ops, autograd Functions, backward nodes, record_function ranges) -> category.
_MARKERS: Tuple[Tuple[re.Pattern, str], ...] = (
    (re.compile(r"^lora_ops::|_EagerLoRA"), "lora_ops"),
    (re.compile(r"bitsandbytes::|MatMul4Bit"), "bnb"),
    (re.compile(r"scaled_dot_product|ScaledDotProduct|flash_attention|efficient_attention|cudnn_attention"),
     "attention"),
    (re.compile(r"^Optimizer\.(step|zero_grad)|_foreach_|adam", re.I), "optimizer"),
    (re.compile(r"cross_entropy|nll_loss|NllLoss|log_softmax|LogSoftmax"), "loss"),
)
_BACKWARD = re.compile(r"^autograd::engine::evaluate_function|Backward\d*$")
# Dispatcher ops (``namespace::name``; autograd's own ranges excepted), as benchmarks/harness.py counts them.
_DISPATCHER_OP = re.compile(r"^(?!autograd::|torch::autograd::)[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_]")
# CPU ops that move no data of their own: views, allocations, metadata, autograd bookkeeping.
_CPU_OVERHEAD = re.compile(
    r"^aten::(view|_unsafe_view|reshape|_reshape_alias|as_strided|t|transpose|permute|expand|expand_as|"
    r"unsqueeze|squeeze|select|slice|narrow|split|split_with_sizes|chunk|unbind|alias|detach|detach_|"
    r"empty|empty_like|empty_strided|new_empty|new_empty_strided|resize_|set_|lift_fresh|result_type|"
    r"is_nonzero|item|_local_scalar_dense|size|stride|numel|contiguous|resolve_conj|resolve_neg|"
    r"_has_compatible_shallow_copy_type|requires_grad_|_to_dense|movedim|view_as|unflatten|flatten)$")


class Op:
    """A CPU-side range of the trace: a dispatcher op, an autograd node or a record_function range."""

    __slots__ = ("name", "start", "end", "tid", "corr", "seq", "bwd", "annotation", "parent", "child_ns",
                 "_shapes", "_get_shapes", "_ctx")

    def __init__(self, name: str, start: int, end: int, tid: int = 0, corr: int = 0, seq: int = -1,
                 bwd: Optional[bool] = None, annotation: bool = False, shapes=None):
        self.name, self.start, self.end, self.tid, self.corr, self.seq = name, start, end, tid, corr, seq
        self.bwd = bool(_BACKWARD.search(name)) if bwd is None else bwd
        self.annotation = annotation
        self.parent: Optional[Op] = None
        self.child_ns = 0
        self._shapes = shapes if not callable(shapes) else None
        self._get_shapes = shapes if callable(shapes) else None
        self._ctx = False  # not computed yet

    @property
    def shapes(self) -> list:
        if self._shapes is None:
            try:
                self._shapes = list(self._get_shapes()) if self._get_shapes is not None else []
            except Exception:  # noqa: BLE001 - a trace without shapes: no shape-based split
                self._shapes = []
        return self._shapes

    @property
    def forward(self) -> bool:
        """A forward op autograd recorded (a sequence number, not a backward node): under a backward range,
        the start of a checkpointed layer's recomputation."""
        return self.seq >= 0 and not self.bwd


class Kernel:
    """A device-side event: a kernel, memcpy or memset, with the correlation id of the op that launched it."""

    __slots__ = ("name", "start", "end", "corr", "kind")

    def __init__(self, name: str, start: int, end: int, corr: int = 0, kind: str = "kernel"):
        self.name, self.start, self.end, self.corr, self.kind = name, start, end, corr, kind


# ------------------------------------------------------------------------------------------- the trace

def _activity(ev) -> str:
    try:
        return str(ev.activity_type())
    except Exception:  # noqa: BLE001 - older torch: no activity type on the event
        return ""


def read_trace(prof) -> Tuple[List[Op], List[Kernel]]:
    """The CPU ranges and device events of a finished ``torch.profiler.profile`` (its raw Kineto events: far
    cheaper than ``prof.events()`` on a trace of a few hundred thousand events)."""
    from torch.autograd import DeviceType

    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        raise RuntimeError("this torch.profiler keeps no Kineto results (prof.profiler.kineto_results)")
    ops: List[Op] = []
    kernels: List[Kernel] = []
    cpu = DeviceType.CPU
    for ev in results.events():
        act = _activity(ev)
        if act in _SKIP_ACTIVITIES:
            continue  # CUDA runtime / driver calls, Python functions, profiler overhead, GPU-side ranges
        if ev.device_type() == cpu:
            if act not in ("cpu_op", "user_annotation", ""):
                continue  # another runtime's calls
            if not act and ev.linked_correlation_id() > 0:
                continue  # a runtime call (older torch without activity types)
            if ev.is_async() or ev.start_thread_id() != ev.end_thread_id():
                continue
            name = ev.name()
            try:
                bwd = ev.fwd_thread_id() > 0
            except Exception:  # noqa: BLE001
                bwd = False
            annotation = act == "user_annotation" or (not act and ev.is_user_annotation())
            start = ev.start_ns()
            ops.append(Op(name, start, start + ev.duration_ns(), ev.start_thread_id(), ev.correlation_id(),
                          ev.sequence_nr(), bwd=bwd or bool(_BACKWARD.search(name)), annotation=annotation,
                          shapes=ev.shapes))
        else:
            name = ev.name()
            if act in ("gpu_memcpy", "gpu_memset") or _MEM_NAME.match(name):
                kind = "memcpy"
            elif act == "kernel" or (not act and not ev.is_user_annotation()):
                kind = "kernel"
            else:
                continue
            start = ev.start_ns()
            kernels.append(Kernel(name, start, start + ev.duration_ns(), ev.linked_correlation_id(), kind))
    return ops, kernels


def link_tree(ops: List[Op]) -> None:
    """Parent of each op (the innermost range of its thread that contains it) and its children's total time."""
    by_thread: Dict[int, List[Op]] = {}
    for op in ops:
        by_thread.setdefault(op.tid, []).append(op)
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda o: (o.start, -o.end))
        stack: List[Op] = []
        for op in thread_ops:
            while stack and stack[-1].end <= op.start:
                stack.pop()
            while stack and stack[-1].end < op.end:  # a range that is not nested (clock rounding): close it
                stack.pop()
            if stack:
                op.parent = stack[-1]
                stack[-1].child_ns += op.end - op.start
            stack.append(op)


# ------------------------------------------------------------------------------------------ categories

class Dims:
    """The model's dimensions, to split GEMMs by shape: the vocabulary and the LoRA rank, each only when no
    other dimension of the model has the same size."""

    def __init__(self, case: ModelCase):
        d = case.dims
        head = d["hidden"] // d["heads"]
        self.vocab, self.r = d["vocab"], case.r
        common = {d["hidden"], d["intermediate"], d["kv_heads"] * head, head, d["heads"], d["kv_heads"],
                  case.batch, case.seq, case.tokens}
        self.vocab_distinct = self.vocab not in common | {self.r}
        self.r_distinct = self.r not in common | {self.vocab}

    def of(self, op: Optional[Op]) -> set:
        """Every dimension of the op's input shapes (of the nearest aten op above it if it has none)."""
        while op is not None:
            dims = {int(v) for shape in op.shapes if isinstance(shape, (list, tuple)) for v in shape
                    if isinstance(v, int)}
            if dims or not op.name.startswith("aten::") or op.parent is None \
                    or not op.parent.name.startswith("aten::"):
                return dims
            op = op.parent
        return set()

    def has_vocab(self, op: Optional[Op]) -> bool:
        return self.vocab_distinct and op is not None and "embedding" not in op.name and self.vocab in self.of(op)

    def gemm(self, op: Optional[Op]) -> str:
        dims = self.of(op) if op is not None else set()
        if self.vocab_distinct and self.vocab in dims:
            return "lm_head"
        if self.r_distinct and self.r in dims:
            return "gemm_lora"
        return "gemm"


def context(op: Optional[Op]) -> Optional[str]:
    """The category of the nearest enclosing range that has one (the op itself included). A backward range's
    category does not reach ops below a forward op nested in it (a checkpointed layer's recomputation)."""
    if op is None:
        return None
    if op._ctx is not False:
        return op._ctx
    start = op
    passed_forward = False
    found = None
    while op is not None:
        for pattern, cat in _MARKERS:
            if pattern.search(op.name):
                if not (op.bwd and passed_forward):
                    found = cat
                break
        if found is not None:
            break
        if op.forward:
            passed_forward = True
        op = op.parent
    start._ctx = found
    return found


def _named(name: str) -> Optional[str]:
    """The category a kernel or op name decides by itself (GEMMs excepted)."""
    if _LORA_NAME.search(name):
        return "lora_ops"
    if _DEQUANT_NAME.search(name):
        return "bnb"
    if _ATTN_NAME.search(name):
        return "attention"
    if _OPT_NAME.search(name):
        return "optimizer"
    return None


def _category(name: str, op: Optional[Op], dims: Dims, gemm: "re.Pattern") -> Optional[str]:
    """The rules a kernel and a CPU op share: by name, GEMMs by shape, the enclosing range, a vocab-sized
    dimension; None when none applies."""
    cat = _named(name)
    if cat:
        return cat
    if gemm.search(name):
        return dims.gemm(op)
    cat = context(op)
    if cat:
        return cat
    return "loss" if dims.has_vocab(op) else None


def kernel_category(k: Kernel, op: Optional[Op], dims: Dims) -> str:
    if k.kind == "memcpy":
        return "memcpy"
    cat = _category(k.name, op, dims, _GEMM_KERNEL)
    if cat:
        return cat
    if (op is not None and op.name.startswith("aten::")) or "at::native" in k.name or k.name.startswith("triton_"):
        return "norm_elementwise"
    return "other"


def op_category(op: Op, dims: Dims) -> str:
    """The CPU quick mode's category of one op's self time."""
    cat = _category(op.name, op, dims, _GEMM_OP)
    if cat:
        return cat
    return "other" if _CPU_OVERHEAD.search(op.name) else "norm_elementwise"


def _union_ns(intervals: Iterable[Tuple[int, int]]) -> int:
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def analyze(ops: List[Op], kernels: List[Kernel], dims: Dims, walls_ms: Sequence[float], cuda: bool,
            top: int = 20) -> Dict:
    """Per-step means: wall, busy, host gap, ms and kernels (CPU: ops) per category (GPU: kernel durations;
    CPU: op self time), and the ``top`` kernels (CPU: ops) by time with their category."""
    link_tree(ops)
    steps = max(1, len(walls_ms))
    per_ns = dict.fromkeys(CATEGORY_KEYS, 0)
    calls = dict.fromkeys(CATEGORY_KEYS, 0)
    by_name: Dict[Tuple[str, str], List[int]] = {}

    def add(name: str, cat: str, ns: int) -> None:
        per_ns[cat] += ns
        calls[cat] += 1
        slot = by_name.setdefault((name, cat), [0, 0])
        slot[0] += ns
        slot[1] += 1

    if cuda:
        by_corr: Dict[int, Op] = {}
        for op in ops:  # the dispatcher op of a correlation id, else the range (a record_function around a launch)
            if op.corr and (not op.annotation or op.corr not in by_corr):
                by_corr[op.corr] = op
        for k in kernels:
            add(k.name, kernel_category(k, by_corr.get(k.corr), dims), k.end - k.start)
        busy_ns = _union_ns((k.start, k.end) for k in kernels)
        counts = {"kernels": sum(k.kind == "kernel" for k in kernels) / steps}
    else:
        busy_ns = 0
        for op in ops:
            if op.annotation or not _DISPATCHER_OP.match(op.name):
                continue  # Python-level ranges: their self time is the host's own (see the docstring)
            self_ns = max(0, op.end - op.start - op.child_ns)
            add(op.name, op_category(op, dims), self_ns)
            busy_ns += self_ns
        counts = {}
    counts["ops"] = sum(not op.annotation and bool(_DISPATCHER_OP.match(op.name)) for op in ops) / steps
    wall = sum(walls_ms) / steps
    busy = busy_ns / 1e6 / steps
    cats = {k: v / 1e6 / steps for k, v in per_ns.items()}
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_ms": wall, "busy_ms": busy, "host_gap_ms": wall - busy, "categories": cats,
            "groups": {g: sum(cats[c] for c in members) for g, _, members in GROUPS},
            "per_step": counts, "calls": {k: v / steps for k, v in calls.items()},
            "top": [{"name": n[:160], "category": c, "ms": ns / 1e6 / steps, "calls": calls / steps}
                    for (n, c), (ns, calls) in ranked]}


# ------------------------------------------------------------------------------------------- the steps

def _run_provider(dev: Device, case: ModelCase, provider: str, ids: torch.Tensor, seed: int):
    """Build, warm up, time, profile. Returns (unprofiled walls, profiled walls, profiler, info); the model and
    optimizer die with this frame."""
    from torch.profiler import ProfilerActivity, profile

    model, info = bench_model.BUILDERS[provider](case, dev.device, seed)
    bench_model.check_model(case, model, provider)
    step, opt, n_trainable = bench_model.training_step(model, ids, case)
    for _ in range(case.warmup_steps):
        step()
    dev.sync()

    def timed(n: int) -> Tuple[List[float], float]:
        walls, last = [], None
        for _ in range(n):
            t0 = time.perf_counter()
            last = step()
            dev.sync()
            walls.append((time.perf_counter() - t0) * 1e3)
        return walls, float(last)

    unprofiled, _ = timed(case.steps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        walls, loss = timed(case.steps)
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    if not math.isfinite(loss):
        raise FloatingPointError(f"{provider}: non-finite loss {loss}")
    info = dict(info, trainable_params=n_trainable, loss_last=loss)
    return unprofiled, walls, prof, info


def profile_provider(dev: Device, case: ModelCase, provider: str, ids: torch.Tensor, seed: int = 0) -> Dict:
    """One provider's breakdown; ``{"status": "skipped", "reason": ...}`` when it cannot be built or run, and
    ``"failed"`` (with its wall times) when only the trace could not be analysed."""
    t0 = time.perf_counter()
    reason = None
    try:
        unprofiled, walls, prof, info = _run_provider(dev, case, provider, ids, seed)
    except Exception as e:  # noqa: BLE001 - missing package, OOM, ...: reported, the others still run
        reason = _reason(e)
    # Outside the except clause: its traceback, which holds the model's frame, is gone by now.
    dev.free()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    base = {"wall_unprofiled_ms": sum(unprofiled) / len(unprofiled), "walls_ms": walls,
            "walls_unprofiled_ms": unprofiled,
            "provider_info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list))}}
    try:
        ops, kernels = read_trace(prof)
        out = analyze(ops, kernels, Dims(case), walls, dev.cuda)
    except Exception as e:  # noqa: BLE001 - keep the timings of a trace this torch lays out differently
        return dict(base, status="failed", reason="trace analysis failed: " + _reason(e),
                    seconds=time.perf_counter() - t0)
    out.update(base, status="ok", seconds=time.perf_counter() - t0)
    # The profiler adds host time per op but leaves kernel durations alone: on a GPU, the unprofiled wall minus
    # the profiled busy time estimates the host gap of the preset's own steps. On the CPU the profiler's cost
    # lands inside the ops themselves, so there is no such estimate.
    out["host_gap_unprofiled_ms"] = out["wall_unprofiled_ms"] - out["busy_ms"] if dev.cuda else None
    return out


# -------------------------------------------------------------------------------------------- the table

def table(results: Dict[str, Dict], cuda: bool) -> str:
    provs = list(results)
    width = 17
    what = "GPU kernel time" if cuda else "CPU op self time"
    head = f"{what + ', ms/step (share of wall)':<40}" + "".join(f"{p:>{width}}" for p in provs)
    lines = [head, "-" * len(head)]

    def cell(r: Dict, ms: Optional[float]) -> str:
        if r.get("status") != "ok":
            return f"{r.get('status', 'skipped'):>{width}}"
        share = ms / r["wall_ms"] if r["wall_ms"] > 0 else math.nan
        return f"{ms:>9.2f} {share:>6.1%}".rjust(width)

    def row(label: str, get) -> None:
        lines.append(f"{label:<40}" + "".join(cell(results[p], get(results[p])) for p in provs))

    for key, label in CATEGORIES:
        row(label, lambda r, k=key: r["categories"][k] if r.get("status") == "ok" else None)
    lines.append("-" * len(head))
    for key, label, _ in GROUPS:
        row(label, lambda r, k=key: r["groups"][k] if r.get("status") == "ok" else None)
    row("= sum of the categories", lambda r: sum(r["categories"].values()) if r.get("status") == "ok" else None)
    row("GPU busy (union of kernels)" if cuda else "busy (time inside ops)",
        lambda r: r["busy_ms"] if r.get("status") == "ok" else None)
    row("host gap (wall - busy)", lambda r: r["host_gap_ms"] if r.get("status") == "ok" else None)
    row("wall (profiled steps)", lambda r: r["wall_ms"] if r.get("status") == "ok" else None)
    lines.append("")
    for p in provs:
        r = results[p]
        if r.get("status") != "ok":
            walls = (f" (unprofiled wall {r['wall_unprofiled_ms']:.2f} ms)" if "wall_unprofiled_ms" in r else "")
            lines.append(f"{p}: {r.get('status')}{walls}: {r.get('reason', '')}")
            continue
        counts = r["per_step"]
        n = (f"{counts['kernels']:.0f} kernels, " if "kernels" in counts else "") + f"{counts['ops']:.0f} ops"
        gap = r["host_gap_unprofiled_ms"]
        lines.append(f"{p}: wall {r['wall_ms']:.2f} ms (unprofiled {r['wall_unprofiled_ms']:.2f}) | "
                     f"{'GPU busy' if cuda else 'busy'} {r['busy_ms']:.2f} | host gap {r['host_gap_ms']:.2f}"
                     + (f" (unprofiled ~{gap:.2f})" if gap is not None else "") + f" | {n} per step")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main

def _providers(text: str) -> List[str]:
    if text.strip() == "all":
        return list(MODEL_PROVIDERS)
    out = []
    for p in (s.strip() for s in text.split(",") if s.strip()):
        p = PROVIDER_ALIASES.get(p, p)
        if p not in MODEL_PROVIDERS:
            raise argparse.ArgumentTypeError(f"unknown provider {p!r}; choose from {', '.join(MODEL_PROVIDERS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise argparse.ArgumentTypeError("no provider given")
    return out


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", type=_providers, default=list(DEFAULT_PROVIDERS),
                    help=f"comma-separated, in this order, or 'all' (default {','.join(DEFAULT_PROVIDERS)})")
    ap.add_argument("--layers", type=_positive, default=None, help="decoder layers (default: the preset's, 16; "
                    "--cpu: 2)")
    ap.add_argument("--batch", type=_positive, default=1, help="batch (default 1)")
    ap.add_argument("--seq", type=_positive, default=None, help="sequence length (default: the preset's, 2048; "
                    "--cpu: 16)")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on", help="gradient checkpointing "
                    "(default on)")
    ap.add_argument("--vocab", type=_positive, default=None, help="vocabulary (default: the arch's, 32000; "
                    "--cpu: 128)")
    ap.add_argument("--steps", type=_positive, default=5, help="profiled steps, and as many timed without the "
                    "profiler (default 5)")
    ap.add_argument("--warmup", type=_positive, default=3, help="untimed warm-up steps (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base weights and token ids (default 0)")
    ap.add_argument("--cpu", action="store_true", help="the preset's tiny fp32 CPU decoder, CPU op times")
    ap.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: 1 with --cpu)")
    ap.add_argument("--top", type=int, default=0, help="also print each provider's N heaviest kernels (CPU: ops) "
                    "with their category (default 0; the JSON always has 20)")
    ap.add_argument("--out", default=None, help="write the results as JSON to this path")
    return ap.parse_args(argv)


def make_case(args: argparse.Namespace) -> ModelCase:
    cases = PRESETS["model"].cases(args.cpu, layers=args.layers, seq=args.seq, batch=args.batch,
                                   checkpointing=args.checkpointing == "on", steps=args.steps,
                                   warmup_steps=args.warmup, vocab=args.vocab)
    if len(cases) != 1:
        raise RuntimeError(f"expected one model case, the preset made {len(cases)}")
    return cases[0]


def run(args: argparse.Namespace, log=print) -> Dict:
    """Every provider of ``args``; the JSON document ``--out`` writes. torch's thread count is put back after."""
    threads = torch.get_num_threads()
    if args.cpu:
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, log)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, log) -> Dict:
    dev = Device(Settings(cpu=args.cpu, seed=args.seed))
    case = make_case(args)
    device = torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu"
    log(f"{case.name} ({case.shape}, {case.dtype}) on {device}: {case.warmup_steps} warm-up, {case.steps} timed "
        f"+ {case.steps} profiled steps per provider")
    ids = bench_model.token_ids(case, dev.device, args.seed)
    results: Dict[str, Dict] = {}
    for p in args.providers:
        r = profile_provider(dev, case, p, ids, args.seed)
        results[p] = r
        if r["status"] == "ok":
            log(f"  {p}: wall {r['wall_ms']:.2f} ms, busy {r['busy_ms']:.2f} ms ({r['seconds']:.1f} s)")
        else:
            log(f"  {p}: {r['status']}: {r['reason']}")
    del ids
    dev.free()
    text = table(results, dev.cuda)
    log("")
    log(text)
    for p, r in results.items():
        if args.top and r.get("status") == "ok":
            log(f"\n{p}: the {args.top} heaviest {'kernels' if dev.cuda else 'ops'} (ms and calls per step)")
            for t in r["top"][:args.top]:
                log(f"  {t['ms']:9.3f} x{t['calls']:<6.0f} {t['category']:<16} {t['name'][:100]}")
    doc = {"case": case.config(), "case_name": case.name, "device": device, "mode": "cuda" if dev.cuda else "cpu",
           "torch": torch.__version__, "timing": "category = " + ("summed kernel durations" if dev.cuda else
                                                                  "summed CPU self time of dispatcher ops"),
           "categories": [{"key": k, "label": label} for k, label in CATEGORIES],
           "groups": [{"key": k, "label": label, "categories": list(m)} for k, label, m in GROUPS],
           "providers": results, "table": text}
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, default=float))
        log(f"wrote {path}")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible; use --cpu for the tiny CPU decoder", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
