"""What projection grouping costs in memory: a Llama model trained without checkpointing, grouped and ungrouped.

    python scripts/group_memory.py       # CUDA: Llama-3-8B-shaped layers, 1 x 2048 tokens, QLoRA and LoRA
    python scripts/group_memory.py --size tiny --device cpu

For each base (NF4 with double quantization, bf16) and each way (ungrouped; grouped; grouped with every member
computing its own forward, ``LORA_OPS_GROUP_FWD=members``, which only the C++ launch path on CUDA reads; for NF4
also grouped with ``LORA_OPS_GROUP_ABSMAX=codes``, the members' codes kept instead of their decoded fp32 absmax),
one forward + backward of the model and three numbers:

* ``weights``: the memory the model holds once the adapters are on (CUDA only): a double-quantized group keeps its
  members' absmax decoded to fp32 (4 bytes per 64 weights) beside their codes;
* ``group-held``: the bytes the projection groups hold that no member's parameter shares (any device): the
  decoded fp32 absmax, or with ``codes`` one offset per 256 quantization blocks; nothing for a bf16 base;
* ``saved``: the bytes of the distinct storages autograd saved for the backward, parameters and buffers left out
  (any device): a member output that is a view of the group's (M, sum N_i) output keeps the whole output alive
  when an op after the layer saves it (SDPA saves v);
* ``peak extra``: the peak of memory allocated during a second step above what is allocated before it (CUDA only).
  The first step is a warm-up: it compiles and tunes the kernels (their temporaries) and allocates the launch
  path's persistent NF4 workspaces, which then count in neither column, whichever way ran first.

The vocabulary is small (1024) so that the logits do not hide the layers' share.
"""
from __future__ import annotations

import argparse
import gc
import os
from typing import Callable, Dict, Optional

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
         "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)}


def saved_bytes(step: Callable[[], torch.Tensor], exclude=()) -> tuple:
    """Run ``step`` (a forward that returns a scalar) and return (its output, bytes of the distinct storages autograd
    saved for the backward), storages of ``exclude`` (parameters, buffers) not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return out, sum(seen.values())


def group_held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the storages that the model's projection groups hold beyond their members' parameters."""
    from lora_ops.grouped import projection_groups

    total = 0
    for group in projection_groups(model).values():
        shared = {p.untyped_storage().data_ptr() for m in group.members for p in m.parameters()}
        base = group._base
        tensors = [base] if isinstance(base, torch.Tensor) else [
            t for t in vars(base).values() if isinstance(t, torch.Tensor)]  # an NF4Weight's fields
        seen = set()
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in shared and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def measure(size: str, device: torch.device, layers: int, tokens: int, quantize: Optional[str], group: bool,
            members_fwd: bool, codes: bool = False) -> Dict[str, float]:
    import lora_ops
    from transformers import AutoModelForCausalLM, LlamaConfig

    for var, on, value in (("LORA_OPS_GROUP_FWD", members_fwd, "members"), ("LORA_OPS_GROUP_ABSMAX", codes, "codes")):
        if on:
            os.environ[var] = value
        else:
            os.environ.pop(var, None)
    cfg = LlamaConfig(vocab_size=1024, num_hidden_layers=layers, use_cache=False, attn_implementation="sdpa",
                      tie_word_embeddings=False, **SIZES[size])
    cuda = device.type == "cuda"
    gc.collect()  # the previous model's group and members refer to each other: free it before measuring
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).train()
    model.enable_input_require_grads()
    lora_ops.apply_lora(model, TARGETS, r=16, lora_alpha=32, lora_dropout=0.0, quantize=quantize, blocksize=64,
                        double_quant=True, group_projections=group)
    keep = list(model.parameters()) + list(model.buffers())
    for mod in model.modules():  # tensors held as plain attributes, e.g. a group's stacked NF4 base
        for v in vars(mod).values():
            if isinstance(v, lora_ops.NF4Weight):
                keep += [t for t in vars(v).values() if isinstance(t, torch.Tensor)]
            elif isinstance(v, torch.Tensor):
                keep.append(v)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
    row: Dict[str, float] = {"group_mib": group_held_bytes(model) / 2**20}
    if cuda:
        torch.cuda.synchronize()
        row["weights_mib"] = (torch.cuda.memory_allocated() - before) / 2**20
    model(input_ids=ids, labels=ids).loss.backward()  # the warm-up step
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss, saved = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, keep)
    loss.backward()
    row["saved_mib"] = saved / 2**20
    if cuda:
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["loss"] = loss.item()
    del model, keep, loss
    os.environ.pop("LORA_OPS_GROUP_FWD", None)
    os.environ.pop("LORA_OPS_GROUP_ABSMAX", None)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=None, help="sequence length (default 2048; tiny: 64)")
    args = ap.parse_args(argv)
    tokens = args.tokens or (64 if args.size == "tiny" else 2048)
    device = torch.device(args.device)
    print(f"| base | way | weights MiB | group-held MiB | saved MiB | peak extra MiB | loss |  ({args.layers} "
          f"layers of {args.size}, 1 x {tokens} tokens, {device.type}, no checkpointing)")
    for quantize in ("nf4", None):
        ways = [("ungrouped", False, False, False), ("grouped", True, False, False),
                ("grouped, members' forward", True, True, False)]
        if quantize:
            ways.append(("grouped, codes", True, False, True))
        for way, group, members, codes in ways:
            r = measure(args.size, device, args.layers, tokens, quantize, group, members, codes)
            cells = [f"{r[k]:.2f}" if k in r else "–"
                     for k in ("weights_mib", "group_mib", "saved_mib", "peak_extra_mib")]
            print(f"| {quantize or 'bf16'} | {way} | " + " | ".join(cells) + f" | {r['loss']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
