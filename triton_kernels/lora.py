"""Fused LoRA / QLoRA forward and backward in Triton (the ``lora_ops::lora_fwd`` / ``lora_bwd`` fast path).

    xd = dropout(x) = x * mask / (1 - p)          x (M, K); mask from (seed, row * K + col)
    S  = xd @ A^T                                 (M, r), returned rounded to x.dtype (saved for backward)
    y  = x @ W^T + s * S @ B^T (+ bias)           (M, N)

    dS = s * dY @ B                               (M, r)
    dB = s * dY^T @ S                             (N, r)
    dbias = colsum(dY)                            (N,)
    dX = dY @ W + (dS @ A) * mask / (1 - p)       (M, K)
    dA = dS^T @ xd                                (r, K)

W is a dense (N, K) tensor or bitsandbytes NF4 bytes (``IS_NF4``, optionally double-quantized: ``NESTED``),
dequantized tile by tile inside the GEMM K-loop; no dequantized copy of W exists at any time.

Kernels (LoRAFusion's split at S):

* ``_lora_s_kernel``        S = xd @ A^T: skinny, bandwidth-bound, one pass over x per rank chunk (grid: M
                            tiles x r chunks).
* ``_lora_gemm_kernel``     the forward GEMM (TRANS_W) and the dX GEMM in one kernel: y's fp32 accumulator
                            starts at s * S @ B^T (+ bias), then accumulates x @ W^T; dX's starts at
                            dropout(dS @ A), then accumulates dY @ W. ``_lora_gemm_tma_kernel`` is its persistent
                            TMA twin for 16-bit dense weights (by default where it measured faster; LORA_OPS_TMA).
* ``_lora_bwd_ds_kernel``   one pass over dY: dS in registers; dB and dbias reduced over M tiles by fp32
                            atomics (fast path, not bit-reproducible).
* ``_lora_bwd_db_kernel``   dB and dbias without atomics (grid: N tiles x r chunks x M splits, fp32 partials
                            summed by torch): used when torch.are_deterministic_algorithms_enabled(), and
                            whenever dS is not needed (then it is the only pass over dY anyway).
* ``_lora_bwd_da_kernel``   dA = dS^T @ xd (grid: K tiles x r chunks x M splits, fp32 partials, no atomics).

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

Tuning: on CUDA every kernel is autotuned over a small config set, pruned to the call's family (16-bit dense,
16-bit NF4, fp32) and by M, cached by Triton's autotuner per (M bucket = next power of two, N, K, rank chunk,
variant, dtypes).
``LORA_OPS_TRITON_AUTOTUNE=0`` skips benchmarking and takes the first config that survives pruning (the largest
tile that fits M). Under ``TRITON_INTERPRET=1`` one small config per kernel keeps CPU tests fast.
``LAUNCHES`` counts launches per kernel name, so tests can prove that the Triton path ran.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton import knobs as _knobs

from lora_ops import _backend
from lora_ops import nf4 as _nf4
from lora_ops import reference as _ref

from . import nf4_dequant as _dq
from . import records as _rec


# Kernel name -> launches since import, Python launchers and C++ launch path together (records.py).
LAUNCHES = _rec.LAUNCHES
recording = _rec.recording


def _forget_launch_plans() -> None:
    launch = sys.modules.get("lora_ops._launch")  # not imported: no plans to forget
    if launch is not None:
        launch.forget_plans()


# Read at import, as triton.jit does: the decorators below already are interpreter functions or not.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The hash multipliers and NF4 block constants, taken from their one definition (never retyped).
_HASH_MUL1 = tl.constexpr(_ref.HASH_MUL1)
_HASH_MUL2 = tl.constexpr(_ref.HASH_MUL2)
_NESTED_BS = tl.constexpr(_nf4.NESTED_BLOCKSIZE)

# In-tile offsets are int32: with every stride (and K, N) below 2**22, an offset i * stride_a + j * stride_b over
# tile extents <= 256 and <= 128 stays below 382 * 2**22 < 2**31.
_MAX_STRIDE = 1 << 22

# Rank chunk: register tiles of (BLOCK_M, BLOCK_R) fp32 stay spill-free up to 64 (ptxas -v for sm_90 at the
# configs below); larger ranks loop (GEMMs) or add a grid axis (S, dS, dA, dB) over
# chunks. tl.dot needs every dimension >= 16.
_MAX_BLOCK_R = 64
_MIN_DOT = 16


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
def _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk0, blk, mask, NESTED: tl.constexpr):
    """fp32 scale of quantization blocks ``blk0 + blk`` (blk0: int64 scalar, blk: int32 tensor)."""
    if NESTED:
        q = tl.load((absmax_ptr + blk0) + blk, mask=mask, other=0).to(tl.int32)
        code = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        g0 = blk0 // _NESTED_BS
        g = ((blk0 % _NESTED_BS).to(tl.int32) + blk) // _NESTED_BS
        nabs = tl.load((nested_absmax_ptr + g0) + g, mask=mask, other=0.0)
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
def _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codebook,
            stride_wn, stride_wk, n0, k0, rn, rk, n_ok, k_ok, K,
            IS_NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_TILE: tl.constexpr,
            DTYPE: tl.constexpr):
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
            s_j = _nf4_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, blk0, line_first + j,
                             n_ok & (line_first + j <= line_last), NESTED)
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


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_s_kernel(x_ptr, a_ptr, seed_ptr, s_ptr,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
                   M, K, R, threshold, drop_scale, M_BUCKET,
                   HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[m, r] = sum_k xd[m, k] * A[r, k], one (BLOCK_M, BLOCK_R) tile per program."""
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M - m0
    r_ok = rr < R - r0
    dtype = x_ptr.dtype.element_ty
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    x_base = x_ptr + m0 * stride_xm
    a_base = a_ptr + r0 * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k0 = tl.cast(k, tl.int64)
        k_ok = rk < K - k0
        x = tl.load((x_base + k0 * stride_xk) + (rm[:, None] * stride_xm + rk[None, :] * stride_xk),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _apply_dropout(x, m0 * K + k0, rm[:, None] * K + rk[None, :], seed, threshold, drop_scale).to(dtype)
        at = tl.load((a_base + k0 * stride_ak) + (rr[None, :] * stride_ar + rk[:, None] * stride_ak),
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, at.to(dtype), acc, input_precision="ieee")
    tl.store((s_ptr + (m0 * stride_sm + r0 * stride_sr)) + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
             acc.to(s_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_gemm_kernel(a_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                      l_ptr, r_ptr, bias_ptr, seed_ptr, c_ptr,
                      stride_am, stride_ak, stride_wn, stride_wk, stride_lm, stride_lr, stride_rr, stride_rn,
                      stride_bias, stride_cm, stride_cn,
                      M, N, K, R, scaling, threshold, drop_scale, M_BUCKET,
                      TRANS_W: tl.constexpr, IS_NF4: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """The forward GEMM and the dX GEMM (pointer loads; dense or NF4 W decoded tile by tile):

        C tile (BLOCK_M, BLOCK_N) = lora + A (M, K) @ op(W),  lora = dropout(scaling * L (M, R) @ Rt (R, N)) (+ bias)

    forward (TRANS_W): A = x, W stored (N, K) so op(W) = W^T, L = S, Rt = B^T, + bias;
    dX: A = dY, W stored (K, N) (the (out, in) weight itself), L = dS (already scaled: scaling = 1), Rt = A_lora,
    dropout of x's element (m, n) (N is x's column count here). The LoRA term (LoRAFusion) seeds the fp32
    accumulator before the GEMM over K; the result is rounded once."""
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
    l_base = l_ptr + m0 * stride_lm
    r_base = r_ptr + n0 * stride_rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        lt = tl.load(l_base + (rm[:, None] * stride_lm + rr[None, :] * stride_lr),
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        rt = tl.load(r_base + (rr[:, None] * stride_rr + rn[None, :] * stride_rn),
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(lt.to(dtype), rt.to(dtype), acc, input_precision="ieee")
    if TRANS_W:
        acc = acc * scaling
    if HAS_DROPOUT:
        acc = _apply_dropout(acc, m0 * N + n0, rm[:, None] * N + rn[None, :], tl.load(seed_ptr), threshold,
                             drop_scale)
    if HAS_BIAS:
        bias = tl.load((bias_ptr + n0 * stride_bias) + rn * stride_bias, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    offset = 0.0
    codebook = tl.zeros((16,), dtype=tl.float32)
    if NESTED:
        offset = tl.load(offset_ptr)
    if IS_NF4:
        codebook = tl.load(codebook_ptr + tl.arange(0, 16))  # exactly 16 entries: in bounds, no mask
    a_base = a_ptr + m0 * stride_am
    for k in range(0, K, BLOCK_K):
        k0 = tl.cast(k, tl.int64)
        k_ok = rk < K - k0
        a = tl.load((a_base + k0 * stride_ak) + (rm[:, None] * stride_am + rk[None, :] * stride_ak),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of op(W). _w_tile addresses W as stored (row origin, column origin, offsets
        # shaped so the tile comes out as op(W), the stored column count, the tile's extent along the columns).
        if TRANS_W:
            wt = _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codebook,
                         stride_wn, stride_wk, n0, k0, rn[None, :], rk[:, None], n_ok[None, :], k_ok[:, None], K,
                         IS_NF4, NESTED, BLOCKSIZE, BLOCK_K, dtype)
        else:
            wt = _w_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, codebook,
                         stride_wn, stride_wk, k0, n0, rk[:, None], rn[None, :], k_ok[:, None], n_ok[None, :], N,
                         IS_NF4, NESTED, BLOCKSIZE, BLOCK_N, dtype)
        acc = tl.dot(a, wt, acc, input_precision="ieee")
    tl.store((c_ptr + (m0 * stride_cm + n0 * stride_cn)) + (rm[:, None] * stride_cm + rn[None, :] * stride_cn),
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _lora_gemm_tma_kernel(a_desc, w_desc, c_desc, l_ptr, r_ptr, bias_ptr, seed_ptr,
                          stride_lm, stride_lr, stride_rr, stride_rn, stride_bias,
                          M, N, K, scaling, threshold, drop_scale,
                          TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          R_CHUNKS: tl.constexpr, R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                          FLATTEN: tl.constexpr):
    """The forward GEMM and the dX GEMM of 16-bit dense weights in one persistent TMA kernel:

        C (M, N) = lora + A (M, K) @ op(W),   lora = dropout(scaling * L (M, R) @ Rt (R, N)) (+ bias)

    forward (TRANS_W): A = x, W (N, K) so op(W) = W^T, L = S, Rt = B^T, + bias;
    dX: A = dY, W (K, N) = the (out, in) weight itself, L = dS (already scaled), Rt = A_lora, dropout of x's
    element (m, n) (N is x's column count here).

    One program per SM walks output tiles (grouped for L2 reuse); A and W tiles come in through TMA
    descriptors, the LoRA term (rank-R, tiny) through pointer loads and seeds the fp32 accumulator as in the
    pointer kernels; C leaves through a TMA store, which clips the tile at M and N."""
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(R_CHUNKS):
            rr = c * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            lt = tl.load((l_ptr + m0 * stride_lm) + (rm[:, None] * stride_lm + rr[None, :] * stride_lr),
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            rt = tl.load((r_ptr + n0 * stride_rn) + (rr[:, None] * stride_rr + rn[None, :] * stride_rn),
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(lt.to(dtype), rt.to(dtype), acc)
        acc = acc * scaling
        if HAS_DROPOUT:
            acc = _apply_dropout(acc, m0 * N + n0, rm[:, None] * N + rn[None, :], seed, threshold, drop_scale)
        if HAS_BIAS:
            bias = tl.load((bias_ptr + n0 * stride_bias) + rn * stride_bias, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
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


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_bwd_ds_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_acc_ptr, dbias_acc_ptr,
                        stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsm, stride_dsr,
                        M, N, R, scaling, M_BUCKET,
                        DO_DB: tl.constexpr, DO_DBIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over a (BLOCK_M, N) row block of dY: dS = s * dY @ B for those rows; with DO_DB / DO_DBIAS also
    adds s * dY^T @ S and colsum(dY) of those rows into the fp32 (N, R) / (N,) buffers by atomics."""
    pid_m = tl.program_id(0)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    r0 = tl.program_id(1) * BLOCK_R
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M - m0
    r_ok = rr < R - r0
    dtype = dy_ptr.dtype.element_ty
    if DO_DB:
        s = tl.load((s_ptr + (m0 * stride_sm + r0 * stride_sr)) + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(dtype)
    dy_base = dy_ptr + m0 * stride_dym
    b_base = b_ptr + r0 * stride_br
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    num_n = tl.cdiv(N, BLOCK_N)
    for j in range(0, num_n):
        # Programs start their sweep at different column tiles, so their atomics do not all hit one tile at once.
        n0 = ((j + pid_m) % num_n).to(tl.int64) * BLOCK_N
        n_ok = rn < N - n0
        dy = tl.load((dy_base + n0 * stride_dyn) + (rm[:, None] * stride_dym + rn[None, :] * stride_dyn),
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load((b_base + n0 * stride_bn) + (rn[:, None] * stride_bn + rr[None, :] * stride_br),
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dy, b.to(dtype), acc, input_precision="ieee")
        if DO_DB:
            # Reduction over M tiles by fp32 atomics: one pass over dY, but the summation order (last bits)
            # varies run to run. Under deterministic algorithms the launcher uses _lora_bwd_db_kernel instead.
            part = tl.dot(tl.trans(dy), s, input_precision="ieee") * scaling
            tl.atomic_add((db_acc_ptr + (n0 * R + r0)) + (rn[:, None] * R + rr[None, :]), part,
                          mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
        if DO_DBIAS:
            colsum = tl.sum(dy.to(tl.float32), axis=0)
            tl.atomic_add((dbias_acc_ptr + n0) + rn, colsum, mask=n_ok & (r0 == 0), sem="relaxed")
    tl.store((ds_ptr + (m0 * stride_dsm + r0 * stride_dsr)) + (rm[:, None] * stride_dsm + rr[None, :] * stride_dsr),
             (acc * scaling).to(ds_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_split"])
def _lora_bwd_db_kernel(dy_ptr, s_ptr, db_ptr, dbias_ptr,
                        stride_dym, stride_dyn, stride_sm, stride_sr, stride_dbs, stride_dbn, stride_dbr,
                        stride_dbias_s, stride_dbias_n,
                        M, N, R, rows_per_split, scaling, M_BUCKET,
                        DO_DB: tl.constexpr, DO_DBIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """dB[n, r] = s * sum_m dY[m, n] S[m, r] and dbias[n] = sum_m dY[m, n] over the rows of split ``pid_s``,
    written (no atomics) to slot ``pid_s`` of db/dbias (stride_dbs / stride_dbias_s: 0 when there is one split,
    then db/dbias are the outputs themselves)."""
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
    dy_base = dy_ptr + n0 * stride_dyn
    s_base = s_ptr + r0 * stride_sr
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m_ok = rm < m_end - m0
        dy = tl.load((dy_base + m0 * stride_dym) + (rm[:, None] * stride_dym + rn[None, :] * stride_dyn),
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DO_DB:
            s = tl.load((s_base + m0 * stride_sm) + (rm[:, None] * stride_sm + rr[None, :] * stride_sr),
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(dy), s.to(dtype), acc, input_precision="ieee")
        if DO_DBIAS:
            bias_acc += tl.sum(dy.to(tl.float32), axis=0)
    if DO_DB:
        tl.store((db_ptr + (pid_s * stride_dbs + n0 * stride_dbn + r0 * stride_dbr))
                 + (rn[:, None] * stride_dbn + rr[None, :] * stride_dbr),
                 (acc * scaling).to(db_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])
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
def _dropout_mask_kernel(seed_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(seed_ptr), base, local, threshold)
    tl.store((out_ptr + base) + local, keep.to(tl.uint8), mask=local < n - base)


# --------------------------------------------------------------------------------------- configs, tuning

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
    # plain-Triton bf16 forward config on the H200 (shared/ANCHORS.md).
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


def _row_configs(other: str, fp32_small: bool) -> List[triton.Config]:
    # Kernels with one program per row block (S, dS): BLOCK_M rows, ``other`` the tile of their inner loop.
    # dS's two fp32 FMA dots (dY @ B, dY^T @ S) spill by kilobytes at these sizes for BLOCK_R = 64: fp32 gets
    # small tiles of its own there.
    shapes = ((128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3))
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
        cap = max(_MIN_DOT, _next_pow2(m))
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
        LAUNCHES.bump(self.name)
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
_DS_KERNEL = _Kernel(_lora_bwd_ds_kernel, "lora_bwd_ds", _row_configs("BLOCK_N", True),
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
_TMA_CONFIGS = ((128, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), 8, 3),
                (0, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 4, 4))
_TMA_KERNEL = _Kernel(_lora_gemm_tma_kernel, "lora_gemm_tma", [], None, None, None)

# Every kernel with its configs, for tests that run each config.
KERNELS: Dict[str, _Kernel] = {k.name: k for k in (_S_KERNEL, _FWD_KERNEL, _DS_KERNEL, _DB_KERNEL, _DX_KERNEL,
                                                    _DA_KERNEL)}


# ------------------------------------------------------------------------------------------ launch helpers

try:  # what Triton's own launch path uses (a C function: no Stream object per launch)
    from torch._C import _cuda_getCurrentRawStream as _current_stream
except ImportError:  # a torch without CUDA support: the launch cache never runs there
    def _current_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream

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


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter: 4, so persistent loops take several tiles)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _split_partials(splits: int, shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Buffer of a kernel that reduces over M in ``splits`` slices: the output itself (``dtype``, slot 0) with
    one split, fp32 partials per split otherwise (summed by ``_split_sum``)."""
    return torch.empty((splits,) + tuple(shape), dtype=dtype if splits == 1 else torch.float32, device=device)


def _split_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return partials[0] if partials.shape[0] == 1 else partials.sum(0).to(dtype)


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


def _check_lora(x, lora_A, lora_B, bias=None) -> Tuple[int, int, int, int]:
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
    _check_same("lora_B", lora_B, x, (n, r))
    if r < 1:
        raise ValueError(f"lora_A has rank {r}; the rank must be >= 1")
    if bias is not None:
        _check_same("bias", bias, x, (n,))
    if k >= _MAX_STRIDE or n >= _MAX_STRIDE:
        raise ValueError(f"in_features={k}, out_features={n}: the Triton kernels support up to {_MAX_STRIDE - 1} "
                         "(int32 in-tile offsets); use LORA_OPS_BACKEND=reference for larger layers")
    return m, k, n, r


# From this many rows on, an NF4 weight is dequantized once per launcher call into a temporary (Triton's
# bandwidth-bound dequantize, 0.043-0.07 ms for 4096x14336 on the H200) and the dense kernels run on it: at
# training sizes the GEMM is compute-bound and decoding NF4 bytes element by element inside its K-loop made the
# layer 17.8x the floor (H200, 2026-11-29, benchmarks/results/h200, M=8192 4096->14336) against ~1.17x dense.
# The temporary is freed when the launcher returns: nothing dense survives between forward and backward. Below
# this M the in-loop decode reads 4x fewer weight bytes; the crossover itself is not yet measured (speed issue).
NF4_DEQUANT_MIN_M = 64


def _dequant_first(x: torch.Tensor) -> bool:
    """Whether the launchers dequantize an NF4 weight into a temporary for x's call (see NF4_DEQUANT_MIN_M)."""
    return x.is_cuda and x.shape[0] >= NF4_DEQUANT_MIN_M and not _backend.triton_interpreter()


class _W:
    """Kernel arguments of the frozen weight: dense (N, K) or NF4 bytes + scales. From NF4_DEQUANT_MIN_M rows on
    CUDA the NF4 weight is dequantized into a temporary that lives as long as this object (one launcher call)."""

    def __init__(self, weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x):
        scratch = _scratch(x.device)
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
            self._dense(_dq._launch(packed, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x.dtype),
                        scratch)
            return
        if nested:
            self.ptrs = (packed, absmax.reshape(-1), nested_absmax.reshape(-1).float(),
                         nested_code.reshape(-1).float(), offset.reshape(1).float(), _dq._codebook(x.device))
            # The nested scale is a rounded product then a rounded sum; fp fusion would make it one fma.
            self.opts = dict(enable_fp_fusion=False)
        else:
            self.ptrs = (packed, absmax.reshape(-1).float(), scratch, scratch, scratch, _dq._codebook(x.device))
            self.opts = {}
        self.strides = (0, 0)
        self.meta = dict(IS_NF4=True, NESTED=nested, BLOCKSIZE=blocksize)

    def _dense(self, w: torch.Tensor, scratch: torch.Tensor) -> None:
        self.ptrs = (w, scratch, scratch, scratch, scratch, scratch)
        self.strides = (w.stride(0), w.stride(1))
        self.meta = dict(IS_NF4=False, NESTED=False, BLOCKSIZE=64)
        self.opts = {}


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


# TMA GEMM (``_lora_gemm_tma_kernel``): one fixed config, the best of the ANCHORS.md probe on the H200 (a
# persistent TMA GEMM at 1.006-1.022x cuBLAS there: BM=128, BN=256, BK=64, 8 warps, 3 stages), a smaller tile
# below 128 rows. For 16-bit dense weights (and the NF4 temporary) on sm_90+ when every operand meets TMA's
# rules (16-byte aligned base and row stride, unit last stride); otherwise the pointer kernels run.
# As first written it measured ~1.8x SLOWER than the pointer GEMMs (layer preset, 8192x4096->14336 fused 5.88 ms
# vs 3.28 ms; docs/PERF_NOTES.md): the flattened tile loop with the LoRA seed in it keeps 2 TMA copies in its
# TTGIR (the K-loop is not software-pipelined) where the unflattened one has 6 (3 stages, pipelined), so the tile
# loop is unflattened (LORA_OPS_TMA_FLATTEN=1 flattens it). Unflattened, the layer preset on the H200
# (2026-11-29, floor + fused, LORA_OPS_TMA=1 vs 0 in one call; benchmarks/results/h200/logs/s3_call1_*):
# 8192 x 4096->14336 dense 1.093x vs 1.205x the floor, NF4 1.091x vs 1.125x; 8192 x 14336->4096 dense 1.084x
# vs 1.159x, NF4 1.075x vs 1.098x; but 8192 x 4096->4096 dense 1.967x vs 1.724x. So by default (LORA_OPS_TMA
# unset) it runs where it measured faster: M >= _TMA_MIN_M and N*K >= _TMA_MIN_NK; LORA_OPS_TMA=1 everywhere it
# applies, 0 nowhere.
_TMA_CAPABLE: Dict[int, bool] = {}
# The LoRA seed is loaded in rank chunks of 16 whatever r is: its two tiles sit in shared memory beside the
# pipeline's 3 x 48 KB and the 64 KB output tile, and chunks of 64 (r = 64) asked for 262 KB of the 227 KB an
# H200 SM has (OutOfResources, H200 2026-11-29); chunks of 16 need 12 KB.
_TMA_BLOCK_R = 16
_TMA_MIN_M, _TMA_MIN_NK = 4096, 1 << 25


def _tma_mode() -> str:
    """LORA_OPS_TMA: "1" on wherever TMA applies, "0" off, unset / "" / "auto" on for the shapes it measured
    faster on (see above)."""
    v = os.environ.get("LORA_OPS_TMA", "auto").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("0", "1"):
        return v
    raise ValueError(f"LORA_OPS_TMA={v!r}: use 1 (on), 0 (off) or auto (unset: on for the measured-faster shapes)")


def _tma_usable(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether c = a @ op(w) runs on the TMA GEMM: by LORA_OPS_TMA (``_tma_mode``), an sm_90+ device and TMA's
    operand rules."""
    mode = _tma_mode()
    if mode == "0" or (mode == "auto" and (c.shape[0] < _TMA_MIN_M or c.shape[1] * a.shape[1] < _TMA_MIN_NK)):
        return False
    if _INTERPRET:
        usable = True
    else:
        idx = a.device.index if a.device.index is not None else torch.cuda.current_device()
        if idx not in _TMA_CAPABLE:
            _TMA_CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
        usable = _TMA_CAPABLE[idx]
    if not usable:
        return False
    for t in (a, w, c):
        if t.element_size() != 2 or t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * 2) % 16 \
                or t.shape[0] == 0 or t.shape[1] == 0:
            return False
    return True


def _lora_gemm(kernel, a, w, c, lt, rt, stride_rr, stride_rn, bias, drop, scaling, trans_w, r, block_r, m_bucket):
    """c (M, N) = dropout(scaling * lt (M, r) @ Rt (r, N)) (+ bias) + a (M, K) @ op(W): the forward
    (trans_w, W (N, K): op(W) = W^T, Rt = B^T) or the dX GEMM (W (K, N) itself, Rt = A_lora). ``w``: a _W;
    Rt is addressed through ``rt`` with (stride_rr, stride_rn). The TMA kernel where it is enabled and applies,
    else the pointer kernel ``kernel`` (_FWD_KERNEL / _DX_KERNEL: their own configs and counters)."""
    m, n = c.shape
    if not w.meta["IS_NF4"] and _tma_usable(a, w.ptrs[0], c):
        _tma_gemm(a, w.ptrs[0], c, lt, rt, stride_rr, stride_rn, bias, drop, scaling, trans_w, r)
        return
    b = bias if bias is not None else _scratch(c.device)
    kernel(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
           a, *w.ptrs, lt, rt, b, drop.seed, c,
           a.stride(0), a.stride(1), *w.strides, lt.stride(0), lt.stride(1), stride_rr, stride_rn, b.stride(0),
           c.stride(0), c.stride(1),
           m, n, a.shape[1], r, float(scaling), drop.threshold, drop.scale, m_bucket,
           TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_DROPOUT=drop.on, BLOCK_R=block_r, **w.meta, **w.opts)


def _tma_gemm(a, w, c, lt, rt_ptr, stride_rr, stride_rn, bias, drop, scaling, trans_w, r):
    """c = lora + a @ (w^T if trans_w else w) through _lora_gemm_tma_kernel (see there)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, n = c.shape
    k = a.shape[1]
    _, blocks, warps, stages = next(c_ for c_ in _TMA_CONFIGS if m >= c_[0])
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    a_d = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    w_d = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk] if trans_w else [bk, bn])
    c_d = TensorDescriptor(c, list(c.shape), list(c.stride()), [bm, bn])
    b = bias if bias is not None else _scratch(c.device)
    sms = _sm_count(c.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    _TMA_KERNEL(lambda meta: (max(1, min(sms, tiles)),),
                a_d, w_d, c_d, lt, rt_ptr, b, drop.seed,
                lt.stride(0), lt.stride(1), stride_rr, stride_rn, b.stride(0),
                m, n, k, float(scaling), drop.threshold, drop.scale,
                TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_DROPOUT=drop.on,
                R_CHUNKS=triton.cdiv(r, _TMA_BLOCK_R), R=r, BLOCK_R=_TMA_BLOCK_R, NUM_SMS=sms,
                FLATTEN=os.environ.get("LORA_OPS_TMA_FLATTEN", "0") not in ("", "0"),
                _config=(blocks, warps, stages))


# ------------------------------------------------------------------------------------------------ launchers

def lora_forward(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                 nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                 offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, bias: Optional[torch.Tensor], dropout_p: float,
                 seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), S (M, r)), the contract of ``lora_ops::lora_fwd``; S is rounded to x.dtype.

    weight: dense (N, K) when ``absmax`` is None, else the packed NF4 bytes of an (N, K) weight with absmax
    (fp32, or uint8 codes with nested_absmax / nested_code / offset). seed: 0-d int64 tensor or None (p == 0).
    """
    m, k, n, r = _check_lora(x, lora_A, lora_B, bias)
    x, lora_A, lora_B, bias = (_narrow(t) for t in (x, lora_A, lora_B, bias))
    w = _W(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x)
    drop = _Dropout(dropout_p, seed, x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return y, s
    block_r = _block_r(r)
    m_bucket = _next_pow2(m)
    with _on_device(x.device):
        _S_KERNEL(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r)),
                  x, lora_A, drop.seed, s,
                  x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
                  m, k, r, drop.threshold, drop.scale, m_bucket,
                  HAS_DROPOUT=drop.on, BLOCK_R=block_r)
        if n > 0:
            _lora_gemm(_FWD_KERNEL, x, w, y, s, lora_B, lora_B.stride(1), lora_B.stride(0), bias,
                       _Dropout(0.0, None, x), scaling, True, r, block_r, m_bucket)
    return y, s


def lora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                  nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  s: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                  need_dx: bool, need_dA: bool, need_dB: bool,
                  need_dbias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dA (r, K), dB (N, r), dbias (N,)), the contract of ``lora_ops::lora_bwd``; a gradient not
    asked for comes back with 0 elements. dS (M, r) is rounded to x.dtype before the dX and dA GEMMs."""
    m, k, n, r = _check_lora(x, lora_A, lora_B)
    _check_same("dy", dy, x, (m, n))
    _check_same("s", s, x, (m, r))
    dy, x, lora_A, lora_B, s = (_narrow(t) for t in (dy, x, lora_A, lora_B, s))
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
    w = _W(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k, x) if need_dx else None
    block_r = _block_r(r)
    r_chunks = triton.cdiv(r, block_r)
    m_bucket = _next_pow2(m)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Atomics for dB/dbias only ride along the dS pass; without dS (or when determinism is asked) the
    # atomic-free kernel does the reduction.
    fused_db = need_ds and need_dB and not deterministic
    fused_dbias = need_ds and need_dbias and not deterministic
    with _on_device(dev):
        ds = None
        if need_ds:
            ds = torch.empty((m, r), dtype=dt, device=dev)
            # One zeroed fp32 buffer for both atomic targets (one allocation and one memset: host time counts).
            acc = torch.zeros(((n * r if fused_db else 0) + (n if fused_dbias else 0),), dtype=torch.float32,
                              device=dev) if fused_db or fused_dbias else None
            db_acc = acc[:n * r].view(n, r) if fused_db else _scratch(dev)
            dbias_acc = acc[n * r if fused_db else 0:] if fused_dbias else _scratch(dev)
            _DS_KERNEL(lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), r_chunks),
                       dy, lora_B, s, ds, db_acc, dbias_acc,
                       dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
                       ds.stride(0), ds.stride(1),
                       m, n, r, float(scaling), m_bucket,
                       DO_DB=fused_db, DO_DBIAS=fused_dbias, BLOCK_R=block_r)
            if fused_db:
                dB = db_acc if dt == torch.float32 else db_acc.to(dt)
            if fused_dbias:
                # A copy in fp32: dB is a view of the same buffer, and op outputs may not alias each other.
                dbias = dbias_acc.clone() if dt == torch.float32 else dbias_acc.to(dt)
        do_db = need_dB and not fused_db
        do_dbias = need_dbias and not fused_dbias
        if (do_db or do_dbias) and n > 0:
            splits, rows = _splits(m, triton.cdiv(n, 64) * r_chunks, dev)
            db_out = _split_partials(splits, (n, r), dt, dev) if do_db else _scratch(dev).view(1, 1, 16)
            dbias_out = _split_partials(splits, (n,), dt, dev) if do_dbias else _scratch(dev).view(1, 16)
            _DB_KERNEL(lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), r_chunks, splits),
                       dy, s, db_out, dbias_out,
                       dy.stride(0), dy.stride(1), s.stride(0), s.stride(1),
                       db_out.stride(0) if splits > 1 else 0, db_out.stride(1), db_out.stride(2),
                       dbias_out.stride(0) if splits > 1 else 0, dbias_out.stride(1),
                       m, n, r, rows, float(scaling), m_bucket,
                       DO_DB=do_db, DO_DBIAS=do_dbias, BLOCK_R=block_r)
            if do_db:
                dB = _split_sum(db_out, dt)
            if do_dbias:
                dbias = _split_sum(dbias_out, dt)
        elif do_db or do_dbias:
            dB = torch.zeros_like(lora_B) if do_db else dB
            dbias = dy.new_zeros((n,)) if do_dbias else dbias
        if need_dx and k > 0:
            _lora_gemm(_DX_KERNEL, dy, w, dx, ds, lora_A, lora_A.stride(0), lora_A.stride(1), None, drop, 1.0, False,
                       r, block_r, m_bucket)
        if need_dA:
            if k > 0:
                splits, rows = _splits(m, triton.cdiv(k, 64) * r_chunks, dev)
                da_out = _split_partials(splits, (r, k), dt, dev)
                _DA_KERNEL(lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), r_chunks, splits),
                           x, ds, drop.seed, da_out,
                           x.stride(0), x.stride(1), ds.stride(0), ds.stride(1),
                           da_out.stride(0) if splits > 1 else 0, da_out.stride(1), da_out.stride(2),
                           m, k, r, rows, drop.threshold, drop.scale, m_bucket,
                           HAS_DROPOUT=drop.on, BLOCK_R=block_r)
                dA = _split_sum(da_out, dt)
            else:
                dA = torch.zeros_like(lora_A)
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
