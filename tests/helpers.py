"""The one tolerance table and the assertion helpers every numerical test uses.

Same-computation tests (kernel vs reference on the SAME weights) use ``assert_rel_close`` with the
tolerance of the inputs' dtype: relative Frobenius error ||out - ref|| / ||ref||. Mutation controls pass
a deliberately wrong result through the same helper and expect it to fail.
"""
import torch

# Relative Frobenius error allowed for a result computed from inputs of this dtype, against an oracle
# computed in fp32 or fp64 from the same inputs. fp32 is IEEE (no tf32); bf16/fp16 round the output once
# (plus the rounding of S), so they sit well under these bounds on random data.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "result") -> float:
    err = rel_error(out, ref)
    tol = REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} for {dtype}"
    return err
