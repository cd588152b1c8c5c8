"""The dropout contract of lora_linear (lora_ops/functional.py, draw_dropout_seed): the seed comes from torch's generator at
forward time, the backward regenerates the forward's mask from it, the mask is never stored at M x K, and
checkpointing / manual_seed reproduce it."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_ops import lora_linear, quantize_nf4
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed
from helpers import assert_rel_close

M, K, N, R = 37, 129, 70, 8
P = 0.3


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")


def _inputs(dtype=torch.float32, seed=0, m=M):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    a = (torch.randn(R, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, R, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    dy = torch.randn(m, N, generator=g).to(dtype)
    return x, w, a, b, bias, dy


def _run(x, w, a, b, bias, dy, p=P, training=True, scaling=2.0):
    x, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (x, a, b, bias))
    y = lora_linear(x, w, a, b, scaling, bias, dropout_p=p, training=training)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, bias.grad


def _oracle(x, w, a, b, bias, dy, mask, p=P, scaling=2.0):
    """float64 y and grads with an explicit keep-mask, by autograd of F.linear (no lora_ops code)."""
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_(True) for t in (x, a, b, bias))
    xd = x64 * mask.double() / (1.0 - p)
    y = F.linear(x64, w.double(), bias64) + scaling * F.linear(F.linear(xd, a64), b64)
    return (y.detach(),) + torch.autograd.grad(y, (x64, a64, b64, bias64), dy.double())


def assert_same_run(got, want, dtype=torch.float32, what=""):
    """The one assertion of this file: y and all four gradients within REL_TOL[dtype]."""
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert_rel_close(g, t, dtype, f"{what}{name}")


# --------------------------------------------------------------------------------------- p = 0, eval

def test_p0_and_eval_equal_no_dropout():
    x, w, a, b, bias, dy = _inputs()
    plain = _run(x, w, a, b, bias, dy, p=0.0)
    ones = torch.ones(M, K, dtype=torch.bool)
    assert_same_run(plain, _oracle(x, w, a, b, bias, dy, ones, p=0.0))
    for got in (_run(x, w, a, b, bias, dy, p=P, training=False), _run(x, w, a, b, bias, dy, p=0.0, training=True)):
        for g, t in zip(got, plain):
            assert torch.equal(g, t)


def test_p0_and_eval_do_not_draw_from_the_generator():
    # No seed is drawn when there is no dropout, so turning dropout off does not shift later random draws.
    x, w, a, b, bias, dy = _inputs()
    torch.manual_seed(5)
    _run(x, w, a, b, bias, dy, p=P, training=False)
    _run(x, w, a, b, bias, dy, p=0.0)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))


def test_dropout_changes_the_output():
    x, w, a, b, bias, dy = _inputs()
    y0 = _run(x, w, a, b, bias, dy, p=0.0)[0]
    y1 = _run(x, w, a, b, bias, dy, p=P)[0]
    assert (y0 - y1).abs().max() > 1e-2


# ------------------------------------------------------------------------- forward and backward, one mask

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, P, 0.9])
def test_forward_and_backward_use_the_peeked_mask(dtype, p):
    x, w, a, b, bias, dy = _inputs(dtype)
    torch.manual_seed(2024)
    seed = peek_dropout_seed("cpu")
    mask = materialize_dropout_mask(seed, M, K, p, "cpu")
    assert mask.shape == (M, K) and mask.dtype == torch.bool
    got = _run(x, w, a, b, bias, dy, p=p)
    assert_same_run(got, _oracle(x, w, a, b, bias, dy, mask, p=p), dtype)


def test_nf4_weight_uses_the_same_mask():
    x, w, a, b, bias, dy = _inputs()
    w4 = quantize_nf4(w, blocksize=64, double_quant=True)
    torch.manual_seed(77)
    mask = materialize_dropout_mask(peek_dropout_seed("cpu"), M, K, P, "cpu")
    got = _run(x, w4, a, b, bias, dy)
    assert_same_run(got, _oracle(x, w4.dequantize(torch.float32), a, b, bias, dy, mask))


def test_leading_dims_mask_is_over_flattened_rows():
    # x (2, 3, K) is flattened to (6, K) rows: the mask is the (6, K) mask of that seed.
    x, w, a, b, bias, dy = _inputs(m=6)
    torch.manual_seed(3)
    mask = materialize_dropout_mask(peek_dropout_seed("cpu"), 6, K, P, "cpu")
    got = _run(x.reshape(2, 3, K), w, a, b, bias, dy.reshape(2, 3, N))
    got = (got[0].reshape(6, N), got[1].reshape(6, K)) + got[2:]
    assert_same_run(got, _oracle(x, w, a, b, bias, dy, mask))


def test_control_another_seed_fails():
    x, w, a, b, bias, dy = _inputs()
    torch.manual_seed(2024)
    seed = peek_dropout_seed("cpu")
    got = _run(x, w, a, b, bias, dy)
    wrong = materialize_dropout_mask(seed + 1, M, K, P, "cpu")
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_run(got, _oracle(x, w, a, b, bias, dy, wrong))


def test_control_missing_inverse_keep_scale_fails():
    # A mask applied without the 1 / (1 - p) rescale must not pass.
    x, w, a, b, bias, dy = _inputs()
    torch.manual_seed(2024)
    mask = materialize_dropout_mask(peek_dropout_seed("cpu"), M, K, P, "cpu")
    got = _run(x, w, a, b, bias, dy)
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_run(got, _oracle(x, w, a, b, bias, dy, mask.float() * (1 - P)))


def test_backward_mask_is_visible_in_dx():
    # With W = 0 and a positive adapter path, dx is non-zero exactly where the forward kept x: the backward
    # applies the forward's mask (not a fresh one, not none).
    x = torch.randn(M, K)
    w = torch.zeros(N, K)
    a = torch.rand(R, K) + 0.1
    b = torch.rand(N, R) + 0.1
    torch.manual_seed(11)
    mask = materialize_dropout_mask(peek_dropout_seed("cpu"), M, K, P, "cpu")
    xr = x.clone().requires_grad_(True)
    lora_linear(xr, w, a, b, 1.0, dropout_p=P).sum().backward()
    assert torch.equal(xr.grad != 0, mask)


# --------------------------------------------------------------------------------------------- seeding

def test_manual_seed_reproduces_a_run():
    x, w, a, b, bias, dy = _inputs()
    torch.manual_seed(123)
    first = _run(x, w, a, b, bias, dy)
    torch.manual_seed(123)
    second = _run(x, w, a, b, bias, dy)
    for g, t in zip(first, second):
        assert torch.equal(g, t)
    torch.manual_seed(124)
    third = _run(x, w, a, b, bias, dy)
    assert not torch.equal(first[0], third[0])


def test_consecutive_calls_draw_different_masks():
    x, w, a, b, bias, dy = _inputs()
    torch.manual_seed(9)
    assert not torch.equal(_run(x, w, a, b, bias, dy)[0], _run(x, w, a, b, bias, dy)[0])


def test_same_seed_same_mask_other_seed_other_mask():
    m1 = materialize_dropout_mask(12345, M, K, P, "cpu")
    assert torch.equal(m1, materialize_dropout_mask(12345, M, K, P, "cpu"))
    for other in (12346, 12345 + (1 << 32), 0, (1 << 62) - 1):
        m2 = materialize_dropout_mask(other, M, K, P, "cpu")
        # Two independent masks agree on a fraction p^2 + (1-p)^2 = 0.58 of entries, far from all of them.
        assert (m1 == m2).float().mean() < 0.7, other


def test_peek_does_not_consume_the_generator():
    torch.manual_seed(42)
    s1 = peek_dropout_seed("cpu")
    s2 = peek_dropout_seed("cpu")
    assert s1 == s2
    after_peeks = torch.rand(3)
    torch.manual_seed(42)
    assert torch.equal(after_peeks, torch.rand(3))


# ------------------------------------------------------------------------------------------- statistics

def _within_binomial(kept: int, n: int, q: float, sigmas: float = 6.0) -> bool:
    """|kept - n q| <= sigmas * sqrt(n q (1-q)): a 6-sigma bound fails by chance with probability < 2e-9."""
    return abs(kept - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    rows, cols = 211, 509  # 107,399 elements, both primes
    n = rows * cols
    for seed in (1, 2 ** 33 + 7, 987654321987):
        mask = materialize_dropout_mask(seed, rows, cols, p, "cpu")
        kept = int(mask.sum())
        assert _within_binomial(kept, n, 1 - p), (seed, kept / n)
        # Neighbours are independent: both kept with probability (1-p)^2, along rows and down columns.
        both_row = int((mask[:, 1:] & mask[:, :-1]).sum())
        both_col = int((mask[1:, :] & mask[:-1, :]).sum())
        assert _within_binomial(both_row, rows * (cols - 1), (1 - p) ** 2, 8.0)
        assert _within_binomial(both_col, (rows - 1) * cols, (1 - p) ** 2, 8.0)
        # No row is a copy of another (a hash of the column alone would do that).
        assert not torch.equal(mask[0], mask[1])


def test_control_binomial_bound_rejects_a_biased_rate():
    n, p = 211 * 509, 0.3
    kept = int(materialize_dropout_mask(1, 211, 509, p, "cpu").sum())
    assert not _within_binomial(kept, n, 1 - 0.31)  # a 1-point bias in p is ~10 sigma here


def test_op_keep_rate_matches_through_dx():
    # The rate measured on what the op itself did (dx != 0 marks a kept element), not on the helper.
    rows, p = 401, 0.3
    x = torch.randn(rows, K)
    a, b = torch.rand(R, K) + 0.1, torch.rand(N, R) + 0.1
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(0)
    lora_linear(xr, torch.zeros(N, K), a, b, 1.0, dropout_p=p).sum().backward()
    assert _within_binomial(int((xr.grad != 0).sum()), rows * K, 1 - p)


# ------------------------------------------------------------------------------------------ checkpointing

@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_regenerates_the_mask(use_reentrant):
    x, w, a, b, bias, dy = _inputs()

    def layer(x, a, b, bias):
        return lora_linear(x, w, a, b, 2.0, bias, dropout_p=P)

    def run(ckpt, preserve=True):
        xx, aa, bb, bi = (t.detach().clone().requires_grad_(True) for t in (x, a, b, bias))
        torch.manual_seed(31337)
        if ckpt:
            y = checkpoint(layer, xx, aa, bb, bi, use_reentrant=use_reentrant, preserve_rng_state=preserve)
        else:
            y = layer(xx, aa, bb, bi)
        # Draw from the generator between forward and backward, as a training step does (other dropouts).
        torch.rand(100)
        y.backward(dy)
        return y.detach(), xx.grad, aa.grad, bb.grad, bi.grad

    plain = run(False)
    assert_same_run(run(True), plain, what="checkpointed ")
    # Control: without RNG restore the recomputation draws another seed and the gradients disagree.
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_run(run(True, preserve=False), plain, what="checkpointed without RNG restore ")


# ------------------------------------------------------------------------------------- no stored M x K mask

@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_saved_tensors_hold_no_mask_and_no_dequantized_weight(kind):
    x, w, a, b, bias, dy = _inputs()
    weight = w if kind == "dense" else quantize_nf4(w, blocksize=64, double_quant=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    xr, ar, br, bir = (t.clone().requires_grad_(True) for t in (x, a, b, bias))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(xr, weight, ar, br, 2.0, bir, dropout_p=P)
    y.backward(dy)
    assert saved, "the hook saw no saved tensors"
    for t in saved:
        assert t.dtype != torch.bool, "a boolean (mask) tensor is saved for backward"
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            if t.numel() >= M * K:
                # The only float tensor of M x K (or more) elements may be x itself (and W when dense).
                assert t.data_ptr() in (xr.data_ptr(), w.data_ptr()) and t.shape in ((M, K), (N, K)), \
                    f"an extra {tuple(t.shape)} {t.dtype} tensor is saved for backward"
        if kind == "nf4":
            assert tuple(t.shape) != (N, K), "a dequantized copy of the NF4 weight is saved"
    if kind == "nf4":
        assert any(t.dtype == torch.uint8 and t.numel() == (N * K + 1) // 2 for t in saved)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in
                (xr.data_ptr(), w.data_ptr(), ar.data_ptr(), br.data_ptr()))
    # Beyond x, W, A, B: S (M x r) fp32, an 8-byte seed and the NF4 bytes: far below one M x K mask of bools.
    budget = M * R * 4 + 8 + (0 if kind == "dense" else weight.nbytes())
    assert extra <= budget, f"{extra} bytes saved beyond the inputs, budget {budget}"


@pytest.mark.parametrize("seed", [0, 77, 2 ** 31 + 5, 0xFFFFFFFF, 2 ** 40 + 3, 2 ** 62 - 1])
def test_cpu_mask_equals_the_int64_hash(seed):
    """dropout_mask's int32 fast path on the CPU computes exactly dropout_hash31 of the flat indices."""
    from lora_ops import reference
    rows, cols, p = 37, 129, 0.3
    index = torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)
    want = reference.dropout_hash31(seed, index) >= reference.dropout_keep_threshold(p)
    assert torch.equal(reference.dropout_mask(seed, rows, cols, p), want)
    assert 0 < int(want.sum()) < rows * cols
