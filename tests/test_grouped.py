"""Grouped projections (lora_ops.grouped): a grouped model computes the same function as the ungrouped one.

Every comparison builds both models from one seed (tiny Llama / Mistral configs from transformers, never a hub),
gives the adapters the same random non-zero values (B = 0 would hide every LoRA-branch bug) and compares logits,
loss and EVERY adapter gradient in fp32. Call counts show that the grouped path really ran; mutation controls
show that the comparisons catch a broken grouping.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import QLoRALinear, grouped
from lora_ops.grouped import ProjectionGroup, explain_groups, projection_groups
from lora_ops.inject import lora_layers

from helpers import assert_rel_close, randomize_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2
F32 = torch.float32


def lora_fwd_counting(graphs: list, backend):
    """A torch.compile backend that appends each graph's count of lora_fwd calls to ``graphs``, then compiles it
    with ``backend``."""
    def compile_graph(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "lora_fwd" in str(n.target)))
        return backend(gm, example_inputs)
    return compile_graph


def _config(arch, layers=N_LAYERS, hidden=64, intermediate=128):
    from transformers import LlamaConfig, MistralConfig
    cls = LlamaConfig if arch == "llama" else MistralConfig
    # 4 heads, 2 KV heads: at hidden 64 k/v are (32, 64), q (64, 64), gate/up (128, 64); every count a multiple
    # of 64, so the NF4 bases concatenate (the GPU tests' hidden 128 keeps that).
    return cls(vocab_size=97, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _base(arch, seed=0, **shape):
    from transformers import LlamaForCausalLM, MistralForCausalLM
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if arch == "llama" else MistralForCausalLM
    return cls(_config(arch, **shape))


def build(arch="llama", quantize=None, group=False, **kw):
    model = _base(arch)
    lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, quantize=quantize, group_projections=group, **kw)
    randomize_adapters(model, scale=0.3)
    return model


def ids_for(seed=3, shape=(2, 11)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}  # torch.compile's wrapper prefixes names
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_step(got, want, what="", dtype=F32, layers=N_LAYERS):
    """Logits, loss and every adapter gradient within ``dtype``'s tolerance (helpers.REL_TOL)."""
    (lg, ll, gg), (lw, lw_loss, gw) = got, want
    assert_rel_close(lg, lw, dtype, f"{what} logits")
    assert_rel_close(ll, lw_loss, dtype, f"{what} loss")
    assert sorted(gg) == sorted(gw), f"{what}: trainable parameters differ"
    assert len(gg) == 2 * len(TARGETS) * layers
    for name in gw:
        assert gg[name] is not None and gw[name].abs().sum() > 0, f"{what}: no gradient for {name}"
        assert_rel_close(gg[name], gw[name], dtype, f"{what} grad {name}")


class CallCounter:
    """Counts lora_linear calls from the layers and from the groups, and the groups' C++ calls (CUDA, eager)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for mod in (lora_ops.modules, grouped):
            real = mod.lora_linear

            def spy(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)
            monkeypatch.setattr(mod, "lora_linear", spy)
        real_group = grouped._launch.group

        def group_spy(*a, **k):
            ys = real_group(*a, **k)
            self.n += ys is not None  # None: the group's lora_linear call follows, and is counted there
            return ys
        monkeypatch.setattr(grouped._launch, "group", group_spy)


# ------------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_grouped_model_equals_ungrouped(arch, quantize, monkeypatch):
    ref, grp = build(arch, quantize), build(arch, quantize, group=True)
    assert [r["status"] for r in explain_groups(grp)] == ["grouped"] * (2 * N_LAYERS)
    ids = ids_for()
    want = step(ref, ids)
    calls = CallCounter(monkeypatch)
    got = step(grp, ids)
    assert calls.n == 4 * N_LAYERS  # qkv, o, gate/up, down per layer (7 ungrouped)
    assert_same_step(got, want, f"{arch}/{quantize}")
    # Names and checkpoint keys are the model's own; the base tensors hold the same values (NF4: same bytes).
    sd_ref, sd_grp = ref.state_dict(), grp.state_dict()
    assert list(sd_grp) == list(sd_ref)
    for k in sd_ref:
        assert torch.equal(sd_grp[k], sd_ref[k]), k
    assert all(g._pending is None for g in projection_groups(grp).values())  # nothing held after the forward


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_base_is_stored_once(quantize):
    grp = build(quantize=quantize, group=True)
    attn = grp.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    ptrs = [m.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert len(set(ptrs)) == 1  # one buffer, three views
    base = group._base.data if quantize else group._base
    assert base.untyped_storage().data_ptr() == ptrs[0]
    assert not list(group.parameters()) and not list(group.buffers())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_adapters_are_packed_and_train_like_ungrouped(quantize):
    """Each group's lora_A (and lora_B) are row views of one buffer, in member order, so the C++ group reads
    A_cat / B_rows without a copy; they stay the same Parameter objects with their own version counters, and
    optimizer steps (AdamW, foreach) train the grouped model as the ungrouped one."""
    model = _base("llama")
    lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, quantize=quantize, group_projections=False)
    randomize_adapters(model, scale=0.3)
    ref = copy.deepcopy(model)
    attn = model.model.layers[0].self_attn
    members = (attn.q_proj, attn.k_proj, attn.v_proj)
    before = [id(p) for m in members for p in (m.lora_A, m.lora_B)]
    grouped.group_projections(model)
    assert [id(p) for m in members for p in (m.lora_A, m.lora_B)] == before
    for name in ("lora_A", "lora_B"):
        ts = [getattr(m, name) for m in members]
        assert len({t.untyped_storage().data_ptr() for t in ts}) == 1, name
        for t0, t1 in zip(ts, ts[1:]):
            assert t1.data_ptr() == t0.data_ptr() + t0.numel() * t0.element_size(), name
    versions = [m.lora_A._version for m in members]
    with torch.no_grad():
        attn.k_proj.lora_A.add_(0.0)
    assert [m.lora_A._version for m in members] == [versions[0], versions[1] + 1, versions[2]]
    opts = [torch.optim.AdamW([p for p in mdl.parameters() if p.requires_grad], lr=1e-2, foreach=True)
            for mdl in (model, ref)]
    ids = ids_for()
    for i in range(2):  # (later steps differ by more than fp32's tolerance: their sums run in another order)
        got, want = step(model, ids), step(ref, ids)
        assert_same_step(got, want, f"step {i}")
        for mdl, opt in zip((model, ref), opts):
            mdl(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_rel_close(attn.v_proj.lora_B, ref.model.layers[0].self_attn.v_proj.lora_B, F32, "trained lora_B")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing(reentrant, quantize, monkeypatch):
    ref, grp = build(quantize=quantize), build(quantize=quantize, group=True)
    ids = ids_for()
    want = step(ref, ids)
    for m in (ref, grp):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            m.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    assert_same_step(step(ref, ids), want, "ungrouped checkpointed")
    calls = CallCounter(monkeypatch)
    assert_same_step(step(grp, ids), want, f"grouped checkpointed (reentrant={reentrant})")
    assert calls.n == 2 * 4 * N_LAYERS  # the forward, and its recomputation in the backward


def test_torch_compile_aot_eager():
    from torch._dynamo.backends.debugging import aot_eager

    ref, grp = build(), build(group=True)
    ids = ids_for()
    want = step(ref, ids)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(grp, backend=lora_fwd_counting(graphs, aot_eager))
    got = step(compiled, ids)
    assert_same_step(got, want, "compiled grouped")
    assert graphs == [4 * N_LAYERS]  # one graph, one lora_fwd per group
    assert_same_step(step(compiled, ids), want, "compiled grouped, second call")
    assert len(graphs) == 1  # no recompilation


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_eval_no_grad(quantize):
    ref, grp = build(quantize=quantize).eval(), build(quantize=quantize, group=True).eval()
    ids = ids_for()
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "eval logits")
    assert all(g._pending is None for g in projection_groups(grp).values())


def test_dropout_uses_one_mask_for_the_group():
    grp = build(group=True, lora_dropout=0.2).train()
    attn = grp.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(2, 5, 64)
    torch.manual_seed(7)
    ys = [q(x), k(x), v(x)]
    w = torch.cat([q.weight, k.weight, v.weight])
    a = torch.cat([q.lora_A, k.lora_A, v.lora_A])
    b = torch.block_diag(q.lora_B, k.lora_B, v.lora_B)
    torch.manual_seed(7)
    want = lora_ops.lora_linear(x, w, a, b, q.scaling, dropout_p=0.2, training=True).split([64, 32, 32], -1)
    for y, yw in zip(ys, want):
        assert torch.equal(y, yw)
    plain = lora_ops.lora_linear(x, w, a, b, q.scaling, dropout_p=0.0)
    assert not torch.allclose(torch.cat(ys, -1), plain)  # dropout did act


# ------------------------------------------------------------------------------------------------ adapters

@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_save_adapter_loads_into_ungrouped_model(quantize, tmp_path):
    grp = build(quantize=quantize, group=True)
    ids = ids_for()
    lora_ops.save_adapter(grp, tmp_path / "a")
    ref = _base("llama")
    lora_ops.load_adapter(ref, tmp_path / "a", quantize=quantize, group_projections=False)
    assert not projection_groups(ref)
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "loaded logits")
    # ...and the other way: an adapter loads into a grouped model (in place: the groups keep working).
    grp2 = build(quantize=quantize, group=True)
    lora_ops.load_adapter(grp2, tmp_path / "a")
    with torch.no_grad():
        assert_rel_close(grp2(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "grouped reload logits")
    # load_adapter making the layers itself groups them (the default).
    grp3 = lora_ops.load_adapter(_base("llama"), tmp_path / "a", quantize=quantize)
    assert len(projection_groups(grp3)) == 2 * N_LAYERS
    with torch.no_grad():
        assert_rel_close(grp3(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "load_adapter grouped")


def test_peft_loads_the_grouped_models_adapter(tmp_path):
    from peft import PeftModel

    grp = build(group=True)
    lora_ops.save_adapter(grp, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(_base("llama"), tmp_path / "a")
    ids = ids_for()
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits, peft_model(input_ids=ids).logits, F32, "PEFT logits")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload(quantize):
    ref, grp = build(quantize=quantize), build(quantize=quantize, group=True)
    ids = ids_for()
    with torch.no_grad():
        want = grp(input_ids=ids).logits
    lora_ops.merge_and_unload(ref)
    lora_ops.merge_and_unload(grp)
    assert not projection_groups(grp) and not lora_layers(grp)
    assert list(grp.state_dict()) == list(ref.state_dict())
    assert type(grp.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "merged logits")
        assert_rel_close(grp(input_ids=ids).logits, want, F32, "merged vs unmerged")


def test_member_merge_and_unmerge():
    ref, grp = build(), build(group=True)
    ids = ids_for()
    attn = grp.model.layers[0].self_attn
    attn.k_proj.merge()  # the group computes alone while a member is merged, and again after unmerge
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "one member merged")
    attn.k_proj.unmerge()
    assert_same_step(step(grp, ids), step(ref, ids), "after unmerge")


def test_to_dtype_repacks_one_buffer():
    ref, grp = build().to(torch.bfloat16), build(group=True).to(torch.bfloat16)
    attn = grp.model.layers[1].self_attn
    ptrs = {m.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(ptrs) == 1 and attn.q_proj.weight.dtype == torch.bfloat16
    assert attn.lora_group_q_proj_k_proj_v_proj.repacks == 1
    ids = ids_for()
    with torch.no_grad():
        assert_rel_close(grp(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float(), torch.bfloat16,
                         "bf16 logits")


# ------------------------------------------------------------------------------------------------ siblings

class Attn(nn.Module):
    """q reads x; k and v read ``kv`` (cross-attention when it is another tensor)."""

    def __init__(self, k_in=16, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(16, 12, bias=bias)
        self.k_proj = nn.Linear(k_in, 8, bias=False)
        self.v_proj = nn.Linear(k_in, 8, bias=bias)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return torch.cat([self.q_proj(x), self.k_proj(kv), self.v_proj(kv)], -1)


def _adapt(mod, group, **kw):
    lora_ops.apply_lora(mod, ["q_proj", "k_proj", "v_proj"], r=3, lora_alpha=5, group_projections=group, **kw)
    randomize_adapters(mod, scale=0.3)
    return mod


def test_member_called_with_another_input_gets_its_own_output():
    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    x, enc = torch.randn(3, 16), torch.randn(3, 16)
    with pytest.warns(UserWarning, match="another input"):
        got = grp(x, enc)
    assert_rel_close(got, ref(x, enc), F32, "cross-attention")
    group = grp.lora_group_q_proj_k_proj_v_proj
    assert "another input" in group.disabled_reason
    assert explain_groups(grp)[0]["status"] == "off"
    assert_rel_close(grp(x), ref(x), F32, "self-attention after the group turned off")


def test_members_called_on_their_own_with_other_inputs_keep_the_group_on():
    # Outside the parent's forward (a test or a probe calling one projection), another input is another call:
    # the right output, no warning, and the group stays on for the model's next forward.
    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    x1, x2, x3 = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_rel_close(grp.q_proj(x1), ref.q_proj(x1), F32, "q alone")
        assert_rel_close(grp.k_proj(x2), ref.k_proj(x2), F32, "k alone on another input")
        assert_rel_close(grp.v_proj(x3), ref.v_proj(x3), F32, "v alone on a third input")
        assert_rel_close(grp.v_proj(x2), ref.v_proj(x2), F32, "v on k's input")
    group = grp.lora_group_q_proj_k_proj_v_proj
    assert group.disabled_reason is None and not group._in_parent
    assert_rel_close(grp(x1), ref(x1), F32, "the parent's forward, grouped")
    # A parent forward that raises leaves the group outside it (always_call), so direct calls stay lenient.
    with pytest.raises(ValueError, match="in_features"):
        grp(torch.randn(3, 5))  # the members cannot read 5 features
    assert not group._in_parent
    assert_rel_close(grp.k_proj(x3), ref.k_proj(x3), F32, "k alone after a failed forward")
    assert group.disabled_reason is None


def test_pending_output_is_not_reused_after_x_or_grad_mode_changes():
    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        grp.q_proj(x)  # computes and keeps k's and v's outputs for this x, without grad
    k = grp.k_proj(x)  # grad mode changed: recomputed, with a graph
    assert k.requires_grad
    assert_rel_close(k, ref.k_proj(x), F32, "k after grad mode change")
    x.mul_(2.0)  # in place: v's pending output (for the old values) must not be returned
    assert_rel_close(grp.v_proj(x), ref.v_proj(x), F32, "v after in-place change of x")
    grp.q_proj(x)
    with torch.no_grad():
        grp.k_proj.lora_B.add_(1.0)
        ref.k_proj.lora_B.add_(1.0)
    assert_rel_close(grp.k_proj(x), ref.k_proj(x), F32, "k after its adapter changed")
    assert grp.lora_group_q_proj_k_proj_v_proj.disabled_reason is None


def test_different_ranks_alphas_and_biases():
    def make(group):
        mod = Attn()
        lora_ops.apply_lora(mod, ["q_proj"], r=2, lora_alpha=3, group_projections=False)
        lora_ops.apply_lora(mod, ["k_proj", "v_proj"], r=5, lora_alpha=7, use_rslora=True, group_projections=False)
        if group:
            assert len(grouped.group_projections(mod)) == 1
        randomize_adapters(mod, scale=0.3)
        return mod

    ref, grp = make(False), make(True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    (grp(x) ** 2).sum().backward()
    (ref(x_ref) ** 2).sum().backward()
    assert_rel_close(x.grad, x_ref.grad, F32, "dx")
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_rel_close(grp.get_parameter(n).grad, p.grad, F32, f"grad {n}")


def test_mixed_configurations_fall_back():
    # Different K (k/v read 20 features): not grouped.
    mod = _adapt(Attn(k_in=20), True)
    assert not projection_groups(mod)
    assert "in_features" in explain_groups(mod)[0]["reason"]
    # Different dropout.
    mod = Attn()
    lora_ops.apply_lora(mod, ["q_proj"], r=2, lora_dropout=0.1, group_projections=False)
    lora_ops.apply_lora(mod, ["k_proj", "v_proj"], r=2, group_projections=False)
    assert grouped.group_projections(mod) == [] and "lora_dropout" in explain_groups(mod)[0]["reason"]
    # Dense and NF4 members.
    mod = Attn()
    lora_ops.apply_lora(mod, ["q_proj"], r=2, group_projections=False)
    lora_ops.apply_lora(mod, ["k_proj", "v_proj"], r=2, quantize="nf4", group_projections=False)
    assert grouped.group_projections(mod) == [] and "base kinds" in explain_groups(mod)[0]["reason"]
    # Different base dtypes.
    mod = Attn()
    mod.k_proj.to(torch.bfloat16)
    lora_ops.apply_lora(mod, ["q_proj", "k_proj", "v_proj"], r=2)  # grouping (the default) finds none
    assert not projection_groups(mod)
    assert grouped.group_projections(mod) == [] and "dtype" in explain_groups(mod)[0]["reason"]
    # NF4 blocks that would straddle two members: hidden 42 (42 * 42 elements is not a multiple of 64).
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=42, intermediate_size=75, num_hidden_layers=1, num_attention_heads=3,
                      num_key_value_heads=1, vocab_size=101)
    torch.manual_seed(0)
    odd = lora_ops.apply_lora(LlamaForCausalLM(cfg), TARGETS, r=2, quantize="nf4", group_projections=True)
    reasons = {r["parent"]: r for r in explain_groups(odd)}
    assert reasons["model.layers.0.self_attn"]["status"] == "ungrouped"
    assert "blocksize" in reasons["model.layers.0.self_attn"]["reason"]
    torch.manual_seed(0)
    odd_ref = lora_ops.apply_lora(LlamaForCausalLM(cfg), TARGETS, r=2, quantize="nf4", group_projections=False)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        assert torch.equal(odd(input_ids=ids).logits, odd_ref(input_ids=ids).logits)


def test_group_spec_validation():
    with pytest.raises(TypeError, match="bool or a list"):
        lora_ops.apply_lora(Attn(), ["q_proj"], group_projections="q_proj")
    with pytest.raises(ValueError, match="at least two"):
        lora_ops.apply_lora(Attn(), ["q_proj"], group_projections=[("q_proj",)])
    with pytest.raises(ValueError, match="two groups"):
        lora_ops.apply_lora(Attn(), ["q_proj"], group_projections=[("q_proj", "k_proj"), ("k_proj", "v_proj")])
    with pytest.raises(ValueError, match="without '.'"):
        lora_ops.apply_lora(Attn(), ["q_proj"], group_projections=[("a.q_proj", "k_proj")])
    mod = _adapt(Attn(), True)
    group = mod.lora_group_q_proj_k_proj_v_proj
    assert grouped.group_projections(mod) == [] and mod.lora_group_q_proj_k_proj_v_proj is group  # idempotent
    with pytest.raises(ValueError, match="already belong"):
        grouped.group_projections(mod, [("q_proj", "k_proj")])  # another grouping of grouped members
    # The default: apply_lora groups.
    assert [g.names for g in projection_groups(lora_ops.apply_lora(Attn(), ["q_proj", "k_proj", "v_proj"]))
            .values()] == [("q_proj", "k_proj", "v_proj")]
    # A custom grouping by name: only k and v.
    mod = _adapt(Attn(), [("k_proj", "v_proj")])
    assert [g.names for g in projection_groups(mod).values()] == [("k_proj", "v_proj")]
    assert grouped.ungroup_projections(mod) == 1 and not projection_groups(mod)
    assert mod.k_proj._lora_group is None


# ------------------------------------------------------------------------------------------------ controls

def test_a_broken_grouping_is_caught(monkeypatch):
    """The comparisons above fail when the group hands members the wrong slice or cuts the adapters' graph."""
    ids = ids_for()
    want = step(build(), ids)
    real = ProjectionGroup._compute

    def swapped(self, x, training, key=None):
        ys = real(self, x, training, key)
        return (ys[0], ys[2], ys[1]) if len(ys) == 3 else ys  # k and v have the same shape

    monkeypatch.setattr(ProjectionGroup, "_compute", swapped)
    with pytest.raises(AssertionError):
        assert_same_step(step(build(group=True), ids), want, "swapped k/v")

    def detached_b(self, x, training, key=None):
        saved = [m.lora_B for m in self.members]
        try:
            for m in self.members:
                m._parameters["lora_B"] = m.lora_B.detach()
            return real(self, x, training, key)
        finally:
            for m, b in zip(self.members, saved):
                m._parameters["lora_B"] = b

    monkeypatch.setattr(ProjectionGroup, "_compute", detached_b)
    with pytest.raises(AssertionError):
        assert_same_step(step(build(group=True), ids), want, "B cut from the graph")

    def stale(self, member, x):
        # A cache keyed on nothing: hands out the previous input's outputs.
        p = self._pending
        if p is not None and member._lora_group_index in p.outs:
            return p.outs.pop(member._lora_group_index)
        ys = self._compute(x, self.members[0].training)
        object.__setattr__(self, "_pending", grouped._Pending(x, None, dict(enumerate(ys))))
        return self._pending.outs.pop(member._lora_group_index)

    monkeypatch.undo()
    monkeypatch.setattr(ProjectionGroup, "member_output", stale)
    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    x, enc = torch.randn(3, 16), torch.randn(3, 16)
    with pytest.raises(AssertionError):
        assert_rel_close(grp(x, enc), ref(x, enc), F32, "stale cache")


def test_copies_checkpoints_and_inference_mode(tmp_path):
    import io

    from safetensors.torch import load_file

    ref, grp = build(), build(group=True)
    ids = ids_for()
    want = step(ref, ids)
    with torch.inference_mode():  # inference tensors have no version counter: the pending key does without
        assert_rel_close(grp(input_ids=ids).logits, ref(input_ids=ids).logits, F32, "inference_mode")
    dup = copy.deepcopy(grp)  # the copy's groups hold the copy's members, and its hooks clear the copy's groups
    attn = dup.model.layers[0].self_attn
    assert attn.lora_group_q_proj_k_proj_v_proj.members[0] is attn.q_proj
    assert_same_step(step(dup, ids), want, "deepcopy")
    buf = io.BytesIO()
    torch.save(grp, buf)
    buf.seek(0)
    assert_same_step(step(torch.load(buf, weights_only=False), ids), want, "pickled")
    grp.load_state_dict(ref.state_dict())  # copies into the views in place
    assert_same_step(step(grp, ids), want, "after load_state_dict")
    ref.save_pretrained(tmp_path / "ref")
    grp.save_pretrained(tmp_path / "grp")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "grp" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_members_given_new_storage_are_repacked(quantize):
    ref, grp = build(quantize=quantize), build(quantize=quantize, group=True)
    ids = ids_for()
    attn = grp.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NF4 merge/unmerge warn that they re-quantize
        for m in (attn.k_proj, ref.model.layers[0].self_attn.k_proj):
            m.merge()  # QLoRA: re-quantized into new tensors; dense: in place, through the view
            m.unmerge()
    attn.q_proj.weight.data = attn.q_proj.weight.data.clone()  # what a load with assign=True does
    assert_same_step(step(grp, ids), step(ref, ids), "after new storage")
    assert group.repacks == 1 and group.disabled_reason is None
    ptrs = {m.weight.untyped_storage().data_ptr() for m in group.members}
    assert ptrs == {(group._base.data if quantize else group._base).untyped_storage().data_ptr()}


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_meta_then_to_empty_and_load_keeps_the_groups(quantize):
    """The large-model init: a grouped model moved to the meta device runs there (each member alone, without a
    warning, the group staying on), then to_empty + load_state_dict gives the grouped model back: groups on,
    one shared buffer again, the outputs and gradients of the model it was loaded from."""
    src, grp = build(quantize=quantize, group=True), build(quantize=quantize, group=True)
    randomize_adapters(src, scale=0.3, seed=11)
    ids = ids_for()
    meta = grp.to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = meta(input_ids=ids.to("meta"), labels=ids.to("meta"))
    out.loss.backward()
    meta.zero_grad(set_to_none=True)  # to_empty would keep the meta gradients' shapes with uninitialized values
    groups = projection_groups(meta)
    assert len(groups) == 2 * N_LAYERS and all(g.disabled_reason is None for g in groups.values())
    real = meta.to_empty(device="cpu")
    real.load_state_dict(src.state_dict())
    for (_, buf), (_, want) in zip(real.named_buffers(), src.named_buffers()):
        buf.copy_(want)  # Llama's rotary inv_freq: not in the state dict
    got, want = step(real, ids), step(src, ids)
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][n], want[2][n]) for n in want[2])
    for g in groups.values():
        assert g.disabled_reason is None
        ptrs = {m.weight.untyped_storage().data_ptr() for m in g.members}
        assert ptrs == {(g._base.data if quantize else g._base).untyped_storage().data_ptr()}


def test_group_off_for_a_partial_move_turns_on_after_the_whole_move():
    """A member moved apart from its siblings (another dtype here; another GPU in practice) turns the group off
    with a warning that says how to turn it on; moving the whole model then re-packs it and turns it on."""
    ref, grp = build(), build(group=True)
    ids = ids_for()
    attn = grp.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    attn.k_proj.to(torch.bfloat16)
    x = torch.randn(2, 3, attn.q_proj.in_features)
    with pytest.warns(UserWarning, match="turns the group on again"):
        attn.q_proj(x)
    assert "changed after grouping" in group.disabled_reason
    assert attn.k_proj(x.bfloat16()).dtype == torch.bfloat16  # each member alone meanwhile
    grp.float()
    assert group.disabled_reason is None and group.repacks == 1
    ref.model.layers[0].self_attn.k_proj.to(torch.bfloat16).float()  # the same rounding of k_proj's tensors
    assert_same_step(step(grp, ids), step(ref, ids), "after the whole move")


def test_group_off_for_sharded_members_stays_off():
    """Members whose tensors became a tensor subclass (FSDP2's DTensor shards, here a plain subclass) cannot share
    one buffer again: the warning says each member computes alone (no move hint), a later move leaves it off, and
    the outputs stay right."""
    class Shard(torch.Tensor):
        pass

    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    group = grp.lora_group_q_proj_k_proj_v_proj
    for mod in (ref, grp):
        mod.k_proj.weight = nn.Parameter(mod.k_proj.weight.detach().clone().as_subclass(Shard), requires_grad=False)
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="each member computes alone") as rec:
        y = grp.q_proj(x)
    assert not any("turns the group on again" in str(w.message) for w in rec)
    assert "not plain tensors" in group.disabled_reason
    grp.float()
    assert group.disabled_reason is not None and group.repacks == 0
    for name in ("q_proj", "k_proj", "v_proj"):
        want = getattr(ref, name)(x)
        got = y if name == "q_proj" else getattr(grp, name)(x)
        assert_rel_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor), F32, name)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_replaced_weight_parameter_is_repacked_and_not_kept_alive(quantize):
    """A member's base Parameter replaced by a new object after grouping: the per-call check notices (its
    identity changed), re-packs, and the group holds no reference that keeps the old tensor alive."""
    import gc
    import weakref

    ref, grp = build(quantize=quantize), build(quantize=quantize, group=True)
    ids = ids_for()
    attn = grp.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    step(grp, ids)
    old = attn.v_proj.weight
    gone = weakref.ref(old)
    attn.v_proj.weight = nn.Parameter(old.detach().clone(), requires_grad=False)
    del old
    assert_same_step(step(grp, ids), step(ref, ids), "after a new Parameter")
    assert group.repacks == 1 and group.disabled_reason is None
    gc.collect()
    assert gone() is None


def test_base_reinterpreted_in_place_fails_the_per_call_check():
    """A member's weight given another dtype at the same address (``.data = .view(dtype)``): the per-call check
    sees the dtype, as the signature does, and passes again once the dtype is back."""
    grp = build(group=True)
    attn = grp.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    step(grp, ids_for())
    w = attn.k_proj.weight
    ptr = w.data_ptr()
    w.data = w.data.view(torch.int32)
    assert w.data_ptr() == ptr and not group._unchanged()
    w.data = w.data.view(torch.float32)
    assert group._unchanged()


def test_in_place_change_of_nf4_state_redecodes_the_group_absmax():
    """NF4 members: an in-place change of a member's absmax codes (a version bump) re-packs the group, whose
    decoded absmax must follow the members' state."""
    ref, grp = build(quantize="nf4"), build(quantize="nf4", group=True)
    ids = ids_for()
    group = grp.model.layers[0].self_attn.lora_group_q_proj_k_proj_v_proj
    step(grp, ids)
    for model in (ref, grp):
        absmax = model.model.layers[0].self_attn.k_proj.weight_absmax
        with torch.no_grad():
            absmax.copy_(absmax.flip(0))  # other scales, same tensor
    assert_same_step(step(grp, ids), step(ref, ids), "after an in-place absmax change")
    assert group.repacks == 1


def test_bitsandbytes_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _base("llama").save_pretrained(tmp_path / "ckpt")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    models = []
    for group in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb_config)
        lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, group_projections=group)  # QLoRALinear.from_bnb
        randomize_adapters(model, scale=0.3)
        models.append(model)
    assert [r["status"] for r in explain_groups(models[1])] == ["grouped"] * (2 * N_LAYERS)
    assert isinstance(models[1].model.layers[0].mlp.up_proj, QLoRALinear)
    ids = ids_for()
    assert_same_step(step(models[1], ids), step(models[0], ids), "bitsandbytes 4-bit")


def test_autocast():
    ref, grp = _adapt(Attn(), False), _adapt(Attn(), True)
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = grp(x), ref(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_rel_close(got.float(), want.float(), torch.bfloat16, "autocast bf16")
    assert grp.lora_group_q_proj_k_proj_v_proj._pending is None


# ------------------------------------------------------------------------------------------------ GPU
# The comparisons above on CUDA in bf16 (marker gpu; skipped without CUDA): the grouped calls reach the Triton
# kernels (and the C++ launch path where it is built) instead of the CPU reference path. A bf16 model's adapter
# gradients carry a bf16 error of their own (about 1-2.5 % relative per parameter against the same model in
# fp32, at these sizes, on the CPU reference path too), and grouping changes the rounding (one GEMM over the
# concatenated N, one dX instead of a bf16 sum of three), so each gradient is compared against that error: the
# grouped model may differ from the ungrouped one by at most twice the ungrouped model's own distance from its
# fp32 copy (floor: the bf16 tolerance), and all gradients together must be as close to the fp32 copy as the
# ungrouped model's are (x1.5). Measured with these very tests on the CPU reference path: grouped vs ungrouped
# at most 1.3 % per parameter, ungrouped vs fp32 at most 2.5 % per parameter and about 1 % for all together.

GPU_SHAPE = dict(hidden=128, intermediate=256)  # head_dim 32; k/v (64, 128), gate/up (256, 128)
GPU_LAYERS = 3
BF16 = torch.bfloat16


@pytest.fixture
def gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")  # the kernels, or an error: never the reference quietly
    monkeypatch.setenv("LORA_OPS_TRITON_AUTOTUNE", "0")  # first config that survives pruning: a fast cold start
    monkeypatch.setenv("LORA_OPS_LAUNCH_STRICT", "1")  # a C++ launch list that differs from Python's raises
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 copy is IEEE fp32
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = prev


def _randomize_scaled(model, seed=1):
    """Random adapters of the size trained ones reach (A ~ K^-1/2, B ~ 0.1 r^-1/2: the LoRA term about as large
    as the base term): randomize_adapters' 0.3 here makes the LoRA term dominate, and a bf16 model of that is so
    ill-conditioned that bf16 and fp32 gradients differ by more than 100 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            r, k = layer.lora_A.shape
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * k ** -0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1 * r ** -0.5)


def build_on(device, arch="llama", quantize=None, group=False, layers=GPU_LAYERS, dtype=BF16):
    """``build`` at GPU_SHAPE on ``device`` in ``dtype``: the base from one seed, moved there before apply_lora
    (NF4 bases are quantized on the device, from the same bf16 values for every model)."""
    model = _base(arch, layers=layers, **GPU_SHAPE).to(device=device, dtype=dtype)
    lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, quantize=quantize, group_projections=group)
    _randomize_scaled(model)
    return model


def fp32_copy(model):
    """The (ungrouped) model in fp32: the same bf16 values or NF4 bytes, computed in fp32."""
    return copy.deepcopy(model).float()


def _flat(grads, names):
    return torch.cat([grads[n].detach().flatten().float().cpu() for n in names])


def assert_same_bf16_step(got, want, oracle, what, layers=GPU_LAYERS):
    """``got`` (grouped) against ``want`` (ungrouped, bf16) and ``oracle`` (the ungrouped model in fp32)."""
    from helpers import REL_TOL, rel_error

    (lg, ll, gg), (lw, lw_loss, gw), (_, lo_loss, go) = got, want, oracle
    assert_rel_close(lg.float(), lw.float(), BF16, f"{what} logits")
    assert_rel_close(ll.float(), lw_loss.float(), BF16, f"{what} loss")
    assert_rel_close(lw_loss.float(), lo_loss.float(), BF16, f"{what}: ungrouped bf16 vs fp32 loss")
    assert sorted(gg) == sorted(gw) == sorted(go), f"{what}: trainable parameters differ"
    assert len(gg) == 2 * len(TARGETS) * layers
    for name in gw:
        assert gg[name] is not None and gw[name].abs().sum() > 0, f"{what}: no gradient for {name}"
        own = rel_error(gw[name], go[name])
        err = rel_error(gg[name], gw[name])
        bound = max(REL_TOL[BF16], 2 * own)
        assert err <= bound, (f"{what} grad {name}: grouped vs ungrouped {err:.3e} > {bound:.3e} (ungrouped bf16 vs "
                              f"fp32: {own:.3e})")
    names = sorted(gw)
    mine, theirs = rel_error(_flat(gg, names), _flat(go, names)), rel_error(_flat(gw, names), _flat(go, names))
    # A sanity bound on the set-up, not on grouping: a model this far from its fp32 copy (ill-conditioned) would
    # make the bounds above vacuous.
    assert theirs <= 2 * REL_TOL[BF16], f"{what}: the ungrouped bf16 gradients are {theirs:.3e} from fp32"
    assert mine <= 1.5 * theirs + 1e-3, (f"{what}: all gradients, grouped vs fp32 {mine:.3e}, ungrouped vs fp32 "
                                         f"{theirs:.3e}")


@pytest.mark.gpu
@pytest.mark.parametrize("b_way", [None, "blockdiag"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_grouped_model_equals_ungrouped(gpu, arch, quantize, b_way, monkeypatch):
    """The grouped model's step equals the ungrouped one's; by default the stacked calls take B_rows = cat(B_i),
    with ``b_way`` "blockdiag" (LORA_OPS_GROUP_B=blockdiag) block_diag(B_i)."""
    from helpers import kernels_only

    if b_way is None:
        monkeypatch.delenv("LORA_OPS_GROUP_B", raising=False)
    else:
        monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
    ref, grp = build_on(gpu, arch, quantize), build_on(gpu, arch, quantize, group=True)
    assert [r["status"] for r in explain_groups(grp)] == ["grouped"] * (2 * GPU_LAYERS)
    assert grp.model.layers[0].self_attn.q_proj.weight.device.type == gpu.type
    ids = ids_for().to(gpu)
    want = step(ref, ids)
    oracle = step(fp32_copy(ref), ids)
    with kernels_only(monkeypatch, ("lora_fwd", "lora_bwd_dx", "lora_bwd_da")):
        calls = CallCounter(monkeypatch)
        got = step(grp, ids)
    assert calls.n == 4 * GPU_LAYERS  # qkv, o, gate/up, down per layer (7 ungrouped)
    assert_same_bf16_step(got, want, oracle, f"cuda {arch}/{quantize}")
    assert all(g._pending is None for g in projection_groups(grp).values())
    # Control: the same check catches k and v swapped (equal shapes), as on the CPU.
    real = ProjectionGroup._compute
    monkeypatch.setattr(ProjectionGroup, "_compute",
                        lambda self, x, t, key=None: (lambda ys: (ys[0], ys[2], ys[1]) if len(ys) == 3 else ys)(
                            real(self, x, t, key)))
    with pytest.raises(AssertionError):
        assert_same_bf16_step(step(grp, ids), want, oracle, "swapped k/v")


@pytest.mark.gpu
@pytest.mark.parametrize("fwd", [None, "members"])
def test_gpu_member_outputs(gpu, fwd, monkeypatch):
    """Where the group runs per member (by default gate/up; LORA_OPS_GROUP_FWD=members forces q/k/v too) each
    member's output is its own contiguous tensor, not a column view of one, and the step still equals the
    ungrouped model's."""
    if fwd is None:
        monkeypatch.delenv("LORA_OPS_GROUP_FWD", raising=False)
    else:
        monkeypatch.setenv("LORA_OPS_GROUP_FWD", fwd)
    monkeypatch.delenv("LORA_OPS_GROUP_BWD", raising=False)
    ref, grp = build_on(gpu, quantize="nf4"), build_on(gpu, quantize="nf4", group=True)
    ids = ids_for().to(gpu)
    want = step(ref, ids)
    oracle = step(fp32_copy(ref), ids)
    seen = {}
    layer = grp.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(layer.self_attn, name).register_forward_hook(lambda m, a, y, n=name: seen.setdefault(n, y))
    for name in ("gate_proj", "up_proj"):
        getattr(layer.mlp, name).register_forward_hook(lambda m, a, y, n=name: seen.setdefault(n, y))
    got = step(grp, ids)
    assert sorted(seen) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert seen["gate_proj"].is_contiguous() and seen["up_proj"].is_contiguous()
    qkv = [seen[n].is_contiguous() for n in ("q_proj", "k_proj", "v_proj")]
    assert qkv == [fwd == "members"] * 3
    assert_same_bf16_step(got, want, oracle, f"cuda grouped, forward {fwd or 'default'}")


@pytest.mark.gpu
@pytest.mark.parametrize("b_way", ["blockdiag", "rows"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_cpp_group_equals_python_group(gpu, quantize, b_way, monkeypatch):
    """On CUDA each group runs as one C++ autograd Function (csrc/lora_launch.cpp GroupFunction). With its backward
    on the concatenated dY and its forward on the stacked call (LORA_OPS_GROUP_BWD / _FWD=concat), its logits, loss
    and every gradient equal the Python group's (cat, block_diag, lora_linear, split; taken when the C++ entry
    returns None) bit for bit: both launch the same kernels on the same stacked tensors. (The per-member forward
    and backward, gate/up's by default, are checked against the ungrouped model in
    test_gpu_grouped_model_equals_ungrouped.) ``b_way`` "rows": the C++ side's stacked calls take B_rows =
    cat(B_i), which the kernels read as block_diag(B_i) (LORA_OPS_GROUP_B=rows): the same values again."""
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
    grp = build_on(gpu, quantize=quantize, group=True)
    ids = ids_for().to(gpu)
    real, used = grouped._launch.group, []

    def spy(*a, **k):
        ys = real(*a, **k)
        used.append(ys is not None and ys[0].grad_fn.name().endswith("GroupFunction>"))
        return ys
    monkeypatch.setattr(grouped._launch, "group", spy)
    step(grp, ids)  # a first call of each launch configuration runs the Python launchers (dB_bd whole)
    used.clear()
    contiguous = []  # then each dB_i as the Function hands it over: its own (N_i, r_i) block, not a view of dB_bd
    handles = [mod.lora_B.register_hook(lambda g: contiguous.append(g.is_contiguous()))
               for mod in lora_layers(grp).values() if mod._lora_group is not None]
    got = step(grp, ids)
    for h in handles:
        h.remove()
    assert used and all(used), "the groups did not take the C++ entry"
    assert len(contiguous) == len(handles) and all(contiguous), contiguous
    monkeypatch.setattr(grouped._launch, "group", lambda *a, **k: None)
    want = step(grp, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert sorted(got[2]) == sorted(want[2])
    for name, g in got[2].items():
        assert g is not None and torch.equal(g, want[2][name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_gradient_checkpointing(gpu, quantize, monkeypatch):
    ref, grp = build_on(gpu, quantize=quantize), build_on(gpu, quantize=quantize, group=True)
    ids = ids_for().to(gpu)
    oracle = step(fp32_copy(ref), ids)
    want = step(ref, ids)
    for m in (ref, grp):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_bf16_step(step(ref, ids), want, oracle, f"cuda ungrouped checkpointed {quantize}")
    calls = CallCounter(monkeypatch)
    assert_same_bf16_step(step(grp, ids), want, oracle, f"cuda grouped checkpointed {quantize}")
    assert calls.n == 2 * 4 * GPU_LAYERS  # the forward, and its recomputation in the backward


@pytest.mark.gpu
def test_gpu_torch_compile_inductor(gpu):
    """The grouped QLoRA model under torch.compile with Inductor (what backend="inductor", the default, runs;
    wrapped to count the graphs and their lora_fwd nodes) against the eager ungrouped model."""
    from torch._inductor.compile_fx import compile_fx

    layers = 2  # Inductor compiles every graph once: two layers keep it to seconds
    ref, grp = build_on(gpu, quantize="nf4", layers=layers), build_on(gpu, quantize="nf4", group=True, layers=layers)
    ids = ids_for().to(gpu)
    want = step(ref, ids)
    oracle = step(fp32_copy(ref), ids)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(grp, backend=lora_fwd_counting(graphs, compile_fx))
    assert_same_bf16_step(step(compiled, ids), want, oracle, "inductor-compiled grouped", layers)
    assert graphs == [4 * layers]  # one graph, one lora_fwd per group
    assert_same_bf16_step(step(compiled, ids), want, oracle, "inductor-compiled grouped, second call", layers)
    assert len(graphs) == 1  # no recompilation


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_torch_compile_reduce_overhead(gpu, quantize):
    """The grouped model under torch.compile(mode="reduce-overhead") (Inductor with CUDA-graph trees: what runs an
    eager-host-bound step with a few graph launches) against the eager ungrouped model, step after step, with the
    gradients set to None between steps as zero_grad(set_to_none=True) does (``step``). Each step is compared
    before the next one runs: a CUDA-graph tree's replay writes its outputs into the same memory."""
    layers = 2
    ref = build_on(gpu, quantize=quantize, layers=layers)
    grp = build_on(gpu, quantize=quantize, group=True, layers=layers)
    ids = ids_for().to(gpu)
    want = step(ref, ids)
    oracle = step(fp32_copy(ref), ids)
    torch._dynamo.reset()
    compiled = torch.compile(grp, mode="reduce-overhead")
    for i in range(4):  # warm-up, recording, then replays
        assert_same_bf16_step(step(compiled, ids), want, oracle, f"reduce-overhead grouped, step {i}", layers)
    assert {e["status"] for e in explain_groups(grp)} == {"grouped"}


def test_double_quant_group_keeps_codes_with_offsets_per_nested_block(monkeypatch):
    """LORA_OPS_GROUP_ABSMAX=codes: a double-quantized group concatenates its members' uint8 codes and nested absmax
    (views, like the bytes) and keeps one offset per nested block, not their absmax decoded to fp32. The step
    equals the default group's bit for bit (the same decoded values) and the ungrouped model's; the state dict is
    the ungrouped one; at decode sizes each member computes alone (the decode kernel takes one offset)."""
    def make(group):
        # hidden 256: every member but the last ends on a nested block (256 blocks of 64 weights)
        model = _base("llama", hidden=256, intermediate=256)
        lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, quantize="nf4", group_projections=group)
        randomize_adapters(model, scale=0.3)
        return model

    ref, fp32 = make(False), make(True)
    monkeypatch.setenv("LORA_OPS_GROUP_ABSMAX", "codes")
    grp = make(True)
    # Members that do not end on a nested block (hidden 64: q holds 64 blocks) keep the decoded fp32 absmax.
    small = build("llama", "nf4", group=True)
    assert all(g._base.absmax.dtype == F32 and not g._base.nested for g in projection_groups(small).values())
    groups = projection_groups(grp)
    assert len(groups) == 2 * N_LAYERS
    assert all(g._base.absmax.dtype == F32 and not g._base.nested for g in projection_groups(fp32).values())
    for g in groups.values():
        base = g._base
        assert base.nested and base.absmax.dtype == torch.uint8
        assert base.offset.numel() == base.nested_absmax.numel() > len(g.members)
        assert len({float(m.weight_offset) for m in g.members}) == len(g.members)
        for m in g.members:  # the members' codes and nested absmax live in the group's buffers
            for pname, buf in (("weight_absmax", base.absmax), ("weight_nested_absmax", base.nested_absmax)):
                assert m._parameters[pname].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    ids = ids_for()
    got, want_fp32, want = step(grp, ids), step(fp32, ids), step(ref, ids)
    assert torch.equal(got[0], want_fp32[0]) and torch.equal(got[1], want_fp32[1])
    assert all(torch.equal(got[2][n], want_fp32[2][n]) for n in want_fp32[2])
    # Against the ungrouped step: the stacked products sum in other orders (tiles over sum N_i, K = 256), which
    # at these widths moves fp32 gradients past its tightest tolerance; the fp16 one bounds them.
    assert_same_step(got, want, "codes", dtype=torch.float16)
    sd_ref, sd_grp = ref.state_dict(), grp.state_dict()
    assert list(sd_grp) == list(sd_ref) and all(torch.equal(sd_grp[k], sd_ref[k]) for k in sd_ref)
    # A dtype move (nn.Module._apply swaps each Parameter's data in place, then QLoRALinear puts its fp32 quant
    # state back under new Parameters): the codes group still decodes the members' values.
    monkeypatch.delenv("LORA_OPS_GROUP_ABSMAX")
    fp32_16 = make(True).to(torch.bfloat16)
    monkeypatch.setenv("LORA_OPS_GROUP_ABSMAX", "codes")
    grp_16 = make(True).to(torch.bfloat16)
    # No re-pack (the members' tensors kept their addresses): the group's own references must still be right.
    assert all(g._base.nested and g.repacks == 0 for g in projection_groups(grp_16).values())
    with torch.no_grad():
        assert torch.equal(grp_16(input_ids=ids).logits, fp32_16(input_ids=ids).logits)
    # A member's offset changed in place: the group re-packs its offsets.
    attn, attn_ref = grp.model.layers[0].self_attn, ref.model.layers[0].self_attn
    group = attn.lora_group_q_proj_k_proj_v_proj
    with torch.no_grad():
        attn.k_proj.weight_offset.add_(0.5)
        attn_ref.k_proj.weight_offset.add_(0.5)
        x = torch.randn(2, 5, 256)
        assert_rel_close(attn.k_proj(x), attn_ref.k_proj(x), F32, "k after its offset moved")
    assert group.repacks == 1 and group.disabled_reason is None
    # Decode sizes (inference at a few rows; a CUDA kernel, so forced here): each member alone on its own weight.
    from lora_ops import decode
    monkeypatch.setattr(decode, "use_decode", lambda x2, *a: x2.shape[0] <= 2)
    computed = []
    real_compute = ProjectionGroup._compute

    def compute(self, *a, **k):
        computed.append(self.names)
        return real_compute(self, *a, **k)

    monkeypatch.setattr(ProjectionGroup, "_compute", compute)
    grp.eval()
    ref.eval()
    with torch.no_grad():
        short = torch.randint(0, 97, (1, 2))
        assert_rel_close(grp(input_ids=short).logits, ref(input_ids=short).logits, F32, "decode step")
        assert computed == []
        prompt = torch.randint(0, 97, (1, 9))
        assert_rel_close(grp(input_ids=prompt).logits, ref(input_ids=prompt).logits, F32, "prefill")
        assert len(computed) == 2 * N_LAYERS


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [9, 96])  # the NF4 weight decoded in the K loop; dequantized first (64+ rows)
def test_gpu_codes_group_equals_fp32_group(gpu, monkeypatch, tokens):
    """On the GPU (C++ launch path, strict): a double-quantized group that keeps its members' codes and one offset
    per nested block (LORA_OPS_GROUP_ABSMAX=codes; the kernels' NESTED_OFFSETS) gives the step of the default group
    (the decoded fp32 absmax) bit for bit: the kernels decode the same absmax values."""
    shape = dict(hidden=256, intermediate=256)  # every member but the last ends on a nested block

    def make():
        model = _base("llama", layers=2, **shape).to(device=gpu, dtype=BF16)
        lora_ops.apply_lora(model, TARGETS, r=4, lora_alpha=8, quantize="nf4")
        _randomize_scaled(model)
        return model

    fp32 = make()
    monkeypatch.setenv("LORA_OPS_GROUP_ABSMAX", "codes")
    codes = make()
    assert all(g._base.nested and g._base.offset.numel() > 1 for g in projection_groups(codes).values())
    assert all(not g._base.nested for g in projection_groups(fp32).values())
    ids = torch.randint(0, 97, (1, tokens), generator=torch.Generator().manual_seed(5)).to(gpu)
    got, want = step(codes, ids), step(fp32, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert sorted(got[2]) == sorted(want[2]) and all(torch.equal(got[2][n], want[2][n]) for n in want[2])
    with torch.no_grad():  # a decode step: each member on its own decode kernel, as ungrouped
        codes.eval()
        fp32.eval()
        one = ids[:, :1]
        assert_rel_close(codes(input_ids=one).logits.float(), fp32(input_ids=one).logits.float(), BF16, "decode")
