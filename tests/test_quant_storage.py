"""QLoRALinear's ``quant_storage``: the NF4 bytes held as bfloat16 / float16 / float32 elements (bitsandbytes'
option of that name), so that an FSDP2 ``fully_shard`` that refuses integer Parameters (torch 2.11's) shards the
4-bit base. The layer must compute, save and load exactly as with uint8 storage; only the Parameters' dtype and
shape differ. FSDP2 and torch.distributed.checkpoint with a float storage run end to end in
tests/test_multigpu_script.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import NF4Weight, QLoRALinear, quantize_nf4
from lora_ops._backend import use_backend
from lora_ops.grouped import explain_groups
from lora_ops.modules import _NF4_PARAMS
from lora_ops.nf4 import bytes_to_storage, storage_numel, storage_to_bytes

FLOAT_STORAGES = [torch.bfloat16, torch.float16, torch.float32]
SNAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _pair(out_f, in_f, storage, double_quant=True, seed=0):
    """(uint8 layer, the same layer with ``storage``): same NF4 bytes, same adapters (B nonzero)."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    ref = QLoRALinear.from_linear(lin, r=4, double_quant=double_quant)
    with torch.no_grad():
        ref.lora_B.normal_()
    other = QLoRALinear.from_linear(lin, r=4, double_quant=double_quant, quant_storage=storage)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _fwd_bwd(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("storage", FLOAT_STORAGES, ids=[SNAME[s] for s in FLOAT_STORAGES])
def test_float_storage_computes_and_saves_exactly_as_uint8(storage, double_quant):
    ref, layer = _pair(40, 96, storage, double_quant)
    assert layer.weight.dtype == storage and layer.weight.shape[1] == 1  # bitsandbytes' (elements, 1)
    assert layer.weight.numel() == storage_numel(40 * 96 // 2, storage)
    if double_quant:
        assert layer.weight_absmax.dtype == storage
    else:
        assert layer.weight_absmax.dtype == torch.float32  # the plain absmax is a float already
    # What torch 2.11's fully_shard does with every Parameter (nn.Parameter(data), requires_grad=True first):
    # it must not raise for any NF4 tensor.
    for name in _NF4_PARAMS:
        t = layer._parameters[name]
        if t is not None:
            assert t.is_floating_point(), name
            nn.Parameter(t.detach())
    x = torch.randn(7, 96)
    for got, want in zip(_fwd_bwd(layer, x), _fwd_bwd(ref, x)):
        assert torch.equal(got, want)
    for k, (a, b) in enumerate(zip(layer.nf4_weight.tensors(), ref.nf4_weight.tensors())):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), k
    # state_dict: bitsandbytes' uint8 format, whatever the storage
    sd, want = layer.state_dict(), ref.state_dict()
    assert list(sd) == list(want)
    for k in sd:
        assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]), k
    assert f"quant_storage={storage}" in repr(layer)


def test_float_storage_on_the_triton_kernels():
    """The kernels read the stored bytes through nf4_weight's uint8 views (interpreter on CPU, fp32)."""
    ref, layer = _pair(64, 128, torch.bfloat16)
    x = torch.randn(16, 128)
    with use_backend("triton"):
        got, want = _fwd_bwd(layer, x), _fwd_bwd(ref, x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_byte_counts_that_do_not_fill_an_element_are_padded(storage):
    # 3 x 7: 21 codes -> 11 bytes; one absmax block -> 1 byte of nested codes; neither fills a 4-byte element.
    ref, layer = _pair(3, 7, storage)
    assert layer.weight.numel() == storage_numel(11, storage)
    assert layer.weight.numel() * storage.itemsize > 11
    assert layer.weight_absmax.numel() == storage_numel(1, storage)
    w4 = layer.nf4_weight
    assert w4.data.shape == (11, 1) and w4.absmax.shape == (1,)
    x = torch.randn(2, 7)
    assert torch.equal(layer(x), ref(x))
    # the round trip through the storage helpers keeps every byte
    raw = torch.arange(11, dtype=torch.uint8)
    assert torch.equal(storage_to_bytes(bytes_to_storage(raw, storage), 11), raw)


def test_dtype_casts_keep_the_storage_and_a_changed_storage_dtype_is_refused():
    ref, layer = _pair(40, 96, torch.bfloat16)
    for m in (layer, ref):  # the adapters and bias round to fp16 alike
        m.half()
    assert layer.weight.dtype == torch.bfloat16 and layer.compute_dtype == torch.float16
    for m in (layer, ref):
        m.float()
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), ref(x))
    # what FSDP2's MixedPrecisionPolicy(param_dtype=...) would do to the bf16 bytes: reinterpret-by-cast
    layer.weight.data = layer.weight.data.to(torch.float16)
    with pytest.raises(TypeError, match="weight of this QLoRALinear is torch.float16.*torch.bfloat16"):
        layer(x)


def test_merge_keeps_the_storage_and_merge_and_unload_is_exact():
    ref, layer = _pair(40, 96, torch.float32)
    merged_ref = lora_ops.merge_and_unload(ref)
    merged = lora_ops.merge_and_unload(layer)
    assert torch.equal(merged.weight, merged_ref.weight)
    ref, layer = _pair(40, 96, torch.float32)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
        ref.merge()
    assert layer.weight.dtype == torch.float32
    for a, b in zip(layer.nf4_weight.tensors(), ref.nf4_weight.tensors()):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bad_quant_storage_is_refused_with_the_choices():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"quant_storage=torch.int8 is not one of .*torch.uint8.*torch.bfloat16"):
        QLoRALinear.from_linear(lin, quant_storage=torch.int8)
    with pytest.raises(ValueError, match="quant_storage"):
        QLoRALinear(quantize_nf4(lin.weight.detach()), quant_storage="bf16")


def _tiny_model():
    model = nn.Module()
    model.block = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(model.block, name, nn.Linear(64, 64))
    return model


def test_apply_lora_quant_storage():
    model = lora_ops.apply_lora(_tiny_model(), ["q_proj", "k_proj", "v_proj"], r=4, quantize="nf4",
                                quant_storage=torch.bfloat16, group_projections=True)
    layers = lora_ops.inject.lora_layers(model)
    assert len(layers) == 3 and all(m.quant_storage == torch.bfloat16 for m in layers.values())
    # Grouping shares one uint8 buffer among the members, which bf16-stored bytes cannot alias: it falls back.
    rows = explain_groups(model)
    assert [(r["members"], r["status"]) for r in rows] == [(["q_proj", "k_proj", "v_proj"], "ungrouped")]
    assert "quant_storage" in rows[0]["reason"]
    default = lora_ops.apply_lora(_tiny_model(), ["q_proj"], r=4, quantize="nf4")
    assert default.block.q_proj.quant_storage == torch.uint8
    with pytest.raises(ValueError, match="quant_storage=torch.bfloat16 applies to NF4 bases.*quantize='nf4'"):
        lora_ops.apply_lora(_tiny_model(), ["q_proj"], r=4, quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="quant_storage"):
        lora_ops.apply_lora(_tiny_model(), ["q_proj"], r=4, quantize="nf4", quant_storage=torch.int32)


def test_from_bnb_keeps_the_linear4bit_storage():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            quant_storage=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16)
    lin.to("cpu")
    layer = QLoRALinear.from_bnb(lin, r=4)
    assert layer.quant_storage == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert QLoRALinear.from_bnb(lin, r=4, quant_storage=torch.uint8).weight.dtype == torch.uint8
    want = NF4Weight.from_bnb(lin.weight)
    for a, b in zip(layer.nf4_weight.tensors(), want.tensors()):
        assert (a is None and b is None) or torch.equal(a.reshape(-1), b.reshape(-1))


def test_from_state_dict_stored_as_checks_dtype_and_size():
    ref, layer = _pair(40, 96, torch.bfloat16)
    sd = layer._nf4_view(layer.weight_offset, stored=True).state_dict("m.")
    assert sd["m.weight"].dtype == torch.bfloat16
    w4 = NF4Weight.from_state_dict(sd, "m.", stored_as=torch.bfloat16)
    assert w4.data is sd["m.weight"]
    bad = dict(sd, **{"m.weight": sd["m.weight"][:-1]})
    with pytest.raises(ValueError, match="m.weight holds 959 torch.bfloat16 elements; stored as torch.bfloat16 "
                                         r"\(quant_storage\), shape \[40, 96\] with blocksize 64 needs 960"):
        NF4Weight.from_state_dict(bad, "m.", stored_as=torch.bfloat16)
    bad = dict(sd, **{"m.weight.absmax": sd["m.weight.absmax"].float()})
    with pytest.raises(ValueError, match="m.weight.absmax holds 30 torch.float32 elements; stored as torch.bfloat16"):
        NF4Weight.from_state_dict(bad, "m.", stored_as=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=["uint8", "fp32"])
def test_gpu_same_dtype_copies_keep_every_byte(cuda, storage):
    """The copies FSDP2 makes of a sharding group whose tensors share one dtype (``torch._foreach_copy_``), and a
    plain ``copy_``, keep every byte of packed codes held as ``storage``, NaN bit patterns included (a bf16 or
    fp16 copy through float would not: pytorch#159333)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    raw = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g).to(cuda)
    raw[:8] = torch.tensor([0xFF, 0x7F, 0x01, 0xFF, 0xC1, 0x7F, 0x80, 0xFF], dtype=torch.uint8)  # NaN patterns
    src = bytes_to_storage(raw, storage)
    for copy in ("foreach", "copy_"):
        dst = torch.empty_like(src)
        if copy == "foreach":
            torch._foreach_copy_([dst], [src])
        else:
            dst.copy_(src)
        assert torch.equal(storage_to_bytes(dst, raw.numel()), raw), copy


@pytest.mark.gpu
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_fully_shard_one_layer_reads_the_same_bytes(cuda, storage, tmp_path):
    """One QLoRALinear under FSDP2 (one process, NCCL): fully_shard takes every NF4 tensor (all floats with this
    storage), and the forward reads the unsharded layer's bytes and computes its output bit for bit. With fp32
    storage and fp32 adapters the whole group is fp32, so FSDP2 copies it with torch._foreach_copy_."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        ref, layer = _pair(384, 256, storage, seed=3)
        ref, layer = ref.to(cuda), layer.to(cuda)
        want_bytes = [t.clone() for t in layer.nf4_weight.tensors() if t is not None]
        x = torch.randn(32, 256, device=cuda)
        want = ref(x)
        fully_shard(layer, mesh=init_device_mesh("cuda", (1,)))
        nf4 = [layer._parameters[n] for n in _NF4_PARAMS if layer._parameters[n] is not None]
        assert all(hasattr(t, "full_tensor") for t in nf4)
        seen = []
        layer.register_forward_pre_hook(lambda m, a: seen.extend(t.clone() for t in m.nf4_weight.tensors()
                                                                 if t is not None))
        got = layer(x)
        assert all(torch.equal(a, b) for a, b in zip(seen, want_bytes)) and len(seen) == len(want_bytes)
        assert torch.equal(got, want)
    finally:
        dist.destroy_process_group()
