"""Parity with PEFT itself (peft 0.21) on a tiny config-built LlamaForCausalLM: the same adapter gives the same
logits, loss and LoRA gradients; adapter files round-trip both ways; NF4 models match PEFT on the dequantized
weights (and on bitsandbytes Linear4bit layers); merge_and_unload matches PEFT's.

fp32 throughout, tolerances from tests/helpers.py; dropout p = 0 (PEFT draws its mask differently).
"""
import copy

import pytest
import torch

import lora_ops
from lora_ops.inject import lora_layers

from helpers import REL_TOL, assert_rel_close, rel_error
from test_inject import LLAMA_TARGETS, _bnb_model, dequantized_copy, randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ATTN = ["q_proj", "v_proj"]


def peft_model(base, targets, r, alpha, use_rslora=False, **kw):
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora,
                     **kw)
    return get_peft_model(copy.deepcopy(base), cfg)


def copy_ours_into_peft(ours, pm):
    """Our adapter tensors into PEFT's modules by name (independent of save_adapter/load_adapter)."""
    inner = pm.base_model.model
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            mod = inner.get_submodule(name)
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)


def peft_lora_grads(pm):
    out = {}
    for n, p in pm.named_parameters():
        if ".lora_" in n and p.grad is not None:
            # base_model.model.<path>.lora_A.default.weight -> <path>.lora_A
            path = n[len("base_model.model."):].replace(".default.weight", "")
            out[path] = p.grad.detach().clone()
    return out


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def ids_batch(seed=0, shape=(2, 11)):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


def compare(ours, pm, ids, what):
    """Logits, loss and every LoRA gradient; returns the max relative error seen."""
    ours.train()
    pm.train()
    lo, loss_o = forward_backward(ours, ids)
    lp, loss_p = forward_backward(pm, ids)
    errs = [assert_rel_close(lo, lp, torch.float32, f"{what}: logits"),
            assert_rel_close(loss_o, loss_p, torch.float32, f"{what}: loss")]
    gp = peft_lora_grads(pm)
    go = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(go) == set(gp) and go
    for n in go:
        errs.append(assert_rel_close(go[n], gp[n], torch.float32, f"{what}: grad {n}"))
    return max(errs)


@pytest.mark.parametrize("targets", [ATTN, LLAMA_TARGETS])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_adapter_same_logits_loss_and_grads(targets, use_rslora):
    base = tiny_llama()
    ours = lora_ops.apply_lora(copy.deepcopy(base), targets, r=5, lora_alpha=7, use_rslora=use_rslora)
    randomize_adapters(ours)
    pm = peft_model(base, targets, 5, 7, use_rslora)
    copy_ours_into_peft(ours, pm)
    compare(ours, pm, ids_batch(), "ours vs PEFT")
    # Mutation control: PEFT with another alpha (a wrong scaling) fails the same assertions.
    pm_wrong = peft_model(base, targets, 5, 8, use_rslora)
    copy_ours_into_peft(ours, pm_wrong)
    with pytest.raises(AssertionError):
        compare(ours, pm_wrong, ids_batch(), "wrong scaling")


def test_dropout_configured_but_eval_mode_matches():
    base = tiny_llama()
    ours = lora_ops.apply_lora(copy.deepcopy(base), ATTN, r=4, lora_alpha=8, lora_dropout=0.3)
    randomize_adapters(ours)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, lora_dropout=0.3))
    copy_ours_into_peft(ours, pm)
    ours.eval()
    pm.eval()
    ids = ids_batch(1)
    with torch.no_grad():
        assert_rel_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, torch.float32, "eval, p=0.3")
        ours.train()  # and training mode really drops (it is not a no-op)
        assert rel_error(ours(input_ids=ids).logits, pm(input_ids=ids).logits) > REL_TOL[torch.float32]


@pytest.mark.parametrize("hetero", [False, True])
def test_ours_to_peft(tmp_path, hetero):
    base = tiny_llama()
    ours = lora_ops.apply_lora(copy.deepcopy(base), ["q_proj", "down_proj"], r=3, lora_alpha=5)
    if hetero:
        lora_ops.apply_lora(ours, ["layers.1.self_attn.v_proj"], r=7, lora_alpha=3)
    randomize_adapters(ours)
    lora_ops.save_adapter(ours, tmp_path)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    cfg = pm.peft_config["default"]
    assert cfg.r == 3 and cfg.lora_alpha == 5 and not cfg.use_rslora
    inner = pm.base_model.model
    for name, layer in lora_layers(ours).items():
        mod = inner.get_submodule(name)
        assert mod.r["default"] == layer.r and mod.scaling["default"] == pytest.approx(layer.scaling)
        assert torch.equal(mod.lora_A["default"].weight, layer.lora_A)
    n_peft = sum(1 for _, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert n_peft == len(lora_layers(ours))
    compare(ours, pm, ids_batch(2), "ours -> PEFT")


@pytest.mark.parametrize("into", ["fresh", "adapted"])
@pytest.mark.parametrize("variant", ["plain", "patterns", "causal_lm", "rslora"])
def test_peft_to_ours(tmp_path, into, variant):
    base = tiny_llama()
    kw = {}
    if variant == "patterns":
        kw = dict(rank_pattern={"v_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 2})
    elif variant == "causal_lm":
        kw = dict(task_type="CAUSAL_LM")
    pm = peft_model(base, ["q_proj", "v_proj", "up_proj"], 4, 6, use_rslora=variant == "rslora", **kw)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path))
    if into == "fresh":
        ours = lora_ops.load_adapter(copy.deepcopy(base), tmp_path)
    else:
        if variant == "patterns":
            ours = lora_ops.apply_lora(copy.deepcopy(base), ["q_proj", "up_proj"], r=4, lora_alpha=6)
            ours.model.layers[1].self_attn.q_proj.lora_alpha = 2  # what the alpha pattern says
            lora_ops.apply_lora(ours, ["v_proj"], r=6, lora_alpha=6)
        else:
            ours = lora_ops.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=6,
                                       use_rslora=variant == "rslora")
        lora_ops.load_adapter(ours, tmp_path)
    layers = lora_layers(ours)
    assert len(layers) == 6
    if variant == "patterns":
        assert {n: l.r for n, l in layers.items() if "v_proj" in n} == {
            "model.layers.0.self_attn.v_proj": 6, "model.layers.1.self_attn.v_proj": 6}
        assert layers["model.layers.1.self_attn.q_proj"].lora_alpha == 2
        assert layers["model.layers.0.self_attn.q_proj"].lora_alpha == 6
    compare(ours, pm, ids_batch(3), f"PEFT -> ours ({variant})")


def test_nf4_model_matches_peft_on_dequantized_weights():
    base = tiny_llama()
    ours = lora_ops.apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=3, lora_alpha=5, quantize="nf4")
    randomize_adapters(ours)
    pm = peft_model(dequantized_copy(base, ours, torch.float32), LLAMA_TARGETS, 3, 5)
    copy_ours_into_peft(ours, pm)
    compare(ours, pm, ids_batch(4), "NF4 vs PEFT on dequantized")
    # Mutation control: PEFT on the original (unquantized) weights is a different model.
    pm_orig = peft_model(base, LLAMA_TARGETS, 3, 5)
    copy_ours_into_peft(ours, pm_orig)
    with pytest.raises(AssertionError):
        compare(ours, pm_orig, ids_batch(4), "unquantized")


def test_bnb_linear4bit_model_matches_peft_qlora():
    bnb = pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    bmodel = _bnb_model(bnb, base, ATTN)
    ours = lora_ops.apply_lora(copy.deepcopy(bmodel), ATTN, r=4, lora_alpha=8)
    randomize_adapters(ours)
    pm = peft_model(bmodel, ATTN, 4, 8)
    # PEFT wraps the bnb layer (its bnb-specific class needs a CUDA build); the base computation is bnb's.
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    copy_ours_into_peft(ours, pm)
    compare(ours, pm, ids_batch(5), "from_bnb vs PEFT+bitsandbytes")


def test_merge_and_unload_matches_peft():
    base = tiny_llama()
    ours = lora_ops.apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=5, lora_alpha=7)
    randomize_adapters(ours)
    pm = peft_model(base, LLAMA_TARGETS, 5, 7)
    copy_ours_into_peft(ours, pm)
    ids = ids_batch(6)
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        merged_peft = pm.merge_and_unload()
        lora_ops.merge_and_unload(ours)
        for (n, p), (n2, p2) in zip(ours.named_parameters(), merged_peft.named_parameters()):
            assert n == n2
            assert_rel_close(p, p2, torch.float32, n)
        assert_rel_close(ours(input_ids=ids).logits, unmerged, torch.float32, "merged ~= unmerged")
        assert_rel_close(ours(input_ids=ids).logits, merged_peft(input_ids=ids).logits, torch.float32, "vs PEFT")


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_bf16_nf4_model_matches_peft(cuda):
    """On the GPU (fast kernels): our NF4 model in bf16 vs PEFT on the dequantized bf16 weights."""
    base = tiny_llama().to(torch.bfloat16)
    ours = lora_ops.apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=8, lora_alpha=16, quantize="nf4")
    randomize_adapters(ours)
    dense = dequantized_copy(base, ours, torch.bfloat16)
    pm = get_peft_model(dense, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=0.0),
                        autocast_adapter_dtype=False)
    copy_ours_into_peft(ours, pm)
    ours.to(cuda)
    pm.to(cuda)
    ids = ids_batch(7, (4, 31)).to(cuda)
    # Two bf16 models round differently at every layer, so they are not compared with each other under the
    # one-op tolerance (measured 2.4e-2 apart on the H200 for 2 layers x 7 projections): each is compared with
    # the fp32 oracle (PEFT on the same dequantized weights in fp32), and ours must be no less accurate than
    # PEFT's bf16 model (within 25%). The absolute bound is for 14 stacked bf16 layers, not one op: it catches
    # a wrong model (relative error ~1), not rounding. Not yet run on the GPU in this form.
    oracle = copy.deepcopy(pm).float()
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
        ours_logits, peft_logits = ours(input_ids=ids).logits, pm(input_ids=ids).logits
    err_ours, err_peft = rel_error(ours_logits, want), rel_error(peft_logits, want)
    print(f"\n[peft parity gpu] bf16 NF4 logits vs fp32 oracle: ours {err_ours:.2e}, PEFT {err_peft:.2e}")
    assert err_ours <= 1.25 * err_peft, f"ours {err_ours:.3e} less accurate than PEFT's bf16 {err_peft:.3e}"
    assert err_ours <= 5e-2, f"ours {err_ours:.3e} vs the fp32 oracle"
