"""GPU diagnostic: does one torch.profiler session slow later eager calls? q/k/v block case, eager loop and host
time before and after one profiled call (as benchmarks/harness.py profiles), per provider, one process."""
import statistics
import sys
from pathlib import Path

import torch

from profile_block import block_step
from profile_layer import loop_us

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import block, presets  # noqa: E402


def main():
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    case = presets.block_case("block", "llama3-8b", m, "bfloat16", part="qkv")
    data = block.make_block_data(case, torch.device("cuda"))
    from torch.profiler import ProfilerActivity, profile
    for provider in ("floor_grouped", "fused_grouped", "fused_qlora_grouped"):
        built = block.BUILDERS[provider](case, data.sets[0])
        step = block_step(data, built)

        def measure():
            e = statistics.median(loop_us(step, 30, warmup=2) for _ in range(5))
            h = statistics.median(loop_us(step, 30, warmup=1, host_only=True) for _ in range(5))
            return e, h
        before = measure()
        for i in range(2):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
                step()
                torch.cuda.synchronize()
            after = measure()
            print(f"{case.name} {provider}: eager {before[0]:.1f} -> {after[0]:.1f} us, host {before[1]:.1f} -> "
                  f"{after[1]:.1f} us after profiled session {i + 1}", flush=True)
        built = step = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
