"""The one tolerance table and the assertion helpers every numerical test uses, and helpers several test files
share (running lora_linear with its dropout mask; checking that a failed call left a model unchanged).

Same-computation tests (kernel vs reference on the SAME weights) use ``assert_rel_close`` with the
tolerance of the inputs' dtype: relative Frobenius error ||out - ref|| / ||ref||. Mutation controls pass
a deliberately wrong result through the same helper and expect it to fail.
"""
import torch

from lora_ops import _backend, lora_linear
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed

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


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same NaN positions, same +-inf positions and signs, finite parts close (fp32 table entry)."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf positions differ"
    fin = torch.isfinite(want)
    assert_rel_close(got[fin], want[fin], torch.float32, f"{what} finite part")


# ------------------------------------------------------------------------ lora_linear and its dropout mask

def run_lora(backend, x, w, a, b, scaling, bias, p, dy, seed=1234):
    """lora_linear forward + backward on ``backend`` under torch.manual_seed(seed): (y, dx, dA, dB, dbias)."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    with _backend.use_backend(backend):
        torch.manual_seed(seed)
        y = lora_linear(x, w, a, b, scaling, bias=bias, dropout_p=p)
        y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


def kernel_mask(backend, seed, rows, cols, p):
    """The keep-mask the selected backend draws for the next lora_linear call after manual_seed(seed), or None
    for p == 0 (no dropout: the oracles then take no mask)."""
    if p == 0.0:
        return None
    with _backend.use_backend(backend):
        torch.manual_seed(seed)
        return materialize_dropout_mask(peek_dropout_seed("cpu"), rows, cols, p, "cpu")


# --------------------------------------------------------------------- a failed call leaves a model unchanged

def snapshot(model):
    """Everything a failed call must leave unchanged: module types, parameter flags and every tensor."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, snap):
    types, flags, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types, "modules were swapped"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags, "requires_grad flags changed"
    now = model.state_dict()
    assert set(now) == set(sd), f"state_dict keys changed: {set(now) ^ set(sd)}"
    for k, v in now.items():
        assert v.dtype == sd[k].dtype and v.device == sd[k].device and torch.equal(v, sd[k]), f"{k} changed"
