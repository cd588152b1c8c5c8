"""Model-level benchmark (preset ``model``): training steps of a whole Llama-3-8B-shaped decoder per provider.

Per provider, in one process and on the same token ids:

1. memory baseline = ``memory_allocated()`` before the model is built (so its weights count);
2. build: ``LlamaForCausalLM`` from a ``LlamaConfig`` (transformers; random init created directly on the
   device in the case dtype after ``torch.manual_seed(seed)``, so every provider starts from the same base
   weights; nothing is downloaded); peft_bnb then swaps the seven projections for bitsandbytes ``Linear4bit``
   (NF4, double quant), as loading a checkpoint with ``load_in_4bit`` does; then ``prepare_for_training`` (the
   same for every provider: gradient checkpointing when the case has it, the input embeddings' output requiring
   grad), then the provider's adapter (see ``BUILDERS``; ``fused_grouped`` / ``fused_qlora_grouped`` are
   ``fused`` / ``fused_qlora`` with ``apply_lora(..., group_projections=True)``: q/k/v and gate/up of every layer
   each one ``lora_linear`` call, docs/GROUPED.md);
3. ``warmup_steps`` untimed steps, then ``reset_peak_memory_stats`` and ``steps`` timed steps; a step is
   ``zero_grad(set_to_none=True)``, ``loss = model(input_ids=ids, labels=ids).loss`` (causal-LM loss on random
   ids (batch, seq)), ``loss.backward()``, ``AdamW.step()`` over the trainable parameters (the floor has none:
   no optimizer), then a device synchronize: each step is wall-clock timed (``time.perf_counter``), host time
   included, no CUDA graphs;
4. rows: ``tokens_per_s`` (batch * seq / median step time), ``time_ms`` (step), ``peak_extra_mib`` (CUDA:
   max_memory_allocated during the timed steps - baseline), ``model_mib`` (allocated after the build -
   baseline), ``trainable_params``, ``loss_first`` / ``loss_last``. ``ratio_to_floor`` of tokens/s, step time
   and peak memory is to the ``floor`` provider of the same run (the case's ``floor``): the same dense model (in
   the case dtype) with no adapter and every parameter frozen, whose backward still runs through every layer
   (to the embeddings' output), with checkpointing when the case has it: the least a step of this model can
   cost. The report adds the ratios to peft_bnb of the same run (the case's ``reference``) from the values.

5. where a grouped provider and its ungrouped twin (``report.MODEL_GROUPED``) both ran, the two models again,
   built side by side: each warmed up, then ``steps`` rounds of one timed step of each, the order alternating by
   round, so that drift of the host or the clocks falls on both; a row ``grouping_ratio`` (mode ``paired``, on
   the grouped provider): the median over the rounds of grouped step ÷ twin step, p20 / p80 of those ratios.

Everything a provider holds is dropped and the allocator emptied before the next one is built. A provider that
fails (OOM, missing package, bitsandbytes without its CUDA build) is recorded as ``skipped`` with the reason. A
grouped provider whose groups did not form after the build, or turned themselves off during the steps
(``check_groups``), fails the same way, so an ungrouped model is never timed under a grouped name.
No autocast: every provider computes in the model dtype, LoRA adapters included. peft_bnb gets what
``peft.prepare_model_for_kbit_training`` does except its fp32 upcast of the non-quantized parameters (norms,
embeddings, lm_head): that upcast would run the residual stream in fp32 for that provider alone; and PEFT would
keep 4-bit-base adapters in fp32 and cast x up to them, while here they are cast to the model dtype, as the
layer presets do, so like is compared with like.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import report
from .harness import MIB, Rows, Run, _reason, _skip_rows, quantiles
from .presets import MODEL_TARGETS, ModelCase
from .providers import DTYPES, NF4_BLOCKSIZE, bnb_linear4bit

ModelBuilder = Callable[[ModelCase, torch.device], Tuple[nn.Module, Dict]]


# --------------------------------------------------------------------------------------------- the model

def llama_config(case: ModelCase):
    """The case's ``LlamaConfig``: Llama-3-8B's shape (or the tiny CPU one) at ``case.layers`` layers."""
    from transformers import LlamaConfig

    d = case.dims
    return LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                       num_hidden_layers=case.layers, num_attention_heads=d["heads"],
                       num_key_value_heads=d["kv_heads"], max_position_embeddings=max(8192, case.seq),
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")


def base_model(case: ModelCase, device: torch.device, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM in the case dtype, created on ``device`` (no CPU copy)."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(case)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[case.dtype])
    return model.train()


# The gradient checkpointing current transformers/PEFT recipes ask for (transformers' own default too).
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def prepare_for_training(model: nn.Module, case: ModelCase) -> Dict:
    """What every provider's model gets before its adapter, as PEFT/transformers training recipes set it up.

    With ``case.checkpointing``: ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False})`` (every decoder layer recomputes its forward in the backward; transformers also
    makes the input embeddings' output require grad there). Without: ``model.enable_input_require_grads()``, so
    that in every case the backward runs from the loss through every layer down to the embeddings' output, for
    the frozen floor too, and every provider computes the same chain of input gradients. Returns what was done.
    """
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    else:
        model.enable_input_require_grads()
    return {"gradient_checkpointing": (f"gradient_checkpointing_enable({CHECKPOINTING_KWARGS})"
                                       if case.checkpointing else False),
            "input_require_grads": True}


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model itself (under PEFT's wrappers for the PEFT providers)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def expected_lora_params(case: ModelCase) -> int:
    """Trainable parameters of r-rank adapters on the seven projections of every layer."""
    d = case.dims
    head_dim = d["hidden"] // d["heads"]
    kv = d["kv_heads"] * head_dim
    io = {"q_proj": (d["hidden"], d["hidden"]), "k_proj": (d["hidden"], kv), "v_proj": (d["hidden"], kv),
          "o_proj": (d["hidden"], d["hidden"]), "gate_proj": (d["hidden"], d["intermediate"]),
          "up_proj": (d["hidden"], d["intermediate"]), "down_proj": (d["intermediate"], d["hidden"])}
    return case.layers * case.r * sum(i + o for i, o in io.values())


def _trainable(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def check_model(case: ModelCase, model: nn.Module, provider: str) -> None:
    """Refuse a built model that is not the case's: the wrong trainable parameters (LoRA providers: r-rank
    adapters on the seven projections of every layer in the model dtype, nothing else; floor: nothing; full_ft:
    everything) or gradient checkpointing not as the case says."""
    params = _trainable(model)
    n = sum(p.numel() for p in params)
    if provider in LORA:
        want = expected_lora_params(case)
        if n != want:
            raise RuntimeError(f"{provider}: {n} trainable parameters, expected {want} (r={case.r} adapters on "
                               f"{', '.join(MODEL_TARGETS)} of {case.layers} layers and nothing else)")
        dtypes = {p.dtype for p in params}
        if dtypes != {DTYPES[case.dtype]}:
            raise RuntimeError(f"{provider}: adapter dtypes {dtypes}, expected {case.dtype}")
    elif provider == "floor" and n:
        raise RuntimeError(f"floor: {n} trainable parameters, expected none (every parameter frozen)")
    elif provider == "full_ft" and n != sum(p.numel() for p in model.parameters()):
        raise RuntimeError("full_ft: some parameters are frozen, expected every parameter to train")
    on = bool(getattr(hf_model(model), "is_gradient_checkpointing", False))
    if on != case.checkpointing:
        raise RuntimeError(f"{provider}: gradient checkpointing is {'on' if on else 'off'}, the case "
                           f"{case.name!r} has it {'on' if case.checkpointing else 'off'}")


# ---------------------------------------------------------------------------------------------- builders

def prepared_model(case: ModelCase, device: torch.device, seed: int = 0) -> Tuple[nn.Module, Dict]:
    model = base_model(case, device, seed)
    return model, prepare_for_training(model, case)


def _whole_model(case: ModelCase, device: torch.device, seed: int, trainable: bool, adapter: str):
    """The prepared model with every parameter trainable or every one frozen (no adapters)."""
    model, info = prepared_model(case, device, seed)
    for p in model.parameters():
        p.requires_grad_(trainable)
    info.update(adapter=adapter)
    return model, info


def build_floor(case: ModelCase, device: torch.device, seed: int = 0):
    return _whole_model(case, device, seed, False,
                        "none: every parameter frozen, no optimizer; the backward reaches the embeddings' output")


def build_fused(case: ModelCase, device: torch.device, seed: int = 0, quantize: Optional[str] = None,
                group: bool = False):
    import lora_ops

    model, info = prepared_model(case, device, seed)
    lora_ops.apply_lora(model, list(MODEL_TARGETS), r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0,
                        quantize=quantize, blocksize=NF4_BLOCKSIZE, double_quant=True,
                        group_projections=group)
    info.update(adapter="lora_ops.apply_lora", quantize=quantize or "none")
    if quantize:
        info.update(blocksize=NF4_BLOCKSIZE, double_quant=True)
    if group:
        name = "fused_qlora_grouped" if quantize else "fused_grouped"
        info.update(group_projections=True, groups=check_groups(case, model, name, "after apply_lora"))
    return model, info


def build_fused_qlora(case: ModelCase, device: torch.device, seed: int = 0):
    return build_fused(case, device, seed, quantize="nf4")


def build_fused_grouped(case: ModelCase, device: torch.device, seed: int = 0):
    return build_fused(case, device, seed, group=True)


def build_fused_qlora_grouped(case: ModelCase, device: torch.device, seed: int = 0):
    return build_fused(case, device, seed, quantize="nf4", group=True)


def check_groups(case: ModelCase, model: nn.Module, provider: str, when: str) -> Dict[str, int]:
    """Refuse a grouped provider's model unless q/k/v and gate/up of every layer are grouped
    (``lora_ops.grouped.explain_groups``: 2 groups per layer, each "grouped"), so an ungrouped model is never
    timed under a grouped name. A group that formed can still turn itself off in a forward (a member called with
    another input), hence ``_measure`` asks again after the timed steps. Returns the groups' status counts."""
    from lora_ops.grouped import explain_groups

    rows = explain_groups(hf_model(model))
    counts = dict(Counter(str(r["status"]) for r in rows))
    want = 2 * case.layers
    if len(rows) != want or counts.get("grouped", 0) != want:
        bad = [r for r in rows if r["status"] != "grouped"][:2]
        raise RuntimeError(f"{provider}: group_projections=True left the projections ungrouped {when}: "
                           f"{counts.get('grouped', 0)} of {want} groups (q/k/v, gate/up per layer) grouped, "
                           f"statuses {counts}; e.g. {bad}")
    return counts


def _peft(model: nn.Module, case: ModelCase) -> Tuple[nn.Module, Dict]:
    import peft
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=0.0, target_modules=list(MODEL_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    dtype = DTYPES[case.dtype]
    layer_types = set()
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            # On a 4-bit base PEFT creates the adapter in fp32 (the packed weight has no float dtype to follow).
            m.lora_A.to(dtype)
            m.lora_B.to(dtype)
            layer_types.add(f"{type(m).__module__}.{type(m).__name__}")
    return model, {"adapter": "peft.get_peft_model", "peft": peft.__version__, "lora_layer": sorted(layer_types),
                   "adapter_dtype": case.dtype}


def build_peft(case: ModelCase, device: torch.device, seed: int = 0):
    model, info = prepared_model(case, device, seed)
    model, more = _peft(model, case)
    return model, dict(info, **more)


def bnb_unavailable(device: torch.device) -> Optional[str]:
    """Why bitsandbytes cannot quantize/run 4-bit layers on ``device`` here (None when it can)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"bitsandbytes is not importable: {_reason(e)}"
    if device.type == "cuda":
        # BNB_BACKEND says "CUDA" whenever torch sees a GPU; only a loaded CUDA library has bitsandbytes' kernels
        # (without it some ops would fall back to slow pure-PyTorch code and peft_bnb would be timed unfairly).
        lib = getattr(getattr(bnb, "cextension", None), "lib", None)
        if type(lib).__name__ != "CudaBNBNativeLibrary":
            return (f"bitsandbytes {bnb.__version__} has no CUDA library loaded here ({type(lib).__name__}); "
                    "install its CUDA build (docs/DESIGN.md: carry the wheel) to time peft_bnb")
    try:  # the kernels themselves, on a tiny weight
        w = torch.randn(64, 64, device=device, dtype=torch.float32)
        q, state = bnbf.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        bnbf.dequantize_4bit(q, state, quant_type="nf4")
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {bnb.__version__} cannot run NF4 on {device.type}: {_reason(e)}"
    return None


def to_bnb_4bit(model: nn.Module, targets, compute_dtype: torch.dtype) -> int:
    """Replace the targeted nn.Linear layers by bitsandbytes Linear4bit (NF4, double quant, blocksize 64),
    quantized by bitsandbytes' own kernel on the weights' device; mark the model loaded-in-4bit as transformers
    does, so PEFT wraps them in its bnb Linear4bit LoRA layer. Returns how many were replaced."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or name.rsplit(".", 1)[-1] not in targets:
            continue
        lin = bnb_linear4bit(mod.weight, compute_dtype, mod.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
        n += 1
    model.is_loaded_in_4bit = True
    return n


def build_peft_bnb(case: ModelCase, device: torch.device, seed: int = 0):
    reason = bnb_unavailable(device)
    if reason:
        raise RuntimeError(reason)
    import bitsandbytes as bnb

    model = base_model(case, device, seed)
    n = to_bnb_4bit(model, MODEL_TARGETS, DTYPES[case.dtype])
    if n != 7 * case.layers:
        raise RuntimeError(f"replaced {n} linear layers by Linear4bit, expected {7 * case.layers}")
    info = prepare_for_training(model, case)  # on the 4-bit model, as prepare_model_for_kbit_training runs
    model, more = _peft(model, case)
    info.update(more, bitsandbytes=bnb.__version__, base="bitsandbytes Linear4bit nf4, double quant, blocksize 64",
                prepare="prepare_model_for_kbit_training's checkpointing and input grads, not its fp32 upcast")
    return model, info


def build_full_ft(case: ModelCase, device: torch.device, seed: int = 0):
    return _whole_model(case, device, seed, True, "none: every parameter trains")


BUILDERS: Dict[str, ModelBuilder] = {
    "floor": build_floor,
    "peft_bnb": build_peft_bnb,
    "fused_qlora": build_fused_qlora,
    "fused_qlora_grouped": build_fused_qlora_grouped,
    "peft": build_peft,
    "fused": build_fused,
    "fused_grouped": build_fused_grouped,
    "full_ft": build_full_ft,
}
LORA = ("fused", "fused_qlora", "fused_grouped", "fused_qlora_grouped", "peft", "peft_bnb")
# Providers built with group_projections=True: check_groups runs after their build and after their timed steps.
GROUPED = ("fused_grouped", "fused_qlora_grouped")


# ------------------------------------------------------------------------------------------------ running

def token_ids(case: ModelCase, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randint(0, case.dims["vocab"], (case.batch, case.seq), generator=gen, device=device)


def training_step(model: torch.nn.Module, ids: torch.Tensor, case: ModelCase):
    """(step, optimizer or None, trainable parameter count): the preset's training step, forward + causal-LM loss +
    backward + AdamW over the trainable parameters. The floor trains nothing: its step is forward + backward
    (AdamW refuses an empty parameter list)."""
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=case.lr) if params else None
    model.train()

    def step() -> torch.Tensor:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        return loss.detach()

    return step, opt, sum(p.numel() for p in params)


def _timed(step: Callable[[], torch.Tensor], dev) -> Tuple[float, torch.Tensor]:
    """(ms, loss) of one training step, wall-clock up to the device synchronize after it (host time included)."""
    t0 = time.perf_counter()
    loss = step()
    dev.sync()
    return (time.perf_counter() - t0) * 1e3, loss


def _measure(run: Run, case: ModelCase, provider: str, builder: ModelBuilder, ids: torch.Tensor) -> List[Dict]:
    """Build, warm up, time; every tensor this provider made dies with this frame."""
    dev = run.dev
    dev.sync()
    baseline = dev.allocated()
    model, info = builder(case, dev.device, run.settings.seed)
    check_model(case, model, provider)
    dev.sync()
    model_bytes = dev.allocated() - baseline
    step, opt, n_trainable = training_step(model, ids, case)
    first = float(step())
    for _ in range(case.warmup_steps - 1):
        step()
    dev.sync()
    if dev.cuda:
        torch.cuda.reset_peak_memory_stats(dev.device)
    samples = []
    last = None
    for _ in range(case.steps):
        ms, last = _timed(step, dev)
        samples.append(ms)
    peak = torch.cuda.max_memory_allocated(dev.device) - baseline if dev.cuda else None
    if provider in GROUPED:
        check_groups(case, model, provider, "during the steps")
    last = float(last)
    if opt is not None:
        opt.zero_grad(set_to_none=True)

    p50, p20, p80 = quantiles(samples)
    tok = case.tokens
    config = dict(case.config(), mode="step", provider_info=info, timer="time.perf_counter + synchronize per step",
                  optimizer=(f"torch.optim.AdamW(lr={case.lr:g}) over the trainable parameters" if opt is not None
                             else "none (no trainable parameter)"),
                  step="zero_grad(set_to_none) + forward with causal-LM loss + backward + optimizer step",
                  gradient_checkpointing=info.get("gradient_checkpointing", False),
                  input_require_grads=info.get("input_require_grads", False), cuda_graphs=False)
    rows = Rows(run, case, provider, "step", config)
    rows.add("tokens_per_s", tok * 1e3 / p50, "tokens/s", tok * 1e3 / p80, tok * 1e3 / p20,
             note=f"{case.batch}x{case.seq} tokens per step / median of {case.steps} timed steps after "
                  f"{case.warmup_steps} warm-up")
    rows.add("time_ms", p50, "ms", p20, p80, note=f"one training step, median of {case.steps}")
    if peak is None:
        rows.add("peak_extra_mib", math.nan, "MiB", status="n/a", note="no device memory statistics on the CPU")
        rows.add("model_mib", math.nan, "MiB", status="n/a", note="no device memory statistics on the CPU")
    else:
        rows.add("peak_extra_mib", peak / MIB, "MiB",
                 note="max_memory_allocated during the timed steps - baseline before the model was built")
        rows.add("model_mib", model_bytes / MIB, "MiB", note="allocated after the build - baseline (weights)")
    rows.add("trainable_params", n_trainable, "count")
    rows.add("loss_first", first, "nats", note="causal-LM loss of the first (warm-up) step: same base weights")
    rows.add("loss_last", last, "nats", note="loss of the last timed step (finite: the steps trained sanely)")
    if not (math.isfinite(first) and math.isfinite(last)):
        raise FloatingPointError(f"{provider}: non-finite loss (first {first}, last {last})")
    return rows.rows


def _measure_pair(run: Run, case: ModelCase, grouped: str, twin: str, builders: Dict[str, ModelBuilder],
                  ids: torch.Tensor) -> List[Dict]:
    """Step 5 of the module docstring: grouped ÷ twin from interleaved steps of both models, side by side."""
    dev = run.dev
    steps, models = {}, {}
    for provider in (twin, grouped):
        model, _ = builders[provider](case, dev.device, run.settings.seed)
        check_model(case, model, provider)
        steps[provider], _, _ = training_step(model, ids, case)
        models[provider] = model
        for _ in range(case.warmup_steps):
            steps[provider]()
    dev.sync()
    times: Dict[str, List[float]] = {twin: [], grouped: []}
    for i in range(case.steps):
        for provider in ((twin, grouped) if i % 2 == 0 else (grouped, twin)):
            times[provider].append(_timed(steps[provider], dev)[0])
    check_groups(case, models[grouped], grouped, "during the paired steps")
    p50, p20, p80 = quantiles([g / t for g, t in zip(times[grouped], times[twin])])
    config = dict(case.config(), mode="paired", twin=twin, timer="time.perf_counter + synchronize per step",
                  rounds=case.steps, order="twin first in even rounds, grouped first in odd rounds", cuda_graphs=False)
    rows = Rows(run, case, grouped, "paired", config)
    rows.add("grouping_ratio", p50, "x", p20, p80,
             note=f"median over {case.steps} interleaved rounds of ({grouped} step ÷ {twin} step), both models "
                  f"built side by side, {case.warmup_steps} warm-up steps each")
    return rows.rows


def _pairs(case: ModelCase, rows: List[Dict]) -> List[Tuple[str, str]]:
    """The (grouped, twin) pairs of report.MODEL_GROUPED whose providers both ran this case (a time_ms row, ok)."""
    ran = {r["provider"] for r in rows if r["case"] == case.name and r["metric"] == "time_ms" and r["status"] == "ok"}
    return [(g, t) for g, t in report.MODEL_GROUPED if g in ran and t in ran]


def run_model_case(run: Run, case: ModelCase, builders: Optional[Dict[str, ModelBuilder]] = None) -> List[Dict]:
    """Every provider of ``case`` (same token ids, same base weights); ``ratio_to_floor`` to the case's floor (the
    frozen base) of this run."""
    builders = dict(BUILDERS, **(builders or {}))
    rows: List[Dict] = []
    try:
        ids = token_ids(case, run.dev.device, run.settings.seed)
    except Exception as e:  # noqa: BLE001
        for p, modes in case.plan:
            rows += _skip_rows(run, case, p, modes, "case setup failed: " + _reason(e))
        return rows
    for provider, modes in case.plan:
        label = f"{case.name} {provider}"
        if run.deadline is not None and time.monotonic() > run.deadline:
            rows += _skip_rows(run, case, provider, modes, "time budget reached before this provider")
            label += " skipped (budget)"
        elif provider not in builders:
            rows += _skip_rows(run, case, provider, modes, f"no model builder named {provider!r}")
            label += " skipped"
        else:
            try:
                rows += _measure(run, case, provider, builders[provider], ids)
            except Exception as e:  # noqa: BLE001 - OOM, missing package, ...: recorded, the others still run
                rows += _skip_rows(run, case, provider, modes, _reason(e))
                label += " skipped"
            finally:
                run.dev.free()
        if run.progress:
            run.progress.step(label, len(modes))
    for grouped, twin in _pairs(case, rows):
        if run.deadline is not None and time.monotonic() > run.deadline:
            rows += _skip_rows(run, case, grouped, ("paired",), "time budget reached before the paired steps")
            continue
        try:
            rows += _measure_pair(run, case, grouped, twin, builders, ids)
        except Exception as e:  # noqa: BLE001 - OOM with two models alive, ...: recorded, the rest stands
            rows += _skip_rows(run, case, grouped, ("paired",), _reason(e))
        finally:
            run.dev.free()
    del ids
    run.dev.free()
    return report.add_ratios(rows, case.floor)

