"""Model-level LoRA: ``apply_lora``, ``merge_and_unload`` and PEFT-format ``save_adapter``/``load_adapter``.

Matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists``): with a list of names, a
module whose full name (``model.named_modules()``) equals a name or ends with ``"." + name`` is a target; a
str is a regular expression that must ``re.fullmatch`` the full name; ``"all-linear"`` means every linear
layer except the output layer (``model.get_output_embeddings()``, or a module named ``lm_head``).

Adapter files are PEFT's (checked against peft 0.21.0): ``adapter_config.json`` (``peft_type: "LORA"``,
``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora``, ``bias: "none"``, ``rank_pattern``
/ ``alpha_pattern`` when ranks or alphas differ per module, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r): PEFT's keys with
the adapter name dropped, as ``PeftModel.save_pretrained`` writes them.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from numbers import Real
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modules import (LoRALayerBase, LoRALinear, QLoRALinear, _is_bnb_linear4bit, _is_bnb_module,
                      check_lora_hparams)
from .grouped import GroupSpec, ProjectionGroup, check_group_spec, group_projections, ungroup_projections
from .nf4 import FLOAT_DTYPES, VALID_BLOCKSIZES, check_quant_storage

__all__ = ["apply_lora", "merge_and_unload", "save_adapter", "load_adapter", "lora_layers"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"
QUANTIZE_CHOICES = (None, "nf4")

TargetModules = Union[str, Sequence[str]]


# ------------------------------------------------------------------------------------------------ matching

def lora_layers(model: nn.Module) -> Dict[str, LoRALayerBase]:
    """{full module name: layer} of every LoRALinear/QLoRALinear in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayerBase)}


def _kind(module: nn.Module) -> Optional[str]:
    """'lora' (already adapted), 'bnb4' (bitsandbytes Linear4bit), 'dense' (torch.nn.Linear), 'other-bnb'
    (a bitsandbytes layer we cannot adapt), or None for anything else."""
    if isinstance(module, LoRALayerBase):
        return "lora"
    if _is_bnb_linear4bit(module):
        return "bnb4"
    if _is_bnb_module(module) and isinstance(module, nn.Linear):
        return "other-bnb"
    if isinstance(module, nn.Linear):
        return "dense"
    return None


def _check_target_modules(target_modules) -> None:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({e})") from None
        return
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        if not target_modules:
            raise ValueError("target_modules is empty; name the layers to adapt, e.g. ['q_proj', 'v_proj']")
        bad = [t for t in target_modules if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"target_modules entries must be non-empty str module names, got {bad!r}")
        return
    raise TypeError(f"target_modules={target_modules!r} must be a list of module names or a regex str")


def _output_layer_names(model: nn.Module) -> set:
    names = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # some models raise NotImplementedError here
            out = None
        if out is not None:
            names |= {n for n, m in model.named_modules() if m is out}
    return names


def _name_matches(spec, name: str, output_names: set) -> bool:
    """PEFT's rule for one module name (``spec`` already validated)."""
    if isinstance(spec, str):
        if spec == "all-linear":
            return name not in output_names
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _is_excluded(exclude, name: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith("." + t) for t in exclude)


def _find_targets(model: nn.Module, target_modules, exclude_modules=None) -> List[Tuple[str, nn.Module, str]]:
    """[(name, module, kind)] of the modules that ``target_modules`` selects; raises ValueError for a selected
    module that cannot be adapted (PEFT does the same)."""
    if isinstance(target_modules, (set, frozenset)):
        target_modules = sorted(target_modules)
    output_names = _output_layer_names(model) if target_modules == "all-linear" else set()
    found, unsupported = [], []
    for name, module in model.named_modules():
        if not name or _is_excluded(exclude_modules, name) or isinstance(module, ProjectionGroup):
            continue  # a projection group holds no weights of its own: its members are the targets
        kind = _kind(module)
        if target_modules == "all-linear" and kind not in ("dense", "bnb4", "lora"):
            continue
        if not _name_matches(target_modules, name, output_names):
            continue
        if kind in ("dense", "bnb4", "lora"):
            found.append((name, module, kind))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(f"target_modules={target_modules!r} selects modules that are not linear layers: "
                         f"{', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}; LoRA here supports "
                         "torch.nn.Linear and bitsandbytes Linear4bit (name the linear layers, e.g. 'q_proj')")
    return found


def _warn_unmatched(model: nn.Module, target_modules, found_names: Iterable[str]) -> None:
    if isinstance(target_modules, str):
        return
    found_names = list(found_names)
    for t in target_modules:
        if not any(n == t or n.endswith("." + t) for n in found_names):
            warnings.warn(f"target_modules entry {t!r} matched no linear layer of {type(model).__name__}",
                          UserWarning, stacklevel=3)


def _no_match_error(model: nn.Module, target_modules) -> ValueError:
    linear = [n for n, m in model.named_modules() if n and _kind(m) in ("dense", "bnb4")]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    return ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; its linear "
                      f"layers are named {leaves[:20]}{' ...' if len(leaves) > 20 else ''}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_quantize(quantize, blocksize, double_quant) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE_CHOICES}; use None (dense base) or "
                         "'nf4' (QLoRA)")
    if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} must be one of {VALID_BLOCKSIZES}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant={double_quant!r} must be a bool")


def _check_quantizable(name: str, module: nn.Module) -> None:
    w = module.weight
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight has dtype {w.dtype}; NF4 quantization needs float32, float16 or bfloat16")
    if w.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device (no values to quantize); load the base model's "
                         "weights before apply_lora(..., quantize='nf4')")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}.weight contains NaN or Inf; NF4 cannot represent it (fix the weight first)")


def _wrap(module: nn.Module, kind: str, r: int, alpha, dropout, use_rslora, quantize, blocksize, double_quant,
          quant_storage):
    if kind == "bnb4":
        return QLoRALinear.from_bnb(module, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                    quant_storage=quant_storage)
    if quantize == "nf4":
        return QLoRALinear.from_linear(module, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                       blocksize=blocksize, double_quant=double_quant,
                                       quant_storage=quant_storage or torch.uint8)
    return LoRALinear.from_linear(module, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)


def _inject(model: nn.Module, plan: List[Tuple[str, nn.Module, str, int, float]], dropout: float, use_rslora: bool,
            quantize, blocksize: int, double_quant: bool, quant_storage=None) -> None:
    """Swap every planned module (already validated) and freeze all but the LoRA parameters."""
    for name, module, kind, r, alpha in plan:
        _replace(model, name, _wrap(module, kind, r, alpha, dropout, use_rslora, quantize, blocksize, double_quant,
                                    quant_storage))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


# ------------------------------------------------------------------------------------------------ apply_lora

def apply_lora(model: nn.Module, target_modules: TargetModules = ("q_proj", "v_proj"), r: int = 8,
               lora_alpha: float = 16, lora_dropout: float = 0.0, quantize: Optional[str] = None,
               use_rslora: bool = False, *, blocksize: int = 64, double_quant: bool = True,
               quant_storage: Optional[torch.dtype] = None, group_projections: GroupSpec = True) -> nn.Module:
    """Replace the targeted linear layers of ``model`` in place by LoRA layers; return ``model``.

    torch.nn.Linear -> ``LoRALinear`` (or ``QLoRALinear`` quantized on the fly with ``quantize="nf4"``, with
    ``blocksize`` and ``double_quant``); bitsandbytes Linear4bit (NF4) -> ``QLoRALinear.from_bnb`` (its bytes
    as they are). Every other parameter of ``model`` is frozen; only lora_A / lora_B train.

    ``quant_storage``: the dtype that holds the NF4 bytes (bitsandbytes' option; ``QLoRALinear``): None is uint8
    for layers quantized here and each Linear4bit's own for those; a float dtype (e.g. torch.bfloat16) lets a
    ``fully_shard`` that refuses integer Parameters (torch 2.11's) shard the 4-bit base.

    ``group_projections``: True (the default) groups sibling LoRA layers that read one input
    (``grouped.DEFAULT_GROUPS``: q/k/v and gate/up under one parent), a list of child-name groups names them, False
    makes none; each group then runs as one ``lora_linear`` call over one shared base buffer (``lora_ops.grouped``;
    module names and state_dict keys stay, the outputs and gradients are those of the members computed alone).
    Siblings that cannot be grouped compute alone (``lora_ops.grouped.explain_groups`` says why); a member called
    with another input than its siblings inside their parent's forward (cross-attention) turns its group off with
    a warning. With ``lora_dropout`` > 0 a group
    draws one dropout mask for its members, where separate layers draw one each.

    Raises ValueError when nothing matches (or a match is not a linear layer, or is already adapted) and warns
    naming each list entry that matched nothing. Everything is checked before the first module is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_lora_hparams(r, lora_alpha, lora_dropout, use_rslora)
    _check_quantize(quantize, blocksize, double_quant)
    if quant_storage is not None:
        check_quant_storage(quant_storage)
    _check_target_modules(target_modules)
    groups = check_group_spec(group_projections)
    found = _find_targets(model, target_modules)
    already = [n for n, _, kind in found if kind == "lora"]
    if already:
        raise ValueError(f"{', '.join(already[:8])} already carry a LoRA adapter; apply_lora adds one adapter per "
                         "layer (call merge_and_unload(model) first to start a new one)")
    bad = [f"{n} ({type(m).__name__})" for n, m, kind in found if kind == "other-bnb"]
    if bad:
        raise ValueError(f"cannot adapt {', '.join(bad)}: only bitsandbytes Linear4bit (NF4) is supported")
    _warn_unmatched(model, target_modules, [n for n, _, _ in found])
    if not found:
        raise _no_match_error(model, target_modules)
    if quantize == "nf4":
        for name, module, kind in found:
            if kind == "dense":
                _check_quantizable(name, module)
    elif quant_storage is not None and not any(kind == "bnb4" for _, _, kind in found):
        raise ValueError(f"quant_storage={quant_storage} applies to NF4 bases, and none of the matched layers has "
                         "one; pass quantize='nf4' to quantize them (or leave quant_storage out)")
    plan = [(n, m, kind, int(r), lora_alpha) for n, m, kind in found]
    _inject(model, plan, float(lora_dropout), use_rslora, quantize, blocksize, double_quant, quant_storage)
    if groups:
        _group_new(model, groups, [n for n, _, _ in found])
    return model


def _group_new(model: nn.Module, groups, new_names: List[str]) -> None:
    """Group the siblings among the layers just made (layers adapted earlier keep their grouping state)."""
    new = {id(m) for n, m in lora_layers(model).items() if n in set(new_names)}
    group_projections(model, groups, only=new)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding W + scaling * B @ A; return the model.

    NF4 bases are dequantized to their (compute) dtype first; the sum is formed in fp32 and rounded once to that
    dtype, so no re-quantization error is added. A LoRA layer passed as ``model`` itself is returned merged.
    """
    if isinstance(model, LoRALayerBase):
        return model.to_merged_linear()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ungroup_projections(model)  # the merged layers are plain nn.Linear; nothing is left to group
    for name, layer in list(lora_layers(model).items()):
        _replace(model, name, layer.to_merged_linear())
    return model


# ------------------------------------------------------------------------------------------------ PEFT files

def _pattern_value(pattern: Dict[str, object], name: str, default):
    """PEFT's ``get_pattern_key``: the first key k (in file order) with re.match(r"(.*\\.)?(k)$", name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _leaf_targets(names: List[str], model: nn.Module) -> Union[List[str], None]:
    """Sorted last name components, if they select exactly ``names`` among the model's linear layers."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, m in model.named_modules()
                if n and _kind(m) in ("dense", "bnb4", "lora") and _name_matches(leaves, n, set())}
    return leaves if selected == set(names) else None


def _base_model_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    for v in (getattr(model, "name_or_path", None), getattr(cfg, "_name_or_path", None),
              getattr(cfg, "name_or_path", None)):
        if isinstance(v, str) and v:
            return v
    return None


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format.

    ``peft.PeftModel.from_pretrained(base, directory)`` on an identically built base model loads them and
    computes the same function. Differing ranks or alphas are written as PEFT's ``rank_pattern`` /
    ``alpha_pattern``; dropout and rsLoRA must be the same for every layer (PEFT has no per-layer setting).
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save; call lora_ops.apply_lora first")
    dropouts = {layer.lora_dropout for layer in layers.values()}
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(f"PEFT's format holds one lora_dropout and one use_rslora per adapter; this model mixes "
                         f"lora_dropout={sorted(dropouts)} and use_rslora={sorted(rslora)}")
    names = list(layers)
    r_common = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    a_common = Counter(layer.lora_alpha for layer in layers.values()).most_common(1)[0][0]
    # Full, escaped names: PEFT matches pattern keys as regexes against the end of the module name.
    rank_pattern = {re.escape(n): l.r for n, l in layers.items() if l.r != r_common}
    alpha_pattern = {re.escape(n): l.lora_alpha for n, l in layers.items() if l.lora_alpha != a_common}
    targets = _leaf_targets(names, model) or sorted(names)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _base_model_name(model),
        "revision": None,
        "r": r_common,
        "lora_alpha": a_common,
        "lora_dropout": dropouts.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": targets,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "lora_bias": False,
    }
    try:
        from importlib.metadata import version
        config["peft_version"] = version("peft")
    except Exception:
        pass  # PEFT is not installed; the field is informational
    tensors = {}
    for name, layer in layers.items():
        tensors[KEY_PREFIX + name + _SUFFIX_A] = layer.lora_A.detach().to("cpu").contiguous()
        tensors[KEY_PREFIX + name + _SUFFIX_B] = layer.lora_B.detach().to("cpu").contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# Config fields that only describe provenance or initialisation (overridden by the saved tensors).
_INFO_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
                "lora_ga_config", "init_lora_weights", "r", "lora_alpha", "lora_dropout", "use_rslora",
                "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "bias", "layers_to_transform",
                "layers_pattern"}
# init_lora_weights values that leave the base weights alone (others, e.g. "pissa", "olora", "loftq", "corda",
# "eva", rewrite the base model at init, so their adapters only fit a modified base).
_PLAIN_INITS = (True, False, "gaussian")


def _falsy(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def _read_config(directory) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r} (only 'LORA' adapters load here)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (only 'none': bias terms are not part of this adapter format)")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} modifies the base weights; convert the adapter to plain LoRA "
                        "with PEFT (path_initial_model_for_weight_conversion) first")
    if not _falsy(cfg.get("layers_to_transform")) or not _falsy(cfg.get("layers_pattern")):
        problems.append("layers_to_transform/layers_pattern are not supported")
    for key, value in cfg.items():
        if key not in _INFO_FIELDS and not _falsy(value):
            problems.append(f"{key}={value!r} (unsupported PEFT option; only plain LoRA on linear layers loads)")
    r = cfg.get("r")
    try:
        check_lora_hparams(r, cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False))
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    for pname in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(pname) or {}
        if not isinstance(pat, dict):
            problems.append(f"{pname} must be a JSON object, got {pat!r}")
            continue
        for k, v in pat.items():
            ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) if pname == "rank_pattern" else \
                (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v))
            if not ok:
                problems.append(f"{pname}[{k!r}]={v!r} is not a valid {'rank' if pname == 'rank_pattern' else 'alpha'}")
    tm = cfg.get("target_modules")
    try:
        _check_target_modules(tm)
    except (TypeError, ValueError) as e:
        problems.append(f"target_modules: {e}")
    if problems:
        raise ValueError(f"{path} cannot be loaded: " + "; ".join(problems))
    return cfg


def _read_tensors(directory) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def _module_of_key(key: str) -> Tuple[Optional[str], Optional[str]]:
    if key.startswith(KEY_PREFIX):
        for suffix, which in ((_SUFFIX_A, "A"), (_SUFFIX_B, "B")):
            if key.endswith(suffix):
                return key[len(KEY_PREFIX):-len(suffix)], which
    return None, None


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], quantize: Optional[str] = None, *,
                 blocksize: int = 64, double_quant: bool = True, group_projections: GroupSpec = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model``; return ``model``.

    A model that already has LoRA layers (``apply_lora``) must match the adapter exactly: the same layers, ranks,
    alphas, dropout and rsLoRA; the tensors are copied (cast to the layers' dtype). A model without LoRA layers
    gets them from the adapter's config, like ``PeftModel.from_pretrained`` (``quantize="nf4"`` quantizes the
    dense targets as ``apply_lora`` does), and only the LoRA parameters are left trainable.

    ``group_projections`` (default True) groups the layers it makes as ``apply_lora`` does (a model that already
    has LoRA layers keeps its grouping as it is).

    Everything (config, keys, ranks, shapes, dtypes) is validated before anything changes: a mismatch raises
    ValueError listing the problems and leaves the model untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_quantize(quantize, blocksize, double_quant)
    groups = check_group_spec(group_projections)
    cfg = _read_config(directory)
    tensors = _read_tensors(directory)
    where = os.path.join(directory, WEIGHTS_NAME)
    problems: List[str] = []

    # Keys -> {module: {"A": tensor, "B": tensor}}
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    extra = []
    for key, t in tensors.items():
        name, which = _module_of_key(key)
        if name is None or not name:
            extra.append(key)
            continue
        by_module.setdefault(name, {})[which] = t
    if extra:
        problems.append(f"unexpected keys {extra[:6]}{' ...' if len(extra) > 6 else ''} (expected only "
                        f"{KEY_PREFIX}<module>{_SUFFIX_A} / {_SUFFIX_B})")
    for name, ab in by_module.items():
        for which, suffix in (("A", _SUFFIX_A), ("B", _SUFFIX_B)):
            if which not in ab:
                problems.append(f"missing key {KEY_PREFIX}{name}{suffix}")
            elif ab[which].dtype not in FLOAT_DTYPES:
                problems.append(f"{KEY_PREFIX}{name}{suffix} has dtype {ab[which].dtype}; expected float32, float16 "
                                "or bfloat16")
            elif ab[which].dim() != 2:
                problems.append(f"{KEY_PREFIX}{name}{suffix} has shape {tuple(ab[which].shape)}; expected 2-D")
            elif not bool(torch.isfinite(ab[which]).all()):
                problems.append(f"{KEY_PREFIX}{name}{suffix} contains NaN or Inf")

    existing = lora_layers(model)
    found = _find_targets(model, cfg["target_modules"], cfg.get("exclude_modules"))
    targeted = {n: (m, kind) for n, m, kind in found}
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    dropout = float(cfg.get("lora_dropout", 0.0))
    use_rslora = bool(cfg.get("use_rslora", False))

    # The modules the adapter is for, per its file and per its config, must agree with each other and the model.
    if existing:
        model_set = set(existing)
        what = "the model's LoRA layers"
    else:
        model_set = set(targeted)
        what = f"the model's layers matched by target_modules={cfg['target_modules']!r}"
        if not model_set:
            problems.append(f"target_modules={cfg['target_modules']!r} matches no linear layer of the model")
    file_set = set(by_module)
    missing = sorted(model_set - file_set)
    unexpected = sorted(file_set - model_set)
    if missing:
        problems.append(f"{where} lacks tensors for {len(missing)} of {what}: {missing[:6]}"
                        f"{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"{where} has tensors for {len(unexpected)} module(s) not among {what}: {unexpected[:6]}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    if existing and set(targeted) != model_set:
        problems.append(f"the config's target_modules={cfg['target_modules']!r} selects "
                        f"{sorted(set(targeted) ^ model_set)[:6]} differently from the model's LoRA layers")

    plan = []
    order = list(existing) if existing else list(targeted)
    for name in (n for n in order if n in file_set):
        r = _pattern_value(rank_pattern, name, cfg["r"])
        alpha = _pattern_value(alpha_pattern, name, cfg["lora_alpha"])
        if existing:
            layer = existing[name]
            in_f, out_f = layer.in_features, layer.out_features
            if layer.r != r:
                problems.append(f"{name}: the adapter's rank is {r}, the model's layer has r={layer.r}")
            if layer.lora_alpha != alpha:
                problems.append(f"{name}: the adapter's lora_alpha is {alpha}, the layer has {layer.lora_alpha}")
            if layer.lora_dropout != dropout:
                problems.append(f"{name}: the adapter's lora_dropout is {dropout}, the layer has {layer.lora_dropout}")
            if layer.use_rslora != use_rslora:
                problems.append(f"{name}: the adapter's use_rslora is {use_rslora}, the layer has {layer.use_rslora}")
            if layer.merged:
                problems.append(f"{name} is merged; call unmerge() before loading new adapter weights")
        else:
            module, kind = targeted[name]
            if kind == "other-bnb":
                problems.append(f"{name} is a {type(module).__name__}; only bitsandbytes Linear4bit is supported")
                continue
            in_f, out_f = module.in_features, module.out_features
            if quantize == "nf4" and kind == "dense":
                try:
                    _check_quantizable(name, module)
                except (TypeError, ValueError) as e:
                    problems.append(str(e))
            plan.append((name, module, kind, r, alpha))
        ab = by_module[name]
        if "A" in ab and tuple(ab["A"].shape) != (r, in_f):
            problems.append(f"{KEY_PREFIX}{name}{_SUFFIX_A} has shape {tuple(ab['A'].shape)}; expected (r={r}, "
                            f"in_features={in_f})")
        if "B" in ab and tuple(ab["B"].shape) != (out_f, r):
            problems.append(f"{KEY_PREFIX}{name}{_SUFFIX_B} has shape {tuple(ab['B'].shape)}; expected "
                            f"(out_features={out_f}, r={r})")
    if problems:
        shown = problems[:12]
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise ValueError(f"adapter {os.fspath(directory)!r} does not fit {type(model).__name__}; nothing was "
                         "changed: " + "; ".join(shown) + more)

    if not existing:
        _inject(model, plan, dropout, use_rslora, quantize, blocksize, double_quant)
        if groups:
            _group_new(model, groups, [p[0] for p in plan])
    layers = lora_layers(model)
    with torch.no_grad():
        for name, ab in by_module.items():
            layer = layers[name]
            layer.lora_A.copy_(ab["A"].to(device=layer.lora_A.device, dtype=layer.lora_A.dtype))
            layer.lora_B.copy_(ab["B"].to(device=layer.lora_B.device, dtype=layer.lora_B.dtype))
    return model
