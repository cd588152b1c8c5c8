"""The forward and dX GEMMs of 16-bit dense weights on sm_90 as one warp-specialized persistent Gluon kernel.

    C (M, N) = lora + A (M, K) @ op(W),   lora = scaling * L (M, R) @ Rt (R, N) (+ bias)

the contract of ``lora_kernels._lora_gemm_tma_kernel`` (see there: forward with TRANS_W, A = x, op(W) = W^T,
L = S, Rt = B^T, + bias; dX with A = dY, W (K, N) the weight itself, L = dS, Rt = A_lora) with L in one slice of
C's dtype and without dropout: a dX GEMM with dropout stays on the TMA kernel, as the mask's hash over the
consumers' 128 accumulator elements a thread spilled 860 bytes (ptxas, sm_90), where they hold 240 registers.

Why Gluon (``triton.experimental.gluon``: Triton's tile language with explicit layouts, shared memory, mbarriers
and partitions): Triton 3.6 does not warp-specialize the TMA kernel on sm_90, so each tile's loads wait behind the
previous tile's epilogue and its LoRA seed (docs/PERF_NOTES.md items 45-46). Here the partitions are written out:

* the producer (one warp, few registers) walks the program's tiles and issues every TMA load into a ring of
  STAGES slots (A and W tiles, 48 KB a slot at 128 x 256 x 64), waiting on each slot's ``empty`` barrier; it runs
  ahead across tiles, so the next tile's operands arrive during this tile's epilogue;
* the consumers (the default partition: two warpgroups, ``num_warps`` = 8) wait on each slot's ``ready``
  barrier, run ``warpgroup_mma`` with one MMA in flight, release a slot once the MMA after it is issued and it
  has finished, then store the tile through TMA (the store overlaps the next tile's K loop).

The LoRA term rides in the same ring: before a tile's K steps come SEED_STEPS = cdiv(R, BLOCK_K) steps whose A
operand is L's [BLOCK_M, BLOCK_K] box and whose W operand is Rt's box (B (N, R) read like W (N, K), or A_lora
(R, N) read like W (K, N)). TMA zero-fills the box past L's and Rt's R columns, so the zeros add nothing. The
consumers multiply them first (a synchronous MMA), scale the accumulator by ``scaling``, add the bias (forward)
and go on with the K loop: the same order of operations as the TMA kernel's seed.

GROUPED (forward): Rt is a projection group's B_rows (N, rb) standing for B_bd (``_member_rank``); each output
tile lies in one member (the launcher checks that every boundary nb_i < N is a multiple of BLOCK_N), whose L box
starts at that member's rank offset: L's columns past the member's rb meet B_rows' zero-filled box columns.
SEG_A (dX): A = dY is the group's members' own (M, N_i) tensors (a_desc, a2_desc, ...), one K loop per member;
a member's last K step may pass its N_i, where TMA zero-fills A.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .lora_kernels import _a_segment, _grouped_tile, _member_rank


@gluon.jit
def _k_steps(K, nb1, nb2, nb3, BLOCK_K: gl.constexpr, SEG_A: gl.constexpr):
    """A tile's K steps: one loop over K, or with SEG_A one per member's columns [nb_i, nb_{i+1})."""
    if SEG_A:
        return (gl.cdiv(nb1, BLOCK_K) + gl.cdiv(nb2 - nb1, BLOCK_K) + gl.cdiv(nb3 - nb2, BLOCK_K)
                + gl.cdiv(K - nb3, BLOCK_K))
    else:
        return gl.cdiv(K, BLOCK_K)


@gluon.jit
def _ws_issue(a_src, a0, a1, w_src, w0, w1, a_bufs, w_bufs, empty, ready, i):
    """Load one K step into ring slot i % STAGES once its previous contents have been consumed; returns i + 1."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    NBYTES: gl.constexpr = a_src.block_type.nbytes + w_src.block_type.nbytes
    slot = i % STAGES
    # A fresh barrier counts as having completed the phase before phase 0, so the first lap passes at once.
    mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(slot), NBYTES)
    tma.async_copy_global_to_shared(a_src, [a0, a1], ready.index(slot), a_bufs.index(slot))
    tma.async_copy_global_to_shared(w_src, [w0, w1], ready.index(slot), w_bufs.index(slot))
    return i + 1


@gluon.jit
def _ws_producer(a_desc, w_desc, l_desc, rt_desc, a2_desc, a3_desc, a4_desc, a_bufs, w_bufs, empty, ready,
                 M, N, K, rb, nb1, nb2, nb3, TRANS_W: gl.constexpr, GROUPED: gl.constexpr, SEG_A: gl.constexpr,
                 SEED_STEPS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                 GROUP_M: gl.constexpr):
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    i = 0
    for t in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(t, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        ro = 0
        if GROUPED:
            ro = _member_rank(on, rb, nb1, nb2, nb3)
        for j in gl.static_range(SEED_STEPS):
            if TRANS_W:
                i = _ws_issue(l_desc, om, ro + j * BLOCK_K, rt_desc, on, j * BLOCK_K, a_bufs, w_bufs, empty, ready, i)
            else:
                i = _ws_issue(l_desc, om, ro + j * BLOCK_K, rt_desc, j * BLOCK_K, on, a_bufs, w_bufs, empty, ready, i)
        if SEG_A:
            for seg in gl.static_range(4):
                d, lo, hi = _a_segment(seg, a_desc, a2_desc, a3_desc, a4_desc, nb1, nb2, nb3, K)
                for kj in range(0, gl.cdiv(hi - lo, BLOCK_K)):
                    i = _ws_issue(d, om, kj * BLOCK_K, w_desc, lo + kj * BLOCK_K, on, a_bufs, w_bufs, empty, ready, i)
        else:
            for k in range(0, K, BLOCK_K):
                if TRANS_W:
                    i = _ws_issue(a_desc, om, k, w_desc, on, k, a_bufs, w_bufs, empty, ready, i)
                else:
                    i = _ws_issue(a_desc, om, k, w_desc, k, on, a_bufs, w_bufs, empty, ready, i)


@gluon.jit
def _w_operand(w_bufs, slot, TRANS_W: gl.constexpr):
    # The forward's W tile is [BLOCK_N, BLOCK_K] (K-major): the MMA reads its transpose.
    if TRANS_W:
        return w_bufs.index(slot).permute((1, 0))
    else:
        return w_bufs.index(slot)


@gluon.jit
def _ws_consumer(a_bufs, w_bufs, empty, ready, c_desc, c_smem, bias_ptr, stride_bias, M, N, K, scaling, nb1, nb2,
                 nb3, TRANS_W: gl.constexpr, HAS_BIAS: gl.constexpr, SEG_A: gl.constexpr, SEED_STEPS: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                     instr_shape=[16, BLOCK_N, 16])
    cols = gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_steps = _k_steps(K, nb1, nb2, nb3, BLOCK_K, SEG_A)
    i = 0
    for t in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(t, num_pid_m, num_pid_n, GROUP_M)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout)
        for j in gl.static_range(SEED_STEPS):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), _w_operand(w_bufs, slot, TRANS_W), acc)
            mbarrier.arrive(empty.index(slot), count=1)
            i += 1
        acc = acc * scaling
        if HAS_BIAS:
            n0 = pid_n.to(gl.int64) * BLOCK_N
            # Loaded one element a thread, then spread to the accumulator's columns: loaded in that layout its
            # 64 pointers a thread spilled (ptxas, sm_90).
            bias = gl.load((bias_ptr + n0 * stride_bias) + cols * stride_bias, mask=cols < N - n0, other=0.0)
            acc += gl.convert_layout(bias.to(gl.float32), gl.SliceLayout(0, layout))[None, :]
        for kk in range(k_steps):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), _w_operand(w_bufs, slot, TRANS_W), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            # The MMA issued before this one has finished: its slot may be refilled.
            if kk > 0:
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        if k_steps > 0:
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
        out = acc.to(c_desc.dtype)
        # The previous tile's store must have left c_smem before it is written again.
        tma.store_wait(0)
        c_smem.store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_smem)
    tma.store_wait(0)


@gluon.jit
def _lora_gemm_ws_kernel(a_desc, w_desc, c_desc, l_desc, rt_desc, bias_ptr, stride_bias, M, N, K, scaling, rb,
                         nb1, nb2, nb3, a2_desc, a3_desc, a4_desc,
                         TRANS_W: gl.constexpr, HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr, SEG_A: gl.constexpr,
                         SEED_STEPS: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                         STAGES: gl.constexpr, LOAD_REGS: gl.constexpr):
    """See the module docstring. Descriptors' tiles: A, L, A2..A4 [BLOCK_M, BLOCK_K]; W and Rt [BLOCK_N, BLOCK_K]
    (TRANS_W) or [BLOCK_K, BLOCK_N]; C [BLOCK_M, BLOCK_N]. One program per SM (or fewer) walks tiles t = pid,
    pid + programs, ... in ``_grouped_tile`` order."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=1)
        mbarrier.init(ready.index(s), count=1)
    gl.warp_specialize([
        (_ws_consumer, (a_bufs, w_bufs, empty, ready, c_desc, c_smem, bias_ptr, stride_bias, M, N, K, scaling, nb1,
                        nb2, nb3, TRANS_W, HAS_BIAS, SEG_A, SEED_STEPS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)),
        (_ws_producer, (a_desc, w_desc, l_desc, rt_desc, a2_desc, a3_desc, a4_desc, a_bufs, w_bufs, empty, ready,
                        M, N, K, rb, nb1, nb2, nb3, TRANS_W, GROUPED, SEG_A, SEED_STEPS, BLOCK_M, BLOCK_N, BLOCK_K,
                        GROUP_M)),
    ], [1], [LOAD_REGS])
