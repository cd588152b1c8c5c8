"""GPU diagnostic: does the benchmark process's history slow a host-bound step? The q/k/v block case at 2048 rows:
the eager loop, host time and do_bench median of floor_grouped and fused_grouped in a fresh process, then after
the block preset's other providers (PEFT, PEFT+bitsandbytes, the ungrouped fused layers) were built and run a few
steps and freed, as the preset does between providers, then with Python's garbage collector frozen, then
disabled. One process. Each line also gives, over the eager loops, the CPU time of all the process's threads
per call next to the wall time (a preempted host shows wall above CPU; a synchronize that spin-waits counts as
CPU) and the caching allocator's calls to the driver (cudaMalloc / cudaFree, allocation retries, whole-device
syncs: what a fragmented pool costs).

    python scripts/diag_host_state.py [--m 2048] [--others peft,peft_bnb,fused,fused_qlora]
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from profile_block import block_step
from profile_layer import loop_us

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import block, presets  # noqa: E402


# The caching allocator's counters that count driver calls and syncs (torch.cuda.memory_stats keys).
DRIVER_STATS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--others", default="peft,peft_bnb,fused,fused_qlora")
    args = ap.parse_args()
    case = presets.block_case("block", "llama3-8b", args.m, "bfloat16", part="qkv")
    data = block.make_block_data(case, torch.device("cuda"))
    timed = ("floor_grouped", "fused_grouped", "fused_qlora_grouped")

    def measure(stage):
        for provider in timed:
            built = block.BUILDERS[provider](case, data.sets[0])
            step = block_step(data, built)
            stats0, cpu0, wall0 = torch.cuda.memory_stats(), time.process_time(), time.perf_counter()
            e = statistics.median(loop_us(step, 30, warmup=2) for _ in range(5))
            cpu = (time.process_time() - cpu0) / (5 * 32) * 1e6
            wall = (time.perf_counter() - wall0) / (5 * 32) * 1e6
            stats1 = torch.cuda.memory_stats()
            drv = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in DRIVER_STATS}
            h = statistics.median(loop_us(step, 30, warmup=1, host_only=True) for _ in range(5))
            b = do_bench(step, warmup=25, rep=100, return_mode="median") * 1e3
            print(f"{stage:28s} {provider:20s} eager {e:7.1f} us, host alone {h:7.1f} us, do_bench {b:7.1f} us "
                  f"(gc objects {len(gc.get_objects())}, threads {torch.get_num_threads()}); eager loops: process "
                  f"CPU {cpu:7.1f} us / wall {wall:7.1f} us per call, allocator over {5 * 32} calls: "
                  + ", ".join(f"{k} {v}" for k, v in drv.items()), flush=True)
            built = step = None
            gc.collect()
            torch.cuda.empty_cache()

    measure("fresh process")
    for provider in args.others.split(","):
        built = block.BUILDERS[provider](case, data.sets[0])
        step = block_step(data, built)
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        built = step = None
        gc.collect()
        torch.cuda.empty_cache()
    measure("after the other providers")
    gc.collect()
    gc.freeze()
    measure("gc frozen")
    gc.unfreeze()
    gc.disable()
    measure("gc disabled")
    gc.enable()


if __name__ == "__main__":
    main()
