"""GPU probe: what a q/k/v (or gate/up) group's fwd+bwd costs when every product is cuBLAS's, the LoRA terms
added by cuBLAS itself (beta = 1 into a buffer that already holds them, or one GEMM over K + R), against the
floor of the concatenated GEMM and the fused grouped provider, in one process.

Every line is the device time of one CUDA graph (no host time), replayed in interleaved rounds with the floor's:

- the pieces: cuBLAS's products alone (x·Wᵀ, dY·W; beta = 1 into a held term; over K + R with the LoRA
  operands as extra columns / rows), and the rank-R products (S = x·Aᵀ, S·Bᵀ, dS = dY·B, dB = dYᵀ·S, dS·A,
  dA = dSᵀ·x);
- ``compose_addmm``: S, then y = S·(sB)ᵀ and y += x·Wᵀ; backward dS, dB, dA, then dX = dS·(sA) and dX += dY·W;
- ``compose_kcat``: the same forward; dX as ONE GEMM over [dY | s·dS] and [W; A] (the base weight the first rows
  of a buffer whose last R rows hold A), dY copied into the wide buffer (a dS pass could write it there as it reads
  it);
- ``fused_grouped``: the block preset's provider (the C++ group on the TMA GEMMs), for reference.

    python scripts/probe_compose.py [--part qkv] [--m 2048 8192] [--rounds 7]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from profile_block import block_step
from profile_layer import capture_graph

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import block, presets  # noqa: E402


def _group_tensors(case, data):
    """The group's concatenated operands: x (M, K), W (N, K), A (R, K), block-diagonal s·B (N, R), the members'
    dY, and the wide buffers of the K + R forms."""
    from lora_ops.grouped import DEFAULT_GROUPS

    names = [n for n, *_ in case.projections()]
    group = next(g for g in DEFAULT_GROUPS if all(n in names for n in g))
    ws = data.sets[0]
    x = data.x_nograd[[name for name, _ in case.inputs()].index(case.projections()[names.index(group[0])][2])]
    w = torch.cat([ws[n].W for n in group])
    a = torch.cat([ws[n].A for n in group])
    b = torch.block_diag(*[ws[n].B for n in group]) * 2.0
    dys = [data.dy[names.index(n)] for n in group]
    n_all, r_all, k = w.shape[0], a.shape[0], w.shape[1]
    w_rows = torch.cat([w, a])  # (N + R, K): [W; A]
    w_cols = torch.cat([w, b], dim=1)  # (N, K + R): [W | sB]
    return dict(x=x, w=w, a=a, b=b, dys=dys, n=n_all, r=r_all, k=k, w_rows=w_rows, w_cols=w_cols)


def _pieces(t):
    """name -> a function of no arguments that runs one piece (its outputs preallocated where cuBLAS takes out=)."""
    x, w, a, b, dys = t["x"], t["w"], t["a"], t["b"], t["dys"]
    m, n, r, k = x.shape[0], t["n"], t["r"], t["k"]
    dy = torch.cat(dys, dim=1)
    s = x @ a.t()
    ds = dy @ b
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    dx = torch.empty(m, k, device=x.device, dtype=x.dtype)
    xk = torch.cat([x, s], dim=1)
    dyk = torch.cat([dy, ds], dim=1)
    return {
        "mm x.Wt": lambda: torch.mm(x, w.t(), out=y),
        "addmm_ y += x.Wt": lambda: y.addmm_(x, w.t()),
        "mm [x|S].[W|sB]t (K+R)": lambda: torch.mm(xk, t["w_cols"].t(), out=y),
        "mm dY.W": lambda: torch.mm(dy, w, out=dx),
        "addmm_ dX += dY.W": lambda: dx.addmm_(dy, w),
        "mm [dY|dS].[W;A] (N+R)": lambda: torch.mm(dyk, t["w_rows"], out=dx),
        "cat dY": lambda: torch.cat(dys, dim=1),
        "S = x.At": lambda: x @ a.t(),
        "y = S.sBt": lambda: torch.mm(s, b.t(), out=y),
        "dS = dY.sB": lambda: dy @ b,
        "dB = dYt.S": lambda: dy.t() @ s,
        "dX = dS.A": lambda: torch.mm(ds, a, out=dx),
        "dA = dSt.x": lambda: ds.t() @ x,
    }


def _compose(t, kcat):
    """One fwd+bwd of the group composed of cuBLAS calls (module docstring)."""
    x, w, a, b, dys = t["x"], t["w"], t["a"], t["b"], t["dys"]
    m, n, r, k = x.shape[0], t["n"], t["r"], t["k"]
    wide = torch.empty(m, n + r, device=x.device, dtype=x.dtype)

    def step():
        s = x @ a.t()
        y = s @ b.t()
        y.addmm_(x, w.t())
        if kcat:
            dy = wide[:, :n]
            col = 0
            for d in dys:  # what a dS pass reading the members' dY would write as it goes
                dy[:, col:col + d.shape[1]].copy_(d)
                col += d.shape[1]
            ds = dy @ b
            wide[:, n:].copy_(ds)
            db = dy.t() @ s
            da = ds.t() @ x
            dx = wide @ t["w_rows"]
        else:
            dy = torch.cat(dys, dim=1)
            ds = dy @ b
            db = dy.t() @ s
            da = ds.t() @ x
            dx = ds @ a
            dx.addmm_(dy, w)
        return y, dx, da, db
    return step


def _replay(graphs, rounds, replays):
    times = {k: [] for k in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for k, g in graphs.items():
            start.record()
            for _ in range(replays):
                g.replay()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) * 1e3 / replays)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="qkv", choices=list(presets.BLOCK_PARTS))
    ap.add_argument("--m", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--no-fused", action="store_true", help="skip the fused_grouped provider")
    args = ap.parse_args()
    for m in args.m:
        case = presets.block_case("block", "llama3-8b", m, "bfloat16", part=args.part)
        data = block.make_block_data(case, torch.device("cuda"))
        t = _group_tensors(case, data)
        keep = [block.BUILDERS["floor_grouped"](case, data.sets[0])]
        graphs = {"floor_grouped": capture_graph(block_step(data, keep[0]), list(data.x))}
        if not args.no_fused:
            keep.append(block.BUILDERS["fused_grouped"](case, data.sets[0]))
            graphs["fused_grouped"] = capture_graph(block_step(data, keep[1]), list(data.x) + list(keep[1].params))
        graphs["compose_addmm"] = capture_graph(_compose(t, kcat=False), [])
        graphs["compose_kcat"] = capture_graph(_compose(t, kcat=True), [])
        for name, fn in _pieces(t).items():
            graphs[name] = capture_graph(fn, [])
        times = _replay(graphs, args.rounds, args.replays)
        fl = times["floor_grouped"]
        print(f"\n==== {case.name} (N={t['n']}, K={t['k']}, R={t['r']}): CUDA-graph replay, us, median of "
              f"{args.rounds} interleaved rounds of {args.replays}; ratio = median of the rounds' ratios to the "
              "floor")
        for name, ts in times.items():
            ratio = statistics.median(v / f for v, f in zip(ts, fl))
            print(f"  {name:28s} {statistics.median(ts):9.1f} us  {ratio:6.3f}x  [{min(ts):.1f}, {max(ts):.1f}]")
        graphs = keep = t = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
