"""NF4 dequantization in Triton: packed bitsandbytes NF4 bytes (+ absmax, optionally double-quantized) -> dense.

Bit-exact to ``lora_ops.nf4.reference_dequantize_nf4``: every output is ``(fp32(codebook[q]) * fp32(absmax[b]))``
rounded once to the output dtype, and with double quantization
``absmax[b] = nested_code[qa[b]] * nested_absmax[b // 256] + offset`` as a rounded product THEN a rounded sum
(``offset[b // 256]`` with ``NESTED_OFFSETS``: a projection group's stacked weight, one offset per member).

Design (bandwidth bound: 0.5 byte in, 2-4 bytes out per element):

* One program owns ``NB`` whole quantization blocks = ``NB * blocksize / 2`` contiguous bytes, viewed as an
  ``(NB, blocksize/2)`` tile, so each block's scale is computed once per row of the tile (the nested
  reconstruction is three gathers per *block*, not per byte) and broadcast along the row.
* Each byte gives two outputs, written next to each other: ``join(hi, lo).reshape`` interleaves them in
  registers. The byte loads carry a contiguity hint of ``VEC`` bytes so that a thread's ``2*VEC`` outputs are
  exactly one 16-byte store; with the natural 16-byte load the store would need a layout conversion through
  shared memory (seen in the TTGIR of triton 3.6).
* The 16-entry codebook is a register tensor and the lookup is ``tl.gather`` (lowered to a shared-memory
  table): a per-element global gather instead becomes a load whose layout the compiler picks badly (it
  turned the whole tile column-major with two shared-memory conversions, triton 3.6 TTGIR).
* Programs whose tile lies fully inside the tensor run an unmasked copy of the body, so masks never break
  vectorisation; only the last program is masked. Program bases are int64; in-tile offsets are int32.
* ``enable_fp_fusion=False``: with Triton's default, LLVM contracts ``code * nested_absmax + offset`` into one
  ``fma.rn.f32`` (checked in the PTX for sm_90), which rounds once instead of twice and breaks bit-exactness
  with bitsandbytes. The flag makes LLVM emit ``mul.rn``/``add.rn`` and ptxas run with ``--fmad=false``.
  The codebook product has no add, so nothing else changes.

The codebook comes from ``lora_ops.nf4`` (``nf4_codebook``), never retyped here.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from lora_ops import nf4 as _nf4

from . import records as _rec

# Bytes one program dequantizes (a whole number of quantization blocks; at least one block).
BYTES_PER_PROGRAM = 2048
NUM_WARPS = 4


@triton.jit
def _nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                      out_ptr, blk0, out_blk0, n_elements, n_bytes, n_blocks,
                      HALF_BS: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
                      VEC: tl.constexpr, MASKED: tl.constexpr, NESTED_OFFSETS: tl.constexpr):
    # Blocks blk0 .. blk0 + NB of the packed weight go to output blocks out_blk0 .. (the same unless a column
    # window is dequantized). The masks (MASKED: the last program of a whole-weight dequantize, where the two
    # are equal) bound blocks, bytes and elements.
    rows = tl.arange(0, NB)
    blk = blk0 + rows  # int64 quantization-block index of each tile row
    byte_local = rows[:, None] * HALF_BS + tl.max_contiguous(tl.arange(0, HALF_BS), VEC)[None, :]
    out_local = rows[:, None] * (2 * HALF_BS) + tl.max_contiguous(tl.arange(0, 2 * HALF_BS), 2 * VEC)[None, :]
    packed_base = packed_ptr + blk0 * HALF_BS
    out_base = out_ptr + out_blk0 * (2 * HALF_BS)
    if MASKED:
        blk_ok = blk < n_blocks
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            scale = (tl.load(nested_code_ptr + qa)
                     * tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=blk_ok, other=0.0)
                     + (tl.load(offset_ptr + blk // NESTED_BS, mask=blk_ok, other=0.0) if NESTED_OFFSETS
                        else tl.load(offset_ptr)))
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
        b = tl.load(packed_base + byte_local, mask=byte_local < n_bytes - blk0 * HALF_BS, other=0).to(tl.int32)
    else:
        if NESTED:
            qa = tl.load(absmax_ptr + blk).to(tl.int32)
            scale = (tl.load(nested_code_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BS)
                     + (tl.load(offset_ptr + blk // NESTED_BS) if NESTED_OFFSETS else tl.load(offset_ptr)))
        else:
            scale = tl.load(absmax_ptr + blk)
        b = tl.load(packed_base + byte_local).to(tl.int32)
    codebook = tl.load(codebook_ptr + tl.arange(0, 16))
    hi = tl.gather(codebook, (b >> 4).reshape(NB * HALF_BS), 0).reshape(NB, HALF_BS)
    lo = tl.gather(codebook, (b & 15).reshape(NB * HALF_BS), 0).reshape(NB, HALF_BS)
    s = scale[:, None]
    # Element 2j sits in the high nibble: (hi, lo) interleaved is the row-major element order.
    vals = tl.join(hi * s, lo * s).reshape(NB, 2 * HALF_BS).to(out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_base + out_local, vals, mask=out_local < n_elements - out_blk0 * (2 * HALF_BS))
    else:
        tl.store(out_base + out_local, vals)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                        out_ptr, n_elements, n_bytes, n_blocks, n_full_programs, win_blocks, row_blocks, col0_blocks,
                        HALF_BS: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
                        VEC: tl.constexpr, NESTED_OFFSETS: tl.constexpr = False):
    """Output block ``o`` (NB per program) is block ``(o // win_blocks) * row_blocks + col0_blocks + o %
    win_blocks`` of the packed weight: the whole weight with win_blocks = row_blocks = n_blocks and col0_blocks =
    0, or a column window of whole blocks (win_blocks per row out of row_blocks, from col0_blocks; NB divides
    win_blocks, so a program's blocks are consecutive in one row)."""
    pid = tl.program_id(0)
    out_blk0 = pid.to(tl.int64) * NB
    blk0 = (out_blk0 // win_blocks) * row_blocks + col0_blocks + out_blk0 % win_blocks
    if pid < n_full_programs:
        _nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                          out_ptr, blk0, out_blk0, n_elements, n_bytes, n_blocks, HALF_BS, NB, NESTED, NESTED_BS,
                          VEC, False, NESTED_OFFSETS)
    else:
        _nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, codebook_ptr,
                          out_ptr, blk0, out_blk0, n_elements, n_bytes, n_blocks, HALF_BS, NB, NESTED, NESTED_BS,
                          VEC, True, NESTED_OFFSETS)


_CODEBOOKS: Dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    cb = _CODEBOOKS.get(device)
    if cb is None:
        cb = _CODEBOOKS[device] = _nf4.nf4_codebook(device)
    return cb


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_state(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols) -> bool:
    """Raise ValueError/TypeError unless packed NF4 bytes and their quantization state describe a (rows, cols)
    weight, all on one device; return whether it is double-quantized. The one check of an NF4 weight's kernel
    arguments: the dequantize and the fused LoRA launchers (triton_kernels/lora.py) both call it."""
    _nf4._check_blocksize(blocksize)
    n = rows * cols
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(f"packed holds {packed.numel() * packed.element_size()} bytes but a ({rows}, {cols}) "
                         f"NF4 weight needs (n + 1) // 2 = {(n + 1) // 2}; pass the matching rows/cols")
    nblocks = -(-n // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries; ({rows}, {cols}) with blocksize={blocksize} "
                         f"needs {nblocks}")
    nested = [t is not None for t in (nested_absmax, nested_code, offset)]
    if any(nested) and not all(nested):
        missing = [k for k, h in zip(("nested_absmax", "nested_code", "offset"), nested) if not h]
        raise ValueError(f"double quantization needs nested_absmax, nested_code and offset together (got None "
                         f"for {missing})")
    tensors = [packed, absmax]
    if all(nested):
        if absmax.dtype != torch.uint8:
            raise TypeError(f"absmax must hold uint8 codes with double quantization, got {absmax.dtype}")
        if nested_absmax.numel() != -(-nblocks // _nf4.NESTED_BLOCKSIZE):
            raise ValueError(f"nested_absmax has {nested_absmax.numel()} entries, {nblocks} blocks need "
                             f"{-(-nblocks // _nf4.NESTED_BLOCKSIZE)}")
        if nested_code.numel() != 256 or offset.numel() not in (1, nested_absmax.numel()):
            raise ValueError(f"nested_code must have 256 entries (has {nested_code.numel()}) and offset 1, or one "
                             f"per nested block ({nested_absmax.numel()}; has {offset.numel()})")
        tensors += [nested_absmax, nested_code, offset]
    elif not absmax.is_floating_point():
        raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all NF4 tensors must be on one device, got {sorted(map(str, devices))}")
    return all(nested)


def _check(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype):
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive int (the logical (out, in) shape)")
    if dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    check_state(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols)
    device = packed.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton NF4 dequantize needs CUDA tensors (got {device}); on CPU it runs only "
                         "under TRITON_INTERPRET=1. Use the reference (LORA_OPS_BACKEND=reference) instead")


def _launch(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype,
            bytes_per_program: int = BYTES_PER_PROGRAM, num_warps: int = NUM_WARPS,
            row_range: Optional[Tuple[int, int]] = None, col_range: Optional[Tuple[int, int]] = None
            ) -> torch.Tensor:
    """The dense ``W[r0:r1, c0:c1]`` of a (rows, cols) NF4 weight, contiguous. A row range must start on a
    quantization-block boundary (r0 * cols % blocksize == 0); a column window needs whole blocks in every row
    (cols, c0 and c1 - c0 multiples of blocksize) and all rows. The checks are the callers' (lora.py)."""
    r0, r1 = row_range or (0, rows)
    c0, c1 = col_range or (0, cols)
    device = packed.device
    packed = packed.reshape(-1).view(torch.uint8)
    nested = nested_absmax is not None
    if nested:
        absmax = absmax.reshape(-1).contiguous()
        nested_absmax = nested_absmax.reshape(-1).to(torch.float32).contiguous()
        nested_code = nested_code.reshape(-1).to(torch.float32).contiguous()
        offset = offset.reshape(-1).to(torch.float32).contiguous()
    else:
        absmax = absmax.reshape(-1).to(torch.float32).contiguous()
        # Never read (NESTED is a constexpr False): any valid pointer will do.
        nested_absmax = nested_code = offset = absmax
    packed = packed.contiguous()
    out = torch.empty((r1 - r0, c1 - c0), dtype=dtype, device=device)
    half_bs = blocksize // 2
    nb = max(1, bytes_per_program // half_bs)
    n = out.numel()
    if (c0, c1) != (0, cols):
        # Column window: win whole blocks of every row; NB divides win so no program crosses a row.
        win, row_blocks, col0_blocks = (c1 - c0) // blocksize, cols // blocksize, c0 // blocksize
        nb = math.gcd(nb, win)
        n_blocks, n_bytes = -(-(rows * cols) // blocksize), (rows * cols + 1) // 2
        out_blocks = rows * win
    else:
        # Rows r0 .. r1: one run of consecutive blocks from r0 * cols / blocksize (masks bound it at r1).
        col0_blocks = r0 * cols // blocksize
        out_blocks = -(-n // blocksize)
        win = row_blocks = max(1, out_blocks)
        n_blocks, n_bytes = col0_blocks + out_blocks, (r1 * cols + 1) // 2
    grid = (triton.cdiv(out_blocks, nb),)
    # VEC bytes per thread give 2*VEC outputs = one 16-byte store.
    vec = 16 // (2 * out.element_size())
    kwargs = dict(HALF_BS=half_bs, NB=nb, NESTED=nested, NESTED_BS=_nf4.NESTED_BLOCKSIZE, VEC=vec,
                  num_warps=num_warps, enable_fp_fusion=False)
    if nested and offset.numel() > 1:
        kwargs["NESTED_OFFSETS"] = True  # only then: the single weight's launch and its record stay as they were
    args = (packed, absmax, nested_absmax, nested_code, offset, _codebook(device), out,
            n, n_bytes, n_blocks, n // (2 * nb * half_bs), win, row_blocks, col0_blocks)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel = _nf4_dequant_kernel[grid](*args, **kwargs)
    else:
        kernel = _nf4_dequant_kernel[grid](*args, **kwargs)
    _rec.LAUNCHES.bump("nf4_dequant")
    _rec.record("nf4_dequant", _nf4_dequant_kernel, grid, args, kwargs, kernel)
    return out


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                   nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], blocksize: int,
                   rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed NF4 -> (rows, cols) tensor of ``dtype``, bit-identical to ``nf4.reference_dequantize_nf4``.

    packed: ((rows*cols + 1) // 2,) bytes (any shape/dtype holding them: bitsandbytes' quant_storage);
    absmax: fp32 (nblocks,), or uint8 codes (nblocks,) with nested_absmax fp32 (ceil(nblocks/256),),
    nested_code fp32 (256,) and offset fp32 (one element, or one per nested block) for double quantization.
    """
    _check(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype)
    return _launch(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype)
