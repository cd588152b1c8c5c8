"""GPU: does a LoRALinear train under torch.compile(mode="reduce-overhead")? Runs a few training steps of a
LoRALinear (gradients set to None before each step, as zero_grad(set_to_none=True) does, and, to compare, left to
accumulate) and of a frozen nn.Linear, printing which ones run. Set LORA_OPS_LAUNCH=python to compare with the
Python launchers.

    python scripts/compile_probe.py [lora] [lora_accumulate] [frozen]
"""
import os
import sys

import torch

import lora_ops


def loop(make, mode="reduce-overhead", steps=5, accumulate=False):
    layer = make()
    compiled = torch.compile(layer, mode=mode)
    dy = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for i in range(steps):
        if not accumulate:
            for p in layer.parameters():
                p.grad = None
        x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            y = compiled(x)
            y.backward(dy)
        except Exception as e:  # noqa: BLE001
            return f"FAILED at step {i}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    torch.cuda.synchronize()
    return "ok"


def lora():
    m = lora_ops.LoRALinear.from_linear(torch.nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16), r=16)
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def frozen():
    return torch.nn.Linear(512, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)


if __name__ == "__main__":
    which = sys.argv[1:] or ["lora", "lora_accumulate", "frozen"]
    for name in which:
        torch._dynamo.reset()
        print(f"{name} reduce-overhead (LORA_OPS_LAUNCH={os.environ.get('LORA_OPS_LAUNCH', '')}):",
              loop(frozen if name == "frozen" else lora, accumulate=name == "lora_accumulate"), flush=True)
    torch._dynamo.reset()
    print("lora default mode:", loop(lora, mode="default"), flush=True)
