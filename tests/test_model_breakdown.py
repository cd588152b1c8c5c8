"""scripts/model_breakdown.py: the model preset's training step broken down by category.

End to end on the CPU (``--cpu``: the preset's tiny decoder, one profiled step per provider) for floor,
fused_qlora and peft_bnb (skipped with its reason where bitsandbytes cannot run here), plus a provider whose
build fails; and the GPU path's classification on a hand-made trace (kernels linked to the ops that launched
them), since no CUDA device runs here."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "model_breakdown.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("model_breakdown", SCRIPT)
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

from benchmarks import model as bench_model  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402

# Rounding: every value is a float of ms per step; the CPU categories sum to the busy time exactly.
EPS = 1e-6


@pytest.fixture(scope="module")
def cpu_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("breakdown") / "breakdown.json"
    mp = pytest.MonkeyPatch()

    def broken(case, device, seed=0):
        raise RuntimeError("this builder fails on purpose")

    mp.setitem(bench_model.BUILDERS, "peft", broken)
    threads = torch.get_num_threads()
    try:
        rc = mb.main(["--cpu", "--providers", "floor,peft_bnb,fused_qlora,peft", "--steps", "1", "--top", "3",
                      "--out", str(out)])
    finally:
        mp.undo()
    assert torch.get_num_threads() == threads  # --cpu's one thread does not outlive the run
    assert rc == 0
    return json.loads(out.read_text())


def _bnb_reason():
    return bench_model.bnb_unavailable(torch.device("cpu"))


def test_cpu_case_is_the_presets_quick_mode(cpu_doc):
    case = cpu_doc["case"]
    preset = PRESETS["model"].cases(True, batch=1, checkpointing=True)[0]
    assert cpu_doc["mode"] == "cpu" and cpu_doc["case_name"] == preset.name
    for key in ("arch", "layers", "seq", "batch", "dtype", "r", "checkpointing", "vocab", "hidden"):
        assert case[key] == preset.config()[key], key
    assert (case["steps"], case["warmup_steps"]) == (1, 3)


def test_cpu_breakdown_per_provider(cpu_doc):
    provs = cpu_doc["providers"]
    ran = ["floor", "fused_qlora"] + ([] if _bnb_reason() else ["peft_bnb"])
    assert list(provs) == ["floor", "peft_bnb", "fused_qlora", "peft"]
    keys = [c["key"] for c in cpu_doc["categories"]]
    for p in ran:
        r = provs[p]
        assert r["status"] == "ok", (p, r.get("reason"))
        assert r["wall_ms"] > 0 and r["wall_unprofiled_ms"] > 0 and len(r["walls_ms"]) == 1
        cats = r["categories"]
        assert list(cats) == keys
        assert all(v >= 0 and math.isfinite(v) for v in cats.values()), cats
        total = sum(cats.values())
        assert 0 < total <= r["wall_ms"] + EPS
        assert total == pytest.approx(r["busy_ms"], abs=EPS)
        assert r["host_gap_ms"] == pytest.approx(r["wall_ms"] - r["busy_ms"], abs=EPS)
        for g in cpu_doc["groups"]:
            assert r["groups"][g["key"]] == pytest.approx(sum(cats[c] for c in g["categories"]), abs=EPS)
        assert cats["gemm"] > 0 and cats["attention"] > 0 and cats["norm_elementwise"] > 0
        assert cats["lm_head"] > 0 and cats["loss"] > 0  # vocab 128 is no other dimension of the tiny decoder
        assert cats["gemm_lora"] == 0  # r = 16 is also its seq and head dim: adapter GEMMs are not split out
        assert r["per_step"]["ops"] > 0 and r["top"]
    floor, fq = provs["floor"]["categories"], provs["fused_qlora"]["categories"]
    assert floor["lora_ops"] == 0 and floor["optimizer"] == 0 and floor["bnb"] == 0  # frozen: no optimizer
    assert fq["lora_ops"] > 0 and fq["optimizer"] > 0 and fq["bnb"] == 0
    if "peft_bnb" in ran:
        pb = provs["peft_bnb"]["categories"]
        assert pb["bnb"] > 0 and pb["lora_ops"] == 0 and pb["optimizer"] > 0
    else:
        assert provs["peft_bnb"]["status"] == "skipped" and provs["peft_bnb"]["reason"].startswith("RuntimeError")


def test_failing_provider_is_skipped_with_its_reason(cpu_doc):
    r = cpu_doc["providers"]["peft"]
    assert r["status"] == "skipped" and r["reason"] == "RuntimeError: this builder fails on purpose"
    assert "peft: skipped: RuntimeError: this builder fails on purpose" in cpu_doc["table"]
    for p in ("floor", "fused_qlora", "peft_bnb", "peft"):
        assert p in cpu_doc["table"].splitlines()[0]


def test_checkpointed_recompute_keeps_its_own_categories(cpu_doc):
    """With checkpointing the layer is recomputed inside the first backward node that unpacks a saved tensor,
    for fused_qlora lora_ops' own Function backward: its attention and norms must keep their categories. The
    floor runs the same decoder, so the same attention and RMSNorm / RoPE / SiLU ops."""
    floor, fq = cpu_doc["providers"]["floor"]["calls"], cpu_doc["providers"]["fused_qlora"]["calls"]
    assert fq["attention"] == floor["attention"] > 0  # forward, recomputation, backward of each layer
    assert fq["norm_elementwise"] >= 0.95 * floor["norm_elementwise"]


# ------------------------------------------------------------------------------- the GPU path, hand-made

def _gpu_trace():
    """Ops (CPU side, one forward thread 1 and the autograd thread 2) and kernels of a made-up CUDA step of the
    GPU case (vocab 32000, r 16, hidden 4096): (ops, kernels, expected ns per category)."""
    Op, K = mb.Op, mb.Kernel
    ops, kernels = [], []
    expect = dict.fromkeys(mb.CATEGORY_KEYS, 0)

    def op(name, start, end, corr, shapes=(), tid=1, seq=-1, annotation=False):
        o = Op(name, start, end, tid, corr, seq, annotation=annotation, shapes=lambda s=shapes: [list(x) for x in s])
        ops.append(o)
        return o

    def kernel(name, start, end, corr, cat, kind="kernel"):
        kernels.append(K(name, start, end, corr, kind))
        expect[cat] += end - start

    # forward: LoRA Function launching Triton kernels; PEFT-style GEMMs told apart by shape
    op("_EagerLoRA", 0, 100, 1, seq=1)
    kernel("_lora_gemm_kernel", 10, 40, 1, "lora_ops")
    kernel("_nf4_dequant_kernel", 40, 50, 1, "lora_ops")
    op("aten::mm", 110, 120, 2, [(2048, 4096), (4096, 4096)], seq=2)
    kernel("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", 120, 150, 2, "gemm")
    op("aten::mm", 160, 170, 3, [(2048, 4096), (4096, 16)], seq=3)
    kernel("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_64x64_64x4_tn_align8>", 170, 180, 3,
           "gemm_lora")
    op("bitsandbytes::dequantize_4bit", 190, 200, 4, [(8388608, 1)], seq=4)
    kernel("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", 200, 210, 4, "bnb")
    # attention: the flash kernel by name, a copy inside sdpa by its enclosing op
    sdpa = op("aten::scaled_dot_product_attention", 220, 260, 5, [(1, 32, 2048, 128)], seq=5)
    op("aten::contiguous", 222, 228, 6, [(1, 32, 2048, 128)])
    kernel("void at::native::elementwise_kernel<128, 4>(int, at::native::direct_copy_kernel_cuda)", 230, 235, 6,
           "attention")
    op("aten::_flash_attention_forward", 240, 258, 7, [(1, 32, 2048, 128)])
    kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Params)", 240, 308, 7,
           "attention")  # overlaps the next kernel: busy time counts that once
    assert sdpa.name.startswith("aten::")
    # an RMSNorm op, the embedding lookup (vocab-sized weight, still elementwise), the LM head and the loss
    op("aten::pow", 300, 305, 8, [(1, 2048, 4096)], seq=8)
    kernel("void at::native::vectorized_elementwise_kernel<4, pow_tensor_scalar>(int)", 305, 310, 8,
           "norm_elementwise")
    op("aten::embedding", 310, 315, 9, [(32000, 4096), (1, 2048)], seq=9)
    kernel("void at::native::indexSelectLargeIndex<c10::BFloat16>(...)", 315, 320, 9, "norm_elementwise")
    op("aten::linear", 320, 340, 10, [(1, 2048, 4096), (32000, 4096)], seq=10)
    op("aten::matmul", 321, 339, 11, [(1, 2048, 4096), (4096, 32000)])
    op("aten::mm", 322, 338, 12, [])  # no shapes of its own: the enclosing aten ops decide
    kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cgasize1x2x1", 330, 400, 12, "lm_head")
    op("aten::_to_copy", 400, 405, 13, [(1, 2048, 32000)], seq=13)
    kernel("void at::native::unrolled_elementwise_kernel<copy>(int)", 405, 420, 13, "loss")
    op("aten::cross_entropy_loss", 420, 440, 14, [(2048, 32000), (2048,)], seq=14)
    op("aten::_log_softmax", 421, 430, 15, [(2048, 32000)])
    kernel("void at::native::cunn_SoftMaxForward<8, float>(float*)", 430, 450, 15, "loss")
    # backward (thread 2): the LoRA Function's backward recomputes the layer (a forward op with a sequence
    # number, nested in it), then launches its own kernels and one elementwise op of its own
    bwd = op("_EagerLoRABackward", 500, 700, 20, [(2048, 4096)], tid=2, seq=1)
    assert bwd.bwd and not bwd.forward
    op("aten::pow", 510, 520, 21, [(1, 2048, 4096)], tid=2, seq=30)
    op("aten::pow", 511, 519, 22, [(1, 2048, 4096)], tid=2)
    kernel("void at::native::vectorized_elementwise_kernel<4, pow_tensor_scalar>(int)", 520, 525, 22,
           "norm_elementwise")
    op("aten::_scaled_dot_product_flash_attention", 530, 560, 23, [(1, 32, 2048, 128)], tid=2, seq=31)
    op("aten::empty", 531, 532, 24, [], tid=2)
    kernel("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>(int)", 560, 565, 24, "attention")
    op("aten::add_", 600, 610, 25, [(2048, 4096), (2048, 4096)], tid=2)
    kernel("void at::native::vectorized_elementwise_kernel<4, add>(int)", 610, 615, 25, "lora_ops")
    kernel("_lora_bwd_da_kernel", 615, 640, 20, "lora_ops")
    # optimizer: a foreach kernel by name, a plain kernel inside the Optimizer.step range
    op("Optimizer.step#AdamW.step", 800, 900, 30, tid=1, annotation=True)
    op("aten::_foreach_mul_", 810, 820, 31)
    kernel("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>(...)", 820,
           830, 31, "optimizer")
    op("aten::copy_", 840, 845, 32, [(16, 4096), (16, 4096)])
    kernel("void at::native::vectorized_elementwise_kernel<4, copy>(int)", 845, 850, 32, "optimizer")
    kernel("Memcpy DtoD (Device -> Device)", 850, 860, 32, "memcpy", kind="memcpy")
    kernel("some_library_kernel", 870, 880, 999, "other")  # launched by nothing the trace knows
    return ops, kernels, expect


def test_gpu_trace_categories_busy_and_gap():
    case = PRESETS["model"].cases(False, batch=1, checkpointing=True)[0]
    dims = mb.Dims(case)
    assert dims.vocab == 32000 and dims.vocab_distinct and dims.r == 16 and dims.r_distinct
    ops, kernels, expect = _gpu_trace()
    walls = [0.002, 0.004]  # ms per step: 2 steps
    r = mb.analyze(ops, kernels, dims, walls, cuda=True)
    for key in mb.CATEGORY_KEYS:
        assert r["categories"][key] == pytest.approx(expect[key] / 1e6 / 2, abs=1e-12), key
    # busy is the union of the kernels: the flash kernel overlaps the next one
    intervals = sorted((k.start, k.end) for k in kernels)
    union, end = 0, -1
    for s, e in intervals:
        union += max(0, e - max(s, end))
        end = max(end, e)
    assert sum(e - s for s, e in intervals) > union
    assert r["busy_ms"] == pytest.approx(union / 1e6 / 2)
    assert r["wall_ms"] == pytest.approx(0.003) and r["host_gap_ms"] == pytest.approx(0.003 - union / 2e6)
    assert r["per_step"]["kernels"] == (len(kernels) - 1) / 2  # the memcpy is no kernel
    top = {t["name"]: t["category"] for t in r["top"]}
    assert top["_lora_gemm_kernel"] == "lora_ops" and top["some_library_kernel"] == "other"


def test_dims_split_only_distinct_sizes():
    tiny = PRESETS["model"].cases(True, batch=1, checkpointing=True)[0]
    d = mb.Dims(tiny)
    assert d.vocab_distinct and not d.r_distinct  # r 16 = seq = head dim there
    op = mb.Op("aten::mm", 0, 1, shapes=[[16, 64], [64, 16]])
    assert d.gemm(op) == "gemm"
    assert d.gemm(mb.Op("aten::mm", 0, 1, shapes=[[16, 64], [64, 128]])) == "lm_head"


class _FakeEvent:
    """The part of torch's _KinetoEvent that read_trace uses."""

    def __init__(self, name, act, device, start, dur, tid=1, corr=0, linked=0, seq=-1, fwd_tid=0, shapes=()):
        self._v = dict(name=name, activity_type=act, device_type=device, start_ns=start, duration_ns=dur,
                       start_thread_id=tid, end_thread_id=tid, correlation_id=corr, linked_correlation_id=linked,
                       sequence_nr=seq, fwd_thread_id=fwd_tid, shapes=[list(s) for s in shapes], is_async=False,
                       is_user_annotation=act == "user_annotation")

    def __getattr__(self, key):
        return lambda: self._v[key]


def test_read_trace_keeps_ops_kernels_and_copies_only():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        _FakeEvent("aten::mm", "cpu_op", cpu, 0, 100, corr=7, seq=3, shapes=[(2048, 4096), (4096, 32000)]),
        _FakeEvent("cudaLaunchKernel", "cuda_runtime", cpu, 10, 5, linked=7),
        _FakeEvent("Optimizer.step#AdamW.step", "user_annotation", cpu, 200, 50, corr=8),
        _FakeEvent("MmBackward0", "cpu_op", cpu, 300, 40, tid=2, corr=9, seq=3, fwd_tid=1),
        _FakeEvent("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "kernel", cuda, 20, 80, linked=7),
        _FakeEvent("Memcpy DtoD (Device -> Device)", "gpu_memcpy", cuda, 120, 10, linked=7),
        _FakeEvent("Memset (Device)", "gpu_memset", cuda, 130, 2, linked=7),
        _FakeEvent("Optimizer.step#AdamW.step", "gpu_user_annotation", cuda, 200, 50),
        _FakeEvent("Stream Sync", "cuda_sync", cuda, 140, 30),
    ]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    ops, kernels = mb.read_trace(prof)
    assert [(o.name, o.annotation, o.bwd, o.forward) for o in ops] == [
        ("aten::mm", False, False, True), ("Optimizer.step#AdamW.step", True, False, False),
        ("MmBackward0", False, True, False)]
    assert ops[0].shapes == [[2048, 4096], [4096, 32000]] and ops[0].corr == 7
    assert [(k.name[:6], k.kind, k.corr, k.end - k.start) for k in kernels] == [
        ("nvjet_", "kernel", 7, 80), ("Memcpy", "memcpy", 7, 10), ("Memset", "memcpy", 7, 2)]
