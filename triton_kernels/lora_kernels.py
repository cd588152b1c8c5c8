"""The Triton kernels of the fused LoRA / QLoRA forward and backward (``lora_ops::lora_fwd`` / ``lora_bwd``).

    xd = dropout(x) = x * mask / (1 - p)          x (M, K); mask from (seed, row * K + col)
    S  = xd @ A^T                                 (M, r), returned rounded to x.dtype (saved for backward)
    y  = x @ W^T + s * S @ B^T (+ bias)           (M, N)

    dS = s * dY @ B                               (M, r)
    dB = s * dY^T @ S                             (N, r)
    dbias = colsum(dY)                            (N,)
    dX = dY @ W + (dS @ A) * mask / (1 - p)       (M, K)
    dA = dS^T @ xd                                (r, K)

W is a dense (N, K) tensor or bitsandbytes NF4 bytes (``IS_NF4``, optionally double-quantized: ``NESTED``),
decoded tile by tile inside the GEMM K-loop (the launchers dequantize into a temporary first from a few
dozen rows on, see ``lora.NF4_DEQUANT_MIN_M``).

Kernels (LoRAFusion's split at S):

* ``_lora_s_kernel``        S = xd @ A^T: skinny, bandwidth-bound, one pass over x per rank chunk (grid: M
                            tiles x r chunks x K splits; with several K splits it writes fp32 partials).
* ``_lora_gemm_kernel``     the forward GEMM (TRANS_W) and the dX GEMM in one kernel: y's fp32 accumulator
                            starts at s * S @ B^T (+ bias), then accumulates x @ W^T; dX's starts at
                            dropout(dS @ A), then accumulates dY @ W. It sums S / dS partials in a fixed order
                            and stores the rounded S / dS once (WRITE_L). ``_lora_gemm_tma_kernel`` is its
                            persistent TMA twin for 16-bit dense weights (by default where it measured faster;
                            LORA_OPS_TMA), which takes S / dS in one slice.
* ``_lora_bwd_ds_kernel``   one pass over dY (grid: M tiles x r chunks x N splits): dS in registers (fp32
                            partials per N split); dB and dbias reduced over M tiles by fp32
                            atomics (fast path, not bit-reproducible).
* ``_lora_bwd_db_kernel``   dB and dbias without atomics (grid: N tiles x r chunks x M splits, fp32 partials
                            summed by torch): used when torch.are_deterministic_algorithms_enabled(), and
                            whenever dS is not needed (then it is the only pass over dY anyway).
* ``_lora_bwd_da_kernel``   dA = dS^T @ xd (grid: K tiles x r chunks x M splits, fp32 partials, no atomics).
* ``_lora_bwd_finish_kernel`` (unless LORA_OPS_FINISH_KERNEL=0) the fp32 partials and atomic buffers above summed and
                            rounded into dA / dB / dbias in one launch, instead of torch's sums and casts.

Conventions: fp32 accumulators; fp32 dots with ``input_precision="ieee"`` (no tf32); tile origins in int64
(rows * stride passes 2**31 at real sizes) and in-tile offsets in int32 (registers), which holds for strides,
K and N below 2**22 (a larger stride is copied contiguous first; larger K or N raise); every load/store masked
with ``other=``; any strides otherwise. The rank is processed in chunks of at most 64 (``BLOCK_R``): any r works,
and r <= 64 is one chunk. S and dS are rounded to x.dtype (S as PEFT's ``lora_A(x)``; dS so that the dX and dA
GEMMs run on tensor cores); every other result is rounded once from its fp32 accumulator.

Dropout: ``_dropout_keep`` is the Triton twin of ``lora_ops.reference.dropout_hash31`` (uint32 arithmetic mod
2**32; keep iff hash31 >= ``dropout_keep_threshold(p)``). The seed is a 0-d int64 device tensor that the kernels
load themselves (no host sync); ``dropout_mask`` runs the same helper to materialise a mask for tests.

NF4: element ``2j`` of the row-major flat weight sits in the high nibble of byte ``j``; the scale of flat index
``f`` is ``absmax[f // blocksize]`` (blocks may straddle rows), or with double quantization
``nested_code[absmax[b]] * nested_absmax[b // 256] + offset`` (a rounded product, then a rounded sum: NESTED
kernels are compiled with ``enable_fp_fusion=False`` so LLVM does not contract them into one fma). Each value is
``(fp32 codebook[q] * scale)`` rounded once to x.dtype, bit for bit ``nf4.reference_dequantize_nf4``. The codebook
and the block constants come from ``lora_ops.nf4``. Addressing (``_w_tile``: which flat indices a tile covers) and
decoding (``_nf4_scale`` / ``_nf4_decode``: bytes + scales -> values) are separate helpers, so a TMA / persistent
mainloop can load bytes its own way and reuse the decode unchanged.

Configs, autotuning and the launch wrapper live in ``lora_tuning.py``; the launchers (allocation, grids,
the NF4 temporary, the TMA policy) in ``lora.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lora_ops import nf4 as _nf4
from lora_ops import reference as _ref

# The hash multipliers and NF4 block constants, taken from their one definition (never retyped).
_HASH_MUL1 = tl.constexpr(_ref.HASH_MUL1)
_HASH_MUL2 = tl.constexpr(_ref.HASH_MUL2)
_NESTED_BS = tl.constexpr(_nf4.NESTED_BLOCKSIZE)

# In-tile offsets are int32: with every stride (and K, N) below 2**22, an offset i * stride_a + j * stride_b over
# tile extents <= 256 and <= 128 stays below 382 * 2**22 < 2**31.
MAX_STRIDE = 1 << 22

# Rank chunk: register tiles of (BLOCK_M, BLOCK_R) fp32 stay spill-free up to 64 (ptxas -v for sm_90 at the
# configs of lora_tuning.py); larger ranks loop (GEMMs) or add a grid axis (S, dS, dA, dB) over chunks.
# tl.dot needs every dimension >= 16.
MAX_BLOCK_R = 64
MIN_DOT = 16


# ----------------------------------------------------------------------------------------------- helpers
#
# Addressing: a tile's origin (m0, n0, k0) is an int64 scalar and in-tile offsets are int32 tensors, so
# rows * stride may pass 2**31 without every lane carrying 64-bit offsets (registers). The launchers keep every
# stride, K and N below ``_MAX_STRIDE``, which keeps every in-tile offset below 2**31.

@triton.jit
def _mix32(h):
    # lowbias32 on uint32 lanes: products wrap mod 2**32 exactly like reference._mul32; shifts are logical.
    h = h ^ (h >> 16)
    h = h * _HASH_MUL1
    h = h ^ (h >> 15)
    h = h * _HASH_MUL2
    h = h ^ (h >> 16)
    return h


@triton.jit
def _dropout_keep(seed, base, local, threshold):
    """Keep-mask of the flat indices ``base + local`` (base: int64 scalar, local: int32 tensor in [0, 2**31)):
    ``reference.dropout_hash31(seed, index) >= threshold``, computed on 32-bit lanes."""
    # int64 -> uint32 truncates, which is the reference's ``& 0xFFFFFFFF``; the high word of base + local
    # is base's high word plus the carry out of the low-word sum (local < 2**31: at most one carry).
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    base_lo = base.to(tl.uint32)
    lo = base_lo + local.to(tl.uint32)
    hi = (base >> 32).to(tl.uint32) + (lo < base_lo).to(tl.uint32)
    h = _mix32(lo ^ k0)
    h = _mix32(h ^ hi ^ k1)
    return (h >> 1).to(tl.int32) >= threshold


@triton.jit
def _apply_dropout(v, base, local, seed, threshold, drop_scale):
    """v * keep / (1 - p) in fp32; keep of flat index base + local (x's row * K + col).

    A multiply by 0, not a select: a dropped Inf/NaN gives NaN, as in torch's dropout and the reference."""
    keep = _dropout_keep(seed, base, local, threshold)
    return v.to(tl.float32) * tl.where(keep, drop_scale, 0.0)


@triton.jit
def _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr, blk0, blk, mask,
               NESTED: tl.constexpr, NESTED_OFFSETS: tl.constexpr):
    """fp32 scale of quantization blocks ``blk0 + blk`` (blk0: int64 scalar, blk: int32 tensor). ``offset``: the
    weight's one offset, or (NESTED_OFFSETS, a projection group's stacked weight) one per nested block at
    ``offset_ptr``."""
    if NESTED:
        q = tl.load((absmax_ptr + blk0) + blk, mask=mask, other=0).to(tl.int32)
        code = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        g0 = blk0 // _NESTED_BS
        g = ((blk0 % _NESTED_BS).to(tl.int32) + blk) // _NESTED_BS
        nabs = tl.load((nested_absmax_ptr + g0) + g, mask=mask, other=0.0)
        if NESTED_OFFSETS:
            offset = tl.load((offset_ptr + g0) + g, mask=mask, other=0.0)
        scale = code * nabs + offset
    else:
        scale = tl.load((absmax_ptr + blk0) + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_decode(byte, low, scale, codebook):
    """Packed bytes (int32), ``low`` (element in the low nibble), fp32 scales -> fp32 values (codebook[q] *
    scale: one fp32 product). ``codebook``: the 16 fp32 code values as a register tensor."""
    code = tl.where(low, byte & 15, byte >> 4)
    value = tl.gather(codebook, tl.reshape(code, [code.numel]), 0)
    return tl.reshape(value, code.shape) * scale


@triton.jit
def _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr, codebook,
            stride_wn, stride_wk, n0, k0, rn, rk, n_ok, k_ok, K,
            IS_NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_TILE: tl.constexpr,
            DTYPE: tl.constexpr, NESTED_OFFSETS: tl.constexpr):
    """W[n0 + rn, k0 + rk] as ``DTYPE``, zero where masked. n0, k0: int64 tile origin; rn, rk (and their masks
    n_ok, k_ok): int32 offsets shaped (1, X) / (X, 1), whose layout decides whether the tile is W or W^T;
    K_TILE: the tile's extent along k."""
    mask = n_ok & k_ok
    if IS_NF4:
        # Flat index n * K + k. Tile origins are multiples of even block sizes, so flat0 is even and an
        # element's nibble is given by the parity of its in-tile offset.
        flat0 = n0 * K + k0
        local = rn * K + rk
        byte = tl.load((w_ptr + (flat0 >> 1)) + (local >> 1), mask=mask, other=0).to(tl.int32)
        # Scales: the K_TILE elements of one weight row in this tile touch at most SPAN consecutive quantization
        # blocks (blocks may straddle rows), so each row's SPAN scales are loaded once and selected per element
        # instead of being gathered per element.
        SPAN: tl.constexpr = (K_TILE + BLOCKSIZE - 2) // BLOCKSIZE + 1
        blk0 = flat0 // BLOCKSIZE
        rem0 = (flat0 % BLOCKSIZE).to(tl.int32)
        line_first = (rem0 + rn * K) // BLOCKSIZE
        line_last = (rem0 + rn * K + tl.minimum(K - k0, K_TILE).to(tl.int32) - 1) // BLOCKSIZE
        rel = (rem0 + local) // BLOCKSIZE - line_first
        scale = tl.zeros(local.shape, dtype=tl.float32)
        for j in tl.static_range(SPAN):
            s_j = _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr, blk0, line_first + j,
                             n_ok & (line_first + j <= line_last), NESTED, NESTED_OFFSETS)
            scale = tl.where(rel == j, s_j, scale)
        w = _nf4_decode(byte, (local & 1) == 1, scale, codebook)
    else:
        w = tl.load((w_ptr + (n0 * stride_wn + k0 * stride_wk)) + (rn * stride_wn + rk * stride_wk),
                    mask=mask, other=0.0)
    return w.to(DTYPE)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M row tiles share each column sweep, so W tiles are reused from L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _member_rank(n, rb, nb1, nb2, nb3):
    """Grouped projections' B (``GROUPED``): the first rank column of output column(s) ``n`` (int32) in the
    block-diagonal B_bd that ``B_rows`` (sum N_i, rb) stands for, rb * #{i: n >= nb_i}: member i's columns
    [nb_i, nb_{i+1}) read B_rows' rank columns 0..rb of their own rows, at rank offset i * rb of S / dS (up to four
    members; an unused boundary is >= N). The kernels specialize ``rb`` (not in do_not_specialize): with rb known
    to divide by 16 the offsets keep B_rows' loads and dB's fp32 atomics vectorized; unspecialized they compiled to
    one atomic per element."""
    return rb * ((n >= nb1).to(tl.int32) + (n >= nb2).to(tl.int32) + (n >= nb3).to(tl.int32))


@triton.jit
def _a_segment(seg: tl.constexpr, a_desc, a2_desc, a3_desc, a4_desc, nb1, nb2, nb3, K):
    """(descriptor, first column, end column) of member ``seg`` of A = dY in a group's dX GEMM (``SEG_A``): its
    own (M, N_i) tensor and its columns [nb_seg, nb_seg+1) of the concatenated dY (K columns in all)."""
    if seg == 0:
        return a_desc, 0, nb1
    elif seg == 1:
        return a2_desc, nb1, nb2
    elif seg == 2:
        return a3_desc, nb2, nb3
    else:
        return a4_desc, nb3, K


@triton.jit
def _dy_column(c, p1, p2, p3, p4, stride_m, stride_c, nb1, nb2, nb3, N, SEG: tl.constexpr):
    """(pointer to row 0 of column ``c``, row stride, column stride) of dY (M, N): one tensor p1 with its strides,
    or with SEG (``SEG_DY`` / ``SEG_A``) a projection group's members' own contiguous tensors p1, p2, ..., the one
    whose columns [nb_i, nb_{i+1}) hold column c. The launchers take SEG only when every N_i is a multiple of the
    split unit (>= 64), so no tile straddles two members; the rounding to 16 tells the compiler so, which keeps
    the loads vectorized."""
    if SEG:
        i1 = c >= nb1
        i2 = c >= nb2
        i3 = c >= nb3
        lo = tl.where(i3, nb3, tl.where(i2, nb2, tl.where(i1, nb1, 0)))
        hi = tl.where(i3, N, tl.where(i2, nb3, tl.where(i1, nb2, nb1)))
        base = tl.where(i3, p4, tl.where(i2, p3, tl.where(i1, p2, p1)))
        return base + (c - (lo // 16) * 16), ((hi - lo) // 16) * 16, 1
    return p1 + c * stride_c, stride_m, stride_c


@triton.jit
def _rt_tile(r_ptr, n0, rr, rn, r_ok, n_ok, ro, rb, stride_rr, stride_rn, GROUPED: tl.constexpr):
    """The GEMMs' (BLOCK_R, BLOCK_N) tile of Rt at rank rows ``rr`` and output columns n0 + ``rn``: Rt itself, or
    with GROUPED B_bd^T read from B_rows, Rt[j, n] = B_rows[n, j - ro(n)] inside member n's rank block (``ro``
    from ``_member_rank``) and 0 outside it."""
    if GROUPED:
        jj = rr[:, None] - ro[None, :]
        return tl.load((r_ptr + n0 * stride_rn) + (jj * stride_rr + rn[None, :] * stride_rn),
                       mask=r_ok[:, None] & n_ok[None, :] & (jj >= 0) & (jj < rb), other=0.0)
    return tl.load((r_ptr + n0 * stride_rn) + (rr[:, None] * stride_rr + rn[None, :] * stride_rn),
                   mask=r_ok[:, None] & n_ok[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_s_kernel(x_ptr, a_ptr, seed_ptr, s_ptr,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_ss, stride_sm, stride_sr,
                   M, K, R, cols_per_split, threshold, drop_scale, M_BUCKET,
                   HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[m, r] = sum_k xd[m, k] * A[r, k] over the columns of split ``pid_s``, one (BLOCK_M, BLOCK_R) tile per
    program, written to slot ``pid_s`` of s (fp32 partials that the forward GEMM sums; with one split,
    stride_ss = 0 and s is S itself in x.dtype). Splitting K gives a skinny M enough programs to fill the GPU."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    pid_s = tl.program_id(2).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - m0
    r_ok = rr < R - r0
    dtype = x_ptr.dtype.element_ty
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    k_begin = tl.program_id(2) * cols_per_split  # int32: K < 2**22
    k_end = tl.minimum(k_begin + cols_per_split, K)
    x_base = x_ptr + m0 * stride_xm
    a_base = a_ptr + r0 * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k0 = tl.cast(k, tl.int64)
        k_ok = rk < k_end - k0
        x = tl.load((x_base + k0 * stride_xk) + (rm[:, None] * stride_xm + rk[None, :] * stride_xk),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _apply_dropout(x, m0 * K + k0, rm[:, None] * K + rk[None, :], seed, threshold, drop_scale).to(dtype)
        at = tl.load((a_base + k0 * stride_ak) + (rr[None, :] * stride_ar + rk[:, None] * stride_ak),
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, at.to(dtype), acc, input_precision="ieee")
    tl.store((s_ptr + (pid_s * stride_ss + m0 * stride_sm + r0 * stride_sr))
             + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
             acc.to(s_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _l_tile(l_ptr, lo_ptr, m0, rm, rr, l_mask, stride_ls, stride_lm, stride_lr, stride_lom, stride_lor, L_SPLITS,
            pid_n, dtype: tl.constexpr, WRITE_L: tl.constexpr):
    """The GEMMs' (BLOCK_M, BLOCK_R) tile of L (S or dS) at rows m0 on: its L_SPLITS fp32 slices summed in slice
    order and rounded to ``dtype`` (one slice is L itself). With WRITE_L the programs of the first column tile
    (pid_n 0) store the rounded tile to lo_ptr's rows m0 on."""
    l_off = rm[:, None] * stride_lm + rr[None, :] * stride_lr
    l_slice = l_ptr + m0 * stride_lm
    lt = tl.load(l_slice + l_off, mask=l_mask, other=0.0).to(tl.float32)
    for _ in range(1, L_SPLITS):
        l_slice += stride_ls  # 64-bit pointer arithmetic
        lt += tl.load(l_slice + l_off, mask=l_mask, other=0.0).to(tl.float32)
    lt = lt.to(dtype)
    if WRITE_L:
        tl.store((lo_ptr + m0 * stride_lom) + (rm[:, None] * stride_lom + rr[None, :] * stride_lor), lt,
                 mask=l_mask & (pid_n == 0))
    return lt


@triton.jit(do_not_specialize=["M", "M_BUCKET", "drop_c0", "nb1", "nb2", "nb3"])
def _lora_gemm_kernel(a_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                      l_ptr, r_ptr, bias_ptr, seed_ptr, c_ptr, lo_ptr,
                      stride_am, stride_ak, stride_wn, stride_wk, stride_ls, stride_lm, stride_lr, stride_rr,
                      stride_rn, stride_bias, stride_cm, stride_cn, stride_lom, stride_lor,
                      M, N, K, R, L_SPLITS, scaling, threshold, drop_scale, drop_ld, drop_c0, M_BUCKET,
                      rb, nb1, nb2, nb3, a2_ptr, a3_ptr, a4_ptr,
                      TRANS_W: tl.constexpr, IS_NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_L: tl.constexpr,
                      GROUPED: tl.constexpr, SEG_A: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP_M: tl.constexpr, NESTED_OFFSETS: tl.constexpr = False):
    """The forward GEMM and the dX GEMM (pointer loads; dense or NF4 W decoded tile by tile):

        C tile (BLOCK_M, BLOCK_N) = lora + A (M, K) @ op(W),  lora = dropout(scaling * L (M, R) @ Rt (R, N)) (+ bias)

    forward (TRANS_W): A = x, W stored (N, K) so op(W) = W^T, L = S, Rt = B^T, + bias;
    dX: A = dY, W stored (K, N) (the (out, in) weight itself), L = dS (already scaled: scaling = 1), Rt = A_lora,
    dropout of x's element (m, drop_c0 + n), x's rows being drop_ld long (N and 0, unless C is a column window
    of dX). The LoRA term (LoRAFusion) seeds the fp32 accumulator before the GEMM over K; the result is rounded
    once.

    L arrives as ``L_SPLITS`` slices ``stride_ls`` apart: fp32 partial sums over a split reduction (the S and dS
    kernels split K / N to fill the GPU at small M), summed here in slice order and rounded to A's dtype; one
    slice is L itself. With WRITE_L the programs of the first column tile store that rounded L (M, R) to lo_ptr
    (S saved for backward, dS for the dA kernel).

    GROUPED (forward only): Rt is the block-diagonal B_bd^T of a projection group, read from B_rows (N, rb)
    (``_member_rank``): Rt[j, n] = B_rows[n, j - ro(n)] where 0 <= j - ro(n) < rb, else 0. SEG_A (dX only): A = dY
    is a projection group's members' own contiguous (M, N_i) tensors a_ptr, a2_ptr, ... (``_dy_column``, K = sum N_i
    with boundaries nb_i)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - m0
    n_ok = rn < N - n0
    dtype = a_ptr.dtype.element_ty

    # LoRA term first (S / dS rounded to the input dtype, as saved or as PEFT would feed it).
    r_base = r_ptr + n0 * stride_rn
    ro = 0
    if GROUPED:
        ro = _member_rank((n0 + rn).to(tl.int32), rb, nb1, nb2, nb3)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lt = _l_tile(l_ptr, lo_ptr, m0, rm, rr, m_ok[:, None] & r_ok[None, :], stride_ls, stride_lm, stride_lr,
                     stride_lom, stride_lor, L_SPLITS, pid_n, dtype, WRITE_L)
        rt = _rt_tile(r_base, 0, rr, rn, r_ok, n_ok, ro, rb, stride_rr, stride_rn, GROUPED)
        acc = tl.dot(lt, rt.to(dtype), acc, input_precision="ieee")
    if TRANS_W:
        acc = acc * scaling
    if HAS_DROPOUT:
        acc = _apply_dropout(acc, m0 * drop_ld + drop_c0 + n0, rm[:, None] * drop_ld + rn[None, :],
                             tl.load(seed_ptr), threshold, drop_scale)
    if HAS_BIAS:
        bias = tl.load((bias_ptr + n0 * stride_bias) + rn * stride_bias, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    offset = 0.0
    codebook = tl.zeros((16,), dtype=tl.float32)
    if NESTED and not NESTED_OFFSETS:
        offset = tl.load(offset_ptr)
    if IS_NF4:
        codebook = tl.load(codebook_ptr + tl.arange(0, 16))  # exactly 16 entries: in bounds, no mask
    for k in range(0, K, BLOCK_K):
        k0 = tl.cast(k, tl.int64)
        k_ok = rk < K - k0
        a_col, sa_m, sa_k = _dy_column(k0, a_ptr, a2_ptr, a3_ptr, a4_ptr, stride_am, stride_ak, nb1, nb2, nb3, K,
                                       SEG_A)
        a = tl.load((a_col + m0 * sa_m) + (rm[:, None] * sa_m + rk[None, :] * sa_k),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of op(W). _w_tile addresses W as stored (row origin, column origin, offsets
        # shaped so the tile comes out as op(W), the stored column count, the tile's extent along the columns).
        if TRANS_W:
            wt = _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr, codebook,
                         stride_wn, stride_wk, n0, k0, rn[None, :], rk[:, None], n_ok[None, :], k_ok[:, None], K,
                         IS_NF4, NESTED, BLOCKSIZE, BLOCK_K, dtype, NESTED_OFFSETS)
        else:
            wt = _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr, codebook,
                         stride_wn, stride_wk, k0, n0, rk[:, None], rn[None, :], k_ok[:, None], n_ok[None, :], N,
                         IS_NF4, NESTED, BLOCKSIZE, BLOCK_N, dtype, NESTED_OFFSETS)
        acc = tl.dot(a, wt, acc, input_precision="ieee")
    tl.store((c_ptr + (m0 * stride_cm + n0 * stride_cn)) + (rm[:, None] * stride_cm + rn[None, :] * stride_cn),
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "drop_c0", "nb1", "nb2", "nb3"])
def _lora_gemm_tma_kernel(a_desc, w_desc, c_desc, l_ptr, r_ptr, bias_ptr, seed_ptr, lo_ptr,
                          stride_ls, stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_lom, stride_lor,
                          M, N, K, L_SPLITS, scaling, threshold, drop_scale, drop_ld, drop_c0, rb, nb1, nb2, nb3,
                          a2_desc, a3_desc, a4_desc,
                          TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          WRITE_L: tl.constexpr, GROUPED: tl.constexpr, SEG_A: tl.constexpr,
                          R_CHUNKS: tl.constexpr, R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                          FLATTEN: tl.constexpr):
    """The forward GEMM and the dX GEMM of 16-bit dense weights in one persistent TMA kernel:

        C (M, N) = lora + A (M, K) @ op(W),   lora = dropout(scaling * L (M, R) @ Rt (R, N)) (+ bias)

    forward (TRANS_W): A = x, W (N, K) so op(W) = W^T, L = S, Rt = B^T, + bias;
    dX: A = dY, W (K, N) = the (out, in) weight itself, L = dS (already scaled), Rt = A_lora, dropout of x's
    element (m, drop_c0 + n) in rows of drop_ld (as the pointer kernel).

    One program per SM walks output tiles (grouped for L2 reuse); A and W tiles come in through TMA
    descriptors, the LoRA term (rank-R, tiny) through pointer loads and seeds the fp32 accumulator as in the
    pointer kernels; C leaves through a TMA store, which clips the tile at M and N.

    L arrives as ``L_SPLITS`` fp32 slices ``stride_ls`` apart (the S / dS passes split K / N to fill the GPU at
    small M), summed in slice order and rounded to C's dtype, or as one slice that is L itself; with WRITE_L the
    tiles of the first column store that rounded L (M, R) to lo_ptr, as the pointer kernel does. GROUPED: Rt is a
    projection group's B_bd^T read from B_rows (N, rb), as in the pointer kernel. SEG_A (dX only): A = dY is a
    projection group's members' own (M, N_i) tensors, one descriptor each (a_desc, a2_desc, ...; an unused one
    repeats a_desc), read in one K loop per member: a TMA load cannot pick its descriptor per tile."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    dtype = c_desc.dtype
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m.to(tl.int64) * BLOCK_M
        n0 = pid_n.to(tl.int64) * BLOCK_N
        m_ok = rm < M - m0
        n_ok = rn < N - n0
        ro = 0
        if GROUPED:
            ro = _member_rank((n0 + rn).to(tl.int32), rb, nb1, nb2, nb3)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(R_CHUNKS):
            rr = c * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            lt = _l_tile(l_ptr, lo_ptr, m0, rm, rr, m_ok[:, None] & r_ok[None, :], stride_ls, stride_lm, stride_lr,
                         stride_lom, stride_lor, L_SPLITS, pid_n, dtype, WRITE_L)
            rt = _rt_tile(r_ptr, n0, rr, rn, r_ok, n_ok, ro, rb, stride_rr, stride_rn, GROUPED)
            acc = tl.dot(lt, rt.to(dtype), acc)
        acc = acc * scaling
        if HAS_DROPOUT:
            acc = _apply_dropout(acc, m0 * drop_ld + drop_c0 + n0, rm[:, None] * drop_ld + rn[None, :], seed,
                                 threshold, drop_scale)
        if HAS_BIAS:
            bias = tl.load((bias_ptr + n0 * stride_bias) + rn * stride_bias, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        if SEG_A:
            for seg in tl.static_range(4):
                d, lo, hi = _a_segment(seg, a_desc, a2_desc, a3_desc, a4_desc, nb1, nb2, nb3, K)
                # A member's last tile may pass its N_i (the last member's): TMA zero-fills those columns of A.
                for kj in range(0, tl.cdiv(hi - lo, BLOCK_K)):
                    a = d.load([om, kj * BLOCK_K])
                    w = w_desc.load([lo + kj * BLOCK_K, on])
                    acc = tl.dot(a, w, acc)
        else:
            for ki in range(k_tiles):
                ok = ki * BLOCK_K
                a = a_desc.load([om, ok])
                if TRANS_W:
                    w = w_desc.load([on, ok])
                    acc = tl.dot(a, w.T, acc)
                else:
                    w = w_desc.load([ok, on])
                    acc = tl.dot(a, w, acc)
        c_desc.store([om, on], acc.to(dtype))


@triton.jit(do_not_specialize=["M", "M_BUCKET", "nb1", "nb2", "nb3"])
def _lora_bwd_ds_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_acc_ptr, dbias_acc_ptr,
                        stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dss, stride_dsm,
                        stride_dsr,
                        M, N, R, cols_per_split, scaling, M_BUCKET, rb, nb1, nb2, nb3, dy2_ptr, dy3_ptr, dy4_ptr,
                        DO_DB: tl.constexpr, DO_DBIAS: tl.constexpr, GROUPED: tl.constexpr, SEG_DY: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        MEMBER_R: tl.constexpr = False):
    """One pass over the (BLOCK_M, cols) block of dY that split ``pid_s`` covers: dS = s * dY @ B of those rows
    and columns into slot ``pid_s`` of ds (fp32 partials that the dX GEMM sums; one split: stride_dss = 0 and ds
    is dS itself in dY's dtype); with DO_DB / DO_DBIAS also adds s * dY^T @ S and colsum(dY) of the block into the
    fp32 (N, R) / (N,) buffers by atomics.

    GROUPED: B is a projection group's B_rows (N, rb) standing for B_bd (N, R) (``_member_rank``), and dB is
    B_rows' gradient (N, rb): only B_bd's diagonal blocks are added. SEG_DY: dY is the members' own contiguous
    (M, N_i) tensors dy_ptr, dy2_ptr, ... (``_dy_column``), not one concatenated tensor.

    MEMBER_R (with GROUPED): program_id(1) is a member i, not a rank chunk: its program covers dS's rank columns
    [i rb, (i + 1) rb) (BLOCK_R >= rb) and only its own output columns [nb_i, nb_{i+1}) of the split, where B_rows
    is B_i, read and multiplied as an ordinary (N_i, rb) B: no off-diagonal zeros in the products and no
    gathered loads or atomics. A program whose member has no columns in its split stores zeros."""
    pid_m = tl.program_id(0)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    pid_s = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M - m0
    r_ok = rr < R - r0
    if MEMBER_R:
        r0 = tl.program_id(1) * rb
        r_ok = rr < rb
    dtype = dy_ptr.dtype.element_ty
    if DO_DB:
        s = tl.load((s_ptr + (m0 * stride_sm + r0 * stride_sr)) + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(dtype)
    b_base = b_ptr + r0 * stride_br
    db_ld = R  # the atomic dB buffer's row length: B_bd's R, or B_rows' rb
    if GROUPED:
        b_base = b_ptr
        db_ld = rb
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_begin = pid_s * cols_per_split  # int32: N < 2**22
    n_end = tl.minimum(n_begin + cols_per_split, N)
    if MEMBER_R:  # the split's columns of this program's member
        member = tl.program_id(1)
        lo = tl.where(member >= 3, nb3, tl.where(member == 2, nb2, tl.where(member == 1, nb1, 0)))
        hi = tl.where(member >= 3, N, tl.where(member == 2, nb3, tl.where(member == 1, nb2, nb1)))
        n_begin = tl.maximum(n_begin, lo)
        n_end = tl.maximum(tl.minimum(n_end, hi), n_begin)
    num_n = tl.cdiv(n_end - n_begin, BLOCK_N)
    for j in range(0, num_n):
        # Programs start their sweep at different column tiles, so their atomics do not all hit one tile at once.
        n0 = (n_begin + ((j + pid_m) % num_n) * BLOCK_N).to(tl.int64)
        n_ok = rn < n_end - n0
        dy_col, sd_m, sd_n = _dy_column(n0, dy_ptr, dy2_ptr, dy3_ptr, dy4_ptr, stride_dym, stride_dyn, nb1, nb2, nb3,
                                        N, SEG_DY)
        dy = tl.load((dy_col + m0 * sd_m) + (rm[:, None] * sd_m + rn[None, :] * sd_n),
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b_ok = n_ok[:, None] & r_ok[None, :]
        cols = rr[None, :]  # B's (and dB's) column of each tile element
        if GROUPED and not MEMBER_R:
            cols = r0 + rr[None, :] - _member_rank((n0 + rn).to(tl.int32), rb, nb1, nb2, nb3)[:, None]
            b_ok = b_ok & (cols >= 0) & (cols < rb)
        b = tl.load((b_base + n0 * stride_bn) + (rn[:, None] * stride_bn + cols * stride_br), mask=b_ok, other=0.0)
        acc = tl.dot(dy, b.to(dtype), acc, input_precision="ieee")
        if DO_DB:
            # Reduction over M tiles by fp32 atomics: one pass over dY, but the summation order (last bits)
            # varies run to run. Under deterministic algorithms the launcher uses _lora_bwd_db_kernel instead.
            part = tl.dot(tl.trans(dy), s, input_precision="ieee") * scaling
            db0 = n0 * db_ld
            if not GROUPED:
                db0 += r0
            tl.atomic_add((db_acc_ptr + db0) + (rn[:, None] * db_ld + cols), part, mask=b_ok, sem="relaxed")
        if DO_DBIAS:
            colsum = tl.sum(dy.to(tl.float32), axis=0)
            if MEMBER_R:  # each column's sum once, from the column's member
                tl.atomic_add((dbias_acc_ptr + n0) + rn, colsum, mask=n_ok, sem="relaxed")
            else:
                tl.atomic_add((dbias_acc_ptr + n0) + rn, colsum, mask=n_ok & (r0 == 0), sem="relaxed")
    tl.store((ds_ptr + (pid_s.to(tl.int64) * stride_dss + m0 * stride_dsm + r0 * stride_dsr))
             + (rm[:, None] * stride_dsm + rr[None, :] * stride_dsr),
             (acc * scaling).to(ds_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_split", "nb1", "nb2", "nb3"])
def _lora_bwd_db_kernel(dy_ptr, s_ptr, db_ptr, dbias_ptr,
                        stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbs, stride_dbn, stride_dbr,
                        stride_dbias_s, stride_dbias_n,
                        M, N, R, rows_per_split, scaling, M_BUCKET, rb, nb1, nb2, nb3, dy2_ptr, dy3_ptr, dy4_ptr,
                        DO_DB: tl.constexpr, DO_DBIAS: tl.constexpr, GROUPED: tl.constexpr, SEG_DY: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dB[n, r] = s * sum_m dY[m, n] S[m, r] and dbias[n] = sum_m dY[m, n] over the rows of split ``pid_s``,
    written (no atomics) to slot ``pid_s`` of db/dbias (stride_dbs / stride_dbias_s: 0 when there is one split,
    then db/dbias are the outputs themselves). GROUPED: db is a projection group's B_rows gradient (N, rb), B_bd's
    diagonal blocks only (``_member_rank``). SEG_DY: dY in the members' own tensors, as in the dS kernel."""
    n0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    r0 = tl.program_id(1) * BLOCK_R
    pid_s = tl.program_id(2).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N - n0
    r_ok = rr < R - r0
    dtype = dy_ptr.dtype.element_ty
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    dy_col, sd_m, sd_n = _dy_column(n0, dy_ptr, dy2_ptr, dy3_ptr, dy4_ptr, stride_dym, stride_dyn, nb1, nb2, nb3, N,
                                    SEG_DY)
    s_base = s_ptr + r0 * stride_sr
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m_ok = rm < m_end - m0
        dy = tl.load((dy_col + m0 * sd_m) + (rm[:, None] * sd_m + rn[None, :] * sd_n),
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DO_DB:
            s = tl.load((s_base + m0 * stride_sm) + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(dy), s.to(dtype), acc, input_precision="ieee")
        if DO_DBIAS:
            bias_acc += tl.sum(dy.to(tl.float32), axis=0)
    if DO_DB:
        db_ok = n_ok[:, None] & r_ok[None, :]
        cols = r0 + rr[None, :]
        if GROUPED:
            cols = cols - _member_rank((n0 + rn).to(tl.int32), rb, nb1, nb2, nb3)[:, None]
            db_ok = db_ok & (cols >= 0) & (cols < rb)
        tl.store((db_ptr + (pid_s * stride_dbs + n0 * stride_dbn)) + (rn[:, None] * stride_dbn + cols * stride_dbr),
                 (acc * scaling).to(db_ptr.dtype.element_ty), mask=db_ok)
    if DO_DBIAS:
        tl.store((dbias_ptr + (pid_s * stride_dbias_s + n0 * stride_dbias_n)) + rn * stride_dbias_n,
                 bias_acc.to(dbias_ptr.dtype.element_ty), mask=n_ok & (r0 == 0))


@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_split"])
def _lora_bwd_da_kernel(x_ptr, ds_ptr, seed_ptr, da_ptr,
                        stride_xm, stride_xk, stride_dsm, stride_dsr, stride_das, stride_dar, stride_dak,
                        M, K, R, rows_per_split, threshold, drop_scale, M_BUCKET,
                        HAS_DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA[r, k] = sum_m dS[m, r] * xd[m, k] over the rows of split ``pid_s``, written to slot ``pid_s`` of da
    (stride_das = 0 with one split, then da is the output itself)."""
    k0 = tl.program_id(0).to(tl.int64) * BLOCK_K
    r0 = tl.program_id(1) * BLOCK_R
    pid_s = tl.program_id(2).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_ok = rk < K - k0
    r_ok = rr < R - r0
    dtype = x_ptr.dtype.element_ty
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    x_base = x_ptr + k0 * stride_xk
    ds_base = ds_ptr + r0 * stride_dsr
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m_ok = rm < m_end - m0
        dst = tl.load((ds_base + m0 * stride_dsm) + (rm[None, :] * stride_dsm + rr[:, None] * stride_dsr),
                      mask=m_ok[None, :] & r_ok[:, None], other=0.0)
        x = tl.load((x_base + m0 * stride_xm) + (rm[:, None] * stride_xm + rk[None, :] * stride_xk),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _apply_dropout(x, m0 * K + k0, rm[:, None] * K + rk[None, :], seed, threshold, drop_scale).to(dtype)
        acc = tl.dot(dst.to(dtype), x, acc, input_precision="ieee")
    tl.store((da_ptr + (pid_s * stride_das + r0 * stride_dar + k0 * stride_dak))
             + (rr[:, None] * stride_dar + rk[None, :] * stride_dak),
             acc.to(da_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _sum_slices(src_ptr, dst_ptr, base, n, splits, stride_s, BLOCK_N: tl.constexpr):
    """dst[base:base + BLOCK_N] = sum over s < splits of src[s * stride_s + i], in s order in fp32, rounded once."""
    local = tl.arange(0, BLOCK_N)
    ok = local < n - base
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load((src_ptr + (s * stride_s + base)) + local, mask=ok, other=0.0).to(tl.float32)
    tl.store((dst_ptr + base) + local, acc.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n0", "splits0", "stride0", "n1", "splits1", "stride1", "n2", "splits2", "stride2"])
def _lora_bwd_finish_kernel(src0_ptr, dst0_ptr, src1_ptr, dst1_ptr, src2_ptr, dst2_ptr,
                            n0, splits0, stride0, n1, splits1, stride1, n2, splits2, stride2,
                            BLOCK_N: tl.constexpr):
    """The backward's gradients out of their fp32 buffers in one launch: for each of up to three jobs j (n_j = 0:
    none), dst_j[i] = sum over s < splits_j of src_j[s * stride_j + i] for i < n_j, rounded once to dst_j's dtype
    (dA from its M-split partials, dB and dbias from the dS pass's atomic buffer or the dB kernel's partials).
    Programs: cdiv(n0, BLOCK_N) for job 0, then job 1's, then job 2's; sources and destinations contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    b0 = tl.cdiv(n0, BLOCK_N)
    b1 = tl.cdiv(n1, BLOCK_N)
    if pid < b0:
        _sum_slices(src0_ptr, dst0_ptr, pid * BLOCK_N, n0, splits0, stride0, BLOCK_N)
    elif pid < b0 + b1:
        _sum_slices(src1_ptr, dst1_ptr, (pid - b0) * BLOCK_N, n1, splits1, stride1, BLOCK_N)
    else:
        _sum_slices(src2_ptr, dst2_ptr, (pid - b0 - b1) * BLOCK_N, n2, splits2, stride2, BLOCK_N)


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(seed_ptr), base, local, threshold)
    tl.store((out_ptr + base) + local, keep.to(tl.uint8), mask=local < n - base)
