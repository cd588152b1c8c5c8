"""QLoRA fine-tuning of a tiny Llama on the text in examples/data/, end to end, with lora_ops.

The model is a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random init, nothing is
downloaded) over a byte-level vocabulary (256 tokens: the text's UTF-8 bytes). ``lora_ops.apply_lora(...,
quantize="nf4")`` quantizes every attention and MLP projection to NF4 (bitsandbytes' format) and adds LoRA
adapters; only the adapters train. Prints the loss of every step (it falls), tokens/s and peak memory.

    python examples/finetune.py [--device cpu|cuda] [--steps 100] [--dtype float32|bfloat16] [--save DIR]

On CPU the default run takes well under a minute.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

import lora_ops

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_bytes(data_dir: str) -> torch.Tensor:
    """All ``*.txt`` files of ``data_dir`` as one int64 tensor of UTF-8 byte values (the token ids)."""
    paths = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not paths:
        raise ValueError(f"no *.txt files in {data_dir!r}; point --data at a folder of text files")
    text = "\n\n".join(open(p, encoding="utf-8").read() for p in paths)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def build_model(seq_len: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.1 instead of Llama's 0.02: with hidden size 64 and a frozen random lm_head of std 0.02
    # the logits can only span about +-1, so no adapter could move the loss much (measured: 5.29 -> 5.01 in 100
    # steps, against 5.02 -> 3.47 with 0.1).
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                         tie_word_embeddings=False, initializer_range=0.1)
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (torch.cuda.max_memory_allocated)"
    try:
        import resource
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{rss_kib / 1024:.1f} MiB (process peak RSS)"
    except ImportError:  # not on Windows
        return "n/a"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="base and compute dtype (bfloat16 is for GPUs; CPU bf16 matmuls are slow)")
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--save", default=None, help="write the trained adapter here (PEFT format)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps={args.steps} must be >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    log = (lambda *a: None) if args.quiet else print

    torch.manual_seed(args.seed)
    data = load_bytes(args.data)
    if data.numel() <= args.seq + 1:
        raise ValueError(f"the text has {data.numel()} bytes; --seq={args.seq} needs more")
    model = build_model(args.seq, dtype, device)
    n_dense = sum(p.numel() for p in model.parameters())
    lora_ops.apply_lora(model, target_modules=TARGETS, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        quantize="nf4")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    log(f"tiny Llama ({n_dense:,} params, byte vocab 256) on {device}, {args.dtype}; QLoRA r={args.r} on "
        f"{len(lora_ops.inject.lora_layers(model))} NF4 layers: {n_train:,} trainable params; "
        f"{data.numel():,} bytes of text")
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    model.train()

    gen = torch.Generator().manual_seed(args.seed)
    losses, tokens = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()]).to(device)
        ts = time.perf_counter()
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())  # HF shifts the labels itself
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())  # synchronizes on CUDA, so the step time below is real
        dt = time.perf_counter() - ts
        tokens += batch[:, :-1].numel()
        losses.append(loss_value)
        log(f"step {step:4d}  loss {loss_value:.4f}  {batch[:, :-1].numel() / dt:,.0f} tok/s")
    elapsed = time.perf_counter() - t0
    tok_s = tokens / elapsed
    k = max(1, min(5, args.steps // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    log(f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f}; {tokens:,} tokens in {elapsed:.2f} s = "
        f"{tok_s:,.0f} tok/s; peak memory {peak_memory(device)}")
    if args.save:
        lora_ops.save_adapter(model, args.save)
        log(f"adapter written to {args.save} (PEFT format)")
    return {"losses": losses, "tokens_per_s": tok_s, "peak_memory": peak_memory(device), "model": model}


if __name__ == "__main__":
    main(sys.argv[1:])
