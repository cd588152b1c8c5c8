"""Grouped projections: sibling LoRA layers that read the same input run as ONE ``lora_linear`` call.

In a transformer block q/k/v read the same hidden states, and so do the MLP's gate and up projections. A
``ProjectionGroup`` makes such siblings one call of the single-layer op::

    y_cat = lora_linear(x, W_cat, A_cat, B_bd, scaling, bias_cat, dropout_p)     y_i = y_cat[..., n_i]

* ``W_cat`` (sum N_i, K): the members' frozen bases stacked along out_features in ONE buffer; every member's
  ``weight`` Parameter becomes a view into it (the base is stored once; names and state_dict keys stay).
  NF4 bases: the packed bytes (and a plain fp32 absmax) are concatenated the same way. A double-quantized
  absmax has one offset per member: with ``LORA_OPS_GROUP_ABSMAX=codes`` the members' uint8 codes and nested
  absmax are concatenated too (views, as the bytes) and the group keeps their offsets as one fp32 per nested
  block (the kernels' NESTED_OFFSETS; 4 bytes per 16384 weights); by default it keeps the members' absmax
  decoded to fp32 (exactly the values the kernels decode: ``nf4.reference_absmax``), nblocks * 4 bytes.
* ``A_cat`` (sum r_i, K): the members' lora_A stacked; ``B_bd`` (sum N_i, sum r_i): block diagonal with member
  i's block s_i * B_i (or B_i with ``scaling`` = s when every member has the same scaling), built from the
  members' Parameters in every call, so autograd hands each member's lora_A / lora_B its own gradient. The
  members' lora_A (and lora_B) are row views of one buffer each, so the C++ group reads A_cat (and, with equal
  ranks, B_rows = cat(B_i)) as a view instead of copying them per call.
* In eager mode on CUDA the group is one C++ autograd Function (csrc/lora_launch.cpp ``GroupFunction``), whose
  forward and backward each run either on the stacked call above (one base GEMM over the concatenated N, the
  outputs as views; q/k/v) or per member, each member's single-layer launches on its rows of the base (the
  outputs contiguous; gate/up), docs/GROUPED.md says when; elsewhere (CPU, torch.compile, the reference backend)
  the ``lora_linear`` call above.

Installation does not touch the model's forward code: each member's ``forward`` asks its group, and the first
member called with an input computes every member's output for it and keeps the siblings' outputs until they
are asked for (keyed on the input tensor's identity and version, grad mode, autocast and training mode). A
member called, inside the parent's forward, with another input than the one its pending output was computed for
(cross-attention, custom code) gets its own, ungrouped output, and the group stops grouping (``disabled_reason``
says why); outside the parent's forward (a member called on its own) another input is simply computed afresh.
The group is an ``nn.Module`` child of the parent with no parameters or buffers (state_dict unchanged); its
forward hooks on the parent drop pending outputs when the parent's forward starts and ends (and tell the group
whether it is inside that forward), and its ``_apply`` re-packs the
shared buffer after ``.to()`` / ``.cuda()`` / ``.half()`` gave each member's weight its own storage.

Dropout: one mask for the whole group (one S pass over x): every member's LoRA branch still sees dropout p,
but the members' masks are the same, where separate layers draw independent masks.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _launch
from . import decode as _decode
from .functional import lora_linear
from .modules import LoRALayerBase, LoRALinear, QLoRALinear, _autocast_on_type
from .nf4 import FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4Weight, reference_absmax

__all__ = ["DEFAULT_GROUPS", "ProjectionGroup", "group_projections", "ungroup_projections", "projection_groups",
           "explain_groups", "check_group_spec"]

log = logging.getLogger(__name__)

# Sibling names that read the same input in Llama/Mistral/Qwen-style blocks (attention and gated MLP).
DEFAULT_GROUPS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

GroupSpec = Union[bool, Sequence[Sequence[str]]]


def check_group_spec(spec: GroupSpec) -> Tuple[Tuple[str, ...], ...]:
    """The name groups that ``spec`` asks for: () for False, DEFAULT_GROUPS for True, else the given groups,
    validated (each a sequence of >= 2 distinct child names without '.', no name in two groups)."""
    if spec is False or spec is None:
        return ()
    if spec is True:
        return DEFAULT_GROUPS
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
        raise TypeError(f"group_projections={spec!r} must be a bool or a list of name groups, e.g. "
                        "[('q_proj', 'k_proj', 'v_proj'), ('gate_proj', 'up_proj')]")
    groups, seen = [], {}
    for g in spec:
        if isinstance(g, str) or not isinstance(g, (list, tuple)):
            raise TypeError(f"group_projections entry {g!r} must be a list or tuple of child module names such as "
                            "('q_proj', 'k_proj', 'v_proj')")
        if not all(isinstance(n, str) and n and "." not in n for n in g):
            raise ValueError(f"group_projections entry {g!r}: every name must be a non-empty child name without "
                             "'.' (siblings under one parent, e.g. 'q_proj')")
        if len(g) < 2 or len(set(g)) != len(g):
            raise ValueError(f"group_projections entry {g!r} must name at least two distinct modules")
        for n in g:
            if n in seen:
                raise ValueError(f"{n!r} appears in two groups ({seen[n]!r} and {tuple(g)!r}); a layer belongs to "
                                 "at most one group")
            seen[n] = tuple(g)
        groups.append(tuple(g))
    if not groups:
        raise ValueError("group_projections=[] names no group; pass False for none or True for the defaults")
    return tuple(groups)


# ------------------------------------------------------------------------------------------------ eligibility

def _plain_tensor(t) -> bool:
    # DTensors (FSDP2 shards) and other subclasses cannot be re-viewed into one buffer.
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def ineligible_reason(members: Sequence[LoRALayerBase]) -> Optional[str]:
    """Why these layers cannot form one group (None when they can)."""
    if len(members) < 2:
        return "fewer than two members"
    kinds = {type(m) for m in members}
    if not all(isinstance(m, LoRALayerBase) for m in members):
        return "a member is not a LoRA layer"
    if len(kinds) != 1 or kinds.pop() not in (LoRALinear, QLoRALinear):
        return f"mixed or unsupported base kinds ({sorted({type(m).__name__ for m in members})})"
    m0 = members[0]
    if len({m.in_features for m in members}) != 1:
        return f"different in_features {[m.in_features for m in members]}"
    if len({m.lora_dropout for m in members}) != 1:
        return f"different lora_dropout {[m.lora_dropout for m in members]}"
    if len({m._base_dtype for m in members}) != 1:
        return f"different base (compute) dtypes {[str(m._base_dtype) for m in members]}"
    if any(m.merged for m in members):
        return "a member is merged"
    params = [t for m in members for t in m._parameters.values()]
    if not all(_plain_tensor(t) for t in params):
        return "a member's tensors are not plain tensors (sharded by FSDP or another tensor subclass)"
    devices = {t.device for t in params if t is not None}
    if len(devices) != 1:
        return f"members on different devices {sorted(str(d) for d in devices)}"
    if devices.pop().type == "meta":
        return "members are on the meta device"
    if isinstance(m0, LoRALinear):
        if any(m.weight.requires_grad for m in members):
            return "a member's base weight requires grad (grouping shares one frozen base buffer)"
        return None
    if len({m.blocksize for m in members}) != 1:
        return f"different NF4 blocksizes {[m.blocksize for m in members]}"
    if len({m.double_quant for m in members}) != 1:
        return "members mix double-quantized and plain NF4 absmax"
    storages = sorted({str(m.quant_storage) for m in members})
    if storages != [str(torch.uint8)]:
        return (f"the members store their NF4 bytes as {storages} (quant_storage), which one shared uint8 buffer "
                "cannot alias; build them with quant_storage=torch.uint8 to group them")
    # The packed bytes of member i+1 follow member i's only when member i ends on a block boundary (a block
    # straddling two members would have one absmax for both); the last member may end in a partial block.
    bad = [m.out_features * m.in_features for m in members[:-1] if (m.out_features * m.in_features) % m0.blocksize]
    if bad:
        return (f"NF4 layout: a member's element count {bad} is not a multiple of blocksize {m0.blocksize}, so its "
                "blocks cannot be concatenated with its sibling's")
    return None


def _codes_way(ws: Sequence[NF4Weight]) -> bool:
    """Whether a group of double-quantized members keeps their codes (``LORA_OPS_GROUP_ABSMAX=codes``) rather
    than their decoded fp32 absmax: every member but the last ends on a nested block (256 quantization blocks),
    so that each nested block, and its offset, belongs to one member; one nested code table (by value)."""
    if os.environ.get("LORA_OPS_GROUP_ABSMAX", "fp32") != "codes":
        return False
    if any(w.absmax.numel() % NESTED_BLOCKSIZE for w in ws[:-1]):
        return False
    code = ws[0].nested_code
    return all(w.nested_code is code or torch.equal(w.nested_code, code) for w in ws[1:])


# ------------------------------------------------------------------------------------------------ the group

class _Pending:
    """Outputs computed for ``x`` that siblings have not asked for yet."""
    __slots__ = ("x", "key", "outs")

    def __init__(self, x, key, outs):
        self.x, self.key, self.outs = x, key, outs


class ProjectionGroup(nn.Module):
    """Sibling LoRA layers of one parent that read one input, computed as one ``lora_linear`` call.

    Build with ``group_projections(model)`` (or ``apply_lora(..., group_projections=True)``). The members stay
    the parent's children under their own names; the group holds them as plain references (not submodules).
    """

    def __init__(self, members: Sequence[LoRALayerBase], names: Sequence[str]):
        super().__init__()
        reason = ineligible_reason(members)
        if reason is not None:
            raise ValueError(f"cannot group {list(names)}: {reason}")
        # Plain references: registering them would list every member twice in named_modules().
        object.__setattr__(self, "_members", tuple(members))
        self.names = tuple(names)
        self.nf4 = isinstance(members[0], QLoRALinear)
        self.sizes = tuple(m.out_features for m in members)
        self.disabled_reason: Optional[str] = None
        self.repacks = 0
        object.__setattr__(self, "_pending", None)
        object.__setattr__(self, "_in_parent", False)  # inside the parent's forward (its hooks set it)
        object.__setattr__(self, "_hooks", [])
        self._pack()

    @property
    def members(self) -> Tuple[LoRALayerBase, ...]:
        return self._members

    def extra_repr(self) -> str:
        kind = "NF4" if self.nf4 else "dense"
        off = f", disabled: {self.disabled_reason}" if self.disabled_reason else ""
        return f"members={list(self.names)}, out_features={list(self.sizes)}, base={kind}{off}"

    # ---------------------------------------------------------------- the shared base buffer
    def _pack(self) -> None:
        """Concatenate the members' bases into one buffer and make each member's tensors views into it."""
        ms = self._members
        with torch.no_grad():
            if not self.nf4:
                cat = torch.cat([m.weight.detach() for m in ms], 0)
                off = 0
                for m in ms:
                    m.weight.data = cat[off:off + m.out_features]
                    off += m.out_features
                object.__setattr__(self, "_base", cat)
            else:
                ws = [m.nf4_weight for m in ms]
                data = torch.cat([w.data.reshape(-1) for w in ws]).reshape(-1, 1)
                self._view_into(data, "weight", [w.data.shape[0] for w in ws])
                codes = ws[0].nested and _codes_way(ws)
                nested = {}
                if ws[0].nested and not codes:
                    # The decoded fp32 absmax: what the kernels compute from the codes, product then sum.
                    absmax = torch.cat([reference_absmax(w.absmax, w.nested_absmax, w.nested_code, w.offset)
                                        for w in ws])
                else:  # a plain fp32 absmax, or the uint8 codes: concatenated like the bytes
                    absmax = torch.cat([w.absmax.reshape(-1) for w in ws])
                    self._view_into(absmax, "weight_absmax", [w.absmax.numel() for w in ws])
                if codes:
                    nabs = torch.cat([w.nested_absmax.reshape(-1) for w in ws])
                    self._view_into(nabs, "weight_nested_absmax", [w.nested_absmax.numel() for w in ws])
                    # Member i's offset over its nested blocks, which end on its last block (_codes_way).
                    offsets = torch.cat([w.offset.reshape(1).expand(w.nested_absmax.numel()) for w in ws])
                    # A detached alias of the code table, not the member's Parameter: nn.Module._apply swaps a
                    # Parameter's data in place (to bf16 under .to(torch.bfloat16)) before QLoRALinear restores
                    # the fp32 table under a new Parameter, which would leave the group with the cast one.
                    nested = dict(nested_absmax=nabs, nested_code=ws[0].nested_code.detach(), offset=offsets)
                shape = torch.Size((sum(self.sizes), ms[0].in_features))
                object.__setattr__(self, "_base", NF4Weight(data, absmax, shape, ws[0].dtype, ws[0].blocksize,
                                                            **nested))
            self._pack_adapters()
        self._remember_signature()

    def _pack_adapters(self) -> None:
        """Make the members' lora_A (and lora_B) row views of one buffer each, so that the C++ group reads A_cat
        (and, with equal ranks, B_rows = cat(B_i)) as a view instead of concatenating them in every call. Each
        Parameter stays the same object with its own version counter (optimizers, hooks and state_dict keys
        are unchanged); an in-place update of one member's adapter is an update of its rows. Adapters of
        mixed dtypes stay where they are (the group then concatenates them per call)."""
        for pname in ("lora_A", "lora_B"):
            ts = [m._parameters.get(pname) for m in self._members]
            if any(t is None or not _plain_tensor(t) for t in ts) or len({(t.dtype, t.device) for t in ts}) != 1:
                continue
            buf = torch.cat([t.detach().reshape(-1) for t in ts])
            self._view_into(buf, pname, [t.numel() for t in ts])

    def _view_into(self, buf: torch.Tensor, pname: str, lengths: List[int]) -> None:
        off = 0
        for m, n in zip(self._members, lengths):
            m._parameters[pname].data = buf[off:off + n].reshape(m._parameters[pname].shape)
            off += n

    def _base_tensors(self):
        """The members' base tensors, as (parameter dict, name): every parameter but the adapters and the bias."""
        return [(m._parameters, name) for m in self._members for name, t in m._parameters.items()
                if name not in ("lora_A", "lora_B", "bias") and t is not None]

    def _current_signature(self):
        """Where the members' base tensors live (and, for a decoded absmax, their versions): a change means the
        shared buffer no longer is the members' base (a move, a re-quantizing merge, a load with assign)."""
        sig = []
        for params, name in self._base_tensors():
            t = params[name]
            if not _plain_tensor(t):  # e.g. FSDP2 sharded the member after grouping
                sig.append((id(t), type(t)))
                continue
            sig.append((t.data_ptr(), t.dtype, t.device, t._version if self.nf4 else 0))
        return tuple(sig)

    def _remember_signature(self) -> None:
        """The signature, and for the per-call check each base tensor's identity, address, dtype (and version).
        Ids, not the tensors: a replaced weight must not be kept alive here; an id reused by a new tensor at the
        same address views the buffer this group keeps alive. No device: under CUDA's unified addressing one
        address names one device."""
        object.__setattr__(self, "_signature", self._current_signature())
        watch = []
        for params, name in self._base_tensors():
            t = params[name]
            watch.append((params, name, id(t), t.data_ptr() if _plain_tensor(t) else None, t.dtype,
                          t._version if self.nf4 else None))
        object.__setattr__(self, "_watch", tuple(watch))

    def _unchanged(self) -> bool:
        """Every base tensor is still the object the buffer was packed from, at the same address (and version):
        the per-call check, cheaper than building the signature."""
        watch = self.__dict__.get("_watch")  # absent in a group unpickled from an older version
        if watch is None:
            return False
        for params, name, ident, ptr, dtype, version in watch:
            u = params.get(name)
            if (id(u) != ident or ptr is None or u.data_ptr() != ptr or u.dtype is not dtype
                    or (version is not None and u._version != version)):
                return False
        return True

    def _apply(self, fn, recurse=True):
        # The parent converts its children in registration order, the members (registered before the group)
        # first: each member's weight now has its own storage, so pack them into one buffer again. A group that
        # turned off because its members could not share a buffer (one of them moved to another dtype or device)
        # turns on again once a move of the whole model makes them eligible.
        super()._apply(fn, recurse)
        if ineligible_reason(self._members) is None:
            if self.disabled_reason is not None and self.__dict__.get("_recoverable", False):
                self._pack()
                self.repacks += 1
                self.disabled_reason = None
                object.__setattr__(self, "_recoverable", False)
            elif self._current_signature() != self._signature:
                self._pack()
                self.repacks += 1
        return self

    def _base_for(self, dtype):
        base = self._base
        if isinstance(base, NF4Weight) or base.dtype == dtype:
            return base
        return base.to(dtype)

    def _base_is_current(self) -> bool:
        """Check (eager only: dynamo cannot read data pointers) that the shared buffer still is the members'
        base; re-pack it when they moved, False when they can no longer share one buffer."""
        if torch.compiler.is_compiling() or self._unchanged():
            return True
        if self._current_signature() == self._signature:
            self._remember_signature()  # other tensor objects at the same addresses
            return True
        reason = ineligible_reason(self._members)
        if reason is not None:
            tensors = [params[name] for params, name in self._base_tensors()]
            if not all(_plain_tensor(t) for t in tensors):
                # Sharded (FSDP2's DTensors): no move brings one shared buffer back.
                self._disable(f"the members changed after grouping: {reason}; each member computes alone")
            elif not any(t.is_meta for t in tensors):
                self._disable(f"the members changed after grouping: {reason}; moving the model (.to(), "
                              ".cuda(), to_empty()) where they can share one buffer turns the group on again",
                              recoverable=True)
            # On the meta device (shapes only, e.g. before to_empty) each member computes alone, silently.
            return False
        self._pack()
        self.repacks += 1
        return True

    # ---------------------------------------------------------------- pending outputs
    def clear(self) -> None:
        """Drop outputs computed for siblings that have not asked for them."""
        object.__setattr__(self, "_pending", None)

    def _key(self, x: torch.Tensor, training: bool):
        """(grad mode, autocast on, its dtype or None, training, then the versions of x and of every adapter)."""
        device_type = "cuda" if x.is_cuda else x.device.type  # x.device builds a device object per call
        autocast = _autocast_on_type(device_type)
        key = (torch.is_grad_enabled(), autocast, torch.get_autocast_dtype(device_type) if autocast else None,
               training)
        if torch.compiler.is_compiling() or x.is_inference():
            return key  # inference tensors have no version counter (and cannot be changed in place outside it)
        # A sibling's pending output must not outlive an in-place change of x or of an adapter. (The members'
        # parameter dicts, not nn.Module's attribute lookup: this runs for every member call.)
        versions = [x._version]
        for m in self._members:
            params = m._parameters
            versions += (params["lora_A"]._version, params["lora_B"]._version)
        return key + tuple(versions)

    def member_output(self, member: LoRALayerBase, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``member``'s output for ``x`` through the group, or None when it must compute alone."""
        if self.disabled_reason is not None:
            return None
        ms = self._members
        i = member._lora_group_index
        training = ms[0].training
        for m in ms:
            if m.merged or m.training != training:
                return None  # merged members run their base alone; mixed train/eval members differ in dropout
        key = self._key(x, training)
        p = self._pending
        if p is not None:
            outs = p.outs
            if i in outs:
                if p.x is x:
                    if p.key == key:
                        y = outs.pop(i)
                        if not outs:
                            object.__setattr__(self, "_pending", None)
                        return y
                elif self.__dict__.get("_in_parent", False):
                    self._disable(f"{self.names[i]} was called with another input than its siblings "
                                  "(cross-attention or custom code); each member now computes its own output")
                    return None
                # Outside the parent's forward (a member called on its own, as a test or a probe does), another
                # input is another call: the group computes it afresh and stays on.
        if not self._base_is_current() or self._decodes_alone(x, training):
            return None
        ys = self._compute(x, training, key)
        if len(ys) > 1:
            object.__setattr__(self, "_pending", _Pending(x, key, {j: y for j, y in enumerate(ys) if j != i}))
        else:
            object.__setattr__(self, "_pending", None)
        return ys[i]

    def _decodes_alone(self, x: torch.Tensor, training: bool) -> bool:
        """Whether the members compute alone because this call is a decode step (inference at a few rows) and the
        stacked base carries one offset per nested block, which the decode kernel does not take: each member's
        own decode kernel then runs with its one offset, as ungrouped."""
        base = self._base
        if not (isinstance(base, NF4Weight) and base.offset is not None and base.offset.numel() > 1):
            return False
        x2 = x.reshape(-1, x.shape[-1])
        p = self._members[0].lora_dropout if training else 0.0
        return any(_decode.use_decode(x2, m.lora_A, m.lora_B, m.bias, p) for m in self._members)

    def _disable(self, reason: str, recoverable: bool = False) -> None:
        self.clear()
        self.disabled_reason = reason
        object.__setattr__(self, "_recoverable", recoverable)
        warnings.warn(f"lora_ops: projection group {list(self.names)} is off: {reason}", UserWarning, stacklevel=4)

    def _compute(self, x: torch.Tensor, training: bool, key: Optional[tuple] = None) -> Tuple[torch.Tensor, ...]:
        """Every member's output for ``x``, as LoRALayerBase.forward would give it, in one call (the C++ group on
        eager CUDA, else one lora_linear call). ``key``: this call's ``_key``, whose autocast state it reuses."""
        ms = self._members
        in_dtype = x.dtype
        if key is None:
            key = self._key(x, training)
        autocast = key[1]
        dtype = key[2] if autocast else ms[0]._base_dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"compute dtype {dtype} is not supported; use float32, float16 or bfloat16")
        x = x if in_dtype == dtype else x.to(dtype)
        adapters = [m._parameters for m in ms]
        biases = [p["bias"] for p in adapters]
        bias = None
        if biases.count(None) != len(biases):
            bias = torch.cat([(b if b.dtype == dtype else b.to(dtype)) if b is not None
                              else x.new_zeros(m.out_features) for m, b in zip(ms, biases)])
        scalings = [m.scaling for m in ms]
        if _launch.takes(x) and not torch.compiler.is_compiling():
            # Eager CUDA: the whole group is one C++ autograd Function (stacking, launches, the members' slices),
            # the same values as the ops below; None when the general path must take the call.
            a_s = [a if a.dtype == dtype else a.to(dtype) for a in [p["lora_A"] for p in adapters]]
            b_s = [b if b.dtype == dtype else b.to(dtype) for b in [p["lora_B"] for p in adapters]]
            ys = _launch.group(x, self._base_for(dtype), a_s, b_s, scalings, bias, ms[0].lora_dropout, training)
            if ys is not None:
                if not autocast and dtype != in_dtype and in_dtype in FLOAT_DTYPES:
                    ys = tuple(y.to(in_dtype) for y in ys)
                return ys
        cast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731
        a_cat = torch.cat([cast(m.lora_A) for m in ms], 0)
        if all(s == scalings[0] for s in scalings):
            # One scaling: the op applies it to S @ B^T as each single layer does (the same rounding).
            b_bd = torch.block_diag(*[cast(m.lora_B) for m in ms])
            scaling = scalings[0]
        else:
            b_bd = torch.block_diag(*[cast(m.lora_B) * s for m, s in zip(ms, scalings)])
            scaling = 1.0
        y = lora_linear(x, self._base_for(dtype), a_cat, b_bd, scaling, bias=bias, dropout_p=ms[0].lora_dropout,
                        training=training)
        if not autocast and y.dtype != in_dtype and in_dtype in FLOAT_DTYPES:
            y = y.to(in_dtype)
        return y.split(self.sizes, dim=-1)

    # ---------------------------------------------------------------- install / remove
    def _attach(self, parent: nn.Module) -> None:
        for i, m in enumerate(self._members):
            object.__setattr__(m, "_lora_group", self)
            object.__setattr__(m, "_lora_group_index", i)
        # Bound methods, not closures: deepcopy rebinds them to the copied group, and pickle can store them.
        # always_call: a parent forward that raises still leaves the group outside it.
        self._hooks.extend([parent.register_forward_pre_hook(self._enter_hook),
                            parent.register_forward_hook(self._exit_hook, always_call=True)])

    def _enter_hook(self, *args) -> None:
        self.clear()
        object.__setattr__(self, "_in_parent", True)

    def _exit_hook(self, *args) -> None:
        self.clear()
        object.__setattr__(self, "_in_parent", False)

    def _clear_hook(self, *args) -> None:  # the one hook of groups pickled by earlier versions
        self.clear()

    def _detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.clear()
        for m in self._members:
            if getattr(m, "_lora_group", None) is self:
                object.__setattr__(m, "_lora_group", None)


# ------------------------------------------------------------------------------------------------ model level

_GROUP_PREFIX = "lora_group_"


def _candidates(model: nn.Module, groups) -> List[Tuple[str, nn.Module, Tuple[str, ...], List[LoRALayerBase]]]:
    """[(parent name, parent, member names, members)] for every parent with >= 2 LoRA children of one group."""
    out = []
    for pname, parent in model.named_modules():
        if isinstance(parent, (LoRALayerBase, ProjectionGroup)):
            continue
        children = dict(parent.named_children())
        for names in groups:
            present = [n for n in names if isinstance(children.get(n), LoRALayerBase)]
            if len(present) >= 2:
                out.append((pname, parent, tuple(present), [children[n] for n in present]))
    return out


def projection_groups(model: nn.Module) -> Dict[str, ProjectionGroup]:
    """{full module name: group} of the ProjectionGroups installed in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ProjectionGroup)}


def explain_groups(model: nn.Module, groups: GroupSpec = True) -> List[Dict[str, object]]:
    """For every parent with sibling LoRA layers named in ``groups``: whether they are grouped, and why not."""
    rows = []
    for pname, parent, names, members in _candidates(model, check_group_spec(groups)):
        g = getattr(members[0], "_lora_group", None)
        if g is not None and g.members == tuple(members):
            status, reason = ("off", g.disabled_reason) if g.disabled_reason else ("grouped", None)
        else:
            status, reason = "ungrouped", ineligible_reason(members) or "not grouped (group_projections not called)"
        rows.append({"parent": pname, "members": list(names), "status": status, "reason": reason})
    return rows


def group_projections(model: nn.Module, groups: GroupSpec = True, *,
                      only: Optional[Iterable[int]] = None) -> List[ProjectionGroup]:
    """Group sibling LoRA layers of ``model`` that read one input (``groups``: True for DEFAULT_GROUPS, or a
    list of child-name groups); return the groups made. Siblings that cannot be grouped (``explain_groups``
    says why) keep computing alone; siblings that already form exactly such a group are left as they are, and
    siblings of which some already belong to another group raise ValueError. ``only``: ids of the layers that may
    be grouped (apply_lora passes the layers it made); siblings outside it stay as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = check_group_spec(groups)
    only = None if only is None else set(only)
    made = []
    for pname, parent, names, members in _candidates(model, spec):
        if only is not None:
            keep = [(n, m) for n, m in zip(names, members) if id(m) in only]
            if len(keep) < 2:
                continue
            names, members = tuple(n for n, _ in keep), [m for _, m in keep]
        g = getattr(members[0], "_lora_group", None)
        if g is not None and g.members == tuple(members):
            continue  # already this group (apply_lora groups by default): calling again changes nothing
        if any(getattr(m, "_lora_group", None) is not None for m in members):
            raise ValueError(f"{pname or type(model).__name__}: {list(names)} already belong to a projection group; "
                             "call ungroup_projections(model) first")
        reason = ineligible_reason(members)
        if reason is not None:
            log.info("lora_ops: not grouping %s.%s: %s", pname, list(names), reason)
            continue
        group = ProjectionGroup(members, names)
        parent.add_module(_GROUP_PREFIX + "_".join(names), group)
        group._attach(parent)
        made.append(group)
    return made


def ungroup_projections(model: nn.Module) -> int:
    """Remove every ProjectionGroup from ``model`` (members compute alone again; their weights and adapters stay
    views of the shared buffers, which are freed with them); return how many were removed."""
    n = 0
    for name, group in list(projection_groups(model).items()):
        group._detach()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        delattr(parent, child)
        n += 1
    return n
