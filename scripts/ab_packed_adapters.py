"""GPU: the eager fwd+bwd of a grouped block-preset case with the groups' adapters packed (each group's lora_A and
lora_B row views of one buffer, which the C++ group stacks as views) against the same adapters in separate
tensors (concatenated in every call), rounds interleaved in one process.

Each round times ``--iters`` eager calls per way (up to a synchronize, so a host-bound step reads its host time)
and the host time alone; the medians over ``--rounds`` rounds and their ratio are printed per provider.

    python scripts/ab_packed_adapters.py [--part qkv] [--m 2048] [--providers fused_grouped,fused_qlora_grouped]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from profile_block import block_step
from profile_layer import loop_us

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import block, presets  # noqa: E402


def _adjacent(ts) -> bool:
    """One storage, each tensor right after the one before (the C++ group's test; separately allocated tensors
    can be neighbours in the caching allocator's memory without sharing a storage)."""
    return all(b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
               and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(ts, ts[1:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="qkv", choices=list(presets.BLOCK_PARTS))
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--providers", default="fused_grouped,fused_qlora_grouped")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    from lora_ops.grouped import projection_groups

    case = presets.block_case("block", "llama3-8b", args.m, "bfloat16", part=args.part)
    data = block.make_block_data(case, torch.device("cuda"))
    for provider in args.providers.split(","):
        built = block.BUILDERS[provider](case, data.sets[0])
        groups = list(projection_groups(built.module).values())
        members = [m for g in groups for m in g.members]
        step = block_step(data, built)

        def packed(on: bool):
            with torch.no_grad():
                if on:
                    for g in groups:
                        g._pack_adapters()
                else:
                    for m in members:
                        m.lora_A.data = m.lora_A.data.clone()
                        m.lora_B.data = m.lora_B.data.clone()
            for g in groups:
                assert _adjacent([m.lora_A for m in g.members]) == on

        times = {True: [], False: []}
        host = {True: [], False: []}
        for _ in range(args.rounds):
            for way in (True, False):
                packed(way)
                times[way].append(loop_us(step, args.iters, warmup=2))
                host[way].append(loop_us(step, args.iters, warmup=1, host_only=True))
        med = {w: statistics.median(v) for w, v in times.items()}
        hmed = {w: statistics.median(v) for w, v in host.items()}
        print(f"{case.name} {provider}: eager {med[True]:.1f} us packed, {med[False]:.1f} us separate "
              f"(packed / separate {med[True] / med[False]:.3f}); host alone {hmed[True]:.1f} / {hmed[False]:.1f} us "
              f"({hmed[True] / hmed[False]:.3f}); medians of {args.rounds} interleaved rounds of {args.iters} calls")
        built = step = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
