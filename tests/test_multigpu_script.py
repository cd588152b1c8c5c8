"""scripts/multigpu_check.py end to end on the CPU: 2 processes under torchrun, gloo, ``--size tiny``.

The script is the two-GPU check of DDP and FSDP2 on a small Llama with NF4 bases (docs/MULTI_GPU.md). Here its
whole path runs with gloo, so that the NCCL run is the same command with ``--device cuda``. The script checks
itself and exits 1 on any failed check; this file asserts the exit code, reads its results.json and results.csv,
and feeds its check function deliberately wrong numbers to show that each check can fail.

tests/test_distributed.py tests the layers under DDP and FSDP2 in detail (what the forward all-gathers, the
sharded state dict's keys, MixedPrecisionPolicy); this file tests the launcher-level run on a real model.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "multigpu_check.py")
WORLD = 2
# One launch: ~15 s on 2 shared CPU cores (interpreter and torch imports in 2 processes, 5 model builds,
# ~45 training steps of a 2-layer model, a checkpoint). The limit catches a hung collective, whose own timeout
# (gloo: 30 min) is far beyond CI's.
LAUNCH_TIMEOUT_S = 120
# The checks every run must report (a script that skipped one would otherwise still pass).
REQUIRED = {"same_build_on_every_rank", "same_nf4_bytes", "same_adapter_init", "single_finite", "ddp_finite",
            "fsdp2_finite", "fsdp2_resume_finite", "ddp_loss", "ddp_adapters", "fsdp2_loss", "fsdp2_adapters",
            "control_unsync_adapters", "fsdp2_loss_after_checkpoint", "fsdp2_nf4_sharded", "fsdp2_nf4_share",
            "dcp_restored_state", "control_fresh_state_differs", "resume_loss", "control_resume_without_optimizer",
            "ddp_nf4_in_forward", "fsdp2_nf4_in_forward", "fsdp2_resume_nf4_in_forward"}


def load_script():
    spec = importlib.util.spec_from_file_location("multigpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(out, *extra):
    """(returncode, output, results.json, results.csv rows, out dir) of one 2-process gloo run."""
    env = dict(os.environ)
    env.pop("LORA_OPS_BACKEND", None)  # auto: lora_ops' PyTorch reference on CPU tensors
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), SCRIPT,
           "--backend", "gloo", "--device", "cpu", "--size", "tiny", "--out", str(out), *extra]
    # A session of its own, so that a timeout ends torchrun's workers too, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    results = rows = None
    if (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
    if (out / "results.csv").exists():
        with open(out / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    return proc.returncode, output, results, rows, out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("multigpu"))


def failed_checks(results):
    return [(r["rank"], c) for r in results["ranks"] for c in r["checks"] if not c["passed"]]


def test_the_run_passes_every_check(launch):
    rc, output, results, _, _ = launch
    assert results is not None, f"no results.json; exit {rc}:\n{output[-6000:]}"
    assert failed_checks(results) == [], failed_checks(results)
    assert results["passed"] is True
    assert rc == 0, f"exit {rc} although every check passed:\n{output[-6000:]}"
    assert "PASSED: 0 failed check(s)" in output


def test_every_check_ran_on_every_rank(launch):
    _, output, results, _, _ = launch
    assert results is not None, output[-6000:]
    assert [r["rank"] for r in results["ranks"]] == list(range(WORLD))
    for r in results["ranks"]:
        names = [c["check"] for c in r["checks"]]
        assert len(names) == len(set(names))
        assert REQUIRED <= set(names), REQUIRED - set(names)
        # Not CUDA: no allocator-level memory check here.
        assert "fsdp2_model_memory_share" not in names


def test_run_as_configured(launch):
    _, output, results, _, _ = launch
    assert results is not None, output[-6000:]
    assert (results["world_size"], results["backend"], results["device"]) == (WORLD, "gloo", "cpu")
    assert (results["steps"], results["resume_steps"], results["dtype"]) == (10, 3, "float32")
    assert results["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for r in results["ranks"]:
        ph = r["phases"]
        for name in ("single", "ddp", "fsdp2"):
            assert len(ph[name]["losses"]) == 10, name
        assert len(ph["fsdp2"]["losses_after"]) == len(ph["fsdp2_resume"]["losses"]) == 3
        assert all(math.isfinite(v) for name in ph for v in ph[name]["losses"])
        # Global mean losses: the same on every rank.
        assert ph["ddp"]["losses"] == results["ranks"][0]["phases"]["ddp"]["losses"]


def test_fsdp2_holds_half_the_nf4_bytes_per_rank_and_ddp_all(launch):
    _, output, results, _, _ = launch
    assert results is not None, output[-6000:]
    held = []
    for r in results["ranks"]:
        ph = r["phases"]
        whole = ph["single"]["nf4_bytes"]["held"]
        assert ph["single"]["nf4_bytes"]["full"] == whole  # one process: no padding, nothing sharded
        assert ph["ddp"]["nf4_bytes"]["held"] == whole  # DDP replicates the base
        shards = ph["fsdp2"]["shards"]
        assert shards["not_sharded"] == [] and shards["n_tensors"] == 2 * 7 * 5  # 2 layers x 7 projections x 5
        assert shards["full"] == whole
        held.append(shards["held"])
    assert all(abs(h / whole - 1 / WORLD) <= 0.02 for h in held), (held, whole)
    assert sum(held) >= whole  # padding only adds


def test_results_csv(launch):
    _, output, results, rows, _ = launch
    assert rows is not None, output[-6000:]
    assert [(row["phase"], int(row["rank"])) for row in rows] == \
        [(p, r) for r in range(WORLD) for p in ("single", "ddp", "fsdp2", "fsdp2_resume")]
    for row in rows:
        assert float(row["tokens_per_s"]) > 0 and float(row["peak_mem_mib"]) > 0
        assert row["peak_mem_kind"].startswith("process peak RSS")  # labelled: not a per-phase figure on CPU
        assert row["model_alloc_mib"] == ""  # CUDA only


def test_checkpoint_removed_after_the_run(launch):
    rc, output, results, _, out = launch
    assert results is not None, output[-6000:]
    assert not (out / "checkpoint").exists()


# ---------------------------------------------------------------------------------------- the checks can fail

def good_inputs(mod):
    """rank_checks' inputs for one rank of a run where everything agrees, with adapters that moved."""
    args = mod.parse_args(["--out", "unused", "--device", "cpu", "--size", "tiny"])
    g = torch.Generator().manual_seed(0)
    init = {f"l{i}.lora_{w}": torch.randn(4, 3, generator=g) for i in range(2) for w in "AB"}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()}
    losses, after = [5.0 - 0.01 * i for i in range(10)], [4.9, 4.89, 4.88]
    state = {f"model/l{i}.weight": f"h{i}" for i in range(3)}
    state.update({"model/l0.weight.quant_map": "codebook", "optim/l0.lora_A/exp_avg": "m"})
    fresh = {k: ("codebook" if k.endswith("quant_map") else "zeroed-" + v) for k, v in state.items()}
    layers = {f"l{i}": f"bytes{i}" for i in range(2)}
    single = {"nf4_digest": "n", "adapter_digest": "a", "losses": losses, "losses_after": after,
              "layer_nf4": dict(layers),
              "adapters": trained, "control_unsync_adapters": {k: v + 0.5 for k, v in trained.items()},
              "nf4_bytes": {"held": 1000, "full": 1000}, "model_alloc_bytes": None}
    ddp = {"nf4_digest": "n", "adapter_digest": "a", "losses": list(losses), "adapters": copy.deepcopy(trained),
           "layer_nf4": dict(layers)}
    fsdp = {**copy.deepcopy(ddp), "losses_after": list(after), "model_alloc_bytes": None, "resharded": True,
            "shards": {"not_sharded": [], "n_tensors": 70, "held": 502, "full": 1000}, "saved_state": state}
    resume = {"losses": list(after), "adapters": copy.deepcopy(trained), "loaded_state": dict(state),
              "fresh_state": fresh, "layer_nf4": dict(layers)}
    control = {"losses": [4.9, 4.8, 4.7]}
    return [args, WORLD, single, init, ddp, fsdp, resume, control]


def failing(mod, inputs):
    return sorted(c["check"] for c in mod.rank_checks(*inputs) if not c["passed"])


def test_checks_pass_on_agreeing_numbers():
    mod = load_script()
    assert failing(mod, good_inputs(mod)) == []


@pytest.mark.parametrize("mutation, expected", [
    ("ddp adapter off by 1% of its update", ["ddp_adapters"]),
    ("fsdp2 loss off by 1e-3", ["fsdp2_loss"]),
    ("NaN in an fsdp2 adapter", ["fsdp2_adapters", "fsdp2_finite"]),
    ("control equals the reference", ["control_unsync_adapters"]),
    ("an NF4 tensor left whole", ["fsdp2_nf4_sharded"]),
    ("each rank holds 60% of the NF4 bytes", ["fsdp2_nf4_share"]),
    ("the DDP build quantized other bytes", ["same_nf4_bytes"]),
    ("the optimizer state not restored", ["dcp_restored_state"]),
    ("the fresh model already had the saved state", ["control_fresh_state_differs"]),
    ("a resumed loss off by 1e-5", ["resume_loss"]),
    ("the resume without optimizer state matches", ["control_resume_without_optimizer"]),
    ("FSDP2's all-gather rewrote a NaN pattern among the codes", ["fsdp2_nf4_in_forward"]),
    ("a DDP layer's forward never ran", ["ddp_nf4_in_forward"]),
    ("the resumed base differs", ["fsdp2_resume_nf4_in_forward"]),
])
def test_each_check_fails_on_wrong_numbers(mutation, expected):
    mod = load_script()
    args, world, single, init, ddp, fsdp, resume, control = inputs = good_inputs(mod)
    if mutation.startswith("ddp adapter"):
        k = "l1.lora_B"
        ddp["adapters"][k] = ddp["adapters"][k] + 0.01 * (single["adapters"][k] - init[k]).norm()
    elif mutation.startswith("fsdp2 loss"):
        fsdp["losses"][4] *= 1 + 1e-3
    elif mutation.startswith("NaN"):
        fsdp["adapters"]["l0.lora_A"][1, 1] = float("nan")
    elif mutation.startswith("control equals"):
        single["control_unsync_adapters"] = copy.deepcopy(single["adapters"])
    elif mutation.startswith("an NF4 tensor"):
        fsdp["shards"]["not_sharded"] = ["model.layers.0.self_attn.q_proj.weight_absmax"]
    elif mutation.startswith("each rank holds"):
        fsdp["shards"]["held"] = 600
    elif mutation.startswith("the DDP build"):
        ddp["nf4_digest"] = "other"
    elif mutation.startswith("the optimizer state"):
        resume["loaded_state"]["optim/l0.lora_A/exp_avg"] = "zeroed-m"
    elif mutation.startswith("the fresh model"):
        resume["fresh_state"] = dict(fsdp["saved_state"])
    elif mutation.startswith("a resumed loss"):
        resume["losses"][2] *= 1 + 1e-5
    elif mutation.startswith("the resume without"):
        control["losses"] = list(fsdp["losses_after"])
    elif mutation.startswith("FSDP2's all-gather"):
        fsdp["layer_nf4"]["l1"] = "canonicalized"
    elif mutation.startswith("a DDP layer"):
        del ddp["layer_nf4"]["l0"]
    elif mutation.startswith("the resumed base"):
        resume["layer_nf4"]["l0"] = "other"
    assert failing(mod, inputs) == sorted(expected), mutation


def test_nf4_left_whole_fails_only_the_sharding_checks(tmp_path):
    """--nf4-whole (what a torch whose fully_shard refuses integer Parameters gets on its own, as torch 2.11 on the
    H200s did): FSDP2 trains and resumes with the NF4 tensors whole on every rank; only the two NF4 sharding checks
    fail, saying why, and the run exits 1."""
    rc, output, results, _, _ = _launch(tmp_path, "--nf4-whole")
    assert results is not None, f"no results.json; exit {rc}:\n{output[-6000:]}"
    assert sorted({c["check"] for _, c in failed_checks(results)}) == ["fsdp2_nf4_sharded", "fsdp2_nf4_share"]
    assert rc == 1 and results["passed"] is False and results["nf4_whole"] == "asked for (--nf4-whole)"
    for r in results["ranks"]:
        checks = {c["check"]: c for c in r["checks"]}
        assert checks["fsdp2_nf4_share"]["value"] == pytest.approx(1.0)
        assert "left whole on every rank" in checks["fsdp2_nf4_sharded"]["what"]


def test_float_storage_run_passes_every_check(tmp_path):
    """--quant-storage bfloat16 (what the script picks where fully_shard refuses uint8 Parameters, as torch 2.11's
    does): every NF4 tensor is a float Parameter, FSDP2 shards all of them, every forward reads the unwrapped
    build's bytes, and the sharded checkpoint (held as stored, bf16) restores them bit for bit."""
    rc, output, results, _, _ = _launch(tmp_path, "--quant-storage", "bfloat16")
    assert results is not None, f"no results.json; exit {rc}:\n{output[-6000:]}"
    assert failed_checks(results) == [], failed_checks(results)
    assert rc == 0 and results["passed"] is True and results["nf4_whole"] is None
    assert (results["quant_storage"], results["quant_storage_why"]) == ("bfloat16", "asked for (--quant-storage)")
    for r in results["ranks"]:
        shards = r["phases"]["fsdp2"]["shards"]
        assert shards["not_sharded"] == [] and shards["n_tensors"] == 2 * 7 * 5
        assert {c["check"] for c in r["checks"]} >= REQUIRED


def test_default_storage_follows_fully_shard(launch):
    """auto: uint8 where this torch's fully_shard takes integer Parameters (torch 2.13 in CI), and says so."""
    _, output, results, _, _ = launch
    assert results is not None, output[-6000:]
    assert results["quant_storage"] == "uint8"
    assert results["quant_storage_why"] == "this torch's fully_shard shards uint8 Parameters"
