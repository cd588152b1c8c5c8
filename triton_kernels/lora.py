"""The Python launchers of the fused LoRA / QLoRA forward and backward (kernels: ``lora_kernels.py``; configs
and the launch wrapper: ``lora_tuning.py``). Contract: ``lora_ops::lora_fwd`` / ``lora_bwd``.

Per call they check the arguments, allocate the outputs, pick the variant and launch:

* NF4: from ``NF4_DEQUANT_MIN_M`` rows on CUDA the weight is dequantized once per call into a temporary and the
  dense kernels run on it (the in-loop decode starves the tensor cores at training sizes); below, the GEMMs decode
  NF4 bytes in their K-loop.
* The forward and dX GEMMs run as the persistent TMA kernel where ``LORA_OPS_TMA`` and TMA's operand rules allow
  it (by default on the shapes it measured faster on), else as the pointer kernel.
* dB / dbias ride along the dS pass with fp32 atomics, or (deterministic mode, or no dS needed) come from the
  atomic-free reduction; reductions over M split into enough slices for two waves of SMs.
* The skinny S and dS passes split their inner dimension (K, N) the same way at small M; the GEMM that reads S
  (dS) sums the fp32 slices in a fixed order and stores the rounded S (dS) once, so no extra launch and no
  atomics: results stay run-to-run identical.

On CUDA with the extension built these launchers run only a configuration's first call: they record their
launches (``records.recording``) and the C++ launch path (``lora_ops._launch``, ``csrc/lora_launch.cpp``) makes
the same launches from then on; ``LAUNCHES`` counts both.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from lora_ops import _backend
from lora_ops import nf4 as _nf4
from lora_ops import reference as _ref

from . import nf4_dequant as _dq
from . import records as _rec
from .lora_kernels import MAX_BLOCK_R as _MAX_BLOCK_R
from .lora_kernels import MAX_STRIDE as _MAX_STRIDE
from .lora_kernels import MIN_DOT as _MIN_DOT
from .lora_kernels import _dropout_mask_kernel
from .lora_tuning import FINISH_CONFIG as _FINISH_CONFIG
from .lora_tuning import _FINISH_KERNEL as _FINISH_KERNEL_FN
from .lora_tuning import (_DA_KERNEL, _DB_KERNEL, _DS_KERNEL, _DX_KERNEL, _FWD_KERNEL, _S_KERNEL, _TMA_CONFIGS,
                          _TMA_KERNEL, _WS_KERNEL, WS_CONFIG, WS_MAXNREG, _next_pow2)

# Kernel name -> launches since import, Python launchers and C++ launch path together (records.py).
LAUNCHES = _rec.LAUNCHES
recording = _rec.recording

# Read at import, as triton.jit does (tests patch it to exercise the CPU-only and CUDA-only branches).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SCRATCH: Dict[torch.device, torch.Tensor] = {}
_SM_COUNT: Dict[int, int] = {}


def _scratch(device: torch.device) -> torch.Tensor:
    # Stands in for pointers a constexpr switch leaves unread. A private tensor, never a user's: the autotuner
    # zeroes the atomic targets (reset_to_zero) even when a variant does not use them.
    t = _SCRATCH.get(device)
    if t is None:
        t = _SCRATCH[device] = torch.zeros(16, dtype=torch.float32, device=device)
    return t


def _splits(m: int, tiles: int, device: torch.device) -> Tuple[int, int]:
    """(number of M splits, rows per split) for a kernel that reduces over M and has ``tiles`` programs per
    split: enough splits for two waves of SMs, each split at least 128 rows (one large tile). The interpreter
    has no SMs: it takes two splits of >= 32 rows whenever M allows, so the CPU tests' shapes run the
    partial-sums path as well as the single-split one."""
    if device.type != "cuda":
        splits = max(1, min(2, -(-m // 32)))
    else:
        want = -(-2 * _sm_count(device) // max(tiles, 1))
        splits = max(1, min(want, -(-m // 128)))
    return splits, -(-m // splits)


# Split reductions along the inner dimension of the skinny kernels (S over K, dS over N): columns per split are a
# multiple of this (256 on CUDA: a few BLOCK_K / BLOCK_N trips each), at most _MAX_INNER_SPLITS slices, and on
# CUDA only up to _SPLIT_MAX_M rows. Measured on the H200 (scripts/gpu_ab.sh, CUDA-graph replay of one
# 4096->4096 fwd+bwd, docs/PERF_NOTES.md item 16): splitting up to 1024 rows took M=1024 from 1.64x to 1.55x the
# floor (NF4 1.96x -> 1.91x); at M=2048 it cost 1.28x -> 1.31x (on the TMA GEMM, which takes S in one slice
# anyway), at M=8192 1.19x -> 1.31x: past a few thousand rows the row blocks alone fill the SMs and the GEMMs
# that sum the slices pay for the extra reads.
_SPLIT_UNIT, _SPLIT_UNIT_INTERP, _MAX_INNER_SPLITS = 256, 64, 16


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer launcher setting from the environment (read at import, as the kernels' other settings)."""
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise ValueError(f"{name}={v!r} must be an integer >= {minimum}; unset it for the default ({default})")
    return n


# LORA_OPS_SPLIT_MAX_M: the largest M whose S / dS passes split (0: never), for A/B runs on the GPU.
_SPLIT_MAX_M = _env_int("LORA_OPS_SPLIT_MAX_M", 1024, 0)
# LORA_OPS_ATOMIC_DB_MAX_M: the largest M whose dB / dbias ride along the dS pass as fp32 atomics (one fewer
# launch); above it the atomic-free dB kernel reduces over M. Every M by default: with 4096 here the layer
# measured the same within noise at M = 8192 (4096->4096 dense 1.186x vs 1.191x the floor, NF4 1.235x vs 1.228x;
# 4096->14336 1.065x vs 1.053x; H200 CUDA-graph replay, docs/PERF_NOTES.md item 16), so the launch is saved.
_ATOMIC_DB_MAX_M = _env_int("LORA_OPS_ATOMIC_DB_MAX_M", 1 << 40, 0)
# LORA_OPS_SPLIT_SUM_MAX_M: up to this M (0: never), the S / dS passes split before the TMA GEMM and before a
# chunked NF4 weight's GEMMs (the slices summed and rounded first, _sum_into, or by the TMA GEMM), where the
# pointer GEMM splits up to _SPLIT_MAX_M. At 2048 x 4096->4096 on the TMA GEMM, S took 13.6 us and dS/dB 22.9 us in
# one slice (H200 profile, docs/PERF_NOTES.md item 17), ~3x their read of x / dY; splitting up to 4096 rows
# measured 1.311x -> 1.234x the floor (NF4 1.503x -> 1.466x) at 2048 rows, 4096->14336 1.125x -> 1.071x, but at
# 4096 rows 1.089x -> 1.119x dense (NF4 1.256x -> 1.228x) (CUDA-graph replay, item 18): so up to 2048 rows, where
# it measured 1.304x -> 1.235x dense, 14336->4096 1.116x -> 1.049x (item 19; the TMA GEMM then summed them).
_SPLIT_SUM_MAX_M = _env_int("LORA_OPS_SPLIT_SUM_MAX_M", 2048, 0)


# LORA_OPS_SPLIT_PRESUM (default 1): before a TMA GEMM, the S / dS slices are summed and rounded right after their
# pass (one finish launch, _sum_into) and the GEMM reads the rounded S / dS; =0: each GEMM tile sums the fp32
# slices it needs, where the TMA GEMM's tiles of one row sum the same slices again before their K loop
# (scripts/probe_tma.py, H100: the forward GEMM 1.08x cuBLAS with one slice, 1.115x with three at 2048 rows).
# q/k/v grouped at 2048 rows, CUDA-graph replay (scripts/ab_settings.py, docs/PERF_NOTES.md): LoRA 1.260x -> 1.216x
# the floor, QLoRA 1.458x -> 1.400x on an H100; 1.299x -> 1.232x, 1.432x -> 1.364x on the H200 (timed with torch's
# sum and copy in place of the finish launch).
_PRESUM = _env_int("LORA_OPS_SPLIT_PRESUM", 1, 0) > 0

# LORA_OPS_DS_SPLITS: above _SPLIT_SUM_MAX_M rows the dS pass (with dB's atomics) still runs as this many slices
# of N (1: one pass) before the TMA dX GEMM (summed first with presum, else by the GEMM). In one slice
# it keeps one program per 64 or 128 rows, too few bytes in flight to stream dY: H200, dS with dB alone,
# `scripts/probe_ds.py --splits 1,2,4,8` (docs/PERF_NOTES.md item 21), 8192 x 14336 at r = 16 98 -> 77 us in four
# slices, 8192 x 28672 at r = 32 242 -> 152, 8192 x 6144 at r = 48 76 -> 47.
_DS_SPLITS = _env_int("LORA_OPS_DS_SPLITS", 4, 1)

# LORA_OPS_FINISH_KERNEL (default 1): the backward's fp32 partials and atomic buffers become dA / dB / dbias in one
# launch of _lora_bwd_finish_kernel (which the C++ path launches in ~2 us) instead of torch's sum and casts (up to
# three aten kernels, each with its own dispatch, allocation and launch on the host); =0 for torch's.
# docs/GROUPED.md has the H200 A/B.
_FINISH_KERNEL = _env_int("LORA_OPS_FINISH_KERNEL", 1, 0) > 0

# LORA_OPS_BASE_MM=1: where the weight is dense (a dense layer, or NF4 dequantized whole), the forward and dX GEMMs
# run as the GEMM kernel's LoRA term alone (its K-loop empty: dropout(s * L @ Rt) + bias into the output) and then
# torch's addmm_ adding x @ W^T / dY @ W into it (cuBLAS on CUDA): cuBLAS's mainloop (1.06-1.18x faster than the
# TMA kernel's on the H200, docs/GROUPED.md) for one more pass over the output and one more aten op per GEMM.
# The LoRA term is then rounded to the output dtype before the base product is added. "fwd" / "dx": the forward or
# the dX GEMM alone. Off: on the H200 the extra pass over the outputs costs what cuBLAS's mainloop saves
# (docs/GROUPED.md). _BASE_MM holds the GEMMs it covers as bits: 1 the forward, 2 the dX GEMM.
_BASE_MM_FWD, _BASE_MM_DX = 1, 2


def _base_mm_setting(v: str) -> int:
    """_BASE_MM's bits from a LORA_OPS_BASE_MM value."""
    v = v.strip().lower()
    ways = {"": 0, "0": 0, "1": 3, "both": 3, "fwd": _BASE_MM_FWD, "dx": _BASE_MM_DX}
    if v not in ways:
        raise ValueError(f"LORA_OPS_BASE_MM={v!r}: use 0 (off, the default), 1 (forward and dX), fwd or dx")
    return ways[v]


_BASE_MM = _base_mm_setting(os.environ.get("LORA_OPS_BASE_MM", ""))

# LORA_OPS_DS_MEMBERS=1: a B_rows group's dS pass runs one program per member (rank columns i rb.. of dS) over that
# member's output columns only (lora_kernels MEMBER_R), instead of rank chunks that sweep every column and multiply
# B_bd's off-diagonal zeros with gathered loads and atomics; its N slices are counted as one rank chunk's. At q/k/v
# on the H200 the B_rows dS pass took 32 us against B_bd's 15 at 2048 rows, 79 against 50 at 8192 (session 16).
# Off until timed on a GPU.
_DS_MEMBERS = _env_int("LORA_OPS_DS_MEMBERS", 0, 0) > 0

# LORA_OPS_SIDE_DA=1: the dA pass runs on a second stream beside the TMA dX GEMM, and that GEMM on the fewest
# programs that keep its wave count (1024 tiles take 8 waves on 132 SMs and on 128 programs), so the SMs it leaves
# idle serve dA for the GEMM's whole run instead of only its last wave (docs/PERF_NOTES.md item 40 timed the
# latter). The C++ launch path does the same (its side stream and events made once per device). On by default
# (three H100 A/B runs, PERF_NOTES items 46-48, the last with the Gluon GEMM); LORA_OPS_SIDE_DA=0 turns it off.
_SIDE_DA = _env_int("LORA_OPS_SIDE_DA", 1, 0) > 0
# LORA_OPS_SIDE_DQ=1: an NF4 weight dequantized whole (below NF4_CHUNK_MIN_M rows) is dequantized on the second
# stream while the S pass (forward) or the dS pass (backward) runs on this one; the GEMM waits for both. Both passes
# are memory-bound but at 2048 rows neither fills the memory system alone (S and dS read x / dY at well under
# the copy bandwidth, PERF_NOTES item 17), so their bytes can overlap. A weight in chunks has its next chunk
# dequantized there while a chunk's TMA GEMM runs on the fewest programs that keep its waves (_chunk_gemms; two
# chunk temporaries alive instead of one). On by default (three H100 A/B runs, PERF_NOTES items 46-48);
# LORA_OPS_SIDE_DQ=0 turns it off.
_SIDE_DQ = _env_int("LORA_OPS_SIDE_DQ", 1, 0) > 0
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One second stream per CUDA device, made once."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(idx)
    return _SIDE_STREAMS[idx]


def _fork(device: torch.device) -> Tuple["torch.cuda.Stream", "torch.cuda.Stream"]:
    """(the current stream, the side stream), the side stream made to wait for everything enqueued so far."""
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)
    return main, side


def _fewest_programs(tiles: int, sms: int) -> int:
    """The fewest persistent programs that run ``tiles`` tiles in as many waves as ``sms`` programs do."""
    waves = -(-tiles // max(1, min(sms, tiles)))
    return -(-tiles // waves)


def _narrow_programs(m: int, n: int, device: torch.device) -> int:
    """The TMA GEMM's programs for an (m, n) output that leave SMs free at no cost in waves (_fewest_programs)."""
    return _fewest_programs(_tma_tiles(m, n), _sm_count(device))


def _inner_splits(m: int, cols: int, r_chunks: int, device: torch.device,
                  max_m: Optional[int] = None) -> Tuple[int, int]:
    """(splits, columns per split) of a skinny kernel's inner dimension: S = xd @ A^T and dS = dY @ B have only
    cdiv(M, BLOCK_M) x r_chunks programs, a fraction of the SMs below a few thousand rows, each looping over all of
    K (N). Splitting that loop gives enough programs for two waves of SMs (counted at 64 rows per program); the
    fp32 partials are summed by the GEMM that reads S (dS). The interpreter takes two splits whenever the
    dimension has two units, so the CPU tests run the partials path as well as the single-split one. ``max_m``:
    the largest M that splits on CUDA (default _SPLIT_MAX_M)."""
    if device.type != "cuda":
        unit, want = _SPLIT_UNIT_INTERP, 2
    elif m > (_SPLIT_MAX_M if max_m is None else max_m):
        return 1, cols
    else:
        unit = _SPLIT_UNIT
        want = -(-2 * _sm_count(device) // max(1, -(-m // 64) * r_chunks))
    return _unit_slices(cols, min(want, _MAX_INNER_SPLITS), unit)


def _unit_slices(cols: int, want: int, unit: int) -> Tuple[int, int]:
    """(splits, columns per split): up to ``want`` slices of ``cols`` in whole ``unit``s, as even as they come."""
    want = max(1, min(want, cols // unit))
    if want == 1:
        return 1, cols
    per = triton.cdiv(triton.cdiv(cols, want), unit) * unit
    return triton.cdiv(cols, per), per


def _slices(m: int, cols: int, r_chunks: int, device: torch.device, gemm_sums: bool,
            tma: bool = False) -> Tuple[int, int, bool]:
    """(splits, columns per split, summed) of the S pass (cols = K) or the dS pass (cols = N). ``gemm_sums``: the
    one GEMM that reads S (dS) sums fp32 slices itself and stores the rounded sum; ``tma``: that GEMM is the TMA
    one. The pointer GEMM's slices follow _SPLIT_MAX_M. Up to _SPLIT_SUM_MAX_M rows the TMA GEMM sums its slices,
    and otherwise (presum, NF4 chunks, no GEMM reading them) ``_sum_into`` sums and rounds them right after the
    pass (``summed``)."""
    if gemm_sums and not tma:
        return (*_inner_splits(m, cols, r_chunks, device), False)
    if m <= _SPLIT_SUM_MAX_M:
        splits, per = _inner_splits(m, cols, r_chunks, device, _SPLIT_SUM_MAX_M)
        return splits, per, splits > 1 and not gemm_sums
    return 1, cols, False


def _ds_slices(m: int, n: int, r_chunks: int, device: torch.device, gemm_sums: bool,
               tma: bool = False) -> Tuple[int, int, bool]:
    """(splits, columns per split, summed) of the dS pass: ``_slices`` up to _SPLIT_SUM_MAX_M rows or before the
    pointer dX GEMM; above, before the TMA dX GEMM or NF4 chunks, _DS_SPLITS slices of N (whole split units),
    summed as in ``_slices``."""
    if m <= _SPLIT_SUM_MAX_M or (gemm_sums and not tma) or _DS_SPLITS == 1:
        return _slices(m, n, r_chunks, device, gemm_sums, tma)
    splits, per = _unit_slices(n, _DS_SPLITS, _SPLIT_UNIT if device.type == "cuda" else _SPLIT_UNIT_INTERP)
    return splits, per, splits > 1 and not gemm_sums


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter: 4, so persistent loops take several tiles)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_CC_MAJOR: Dict[int, int] = {}


def _cc_major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA device (read once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CC_MAJOR:
        _CC_MAJOR[idx] = torch.cuda.get_device_capability(idx)[0]
    return _CC_MAJOR[idx]


def _split_partials(splits: int, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Buffer of a kernel that reduces over M in ``splits`` slices: the output itself (``dtype``, slot 0) with
    one split, fp32 partials per split otherwise (summed by ``_Finish.sum``)."""
    return torch.empty((splits,) + tuple(shape), dtype=dtype if splits == 1 else torch.float32, device=device)


class _Finish:
    """The backward's gradients that come out of fp32 buffers: summed and rounded by torch as each is ready, or
    with _FINISH_KERNEL collected as jobs (dB, dbias, dA in that order) for one finish launch at the end."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.jobs = dtype, device, []

    def sum(self, partials: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        """partials (splits, *shape) fp32 (or the output itself with one split) as one shape tensor."""
        if partials.shape[0] == 1:
            return partials[0]
        if not _FINISH_KERNEL:
            return partials.sum(0).to(self.dtype)
        return self._job(partials, shape, partials.shape[0], partials.stride(0))

    def cast(self, acc: torch.Tensor, shape: Tuple[int, ...], copy: bool = False) -> torch.Tensor:
        """An fp32 buffer (contiguous) as one shape tensor of the dtype; ``copy``: never the buffer itself (it is
        shared with another output)."""
        if self.dtype == torch.float32 and not copy:
            return acc
        if not _FINISH_KERNEL:
            return acc.clone() if self.dtype == torch.float32 else acc.to(self.dtype)
        return self._job(acc, shape, 1, 0)

    def _job(self, src: torch.Tensor, shape, splits: int, stride: int,
             dst: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Collect dst = src's ``splits`` slices ``stride`` apart, summed and rounded (dst made here unless given,
        contiguous)."""
        if dst is None:
            dst = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.jobs.append((src, dst, dst.numel(), splits, stride))
        return dst

    def launch(self) -> None:
        """The one finish launch, when jobs were collected (absent jobs repeat the first one's tensors with 0
        elements, so the kernel's argument types do not depend on which jobs there are)."""
        if not self.jobs:
            return
        jobs = self.jobs + [(self.jobs[0][0], self.jobs[0][1], 0, 1, 0)] * (3 - len(self.jobs))
        args = [t for src, dst, *_ in jobs for t in (src, dst)] + [v for *_, n, sp, st in jobs for v in (n, sp, st)]
        sizes = [n for _, _, n, _, _ in jobs]
        _FINISH_KERNEL_FN(lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in sizes),), *args,
                          _config=_FINISH_CONFIG)


def _sum_into(parts: torch.Tensor, out: torch.Tensor) -> None:
    """out (contiguous) = parts (splits, *out.shape), fp32 slices, summed in slice order and rounded once to out's
    dtype: one finish launch (one job), or torch's sum and copy without _FINISH_KERNEL."""
    if not _FINISH_KERNEL:
        out.copy_(parts.sum(0))
        return
    fin = _Finish(out.dtype, out.device)
    fin._job(parts, out.shape, parts.shape[0], parts.stride(0), dst=out)
    fin.launch()


def _block_r(r: int) -> int:
    return min(max(_MIN_DOT, _next_pow2(r)), _MAX_BLOCK_R)


@contextlib.contextmanager
def _on_device(device: torch.device):
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            yield
    else:
        yield


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton LoRA kernels need CUDA tensors (got {device}); on CPU they run only under "
                         "TRITON_INTERPRET=1. Use LORA_OPS_BACKEND=reference for CPU tensors")


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor, shape=None) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move it with .to({str(x.device)!r})")
    if t.dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported; use float32, float16 or bfloat16")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _narrow(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when all its strides are below _MAX_STRIDE, else a contiguous copy (a layout no real model
    produces: a transposed view with more than 2**22 rows)."""
    if t is None or all(st < _MAX_STRIDE for st in t.stride()):
        return t
    return t.contiguous()


class _Group(NamedTuple):
    """A projection group's B as the kernels read it (``lora_kernels._member_rank``): B_rows (sum N_i, rb) holds
    the members' B_i stacked, standing for block_diag(B_1, ..., B_g) (sum N_i, g * rb); member i's output columns
    start at nb_i (nb_1 < nb_2 < nb_3, an unused one >= N). ``on`` False: an ordinary B (the values are unused)."""
    on: bool = False
    rb: int = 0
    nb1: int = 0
    nb2: int = 0
    nb3: int = 0

    def args(self) -> Tuple[int, int, int, int]:
        return self.rb, self.nb1, self.nb2, self.nb3

    def shifted(self, n0: int) -> "_Group":
        """The same group seen from a window of the output columns that starts at column n0."""
        return self._replace(nb1=self.nb1 - n0, nb2=self.nb2 - n0, nb3=self.nb3 - n0) if self.on else self


_NO_GROUP = _Group()
# The kernels take at most three member boundaries.
MAX_GROUP = 4


def _group(groups: Optional[Sequence[int]], n: int, r: int) -> _Group:
    """The _Group of members with out_features ``groups`` (None or empty: no group), checked against B (n, r // g)
    and A (r, K)."""
    if not groups:
        return _NO_GROUP
    sizes = [int(v) for v in groups]
    if not 2 <= len(sizes) <= MAX_GROUP or min(sizes) < 1 or sum(sizes) != n or r % len(sizes):
        raise ValueError(f"groups={tuple(sizes)}: a group of 2..{MAX_GROUP} members with out_features >= 1 summing "
                         f"to lora_B's {n} rows, over lora_A's {r} ranks split evenly; pass groups=None for one layer")
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    bounds += [n] * (3 - len(bounds))
    return _Group(True, r // len(sizes), *bounds)


def _segments_ok(dys, group: _Group, device: torch.device) -> bool:
    """Whether the kernels read a projection group's dY as the members' own tensors (``SEG_DY`` / ``SEG_A``,
    ``lora_kernels._dy_column``): a B_rows group whose every N_i is a multiple of the split unit (so no dS slice or
    tile straddles two members), each dY_i contiguous and 16-byte aligned (TMA's rules), and not under _BASE_MM
    (its dX GEMM: torch's matmul takes one dY). Otherwise the launcher concatenates them."""
    unit = _SPLIT_UNIT if device.type == "cuda" else _SPLIT_UNIT_INTERP
    return group.on and not (_BASE_MM & _BASE_MM_DX) and all(
        t.shape[1] % unit == 0 and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in dys)


def _check_lora(x, lora_A, lora_B, bias=None, groups=None) -> Tuple[int, int, int, int, _Group]:
    """(M, K, N, r, the _Group of ``groups``) of a launcher call, every argument checked."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) (flatten leading dims first), got shape {tuple(x.shape)}")
    if x.dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; use float32, float16 or bfloat16")
    _check_device(x.device)
    m, k = x.shape
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_A and lora_B must be 2-D, got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    r = lora_A.shape[0]
    n = lora_B.shape[0]
    _check_same("lora_A", lora_A, x, (r, k))
    group = _group(groups, n, r)
    _check_same("lora_B", lora_B, x, (n, group.rb if group.on else r))
    if r < 1:
        raise ValueError(f"lora_A has rank {r}; the rank must be >= 1")
    if bias is not None:
        _check_same("bias", bias, x, (n,))
    if k >= _MAX_STRIDE or n >= _MAX_STRIDE:
        raise ValueError(f"in_features={k}, out_features={n}: the Triton kernels support up to {_MAX_STRIDE - 1} "
                         "(int32 in-tile offsets); use LORA_OPS_BACKEND=reference for larger layers")
    return m, k, n, r, group


# From this many rows on, an NF4 weight is dequantized once per launcher call into a temporary (Triton's
# bandwidth-bound dequantize, 0.043-0.07 ms for 4096x14336 on the H200) and the dense kernels run on it: at
# training sizes the GEMM is compute-bound and decoding NF4 bytes element by element inside its K-loop made the
# layer 17.8x the floor (H200, 2026-11-29, benchmarks/results/h200, M=8192 4096->14336) against ~1.17x dense.
# The temporary is freed when the launcher returns: nothing dense survives between forward and backward. Below
# this M the in-loop decode reads 4x fewer weight bytes; the crossover itself is not yet measured (speed issue).
NF4_DEQUANT_MIN_M = 64
# The interpreter tests switch the temporary path on for CPU tensors (and the C++ launch path's dry run with it).
_DEQUANT_ON_CPU = False
# The temporary is bounded: a weight whose dense copy would pass this many bytes is dequantized in chunks, rows
# of W for the forward GEMM (y's columns), columns of W for the dX GEMM (dX's columns), each chunk's GEMM right
# after its dequantize, so one chunk is alive at a time: 32 MiB instead of 112 MiB at 4096x14336 bf16. Measured
# on the H200 (docs/PERF_NOTES.md items 12, 14): the layer's peak extra memory 433 -> 349 MiB at 8192 x
# 4096->14336; its device time 1.154x the floor in chunks, 1.149x whole, once the chunks' GEMMs take the TMA GEMM
# by the whole layer's shape (_use_tma); LORA_OPS_NF4_CHUNK_MIB moves the bound.
NF4_CHUNK_BYTES = _env_int("LORA_OPS_NF4_CHUNK_MIB", 32, 1) << 20  # LORA_OPS_NF4_CHUNK_MIB: the bound in MiB
# LORA_OPS_NF4_CHUNK_MIN_M: the fewest rows of x from which the temporary is chunked; below it the whole weight is
# dequantized. At 2048 tokens the chunks cost time where their memory matters least (activations dominate the
# peak): the QLoRA model step (16 Llama-8B-shaped layers, 1 x 2048, checkpointing; H200, docs/PERF_NOTES.md item
# 16) took 133.2 ms chunked from every M, 125.7 ms chunked from 4096 rows, same peak memory (more dequantize
# launches, and chunk GEMMs of under two waves of tiles at M = 2048).
NF4_CHUNK_MIN_M = _env_int("LORA_OPS_NF4_CHUNK_MIN_M", 4096, 0)


def _dequant_first(x: torch.Tensor) -> bool:
    """Whether the launchers dequantize an NF4 weight into a temporary for x's call (see NF4_DEQUANT_MIN_M)."""
    return x.shape[0] >= NF4_DEQUANT_MIN_M and (x.is_cuda and not _backend.triton_interpreter() or _DEQUANT_ON_CPU)


def _nf4_chunks(n: int, k: int, blocksize: int, elt: int, along: str) -> Optional[list]:
    """[(lo, hi), ...] ranges of W's rows (``along="rows"``) or columns (``"cols"``) whose dense copies stay
    within NF4_CHUNK_BYTES, in near-equal chunks; None when the whole weight fits (or, for columns, when blocks
    straddle rows: then the whole weight is dequantized). Row chunks start on a quantization block and every
    chunk on a multiple of 8 elements (16-byte aligned views of y / dX for the TMA GEMM)."""
    if n * k * elt <= NF4_CHUNK_BYTES:
        return None
    if along == "rows":
        unit, extent, line = math.lcm(8, blocksize // math.gcd(k, blocksize)), n, k
    else:
        if k % blocksize:
            return None
        unit, extent, line = math.lcm(8, blocksize), k, n
    most = max(unit, NF4_CHUNK_BYTES // (line * elt) // unit * unit)
    size = triton.cdiv(triton.cdiv(extent, triton.cdiv(extent, most)), unit) * unit
    if size >= extent:
        return None
    return [(lo, min(lo + size, extent)) for lo in range(0, extent, size)]


class _W:
    """Kernel arguments of the frozen weight: dense (N, K) or NF4 bytes + scales. From NF4_DEQUANT_MIN_M rows on
    CUDA the NF4 weight is dequantized into a temporary that lives as long as this object (one launcher call),
    or, past NF4_CHUNK_BYTES, chunk by chunk (``chunks`` set; ``block`` dequantizes one) along ``along``."""

    chunks: Optional[list] = None

    # (current stream, side stream) when _SIDE_DQ put the whole dequantization on the side stream: the caller
    # makes the current stream wait for it (``join``) before the GEMM.
    forked: Optional[tuple] = None

    def __init__(self, weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x, along="rows"):
        scratch = self.scratch = _scratch(x.device)
        if absmax is None:
            _check_same("weight", weight, x, (n, k))
            self._dense(_narrow(weight), scratch)
            return
        nested = _dq.check_state(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k)
        if weight.device != x.device:
            raise ValueError(f"the NF4 weight is on {weight.device} but x is on {x.device}; move the weight there")
        packed = weight.reshape(-1).view(torch.uint8)  # bitsandbytes' quant_storage only reinterprets the bytes
        if _dequant_first(x):
            # Checked just above: straight to the dequantize launch, not through its checking entry point.
            self.state = (packed, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x.dtype)
            chunked = x.shape[0] >= NF4_CHUNK_MIN_M
            self.chunks = _nf4_chunks(n, k, blocksize, x.element_size(), along) if chunked else None
            self.along = along
            if self.chunks is None:
                # _SIDE_DQ: beside the pass the caller launches next (S / dS), on the side stream.
                if _SIDE_DQ and x.is_cuda and n > 0 and k > 0:
                    self.forked = _fork(x.device)
                self._dense(self._dequant(self.forked[1] if self.forked else None), scratch)
            return
        if nested:
            self.ptrs = (packed, absmax.reshape(-1), nested_absmax.reshape(-1).float(),
                         nested_code.reshape(-1).float(), offset.reshape(-1).float(), _dq._codebook(x.device))
            # The nested scale is a rounded product then a rounded sum; fp fusion would make it one fma.
            self.opts = dict(enable_fp_fusion=False)
        else:
            self.ptrs = (packed, absmax.reshape(-1).float(), scratch, scratch, scratch, _dq._codebook(x.device))
            self.opts = {}
        self.strides = (0, 0)
        self.meta = dict(IS_NF4=True, NESTED=nested, BLOCKSIZE=blocksize)
        if nested and offset.numel() > 1:  # a projection group's stacked weight: one offset per nested block
            self.meta["NESTED_OFFSETS"] = True

    def _dense(self, w: torch.Tensor, scratch: torch.Tensor) -> None:
        self.ptrs = (w, scratch, scratch, scratch, scratch, scratch)
        self.strides = (w.stride(0), w.stride(1))
        self.meta = dict(IS_NF4=False, NESTED=False, BLOCKSIZE=64)
        self.opts = {}

    def _dequant(self, side=None, **rng) -> torch.Tensor:
        """The dense temporary (of a chunk: row_range / col_range), dequantized on the stream ``side`` when given,
        for use on the current one (recorded there, so its memory is not reused before that use)."""
        if side is None:
            return _dq._launch(*self.state, **rng)
        main = torch.cuda.current_stream(self.scratch.device)
        with torch.cuda.stream(side):
            dense = _dq._launch(*self.state, **rng)
        dense.record_stream(main)
        return dense

    def join(self) -> None:
        """The current stream waits for a dequantization _SIDE_DQ put on the side stream (no-op otherwise)."""
        if self.forked:
            self.forked[0].wait_stream(self.forked[1])

    def block(self, lo: int, hi: int, side=None) -> "_W":
        """The dense temporary of chunk (lo, hi) of ``chunks`` as its own _W (rows or columns of W); dequantized on
        the stream ``side`` when given (for use on the current one)."""
        rng = dict(row_range=(lo, hi)) if self.along == "rows" else dict(col_range=(lo, hi))
        w = _W.__new__(_W)
        w._dense(self._dequant(side, **rng), self.scratch)
        return w


def _chunk_gemms(w: _W, m: int, device: torch.device, use_tma, launch) -> None:
    """Each chunk (lo, hi) of ``w.chunks`` dequantized, then its GEMM: ``launch(wc, lo, hi, tma, programs)`` with
    ``tma = use_tma(wc, lo, hi)``; the output's chunk has m rows and hi - lo columns. With _SIDE_DQ on CUDA the
    next chunk is dequantized on the side stream while a TMA GEMM runs on the fewest programs that keep its waves
    (so two temporaries are alive at a time instead of one); otherwise each temporary is freed before the next is
    made."""
    pipe = _SIDE_DQ and device.type == "cuda" and not _backend.triton_interpreter() and len(w.chunks) > 1
    nxt = forked = None  # the next chunk's _W, dequantized on forked = (current stream, side stream)
    for i, (lo, hi) in enumerate(w.chunks):
        if nxt is None:
            wc = w.block(lo, hi)
        else:
            wc, nxt = nxt, None
            forked[0].wait_stream(forked[1])
        tma = use_tma(wc, lo, hi)
        more = pipe and tma and i + 1 < len(w.chunks)
        if more:
            forked = _fork(device)  # the next dequantization starts after everything enqueued so far
        launch(wc, lo, hi, tma, _narrow_programs(m, hi - lo, device) if more else None)
        del wc
        if more:
            nxt = w.block(*w.chunks[i + 1], side=forked[1])


class _Dropout:
    """Kernel arguments of the LoRA-branch dropout: the seed tensor (read on device), threshold, 1/(1-p)."""

    def __init__(self, dropout_p, seed, x):
        p = float(dropout_p)
        if not (0.0 <= p < 1.0):
            raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1); 1.0 would zero the adapter")
        # As the reference: no seed means no dropout (callers pass None exactly when p == 0).
        self.on = p > 0.0 and seed is not None
        if self.on:
            if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
                raise ValueError(f"seed must be a one-element int64 tensor on {x.device}, got {seed.dtype} "
                                 f"{tuple(seed.shape)} on {seed.device}")
            self.seed = seed.reshape(())
            self.threshold = _ref.dropout_keep_threshold(p)
            self.scale = 1.0 / (1.0 - p)
        else:
            self.seed, self.threshold, self.scale = _scratch(x.device), 0, 1.0


# TMA GEMM (``_lora_gemm_tma_kernel``): one fixed config, the best of a persistent-TMA GEMM probe on the H200 (a
# persistent TMA GEMM at 1.006-1.022x cuBLAS there: BM=128, BN=256, BK=64, 8 warps, 3 stages), a smaller tile
# below 128 rows. For 16-bit dense weights (and the NF4 temporary) on sm_90+ when every operand meets TMA's
# rules (16-byte aligned base and row stride, unit last stride); otherwise the pointer kernels run.
# As first written it measured ~1.8x SLOWER than the pointer GEMMs (layer preset, 8192x4096->14336 fused 5.88 ms
# vs 3.28 ms; docs/PERF_NOTES.md) with its tile loop flattened, so the tile loop is unflattened
# (LORA_OPS_TMA_FLATTEN=1 flattens it). Compiled for sm_90 by Triton 3.6, the flattened loop is multi-buffered (3
# stages of A and W, two output tiles, so a tile's store overlaps the next tile's loads) when L arrives in one slice
# (L_SPLITS = 1, which Triton specializes); with a slice loop in the tile it is not flattened at all
# (docs/PERF_NOTES.md item 42). Timed again with L in one slice, it is still 1.6-2.6x slower than the unflattened
# loop on the H200 (grouped q/k/v and gate/up, docs/PERF_NOTES.md item 44). Unflattened, the layer preset on
# the H200 (floor + fused, LORA_OPS_TMA=1 vs 0 in one call; docs/PERF_NOTES.md item 9):
# 8192 x 4096->14336 dense 1.093x vs 1.205x the floor, NF4 1.091x vs 1.125x; 8192 x 14336->4096 dense 1.084x
# vs 1.159x, NF4 1.075x vs 1.098x; but 8192 x 4096->4096 dense 1.967x vs 1.724x. So by default (LORA_OPS_TMA
# unset) it runs where it measured faster: M >= _TMA_MIN_M and N*K >= _TMA_MIN_NK; LORA_OPS_TMA=1 everywhere it
# applies, 0 nowhere. Measured again once the S / dS kernels were aligned (H200, CUDA-graph replay,
# docs/PERF_NOTES.md item 16), TMA on vs off: 2048 x 4096->4096 dense 1.28x vs 1.36x, NF4 1.54x vs 1.62x;
# 8192 x 4096->4096 dense 1.13x vs 1.19x, NF4 1.16x vs 1.23x; at M = 1024 no better (1.59x vs 1.55x with the
# splits). GQA's narrow 4096->1024 (item 17) gained at 8192 rows (dense 1.487x -> 1.423x, NF4 1.694x -> 1.559x)
# and lost at 2048 (1.743x -> 2.012x). So the rule: M >= _TMA_MIN_M, N*K >= _TMA_MIN_NK and M*N*K >= _TMA_MIN_MNK
# (2048 rows at 4096 x 4096, 8192 rows at 4096 x 1024: a GEMM of at least 2^35 multiply-adds).
# The LoRA seed is loaded in rank chunks of 16 whatever r is: its two tiles sit in shared memory beside the
# pipeline's 3 x 48 KB and the 64 KB output tile, and chunks of 64 (r = 64) asked for 262 KB of the 227 KB an
# H200 SM has (OutOfResources, H200 2026-11-29); chunks of 16 need 12 KB.
_TMA_BLOCK_R = 16
_TMA_MIN_M, _TMA_MIN_NK, _TMA_MIN_MNK = 2048, 1 << 22, 1 << 35


def _tma_mode() -> str:
    """LORA_OPS_TMA: "1" on wherever TMA applies, "0" off, unset / "" / "auto" on for the shapes it measured
    faster on (see above)."""
    v = os.environ.get("LORA_OPS_TMA", "auto").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("0", "1"):
        return v
    raise ValueError(f"LORA_OPS_TMA={v!r}: use 1 (on), 0 (off) or auto (unset: on for the measured-faster shapes)")


def _tma_operand(t: torch.Tensor) -> bool:
    """TMA's rules for a 2-D operand: 16-bit elements, unit last stride, 16-byte aligned base and row stride."""
    return (t.dim() == 2 and t.element_size() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * 2) % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0)


def _tma_usable(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, nk: Optional[int] = None) -> bool:
    """Whether c = a @ op(w) runs on the TMA GEMM: by LORA_OPS_TMA (``_tma_mode``), an sm_90+ device and TMA's
    operand rules. ``nk``: the layer's N*K for the auto rule (default c's N times a's K)."""
    mode = _tma_mode()
    nk = c.shape[1] * a.shape[1] if nk is None else nk
    if mode == "0" or (mode == "auto" and (c.shape[0] < _TMA_MIN_M or nk < _TMA_MIN_NK
                                           or c.shape[0] * nk < _TMA_MIN_MNK)):
        return False
    if not _INTERPRET and _cc_major(a.device) < 9:
        return False
    return all(_tma_operand(t) for t in (a, w, c))


def _use_tma(a: torch.Tensor, w: "_W", c: torch.Tensor, nk: Optional[int] = None) -> bool:
    """Whether c = a @ op(W) runs on the TMA GEMM as one launch (dense 16-bit weights, not chunked; see
    _tma_usable). A chunked weight decides per chunk, by the whole layer's ``nk`` = N*K: a chunk is a slice
    of a layer big enough for TMA to win (H200, 8192 x 4096<->14336 NF4 in 32 MiB chunks, CUDA-graph replay:
    1.23x / 1.21x the floor on pointer GEMMs, 1.15x / 1.16x on TMA GEMMs; the whole temporary 1.15x / 1.13x;
    docs/PERF_NOTES.md)."""
    return w.chunks is None and not w.meta["IS_NF4"] and c.shape[1] > 0 and _tma_usable(a, w.ptrs[0], c, nk)


def _base_mm(w: "_W", way: int) -> bool:
    """Whether a GEMM over ``w`` takes its base product from torch's matmul (_BASE_MM has ``way``, _BASE_MM_FWD or
    _BASE_MM_DX): a dense weight in one piece (a dense layer, or NF4 dequantized whole; not decoded in the
    K-loop, not in chunks)."""
    return bool(_BASE_MM & way) and w.chunks is None and not w.meta["IS_NF4"]


def _lora_gemm(kernel, a, w, c, l, rt, stride_rr, stride_rn, bias, drop, scaling, trans_w, r, block_r, m_bucket,
               tma, l_out=None, drop_cols=None, group=_NO_GROUP, segs=None, base_mm=False, programs=None):
    """c (M, N) = dropout(scaling * L (M, r) @ Rt (r, N)) (+ bias) + a (M, K) @ op(W): the forward
    (trans_w, W (N, K): op(W) = W^T, Rt = B^T) or the dX GEMM (W (K, N) itself, Rt = A_lora). ``w``: a _W;
    Rt is addressed through ``rt`` with (stride_rr, stride_rn). ``l``: L (M, r), or (splits, M, r) fp32 partials
    that the kernel sums and rounds (then ``l_out``, if given, receives that rounded L). ``drop_cols`` = (x's
    column count, first column) when c is a column window of dX (dropout indexes x's elements). ``group``: Rt
    is a projection group's B_rows^T (the forward; a _Group seen from c's first column). ``segs`` (dX, with the
    group): a = dY is the members' own tensors (a is segs[0]; ``_segments_ok``). The TMA kernel when
    ``tma`` (one slice only), else the pointer kernel ``kernel`` (_FWD_KERNEL / _DX_KERNEL: their own configs and
    counters). ``base_mm`` (``_base_mm``): the kernel adds the LoRA term alone (its K-loop empty) and torch's
    addmm_ the base product after it. ``programs``: the TMA GEMM's persistent grid (_tma_gemm)."""
    m, n = c.shape
    drop_ld, drop_c0 = drop_cols or (n, 0)
    if tma:
        _tma_gemm(a, w.ptrs[0], c, l, rt, stride_rr, stride_rn, bias, drop, scaling, trans_w, r, drop_ld, drop_c0,
                  l_out, group, segs, programs)
        return
    scratch = _scratch(c.device)
    b = bias if bias is not None else scratch
    (stride_ls, stride_lm, stride_lr), (lo, *stride_lo) = _l_args(l, l_out, scratch)
    kernel(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
           a, *w.ptrs, l, rt, b, drop.seed, c, lo,
           a.stride(0), a.stride(1), *w.strides, stride_ls, stride_lm, stride_lr, stride_rr, stride_rn, b.stride(0),
           c.stride(0), c.stride(1), *stride_lo,
           m, n, 0 if base_mm else sum(t.shape[1] for t in segs) if segs else a.shape[1], r,
           l.shape[0] if l.dim() == 3 else 1,
           float(scaling), drop.threshold, drop.scale,
           drop_ld, drop_c0, m_bucket, *(group.args() if trans_w or segs else _NO_GROUP.args()),
           *_more(segs, scratch),
           TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_DROPOUT=drop.on, WRITE_L=l_out is not None,
           GROUPED=group.on and trans_w, SEG_A=segs is not None, BLOCK_R=block_r, **w.meta, **w.opts)
    if base_mm:
        c.addmm_(a, w.ptrs[0].t() if trans_w else w.ptrs[0])


def _more(segs, filler) -> tuple:
    """The kernels' three further member arguments (dy2_ptr.. / a2_ptr.. / a2_desc..): members 2..4 of ``segs``
    and the first member again for the missing ones (one pointer type for the kernel's selects), or ``filler``
    three times without segments."""
    if not segs:
        return (filler,) * 3
    rest = list(segs[1:])
    return tuple(rest + [segs[0]] * (3 - len(rest)))


def _l_args(l, l_out, scratch):
    """((stride_ls, stride_lm, stride_lr) of L in one slice or in (splits, M, r) fp32 slices, (the rounded L's
    destination or scratch, its two strides or zeros)) as both GEMM kernels take them."""
    strides = l.stride() if l.dim() == 3 else (0,) + l.stride()
    if l_out is None:
        return strides, (scratch, 0, 0)
    return strides, (l_out, l_out.stride(0), l_out.stride(1))


def _tma_config(m: int) -> tuple:
    """(blocks, warps, stages) of the TMA GEMM's config for m rows (_TMA_CONFIGS)."""
    return next(c_ for c_ in _TMA_CONFIGS if m >= c_[0])[1:]


def _tma_tiles(m: int, n: int) -> int:
    """Output tiles of the TMA GEMM's config for an (m, n) output."""
    blocks = _tma_config(m)[0]
    return triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"])


def _tma_gemm(a, w, c, lt, rt_ptr, stride_rr, stride_rn, bias, drop, scaling, trans_w, r, drop_ld, drop_c0,
              l_out=None, group=_NO_GROUP, segs=None, programs=None):
    """c = lora + a @ (w^T if trans_w else w) through _lora_gemm_tma_kernel (see there), or its Gluon twin where
    ``_ws_usable``; ``lt`` and ``l_out`` as in _lora_gemm; ``programs``: the persistent grid (default one program
    per SM)."""
    if _ws_usable(c, lt, rt_ptr, l_out, trans_w, group, drop):
        _ws_gemm(a, w, c, lt, rt_ptr, bias, scaling, trans_w, group, segs, programs)
        return
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, n = c.shape
    k = sum(t.shape[1] for t in segs) if segs else a.shape[1]
    blocks, warps, stages = _tma_config(m)
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    a_d = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    more = _more([a_d] + [TensorDescriptor(t, list(t.shape), list(t.stride()), [bm, bk]) for t in segs[1:]]
                 if segs else None, a_d)
    w_d = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk] if trans_w else [bk, bn])
    c_d = TensorDescriptor(c, list(c.shape), list(c.stride()), [bm, bn])
    scratch = _scratch(c.device)
    b = bias if bias is not None else scratch
    (stride_ls, stride_lm, stride_lr), (lo, *stride_lo) = _l_args(lt, l_out, scratch)
    sms = programs or _sm_count(c.device)
    tiles = _tma_tiles(m, n)
    _TMA_KERNEL(lambda meta: (max(1, min(sms, tiles)),),
                a_d, w_d, c_d, lt, rt_ptr, b, drop.seed, lo,
                stride_ls, stride_lm, stride_lr, stride_rr, stride_rn, b.stride(0), *stride_lo,
                m, n, k, lt.shape[0] if lt.dim() == 3 else 1, float(scaling), drop.threshold, drop.scale, drop_ld,
                drop_c0, *(group.args() if trans_w or segs else _NO_GROUP.args()), *more,
                TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_DROPOUT=drop.on, WRITE_L=l_out is not None,
                GROUPED=group.on and trans_w, SEG_A=segs is not None, R_CHUNKS=triton.cdiv(r, _TMA_BLOCK_R), R=r,
                BLOCK_R=_TMA_BLOCK_R, NUM_SMS=sms,
                FLATTEN=os.environ.get("LORA_OPS_TMA_FLATTEN", "0") not in ("", "0"),
                _config=(blocks, warps, stages))


# The warp-specialized Gluon GEMM (lora_ws_kernel.py) in place of the TMA kernel: sm_90 only (wgmma), the large
# tile, L in one slice of C's dtype. Its producer warp keeps the next tile's loads and the LoRA seed in flight
# during a tile's epilogue, which Triton 3.6 does not arrange for the TMA kernel: on an H100 (scripts/probe_gluon.py,
# docs/PERF_NOTES.md item 48) q/k/v's forward product at 8192 rows took 0.997x cuBLAS's time with its seed, the
# TMA kernel 1.051x; the dX product 1.021x against 1.054x; gate/up's forward 1.016x against 1.057x.
# LORA_OPS_WS=0 keeps the TMA kernel.
_WS = _env_int("LORA_OPS_WS", 1, 0) > 0 and _WS_KERNEL is not None
_GLUON_LAYOUTS: Dict[tuple, object] = {}


def _ws_usable(c: torch.Tensor, lt: torch.Tensor, rt: torch.Tensor, l_out, trans_w: bool, group: "_Group",
               drop: "_Dropout") -> bool:
    """Whether a TMA GEMM runs on the Gluon kernel (``_ws_gemm``): LORA_OPS_WS on, a CUDA device of compute
    capability 9.x (not the interpreter), at least the tile's rows, no dropout, L (M, R) in one slice of C's dtype
    with no l_out, L and Rt (B (N, R) or A_lora (R, N)) meeting TMA's rules, and with a group's B_rows (forward)
    every member boundary inside C on a tile edge (a tile reads one member's rank columns)."""
    blocks = WS_CONFIG[0]
    if (not _WS or _INTERPRET or drop.on or l_out is not None or c.device.type != "cuda"
            or c.shape[0] < blocks["BLOCK_M"]
            or lt.dtype != c.dtype or rt.dtype != c.dtype or not _tma_operand(lt) or not _tma_operand(rt)):
        return False
    if _cc_major(c.device) != 9:
        return False
    if group.on and trans_w:
        n = c.shape[1]
        return all(nb % blocks["BLOCK_N"] == 0 for nb in (group.nb1, group.nb2, group.nb3) if 0 < nb < n)
    return True


def _gluon_desc(t: torch.Tensor, block):
    """A Gluon TMA descriptor of ``t`` with ``block`` tiles in the default NVMMA shared layout."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    key = (t.dtype, tuple(block))
    layout = _GLUON_LAYOUTS.get(key)
    if layout is None:
        gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
        layout = _GLUON_LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(block), gdt)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), layout)


def _ws_gemm(a, w, c, lt, rt, bias, scaling, trans_w, group=_NO_GROUP, segs=None, programs=None):
    """c = scaling * L @ Rt (+ bias) + a @ (w^T if trans_w else w) through ``_lora_gemm_ws_kernel`` (_tma_gemm's
    contract without dropout, L = ``lt`` in one slice; Rt the 2-D tensor ``rt``: B (N, R) or A_lora (R, N))."""
    blocks = WS_CONFIG[0]
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    m, n = c.shape
    k = sum(t.shape[1] for t in segs) if segs else a.shape[1]
    a_blk, w_blk = (bm, bk), ((bn, bk) if trans_w else (bk, bn))
    a_d = _gluon_desc(a, a_blk)
    more = _more([a_d] + [_gluon_desc(t, a_blk) for t in segs[1:]] if segs else None, a_d)
    scratch = _scratch(c.device)
    b = bias if bias is not None else scratch
    sms = programs or _sm_count(c.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    rank = rt.shape[1] if trans_w else rt.shape[0]
    _WS_KERNEL(lambda meta: (max(1, min(sms, tiles)),),
               a_d, _gluon_desc(w, w_blk), _gluon_desc(c, (bm, bn)), _gluon_desc(lt, a_blk), _gluon_desc(rt, w_blk),
               b, b.stride(0), m, n, k, float(scaling), *(group.args() if trans_w or segs else _NO_GROUP.args()),
               *more, TRANS_W=trans_w, HAS_BIAS=bias is not None, GROUPED=group.on and trans_w,
               SEG_A=segs is not None, SEED_STEPS=triton.cdiv(rank, bk), maxnreg=WS_MAXNREG, _config=WS_CONFIG)


# ------------------------------------------------------------------------------------------------ launchers

def lora_forward(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                 nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                 offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, bias: Optional[torch.Tensor], dropout_p: float,
                 seed: Optional[torch.Tensor], groups: Optional[Sequence[int]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), S (M, r)), the contract of ``lora_ops::lora_fwd``; S is rounded to x.dtype.

    weight: dense (N, K) when ``absmax`` is None, else the packed NF4 bytes of an (N, K) weight with absmax
    (fp32, or uint8 codes with nested_absmax / nested_code / offset). seed: 0-d int64 tensor or None (p == 0).
    groups: a projection group's out_features (N_1, ..., N_g), 2 <= g <= 4, with lora_B = cat(B_i) (N, r / g)
    standing for block_diag(B_i) (N, r): y is that of the block-diagonal B, with no block-diagonal tensor made.
    """
    m, k, n, r, group = _check_lora(x, lora_A, lora_B, bias, groups)
    x, lora_A, lora_B, bias = (_narrow(t) for t in (x, lora_A, lora_B, bias))
    w = _W(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x)
    drop = _Dropout(dropout_p, seed, x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return y, s
    block_r = _block_r(r)
    r_chunks = triton.cdiv(r, block_r)
    m_bucket = _next_pow2(m)
    base_mm = _base_mm(w, _BASE_MM_FWD)
    tma = not base_mm and _use_tma(x, w, y)
    # S in K slices: fp32 partials summed and rounded right after the pass before a TMA GEMM (presum), else by the
    # one forward GEMM, which then stores S rounded (see _slices). Under base_mm the GEMM's tiles read nothing but
    # the slices, so they split as before the TMA GEMM.
    presum = _PRESUM and tma
    splits, cols, summed = _slices(m, k, r_chunks, x.device, not (n == 0 or w.chunks or presum), tma or base_mm)
    s_part = s if splits == 1 else torch.empty((splits, m, r), dtype=torch.float32, device=x.device)
    with _on_device(x.device):
        _S_KERNEL(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), r_chunks, splits),
                  x, lora_A, drop.seed, s_part,
                  x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
                  s_part.stride(0) if splits > 1 else 0, s_part.stride(-2), s_part.stride(-1),
                  m, k, r, cols, drop.threshold, drop.scale, m_bucket,
                  HAS_DROPOUT=drop.on, BLOCK_R=block_r)
        if summed:
            _sum_into(s_part, s)
        no_drop = _Dropout(0.0, None, x)
        w.join()
        if w.chunks:
            # y's columns n0:n1 from W's rows n0:n1.
            _chunk_gemms(w, m, x.device, lambda wc, n0, n1: _use_tma(x, wc, y[:, n0:n1], n * k),
                         lambda wc, n0, n1, tma, programs: _lora_gemm(
                             _FWD_KERNEL, x, wc, y[:, n0:n1], s, lora_B[n0:n1], lora_B.stride(1), lora_B.stride(0),
                             None if bias is None else bias[n0:n1], no_drop, scaling, True, r, block_r, m_bucket,
                             tma, group=group.shifted(n0), programs=programs))
        elif n > 0:
            gemm_sums = splits > 1 and not summed
            _lora_gemm(_FWD_KERNEL, x, w, y, s_part if gemm_sums else s, lora_B, lora_B.stride(1), lora_B.stride(0),
                       bias, no_drop, scaling, True, r, block_r, m_bucket, tma, s if gemm_sums else None,
                       group=group, base_mm=base_mm)
    return y, s


def lora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                  nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  s: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                  need_dx: bool, need_dA: bool, need_dB: bool, need_dbias: bool,
                  groups: Optional[Sequence[int]] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dA (r, K), dB (N, r), dbias (N,)), the contract of ``lora_ops::lora_bwd``; a gradient not
    asked for comes back with 0 elements. dS (M, r) is rounded to x.dtype before the dX and dA GEMMs.
    groups: as in lora_forward; dB is then lora_B's own gradient (N, r / g), the diagonal blocks of the
    block-diagonal B's. With groups, dy may be the members' dY_i (M, N_i), a list: the kernels read them as they
    are where ``_segments_ok``, else they are concatenated first."""
    m, k, n, r, group = _check_lora(x, lora_A, lora_B, None, groups)
    rb = group.rb if group.on else r  # dB's columns
    segs = None
    if isinstance(dy, (list, tuple)):
        if not group.on or len(dy) != len(groups):
            raise ValueError(f"dy is a list of {len(dy)} tensors: that needs groups= with one size per tensor "
                             f"(got groups={groups!r})")
        for i, (t, ni) in enumerate(zip(dy, groups)):
            _check_same(f"dy[{i}]", t, x, (m, ni))
        segs = list(dy) if _segments_ok(dy, group, x.device) else None
        dy = segs[0] if segs else torch.cat(list(dy), 1)
    else:
        _check_same("dy", dy, x, (m, n))
    _check_same("s", s, x, (m, r))
    x, lora_A, lora_B, s = (_narrow(t) for t in (x, lora_A, lora_B, s))
    dy = dy if segs else _narrow(dy)
    drop = _Dropout(dropout_p, seed, x)
    dev, dt = x.device, x.dtype
    # A custom op may not return one tensor twice: one 0-element tensor per gradient not asked for.
    dx, dA, dB, dbias = (None if need else dy.new_empty((0,)) for need in (need_dx, need_dA, need_dB, need_dbias))
    if need_dx:
        dx = torch.empty((m, k), dtype=dt, device=dev)
    need_ds = need_dx or need_dA
    if m == 0:
        # Sums over zero rows are zero; nothing to launch.
        return (dx, torch.zeros_like(lora_A) if need_dA else dA, torch.zeros_like(lora_B) if need_dB else dB,
                dy.new_zeros((n,)) if need_dbias else dbias)
    w = _W(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x, "cols") if need_dx else None
    block_r = _block_r(r)
    r_chunks = triton.cdiv(r, block_r)
    m_bucket = _next_pow2(m)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Atomics for dB/dbias only ride along the dS pass; without dS, when determinism is asked or above
    # _ATOMIC_DB_MAX_M rows the atomic-free kernel does the reduction.
    atomics = need_ds and not deterministic and m <= _ATOMIC_DB_MAX_M
    fused_db = atomics and need_dB
    fused_dbias = atomics and need_dbias
    base_mm = need_dx and _base_mm(w, _BASE_MM_DX)
    tma_dx = need_dx and not base_mm and _use_tma(dy, w, dx, n * k if segs else None)
    # dS in N slices: summed first before a TMA dX GEMM (presum), else fp32 partials the one dX GEMM sums (it
    # stores dS rounded for the dA kernel); see _slices.
    dx_sums = need_dx and k > 0 and w.chunks is None and not (_PRESUM and tma_dx)
    members = group.on and _DS_MEMBERS  # the dS pass's programs per member (MEMBER_R), see _DS_MEMBERS
    ds_block_r = _block_r(group.rb) if members else block_r
    ds_chunks = r // group.rb if members else r_chunks
    splits_ds, cols_ds, ds_summed = _ds_slices(m, n, 1 if members else r_chunks, dev, dx_sums, tma_dx or base_mm)
    fin = _Finish(dt, dev)
    with _on_device(dev):
        ds = ds_part = None
        if need_ds:
            ds = torch.empty((m, r), dtype=dt, device=dev)
            ds_part = ds if splits_ds == 1 else torch.empty((splits_ds, m, r), dtype=torch.float32, device=dev)
            # One zeroed fp32 buffer for both atomic targets (one allocation and one memset: host time counts).
            acc = torch.zeros(((n * rb if fused_db else 0) + (n if fused_dbias else 0),), dtype=torch.float32,
                              device=dev) if fused_db or fused_dbias else None
            db_acc = acc[:n * rb].view(n, rb) if fused_db else _scratch(dev)
            dbias_acc = acc[n * rb if fused_db else 0:] if fused_dbias else _scratch(dev)
            _DS_KERNEL(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), ds_chunks, splits_ds),
                       dy, lora_B, s, ds_part, db_acc, dbias_acc,
                       dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
                       ds_part.stride(0) if splits_ds > 1 else 0, ds_part.stride(-2), ds_part.stride(-1),
                       m, n, r, cols_ds, float(scaling), m_bucket, *group.args(), *_more(segs, _scratch(dev)),
                       DO_DB=fused_db, DO_DBIAS=fused_dbias, GROUPED=group.on, SEG_DY=segs is not None,
                       BLOCK_R=ds_block_r, **({"MEMBER_R": True} if members else {}))
            if ds_summed:
                _sum_into(ds_part, ds)
            if fused_db:
                dB = fin.cast(db_acc, (n, rb))
            if fused_dbias:
                # A copy in fp32: dB is a view of the same buffer, and op outputs may not alias each other.
                dbias = fin.cast(dbias_acc, (n,), copy=True)
        do_db = need_dB and not fused_db
        do_dbias = need_dbias and not fused_dbias
        if (do_db or do_dbias) and n > 0:
            splits, rows = _splits(m, triton.cdiv(n, 64) * r_chunks, dev)
            db_out = _split_partials(splits, (n, rb), dt, dev) if do_db else _scratch(dev).view(1, 1, 16)
            dbias_out = _split_partials(splits, (n,), dt, dev) if do_dbias else _scratch(dev).view(1, 16)
            _DB_KERNEL(lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), r_chunks, splits),
                       dy, s, db_out, dbias_out,
                       dy.stride(0), dy.stride(1), s.stride(0), s.stride(1),
                       db_out.stride(0) if splits > 1 else 0, db_out.stride(1), db_out.stride(2),
                       dbias_out.stride(0) if splits > 1 else 0, dbias_out.stride(1),
                       m, n, r, rows, float(scaling), m_bucket, *group.args(), *_more(segs, _scratch(dev)),
                       DO_DB=do_db, DO_DBIAS=do_dbias, GROUPED=group.on, SEG_DY=segs is not None,
                       BLOCK_R=block_r)
            if do_db:
                dB = fin.sum(db_out, (n, rb))
            if do_dbias:
                dbias = fin.sum(dbias_out, (n,))
        elif do_db or do_dbias:
            dB = torch.zeros_like(lora_B) if do_db else dB
            dbias = dy.new_zeros((n,)) if do_dbias else dbias
        if need_dx and k > 0 and w.chunks:
            # dX's columns k0:k1 from W's columns k0:k1.
            _chunk_gemms(w, m, dev, lambda wc, k0, k1: _use_tma(dy, wc, dx[:, k0:k1], n * k),
                         lambda wc, k0, k1, tma, programs: _lora_gemm(
                             _DX_KERNEL, dy, wc, dx[:, k0:k1], ds, lora_A[:, k0:k1], lora_A.stride(0),
                             lora_A.stride(1), None, drop, 1.0, False, r, block_r, m_bucket, tma, drop_cols=(k, k0),
                             group=group, segs=segs, programs=programs))
        # _SIDE_DA: dA on the side stream, forked before the dX GEMM (when that GEMM does not write the dS dA
        # reads) and joined before the finish launch; its buffers are made on this stream first.
        side = (_SIDE_DA and tma_dx and need_dA and k > 0 and w.chunks is None and (splits_ds == 1 or ds_summed)
                and dev.type == "cuda" and not _backend.triton_interpreter())
        if w is not None:
            w.join()
        if side:
            main_stream, side_stream = _fork(dev)
        if need_dA and k > 0:
            splits, rows = _splits(m, triton.cdiv(k, 64) * r_chunks, dev)
            da_out = _split_partials(splits, (r, k), dt, dev)
        if need_dx and k > 0 and not w.chunks:
            dx_parts = splits_ds > 1 and not ds_summed
            _lora_gemm(_DX_KERNEL, dy, w, dx, ds_part if dx_parts else ds, lora_A, lora_A.stride(0), lora_A.stride(1),
                       None, drop, 1.0, False, r, block_r, m_bucket, tma_dx, ds if dx_parts and need_dA else None,
                       group=group, segs=segs, base_mm=base_mm,
                       programs=_narrow_programs(m, k, dev) if side else None)
        if need_dA:
            if k > 0:
                with torch.cuda.stream(side_stream) if side else contextlib.nullcontext():
                    _DA_KERNEL(lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), r_chunks, splits),
                               x, ds, drop.seed, da_out,
                               x.stride(0), x.stride(1), ds.stride(0), ds.stride(1),
                               da_out.stride(0) if splits > 1 else 0, da_out.stride(1), da_out.stride(2),
                               m, k, r, rows, drop.threshold, drop.scale, m_bucket,
                               HAS_DROPOUT=drop.on, BLOCK_R=block_r)
                if side:
                    main_stream.wait_stream(side_stream)
                dA = fin.sum(da_out, (r, k))
            else:
                dA = torch.zeros_like(lora_A)
        fin.launch()
    return dx, dA, dB, dbias


def dropout_mask(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """Boolean keep-mask (rows, cols) for ``seed`` computed by the kernels' own Triton hash (all True at p == 0),
    equal bit for bit to ``lora_ops.reference.dropout_mask``."""
    device = torch.device(device)
    _check_device(device)
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"p={p!r} must be in [0, 1)")
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    n = rows * cols
    out = torch.empty(n, dtype=torch.uint8, device=device)
    if n > 0:
        seed_t = torch.tensor(int(seed), dtype=torch.int64, device=device)
        block = 1024
        LAUNCHES.bump("dropout_mask")
        with _on_device(device):
            _dropout_mask_kernel[(triton.cdiv(n, block),)](seed_t, out, n, _ref.dropout_keep_threshold(p),
                                                            BLOCK=block)
    return out.view(torch.bool).reshape(rows, cols)
