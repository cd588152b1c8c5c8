"""GPU probe: a warp-specialized persistent GEMM in Gluon (sm_90) against cuBLAS and the TMA GEMM of the layer.

The q/k/v group's gap at 8192 rows is mostly its TMA GEMMs' mainloop and per-tile overhead against cuBLAS's
warp-specialized kernel (docs/PERF_NOTES.md items 45-46): Triton 3.6 does not warp-specialize
``_lora_gemm_tma_kernel`` on sm_90. Gluon (``triton.experimental.gluon``) writes the partitions by hand: one
producer warp issues every TMA load into a ring of ``STAGES`` buffers, running ahead across tiles (the next tile's
operands arrive while this tile's epilogue runs); two consumer warpgroups (the default partition, 8 warps) run
``warpgroup_mma`` on a 128 x 256 tile and store it through TMA.

The LoRA term rides in the same ring as one more K step at the start of each tile: the producer loads S (M, R)
through a [BLOCK_M, BLOCK_K] box and the LoRA up matrix through the weight's box (R <= BLOCK_K, the columns past R
zero-filled by TMA or by padding), the consumer multiplies them first, scales the accumulator by s and goes on with
the K loop. That is y = s * S @ B^T + x @ W^T for the forward (W (N, K) read K-major) and dX = s * dS @ A + dY @ W
for the dX GEMM (W (N, K) read row-major as the (K_dim, N_out) operand).

Variants, device time per launch (each launch captured in a CUDA graph, ``--calls`` replays per timing, the
variants in ``--rounds`` interleaved rounds, median):

- ``cublas``: torch.mm, no LoRA term (the floor's product);
- ``tma``: the layer's ``_lora_gemm_tma_kernel`` with its seed, as the layer launches it;
- ``ws``: the Gluon kernel with the seed through zero-filled boxes over S and B as they are (R columns);
- ``ws_pad``: the same over copies of S and B padded to BLOCK_K columns;
- ``ws_r0``: the Gluon kernel without the seed (its mainloop against cuBLAS);
- ``ws4``: four stages with the output stored in two halves (the shared memory of four stages).

    python scripts/probe_gluon.py [--shapes fwd:8192x4096x6144x48,dx:8192x6144x4096x48] [--rounds 7]
    python scripts/probe_gluon.py --compile-only   # no GPU: compile every variant for sm_90, print smem and regs
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))


@gluon.jit
def _tile(t, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    # The layer's raster: GROUP_M row blocks share each column block, so W's tiles stay in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % size_m
    pid_n = (t % per_group) // size_m
    return pid_m, pid_n


@gluon.jit
def _ws_load(a_desc, b_desc, s_desc, l_desc, a_bufs, b_bufs, empty, ready, M, N, K,
             HAS_SEED: gl.constexpr, B_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr):
    """Producer (one warp): every tile's [seed,] K steps into the ring, waiting on each slot's ``empty``."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0] if B_KMAJOR else b_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    NBYTES: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    i = 0
    for t in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(t, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        if HAS_SEED:
            slot = i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), NBYTES)
            tma.async_copy_global_to_shared(s_desc, [off_m, 0], ready.index(slot), a_bufs.index(slot))
            if B_KMAJOR:
                tma.async_copy_global_to_shared(l_desc, [off_n, 0], ready.index(slot), b_bufs.index(slot))
            else:
                tma.async_copy_global_to_shared(l_desc, [0, off_n], ready.index(slot), b_bufs.index(slot))
            i += 1
        for k in range(0, K, BK):
            slot = i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), NBYTES)
            tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(slot), a_bufs.index(slot))
            if B_KMAJOR:
                tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(slot), b_bufs.index(slot))
            else:
                tma.async_copy_global_to_shared(b_desc, [k, off_n], ready.index(slot), b_bufs.index(slot))
            i += 1


@gluon.jit
def _operand_b(b_bufs, slot, B_KMAJOR: gl.constexpr):
    if B_KMAJOR:
        return b_bufs.index(slot).permute((1, 0))
    else:
        return b_bufs.index(slot)


@gluon.jit
def _ws_mma(a_bufs, b_bufs, empty, ready, c_desc, c_smem, M, N, K, scaling,
            HAS_SEED: gl.constexpr, B_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr, EPI_SPLIT: gl.constexpr,
            num_warps: gl.constexpr):
    """Consumers (the default partition, two warpgroups): the tile's MMAs, one in flight, each slot released
    once the MMA after it is issued and it has finished; then the epilogue through TMA."""
    BM: gl.constexpr = a_bufs.type.shape[1]
    BK: gl.constexpr = a_bufs.type.shape[2]
    BN: gl.constexpr = c_desc.block_type.shape[1] * EPI_SPLIT
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BN, 16])
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    i = 0
    for t in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile(t, num_pid_m, num_pid_n, GROUP_M)
        acc = gl.zeros((BM, BN), gl.float32, layout)
        if HAS_SEED:
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), _operand_b(b_bufs, slot, B_KMAJOR), acc)
            mbarrier.arrive(empty.index(slot), count=1)
            acc = acc * scaling
            i += 1
        for k in range(0, K, BK):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), _operand_b(b_bufs, slot, B_KMAJOR), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            # The MMA before this one has finished: its slot can be refilled.
            if k > 0:
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
        out = acc.to(c_desc.dtype)
        if EPI_SPLIT == 1:
            tma.store_wait(0)
            c_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN], c_smem)
        else:
            halves = out.reshape([BM, 2, BN // 2]).permute(0, 2, 1).split()
            tma.store_wait(0)
            c_smem.store(halves[0])
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN], c_smem)
            tma.store_wait(0)
            c_smem.store(halves[1])
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [pid_m * BM, pid_n * BN + BN // 2], c_smem)
    tma.store_wait(0)


@gluon.jit
def _ws_gemm_kernel(a_desc, b_desc, c_desc, s_desc, l_desc, M, N, K, scaling,
                    HAS_SEED: gl.constexpr, B_KMAJOR: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    EPI_SPLIT: gl.constexpr, LOAD_REGS: gl.constexpr, num_warps: gl.constexpr):
    """c (M, N) = [scaling * S @ L] + a (M, K) @ b, b = W^T (W (N, K), B_KMAJOR) or W (K, N); S (M, R) shares a's
    box and shared layout, L (N, R) or (R, N) b's; R <= BLOCK_K."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=1)
        mbarrier.init(ready.index(s), count=1)
    gl.warp_specialize([
        (_ws_mma, (a_bufs, b_bufs, empty, ready, c_desc, c_smem, M, N, K, scaling, HAS_SEED, B_KMAJOR, GROUP_M,
                   EPI_SPLIT, num_warps)),
        (_ws_load, (a_desc, b_desc, s_desc, l_desc, a_bufs, b_bufs, empty, ready, M, N, K, HAS_SEED, B_KMAJOR,
                    GROUP_M)),
    ], [1], [LOAD_REGS])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


class WsConfig:
    def __init__(self, bm=128, bn=256, bk=64, stages=3, group_m=8, warps=8, epi_split=1, load_regs=40,
                 maxnreg=168):
        self.bm, self.bn, self.bk, self.stages, self.group_m = bm, bn, bk, stages, group_m
        self.warps, self.epi_split, self.load_regs, self.maxnreg = warps, epi_split, load_regs, maxnreg


def _descriptors(a, b, c, s, lup, b_kmajor, cfg):
    gdt = _GL_DTYPES[a.dtype]
    a_block, b_block = [cfg.bm, cfg.bk], [cfg.bn, cfg.bk] if b_kmajor else [cfg.bk, cfg.bn]
    c_block = [cfg.bm, cfg.bn // cfg.epi_split]
    a_l = gl.NVMMASharedLayout.get_default_for(a_block, gdt)
    b_l = gl.NVMMASharedLayout.get_default_for(b_block, gdt)
    c_l = gl.NVMMASharedLayout.get_default_for(c_block, gdt)
    a_d = GluonDescriptor.from_tensor(a, a_block, a_l)
    b_d = GluonDescriptor.from_tensor(b, b_block, b_l)
    c_d = GluonDescriptor.from_tensor(c, c_block, c_l)
    s_d = GluonDescriptor.from_tensor(s, a_block, a_l) if s is not None else a_d
    l_d = GluonDescriptor.from_tensor(lup, b_block, b_l) if lup is not None else b_d
    return a_d, b_d, c_d, s_d, l_d


def ws_gemm(a, b, c, b_kmajor, s=None, lup=None, scaling=1.0, cfg=None, programs=None):
    """c = [scaling * s @ lup'] + a @ b' (b' = b^T when b_kmajor, else b; lup' likewise)."""
    cfg = cfg or WsConfig()
    m, n = c.shape
    k = a.shape[1]
    descs = _descriptors(a, b, c, s, lup, b_kmajor, cfg)
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    sms = programs or torch.cuda.get_device_properties(c.device).multi_processor_count
    _ws_gemm_kernel[(min(sms, tiles),)](*descs, m, n, k, float(scaling), HAS_SEED=s is not None,
                                         B_KMAJOR=b_kmajor, STAGES=cfg.stages, GROUP_M=cfg.group_m,
                                         EPI_SPLIT=cfg.epi_split, LOAD_REGS=cfg.load_regs, num_warps=cfg.warps,
                                         maxnreg=cfg.maxnreg)


# ------------------------------------------------------------------------------------------------ compile only

def compile_only(args):
    """Compile every variant for sm_90 on this machine (no GPU): shared memory, and ptxas's registers / spills."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    for name, cfg, seed, kmajor in _compile_cases():
        m, n, k, r = 1024, 1024, 512, 48
        a = torch.empty(m, k, dtype=torch.bfloat16)
        b = torch.empty((n, k) if kmajor else (k, n), dtype=torch.bfloat16)
        c = torch.empty(m, n, dtype=torch.bfloat16)
        s = torch.empty(m, r, dtype=torch.bfloat16) if seed else None
        lup = torch.empty((n, r) if kmajor else (r, n), dtype=torch.bfloat16) if seed else None
        descs = _descriptors(a, b, c, s, lup, kmajor, cfg)
        fn = _ws_gemm_kernel
        sig, consts = {}, dict(HAS_SEED=seed, B_KMAJOR=kmajor, STAGES=cfg.stages, GROUP_M=cfg.group_m,
                               EPI_SPLIT=cfg.epi_split, LOAD_REGS=cfg.load_regs, num_warps=cfg.warps)
        for arg, d in zip(["a_desc", "b_desc", "c_desc", "s_desc", "l_desc"], descs):
            sig[arg] = mangle_type(d)
        sig.update(M="i32", N="i32", K="i32", scaling="fp32")
        for key in consts:
            sig[key] = "constexpr"
        src = GluonASTSource(fn, sig, consts)
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.warps, maxnreg=cfg.maxnreg))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            Path(ptx).write_text(ck.asm["ptx"])
            res = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        regs = re.findall(r"Used (\d+) registers", res.stderr)
        spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
        setmax = sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32 (\d+)", ck.asm["ptx"])))
        wgmma = ck.asm["ptx"].count("wgmma.mma_async")
        print(f"{name:10s} shared {ck.metadata.shared:7d} B  regs {regs} spill stores {spills} "
              f"setmaxnreg {setmax} wgmma {wgmma}", flush=True)
        if res.returncode:
            print(res.stderr[-2000:])


def _compile_cases():
    yield "fwd", WsConfig(), True, True
    yield "fwd_r0", WsConfig(), False, True
    yield "dx", WsConfig(), True, False
    yield "fwd4", WsConfig(stages=4, epi_split=2), True, True
    yield "dx4", WsConfig(stages=4, epi_split=2), True, False


# ------------------------------------------------------------------------------------------------ GPU

def _variants(a, b, c, s, lup, scaling, kmajor):
    from lora_ops.triton_kernels import lora as L
    bk = WsConfig().bk
    s_pad = torch.zeros(s.shape[0], bk, device=s.device, dtype=s.dtype)
    s_pad[:, :s.shape[1]] = s
    if kmajor:
        l_pad = torch.zeros(lup.shape[0], bk, device=s.device, dtype=s.dtype)
        l_pad[:, :lup.shape[1]] = lup
    else:
        l_pad = torch.zeros(bk, lup.shape[1], device=s.device, dtype=s.dtype)
        l_pad[:lup.shape[0]] = lup
    r = s.shape[1]
    n = c.shape[1]
    drop = L._Dropout(0.0, None, a)
    if kmajor:  # lup = B (N, R): element (rr, nn) at nn * R + rr
        def tma():
            L._tma_gemm(a, b, c, s, lup, 1, r, None, drop, scaling, True, r, n, 0)
    else:  # lup = A (R, N_out): element (rr, nn) at rr * N_out + nn
        def tma():
            L._tma_gemm(a, b, c, s, lup, n, 1, None, drop, scaling, False, r, n, 0)
    return {
        "cublas": lambda: torch.mm(a, b.t() if kmajor else b, out=c),
        "tma": tma,
        "ws": lambda: ws_gemm(a, b, c, kmajor, s, lup, scaling),
        "ws_pad": lambda: ws_gemm(a, b, c, kmajor, s_pad, l_pad, scaling),
        "ws_r0": lambda: ws_gemm(a, b, c, kmajor),
        "ws4": lambda: ws_gemm(a, b, c, kmajor, s, lup, scaling, WsConfig(stages=4, epi_split=2)),
        "ws4_r0": lambda: ws_gemm(a, b, c, kmajor, cfg=WsConfig(stages=4, epi_split=2)),
    }


def _gemm(spec, args):
    kind, shape = spec.split(":")
    m, k, n, r = (int(v) for v in shape.split("x"))
    kmajor = kind == "fwd"
    dt, dev = torch.bfloat16, torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(m, k, device=dev, dtype=dt, generator=g)
    w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).to(dt)
    b = w if kmajor else w.t().contiguous()  # dX: the (K_dim, N_out) row-major operand
    s = torch.randn(m, r, device=dev, dtype=dt, generator=g)
    lup = (torch.randn(n, r, device=dev, generator=g) / r ** 0.5).to(dt)
    lup = lup if kmajor else lup.t().contiguous()
    scaling = 2.0
    c = torch.empty(m, n, device=dev, dtype=dt)
    bmat = b.float().t() if kmajor else b.float()
    lmat = lup.float().t() if kmajor else lup.float()
    base = a.float() @ bmat
    lora = base + scaling * (s.float() @ lmat)
    variants = _variants(a, b, c, s, lup, scaling, kmajor)
    errs = {}
    for name, fn in list(variants.items()):
        c.fill_(float("nan"))
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # a variant that fails is reported, the rest go on
            print(f"{spec} {name:8s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del variants[name]
            continue
        want = base if name in ("cublas",) or name.endswith("_r0") else lora
        errs[name] = ((c.float() - want).abs().max() / want.abs().max()).item()
        if not errs[name] < 1e-2:
            print(f"{spec} {name:8s} WRONG: max rel err {errs[name]:.2e}", flush=True)
            del variants[name]
    from benchmarks.block import interleaved
    from benchmarks.harness import Device, Settings
    devh = Device(Settings())
    timers = {name: devh.graph_timer(fn, (), args.calls) for name, fn in variants.items()}
    med = {name: statistics.median(ms) * 1e3 for name, ms in interleaved(timers, args.rounds).items()}
    flops = 2 * m * n * k
    for name, us in med.items():
        print(f"{spec} {name:8s} {us:9.1f} us  {us / med['cublas']:.3f}x cublas  "
              f"{flops / us / 1e6:6.0f} TFLOPS  err {errs[name]:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="fwd:8192x4096x6144x48,dx:8192x6144x4096x48,fwd:2048x4096x6144x48,"
                                        "dx:2048x6144x4096x48,fwd:8192x4096x28672x32,dx:8192x28672x4096x32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="graph replays per timing")
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        compile_only(args)
        return
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for spec in args.shapes.split(","):
        _gemm(spec, args)


if __name__ == "__main__":
    main()
