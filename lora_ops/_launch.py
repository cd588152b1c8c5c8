"""The launch path of the fused layer: forward and backward each cross from Python into C++ once.

    lora_linear (eager, CUDA)  ->  lora_ops._C.launch_linear  (csrc/lora_launch.cpp: checks, outputs, launches,
                                                               and the autograd Function, all in C++)
    lora_ops::lora_fwd / lora_bwd on CUDA (torch.compile, dispatch modes)  ->  lora_forward / lora_backward here
                                                               ->  lora_ops._C.launch_fwd / launch_bwd

The kernels stay Triton's: the C++ side launches the functions Triton compiled. It knows a kernel only after the
Python launchers (triton_kernels/lora.py) have run a call of that configuration: a call the C++ side has no plan
for ("a miss") runs the Python launchers inside ``records.recording()`` (compiling and autotuning as before), the
records are registered, and the C++ side's own launch list for the same call (a dry run) must equal the records
argument by argument before it launches any of them; if it ever differs, that configuration stays on the Python
launchers for the rest of the process (a warning says so; ``LORA_OPS_LAUNCH_STRICT=1`` raises instead, as the
GPU tests do). ``LORA_OPS_LAUNCH=python`` keeps everything on the Python launchers.

Without the compiled extension, without Triton or on CPU tensors nothing here runs: ``lora_linear`` takes its
general path (the Python launchers through ``ops._EagerLoRA``, or the reference).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from . import _backend
from .nf4 import NF4Weight

_lock = threading.Lock()
_module = None  # lora_ops._C (or the JIT-built module) once loaded and configured
_state = "new"  # "new": not tried; "ready"; "unavailable"
_devices: Dict[int, bool] = {}
_warned: set = set()
_decode_max = 0  # the decode path's largest M (decode.py), or 0 where its kernel does not load
_any_device = False  # use_module(..., any_device=True): the CPU test build takes CPU tensors (its *_call entries)

# Argument type codes shared with csrc/lora_launch.cpp (ArgSpec::code).
_CODES = {"i32": "i", "i64": "l", "u64": "u", "fp32": "f", "constexpr": "c"}


def _strict() -> bool:
    return os.environ.get("LORA_OPS_LAUNCH_STRICT", "0") not in ("", "0")


_sent: Optional[dict] = None  # the launcher settings the C++ side holds


def _settings() -> dict:
    """The Python launchers' constants the C++ side mirrors (read again on every miss: tests change some)."""
    from . import nf4 as _nf4
    from .triton_kernels import lora as L
    from .triton_kernels import nf4_dequant as DQ

    return dict(max_stride=L._MAX_STRIDE, min_dot=L._MIN_DOT, max_block_r=L._MAX_BLOCK_R,
                dequant_min_m=L.NF4_DEQUANT_MIN_M, tma_min_m=L._TMA_MIN_M, tma_min_nk=L._TMA_MIN_NK,
                tma_min_mnk=L._TMA_MIN_MNK, tma_small_m=L._TMA_CONFIGS[0][0], nested_blocksize=_nf4.NESTED_BLOCKSIZE,
                dq_bytes_per_program=DQ.BYTES_PER_PROGRAM, split_unit=L._SPLIT_UNIT,
                split_unit_interp=L._SPLIT_UNIT_INTERP, max_inner_splits=L._MAX_INNER_SPLITS, split_max_m=L._SPLIT_MAX_M,
                split_sum_max_m=L._SPLIT_SUM_MAX_M, ds_splits=L._DS_SPLITS,
                atomic_db_max_m=L._ATOMIC_DB_MAX_M,
                nf4_chunk_bytes=L.NF4_CHUNK_BYTES, nf4_chunk_min_m=L.NF4_CHUNK_MIN_M,
                dequant_on_cpu=int(L._DEQUANT_ON_CPU),
                finish_kernel=int(L._FINISH_KERNEL),
                base_mm=int(L._BASE_MM),
                presum=int(L._PRESUM),
                ds_members=int(L._DS_MEMBERS),
                side_da=int(L._SIDE_DA),
                side_dq=int(L._SIDE_DQ),
                ws=int(L._WS), ws_block_m=L.WS_CONFIG[0]["BLOCK_M"],
                ws_block_n=L.WS_CONFIG[0]["BLOCK_N"],
                blocksizes=list(_nf4.VALID_BLOCKSIZES))


def _sync_settings(mod) -> None:
    """Send the launchers' settings if they changed since last sent; plans made under others are dropped."""
    global _sent
    now = _settings()
    if now != _sent:
        if _sent is not None:
            mod.launch_clear()
        mod.launch_configure(now)
        _sent = now


def _configure(mod) -> None:
    global _sent
    _sent = None
    _sync_settings(mod)
    mod.launch_set_fallback(_fallback)


def module():
    """The loaded extension module with the launch entry points, or None (not built, no CUDA, no Triton)."""
    global _module, _state, _decode_max
    if _state == "new":
        with _lock:
            if _state == "new":
                _state = "unavailable"
                # Whether the Triton kernels load, whatever backend is asked for right now (that is per call).
                triton_ok = _backend._load(_backend.IMPLEMENTATIONS["lora_fwd"][0][1]) is not None
                if torch.cuda.is_available() and triton_ok:
                    try:
                        from . import _ext
                        mod = _ext.module()
                    except ImportError:
                        mod = None
                    if mod is not None and hasattr(mod, "launch_linear") and mod.launch_has_cuda:
                        _configure(mod)
                        from . import decode as _decode
                        # Whether the decode kernel loads, whatever backend is asked for now (linear() applies
                        # the backend per call).
                        decode_ok = _backend._load(_backend.IMPLEMENTATIONS["lora_decode"][0][1]) is not None
                        _decode_max = _decode.decode_threshold() if decode_ok else 0
                        _module, _state = mod, "ready"
    return _module


def use_module(mod, any_device: bool = False) -> None:
    """Use ``mod`` (a build of csrc/lora_launch.cpp) as the C++ side: the CPU tests' dry-run module. With
    ``any_device`` lora_linear and the projection groups hand CPU tensors to it as well (its ``launch_*_call``
    entries), so that under LORA_OPS_LAUNCH_NOOP=1 a model's whole eager host path runs on a CPU without launches
    (scripts/host_model_cpu.py)."""
    global _module, _state, _any_device
    _configure(mod)
    _module, _state, _any_device = mod, "ready", any_device
    _devices.clear()


def takes(x: torch.Tensor) -> bool:
    """Whether lora_linear and the projection groups offer ``x``'s call to the C++ side (CUDA tensors; any with
    ``use_module(..., any_device=True)``)."""
    return x.is_cuda or _any_device


def launch_counts() -> Dict[str, int]:
    """Launches per kernel name made by the C++ side (empty before it is loaded)."""
    return _module.launch_stats()["launches"] if _module is not None else {}


def forget_plans() -> None:
    """Drop every registered kernel (a changed config or setting must be registered again)."""
    if _module is not None:
        _module.launch_clear()


def _ensure_device(device: torch.device) -> bool:
    """Hand the C++ side the per-device tensors the Python launchers use (scratch, NF4 codebook) and the SM
    count; True when this call did it (so a call the C++ side refused for lack of them may be retried)."""
    index = device.index if device.type == "cuda" else -1
    if index is None:
        index = torch.cuda.current_device()
        device = torch.device("cuda", index)
    if _devices.get(index):  # the common case, first: linear() asks on every call it hands back
        return False
    from . import nf4 as _nf4
    from .triton_kernels import lora as L
    from .triton_kernels import nf4_dequant as DQ

    # Made here, in memory of their own, unless a launcher made them already (see csrc persistent()).
    if device not in L._SCRATCH:
        L._SCRATCH[device] = _module.launch_persistent(index, torch.zeros(16, dtype=torch.float32))
    if device not in DQ._CODEBOOKS:
        DQ._CODEBOOKS[device] = _module.launch_persistent(index, _nf4.nf4_codebook("cpu").float())
    major = torch.cuda.get_device_capability(index)[0] if device.type == "cuda" else 9
    _module.launch_set_device(index, L._scratch(device), DQ._codebook(device), L._sm_count(device), major)
    _devices[index] = True
    return True


# --------------------------------------------------------------------------------------------- entry points

def _prepare(weight, dropout_p, training):
    """What both entries below pass to C++ besides the adapters: (module, weight arguments, p, decode bound), or
    None when the general path must take the call (no C++ side, a dispatch mode or torch.compile, the reference
    backend, an argument of another type)."""
    mod = _module if _state == "ready" else module()
    if mod is None or _backend.op_required():
        return None
    backend = _backend.requested_backend()
    if backend == "reference" or type(dropout_p) not in (float, int):
        return None
    if type(weight) is NF4Weight:
        wargs = (*weight.tensors(), weight.blocksize, weight.shape[0], weight.shape[1])
    elif isinstance(weight, torch.Tensor):
        wargs = (weight, None, None, None, None, 0, 0, 0)
    else:
        return None
    p = float(dropout_p) if training else 0.0
    # Calls the decode path takes (decode.use_decode) come back as None; forcing triton turns that path off.
    return mod, wargs, p, 0 if backend == "triton" else _decode_max


def linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training):
    """lora_linear's eager path through C++: y with autograd, or None when the general path must take the call
    (the cases of ``_prepare``, bad input, the decode path)."""
    prep = _prepare(weight, dropout_p, training)
    if prep is None or type(scaling) not in (float, int):
        return None
    if not (isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))):
        return None
    mod, wargs, p, decode_max = prep
    args = (x, *wargs, lora_A, lora_B, float(scaling), bias, p, decode_max)
    if _any_device:
        return mod.launch_linear_call(*args, True)
    y = mod.launch_linear(*args)
    if y is None and x.is_cuda and _ensure_device(x.device):
        y = mod.launch_linear(*args)
    return y


def group(x, weight, lora_As, lora_Bs, scalings, bias, dropout_p, training):
    """A projection group's eager path through C++ (grouped.py): the members' outputs, each with autograd, from
    one forward over the stacked base (``weight``: (sum N_i, K) tensor or NF4Weight) and one backward; or None
    when the general path must take the call (the cases of ``linear``). ``bias``: the members' biases
    concatenated, or None."""
    prep = _prepare(weight, dropout_p, training)
    if prep is None:
        return None
    mod, wargs, p, decode_max = prep
    args = (x, *wargs, lora_As, lora_Bs, [float(s) for s in scalings], bias, p, decode_max)
    if _any_device:
        return mod.launch_group_call(*args, True)
    ys = mod.launch_group(*args)
    if ys is None and x.is_cuda and _ensure_device(x.device):
        ys = mod.launch_group(*args)
    return ys


def lora_forward(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
                 dropout_p, seed):
    """The triton backend's ``lora_ops::lora_fwd``: (y, S), launched from C++ where it has a plan."""
    args = (x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, float(scaling), bias,
            float(dropout_p), seed, [])  # []: no projection group (the C++ entries' and the launchers' last argument)
    mod = module() if x.is_cuda else None
    if mod is not None:
        res = mod.launch_fwd(*args, False)
        if type(res) is tuple:
            return res
        return _python_launch(0, res, args)
    from .triton_kernels import lora as L
    return L.lora_forward(*args)


def lora_backward(dy, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, s, scaling,
                  dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
    """The triton backend's ``lora_ops::lora_bwd``: (dx, dA, dB, dbias), 0-element tensors for gradients not
    asked for, launched from C++ where it has a plan."""
    args = (dy, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, s, float(scaling),
            float(dropout_p), seed, bool(need_dx), bool(need_dA), bool(need_dB), bool(need_dbias), [])
    mod = module() if x.is_cuda else None
    if mod is not None:
        res = mod.launch_bwd(*args, False)
        if type(res) is not tuple:
            return _python_launch(1, res, args)
        # A custom op may not return one tensor twice: one 0-element tensor per gradient not asked for.
        return tuple(g if g is not None else dy.new_empty((0,)) for g in res)
    from .triton_kernels import lora as L
    return L.lora_backward(*args)


# What must import for these to run (lora_ops._backend loads it with them): the kernels and their launchers.
lora_forward.requires = lora_backward.requires = ("lora_ops.triton_kernels.lora",)


def _fallback(phase: int, plan: int, *args):
    """Called by the C++ side (with the GIL) for a call it could not launch: the Python launchers run it."""
    return _python_launch(phase, plan, args)


# -------------------------------------------------------------------------------------------- registration

def _entry(mod, phase: int):
    return mod.launch_fwd if phase == 0 else mod.launch_bwd


def _python_launch(phase: int, plan: int, args: tuple):
    """Run one forward (phase 0) or backward (1) on the Python launchers; on a miss (``plan`` >= 0) record the
    launches and register them with the C++ side."""
    from .triton_kernels import lora as L

    launcher = L.lora_forward if phase == 0 else L.lora_backward
    x = args[0] if phase == 0 else args[1]
    mod = _module
    if mod is None or not x.is_cuda:
        return launcher(*args)
    # The C++ side answered without this device's tensors, or under settings since changed: ask it again.
    fresh = _ensure_device(x.device)
    if _settings() != _sent:
        _sync_settings(mod)
        fresh = True
    if fresh:
        res = _entry(mod, phase)(*args, True)
        plan = res[0] if type(res) is tuple else -1
    if plan < 0:
        return launcher(*args)
    with L.recording() as records:
        out = launcher(*args)
    _register(mod, phase, plan, args, list(records))
    return out


def _register(mod, phase: int, plan: int, args: tuple, records: List) -> bool:
    variants, problems = [], []
    for rec in records:
        v = _variant(rec, problems)
        if v is not None:
            variants.append(v)
    mod.launch_add_variants(plan, variants)
    dry = _entry(mod, phase)(*args, True)
    if type(dry) is not tuple:
        problems.append("the C++ side refused the call it had asked to register")
    else:
        problems += compare(dry[1], records, _inputs(phase, args))
    ok = not problems
    mod.launch_set_verified(plan, ok)
    if not ok:
        what = (f"lora_ops: the C++ launch path keeps the {'forward' if phase == 0 else 'backward'} of this "
                f"configuration on the Python launchers: " + "; ".join(problems[:4]))
        if _strict():
            raise AssertionError(what)
        if what not in _warned:
            _warned.add(what)
            warnings.warn(what, stacklevel=3)
    return ok


def _inputs(phase: int, args: tuple) -> set:
    """Addresses of the call's own tensors and the per-device tensors: pointer arguments the C++ side must pass
    unchanged (anything else is an allocation of the call)."""
    from .triton_kernels import lora as L
    from .triton_kernels import nf4_dequant as DQ

    x = args[0] if phase == 0 else args[1]
    # A group's backward may take dY as a list of the members' tensors.
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))]
    ptrs = {t.data_ptr() for t in flat if isinstance(t, torch.Tensor)}
    ptrs.add(L._scratch(x.device).data_ptr())
    ptrs.add(DQ._codebook(x.device).data_ptr())
    return ptrs


def _spec(fn, i: int, arg):
    """(code, divisible by 16, specialised) of positional argument ``i`` as Triton specialises it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if hasattr(fn, "params"):  # a JITFunction
        kp = fn.params[i]
        is_const, specialize, align = kp.is_const, not kp.do_not_specialize, not kp.do_not_specialize_on_alignment
    else:  # the interpreter's InterpretedFunction keeps the decorator's arguments
        name = fn.arg_names[i]
        dns = fn.kwargs.get("do_not_specialize") or ()
        dnsa = fn.kwargs.get("do_not_specialize_on_alignment") or ()
        is_const, specialize, align = False, name not in dns and i not in dns, name not in dnsa and i not in dnsa
    ty, attr = native_specialize_impl(BaseBackend, arg, is_const, specialize, align)
    if ty.startswith("*"):
        code = "P"
    elif ty.startswith("tensordesc"):
        code = "T"
    else:
        code = _CODES.get(ty)
    return (code, attr == "D", specialize), ty


def _variant(rec, problems: List[str]):
    """The C++ registration tuple of one record, or None (noted in ``problems``) when the C++ side cannot launch
    that kernel the way Triton would."""
    specs, types = [], []
    for i, a in enumerate(rec.args):
        spec, ty = _spec(rec.fn, i, a)
        if spec[0] is None:
            problems.append(f"{rec.name}: argument {i} has type {ty}")
            return None
        specs.append(spec)
        types.append(ty)
    named = rec.named
    blocks = tuple(int(named.get(k, 0)) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NB"))
    kernel = rec.kernel
    if kernel is None:  # the interpreter: nothing to launch, only argument lists to compare
        tma = [(0, a.base.element_size(), 0, *a.block_shape) for a in rec.args
               if type(a).__name__ == "TensorDescriptor"]
        return (rec.name, specs, 0, int(named.get("num_warps", 4)), 0, blocks, tma)
    md = kernel.metadata
    compiled = list(kernel.src.signature.values())[:len(rec.args)]
    if compiled != types:
        problems.append(f"{rec.name}: compiled signature {compiled} != {types}")
        return None
    if (getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False)
            or getattr(md, "launch_pdl", False) or getattr(md, "global_scratch_size", 0)
            or getattr(md, "profile_scratch_size", 0)):
        problems.append(f"{rec.name}: needs launch features the C++ side does not set (clusters, scratch, PDL)")
        return None
    tma = []
    if "T" in (s[0] for s in specs):
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        meta = getattr(md, "tensordesc_meta", None)
        if not meta or any(m is None or m.get("fp4_padded") for m in meta):
            problems.append(f"{rec.name}: TMA descriptors without host metadata")
            return None
        tma = [(int(m["swizzle"]), int(m["elem_size"]), int(TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]]),
                int(m["block_size"][0]), int(m["block_size"][1])) for m in meta]
    kernel._init_handles()
    return (rec.name, specs, int(kernel.function), int(md.num_warps), int(md.shared), blocks, tma)


def compare(launches: Sequence, records: Sequence, inputs: set) -> List[str]:
    """Differences between the C++ dry run's launch list and the Python launchers' records (empty: equal).

    Pointers to the call's inputs must be equal; a pointer to anything else is an allocation of the call and
    must be one on both sides. Ints, floats, grids and TMA descriptors' shapes, strides and tiles must be equal."""
    problems = []
    if len(launches) != len(records):
        return [f"{len(launches)} launches in C++, {len(records)} in Python "
                f"({[l[0] for l in launches]} vs {[r.name for r in records]})"]
    for (name, grid, args), rec in zip(launches, records):
        where = f"{rec.name}"
        if name != rec.name:
            problems.append(f"kernel {name} in C++ where Python launched {rec.name}")
            continue
        if tuple(grid) != tuple(rec.grid):
            problems.append(f"{where}: grid {tuple(grid)} != {tuple(rec.grid)}")
        if len(args) != len(rec.args):
            problems.append(f"{where}: {len(args)} arguments != {len(rec.args)}")
            continue
        for i, (c, p) in enumerate(zip(args, rec.args)):
            if isinstance(p, torch.Tensor):
                ok = isinstance(c, tuple) and c[0] == "P" and _same_ptr(c[1], p.data_ptr(), inputs)
            elif type(p).__name__ == "TensorDescriptor":
                ok = (isinstance(c, tuple) and c[0] == "T" and _same_ptr(c[1], p.base.data_ptr(), inputs)
                      and tuple(c[2:4]) == tuple(p.shape) and tuple(c[4:6]) == tuple(p.strides)
                      and tuple(c[6:8]) == tuple(p.block_shape))
            elif type(p) is float:
                ok = type(c) is float and c == p
            else:
                ok = type(c) is int and c == p
            if not ok:
                problems.append(f"{where}: argument {i} is {c!r} in C++, {_show(p)} in Python")
    return problems


def _same_ptr(cpp: int, py: int, inputs: set) -> bool:
    return cpp == py if py in inputs else cpp not in inputs


def _show(a) -> str:
    if isinstance(a, torch.Tensor):
        return f"tensor{tuple(a.shape)}@{a.data_ptr():#x}"
    return repr(a)
