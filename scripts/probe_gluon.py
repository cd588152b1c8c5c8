"""GPU probe: the warp-specialized Gluon GEMM (triton_kernels/lora_ws_kernel.py) against cuBLAS and the TMA kernel.

The forward product y = s * S @ B^T + x @ W^T (W (N, K) read K-major) and the dX product dX = s * dS @ A + dY @ W
(W read as the (K_dim, N_out) operand) at the layer's shapes, device time per launch (each launch captured in a
CUDA graph, ``--calls`` replays per timing, the variants in ``--rounds`` interleaved rounds, median):

- ``cublas``: torch.mm, no LoRA term (the floor's product);
- ``tma``: ``_lora_gemm_tma_kernel`` with its seed, as the layer launched it before the Gluon GEMM;
- ``ws``: the Gluon kernel through the launcher's ``_ws_gemm``, its seed through zero-filled boxes over S and B as
  they are (R columns);
- ``ws_pad``: the same over copies of S and B padded to BLOCK_K columns.

Every output is checked against the fp32 product first. The first run (docs/PERF_NOTES.md item 48) timed this
file's prototype of the kernel at 85c25a4, with two more variants (no seed; four stages): ``git show
85c25a4:scripts/probe_gluon.py``.

    python scripts/probe_gluon.py [--shapes fwd:8192x4096x6144x48,dx:8192x6144x4096x48] [--rounds 7]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from lora_ops.triton_kernels import lora as L
from probe_seed import tl_tma_kernel

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))
from benchmarks.block import interleaved  # noqa: E402
from benchmarks.harness import Device, Settings  # noqa: E402


def _padded(t, cols, rows_major):
    """t with its R columns (rows_major: its R rows) zero-padded to ``cols``."""
    if rows_major:
        out = torch.zeros(cols, t.shape[1], device=t.device, dtype=t.dtype)
        out[:t.shape[0]] = t
    else:
        out = torch.zeros(t.shape[0], cols, device=t.device, dtype=t.dtype)
        out[:, :t.shape[1]] = t
    return out


def _variants(a, b, c, s, lup, scaling, kmajor):
    bk = L.WS_CONFIG[0]["BLOCK_K"]
    s_pad, l_pad = _padded(s, bk, False), _padded(lup, bk, not kmajor)
    r, n = s.shape[1], c.shape[1]
    drop = L._Dropout(0.0, None, a)
    # lup is B (N, R) in the forward, element (rr, nn) at nn * R + rr; A (R, N_out) in dX, at rr * N_out + nn.
    strides = (1, r) if kmajor else (n, 1)
    return {
        "cublas": lambda: torch.mm(a, b.t() if kmajor else b, out=c),
        "tma": tl_tma_kernel(lambda: L._tma_gemm(a, b, c, s, lup, *strides, None, drop, scaling, kmajor, r, n, 0)),
        "ws": lambda: L._ws_gemm(a, b, c, s, lup, None, scaling, kmajor),
        "ws_pad": lambda: L._ws_gemm(a, b, c, s_pad, l_pad, None, scaling, kmajor),
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
    base = a.float() @ (b.float().t() if kmajor else b.float())
    lora = base + scaling * (s.float() @ (lup.float().t() if kmajor else lup.float()))
    variants = _variants(a, b, c, s, lup, scaling, kmajor)
    errs = {}
    for name, fn in list(variants.items()):
        c.fill_(float("nan"))
        fn()
        want = base if name == "cublas" else lora
        errs[name] = ((c.float() - want).abs().max() / want.abs().max()).item()
        if not errs[name] < 1e-2:
            print(f"{spec} {name:8s} WRONG: max rel err {errs[name]:.2e}", flush=True)
            del variants[name]
    dev_h = Device(Settings())
    timers = {name: dev_h.graph_timer(fn, (), args.calls) for name, fn in variants.items()}
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
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("probe_gluon.py needs an sm_90 GPU (the Gluon GEMM is sm_90's)")
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for spec in args.shapes.split(","):
        _gemm(spec, args)


if __name__ == "__main__":
    main()
