"""CPU: the host cost of a LoRA model's eager training step through the C++ launch path, without its launches.

A tiny Llama (transformers, built from a config) gets ``apply_lora`` on all seven projections, with and without
``group_projections``; the CPU test build of csrc/lora_launch.cpp (tests/cpp/launch_dry_module.cpp) takes its
CPU tensors (``_launch.use_module(..., any_device=True)``) and runs every layer's and group's host path under
LORA_OPS_LAUNCH_NOOP=1: the modules' Python, the C++ checks, plans, allocations and tensor ops, autograd, all but
the kernels' launches (the LoRA outputs are uninitialized; the model's own ops run on them). Per way it prints the
microseconds of one step (median of --loops loops of --iters steps), the aten ops of one step and, with --py, the
lora_ops Python functions by own time (cProfile). Steps of the same model differ by way only in lora_ops' part.

    TRITON_INTERPRET=1 python scripts/host_model_cpu.py [--iters 30] [--loops 5] [--py 12]
"""
import argparse
import cProfile
import os
import pstats
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Each way: (group_projections, environment, the finish kernel on).
WAYS = {"ungrouped, torch's sums": (False, {}, False),
        "ungrouped (the default)": (False, {}, True),
        "grouped, block_diag, cat(dY), torch's sums": (True, {"LORA_OPS_GROUP_B": "blockdiag"}, False),
        "grouped, B_rows + dY segments + finish kernel (the default)": (True, {"LORA_OPS_GROUP_B": "rows",
                                                                  "LORA_OPS_GROUP_DY": "segments"}, True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--py", type=int, default=0, help="list this many lora_ops Python functions by own time")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=1 (on a CPU the Triton backend the modules ask for is the interpreter)")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    os.environ["LORA_OPS_BACKEND"] = "triton"
    os.environ["LORA_OPS_GROUP_FWD"] = os.environ["LORA_OPS_GROUP_BWD"] = "concat"
    from host_group_cpu import build, median_us, set_way
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_ops
    from lora_ops import _launch

    mod = build()
    _launch.use_module(mod, any_device=True)
    _launch._ensure_device(torch.device("cpu"))
    os.environ["LORA_OPS_LAUNCH_NOOP"] = "1"
    # GQA: k/v have half of q's columns; every member's columns a whole number of the interpreter's split unit.
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, torch_dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    try:
        for name, (grouped, env, finish) in WAYS.items():
            set_way(mod, env, finish)
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(torch.bfloat16)
            lora_ops.apply_lora(model, target_modules=targets, r=16, lora_alpha=32, group_projections=grouped)
            params = [p for p in model.parameters() if p.requires_grad]

            def step():
                for p in params:
                    p.grad = None
                model(ids).logits.float().mean().backward()

            us = median_us(step, args.loops, args.iters, 5)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
            print(f"{name:48s} {us:8.1f} us per step, {n_ops} aten ops "
                  f"({args.layers} layers, {args.tokens} tokens)")
            if args.py:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(args.iters):
                    step()
                pr.disable()
                stats = pstats.Stats(pr).stats
                rows = sorted(((k, v) for k, v in stats.items() if "lora_ops" in k[0]), key=lambda kv: -kv[1][2])
                for (file, line, fn), (_, calls, own, cum, _) in rows[:args.py]:
                    print(f"      {own / args.iters * 1e6:7.1f} us own {cum / args.iters * 1e6:7.1f} us cum "
                          f"x{calls // args.iters:<3d} {Path(file).name}:{line} {fn}")
    finally:
        os.environ.pop("LORA_OPS_LAUNCH_NOOP", None)


if __name__ == "__main__":
    main()
