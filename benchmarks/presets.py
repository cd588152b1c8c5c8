"""Benchmark presets: which cases (shapes, weight kinds) and which (provider, modes) each one times.

A case is one layer shape ``y (M, N) = x (M, K) @ W^T (N, K) + s * dropout(x) @ A^T (r, K) @ B^T (N, r)`` with a
dense or NF4 ``W``, or (``kind="dequant"``) one NF4 weight to dequantize, or (``BlockCase``, preset ``block``) the
seven projections of one Llama-3-8B layer at once, with and without grouped projections, or (``ModelCase``, preset
``model``) one training step of a whole Llama-3-8B-shaped decoder, with or without gradient checkpointing. Every
preset has a GPU version (Llama-8B-class training shapes, each preset sized to run in under ten minutes) and a CPU
quick version (same structure, small shapes, fp32) that runs the same code paths in seconds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

MODES = ("forward", "backward", "full", "decode", "dequant", "step", "host")
LAYER_MODES = ("forward", "backward", "full", "decode", "host")
DECODE_MAX_M = 16

# Every provider, with what it times (the --help text is built from this table).
PROVIDERS: Dict[str, str] = {
    "floor": "frozen dense W, no adapter (nn.Linear, weight.requires_grad=False); x requires grad (model preset: "
             "the bf16 model, every parameter frozen, no adapter; the input embeddings' output requires grad)",
    "floor_repeat": "the floor timed again at the end of the case: its ratio is the run-to-run noise",
    "full_ft": "trainable dense W (nn.Linear), no adapter",
    "unfused": "lora_ops.lora_linear forced to the PyTorch reference backend on the device",
    "peft": "peft LoRA on an nn.Linear (dense cases)",
    "peft_bnb": "bitsandbytes Linear4bit (nf4, double quant) + peft LoRA (NF4 cases)",
    "fused": "lora_ops.lora_linear with the default backend (dense W or lora_ops.NF4Weight)",
    "copy": "nf4 preset floor: a device copy moving as many bytes (read + write) as the dequantization must",
    "bnb": "nf4 preset: bitsandbytes.functional.dequantize_4bit",
    "fused_qlora": "model and block presets: lora_ops QLoRA (apply_lora(..., quantize='nf4', "
                   "group_projections=False), double quant)",
    "fused_grouped": "block and model presets: fused with apply_lora(..., group_projections=True) (apply_lora's "
                     "default): q/k/v and gate/up each one lora_linear call over one shared base buffer",
    "fused_qlora_grouped": "block and model presets: fused_qlora with group_projections=True",
    "floor_grouped": "block preset: the floor with q/k/v and gate/up each one frozen nn.Linear over the "
                     "concatenated weights (the base GEMMs a grouped call runs), outputs split",
}
FLOOR_PROVIDERS = ("floor", "copy")
# Other names of the model preset's providers; --providers accepts them.
PROVIDER_ALIASES: Dict[str, str] = {"lora_ops": "fused", "lora_ops_qlora": "fused_qlora", "full": "full_ft"}


class _Planned:
    """What Case and ModelCase share: the adapter's lora_alpha (2 r) and scaling from the field ``r``, and lookups
    in ``plan``, ((provider, (mode, ...)), ...)."""

    @property
    def lora_alpha(self) -> int:
        return 2 * self.r

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def providers(self) -> List[str]:
        return [p for p, _ in self.plan]

    def modes_of(self, provider: str) -> Tuple[str, ...]:
        for p, modes in self.plan:
            if p == provider:
                return modes
        return ()


@dataclass(frozen=True)
class Case(_Planned):
    """One benchmark case. ``plan`` is ((provider, (mode, ...)), ...) in run order; the floor comes first.

    ``n_sets`` is how many independent weight sets (W, A, B) the timed callable rotates through; 0 means
    "enough that their bytes exceed twice the L2 cache, at least 3" (decode: one weight would sit in L2).
    """

    preset: str
    name: str
    kind: str  # "layer" | "dequant"
    M: int
    K: int
    N: int
    r: int = 16
    weight: str = "dense"  # "dense" | "nf4"
    dropout: float = 0.0
    dtype: str = "bfloat16"
    n_sets: int = 1
    floor: str = "floor"
    plan: Tuple[Tuple[str, Tuple[str, ...]], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.kind not in ("layer", "dequant"):
            raise ValueError(f"Case.kind={self.kind!r} must be 'layer' or 'dequant'")
        if self.weight not in ("dense", "nf4"):
            raise ValueError(f"Case.weight={self.weight!r} must be 'dense' or 'nf4'")
        if min(self.M, self.K, self.N, self.r) < 1:
            raise ValueError(f"case {self.name!r}: M, K, N and r must be >= 1, got {self.M, self.K, self.N, self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"case {self.name!r}: dropout={self.dropout} must be in [0, 1)")
        for provider, modes in self.plan:
            if provider not in PROVIDERS:
                raise ValueError(f"case {self.name!r}: unknown provider {provider!r}; known: {sorted(PROVIDERS)}")
            for mode in modes:
                if mode not in MODES:
                    raise ValueError(f"case {self.name!r}: unknown mode {mode!r}; known: {MODES}")
                if mode == "decode" and self.M > DECODE_MAX_M:
                    raise ValueError(f"case {self.name!r}: decode needs M <= {DECODE_MAX_M}, got M={self.M}")

    @property
    def shape(self) -> str:
        return f"M={self.M},K={self.K},N={self.N},r={self.r}"

    def primary_mode(self) -> str:
        """The mode the summary and the ratio plots show for this case."""
        modes = self.modes_of(self.floor)
        for m in ("full", "decode", "dequant", "host"):
            if m in modes:
                return m
        return modes[0] if modes else "full"

    def config(self) -> Dict:
        d = asdict(self)
        d.pop("plan")
        d.update(lora_alpha=self.lora_alpha, scaling=self.scaling)
        return d

    def config_json(self, **extra) -> str:
        d = self.config()
        d.update(extra)
        return json.dumps(d, sort_keys=True)

    def filtered(self, providers: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None
                 ) -> Optional["Case"]:
        """This case restricted to ``providers`` and ``modes``; the floor (and its re-timing) always stays, in
        the modes the kept providers use, so every ratio has its floor from the same run. None when nothing but
        the floor would remain."""
        keep_p = set(providers) if providers else None
        keep_m = set(modes) if modes else None
        plan = []
        for p, ms in self.plan:
            if p in (self.floor, "floor_repeat"):
                plan.append((p, ms))
                continue
            if keep_p is not None and p not in keep_p:
                continue
            ms = tuple(m for m in ms if keep_m is None or m in keep_m)
            if ms:
                plan.append((p, ms))
        used = {m for p, ms in plan if p not in (self.floor, "floor_repeat") for m in ms}
        if not used:
            return None
        plan = [(p, tuple(m for m in ms if m in used)) if p in (self.floor, "floor_repeat") else (p, ms)
                for p, ms in plan]
        plan = [(p, ms) for p, ms in plan if ms]
        return replace(self, plan=tuple(plan))


def _name(M, K, N, r, weight, dropout, with_r=True) -> str:
    s = f"{M}x{K}->{N}"
    if with_r:
        s += f" r{r}"
    s += f" {weight}"
    if dropout:
        s += f" drop{dropout:g}"
    return s


def layer_case(preset: str, M: int, K: int, N: int, r: int, weight: str, dropout: float = 0.0,
               extra_modes: Sequence[str] = (), dtype: str = "bfloat16") -> Case:
    """A fwd+bwd case: floor, then the LoRA providers of this weight kind, then the floor again (noise).

    ``extra_modes`` (e.g. forward, backward) are timed for the fused provider and, for its ratios, the floor.
    """
    lora = ["unfused", "peft", "fused"] if weight == "dense" else ["unfused", "peft_bnb", "fused"]
    if weight == "dense" and not dropout:
        lora.insert(0, "full_ft")  # full fine-tuning has no dropout to compare
    floor_modes = ("full",) + tuple(extra_modes)
    plan = [("floor", floor_modes)]
    plan += [(p, floor_modes if p == "fused" else ("full",)) for p in lora]
    plan.append(("floor_repeat", ("full",)))
    return Case(preset, _name(M, K, N, r, weight, dropout), "layer", M, K, N, r, weight, dropout, dtype,
                plan=tuple(plan))


def decode_case(preset: str, M: int, K: int, N: int, r: int, weight: str, dtype: str = "bfloat16",
                n_sets: int = 0) -> Case:
    lora = ["unfused", "peft", "fused"] if weight == "dense" else ["unfused", "peft_bnb", "fused"]
    plan = [("floor", ("decode",))] + [(p, ("decode",)) for p in lora] + [("floor_repeat", ("decode",))]
    return Case(preset, _name(M, K, N, r, weight, 0.0), "layer", M, K, N, r, weight, 0.0, dtype, n_sets,
                plan=tuple(plan))


def dequant_case(preset: str, N: int, K: int, dtype: str = "bfloat16") -> Case:
    """Dequantize an (N, K) NF4 weight (blocksize 64, double quant) to ``dtype``; the floor is a copy."""
    plan = (("copy", ("dequant",)), ("bnb", ("dequant",)), ("unfused", ("dequant",)), ("fused", ("dequant",)))
    return Case(preset, f"dequant {N}x{K} nf4->{dtype}", "dequant", 1, K, N, 1, "nf4", 0.0, dtype,
                floor="copy", plan=plan)


# ------------------------------------------------------------------------------------------------- presets

def _layer(cpu: bool) -> List[Case]:
    if cpu:
        big, shapes, dt = 512, [(256, 256), (256, 896), (896, 256)], "float32"
        small = 128
    else:
        big, shapes, dt = 8192, [(4096, 4096), (4096, 14336), (14336, 4096)], "bfloat16"
        small = 2048
    k0, n0 = shapes[0]
    kd, nd = shapes[1]
    rows = [(big, k, n, 0.0) for k, n in shapes] + [(small, k0, n0, 0.0), (big, kd, nd, 0.05)]
    return [layer_case("layer", M, k, n, 16, weight, p, ("forward", "backward"), dt)
            for M, k, n, p in rows for weight in ("dense", "nf4")]


def _rank(cpu: bool) -> List[Case]:
    M, K, N, dt = (512, 256, 256, "float32") if cpu else (8192, 4096, 4096, "bfloat16")
    return [layer_case("rank", M, K, N, r, w, 0.0, (), dt) for w in ("dense", "nf4") for r in (8, 16, 32, 64, 128)]


def _tokens(cpu: bool) -> List[Case]:
    if cpu:
        Ms, K, N, dt = (64, 128, 256, 512, 1024), 256, 256, "float32"
    else:
        Ms, K, N, dt = (256, 512, 1024, 2048, 4096, 8192, 16384), 4096, 4096, "bfloat16"
    return [layer_case("tokens", M, K, N, 16, w, 0.0, (), dt) for w in ("dense", "nf4") for M in Ms]


def _decode(cpu: bool) -> List[Case]:
    K, N, dt, n_sets = (256, 896, "float32", 3) if cpu else (4096, 14336, "bfloat16", 0)
    return [decode_case("decode", M, K, N, 16, w, dt, n_sets) for w in ("dense", "nf4") for M in (1, 2, 4, 8, 16)]


# The host preset's shape: GPU work of a few microseconds per fwd+bwd, so the wall time per call is host time.
HOST_SHAPE = (64, 1024, 1024)


def _host(cpu: bool) -> List[Case]:
    M, K, N = HOST_SHAPE
    dt = "float32" if cpu else "bfloat16"
    out = []
    for w in ("dense", "nf4"):
        peer = "peft" if w == "dense" else "peft_bnb"
        plan = (("floor", ("host",)), (peer, ("host",)), ("fused", ("host",)), ("floor_repeat", ("host",)))
        out.append(Case("host", _name(M, K, N, 16, w, 0.0), "layer", M, K, N, 16, w, 0.0, dt, plan=plan))
    return out


def _nf4(cpu: bool) -> List[Case]:
    N, K, dt = (896, 256, "float32") if cpu else (14336, 4096, "bfloat16")
    return [dequant_case("nf4", N, K, dt)]


# ----------------------------------------------------------------------------------------- model preset

MODEL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The model preset's providers, in run order: the frozen-base floor and peft_bnb (the two references of every
# ratio) first, each grouped provider (group_projections=True) right after its ungrouped twin, full fine-tuning
# (the one most likely to run out of memory) last.
MODEL_PROVIDERS = ("floor", "peft_bnb", "fused_qlora", "fused_qlora_grouped", "peft", "fused", "fused_grouped",
                   "full_ft")
MODEL_FLOOR = "floor"  # ratio_to_floor of model rows: step time and peak memory ÷ this provider's, same run
MODEL_REFERENCE = "peft_bnb"  # the report's "× peft_bnb" columns: tokens/s and peak memory ÷ this provider's
# Decoder shapes: Llama-3-8B's layers (random init, never downloaded) with a 32000-token vocabulary by default
# (--vocab 128256 gives Llama-3's own), and the CPU quick mode's tiny one: 4 query heads per KV head as in
# Llama-3-8B, and every weight row a whole number of 64-element NF4 blocks as there (bitsandbytes' CPU
# dequantize is wrong when blocks straddle rows, see docs/DESIGN.md; 4x, not 3.5x, hidden).
ARCHS: Dict[str, Dict[str, int]] = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000),
    "tiny": dict(hidden=64, intermediate=256, heads=4, kv_heads=1, vocab=128),
}
MODEL_DEFAULTS = {  # (cpu quick mode, GPU)
    True: dict(layers=2, seq=16, steps=3, warmup_steps=1),
    False: dict(layers=16, seq=2048, steps=10, warmup_steps=3),
}
# The (batch, gradient checkpointing) of the preset's cases, in run order: single-GPU QLoRA runs at a small and a
# larger batch with checkpointing (how they fit in memory), and the small batch without it.
MODEL_RUNS = {True: ((1, True), (2, True), (1, False)), False: ((1, True), (4, True), (1, False))}
MODEL_OPTIONS = ("layers", "seq", "batch", "steps", "warmup_steps", "vocab", "checkpointing")
MODEL_MINIMUM = dict(layers=1, seq=2, batch=1, steps=1, warmup_steps=1, vocab=2)


def _check_arch_case(case, kind: str) -> None:
    """The checks ModelCase and BlockCase share: their kind, a known arch, a float dtype."""
    if case.kind != kind:
        raise ValueError(f"{type(case).__name__}.kind={case.kind!r} must be {kind!r}")
    if case.arch not in ARCHS:
        raise ValueError(f"case {case.name!r}: unknown arch {case.arch!r}; known: {sorted(ARCHS)}")
    if case.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"case {case.name!r}: dtype={case.dtype!r} must be float32, float16 or bfloat16")


@dataclass(frozen=True)
class ModelCase(_Planned):
    """One model-level case: per provider, build the decoder (``layers`` blocks of ``arch``, a ``vocab``-token
    vocabulary, 0 = the arch's), then time ``steps`` training steps (forward with causal-LM loss on random token
    ids (batch, seq), backward, AdamW step on the trainable parameters) after ``warmup_steps`` untimed ones, with
    transformers' gradient checkpointing on every decoder layer when ``checkpointing``. ``floor`` names the
    provider ``ratio_to_floor`` is taken against (the frozen base); ``reference`` the second reference the report
    shows ratios to (PEFT + bitsandbytes)."""

    preset: str
    name: str
    arch: str
    layers: int
    seq: int
    batch: int
    r: int = 16
    dtype: str = "bfloat16"
    steps: int = 10
    warmup_steps: int = 3
    lr: float = 1e-5
    checkpointing: bool = False
    vocab: int = 0
    kind: str = "model"
    floor: str = MODEL_FLOOR
    reference: str = MODEL_REFERENCE
    plan: Tuple[Tuple[str, Tuple[str, ...]], ...] = field(default_factory=tuple)

    def __post_init__(self):
        _check_arch_case(self, "model")
        for key, low in MODEL_MINIMUM.items():
            v = getattr(self, key)
            if key == "vocab" and v == 0:
                continue  # the arch's own vocabulary
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"case {self.name!r}: {key}={v!r} must be an int >= {low}"
                                 + (" (or 0 for the arch's own)" if key == "vocab" else ""))
        if self.r < 1:
            raise ValueError(f"case {self.name!r}: r={self.r} must be >= 1")
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"case {self.name!r}: checkpointing={self.checkpointing!r} must be True or False")
        for ref in (self.floor, self.reference):
            if ref not in MODEL_PROVIDERS:
                raise ValueError(f"case {self.name!r}: reference provider {ref!r} is not a model provider; choose "
                                 f"from {', '.join(MODEL_PROVIDERS)}")
        for provider, modes in self.plan:
            if provider not in MODEL_PROVIDERS:
                raise ValueError(f"case {self.name!r}: provider {provider!r} does not run the model preset; "
                                 f"choose from {', '.join(MODEL_PROVIDERS)}")
            if tuple(modes) != ("step",):
                raise ValueError(f"case {self.name!r}: the model preset times the mode 'step' only, got {modes}")

    @property
    def dims(self) -> Dict[str, int]:
        return dict(ARCHS[self.arch], **({"vocab": self.vocab} if self.vocab else {}))

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def shape(self) -> str:
        d = self.dims
        return (f"layers={self.layers},hidden={d['hidden']},intermediate={d['intermediate']},heads={d['heads']}/"
                f"{d['kv_heads']},vocab={d['vocab']},seq={self.seq},batch={self.batch},r={self.r},"
                f"checkpointing={'on' if self.checkpointing else 'off'}")

    def primary_mode(self) -> str:
        return "step"

    def config(self) -> Dict:
        d = asdict(self)
        d.pop("plan")
        d.update(self.dims, tokens=self.tokens, lora_alpha=self.lora_alpha, scaling=self.scaling,
                 targets=list(MODEL_TARGETS), lora_dropout=0.0)
        return d

    def filtered(self, providers: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None
                 ) -> Optional["ModelCase"]:
        """Like ``Case.filtered``: the floor and the reference (peft_bnb) always stay, so every ratio has both
        from the same run; None when none of ``providers`` runs in this case."""
        if modes and "step" not in modes:
            return None
        keep = set(providers) if providers else None
        always = (self.floor, self.reference)
        plan = tuple((p, ms) for p, ms in self.plan if p in always or keep is None or p in keep)
        if keep is not None and not any(p in keep for p, _ in plan):
            return None
        return replace(self, plan=plan)


def model_case(preset: str, arch: str, dtype: str, layers: int, seq: int, batch: int, steps: int,
               warmup_steps: int, r: int = 16, checkpointing: bool = False, vocab: int = 0) -> ModelCase:
    """A case of every model provider. Its name says the depth, batch x seq, whether gradient checkpointing is
    on ("ckpt" / "no-ckpt") and, when it is not the arch's own, the vocabulary: rows of different settings never
    replace each other in a merged CSV."""
    label = "llama3-8b-shape" if arch == "llama3-8b" else arch
    name = f"{label} L{layers} {batch}x{seq} {'ckpt' if checkpointing else 'no-ckpt'}"
    if vocab and vocab != ARCHS.get(arch, {}).get("vocab"):
        name += f" vocab{vocab}"
    plan = tuple((p, ("step",)) for p in MODEL_PROVIDERS)
    return ModelCase(preset, name, arch, layers, seq, batch, r, dtype, steps, warmup_steps,
                     checkpointing=checkpointing, vocab=vocab, plan=plan)


def model_runs(cpu: bool, batch: Optional[int] = None, checkpointing: Optional[bool] = None
               ) -> List[Tuple[int, bool]]:
    """The (batch, checkpointing) pairs of the preset: ``MODEL_RUNS`` restricted to ``checkpointing`` when given,
    with every batch replaced by ``batch`` when given (duplicates dropped): ``--batch 4`` runs 4 x seq with and
    without checkpointing, ``--checkpointing off`` the small batch without it."""
    runs = [(b, c) for b, c in MODEL_RUNS[bool(cpu)] if checkpointing is None or c == checkpointing]
    if not runs:  # a checkpointing setting the defaults lack: the small batch with it
        runs = [(MODEL_RUNS[bool(cpu)][0][0], bool(checkpointing))]
    if batch is not None:
        runs = [(batch, c) for _, c in runs]
    return list(dict.fromkeys(runs))


def _model(cpu: bool, **options) -> List[ModelCase]:
    opts = dict(MODEL_DEFAULTS[bool(cpu)])  # Preset.cases has refused options other than MODEL_OPTIONS
    opts.update({k: v for k, v in options.items() if v is not None})
    batch, ckpt, vocab = opts.pop("batch", None), opts.pop("checkpointing", None), opts.pop("vocab", 0)
    arch, dtype = ("tiny", "float32") if cpu else ("llama3-8b", "bfloat16")
    return [model_case("model", arch, dtype, checkpointing=c, vocab=vocab, batch=b, **opts)
            for b, c in model_runs(cpu, batch, ckpt)]


# ----------------------------------------------------------------------------------------- block preset

# The block preset's providers, in run order: the floor first (every ratio's reference), the floor again last
# (its ratio is the run-to-run noise), each grouped provider right after its ungrouped twin.
BLOCK_PROVIDERS = ("floor", "floor_grouped", "peft", "fused", "fused_grouped", "peft_bnb", "fused_qlora",
                   "fused_qlora_grouped", "floor_repeat")
BLOCK_MODES = ("full", "forward", "backward")
# The block's shapes are the model preset's ARCHS (Llama-3-8B on the GPU, the tiny decoder with --cpu).
# The block's inputs (name, width key of ARCHS): q/k/v read x_attn, o reads x_o, gate/up read x_mlp, down reads
# x_down. No attention or activation math runs between them: each projection gets an input of its own width.
BLOCK_INPUTS = (("x_attn", "hidden"), ("x_o", "hidden"), ("x_mlp", "hidden"), ("x_down", "intermediate"))
# (projection, parent module, input, in width key, out width key); "kv" is kv_heads * head_dim.
BLOCK_PROJECTIONS = (("q_proj", "self_attn", "x_attn", "hidden", "hidden"),
                     ("k_proj", "self_attn", "x_attn", "hidden", "kv"),
                     ("v_proj", "self_attn", "x_attn", "hidden", "kv"),
                     ("o_proj", "self_attn", "x_o", "hidden", "hidden"),
                     ("gate_proj", "mlp", "x_mlp", "hidden", "intermediate"),
                     ("up_proj", "mlp", "x_mlp", "hidden", "intermediate"),
                     ("down_proj", "mlp", "x_down", "intermediate", "hidden"))
BLOCK_TOKENS = {True: (64, 256), False: (2048, 8192)}  # (cpu quick mode, GPU)
# What a block case times: the whole block, or one group alone (issue 21's per-group targets are ratios to the
# group's concatenated GEMM: those cases take floor_grouped as their floor).
BLOCK_PARTS = {"block": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               "qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class BlockCase(_Planned):
    """One block case: the seven LoRA projections of one decoder layer of ``arch`` (q, k, v, o, gate, up, down;
    the ``ARCHS`` widths), forward + backward of those linear layers only, on ``M`` tokens. Every provider builds
    the same seven frozen weights and adapters from the case's tensors; the LoRA providers' adapters are dense
    (``fused``, ``peft``) or NF4 (``fused_qlora``, ``peft_bnb``) bases, grouped or not; ``floor`` is the seven
    frozen linears without adapters (input gradients flowing), the reference of every ratio. ``part`` "qkv" or
    "gate_up": that group's projections alone (``BLOCK_PARTS``), their ratios to ``floor_grouped``."""

    preset: str
    name: str
    arch: str
    M: int
    r: int = 16
    dtype: str = "bfloat16"
    n_sets: int = 1
    kind: str = "block"
    floor: str = "floor"
    plan: Tuple[Tuple[str, Tuple[str, ...]], ...] = field(default_factory=tuple)
    part: str = "block"

    def __post_init__(self):
        _check_arch_case(self, "block")
        if self.part not in BLOCK_PARTS:
            raise ValueError(f"case {self.name!r}: part={self.part!r}; choose from {', '.join(BLOCK_PARTS)}")
        if self.floor not in ("floor", "floor_grouped"):
            raise ValueError(f"case {self.name!r}: floor={self.floor!r}; a block case's floor is floor or "
                             "floor_grouped")
        if min(self.M, self.r) < 1 or self.n_sets != 1:
            raise ValueError(f"case {self.name!r}: M and r must be >= 1 and n_sets 1, got "
                             f"{self.M, self.r, self.n_sets}")
        for provider, modes in self.plan:
            if provider not in BLOCK_PROVIDERS:
                raise ValueError(f"case {self.name!r}: provider {provider!r} does not run the block preset; choose "
                                 f"from {', '.join(BLOCK_PROVIDERS)}")
            bad = [m for m in modes if m not in BLOCK_MODES]
            if bad:
                raise ValueError(f"case {self.name!r}: the block preset times {', '.join(BLOCK_MODES)}, got {bad}")

    @property
    def dims(self) -> Dict[str, int]:
        d = dict(ARCHS[self.arch])
        d["kv"] = d["kv_heads"] * (d["hidden"] // d["heads"])
        return d

    def projections(self) -> List[Tuple[str, str, str, int, int]]:
        """(name, parent, input, K, N) of the case's projections (``part``), in the order of its outputs."""
        d = self.dims
        return [(n, parent, x, d[k], d[o]) for n, parent, x, k, o in BLOCK_PROJECTIONS
                if n in BLOCK_PARTS[self.part]]

    def inputs(self) -> List[Tuple[str, int]]:
        """(name, width) of the inputs the case's projections read, in ``BLOCK_INPUTS`` order."""
        d, used = self.dims, {x for _, _, x, _, _ in self.projections()}
        return [(x, d[k]) for x, k in BLOCK_INPUTS if x in used]

    @property
    def shape(self) -> str:
        d = self.dims
        names = ",".join(n[:-len("_proj")] for n, *_ in self.projections())
        return (f"M={self.M},hidden={d['hidden']},kv={d['kv']},intermediate={d['intermediate']},r={self.r},"
                f"projections={names}")

    def primary_mode(self) -> str:
        return "full"

    def config(self) -> Dict:
        d = asdict(self)
        d.pop("plan")
        d.update(self.dims, lora_alpha=self.lora_alpha, scaling=self.scaling, lora_dropout=0.0,
                 projections={n: [k, o] for n, _, _, k, o in self.projections()})
        return d

    # The same rule as a layer case's: the floor and its re-timing always stay.
    filtered = Case.filtered


def block_case(preset: str, arch: str, M: int, dtype: str, r: int = 16, part: str = "block") -> BlockCase:
    """A block case (``part`` "block"), or one group alone ("qkv", "gate_up") whose floor, run first, is the
    group's concatenated GEMM (``floor_grouped``) and whose ``floor_repeat`` times that floor again."""
    label = "llama3-8b-shape" if arch == "llama3-8b" else arch
    floor = "floor" if part == "block" else "floor_grouped"
    order = [floor] + [p for p in BLOCK_PROVIDERS if p != floor]
    plan = tuple((p, ("full",)) for p in order)
    return BlockCase(preset, f"{label} {part} M={M} r{r}", arch, M, r, dtype, floor=floor, plan=plan, part=part)


def _block(cpu: bool) -> List[BlockCase]:
    arch, dtype = ("tiny", "float32") if cpu else ("llama3-8b", "bfloat16")
    tokens = BLOCK_TOKENS[bool(cpu)]
    return ([block_case("block", arch, M, dtype) for M in tokens]
            + [block_case("block", arch, M, dtype, part=part) for part in ("qkv", "gate_up") for M in tokens])


# ------------------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    h200_estimate: str
    build: object  # (cpu: bool, **options) -> List[Case]
    options: Tuple[str, ...] = ()  # keyword options of build (the model preset's --layers, --seq, ...)

    def cases(self, cpu: bool, **options) -> List:
        given = {k: v for k, v in options.items() if v is not None}
        bad = sorted(set(given) - set(self.options))
        if bad:
            raise ValueError(f"preset {self.name!r} takes no option(s) {bad}"
                             + (f"; it takes {', '.join(self.options)}" if self.options else ""))
        return self.build(cpu, **given)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("layer", "fwd+bwd at M=8192 (4096->4096, 4096->14336, 14336->4096), M=2048 4096->4096 and "
           "4096->14336 with dropout 0.05; dense LoRA and NF4 QLoRA; r=16; fused also forward/backward",
           "about 3-5 min", _layer),
    Preset("rank", "fwd+bwd for r in 8,16,32,64,128 at 8192x4096->4096, dense and NF4", "about 2-3 min", _rank),
    Preset("tokens", "fwd+bwd for M in 256..16384 at 4096->4096, dense and NF4 (plots time and memory vs M)",
           "about 2-4 min", _tokens),
    Preset("decode", "no-grad forward, M in 1,2,4,8,16 at 4096->14336, r=16, weights rotated past L2; "
           "floor (bf16, no LoRA), unfused, peft / peft_bnb, fused dense and NF4", "about 1-2 min", _decode),
    Preset("host", "host cost per eager fwd+bwd at M=64, 1024->1024 (GPU work of a few us): wall time per call "
           "of loops of 200 calls with one synchronize each, median of 7 loops; floor, fused and peft / peft_bnb, "
           "dense and NF4 (metric host_us)", "under 1 min", _host),
    Preset("nf4", "dequantize a 14336x4096 NF4 weight to bf16: lora_ops (fused, unfused) vs bitsandbytes vs a "
           "copy of as many bytes", "under 1 min", _nf4),
    Preset("block", "the seven projections of one Llama-3-8B layer (q 4096->4096, k and v 4096->1024, o "
           "4096->4096, gate and up 4096->14336, down 14336->4096), fwd+bwd of those linear layers only (q/k/v "
           "read one input, gate/up another, o and down their own), M=2048 and 8192, r=16: floor (frozen, no "
           "adapters), floor_grouped, peft, fused, fused_grouped, peft_bnb, fused_qlora, fused_qlora_grouped "
           "(grouped = apply_lora(..., group_projections=True)); then q/k/v alone and gate/up alone at both M, "
           "their ratios to the group's concatenated GEMM (floor_grouped)",
           "a guess, not measured: about 3-6 min, mostly first-call Triton autotuning (6 weight shapes, dense "
           "and NF4, at two M); --budget-s 420", _block),
    Preset("model", "training steps (fwd + causal-LM loss + bwd + AdamW on the adapters) of a Llama-3-8B-shaped "
           "decoder (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000 or --vocab), random init in bf16, "
           "--layers deep (default 16), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down: 1x2048 and 4x2048 tokens with "
           "gradient checkpointing, 1x2048 without (--batch, --checkpointing on|off pick among them); 3 warm-up + "
           "10 timed steps per provider; floor (frozen base), peft_bnb, fused_qlora, fused_qlora_grouped, peft, fused, "
           "fused_grouped, full_ft (skipped when it does not fit; *_grouped = group_projections=True, skipped when "
           "the groups do not form); tokens/s, step ms, peak memory, ratios to the floor and to peft_bnb; then each "
           "*_grouped against its twin in interleaved steps, both models alive (grouping_ratio)",
           "a guess, not measured: about 5-8 min for the three cases at 16 layers, first-call Triton autotuning "
           "and the interleaved pairs included; run it alone in a 10-minute command with --budget-s 420", _model,
           MODEL_OPTIONS),
)}


def select_cases(presets: Sequence[str], cpu: bool, providers: Optional[Sequence[str]] = None,
                 modes: Optional[Sequence[str]] = None, model_options: Optional[Dict] = None) -> List:
    """The cases of ``presets`` restricted to ``providers``/``modes``. ``model_options`` (layers, seq, batch,
    steps, warmup_steps, vocab, checkpointing; None = the default) go to the model preset and are refused when it
    is not selected."""
    given = {k: v for k, v in (model_options or {}).items() if v is not None}
    if given and "model" not in presets:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(given))} only apply to the model "
                         f"preset; add --preset model (selected: {', '.join(presets)})")
    out = []
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)} or 'all'")
        opts = {k: v for k, v in given.items() if k in PRESETS[name].options}
        for case in PRESETS[name].cases(cpu, **opts):
            c = case.filtered(providers, modes)
            if c is not None:
                out.append(c)
    return out
