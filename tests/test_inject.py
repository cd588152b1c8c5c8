"""apply_lora (PEFT's matching rules), merge_and_unload, save_adapter/load_adapter validation, NF4 models, the
Hugging Face bitsandbytes-4bit state dict, and the fine-tuning example."""
import copy
import importlib.util
import json
import os
import re

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import LoRALinear, QLoRALinear
from lora_ops.grouped import projection_groups
from lora_ops.inject import CONFIG_NAME, WEIGHTS_NAME, lora_layers

from helpers import assert_rel_close, assert_unchanged, randomize_adapters, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(13, 11)
        self.v_proj = nn.Linear(13, 7, bias=False)
        self.proj = nn.Linear(11, 13)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.proj(self.act(self.q_proj(x))) + self.v_proj(x).sum(-1, keepdim=True)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(13, 5)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    # Odd sizes: hidden 42 = 3 heads of 14 (rotary needs an even head dim), one KV head, intermediate 75.
    cfg = LlamaConfig(hidden_size=42, intermediate_size=75, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, vocab_size=101, max_position_embeddings=32)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def dequantized_copy(base, qmodel, dtype):
    """A copy of ``base`` whose weights at qmodel's QLoRA layers are those layers' NF4 bases dequantized to
    ``dtype``: the dense model an NF4 model must equal."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in lora_layers(qmodel).items():
            assert isinstance(layer, QLoRALinear), name
            dense.get_submodule(name).weight.copy_(layer.nf4_weight.dequantize(dtype))
    return dense


def adapted(model):
    return sorted(lora_layers(model))


# ------------------------------------------------------------------------------------------------ matching

def test_list_targets_match_full_name_or_dot_suffix():
    m = Toy()
    out = lora_ops.apply_lora(m, ["q_proj"], r=2)
    assert out is m
    assert adapted(m) == ["layers.0.q_proj", "layers.1.q_proj"]
    # "proj" is a suffix of "q_proj" but not a "." + name suffix: only the layers named exactly "proj" match.
    assert adapted(lora_ops.apply_lora(Toy(), ["proj"], r=2)) == ["layers.0.proj", "layers.1.proj"]
    assert adapted(lora_ops.apply_lora(Toy(), ["layers.1.v_proj", "head"], r=2)) == ["head", "layers.1.v_proj"]


def test_str_target_is_a_fullmatch_regex():
    m = lora_ops.apply_lora(Toy(), r"layers\.1\.(q|v)_proj", r=2)
    assert adapted(m) == ["layers.1.q_proj", "layers.1.v_proj"]
    m2 = Toy()
    snap = snapshot(m2)
    with pytest.raises(ValueError, match="matched no module"):
        lora_ops.apply_lora(m2, "q_proj", r=2)  # a regex must match the whole name
    assert_unchanged(m2, snap)


def test_unmatched_entries_warn_and_no_match_raises():
    with pytest.warns(UserWarning, match="'nope'"):
        m = lora_ops.apply_lora(Toy(), ["q_proj", "nope"], r=2)
    assert adapted(m) == ["layers.0.q_proj", "layers.1.q_proj"]
    m = Toy()
    snap = snapshot(m)
    with pytest.warns(UserWarning, match="'nope'"), pytest.raises(ValueError, match="q_proj"):
        lora_ops.apply_lora(m, ["nope"], r=2)  # the error lists the linear layer names that exist
    assert_unchanged(m, snap)


def test_freezes_everything_but_lora():
    m = Toy()
    lora_ops.apply_lora(m, ["q_proj", "head"], r=3, lora_alpha=6)
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{p}.lora_{ab}" for p in ["head", "layers.0.q_proj", "layers.1.q_proj"]
                               for ab in "AB")
    assert isinstance(m.head, LoRALinear) and m.head.r == 3 and m.head.lora_alpha == 6


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_modules=["act"]), ValueError, "not linear"),
    (dict(target_modules=["q_proj"], r=0), ValueError, "r=0"),
    (dict(target_modules=["q_proj"], r=-1), ValueError, "r=-1"),
    (dict(target_modules=["q_proj"], lora_dropout=1.0), ValueError, "lora_dropout=1.0"),
    (dict(target_modules=["q_proj"], lora_dropout=-0.5), ValueError, "lora_dropout=-0.5"),
    (dict(target_modules=["q_proj"], quantize="nf8"), ValueError, "quantize='nf8'"),
    (dict(target_modules=["q_proj"], quantize="nf4", blocksize=100), ValueError, "blocksize=100"),
    (dict(target_modules=[]), ValueError, "empty"),
    (dict(target_modules=[3]), TypeError, "target_modules"),
    (dict(target_modules="(unclosed"), ValueError, "regular expression"),
])
def test_bad_input_leaves_model_unchanged(kwargs, exc, match):
    m = Toy()
    snap = snapshot(m)
    with pytest.raises(exc, match=match):
        lora_ops.apply_lora(m, **kwargs)
    assert_unchanged(m, snap)


def test_nan_weight_with_nf4_leaves_model_unchanged():
    m = Toy()
    with torch.no_grad():
        m.layers[1].q_proj.weight[0, 0] = float("nan")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="layers.1.q_proj.weight contains NaN"):
        lora_ops.apply_lora(m, ["q_proj"], quantize="nf4")
    types, flags, sd = snap
    assert [(n, type(mm)) for n, mm in m.named_modules()] == types and [(n, p.requires_grad) for n, p in
                                                                          m.named_parameters()] == flags


def test_applying_twice_raises():
    m = lora_ops.apply_lora(Toy(), ["q_proj"], r=2)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="already carry"):
        lora_ops.apply_lora(m, ["q_proj", "v_proj"], r=2)
    assert_unchanged(m, snap)
    lora_ops.apply_lora(m, ["v_proj"], r=4)  # other layers may get their own adapter
    assert {n: l.r for n, l in lora_layers(m).items()} == {
        "layers.0.q_proj": 2, "layers.1.q_proj": 2, "layers.0.v_proj": 4, "layers.1.v_proj": 4}
    assert all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())


def test_all_linear_skips_output_layer():
    m = lora_ops.apply_lora(tiny_llama(), "all-linear", r=2)
    names = adapted(m)
    assert len(names) == 14 and "lm_head" not in names
    assert all(n.rsplit(".", 1)[-1] in LLAMA_TARGETS for n in names)


# ------------------------------------------------------------------------------------------------ NF4 models

def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def test_nf4_model_equals_model_with_dequantized_dense_weights():
    base = tiny_llama()
    qmodel = lora_ops.apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=3, lora_alpha=5, quantize="nf4")
    randomize_adapters(qmodel)
    dense = dequantized_copy(base, qmodel, torch.float32)
    lora_ops.apply_lora(dense, LLAMA_TARGETS, r=3, lora_alpha=5)
    randomize_adapters(dense)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    lq, loss_q, gq = _loss_and_grads(qmodel, ids)
    ld, loss_d, gd = _loss_and_grads(dense, ids)
    assert_rel_close(lq, ld, torch.float32, "logits")
    assert_rel_close(loss_q, loss_d, torch.float32, "loss")
    assert set(gq) == set(gd) and len(gq) == 28
    for n in gq:
        assert_rel_close(gq[n], gd[n], torch.float32, n)
    # Mutation control: the original (unquantized) weights are another model at fp32 tolerance.
    plain = lora_ops.apply_lora(copy.deepcopy(base), LLAMA_TARGETS, r=3, lora_alpha=5)
    randomize_adapters(plain)
    with pytest.raises(AssertionError):
        assert_rel_close(lq, plain(input_ids=ids).logits.detach(), torch.float32, "unquantized")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_gives_plain_linears(quantize):
    model = lora_ops.apply_lora(tiny_llama(), LLAMA_TARGETS, r=3, lora_alpha=5, quantize=quantize)
    randomize_adapters(model)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = lora_ops.merge_and_unload(model)
    assert out is model and not lora_layers(model)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert len(linears) == 14 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert_rel_close(after, before, torch.float32, "merged model")


def test_merged_layers_forward_and_unload():
    model = lora_ops.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_adapters(model)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in lora_layers(model).values():
            layer.merge()
        assert_rel_close(model(input_ids=ids).logits, before, torch.float32, "merged layers")
        lora_ops.merge_and_unload(model)  # a merged layer is unwrapped, not merged twice
        assert_rel_close(model(input_ids=ids).logits, before, torch.float32, "unloaded after merge")


def _bnb_model(bnb, base, targets):
    """A copy of ``base`` whose target linears are bitsandbytes Linear4bit (quantized by bnb on CPU)."""
    m = copy.deepcopy(base)
    for name, lin in list(m.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                   compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                          quant_type="nf4", blocksize=64)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent), child, l4.to("cpu"))
    return m


def test_bnb_linear4bit_model_and_hf_4bit_state_dict():
    bnb = pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    bmodel = _bnb_model(bnb, base, targets)
    hf_sd = {k: v.clone() for k, v in bmodel.state_dict().items()}  # Hugging Face's pre-quantized layout
    ours_from_bnb = lora_ops.apply_lora(copy.deepcopy(bmodel), targets, r=3, lora_alpha=4)
    layers = lora_layers(ours_from_bnb)
    assert len(layers) == 6 and all(isinstance(l, QLoRALinear) for l in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.weight, hf_sd[name + ".weight"])  # bnb's bytes, not re-quantized
    # The HF bnb-4bit state dict loads into a QLoRA model quantized by us from other weights.
    other = lora_ops.apply_lora(tiny_llama(seed=7), targets, r=3, lora_alpha=4, quantize="nf4")
    missing, unexpected = other.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"{n}.lora_{ab}" for n in layers for ab in "AB")
    for name, layer in lora_layers(other).items():
        for a, b in zip(layer.nf4_weight.tensors(), layers[name].nf4_weight.tensors()):
            assert torch.equal(a, b), name
    randomize_adapters(ours_from_bnb)
    randomize_adapters(other)
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, ours_from_bnb(input_ids=ids).logits)
    # And our state dict is bnb's layout again: same keys as the bnb model for the base.
    ours_sd = other.state_dict()
    assert set(ours_sd) - set(hf_sd) == set(missing)
    assert set(hf_sd) <= set(ours_sd)


# ------------------------------------------------------------------------------------------------ adapter files

def _saved(tmp_path, r=3, alpha=5, targets=("q_proj", "v_proj"), seed=1, **kw):
    model = lora_ops.apply_lora(tiny_llama(), list(targets), r=r, lora_alpha=alpha, **kw)
    randomize_adapters(model, seed)
    d = tmp_path / f"adapter_r{r}_{seed}"
    lora_ops.save_adapter(model, d)
    return model, d


def test_save_writes_peft_layout(tmp_path):
    from safetensors.torch import load_file
    model, d = _saved(tmp_path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 5 and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["use_rslora"] is False
    assert cfg["lora_dropout"] == 0.0 and cfg["task_type"] is None
    sd = load_file(str(d / WEIGHTS_NAME))
    assert set(sd) == {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                       for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    layer = model.model.layers[1].self_attn.v_proj
    assert torch.equal(sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"], layer.lora_B)


@pytest.mark.parametrize("into", ["fresh", "adapted"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_round_trip_ours(tmp_path, into, quantize):
    model, d = _saved(tmp_path, quantize=quantize)
    if into == "fresh":
        target = lora_ops.load_adapter(tiny_llama(), d, quantize=quantize)
    else:
        target = lora_ops.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5, quantize=quantize)
        lora_ops.load_adapter(target, d)
    assert adapted(target) == adapted(model)
    assert all(p.requires_grad == (".lora_" in n) for n, p in target.named_parameters())
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(target(input_ids=ids).logits, model(input_ids=ids).logits)


def test_heterogeneous_ranks_round_trip(tmp_path):
    model = lora_ops.apply_lora(tiny_llama(), ["q_proj"], r=3, lora_alpha=5)
    lora_ops.apply_lora(model, ["layers.1.self_attn.v_proj"], r=6, lora_alpha=2)
    randomize_adapters(model)
    lora_ops.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["r"] == 3 and list(cfg["rank_pattern"].values()) == [6] and list(cfg["alpha_pattern"].values()) == [2]
    # The source model's q_proj and v_proj were adapted by two calls, so they are not grouped; loaded in one call
    # they are (the default), which computes the same values with another rounding; without grouping, bit for bit.
    loaded = lora_ops.load_adapter(tiny_llama(), tmp_path / "a")
    plain = lora_ops.load_adapter(tiny_llama(), tmp_path / "a", group_projections=False)
    assert len(projection_groups(loaded)) == 1 and not projection_groups(model) and not projection_groups(plain)
    for m in (loaded, plain):
        assert {n: (l.r, l.lora_alpha) for n, l in lora_layers(m).items()} == \
            {n: (l.r, l.lora_alpha) for n, l in lora_layers(model).items()}
    ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, want)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)


def _edit_config(d, **changes):
    p = d / CONFIG_NAME
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file
    p = str(d / WEIGHTS_NAME)
    sd = load_file(p)
    fn(sd)
    save_file(sd, p)


KEY_Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _tamper_rank(tmp_path, d):
    _, d3 = _saved(tmp_path, r=4)  # a consistent adapter of another rank
    return d3


def _tamper(kind):
    def go(tmp_path, d):
        if kind == "shape":
            _edit_tensors(d, lambda sd: sd.__setitem__(KEY_Q0A, torch.randn(3, 41)))
        elif kind == "missing":
            _edit_tensors(d, lambda sd: sd.pop(KEY_Q0A))
        elif kind == "extra":
            _edit_tensors(d, lambda sd: sd.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                                                       torch.randn(3, 42)))
        elif kind == "extra-non-lora":
            _edit_tensors(d, lambda sd: sd.__setitem__("base_model.model.lm_head.weight", torch.randn(101, 42)))
        elif kind == "dtype":
            _edit_tensors(d, lambda sd: sd.__setitem__(KEY_Q0A, torch.ones(3, 42, dtype=torch.int32)))
        elif kind == "nan":
            _edit_tensors(d, lambda sd: sd[KEY_Q0A].__setitem__((0, 0), float("nan")))
        elif kind == "config-r":
            _edit_config(d, r=4)
        elif kind == "config-alpha":
            _edit_config(d, lora_alpha=6)
        elif kind == "config-targets":
            _edit_config(d, target_modules=["q_proj"])
        elif kind == "peft-type":
            _edit_config(d, peft_type="IA3")
        elif kind == "dora":
            _edit_config(d, use_dora=True)
        elif kind == "pissa":
            _edit_config(d, init_lora_weights="pissa")
        elif kind == "modules-to-save":
            _edit_config(d, modules_to_save=["lm_head"])
        elif kind == "no-config":
            (d / CONFIG_NAME).unlink()
        elif kind == "no-weights":
            (d / WEIGHTS_NAME).unlink()
        elif kind == "corrupt":
            (d / WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        elif kind == "bad-json":
            (d / CONFIG_NAME).write_text("{r: 3")
        elif kind == "rank":
            return _tamper_rank(tmp_path, d)
        return d
    return go


TAMPERINGS = ["shape", "missing", "extra", "extra-non-lora", "dtype", "nan", "config-r", "config-alpha",
              "config-targets", "peft-type", "dora", "pissa", "modules-to-save", "no-config", "no-weights", "corrupt", "bad-json", "rank"]


@pytest.mark.parametrize("kind", TAMPERINGS)
@pytest.mark.parametrize("into", ["adapted", "fresh"])
def test_mismatched_adapter_raises_and_changes_nothing(tmp_path, kind, into):
    _, d = _saved(tmp_path, r=3, alpha=5)
    d = _tamper(kind)(tmp_path, d)
    if into == "adapted":
        model = lora_ops.apply_lora(tiny_llama(seed=3), ["q_proj", "v_proj"], r=3, lora_alpha=5)
        randomize_adapters(model, seed=9)
    else:
        model = tiny_llama(seed=3)
    if into == "fresh" and kind in ("config-alpha", "rank"):
        # A fresh model takes its ranks/alpha from the file; these two are consistent adapters, so they load.
        lora_ops.load_adapter(model, d)
        assert {(l.r, l.lora_alpha) for l in lora_layers(model).values()} == {(4, 5) if kind == "rank" else (3, 6)}
        return
    snap = snapshot(model)
    with pytest.raises(ValueError) as e:
        lora_ops.load_adapter(model, d)
    assert_unchanged(model, snap)
    msg = str(e.value)
    expect = {"shape": r"\(3, 41\)", "missing": "missing key .*q_proj.lora_A", "extra": "up_proj",
              "extra-non-lora": "lm_head.weight",
              "dtype": "int32", "nan": "NaN", "config-r": "rank|shape", "config-alpha": "lora_alpha",
              "config-targets": "target_modules|lacks|not among", "peft-type": "IA3", "dora": "use_dora",
              "pissa": "pissa", "modules-to-save": "modules_to_save", "no-config": CONFIG_NAME,
              "no-weights": WEIGHTS_NAME, "corrupt": "not a readable safetensors", "bad-json": "not readable JSON",
              "rank": "rank|shape"}[kind]
    assert re.search(expect, msg), msg


def test_merged_layer_refuses_new_adapter(tmp_path):
    _, d = _saved(tmp_path)
    model = lora_ops.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5)
    randomize_adapters(model, seed=4)
    model.model.layers[0].self_attn.q_proj.merge()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora_ops.load_adapter(model, d)
    assert_unchanged(model, snap)


def test_save_without_lora_layers_raises(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ops.save_adapter(Toy(), tmp_path / "x")


# ------------------------------------------------------------------------------------------------ example

def test_finetune_example_runs_and_loss_falls(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_example", os.path.join(ROOT, "examples", "finetune.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--device", "cpu", "--steps", "40", "--quiet", "--save", str(tmp_path / "ad")])
    losses = res["losses"]
    assert len(losses) == 40 and all(map(lambda v: v == v, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert res["tokens_per_s"] > 0
    assert all(isinstance(l, QLoRALinear) for l in lora_layers(res["model"]).values())
    assert (tmp_path / "ad" / WEIGHTS_NAME).is_file()


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_finetune_example_bf16(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_example", os.path.join(ROOT, "examples", "finetune.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--device", "cuda", "--dtype", "bfloat16", "--steps", "100", "--quiet"])
    losses = res["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
