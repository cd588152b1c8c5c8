"""GPU: launcher settings A/B-timed on a block-preset case, every setting in one process.

A variant is a space-separated list of ``tile=BMxBNxBK/warps/stages`` (the TMA GEMM's large tile, as
``LORA_OPS_TMA_TILE``), ``base_mm=0|1|fwd|dx`` (as ``LORA_OPS_BASE_MM``), ``presum=0|1`` (as
``LORA_OPS_SPLIT_PRESUM``), ``launch=python`` (the Python launchers, as ``LORA_OPS_LAUNCH``), ``flatten=0|1`` (the
TMA GEMM's flattened tile loop, as ``LORA_OPS_TMA_FLATTEN``), ``chunk_mib=N`` and ``chunk_min_m=M`` (the NF4
temporary's chunk bound in MiB and the fewest rows that chunk it, as ``LORA_OPS_NF4_CHUNK_MIB`` /
``LORA_OPS_NF4_CHUNK_MIN_M``), ``side=0|1`` (dA on a second stream beside a narrower dX GEMM, as
``LORA_OPS_SIDE_DA``), ``side_dq=0|1`` (NF4 dequantizations on a second stream: a whole weight's beside the S / dS
pass, a chunk's beside the previous chunk's GEMM, as ``LORA_OPS_SIDE_DQ``), ``ws=0|1`` (the warp-specialized Gluon
GEMM in place of the TMA kernel on sm_90, as ``LORA_OPS_WS``), or ``default``. For each variant the
grouped providers' fwd+bwd is warmed up and captured in a CUDA graph under it (the launch plans dropped between
variants, so the C++ path registers its kernels and settings again), and so is the floor's. Then ``--rounds`` rounds
replay every graph ``--replays`` times, in turn, timed with CUDA events: device time only, the variants interleaved,
so clock drift between them cancels. Per provider and variant: the median per fwd+bwd over the rounds and the median
of each round's ratio to the floor.

    python scripts/ab_settings.py [--part qkv] [--m 2048 8192] [--variants "default;base_mm=fwd;tile=256x128x64/8/3"]
"""
import argparse
import os
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

_DEFAULTS = {}  # the launcher settings as imported (environment included), restored before each variant
# Settings the launchers read from the environment at each call (the C++ path keys its plans on them): variable ->
# the variant's key.
_ENV = {"LORA_OPS_LAUNCH": "launch", "LORA_OPS_TMA_FLATTEN": "flatten"}


def _use(variant):
    """Make ``variant``'s settings those of the following launches (the Python launchers and, once they have
    registered again, the C++ path), the others at their defaults."""
    from lora_ops import _launch
    from lora_ops.triton_kernels import lora as L, lora_tuning as T
    names = ("_TMA_CONFIGS", "_BASE_MM", "_PRESUM", "NF4_CHUNK_BYTES", "NF4_CHUNK_MIN_M", "_SIDE_DA",
             "_SIDE_DQ", "_WS")
    if not _DEFAULTS:
        _DEFAULTS.update((n, getattr(L, n)) for n in names)
        _DEFAULTS.update((v, os.environ.get(v)) for v in _ENV)
    for n in names:
        setattr(L, n, _DEFAULTS[n])
    for v in _ENV:
        if _DEFAULTS[v] is None:
            os.environ.pop(v, None)
        else:
            os.environ[v] = _DEFAULTS[v]
    for item in variant.split():
        key, _, value = item.partition("=")
        if key == "tile":
            L._TMA_CONFIGS = T._tma_tile(value)
        elif key == "base_mm":
            L._BASE_MM = L._base_mm_setting(value)
        elif key == "presum":
            L._PRESUM = value not in ("", "0")
        elif key == "chunk_mib":
            L.NF4_CHUNK_BYTES = int(value) << 20
        elif key == "chunk_min_m":
            L.NF4_CHUNK_MIN_M = int(value)
        elif key == "side":
            L._SIDE_DA = value not in ("", "0")
        elif key == "side_dq":
            L._SIDE_DQ = value not in ("", "0")
        elif key == "ws":
            L._WS = value not in ("", "0")
        elif key in _ENV.values():
            os.environ[next(v for v, k in _ENV.items() if k == key)] = value
        elif item != "default":
            raise ValueError(f"variant item {item!r}: use tile=..., base_mm=..., presum=0|1, launch=python, "
                             "flatten=0|1, chunk_mib=N, chunk_min_m=M, side=0|1, side_dq=0|1, ws=0|1 or default")
    _launch.forget_plans()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="qkv", choices=list(presets.BLOCK_PARTS))
    ap.add_argument("--m", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--providers", default="fused_grouped,fused_qlora_grouped")
    ap.add_argument("--variants", default="default;base_mm=1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--replays", type=int, default=10)
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(";")]
    for m in args.m:
        case = presets.block_case("block", "llama3-8b", m, "bfloat16", part=args.part)
        data = block.make_block_data(case, torch.device("cuda"))
        graphs = {}
        keep = []  # the built providers stay alive while their graphs replay
        floor = block.BUILDERS["floor_grouped"](case, data.sets[0])
        keep.append(floor)
        graphs[("floor_grouped", "-")] = capture_graph(block_step(data, floor), list(data.x))
        for provider in args.providers.split(","):
            built = block.BUILDERS[provider](case, data.sets[0])
            keep.append(built)
            params = list(data.x) + list(built.params or ())
            for variant in variants:
                _use(variant)
                graphs[(provider, variant)] = capture_graph(block_step(data, built), params)
        _use("default")
        times = {k: [] for k in graphs}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(args.rounds):
            for k, g in graphs.items():
                start.record()
                for _ in range(args.replays):
                    g.replay()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) * 1e3 / args.replays)
        fl = times[("floor_grouped", "-")]
        print(f"\n==== {case.name}: CUDA-graph replay, us per fwd+bwd, median of {args.rounds} interleaved rounds "
              f"of {args.replays} replays; ratio = median of the rounds' ratios to floor_grouped")
        print(f"  floor_grouped {statistics.median(fl):9.1f} us")
        for (provider, variant), ts in times.items():
            if provider == "floor_grouped":
                continue
            ratio = statistics.median(t / f for t, f in zip(ts, fl))
            print(f"  {provider:22s} {variant:24s} {statistics.median(ts):9.1f} us  {ratio:.3f}x  "
                  f"[{min(ts):.1f}, {max(ts):.1f}]")
        graphs = keep = floor = built = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
