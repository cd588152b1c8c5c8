"""NF4 exactly as bitsandbytes' CUDA path stores it: the one definition in this package.

Format facts (checked against bitsandbytes 0.50.2):

* The (out, in) weight is flattened row-major and cut into blocks of ``blocksize`` elements; the last
  block may be partial and blocks may straddle rows.
* ``absmax[b] = max |w|`` over block b (fp32). Each element is scaled by a reciprocal multiply
  ``fp32(w) * (1 / absmax)`` and mapped to the number of the 15 bounds ``NF4_BOUNDS`` strictly below it: the
  fp32 midpoints, four of them moved one ulp as bitsandbytes' CUDA build has them (measured, not the source's
  apparent rule).
* Two codes per byte, element 2j in the high nibble; an odd count pads the last low nibble with the code
  of the padding value 0.0 (code 7, or code 0 when that block is all zeros: ``0 * inf`` is NaN on CUDA).
* Double quantization: ``offset = mean(absmax)``, then ``absmax - offset`` is quantized in blocks of 256
  against bitsandbytes' signed dynamic 8-bit map, found by the same binary search as bitsandbytes' CUDA
  ``dQuantize``; reconstruction is ``dynmap[q] * nested_absmax[i // 256] + offset`` (product, then sum).

The functions prefixed ``reference_`` are plain PyTorch and run on any device; they are the CPU kernels
of the registered ops and the oracle of the GPU kernels. Public code goes through ``quantize_nf4`` and
``NF4Weight``, which call ``torch.ops.lora_ops.*`` so that CUDA tensors reach the fast kernels.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

# Code -> value, ascending; the code is the rank. Exactly bitsandbytes' get_4bit_type("nf4") in fp32.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# The 15 fp32 midpoints between neighbouring codes: the thresholds that bitsandbytes' CUDA source
# (dQuantizeNF4, a decision tree of strict ``x > literal`` tests) spells as decimal literals.
NF4_MIDPOINTS = tuple(_f32((_f32(a) + _f32(b)) / 2) for a, b in zip(NF4_CODEBOOK[:-1], NF4_CODEBOOK[1:]))

# Where bitsandbytes' CUDA build (0.50.2, CUDA 13.0, measured on the H200 with golden vectors at every
# midpoint +-2 ulps and absmax 1, 2, 0.5, 1.7: scripts/make_golden.py) puts its strict-``>`` bound, in fp32
# ulps from the midpoint. Four of its literals compile one ulp away from the fp32 midpoint: at 0, 12 and 14
# the value exactly on the midpoint goes UP a code, and at 8 the value one ulp above the midpoint stays DOWN.
NF4_BOUND_ULP_SHIFT = {0: -1, 8: +1, 12: -1, 14: -1}


def _ulp_step(x: float, n: int) -> float:
    """x moved by n fp32 ulps (x a nonzero fp32 value; n in -1, 0, +1)."""
    if n == 0:
        return x
    bits = struct.unpack("<i", struct.pack("<f", x))[0]
    away = (n > 0) == (x > 0)  # moving away from zero increases |bits|
    return struct.unpack("<f", struct.pack("<i", bits + (1 if away else -1)))[0]


# The strict bounds the CUDA build compares against: code = number of bounds strictly below the scaled value.
NF4_BOUNDS = tuple(_ulp_step(m, NF4_BOUND_ULP_SHIFT.get(i, 0)) for i, m in enumerate(NF4_MIDPOINTS))
# Midpoints where a value exactly on the midpoint takes the upper code (derived, kept for readers and tests).
NF4_TIES_UP = frozenset(i for i, d in NF4_BOUND_ULP_SHIFT.items() if d < 0)

# bitsandbytes.functional.create_dynamic_map(signed=True), 256 fp32 values ascending, as big-endian hex:
# the 8-bit map used for double quantization (nested absmax).
_DYNAMIC_MAP_HEX = (
    "bf7e3333,bf7a999a,bf770000,bf736666,bf6fcccd,bf6c3333,bf68999a,bf650000,bf616666,bf5dcccd,bf5a3333,"
    "bf56999a,bf530000,bf4f6666,bf4bcccd,bf483333,bf44999a,bf410000,bf3d6666,bf39cccd,bf363334,bf32999a,"
    "bf2f0000,bf2b6666,bf27cccd,bf243334,bf20999a,bf1d0000,bf196666,bf15cccd,bf123334,bf0e999a,bf0b0000,"
    "bf076666,bf03cccc,bf003333,bef93332,bef20000,beeacccc,bee3999a,bedc6666,bed53333,bece0000,bec6cccc,"
    "bebf999a,beb86666,beb13333,beaa0000,bea2cccc,be9b999a,be946666,be8d3334,be860000,be7d9999,be6f3333,"
    "be60cccd,be526666,be440000,be35999a,be273333,be18cccd,be0a6666,bdf80000,bddb3334,bdc9eb85,bdc428f7,"
    "bdbe6667,bdb8a3d7,bdb2e148,bdad1eb8,bda75c2a,bda1999a,bd9bd70a,bd96147b,bd9051eb,bd8a8f5d,bd84cccd,"
    "bd7e147b,bd728f5d,bd670a3d,bd5b851f,bd500000,bd447ae1,bd38f5c3,bd2d70a3,bd21eb85,bd166667,bd0ae148,"
    "bcfeb852,bce7ae15,bcd0a3d7,bcb9999a,bca28f5d,bc8b851f,bc68f5c3,bc3ae148,bc1f3b64,bc160418,bc0ccccd,"
    "bc039581,bbf4bc6a,bbe24dd3,bbcfdf3b,bbbd70a4,bbab020d,bb989374,bb8624dd,bb676c8a,bb428f5c,bb1db22d,"
    "baf1a9fc,baa7ef9d,ba7765ff,ba59e83e,ba3c6a80,ba1eecc1,ba016f01,b9c7e283,b98ce705,b923d70b,b8ba1f4b,"
    "b88aefb3,b8378034,b7b24206,b70205ff,b65a1a94,b513a3b7,00000000,3513a3b7,365a1a94,370205ff,37b24206,"
    "38378034,388aefb3,38ba1f4b,3923d70b,398ce705,39c7e283,3a016f01,3a1eecc1,3a3c6a80,3a59e83e,3a7765ff,"
    "3aa7ef9d,3af1a9fc,3b1db22d,3b428f5c,3b676c8a,3b8624dd,3b989374,3bab020d,3bbd70a4,3bcfdf3b,3be24dd3,"
    "3bf4bc6a,3c039581,3c0ccccd,3c160418,3c1f3b64,3c3ae148,3c68f5c3,3c8b851f,3ca28f5d,3cb9999a,3cd0a3d7,"
    "3ce7ae15,3cfeb852,3d0ae148,3d166667,3d21eb85,3d2d70a3,3d38f5c3,3d447ae1,3d500000,3d5b851f,3d670a3d,"
    "3d728f5d,3d7e147b,3d84cccd,3d8a8f5d,3d9051eb,3d96147b,3d9bd70a,3da1999a,3da75c2a,3dad1eb8,3db2e148,"
    "3db8a3d7,3dbe6667,3dc428f7,3dc9eb85,3ddb3334,3df80000,3e0a6666,3e18cccd,3e273333,3e35999a,3e440000,"
    "3e526666,3e60cccd,3e6f3333,3e7d9999,3e860000,3e8d3334,3e946666,3e9b999a,3ea2cccc,3eaa0000,3eb13333,"
    "3eb86666,3ebf999a,3ec6cccc,3ece0000,3ed53333,3edc6666,3ee3999a,3eeacccc,3ef20000,3ef93332,3f003333,"
    "3f03cccc,3f076666,3f0b0000,3f0e999a,3f123334,3f15cccd,3f196666,3f1d0000,3f20999a,3f243334,3f27cccd,"
    "3f2b6666,3f2f0000,3f32999a,3f363334,3f39cccd,3f3d6666,3f410000,3f44999a,3f483333,3f4bcccd,3f4f6666,"
    "3f530000,3f56999a,3f5a3333,3f5dcccd,3f616666,3f650000,3f68999a,3f6c3333,3f6fcccd,3f736666,3f770000,"
    "3f7a999a,3f7e3333,3f800000"
)
DYNAMIC_MAP = tuple(struct.unpack(">f", bytes.fromhex(h))[0] for h in _DYNAMIC_MAP_HEX.split(","))

NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
# bitsandbytes' quant_storage: the packed codes (and, with double quantization, the uint8 absmax codes) held as
# elements of another dtype, the same bytes reinterpreted and zero-padded to a whole element. An FSDP wrapper that
# shards only floating-point Parameters, or flattens a group into one float buffer, can then shard the 4-bit base.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def check_quant_storage(quant_storage) -> torch.dtype:
    if quant_storage not in QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage={quant_storage!r} is not one of "
                         f"{[str(d) for d in QUANT_STORAGE_DTYPES]}; torch.uint8 stores the NF4 bytes as they are, "
                         "a float dtype (e.g. torch.bfloat16, as bitsandbytes' quant_storage) lets FSDP shard them")
    return quant_storage


def storage_numel(nbytes: int, storage: torch.dtype) -> int:
    """Elements of ``storage`` that hold ``nbytes`` bytes (the last one zero-padded)."""
    return -(-nbytes // storage.itemsize)


def bytes_to_storage(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """uint8 bytes -> 1-D ``storage`` elements holding them, zero-padded to a whole element."""
    flat = t.reshape(-1)
    pad = -flat.numel() % storage.itemsize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(storage)


def storage_to_bytes(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` bytes of a stored tensor, as a 1-D uint8 view (no copy)."""
    flat = t.view(torch.uint8).reshape(-1)
    return flat if flat.numel() == nbytes else flat[:nbytes]


def nf4_codebook(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    return torch.tensor(DYNAMIC_MAP, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------------------
# Reference kernels (plain PyTorch, any device). Registered as the CPU kernels of the lora_ops:: NF4 ops.
# --------------------------------------------------------------------------------------------------------

def _nf4_thresholds(device=None) -> torch.Tensor:
    """The 15 strict bounds (NF4_BOUNDS) as an fp32 tensor: what the CUDA quantize kernel is given."""
    return torch.tensor(NF4_BOUNDS, dtype=torch.float32, device=device)


def _nf4_codes_of_scaled(scaled: torch.Tensor) -> torch.Tensor:
    """fp32 scaled values -> NF4 codes (int64): the number of thresholds below the value. NaN compares false
    everywhere and gives code 0, as on CUDA."""
    codes = torch.bucketize(scaled, _nf4_thresholds(scaled.device))  # count of bounds strictly below x
    return torch.where(torch.isnan(scaled), torch.zeros_like(codes), codes)


def _blocks_absmax(values: torch.Tensor, blocksize: int):
    """(blocks, absmax, n): the n values flattened to fp32, zero-padded to (ceil(n / blocksize), blocksize), and
    each block's max |value| (NaN propagates, as in the kernels)."""
    flat = values.reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(nblocks, blocksize)
    return blocks, blocks.abs().amax(dim=1), n


def reference_quantize_nf4(weight: torch.Tensor, blocksize: int):
    """(out, in) float weight -> (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),))."""
    blocks, absmax, n = _blocks_absmax(weight, blocksize)
    # Reciprocal multiply in fp32, as the CUDA kernel does; 1/0 = inf and 0*inf = NaN -> code 0 for an
    # all-zero block (bitsandbytes' CPU path writes code 7 there instead; we follow CUDA).
    inv = torch.reciprocal(absmax)
    scaled = (blocks * inv[:, None]).reshape(-1)
    npad = 2 * ((n + 1) // 2)
    codes = _nf4_codes_of_scaled(scaled[:npad]).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def reference_quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int):
    """fp32 1-D values -> (uint8 codes, fp32 absmax per block), bitsandbytes' CUDA dQuantize search.

    A 7-step binary search over the sorted 256-entry map, then a choice between the pivot and its bracketing
    neighbour by the fp32 midpoint, with bitsandbytes' tie and NaN behaviour (NaN -> code 0).
    """
    blocks, absmax, n = _blocks_absmax(values, blocksize)
    x = (blocks * torch.reciprocal(absmax)[:, None]).reshape(-1)[:n]
    code = code.to(device=blocks.device, dtype=torch.float32)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        go_up = x > val
        lower_pivot = torch.where(go_up, pivot, lower_pivot)
        lower = torch.where(go_up, val, lower)
        upper_pivot = torch.where(go_up, upper_pivot, pivot)
        upper = torch.where(go_up, upper, val)
        pivot = torch.where(go_up, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    mid_up = (upper + val) * 0.5
    mid_dn = (lower + val) * 0.5
    q = torch.where(above, torch.where(x > mid_up, upper_pivot, pivot),
                    torch.where(x < mid_dn, lower_pivot, pivot))
    return q.to(torch.uint8), absmax


def reference_absmax(absmax, nested_absmax, nested_code, offset, blocksize_unused: int = 0) -> torch.Tensor:
    """The fp32 per-block absmax, reconstructed from double quantization when nested: block b's is
    ``nested_code[absmax[b]] * nested_absmax[b // 256] + offset`` (a rounded product, then a rounded sum), with
    ``offset`` one value or one per nested block (``offset[b // 256]``: a projection group's stacked weight, whose
    members each bring their own)."""
    if nested_absmax is None:
        return absmax.to(torch.float32)
    idx = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCKSIZE
    prod = nested_code.to(torch.float32)[absmax.long()] * nested_absmax.to(torch.float32)[idx]
    offset = offset.to(torch.float32)
    return prod + (offset.reshape(-1)[idx] if offset.numel() > 1 else offset)


_BYTE_PAIRS: Dict[torch.device, torch.Tensor] = {}


def _byte_pairs(device) -> torch.Tensor:
    """(256, 2) fp32: the code values of every byte's two nibbles, high nibble first (element 2j is the high
    nibble of byte j). A byte-wide lookup halves the gathers and never widens the codes to int64 per element."""
    device = torch.device(device)
    table = _BYTE_PAIRS.get(device)
    if table is None:
        cb = nf4_codebook(device)
        b = torch.arange(256, device=device)
        table = _BYTE_PAIRS[device] = torch.stack((cb[b >> 4], cb[b & 15]), dim=1).contiguous()
    return table


def reference_dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset,
                             blocksize: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed NF4 -> (rows, cols) tensor of ``dtype``: fp32(code value) * fp32(absmax), rounded once."""
    n = rows * cols
    flat = packed.reshape(-1).view(torch.uint8)
    values = torch.index_select(_byte_pairs(flat.device), 0, flat.int()).reshape(-1)
    scale = reference_absmax(absmax, nested_absmax, nested_code, offset)
    total = scale.numel() * blocksize  # whole blocks: the last one may be partial (zero-padded here, cut below)
    values = F.pad(values, (0, total - values.numel())) if values.numel() < total else values[:total]
    return (values.view(-1, blocksize) * scale[:, None]).reshape(-1)[:n].to(dtype).reshape(rows, cols)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------

def _check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use one of {VALID_BLOCKSIZES} "
                         "(bitsandbytes' block sizes; Hugging Face uses 64)")


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape (out, in), got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} cannot be quantized to NF4; use float32, float16 or "
                        "bfloat16 (cast with weight.float())")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}; reshape it first")
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty; NF4 needs at least one element")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device and holds no values to quantize; materialize it first "
                         "(load its checkpoint, or module.to_empty(device=...) and initialise it)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf; NF4 cannot represent them (absmax would be non-finite); "
                         "fix the weight before quantizing")


@dataclass(eq=False)
class NF4Weight:
    """A 4-bit NF4 weight of logical shape (out, in), in bitsandbytes' exact format.

    data: uint8 ((n+1)//2, 1) packed codes. absmax: fp32 (nblocks,) or, when ``nested``, uint8 codes of
    (absmax - offset) with ``nested_absmax`` fp32 (ceil(nblocks/256),), ``nested_code`` fp32 (256,) and
    ``offset`` a fp32 0-d tensor. ``dtype`` is the original weight dtype (dequantize's default).

    A projection group's stacked weight (``lora_ops.grouped``) may carry ``offset`` as one fp32 value per nested
    block (ceil(nblocks/256),): its members' own offsets, each repeated over its nested blocks. The kernels and the
    reference take that form; bitsandbytes' format and ``to_bnb_quant_state`` do not.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self):
        """The tensors that hold the weight, in the order the lora_ops:: ops take them."""
        return (self.data, self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.nested}, device={self.device})")

    def check_one_device(self) -> None:
        """Raise ValueError unless every tensor of the weight is on ``self.device`` (a kernel handed tensors on
        two devices may read garbage instead of failing)."""
        names = ("data", "absmax", "nested_absmax", "nested_code", "offset")
        bad = [f"{n} on {t.device}" for n, t in zip(names, self.tensors()) if t is not None and t.device != self.device]
        if bad:
            raise ValueError(f"NF4Weight tensors are on different devices (data on {self.device}, {', '.join(bad)}); "
                             "move the whole weight with .to(device)")

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(out, in) tensor of ``dtype`` (default: the original weight dtype)."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dequantize(dtype={dtype}) is not supported; use float32, float16 or bfloat16")
        self.check_one_device()
        return torch.ops.lora_ops.nf4_dequantize(
            self.data, self.absmax, self.nested_absmax, self.nested_code, self.offset,
            self.blocksize, self.out_features, self.in_features, dtype)

    def to(self, device) -> "NF4Weight":
        """A copy on ``device`` (the bytes are unchanged)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(mv(self.data), mv(self.absmax), self.shape, self.dtype, self.blocksize,
                         mv(self.nested_absmax), mv(self.nested_code), mv(self.offset))

    def cuda(self, device=None) -> "NF4Weight":
        return self.to(torch.device("cuda") if device is None else device)

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    # ---- checkpoint format (bitsandbytes Linear4bit keys) ----
    def _quant_state_json(self) -> Dict:
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
             "shape": [int(s) for s in self.shape]}
        if self.nested:
            d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": float(self.offset.item())})
        return d

    def state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Keys exactly as a bnb ``Linear4bit`` at module prefix ``prefix`` (e.g. "m.") saves its weight."""
        sd = {prefix + "weight": self.data, prefix + "weight.absmax": self.absmax,
              prefix + "weight.quant_map": nf4_codebook(self.device)}
        if self.nested:
            sd[prefix + "weight.nested_absmax"] = self.nested_absmax
            sd[prefix + "weight.nested_quant_map"] = self.nested_code.clone()
        blob = json.dumps(self._quant_state_json()).encode("utf-8")
        sd[prefix + "weight." + QUANT_STATE_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                        stored_as: Optional[torch.dtype] = None) -> "NF4Weight":
        """Inverse of ``state_dict``; also reads what bitsandbytes and Hugging Face save. Validates first.

        ``stored_as``: ``weight`` (and, double-quantized, ``weight.absmax``) hold the bytes as elements of this
        quant_storage dtype and are taken as they are, not reinterpreted (FSDP2's sharded state dict of a
        ``QLoRALinear`` with that ``quant_storage``: DTensor shards, which cannot be viewed as bytes without a
        gather). The result then holds them so and is fit only to be copied into such a layer.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of str keys to tensors, got {type(state_dict).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix={prefix!r} must be a str such as 'model.layers.0.q_proj.' (or '')")

        def need(key):
            if prefix + key not in state_dict:
                raise ValueError(f"state dict has no key {prefix + key!r}; expected bitsandbytes Linear4bit keys "
                                 f"under prefix {prefix!r} (e.g. {prefix}weight, {prefix}weight.absmax)")
            t = state_dict[prefix + key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{prefix + key} must be a torch.Tensor, got {type(t).__name__}")
            return t

        def finite(key, t):
            # A corrupt checkpoint must not load into a layer that silently computes NaN.
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{prefix}{key} contains NaN or Inf; the checkpoint is corrupt")

        blob = need("weight." + QUANT_STATE_KEY)
        try:
            qs = json.loads(bytes(blob.reshape(-1).to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{prefix}weight.{QUANT_STATE_KEY} is not valid UTF-8 JSON ({e})") from None
        if not isinstance(qs, dict) or qs.get("quant_type") != "nf4":
            raise ValueError(f"quant state {qs!r} is not NF4; only quant_type='nf4' is supported")
        for k in ("blocksize", "dtype", "shape"):
            if k not in qs:
                raise ValueError(f"quant state JSON lacks {k!r}: {qs!r}")
        blocksize = qs["blocksize"]
        _check_blocksize(blocksize)
        if qs["dtype"] not in _NAME_DTYPES:
            raise ValueError(f"quant state dtype {qs['dtype']!r} is not one of {sorted(_NAME_DTYPES)}")
        shape = qs["shape"]
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ValueError(f"quant state shape {shape!r} must be [out, in] with positive ints")
        n = shape[0] * shape[1]
        nblocks = -(-n // blocksize)
        stored_as = None if stored_as in (None, torch.uint8) else check_quant_storage(stored_as)
        nested = "nested_blocksize" in qs or prefix + "weight.nested_absmax" in state_dict

        def stored(key, t, nbytes):
            want = storage_numel(nbytes, stored_as)
            if t.dtype != stored_as or t.numel() != want:
                raise ValueError(f"{prefix}{key} holds {t.numel()} {t.dtype} elements; stored as {stored_as} "
                                 f"(quant_storage), shape {shape} with blocksize {blocksize} needs {want}")
            return t

        data = need("weight")
        if stored_as is not None:
            stored("weight", data, (n + 1) // 2)
        else:
            if data.dtype != torch.uint8:
                data = data.reshape(-1).view(torch.uint8)  # quant_storage reinterprets the same bytes
            data = data.reshape(-1, 1)
            if data.shape[0] != (n + 1) // 2:
                raise ValueError(f"{prefix}weight has {data.shape[0]} bytes but shape {shape} needs {(n + 1) // 2}")
        qmap = need("weight.quant_map")
        if qmap.numel() != 16 or not torch.equal(qmap.float().cpu(), nf4_codebook()):
            raise ValueError(f"{prefix}weight.quant_map is not the NF4 codebook; only NF4 is supported")
        absmax = need("weight.absmax")
        absmax_stored = stored_as is not None and nested
        if absmax_stored:
            stored("weight.absmax", absmax, nblocks)
        elif absmax.numel() != nblocks:
            raise ValueError(f"{prefix}weight.absmax has {absmax.numel()} entries, shape {shape} with blocksize "
                             f"{blocksize} needs {nblocks}")
        others = [(k, need(k)) for k in ("weight.absmax", "weight.nested_absmax", "weight.nested_quant_map")
                  if k == "weight.absmax" or prefix + k in state_dict]
        for k, t in others:
            if t.device != data.device:
                raise ValueError(f"{prefix}{k} is on {t.device} but {prefix}weight is on {data.device}; move the "
                                 "state dict to one device first")
            if not (absmax_stored and k == "weight.absmax"):  # stored bytes, not values
                finite(k, t)
        if not nested:
            if absmax.dtype != torch.float32:
                raise ValueError(f"{prefix}weight.absmax must be float32 without double quantization, "
                                 f"got {absmax.dtype}")
            return cls(data, absmax.reshape(-1), torch.Size(shape), _NAME_DTYPES[qs["dtype"]], blocksize)
        for k in ("nested_blocksize", "nested_offset"):
            if k not in qs:
                raise ValueError(f"double-quantized quant state JSON lacks {k!r}: {qs!r}")
        if qs["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize={qs['nested_blocksize']} unsupported; bitsandbytes uses 256")
        if absmax.dtype != torch.uint8 and not absmax_stored:
            raise ValueError(f"{prefix}weight.absmax must be uint8 codes with double quantization, got {absmax.dtype}")
        nabs = need("weight.nested_absmax")
        ncode = need("weight.nested_quant_map")
        if nabs.numel() != -(-nblocks // NESTED_BLOCKSIZE) or ncode.numel() != 256:
            raise ValueError(f"{prefix}weight.nested_absmax has {nabs.numel()} entries (needs "
                             f"{-(-nblocks // NESTED_BLOCKSIZE)}) or nested_quant_map has {ncode.numel()} (needs 256)")
        off = qs["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise ValueError(f"quant state nested_offset={off!r} must be a finite number (the mean absmax)")
        offset = torch.tensor(off, dtype=torch.float32, device=data.device)
        return cls(data, absmax.reshape(-1), torch.Size(shape), _NAME_DTYPES[qs["dtype"]], blocksize,
                   nabs.reshape(-1).float(), ncode.reshape(-1).float(), offset)

    # ---- bitsandbytes interop ----
    @classmethod
    def from_bnb(cls, params4bit) -> "NF4Weight":
        """Take a bitsandbytes ``Params4bit`` (or a ``Linear4bit``'s weight) as is: no re-quantizing."""
        qs = getattr(params4bit, "quant_state", None)
        if qs is None:
            raise ValueError("from_bnb needs a quantized bitsandbytes Params4bit (weight.quant_state is None: "
                             "move the Linear4bit to a device or call its quantization first)")
        if qs.quant_type != "nf4":
            raise ValueError(f"quant_type={qs.quant_type!r} is not supported; only 'nf4' is")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this Linear4bit weight was rewritten into bitsandbytes' CPU-only packing by an "
                             "eval-mode forward; read the weight before running such a forward")
        data = params4bit.data
        if data.dtype != torch.uint8:
            data = data.reshape(-1).view(torch.uint8)
        shape = torch.Size(qs.shape)
        if qs.nested:
            return cls(data.reshape(-1, 1), qs.absmax.reshape(-1), shape, qs.dtype, qs.blocksize,
                       qs.state2.absmax.reshape(-1).float(), qs.state2.code.float(),
                       qs.offset.detach().to(torch.float32).reshape(()))
        return cls(data.reshape(-1, 1), qs.absmax.reshape(-1).float(), shape, qs.dtype, qs.blocksize)

    def to_bnb(self):
        """A ``bitsandbytes.nn.Params4bit`` holding these exact bytes and quant state."""
        try:
            import bitsandbytes as bnb
            from bitsandbytes.functional import QuantState
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_bnb needs bitsandbytes (pip install bitsandbytes)") from e
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=nf4_codebook(self.device),
                        blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                        offset=self.offset, state2=state2)
        return bnb.nn.Params4bit(self.data, requires_grad=False, quant_state=qs, blocksize=self.blocksize,
                                 compress_statistics=self.nested, quant_type="nf4", bnb_quantized=True)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D (out, in) float weight to NF4, byte-identical to bitsandbytes' CUDA ``quantize_4bit``.

    ``double_quant=True`` (QLoRA's default, bitsandbytes' ``compress_statistics``) also quantizes absmax.
    """
    _check_blocksize(blocksize)
    _check_weight(weight)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    packed, absmax = torch.ops.lora_ops.nf4_quantize(weight.detach(), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize)
    # bitsandbytes computes the offset with torch's mean on the weight's device; so do we, bit for bit.
    offset = absmax.mean()
    # Block absmax values summing past fp32's max make the mean inf, and bitsandbytes then dequantizes the
    # whole weight to NaN; refuse instead.
    if not bool(torch.isfinite(offset)):
        raise ValueError("the mean of the block absmax values overflows float32 (|weight| near 3.4e38), so double "
                         "quantization cannot represent it; use double_quant=False or rescale the weight")
    code = dynamic_map(weight.device)
    qabsmax, nested_absmax = torch.ops.lora_ops.quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return NF4Weight(packed, qabsmax, weight.shape, weight.dtype, blocksize, nested_absmax, code, offset)


def nf4_bytes(rows: int, cols: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes an NF4 weight of (rows, cols) holds (packed codes + absmax state)."""
    n = rows * cols
    nblocks = math.ceil(n / blocksize)
    if double_quant:
        return (n + 1) // 2 + nblocks + 4 * math.ceil(nblocks / NESTED_BLOCKSIZE) + 4 * 256 + 4
    return (n + 1) // 2 + 4 * nblocks
