"""GPU: where the device time of one block-preset case goes, provider by provider (grouped against ungrouped).

Builds the ``block`` preset's case (benchmarks/presets.py ``block_case``: the whole block or one group alone) and,
for each provider, profiles ``--steps`` fwd+bwd calls with torch.profiler: the device time per call of each kernel
(summed by name, largest first), the total, the host time per call and the fwd+bwd replayed from a CUDA graph.

    python scripts/profile_block.py [--part gate_up] [--m 2048] [--providers floor_grouped,fused,fused_grouped]
"""
import argparse
import sys
from pathlib import Path

import torch

from profile_layer import graph_ms, print_kernels  # scripts/profile_layer.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import block, presets  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="gate_up", choices=list(presets.BLOCK_PARTS))
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--providers", default="floor_grouped,fused,fused_grouped,fused_qlora,fused_qlora_grouped")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cpu-top", type=int, default=0, help="also list this many host ops by self CPU time")
    args = ap.parse_args()
    case = presets.block_case("block", "llama3-8b", args.m, "bfloat16", part=args.part)
    data = block.make_block_data(case, torch.device("cuda"))
    for provider in args.providers.split(","):
        built = block.BUILDERS[provider](case, data.sets[0])
        params = list(built.params or ())

        def step(built=built, params=params):
            for t in list(data.x) + params:
                t.grad = None
            torch.autograd.backward(built.forward(data.x), data.dy)

        print_kernels(f"\n==== {case.name} {provider}", step, args.steps, args.top, args.cpu_top)
        try:  # device time alone, for host-bound cases
            print(f"    CUDA-graph replay: {graph_ms(step, params) * 1e3:.1f} us per fwd+bwd")
        except RuntimeError as e:
            print(f"    CUDA-graph replay failed: {str(e).splitlines()[0][:100]}")
        built = step = None  # free the provider's weights before the next one is built
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
