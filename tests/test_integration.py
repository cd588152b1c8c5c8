"""Our layers inside a training loop: torch.compile, activation checkpointing, autocast, device / dtype moves
and whole-model state dicts. (DDP and FSDP2: tests/test_distributed.py.)

Models: a tiny config-built ``LlamaForCausalLM`` (transformers) with NF4 LoRA on q/v/up projections and dense
LoRA on o/down projections, and a small MLP LoRALinear -> QLoRALinear (double-quantized) -> QLoRALinear. Sizes
are odd (K not a multiple of any NF4 block). CPU: the reference kernels; the ``gpu`` tests run the same on CUDA.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_ops
from helpers import assert_rel_close
from lora_ops import LoRALinear, QLoRALinear, lora_linear, quantize_nf4
from lora_ops.modules import LoRALayerBase

transformers = pytest.importorskip("transformers")

VOCAB = 61
NF4_TARGETS = ["q_proj", "v_proj", "up_proj"]
DENSE_TARGETS = ["o_proj", "down_proj"]


def _randomize_b(model, seed=7, std=0.2):
    """PEFT's B = 0 makes A's gradient zero; random B exercises every gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LoRALayerBase)):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
    return model


def tiny_llama(layers=1, dropout=0.0, seed=0, device="cpu"):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=67,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
        lora_ops.apply_lora(model, NF4_TARGETS, r=3, lora_alpha=6, lora_dropout=dropout, quantize="nf4")
        lora_ops.apply_lora(model, DENSE_TARGETS, r=2, lora_alpha=3, lora_dropout=dropout)
    return _randomize_b(model, seed + 7).to(device)


class MLP(nn.Module):
    """LoRALinear(37->53) -> GELU -> QLoRALinear(53->29, double quant, blocksize 64) -> GELU ->
    QLoRALinear(29->19, plain absmax, blocksize 32)."""

    def __init__(self, dropout=0.0, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a = LoRALinear.from_linear(nn.Linear(37, 53), r=3, lora_alpha=5, lora_dropout=dropout)
            self.b = QLoRALinear.from_linear(nn.Linear(53, 29), r=4, lora_alpha=4, lora_dropout=dropout)
            self.c = QLoRALinear.from_linear(nn.Linear(29, 19), r=1, lora_alpha=2, lora_dropout=dropout,
                                             blocksize=32, double_quant=False)
        _randomize_b(self, seed + 3)

    def forward(self, x):
        return self.c(F.gelu(self.b(F.gelu(self.a(x)))))


def lora_grads(model):
    """{name: grad} of the trainable parameters, named as in the eager model (no torch.compile prefix)."""
    return {n.removeprefix("_orig_mod."): None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def assert_all_close(got: dict, want: dict, dtype, what):
    assert sorted(got) == sorted(want), f"{what}: names differ"
    for name in want:
        assert got[name] is not None, f"{what}: no gradient for {name}"
        assert_rel_close(got[name], want[name], dtype, f"{what} {name}")


def ids_batch(seed=3, batch=2, seq=9, device="cpu"):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def llama_step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


# ------------------------------------------------------------------------------------------- torch.compile

def test_dynamo_sees_no_graph_break_in_our_layers():
    ids = ids_batch()
    llama = tiny_llama().eval()
    exp = torch._dynamo.explain(llama)(input_ids=ids)
    assert exp.graph_break_count == 0 and exp.graph_count == 1, exp.break_reasons
    mlp = MLP(dropout=0.2).train()
    exp = torch._dynamo.explain(mlp)(torch.randn(4, 37))
    assert exp.graph_break_count == 0 and exp.graph_count == 1, exp.break_reasons

    # Control: the same check sees a break when there is one.
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

        def forward(self, x):
            y = self.mlp(x)
            torch._dynamo.graph_break()
            return y * 2

    assert torch._dynamo.explain(Breaks())(torch.randn(4, 37)).graph_break_count == 1


def test_compile_fullgraph_tiny_llama_matches_eager():
    ids = ids_batch()
    eager = tiny_llama().train()
    compiled_model = copy.deepcopy(eager)
    loss_e, grads_e = llama_step(eager, ids)
    torch._dynamo.reset()
    loss_c, grads_c = llama_step(torch.compile(compiled_model, fullgraph=True, backend="inductor"), ids)
    assert_rel_close(loss_c, loss_e, torch.float32, "compiled loss")
    assert_all_close(grads_c, grads_e, torch.float32, "compiled grad")
    assert len(grads_e) == 2 * (len(NF4_TARGETS) + len(DENSE_TARGETS))
    # Control: a 1e-3 relative error in one gradient is far outside the fp32 tolerance.
    name = next(iter(grads_e))
    with pytest.raises(AssertionError):
        assert_rel_close(grads_c[name] * 1.001, grads_e[name], torch.float32, "perturbed")


def _mlp_run(model, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return {"y": y.detach(), "dx": x.grad.detach(), **lora_grads(model)}


def test_compile_fullgraph_with_dropout_matches_eager():
    # Inductor draws random numbers its own way unless fallback_random is set; with it, the compiled graph
    # draws each layer's dropout seed from torch's generator exactly as eager does, so the masks (regenerated
    # in the compiled backward) coincide.
    x = torch.randn(2, 5, 37)
    eager = MLP(dropout=0.3).train()
    compiled_model = copy.deepcopy(eager)
    want = _mlp_run(eager, x, seed=11)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        got = _mlp_run(torch.compile(compiled_model, fullgraph=True), x, seed=11)
    assert_all_close(got, want, torch.float32, "compiled with dropout")
    # Control: another seed gives other masks.
    other = _mlp_run(eager, x, seed=12)
    with pytest.raises(AssertionError):
        assert_all_close(other, want, torch.float32, "other seed")


def test_compile_under_autocast_matches_eager_autocast():
    # The op's fake promises outputs in its inputs' dtype; under autocast the layers cast to bf16 first, so the
    # compiled graph (built from the fakes) and eager agree on dtypes and values.
    x = torch.randn(7, 37)
    eager = MLP().eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager(x)
        got = compiled(x)
    assert want.dtype == got.dtype == torch.bfloat16
    assert_rel_close(got, want, torch.bfloat16, "compiled autocast output")


# --------------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_block_regenerates_the_dropout_masks(use_reentrant):
    x = torch.randn(3, 4, 37)
    plain = MLP(dropout=0.3).train()
    want = _mlp_run(plain, x, seed=5)

    def ckpt_model(preserve):
        inner = copy.deepcopy(plain)

        class Ckpt(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return checkpoint(self.inner, x, use_reentrant=use_reentrant, preserve_rng_state=preserve)
        return Ckpt()

    got = _mlp_run(ckpt_model(True), x, seed=5)
    got = {k.replace("inner.", ""): v for k, v in got.items()}
    assert_all_close(got, want, torch.float32, "checkpointed")
    # Control: without the RNG restore the recomputation draws new seeds, so the backward uses other masks.
    bad = {k.replace("inner.", ""): v for k, v in _mlp_run(ckpt_model(False), x, seed=5).items()}
    with pytest.raises(AssertionError):
        assert_all_close(bad, want, torch.float32, "checkpointed without RNG restore")


def _count_forwards(model):
    calls = {"n": 0}
    layer = model.model.layers[0].self_attn.q_proj

    def hook(*_):
        calls["n"] += 1
    layer.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_on_tiny_llama(use_reentrant):
    ids = ids_batch(batch=2, seq=11)
    ref = tiny_llama(layers=2, dropout=0.25).train()
    torch.manual_seed(21)
    loss_r, grads_r = llama_step(ref, ids)

    def checkpointed(preserve):
        model = tiny_llama(layers=2, dropout=0.25).train()
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant, "preserve_rng_state": preserve})
        calls = _count_forwards(model)
        torch.manual_seed(21)
        loss, grads = llama_step(model, ids)
        return loss, grads, calls["n"]

    loss_c, grads_c, n_fwd = checkpointed(True)
    assert n_fwd == 2, f"q_proj ran {n_fwd} times; checkpointing recomputes it once in the backward"
    assert_rel_close(loss_c, loss_r, torch.float32, "checkpointed loss")
    assert_all_close(grads_c, grads_r, torch.float32, "HF checkpointed grad")
    # Control: with the RNG state not restored, the recomputed masks differ and so do the LoRA gradients.
    _, grads_bad, _ = checkpointed(False)
    with pytest.raises(AssertionError):
        assert_all_close(grads_bad, grads_r, torch.float32, "no RNG restore")


# ----------------------------------------------------------------------------------------------- autocast

def _autocast_dtypes():
    out = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            nn.Linear(3, 2)(torch.randn(1, 3))
        out.append(torch.float16)
    except RuntimeError:  # pragma: no cover - older torch without CPU fp16 autocast
        pass
    return out


@pytest.mark.parametrize("dtype", _autocast_dtypes())
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_autocast_around_layers_behaves_like_nn_linear(dtype, kind):
    lin = nn.Linear(67, 29)
    layer = (LoRALinear if kind == "dense" else QLoRALinear).from_linear(lin, r=3, lora_alpha=6)
    _randomize_b(layer)
    w = lin.weight.detach() if kind == "dense" else layer.nf4_weight.dequantize(torch.float32)
    x = torch.randn(2, 5, 67, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        ref_dtype = nn.Linear(67, 29)(x).dtype
    assert y.dtype == ref_dtype == dtype
    g = torch.randn(y.shape)
    y.backward(g.to(dtype))
    # nn.Linear under the same autocast, with fp32 leaves: what PEFT's nn.Linear-based LoRA computes.
    x2 = x.detach().clone().requires_grad_(True)
    a2 = layer.lora_A.detach().clone().requires_grad_(True)
    b2 = layer.lora_B.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        ref = F.linear(x2, w, lin.bias.detach()) + F.linear(F.linear(x2, a2), b2) * layer.scaling
    ref.backward(g.to(dtype))
    assert_rel_close(y, ref, dtype, "autocast output")
    for got, want, name in ((x.grad, x2.grad, "dx"), (layer.lora_A.grad, a2.grad, "dA"),
                            (layer.lora_B.grad, b2.grad, "dB")):
        assert got.dtype == want.dtype == torch.float32, (name, got.dtype, want.dtype)
        assert_rel_close(got, want, dtype, f"autocast {name}")
    # Control: the adapter without its scaling is another function at this tolerance.
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        unscaled = F.linear(x2, w, lin.bias.detach()) + F.linear(F.linear(x2, a2), b2)
    with pytest.raises(AssertionError):
        assert_rel_close(y, unscaled, dtype, "unscaled")


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_the_op_computes_in_its_inputs_dtype_under_autocast(kind):
    # lora_linear's fake says y has x's dtype; an ambient autocast must not recast the kernel's matmuls (it
    # did: fp32 inputs came back bf16). The layers are where the autocast dtype is chosen.
    torch.manual_seed(0)
    x = torch.randn(6, 67, requires_grad=True)
    w = torch.randn(29, 67)
    w = w if kind == "dense" else quantize_nf4(w)
    a, b = torch.randn(3, 67, requires_grad=True), torch.randn(29, 3, requires_grad=True)
    want = lora_linear(x, w, a, b, 2.0)
    gx, ga = torch.autograd.grad(want.sum(), (x, a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_linear(x, w, a, b, 2.0)
        gx2, ga2 = torch.autograd.grad(got.sum(), (x, a))  # a backward inside the autocast region too
    assert got.dtype == torch.float32 and gx2.dtype == ga2.dtype == torch.float32
    assert_rel_close(got, want, torch.float32, "op under autocast")
    assert_rel_close(gx2, gx, torch.float32, "dx under autocast")
    assert_rel_close(ga2, ga, torch.float32, "dA under autocast")
    # Control: the bf16 computation that autocast would have produced is not within fp32 tolerance.
    bf = lora_linear(x.bfloat16(), w if kind == "nf4" else w.bfloat16(), a.bfloat16(), b.bfloat16(), 2.0)
    with pytest.raises(AssertionError):
        assert_rel_close(bf, want, torch.float32, "bf16 compute")


# ------------------------------------------------------------------------------- devices, dtypes, state dicts

def nf4_snapshot(model):
    return {f"{n}.{i}": t.detach().clone() for n, m in model.named_modules() if isinstance(m, QLoRALinear)
            for i, t in enumerate(m.nf4_weight.tensors()) if t is not None}


def assert_same_tensors(got: dict, want: dict, what):
    assert sorted(got) == sorted(want), f"{what}: keys differ"
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{what}: {k} dtype {got[k].dtype} != {want[k].dtype}"
        assert got[k].shape == want[k].shape and torch.equal(got[k].cpu(), want[k].cpu()), f"{what}: {k} differs"


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_bf16"])
def test_dtype_casts_keep_nf4_bytes_and_move_compute(cast):
    model = tiny_llama()
    before = nf4_snapshot(model)
    nf4_prefixes = tuple(n + ".weight" for n, m in model.named_modules() if isinstance(m, QLoRALinear))
    sd_nf4 = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(nf4_prefixes)}
    assert len(sd_nf4) == len(nf4_prefixes) * 6  # weight, absmax, quant_map, nested x2, quant_state
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.half() if cast == "half" else model.bfloat16() if cast == "bfloat16" else model.to(dtype)
    assert_same_tensors(nf4_snapshot(model), before, f".{cast}()")
    # The checkpoint view of the base is unchanged too (JSON quant state keeps the original dtype).
    after = {k: v for k, v in model.state_dict().items() if k in sd_nf4}
    assert_same_tensors(after, sd_nf4, f".{cast}() state dict")
    for layer in (m for m in model.modules() if isinstance(m, QLoRALinear)):
        assert layer.compute_dtype == dtype and layer.lora_A.dtype == dtype
    logits = model(input_ids=ids_batch()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    model.float()
    assert_same_tensors(nf4_snapshot(model), before, ".float() back")
    # Control: the helper notices one flipped bit in the packed codes.
    bad = dict(before)
    k = next(k for k in bad if k.endswith(".0"))  # NF4Weight.tensors()[0]: the packed uint8 codes
    bad[k] = bad[k].clone()
    bad[k].view(-1)[0] ^= 1
    with pytest.raises(AssertionError):
        assert_same_tensors(bad, before, "control")


def test_state_dict_round_trip_is_bit_exact():
    ids = ids_batch()
    src = tiny_llama(seed=0).eval()
    sd = src.state_dict()
    # Through bytes, as a checkpoint file would.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    dst = tiny_llama(seed=1).eval()  # other base weights: other NF4 bytes, other LoRA
    differing = [k for k in sd if not torch.equal(dst.state_dict()[k], sd[k])]
    assert any(k.endswith("q_proj.weight") for k in differing) and \
        any(k.endswith("q_proj.weight.absmax") for k in differing)  # control: there is something to load
    res = dst.load_state_dict(loaded)
    assert not res.missing_keys and not res.unexpected_keys
    assert_same_tensors(dst.state_dict(), sd, "state dict after load")
    with torch.no_grad():
        assert torch.equal(dst(input_ids=ids).logits, src(input_ids=ids).logits)
    # bitsandbytes' Linear4bit keys, and no attribute-named NF4 entries.
    keys = [k for k in sd if ".q_proj." in k and "layers.0." in k]
    assert sorted(k.split("q_proj.")[1] for k in keys) == sorted(
        ["lora_A", "lora_B", "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
         "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])


def test_meta_device_shapes_then_materialise_and_load():
    ids = ids_batch()
    src = tiny_llama(dropout=0.1).eval()
    shapes = {n: (p.shape, p.dtype) for n, p in src.named_parameters()}
    meta = tiny_llama(dropout=0.1, seed=5).to("meta")
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == shapes
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.train()  # the dropout path draws its seed on the meta device too
    out = meta(input_ids=ids.to("meta"), labels=ids.to("meta"))
    assert out.logits.shape == (*ids.shape, VOCAB) and out.logits.device.type == "meta"
    out.loss.backward()
    layer = meta.model.layers[0].self_attn.q_proj
    assert layer.lora_A.grad.shape == layer.lora_A.shape
    # The usual large-model init: meta -> to_empty -> load_state_dict.
    real = meta.to_empty(device="cpu").eval()
    real.load_state_dict(src.state_dict())
    # Llama's rotary inv_freq is a non-persistent buffer, in no state dict: the model must recompute it after
    # to_empty. Our layers hold no buffers, so the state dict restores all of them.
    assert not [n for n, _ in real.named_buffers() if ".q_proj." in n or ".up_proj." in n]
    with torch.no_grad():
        for (name, buf), (_, want) in zip(real.named_buffers(), src.named_buffers()):
            buf.copy_(want)
    with torch.no_grad():
        assert torch.equal(real(input_ids=ids).logits, src(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_model_to_cuda_and_back_keeps_bytes_and_function(cuda):
    ids = ids_batch()
    model = tiny_llama().eval()
    before = nf4_snapshot(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.to(cuda)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert_same_tensors(nf4_snapshot(model), before, "on cuda")
    with torch.no_grad():
        got = model(input_ids=ids.to(cuda)).logits
    assert_rel_close(got, want, torch.float32, "cuda vs cpu logits")
    model.to("cpu")
    assert_same_tensors(nf4_snapshot(model), before, "back on cpu")


@pytest.mark.gpu
def test_gpu_compile_and_autocast_match_eager(cuda):
    ids = ids_batch(device=cuda)
    eager = tiny_llama(device=cuda).train()
    compiled = copy.deepcopy(eager)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_e, grads_e = llama_step(eager, ids)
        torch._dynamo.reset()
        loss_c, grads_c = llama_step(torch.compile(compiled, fullgraph=True), ids)
    assert all(g.dtype == torch.float32 for g in grads_e.values())
    assert_rel_close(loss_c, loss_e, torch.bfloat16, "cuda compiled autocast loss")
    assert_all_close(grads_c, grads_e, torch.bfloat16, "cuda compiled autocast grad")
