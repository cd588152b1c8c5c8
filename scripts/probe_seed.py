"""GPU probe: what the TMA GEMM's LoRA seed costs, and the NF4 dequantize's bandwidth per program size.

Part 1 (GEMM). Device time per launch (one launch captured in a CUDA graph, ``--calls`` replays per timing, the
variants in interleaved rounds, median of the rounds) of y (M, N) = x (M, K) @ W (N, K)^T [+ s * S (M, R) @
B (N, R)^T] at the forward shapes:

- ``cublas``: torch.mm, no LoRA term (the floor's product);
- ``tma``: lora.py's ``_lora_gemm_tma_kernel`` at its default tile (not its Gluon twin, ``tl_tma_kernel``), the seed
  (pointer loads of S and B^T in rank chunks, one dot each) before the K loop, as the layer launched it before the
  Gluon GEMM;
- ``tma_r0``: the same kernel with no rank chunks (no seed): what the seed costs;
- ``plain``: a minimal persistent TMA kernel (this file) with the same tile and raster, no LoRA term: whether the
  kernel's own loop structure costs beyond Triton's mainloop;
- ``ext_after``: the minimal kernel with the LoRA term as one more K step through TMA descriptors after the K loop
  (S and B padded to BLOCK_K columns, the accumulator divided by s before it and multiplied after);
  ``ext16_after`` / ``ext16_before``: the same in rank chunks of 16 (S and B as they are), after or before;
- ``subtile``: the minimal kernel storing its output tile in two halves (half the epilogue's shared memory);
  ``subtile4``: that with four pipeline stages; ``*_ext16``: with the LoRA term as ``ext16_after``.

Part 2 (NF4). The dequantize launcher (``nf4_dequant._launch``, what ``dequantize_nf4`` calls) on the (N, K)
weight at several bytes per program / warps; GB/s counts the packed bytes and absmax read and the bf16 written.

    python scripts/probe_seed.py [--shapes 8192x4096x6144x48,2048x4096x6144x48] [--rounds 7]

On the CPU (``--device cpu``, TRITON_INTERPRET=1, fp16, tiny shapes) it checks every variant's output against the
fp32 product instead of timing.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from lora_ops import nf4 as _nf4
from lora_ops.triton_kernels import lora as L
from lora_ops.triton_kernels import nf4_dequant as D
from lora_ops.triton_kernels.lora_kernels import _grouped_tile

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))
from benchmarks.block import interleaved  # noqa: E402
from benchmarks.harness import Device, Settings  # noqa: E402


@triton.jit
def _probe_kernel(a_desc, w_desc, c_desc, s_desc, b_desc, M, N, K, scaling, inv_scaling,
                  EXT: tl.constexpr, EXT_BK: tl.constexpr, EXT_CHUNKS: tl.constexpr, SUBTILE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  NUM_SMS: tl.constexpr):
    # EXT: 0 no LoRA term; 1 the LoRA term as EXT_CHUNKS more K steps of EXT_BK columns of S and B through TMA
    # after the K loop, the accumulator divided by s first and multiplied by s after (B unscaled, one
    # accumulator); 2 the same before the K loop.
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    dtype = c_desc.dtype
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EXT == 2:
            for c in tl.static_range(EXT_CHUNKS):
                acc = tl.dot(s_desc.load([om, c * EXT_BK]), b_desc.load([on, c * EXT_BK]).T, acc)
            acc = acc * scaling
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BLOCK_K])
            w = w_desc.load([on, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        if EXT == 1:
            acc = acc * inv_scaling
            for c in tl.static_range(EXT_CHUNKS):
                acc = tl.dot(s_desc.load([om, c * EXT_BK]), b_desc.load([on, c * EXT_BK]).T, acc)
            acc = acc * scaling
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([om, on], c0.to(dtype))
            c_desc.store([om, on + BLOCK_N // 2], c1.to(dtype))
        else:
            c_desc.store([om, on], acc.to(dtype))


def tl_tma_kernel(fn):
    """``fn`` run with the layer's TMA GEMMs on ``_lora_gemm_tma_kernel`` itself (LORA_OPS_WS off for the call):
    on sm_90 the launcher otherwise takes its Gluon twin where that applies, and only for some of the variants."""
    def run():
        ws, L._WS = L._WS, False
        try:
            fn()
        finally:
            L._WS = ws
    return run


def _variants(x, w, s, b, scaling, y):
    from triton.tools.tensor_descriptor import TensorDescriptor as TD
    m, k = x.shape
    n, r = b.shape
    _, blocks, warps, stages = L._TMA_CONFIGS[0]
    bm, bn, bk, gm = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], blocks["GROUP_M"]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    grid = (max(1, min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn))),)
    s_pad = torch.zeros(m, bk, dtype=x.dtype, device=x.device)
    s_pad[:, :r] = s
    b_pad = torch.zeros(n, bk, dtype=x.dtype, device=x.device)
    b_pad[:, :r] = b
    eb = 16
    a_d, w_d = TD(x, [m, k], [k, 1], [bm, bk]), TD(w, [n, k], [k, 1], [bn, bk])
    wide = TD(s_pad, [m, bk], [bk, 1], [bm, bk]), TD(b_pad, [n, bk], [bk, 1], [bn, bk])
    narrow = TD(s, [m, r], [r, 1], [bm, eb]), TD(b, [n, r], [r, 1], [bn, eb])
    c_full, c_half = TD(y, [m, n], [n, 1], [bm, bn]), TD(y, [m, n], [n, 1], [bm, bn // 2])

    def tma(rank):
        return tl_tma_kernel(lambda: L._tma_gemm(x, w, y, s[:, :rank], b, 1, r, None, L._Dropout(0.0, None, x),
                                                 scaling, True, rank, n, 0))

    def probe(ext, subtile, st=stages, descs=wide):
        ebk, chunks = (bk, 1) if descs is wide else (eb, triton.cdiv(r, eb))

        def run():
            _probe_kernel[grid](a_d, w_d, c_half if subtile else c_full, *descs, m, n, k, scaling, 1.0 / scaling,
                                EXT=ext, EXT_BK=ebk, EXT_CHUNKS=chunks, SUBTILE=subtile, BLOCK_M=bm, BLOCK_N=bn,
                                BLOCK_K=bk, GROUP_M=gm, NUM_SMS=sms, num_warps=warps, num_stages=st)
        return run

    return {"cublas": lambda: torch.mm(x, w.t(), out=y), "tma": tma(r), "tma_r0": tma(0),
            "plain": probe(0, False), "ext_after": probe(1, False), "ext16_after": probe(1, False, descs=narrow),
            "ext16_before": probe(2, False, descs=narrow), "subtile": probe(0, True),
            "subtile_ext16": probe(1, True, descs=narrow), "subtile4": probe(0, True, stages + 1),
            "subtile4_ext16": probe(1, True, stages + 1, descs=narrow)}


def _timers(fns, args):
    """{name: µs per call}: each call captured in a CUDA graph (harness.Device.graph_timer), ``--calls`` replays
    per timing, the timers run in ``--rounds`` interleaved rounds (block.interleaved), median per name."""
    dev = Device(Settings())
    timers = {name: dev.graph_timer(fn, (), args.calls) for name, fn in fns.items()}
    return {name: statistics.median(ms) * 1e3 for name, ms in interleaved(timers, args.rounds).items()}


def _gemm(shape, args):
    m, k, n, r = (int(v) for v in shape.split("x"))
    dt, dev = getattr(torch, args.dtype), torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
    w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).to(dt)
    s = torch.randn(m, r, device=dev, dtype=dt, generator=g)
    b = (torch.randn(n, r, device=dev, generator=g) / r ** 0.5).to(dt)
    scaling = 2.0
    y = torch.empty(m, n, device=dev, dtype=dt)
    variants = _variants(x, w, s, b, scaling, y)
    base = x.float() @ w.float().t()
    lora = base + scaling * (s.float() @ b.float().t())
    errs = {}
    for name, fn in list(variants.items()):
        y.fill_(float("nan"))
        try:
            fn()
        except Exception as e:  # a variant that does not compile (shared memory) is reported, the rest go on
            print(f"{shape} {name:12s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del variants[name]
            continue
        want = base if name in ("cublas", "tma_r0", "plain", "subtile", "subtile4") else lora
        errs[name] = ((y.float() - want).abs().max() / want.abs().max()).item()
    if not dev.type == "cuda":
        for name, e in errs.items():
            print(f"{shape} {name:12s} max rel err {e:.2e}")
            assert e < 1e-2, (name, e)
        return
    med = _timers(variants, args)
    flops = 2 * m * n * k
    for name, us in med.items():
        print(f"{shape} {name:12s} {us:9.1f} us  {us / med['cublas']:.3f}x cublas  "
              f"{flops / us / 1e6:6.0f} TFLOPS  err {errs[name]:.1e}", flush=True)


def _dequant(shape, args):
    m, k, n, r = (int(v) for v in shape.split("x"))
    dev = torch.device(args.device)
    w = torch.randn(n, k, device=dev) / k ** 0.5
    packed, absmax = _nf4.reference_quantize_nf4(w, 64)
    moved = packed.numel() * packed.element_size() + absmax.numel() * 4 + n * k * 2
    cfgs = [tuple(int(v) for v in c.split("/")) for c in args.dequant_configs.split(",")]
    ref = D._launch(packed, absmax, None, None, None, 64, n, k, torch.bfloat16)
    timers = {}
    for bpp, warps in cfgs:
        out = D._launch(packed, absmax, None, None, None, 64, n, k, torch.bfloat16, bpp, warps)
        assert torch.equal(out, ref), (bpp, warps)
        if dev.type == "cuda":
            timers[f"{bpp}/{warps}"] = (
                lambda bpp=bpp, warps=warps: D._launch(packed, absmax, None, None, None, 64, n, k, torch.bfloat16,
                                                       bpp, warps))
    big = torch.empty(n * k * 2 + packed.numel(), dtype=torch.uint8, device=dev)
    if dev.type != "cuda":
        print(f"dequant {n}x{k}: every config bit-identical")
        return
    dst = torch.empty_like(big)
    timers["copy"] = lambda: dst.copy_(big)
    med = _timers(timers, args)
    for name, us in med.items():
        nbytes = 2 * big.numel() if name == "copy" else moved
        print(f"dequant {n}x{k} {name:10s} {us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8192x4096x6144x48,2048x4096x6144x48,8192x4096x28672x32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="graph replays per timing")
    ap.add_argument("--dequant-configs", default="2048/4,4096/4,4096/8,8192/8,1024/4,2048/8")
    ap.add_argument("--no-dequant", action="store_true")
    ap.add_argument("--no-gemm", action="store_true")
    args = ap.parse_args()
    for shape in args.shapes.split(",") if not args.no_gemm else ():
        _gemm(shape, args)
    if not args.no_dequant:
        for shape in args.shapes.split(",")[:1]:
            _dequant(shape, args)


if __name__ == "__main__":
    main()
