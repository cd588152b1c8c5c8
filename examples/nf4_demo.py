"""Quantize a weight to NF4 with lora_ops, check it byte for byte against bitsandbytes, and run one QLoRA
forward/backward through lora_ops.lora_linear. Prints the checks, the quantization error and the sizes.

    python examples/nf4_demo.py [--out 4096] [--in 4096] [--device cpu|cuda]
"""
import argparse
import logging
import time

import torch

import lora_ops


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community" when the
    optional `kernels` package (which fetches a CPU kernel from the Hugging Face hub) is absent, then uses its own
    CPU code. This demo only compares bytes with bitsandbytes, so that one notice is dropped."""

    def filter(self, record):
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="inp", type=int, default=1000, help="in_features (default 1000: blocks straddle rows)")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    w = (torch.randn(args.out, args.inp, device=dev) * 0.02).to(torch.bfloat16)

    t = time.perf_counter()
    w4 = lora_ops.quantize_nf4(w, blocksize=args.blocksize, double_quant=True)
    t_q = time.perf_counter() - t
    deq = w4.dequantize()
    err = (deq.float() - w.float())
    sqnr = 10 * torch.log10(w.float().pow(2).mean() / err.pow(2).mean()).item()
    print(f"weight {tuple(w.shape)} {w.dtype} on {dev}: quantized in {t_q * 1e3:.1f} ms")
    print(f"  bytes: bf16 {w.numel() * 2:,}  ->  NF4 {w4.nbytes():,} ({w.numel() * 2 / w4.nbytes():.2f}x smaller, "
          f"{8 * w4.nbytes() / w.numel():.3f} bits/weight)")
    print(f"  round-trip error: max |dw| {err.abs().max().item():.3e}, rms {err.pow(2).mean().sqrt().item():.3e}, "
          f"SQNR {sqnr:.2f} dB")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # bitsandbytes is optional
        print(f"  bitsandbytes not available ({type(e).__name__}); skipped the byte comparison")
    else:
        packed, state = F.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4", compress_statistics=True)
        same_bytes = torch.equal(packed.view(-1).cpu(), w4.data.view(-1).cpu())
        same_offset = torch.equal(state.offset.cpu().reshape(()), w4.offset.cpu().reshape(()))
        nested_diff = (state.absmax.cpu() != w4.absmax.cpu()).sum().item()
        print(f"  vs bitsandbytes {getattr(__import__('bitsandbytes'), '__version__', '?')} on {dev}: 4-bit bytes "
              f"identical: {same_bytes}; offset identical: {same_offset}; nested absmax codes differing: "
              f"{nested_diff} of {state.absmax.numel()}"
              + (" (bitsandbytes' CPU path approximates those; its CUDA path and ours pick the nearest)"
                 if dev.type == "cpu" else ""))
        sd = w4.state_dict("layer.")
        qs = F.QuantState.from_dict({k[len("layer.weight."):]: v for k, v in sd.items() if k != "layer.weight"},
                                    device=dev)
        bnb_deq = F.dequantize_4bit(w4.data, qs)
        print(f"  bitsandbytes dequantizing our checkpoint gives our weights exactly: {torch.equal(bnb_deq, deq)}")

    r, m = 16, 64
    x = torch.randn(m, args.inp, device=dev, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, args.inp, device=dev) / args.inp ** 0.5).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(args.out, r, device=dev) * 0.01).to(torch.bfloat16).requires_grad_()
    y = lora_ops.lora_linear(x, w4, A, B, scaling=2.0, dropout_p=0.05)
    y.float().pow(2).mean().backward()
    print(f"QLoRA step: y {tuple(y.shape)}, |dA| {A.grad.float().norm().item():.3e}, |dB| {B.grad.float().norm().item():.3e}")


if __name__ == "__main__":
    main()
