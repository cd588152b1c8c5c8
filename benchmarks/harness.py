"""The benchmark harness: per case, build every provider from the same tensors, then measure each mode.

Per (case, provider, mode), outside any timed region unless stated:

1. memory (CUDA): baseline = ``memory_allocated()`` before the provider's layer is built (so its weights count);
   one warm-up call (autotuning, lazily allocated workspaces), then ``reset_peak_memory_stats``, one call,
   ``peak_extra = max_memory_allocated - baseline``. ``workspace`` = what stays allocated after the calls (all
   outputs and gradients dropped) beyond what the build left: persistent buffers, reported apart.
2. time: ``triton.testing.do_bench(return_mode="median", quantiles=(0.5, 0.2, 0.8))`` on CUDA (warm-up, L2
   flushed before every call, gradients set to None before every call through ``grad_to_none``); on the CPU,
   ``time.perf_counter`` around each call, median and p20/p80 of the samples.
3. eager: a plain Python loop of n calls (gradients set to None inside the loop), synchronize, wall clock / n.
   It shows the host time that do_bench's queued L2 flushes hide. No CUDA graphs here; decode's ``graph_ms``
   and the block preset's ``paired_graph`` rounds (benchmarks/block.py) are the CUDA-graph timings.
   The ``host`` mode (host preset) is fwd+bwd timed only this way, at a shape whose GPU work is a few
   microseconds: loops of ``host_calls`` calls with one synchronize at the end, median of ``host_loops`` loops,
   as microseconds per call (``host_us``): the host cost of one training call of the layer.
4. profile: one call under ``torch.profiler``: device kernels launched and dispatcher ops called.

A block case (preset ``block``, benchmarks/block.py) is timed the same way: its callable takes the four inputs
and returns the seven projections' outputs, whose backward receives one upstream gradient each
(``torch.autograd.backward``); gradients of all four inputs are cleared before every call.

Where a case has several weight sets the timed callable rotates through them (decode: so L2 cannot serve the
weight; do_bench flushes L2 anyway, the eager loop does not). Any exception while building or measuring a
provider (OOM, missing package, unsupported mode) is recorded as a ``skipped`` row with its reason.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import report
from .presets import Case
from .providers import BUILDERS, DTYPES, Built, CaseData, WeightSet, dequant_bytes, make_case_data

MIB = float(1 << 20)
QUANTILES = (0.5, 0.2, 0.8)
TRAIN_MODES = ("forward", "backward", "full", "host")
NO_LORA = ("floor", "floor_repeat", "full_ft")


# ------------------------------------------------------------------------------------------- cost models

def layer_cost(case: Case, provider: str, mode: str) -> Tuple[float, float]:
    """(FLOPs, compulsory bytes) of one call, for achieved TFLOP/s and GB/s.

    FLOPs are the provider's own GEMMs: forward 2MNK (+ 2MKr + 2MrN for the adapter); backward dX = 2MNK
    (+ dB, dS: 2MNr each, dA and the adapter's share of dX: 2MrK each; full_ft adds dW = 2MNK).
    Bytes count every tensor the math must touch once: forward reads x, W (NF4 bytes for NF4 LoRA providers;
    the floor is always the dense layer), A, B and writes y; backward reads dy, W (and x, A, B, S for the
    adapter) and writes dx (and dA, dB; full_ft reads x and writes dW). Dropout and dequantization are free.
    """
    from lora_ops.nf4 import nf4_bytes

    M, K, N, r = case.M, case.K, case.N, case.r
    e = DTYPES[case.dtype].itemsize
    lora = provider not in NO_LORA
    w_bytes = nf4_bytes(N, K, 64, True) if (case.weight == "nf4" and lora) else N * K * e
    ab = (r * K + N * r) * e
    fwd_f = 2.0 * M * N * K + (2.0 * M * K * r + 2.0 * M * r * N if lora else 0.0)
    fwd_b = M * K * e + w_bytes + M * N * e + (ab if lora else 0)
    bwd_f = 2.0 * M * N * K
    bwd_b = M * N * e + w_bytes + M * K * e
    if lora:
        bwd_f += 4.0 * M * N * r + 4.0 * M * r * K
        bwd_b += M * K * e + ab + M * r * e + ab
    if provider == "full_ft":
        bwd_f += 2.0 * M * N * K
        bwd_b += M * K * e + N * K * e
    if mode in ("forward", "decode"):
        return fwd_f, float(fwd_b)
    if mode == "backward":
        return bwd_f, float(bwd_b)
    if mode == "full":
        return fwd_f + bwd_f, float(fwd_b + bwd_b)
    raise ValueError(f"layer_cost: mode {mode!r} is not a layer mode")


def case_cost(case: Case, provider: str, mode: str) -> Tuple[float, float]:
    if case.kind == "block":
        from .block import block_cost

        return block_cost(case, provider, mode)
    if case.kind == "dequant":
        return 0.0, float(dequant_bytes(case))
    return layer_cost(case, provider, mode)


# ----------------------------------------------------------------------------------------------- timing

def quantiles(samples: Sequence[float], qs: Sequence[float] = QUANTILES) -> List[float]:
    """Linear-interpolated quantiles (numpy's default rule), as triton.testing reports them."""
    if not samples:
        raise ValueError("quantiles() of no samples")
    xs = sorted(samples)
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is outside [0, 1]")
        pos = q * (len(xs) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def capture_graph(fn: Callable, grads: Sequence[torch.Tensor] = (), warmup: int = 3):
    """(graph, fn()'s return value inside the capture): fn called ``warmup`` times on a side stream (which compiles,
    registers and allocates what is new), the ``.grad`` of ``grads`` cleared before each call and before the
    capture, then one call captured in a CUDA graph (not replayed here)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            _clear(grads)
            fn()
    torch.cuda.current_stream().wait_stream(side)
    _clear(grads)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@dataclass
class Settings:
    cpu: bool = False
    warmup_ms: float = 25.0  # do_bench warm-up
    rep_ms: float = 100.0  # do_bench repetition time
    eager_target_ms: float = 150.0  # wall time of the eager steady loop
    cpu_target_s: float = 0.08  # CPU: seconds of samples per measurement
    cpu_min_reps: int = 5
    cpu_max_reps: int = 40
    profile: bool = True
    seed: int = 0
    host_calls: int = 200  # host mode: calls per loop (one synchronize at its end)
    host_loops: int = 7  # host mode: loops, median taken


@dataclass
class Timing:
    p50: float
    p20: float
    p80: float
    n: int
    eager_ms: float
    eager_n: int
    timer: str
    graph_ms: float = math.nan  # decode only: CUDA graph of back-to-back calls (no flush, no host time)
    graph_note: str = ""


class Device:
    """What differs between a CUDA run and the CPU quick mode: synchronization, timers, memory stats."""

    def __init__(self, settings: Settings):
        self.s = settings
        if settings.cpu:
            self.device = torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible; run the CPU quick mode with --cpu")
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.graphs = self.cuda  # whether graph_timer can capture (the CPU quick mode has no device time)

    def graph_timer(self, fn: Callable, grads: Sequence[torch.Tensor], replays: int) -> Callable[[], float]:
        """fn's call captured in a CUDA graph (after three warm-up calls on a side stream, ``grads`` cleared
        before the capture, so the replays write the same output and gradient buffers); returns a timer: ms per
        replay of ``replays`` back-to-back replays between two CUDA events, i.e. device time without the host.
        The graph lives as long as the timer."""
        if not self.graphs:
            raise RuntimeError("CUDA graphs need a CUDA device")
        with torch.cuda.device(self.device):
            graph, _ = capture_graph(fn, grads)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timer(graph=graph) -> float:
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / replays
        timer()  # the first replays upload the graph
        return timer

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def loop_ms(self, fn: Callable, grads: Sequence[torch.Tensor], calls: int) -> float:
        """ms per call of a loop of ``calls`` calls (grads cleared before each) with one synchronize at its end:
        max(host, device) per call when nothing in fn synchronizes."""
        t0 = time.perf_counter()
        for _ in range(calls):
            _clear(grads)
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / calls

    def time(self, fn: Callable, grads: Sequence[torch.Tensor], graph: bool = False, host: bool = False) -> Timing:
        """do_bench (CUDA) or perf_counter (CPU) timing of fn; with ``graph`` on CUDA also a CUDA-graph timing;
        ``host``: the host mode's loops instead."""
        if host:
            return self._time_host(fn, grads)
        if not self.cuda:
            return self._time_cpu(fn, grads)
        t = self._time_cuda(fn, grads)
        if graph:
            t.graph_ms, t.graph_note = self._time_graph(fn)
        return t

    def _time_graph(self, fn) -> Tuple[float, str]:
        """Median ms per call of fn replayed from a CUDA graph of back-to-back calls (triton's
        do_bench_cudagraph): no L2 flush (rotate weight sets past L2 instead) and no host time. do_bench's flush
        leaves L2 full of dirty lines whose write-back the next call pays for (~50 MB on the H200), which at
        decode sizes is comparable to the weight bytes themselves; this timing shows the call without it."""
        from triton.testing import do_bench_cudagraph
        try:
            ms = do_bench_cudagraph(fn, rep=self.s.rep_ms, return_mode="median")
        except Exception as e:  # a provider that cannot be captured (host sync, allocator use in capture...)
            torch.cuda.synchronize(self.device)
            return math.nan, f"not capturable in a CUDA graph: {type(e).__name__}: {str(e)[:120]}"
        return ms, "triton do_bench_cudagraph: CUDA graph of back-to-back calls rotating the weight sets, no L2 flush"

    def _time_cuda(self, fn, grads) -> Timing:
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=self.s.warmup_ms, rep=self.s.rep_ms, grad_to_none=list(grads),
                                 quantiles=list(QUANTILES), return_mode="median")
        n = max(10, min(5000, int(self.s.eager_target_ms / max(p50, 1e-3))))
        for _ in range(3):
            _clear(grads)
            fn()
        self.sync()
        eager = self.loop_ms(fn, grads, n)
        return Timing(p50, p20, p80, max(1, int(self.s.rep_ms / max(p50, 1e-3))), eager, n, "triton.do_bench")

    def _time_host(self, fn, grads) -> Timing:
        """ms per call of loops of ``host_calls`` calls, each loop synchronized once at its end (p50/p20/p80
        over ``host_loops`` loops)."""
        # The CPU quick mode computes on the host itself: a few short loops show the same structure.
        calls, loops = (self.s.host_calls, self.s.host_loops) if self.cuda else (10, 3)
        for _ in range(min(20, calls)):
            _clear(grads)
            fn()
        self.sync()
        per_call = [self.loop_ms(fn, grads, calls) for _ in range(loops)]
        p50, p20, p80 = quantiles(per_call)
        return Timing(p50, p20, p80, loops, p50, calls * loops,
                      f"perf_counter, loops of {calls} calls, one synchronize per loop")

    def _time_cpu(self, fn, grads) -> Timing:
        _clear(grads)
        fn()  # warm-up
        _clear(grads)
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        n = max(self.s.cpu_min_reps, min(self.s.cpu_max_reps, int(self.s.cpu_target_s / max(est, 1e-6))))
        samples = []
        for _ in range(n):
            _clear(grads)
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        p50, p20, p80 = quantiles(samples)
        # On the CPU each sample already is a wall-clock call of a steady loop; its mean is the eager time.
        return Timing(p50, p20, p80, n, sum(samples) / n, n, "time.perf_counter")

    def memory(self, fn, grads, baseline: int) -> int:
        """Peak bytes above ``baseline`` during one call, after a warm-up call."""
        _clear(grads)
        fn()
        _clear(grads)
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        _clear(grads)
        return peak - baseline

    def profile(self, fn, grads) -> Tuple[Optional[int], int]:
        """(device kernels launched, dispatcher ops called) in one call; kernels is None on the CPU."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        _clear(grads)
        self.sync()
        with profile(activities=acts) as prof:
            fn()
            self.sync()
        _clear(grads)
        return count_profile(prof.events(), self.cuda)


_OP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_]")


def count_profile(events, cuda: bool) -> Tuple[Optional[int], int]:
    """Kernels = device-side events that are not memcpy/memset; ops = dispatcher ops (``ns::name``, nested
    ones included, autograd bookkeeping excluded): both grow with host overhead per call."""
    kernels = 0
    ops = 0
    for e in events:
        name = e.name
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            if not name.startswith(("Memcpy", "Memset", "[memory]")):
                kernels += 1
        elif _OP_NAME.match(name) and not name.startswith(("autograd::", "torch::autograd::", "profiler::")):
            ops += 1
    return (kernels if cuda else None), ops


# ------------------------------------------------------------------------------------------ environment

def _version(dist: str, module: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        try:
            return str(importlib.import_module(module).__version__)
        except Exception as e:
            return f"unavailable ({type(e).__name__})"


def git_commit() -> str:
    """LORA_OPS_GIT_COMMIT when set (a copy of the tree on a GPU machine can carry a stale .git, whose HEAD is
    then an older commit than the code that ran), else HEAD of the repository holding this package (+ "-dirty")."""
    if os.environ.get("LORA_OPS_GIT_COMMIT"):
        return os.environ["LORA_OPS_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        pass
    return os.environ.get("LORA_OPS_GIT_COMMIT", "unknown (no git repository)")


def device_name(dev: Device) -> str:
    if dev.cuda:
        return torch.cuda.get_device_name(dev.device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(dev: Device) -> str:
    """Results directory name: "h200" for an NVIDIA H200, "cpu" for --cpu."""
    if not dev.cuda:
        return "cpu"
    return slugify(torch.cuda.get_device_name(dev.device))


def slugify(gpu_name: str) -> str:
    s = gpu_name.lower()
    s = re.sub(r"^nvidia\s+", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "gpu"


# LORA_OPS_* variables that do not change what a run measures (its commit label, the device scripts' install
# marker, checking modes, the golden-vector switch); every other one set in the environment is recorded with the run.
_NOT_SETTINGS = ("LORA_OPS_GIT_COMMIT", "LORA_OPS_INSTALLED", "LORA_OPS_LAUNCH_STRICT", "LORA_OPS_NF4_GOLDEN")


def launcher_settings() -> Dict[str, str]:
    """The LORA_OPS_* launcher settings set in the environment (name -> value), e.g. an A/B knob such as
    LORA_OPS_WS=0: rows timed under them do not describe the defaults, and the report says so."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORA_OPS_") and k not in _NOT_SETTINGS}


def collect_env(dev: Device, argv: Sequence[str], ceilings: Dict, run_id: str) -> Dict:
    import lora_ops

    env = {
        "run_id": run_id,
        "gpu": device_name(dev),
        "device": str(dev.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton", "triton"),
        "peft": _version("peft", "peft"),
        "bitsandbytes": _version("bitsandbytes", "bitsandbytes"),
        "lora_ops": lora_ops.__version__,
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "LORA_OPS_BACKEND": os.environ.get("LORA_OPS_BACKEND", ""),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "settings": launcher_settings(),
        "cuda_graphs": False,
        "cpu_threads": torch.get_num_threads(),
        "ceilings": ceilings,
    }
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        env.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   l2_bytes=getattr(props, "L2_cache_size", None), memory_gib=round(props.total_memory / 2 ** 30, 1))
    return env


def measure_ceilings(dev: Device) -> Dict:
    """A large bf16 GEMM (8192^3; CPU: 512^3 fp32) and a large device copy (1 GiB; CPU: 64 MiB), timed like
    the cases; copy bandwidth counts read + write bytes."""
    if dev.cuda:
        n, dtype, nbytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, nbytes = 512, torch.float32, 64 << 20
    a = torch.randn(n, n, device=dev.device, dtype=dtype)
    b = torch.randn(n, n, device=dev.device, dtype=dtype)
    c = torch.empty(n, n, device=dev.device, dtype=dtype)
    tg = dev.time(lambda: torch.mm(a, b, out=c), [])
    del a, b, c
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    tc = dev.time(lambda: dst.copy_(src), [])
    del src, dst
    dev.free()
    flops = 2.0 * n ** 3
    return {
        "gemm_shape": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
        "gemm_tflops": flops / (tg.p50 * 1e9), "gemm_tflops_p20": flops / (tg.p80 * 1e9),
        "gemm_tflops_p80": flops / (tg.p20 * 1e9),
        "copy_bytes": nbytes,
        "copy_gbps": 2.0 * nbytes / (tc.p50 * 1e6), "copy_gbps_p20": 2.0 * nbytes / (tc.p80 * 1e6),
        "copy_gbps_p80": 2.0 * nbytes / (tc.p20 * 1e6),
    }


# ----------------------------------------------------------------------------------------------- running

class Progress:
    """tqdm on a terminal; plain lines otherwise (a log file gets one readable line per step, not \\r spam)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, label: str, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60])
            self.bar.update(n)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Run:
    dev: Device
    settings: Settings
    env: Dict
    run_id: str
    builders: Dict[str, Callable[[Case, WeightSet], Built]] = field(default_factory=lambda: dict(BUILDERS))
    block_builders: Dict[str, Callable] = field(default_factory=lambda: _block_builders())
    progress: Optional[Progress] = None
    deadline: Optional[float] = None  # time.monotonic() after which no new case (model preset: provider) starts

    @property
    def env_json(self) -> str:
        return json.dumps(self.env, sort_keys=True)


def _block_builders() -> Dict[str, Callable]:
    from .block import BUILDERS as BLOCK_BUILDERS

    return dict(BLOCK_BUILDERS)


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:300]


def resolve_n_sets(case: Case, dev: Device) -> int:
    """case.n_sets, or for 0: enough weight sets that their bytes exceed twice the L2 cache, at least 3."""
    if case.n_sets > 0:
        return case.n_sets
    if not dev.cuda:
        return 3
    from lora_ops.nf4 import nf4_bytes

    l2 = getattr(torch.cuda.get_device_properties(dev.device), "L2_cache_size", 0) or (60 << 20)
    per_set = nf4_bytes(case.N, case.K) if case.weight == "nf4" else case.N * case.K * DTYPES[case.dtype].itemsize
    return int(min(16, max(3, math.ceil(2 * l2 / per_set))))


def _leaves(x) -> List[torch.Tensor]:
    """The input tensors of a call: x, or each of a block case's inputs."""
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _backward(y, dy, retain_graph: bool = False) -> None:
    """y.backward(dy); for a block case's outputs, one backward over all of them with their own gradients."""
    if isinstance(y, torch.Tensor):
        y.backward(dy, retain_graph=retain_graph)
    else:
        torch.autograd.backward(tuple(y), tuple(dy), retain_graph=retain_graph)


def make_calls(data: CaseData, builts: Sequence[Built], mode: str) -> Tuple[Callable, List[torch.Tensor], List]:
    """(fn, tensors whose .grad is cleared before each call, objects to keep alive while fn is used).

    With several built weight sets fn rotates through them. ``backward`` runs the forward here, once per set,
    and times ``y.backward(dy, retain_graph=True)``. A block case's x and dy are tuples (its inputs, one gradient
    per output) and its forward returns a tuple.
    """
    calls, keep = [], []
    for b in builts:
        if not b.supports(mode):
            raise ValueError(f"this provider has no {mode} mode")
        if b.module is not None:
            b.module.train(mode != "decode")
        if mode == "forward":
            f = (lambda b=b: b.forward(data.x))
        elif mode in ("full", "host"):
            f = (lambda b=b: _backward(b.forward(data.x), data.dy))
        elif mode == "backward":
            with b.context():
                y = b.forward(data.x)
            keep.append(y)
            f = (lambda y=y: _backward(y, data.dy, retain_graph=True))
        elif mode == "decode":
            def f(b=b):
                with torch.no_grad():
                    return b.decode(data.x_nograd)
        elif mode == "dequant":
            f = b.dequant
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if b.context is not contextlib.nullcontext:
            def f(f=f, ctx=b.context):
                with ctx():
                    return f()
        calls.append(f)
    if len(calls) == 1:
        fn = calls[0]
    else:
        cycle = itertools.cycle(calls)

        def fn():
            return next(cycle)()
    grads = (_leaves(data.x) if mode in TRAIN_MODES else []) + [p for b in builts for p in b.params]
    return fn, grads, keep


class Rows:
    """Collects the long-format rows of one (case, provider, mode)."""

    def __init__(self, run: Run, case: Case, provider: str, mode: str, config: Dict):
        self.run, self.case, self.provider, self.mode = run, case, provider, mode
        self.config = json.dumps(config, sort_keys=True, default=str)
        self.rows: List[Dict] = []

    def add(self, metric: str, value: float, unit: str, p20: float = math.nan, p80: float = math.nan,
            status: str = "ok", note: str = "") -> None:
        self.rows.append({
            "run_id": self.run.run_id, "preset": self.case.preset, "case": self.case.name, "shape": self.case.shape,
            "provider": self.provider, "mode": self.mode, "metric": metric, "value": float(value),
            "p20": float(p20), "p80": float(p80), "unit": unit, "ratio_to_floor": math.nan, "status": status,
            "note": note, "config": self.config, "env": self.run.env_json})


def _skip_rows(run: Run, case: Case, provider: str, modes: Sequence[str], reason: str) -> List[Dict]:
    out = []
    for mode in modes:
        r = Rows(run, case, provider, mode, case.config())
        r.add("skipped", math.nan, "", status="skipped", note=reason)
        out += r.rows
    return out


def _mode_rows(run: Run, case: Case, provider: str, mode: str, config: Dict, t: Timing,
               mem: Optional[Tuple[int, int]], prof: Optional[Tuple[Optional[int], int]]) -> List[Dict]:
    rows = Rows(run, case, provider, mode, config)
    if mode == "host":
        rows.add("host_us", t.p50 * 1e3, "us", t.p20 * 1e3, t.p80 * 1e3, note=f"{t.timer}, median of {t.n} loops")
        return rows.rows
    ceil = run.env["ceilings"]
    flops, nbytes = case_cost(case, provider, mode)
    rows.add("time_ms", t.p50, "ms", t.p20, t.p80, note=f"{t.timer}, median of ~{t.n}")
    rows.add("eager_ms", t.eager_ms, "ms", note=f"steady loop of {t.eager_n} calls, no CUDA graphs")
    if t.graph_note:
        rows.add("graph_ms", t.graph_ms, "ms", status="ok" if math.isfinite(t.graph_ms) else "n/a", note=t.graph_note)
    if flops > 0:
        tflops = flops / (t.p50 * 1e9)
        rows.add("tflops", tflops, "TFLOP/s", flops / (t.p80 * 1e9), flops / (t.p20 * 1e9))
        rows.add("tflops_pct_ceiling", 100.0 * tflops / ceil["gemm_tflops"], "%")
    gbps = nbytes / (t.p50 * 1e6)
    rows.add("gbps", gbps, "GB/s", nbytes / (t.p80 * 1e6), nbytes / (t.p20 * 1e6))
    rows.add("gbps_pct_ceiling", 100.0 * gbps / ceil["copy_gbps"], "%")
    if mem is None:
        rows.add("peak_extra_mib", math.nan, "MiB", status="n/a", note="no device memory statistics on the CPU")
        rows.add("workspace_mib", math.nan, "MiB", status="n/a", note="no device memory statistics on the CPU")
    else:
        rows.add("peak_extra_mib", mem[0] / MIB, "MiB", note="baseline before the layer was built")
        rows.add("workspace_mib", mem[1] / MIB, "MiB", note="still allocated after the calls, beyond the build")
    if prof is None:
        rows.add("kernel_launches", math.nan, "count", status="n/a", note="profiling off")
        rows.add("op_calls", math.nan, "count", status="n/a", note="profiling off")
    else:
        if prof[0] is None:
            rows.add("kernel_launches", math.nan, "count", status="n/a", note="no device kernels on the CPU")
        elif prof[0] == 0 and case.kind in ("layer", "block"):
            # Every layer call launches kernels: none seen means the profiler captured no device activity.
            rows.add("kernel_launches", math.nan, "count", status="n/a",
                     note="torch.profiler captured no device kernels (CUPTI unavailable?)")
        else:
            rows.add("kernel_launches", prof[0], "count", note="device kernels in one call (torch.profiler)")
        rows.add("op_calls", prof[1], "count", note="dispatcher ops in one call, nested included")
    return rows.rows


def _first_calls(dev: Device, data: CaseData, b0: Built, mode: str, baseline: int, after_build: int
                 ) -> Optional[Tuple[int, int]]:
    """The first calls of a mode on weight set 0 (compiles/autotunes what it needs; a failure skips the mode).
    CUDA: returns (peak extra bytes over ``baseline``, bytes still allocated afterwards beyond ``after_build``).
    The callables and outputs die with this frame, also when a call raises (e.g. OOM)."""
    fn, grads, keep = make_calls(data, [b0], mode)
    try:
        if not dev.cuda:
            fn()
            return None
        peak = dev.memory(fn, grads, baseline)
    finally:
        del fn
        keep.clear()
        _clear(grads)
    dev.sync()
    return peak, dev.allocated() - after_build


def _timed_calls(dev: Device, data: CaseData, built: Sequence[Built], mode: str, profile: bool
                 ) -> Tuple[Timing, Optional[Tuple[Optional[int], int]]]:
    fn, grads, keep = make_calls(data, built, mode)
    try:
        t = dev.time(fn, grads, graph=mode == "decode", host=mode == "host")
        prof = dev.profile(fn, grads) if profile and mode != "host" else None
    finally:
        del fn
        keep.clear()
        _clear(grads)
    return t, prof


def run_provider(run: Run, case: Case, data: CaseData, provider: str, modes: Sequence[str]) -> List[Dict]:
    dev = run.dev

    def skip_all(reason: str) -> List[Dict]:
        if run.progress:
            run.progress.step(f"{case.name} {provider} skipped", len(modes))
        return _skip_rows(run, case, provider, modes, reason)

    builder = (run.block_builders if case.kind == "block" else run.builders).get(provider)
    if builder is None:
        return skip_all(f"no builder named {provider!r}")
    out: List[Dict] = []
    built: List[Built] = []
    try:
        dev.sync()
        baseline = dev.allocated()
        try:
            built.append(builder(case, data.sets[0]))
        except Exception as e:
            return skip_all("build failed: " + _reason(e))
        dev.sync()
        after_build = dev.allocated()
        mem: Dict[str, Tuple[int, int]] = {}
        failed: Dict[str, str] = {}
        for mode in modes:
            try:
                m = _first_calls(dev, data, built[0], mode, baseline, after_build)
                if m is not None:
                    mem[mode] = m
            except Exception as e:
                failed[mode] = _reason(e)
        try:
            for ws in data.sets[1:]:
                built.append(builder(case, ws))
        except Exception as e:
            for mode in modes:
                failed.setdefault(mode, "building the extra weight sets failed: " + _reason(e))
        for mode in modes:
            if mode in failed:
                out += _skip_rows(run, case, provider, [mode], failed[mode])
                if run.progress:
                    run.progress.step(f"{case.name} {provider} {mode} skipped")
                continue
            try:
                t, prof = _timed_calls(dev, data, built, mode, run.settings.profile)
                config = dict(case.config(), mode=mode, n_sets=len(built), floor=case.floor,
                              provider_info=built[0].info, timer=t.timer, cuda_graphs=False,
                              l2_flush="do_bench flushes L2 before each call" if dev.cuda else "none (cpu)")
                out += _mode_rows(run, case, provider, mode, config, t, mem.get(mode), prof)
            except Exception as e:
                out += _skip_rows(run, case, provider, [mode], _reason(e))
            if run.progress:
                run.progress.step(f"{case.name} {provider} {mode}")
        return out
    finally:
        built.clear()
        dev.free()


def run_case(run: Run, case: Case) -> List[Dict]:
    """All providers of ``case`` on one shared set of tensors; ratios to the floor of this run."""
    if case.kind == "model":  # presets.ModelCase: whole-model training steps (benchmarks/model.py)
        from .model import run_model_case

        return run_model_case(run, case)
    try:
        if case.kind == "block":  # presets.BlockCase: seven projections, four inputs (benchmarks/block.py)
            from .block import make_block_data

            data = make_block_data(case, run.dev.device, seed=run.settings.seed)
        else:
            data = make_case_data(case, run.dev.device, resolve_n_sets(case, run.dev), seed=run.settings.seed)
    except Exception as e:
        reason = "case setup failed: " + _reason(e)
        rows = []
        for p, modes in case.plan:
            rows += _skip_rows(run, case, p, modes, reason)
            if run.progress:
                run.progress.step(f"{case.name} {p} skipped", len(modes))
        run.dev.free()
        return rows
    rows: List[Dict] = []
    try:
        for provider, modes in case.plan:
            rows += run_provider(run, case, data, provider, modes)
        if case.kind == "block":
            from .block import measure_pairs

            rows += measure_pairs(run, case, data, rows)
    finally:
        del data
        run.dev.free()
    return report.add_ratios(rows, case.floor)


def ceiling_rows(run: Run, presets: Sequence[str]) -> List[Dict]:
    c = run.env["ceilings"]
    rows = []
    for preset in presets:
        for metric, unit, shape in (("gemm_tflops", "TFLOP/s", c["gemm_shape"]),
                                    ("copy_gbps", "GB/s", f"{c['copy_bytes']} bytes, read+write counted")):
            rows.append({"run_id": run.run_id, "preset": preset, "case": "ceilings", "shape": shape,
                         "provider": "ceiling", "mode": "-", "metric": metric, "value": c[metric],
                         "p20": c[metric + "_p20"], "p80": c[metric + "_p80"], "unit": unit,
                         "ratio_to_floor": math.nan, "status": "ok", "note": "measured at the start of the run",
                         "config": json.dumps({"shape": shape}), "env": run.env_json})
    return rows


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid() % 10000:04d}"


def run_cases(cases: Sequence[Case], settings: Settings, argv: Sequence[str] = (),
              builders: Optional[Dict[str, Callable]] = None, progress: bool = True,
              on_case: Optional[Callable[[List[Dict]], None]] = None,
              budget_s: Optional[float] = None, block_builders: Optional[Dict[str, Callable]] = None
              ) -> Tuple[List[Dict], Dict]:
    """Measure the ceilings, then every case. Returns (rows, env).

    ``builders`` adds or replaces providers by name (``block_builders`` those of block cases).
    ``on_case(rows_so_far)`` runs after each case (the CLI saves the CSV there, so a run killed at the device's
    time limit keeps what it measured). Cases not started within ``budget_s`` seconds are recorded as skipped.
    """
    t_start = time.monotonic()
    dev = Device(settings)
    run_id = new_run_id()
    ceilings = measure_ceilings(dev)
    env = collect_env(dev, argv, ceilings, run_id)
    run = Run(dev, settings, env, run_id, deadline=None if budget_s is None else t_start + budget_s)
    if builders is not None:
        run.builders.update(builders)
    if block_builders is not None:
        run.block_builders.update(block_builders)
    total = sum(len(m) for c in cases for _, m in c.plan)
    run.progress = Progress(total, progress)
    rows = ceiling_rows(run, list(dict.fromkeys(c.preset for c in cases)))
    try:
        for case in cases:
            if run.deadline is not None and time.monotonic() > run.deadline:
                for p, modes in case.plan:
                    rows += _skip_rows(run, case, p, modes, f"time budget of {budget_s:g} s reached before this case")
                    run.progress.step(f"{case.name} {p} skipped (budget)", len(modes))
                continue
            rows += run_case(run, case)
            if on_case is not None:
                on_case(rows)
    finally:
        run.progress.close()
    return rows, env
