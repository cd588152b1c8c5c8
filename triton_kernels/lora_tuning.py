"""Configs, autotuning and the launch wrapper of the fused LoRA kernels (``lora_kernels.py``).

Tuning: on CUDA every kernel is autotuned over a small config set, pruned to the call's family (16-bit dense,
16-bit NF4, fp32) and by M, cached by Triton's autotuner per (M bucket = next power of two, N, K, rank chunk,
variant, dtypes). ``LORA_OPS_TRITON_AUTOTUNE=0`` skips benchmarking and takes the first config that survives
pruning (the largest tile that fits M). Under ``TRITON_INTERPRET=1`` one small config per kernel keeps CPU tests
fast.

``_Kernel`` launches one kernel with its configs, keeps the compiled kernel per argument specialisation (the
launch cache), counts launches (``records.LAUNCHES``) and, inside ``records.recording()``, records each launch for
the C++ launch path (``lora_ops._launch``).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch
import triton
from triton import knobs as _knobs

from . import records as _rec

try:  # Gluon (triton.experimental.gluon) is Triton's own and may move between releases: without it, no Gluon GEMM
    from .lora_ws_kernel import _lora_gemm_ws_kernel
except ImportError:  # pragma: no cover - Triton 3.6 has it
    _lora_gemm_ws_kernel = None
from .lora_kernels import (MIN_DOT, _lora_bwd_da_kernel, _lora_bwd_db_kernel, _lora_bwd_ds_kernel,
                           _lora_bwd_finish_kernel, _lora_gemm_kernel, _lora_gemm_tma_kernel, _lora_s_kernel)

# Read at import, as triton.jit does: the kernels already are interpreter functions or not.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:  # what Triton's own launch path uses (a C function: no Stream object per launch)
    from torch._C import _cuda_getCurrentRawStream as _current_stream
except ImportError:  # a torch without CUDA support: the launch cache never runs there
    def _current_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def _forget_launch_plans() -> None:
    launch = sys.modules.get("lora_ops._launch")  # not imported: no plans to forget
    if launch is not None:
        launch.forget_plans()


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Config families. Pruning keeps the family of the call: 16-bit dense, 16-bit NF4 (the W tile is decoded in
# registers, so a BLOCK_K of 32 on the reduction keeps it spill-free), fp32 (no tensor cores: the IEEE FMA dot
# holds both operands in registers, so tiles are small). Chosen from ptxas -v for sm_90 (registers and spills
# of every config at BLOCK_R 16 and 64); the speed work re-tunes them on the GPU.
_DENSE16, _NF4_16, _FP32 = "dense16", "nf4_16", "fp32"
_ALL = frozenset((_DENSE16, _NF4_16, _FP32))
_TAGS: Dict[int, frozenset] = {}


def _cfg(num_warps: int, num_stages: int, tags=_ALL, **blocks) -> triton.Config:
    c = triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
    _TAGS[id(c)] = frozenset(tags)
    return c


def _gemm_configs(out_name: str, red_name: str, wide_first: bool) -> List[triton.Config]:
    # With autotuning off the first survivor of pruning is used: largest first, except that the dX kernel's
    # 128x256 tile spills (240 B, ptxas) and goes second. 128x256x64 / 8 warps / 3 stages was the best
    # plain-Triton bf16 forward config of a GEMM probe on the H200.
    wide, square = (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)
    families = (
        (_DENSE16, ((wide, square) if wide_first else (square, wide))
         + ((64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 64, 4, 4))),
        (_NF4_16, ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3), (32, 64, 32, 4, 3),
                   (16, 64, 32, 4, 3))),
        (_FP32, ((64, 64, 16, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2))),
    )
    return [_cfg(w, s, (fam,), BLOCK_M=bm, GROUP_M=8, **{out_name: bo, red_name: br})
            for fam, shapes in families for bm, bo, br, w, s in shapes]


def _row_configs(other: str, fp32_small: bool, extra=()) -> List[triton.Config]:
    # Kernels with one program per row block (S, dS): BLOCK_M rows, ``other`` the tile of their inner loop.
    # dS's two fp32 FMA dots (dY @ B, dY^T @ S) spill by kilobytes at these sizes for BLOCK_R = 64: fp32 gets
    # small tiles of its own there. ``extra``: further 16-bit shapes (BLOCK_M, other, warps, stages).
    shapes = ((128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3)) + tuple(extra)
    tags = (_DENSE16, _NF4_16) if fp32_small else _ALL
    out = [_cfg(w, s, tags, BLOCK_M=bm, **{other: bo}) for bm, bo, w, s in shapes]
    if fp32_small:
        out += [_cfg(w, s, (_FP32,), BLOCK_M=bm, **{other: bo})
                for bm, bo, w, s in ((32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2))]
    return out


def _reduce_configs(other: str, fp32_small: bool) -> List[triton.Config]:
    # Kernels that reduce over M inside a program (dA, deterministic dB): BLOCK_M is their reduction tile.
    # dA's (BLOCK_R, BLOCK_K) fp32 FMA dot spills at these sizes: it gets one small fp32 config of its own.
    shapes = ((128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3))
    tags = (_DENSE16, _NF4_16) if fp32_small else _ALL
    out = [_cfg(w, s, tags, BLOCK_M=bm, **{other: bo}) for bm, bo, w, s in shapes]
    if fp32_small:
        out.append(_cfg(4, 2, (_FP32,), BLOCK_M=32, **{other: 32}))
    return out


def _make_prune(m_is_tile: bool):
    """Keep the configs of the call's family (fp32 / 16-bit NF4 / 16-bit dense) and, where BLOCK_M tiles M,
    drop those whose BLOCK_M is far above M (a decode batch in a 128-row tile wastes the tile)."""
    def prune(configs, named_args, **kwargs):
        m = int(named_args["M"])
        elt = next(v.element_size() for k, v in named_args.items() if k.endswith("_ptr") and hasattr(v, "dtype"))
        nf4 = bool(kwargs.get("IS_NF4", named_args.get("IS_NF4", False)))
        fam = _FP32 if elt == 4 else (_NF4_16 if nf4 else _DENSE16)
        mine = [c for c in configs if fam in _TAGS.get(id(c), _ALL)] or list(configs)
        cap = max(MIN_DOT, _next_pow2(m))
        kept = [c for c in mine if not m_is_tile or c.kwargs["BLOCK_M"] <= cap]
        return kept or [min(mine, key=lambda c: c.kwargs["BLOCK_M"])]
    return prune


# The launch cache calls CompiledKernel.run with the argument layout of triton 3.6 (checked there on the H200);
# other Triton versions keep Triton's own launch path unless LORA_OPS_LAUNCH_CACHE=1 asks for it (=0 turns it
# off everywhere).
_LAUNCH_CACHE = os.environ.get("LORA_OPS_LAUNCH_CACHE",
                               "1" if triton.__version__.split(".")[:2] == ["3", "6"] else "0") not in ("", "0")


def _hooked(hook) -> bool:
    """Whether a Triton launch hook has listeners (a HookChain in triton 3.6; None or a callable elsewhere)."""
    return bool(getattr(hook, "calls", hook))


class _Kernel:
    """A Triton kernel with its config set: autotuned on CUDA, one fixed config under the interpreter.

    ``forced`` (a triton.Config) bypasses tuning; tests use it to check that every config computes the same.

    Launch cache: Triton's own launch path (autotuner key, argument binding and specialisation, cache lookup)
    cost ~100 us of host time per launch on the H200 host (scripts/host_profile.py, 2026-11-29: 517 us for the
    five launches of a 2048x4096 fwd+bwd, against ~250 us of device time), which made every layer below
    M=8192 host-bound. After the first launch of a given (argument specialisation, autotune key, constexprs),
    the compiled kernel and its config are kept here and later launches call the compiled launcher directly.
    The cache key covers everything Triton specialises on (each tensor's dtype and 16-byte alignment, each
    integer's width, ==1 and %16) plus the values of the autotune key and the constexprs, so it never picks
    a kernel compiled for other arguments.
    """

    def __init__(self, fn, name: str, configs: List[triton.Config], key: Optional[List[str]], prune,
                 interp_config: Optional[triton.Config], reset_to_zero: Optional[List[str]] = None):
        self.fn, self.name, self.configs, self.prune = fn, name, configs, prune
        self.interp_config = interp_config
        self._forced: Optional[triton.Config] = None
        self.tuned = None
        self._launches: Dict[tuple, tuple] = {}
        # Positions of integer arguments whose value (not only its specialisation) selects the config.
        self._by_value = frozenset(i for i, a in enumerate(fn.arg_names) if a in (key or ()))
        if not _INTERPRET and key is not None:  # key None: every call passes _config
            self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                         reset_to_zero=reset_to_zero)(fn)

    def _fixed(self, args, meta) -> triton.Config:
        named = dict(zip(self.fn.arg_names, args))
        named.update(meta)
        return self.prune(self.configs, named)[0]

    def _launch_key(self, args, meta, tuning: bool, config=None) -> tuple:
        spec = []
        by_value = self._by_value
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                spec.append((a.dtype, a.data_ptr() % 16 == 0))
            elif type(a).__name__ == "TensorDescriptor":  # TMA: specialised on dtype and block shape
                spec.append((a.base.dtype, tuple(a.block_shape), a.padding))
            elif type(a) is int and i not in by_value:
                spec.append((a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF))
            elif type(a) is float:
                spec.append(float)
            else:
                spec.append(a)
        return (tuning, torch.cuda.current_device(), tuple(spec), tuple(meta.items()), config)

    @property
    def forced(self) -> Optional[triton.Config]:
        return self._forced

    @forced.setter
    def forced(self, config: Optional[triton.Config]) -> None:
        # The C++ launch path keeps the configs it was shown: a new forced config must be shown to it again.
        self._forced = config
        _forget_launch_plans()

    def __call__(self, grid, *args, _config: Optional[tuple] = None, **meta):
        """Launch; ``_config`` = (blocks dict, num_warps, num_stages) fixes the config of this call (the TMA
        kernel, whose descriptors' block shapes are made for it), else autotuning / pruning picks it."""
        _rec.LAUNCHES.bump(self.name)
        if _config is not None:
            cfg = triton.Config(_config[0], num_warps=_config[1], num_stages=_config[2])
        else:
            cfg = self.forced or (self.interp_config if _INTERPRET else None)
        if _INTERPRET or (cfg is not None and _config is None):
            kernel = self.fn[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            self._record(grid, args, meta, cfg, kernel)
            return
        tuning = _config is None and os.environ.get("LORA_OPS_TRITON_AUTOTUNE", "1") not in ("", "0")
        key = self._launch_key(args, meta, tuning, None if _config is None else str(_config))
        hit = self._launches.get(key)
        if hit is not None:
            kernel, named, tail = hit
            g = grid(named)
            g0, g1, g2 = g[0], (g[1] if len(g) > 1 else 1), (g[2] if len(g) > 2 else 1)
            if _rec.RECORDS is not None:
                _rec.RECORDS.append(_rec.Record(self.name, self.fn, (g0, g1, g2), args, named, kernel))
            if g0 * g1 * g2 == 0:
                return
            stream = _current_stream(key[1])
            full = args + tail
            enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
            if _hooked(enter) or _hooked(leave):  # a profiler (e.g. proton) listens: give it what Triton gives
                kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata,
                           kernel.launch_metadata(g, stream, *full), enter, leave, *full)
            else:
                kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *full)
            return
        if tuning:
            kernel = self.tuned[grid](*args, **meta)
            cfg = self.tuned.best_config
        else:
            cfg = cfg or self._fixed(args, meta)
            kernel = self.fn[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if hasattr(kernel, "result"):
            kernel = kernel.result()
        self._record(grid, args, meta, cfg, kernel)
        if not _LAUNCH_CACHE or kernel is None or not hasattr(kernel, "run"):
            return  # keep Triton's own launch path
        named = dict(meta)
        named.update(cfg.kwargs)
        names = self.fn.arg_names
        if all(n in named for n in names[len(args):]):
            self._launches[key] = (kernel, named, tuple(named[n] for n in names[len(args):]))

    def _record(self, grid, args, meta, cfg, kernel) -> None:
        if _rec.RECORDS is not None:
            named = dict(meta)
            named.update(cfg.kwargs)
            named.setdefault("num_warps", cfg.num_warps)
            _rec.record(self.name, self.fn, grid, args, named, kernel)


_GEMM_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "TRANS_W", "IS_NF4", "NESTED", "BLOCKSIZE", "HAS_BIAS",
             "HAS_DROPOUT"]

# Interpreter configs: few programs (the interpreter pays per program and per loop trip) but still several M, N
# and K tiles on the CPU tests' shapes, so masks, atomics across M tiles and tile loops are all exercised.
_S_KERNEL = _Kernel(_lora_s_kernel, "lora_s", _row_configs("BLOCK_K", False),
                    ["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"], _make_prune(True), _cfg(4, 1, BLOCK_M=32, BLOCK_K=64))
# The forward and dX GEMMs are one kernel (TRANS_W) with two config lists: the dX GEMM's 128x256 tile spills
# (240 B, ptxas) and goes second; each keeps its own autotuning cache and launch counter.
_FWD_KERNEL = _Kernel(_lora_gemm_kernel, "lora_fwd", _gemm_configs("BLOCK_N", "BLOCK_K", True), _GEMM_KEY,
                      _make_prune(True),
                      _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2))
# dS also gets the tiles that were fastest with N in slices at 8192 rows (scripts/probe_ds.py: 128 x 128 for
# r = 16, 256 x 64 for r = 32 and 48; fewer dB atomics per row than 64-row tiles).
_DS_KERNEL = _Kernel(_lora_bwd_ds_kernel, "lora_bwd_ds", _row_configs("BLOCK_N", True, ((128, 128, 8, 3),
                                                                                        (256, 64, 8, 3))),
                     ["M_BUCKET", "N", "BLOCK_R", "DO_DB", "DO_DBIAS"], _make_prune(True),
                     _cfg(4, 1, BLOCK_M=32, BLOCK_N=32), reset_to_zero=["db_acc_ptr", "dbias_acc_ptr"])
_DB_KERNEL = _Kernel(_lora_bwd_db_kernel, "lora_bwd_db", _reduce_configs("BLOCK_N", False),
                     ["M_BUCKET", "N", "BLOCK_R", "DO_DB", "DO_DBIAS"], _make_prune(False),
                     _cfg(4, 1, BLOCK_M=32, BLOCK_N=32))
_DX_KERNEL = _Kernel(_lora_gemm_kernel, "lora_bwd_dx", _gemm_configs("BLOCK_N", "BLOCK_K", False), _GEMM_KEY,
                     _make_prune(True),
                     _cfg(4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2))
_DA_KERNEL = _Kernel(_lora_bwd_da_kernel, "lora_bwd_da", _reduce_configs("BLOCK_K", True),
                     ["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"], _make_prune(False),
                     _cfg(4, 1, BLOCK_M=32, BLOCK_K=64))

# (first M it serves, blocks, num_warps, num_stages): _tma_gemm passes its choice with each call (the descriptors'
# block shapes are made for it), so this kernel has no autotuner, pruning or interpreter config of its own.
# GROUP_M 8: 4 and 16 were no faster in the 8192-row layers' CUDA-graph replay on the H200 (PERF_NOTES item 23).
_TMA_CONFIGS = ((128, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), 8, 3),
                (0, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 4, 4))


def _tma_tile(spec: str):
    """``LORA_OPS_TMA_TILE`` = "BMxBNxBK/warps/stages" (e.g. "256x128x64/8/3"): the large TMA config, for A/B
    timings of the tile without editing this file (read at import, as the launch plans keep what they saw)."""
    try:
        blocks, warps, stages = spec.split("/")
        bm, bn, bk = (int(v) for v in blocks.lower().split("x"))
        warps, stages = int(warps), int(stages)
    except ValueError:
        raise ValueError(f"LORA_OPS_TMA_TILE={spec!r}: use BMxBNxBK/warps/stages, e.g. 128x256x64/8/3") from None
    # BM >= 128: the C++ launch path tells the large config from the small one by BLOCK_M (tma_small_m).
    if bm < 128 or min(bn, bk) < 16 or any(v & (v - 1) for v in (bm, bn, bk)) or warps not in (4, 8) or stages < 1:
        raise ValueError(f"LORA_OPS_TMA_TILE={spec!r}: BM >= 128, BN and BK >= 16, each a power of two; "
                         "4 or 8 warps; 1 or more stages")
    return ((128, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), warps, stages),) + _TMA_CONFIGS[1:]


if os.environ.get("LORA_OPS_TMA_TILE", "").strip():
    _TMA_CONFIGS = _tma_tile(os.environ["LORA_OPS_TMA_TILE"].strip())
_TMA_KERNEL = _Kernel(_lora_gemm_tma_kernel, "lora_gemm_tma", [], None, None, None)
# The warp-specialized Gluon twin on sm_90 (lora_ws_kernel.py): one fixed config, passed with each call (WS_CONFIG).
# 3 stages: 4 (with the output tile stored in halves, 229.6 KB of shared memory) were no faster on an H100
# (scripts/probe_gluon.py, docs/PERF_NOTES.md item 48).
_WS_KERNEL = (_Kernel(_lora_gemm_ws_kernel, "lora_gemm_ws", [], None, None, None)
              if _lora_gemm_ws_kernel is not None else None)
WS_CONFIG = (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, STAGES=3, LOAD_REGS=40), 8, 1)
# 8 consumer warps + the producer's warpgroup = 12 warps: 168 x 384 threads fit the SM's 65536 registers, and
# setmaxnreg gives the consumers 240 each (their 128 x 256 fp32 accumulator is 128 a thread), the producer 40.
WS_MAXNREG = 168
# An elementwise pass over a few hundred KB: one fixed config, passed with each call (FINISH_CONFIG).
_FINISH_KERNEL = _Kernel(_lora_bwd_finish_kernel, "lora_bwd_finish", [], None, None, None)
FINISH_CONFIG = (dict(BLOCK_N=1024), 4, 1)

# Every kernel with its configs, for tests that run each config.
KERNELS: Dict[str, _Kernel] = {k.name: k for k in (_S_KERNEL, _FWD_KERNEL, _DS_KERNEL, _DB_KERNEL, _DX_KERNEL,
                                                    _DA_KERNEL)}
