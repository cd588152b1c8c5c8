"""Data-parallel training of a small QLoRA model under DDP and FSDP2: the worker of tests/test_distributed.py.

Run as a script it starts ``--world`` processes (torch.multiprocessing.spawn, MASTER_ADDR=127.0.0.1 and a free
port), each of which trains the model of ``build_model`` on its slice of the global batch of ``global_batch``,
once under DDP and once under FSDP2 (``fully_shard``), and writes what it saw to ``<out>/rank<r>.pt``. The
backend follows the device: NCCL on CUDA (one GPU per rank), gloo on CPU. The test imports ``build_model``,
``global_batch`` and ``train`` to compute the one-process result on the whole global batch.

Everything here is deterministic given the seeds, so each rank builds the very same model and batch.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))

# in, hidden, out: primes and odd sizes, so neither the NF4 blocks (64 and 32) nor the world size divide them.
IN_F, HID_F, OUT_F = 67, 45, 29
GLOBAL_BATCH = 12  # split evenly over 2 ranks (6 rows each), so DDP's and FSDP's mean equal the global mean
STEPS = 3
LR = 0.2


class Net(nn.Module):
    """QLoRALinear (double-quantized, blocksize 64) -> GELU -> QLoRALinear (plain absmax, blocksize 32)."""

    def __init__(self):
        super().__init__()
        from lora_ops import QLoRALinear

        self.fc1 = QLoRALinear.from_linear(nn.Linear(IN_F, HID_F), r=3, lora_alpha=6, blocksize=64,
                                           double_quant=True)
        self.fc2 = QLoRALinear.from_linear(nn.Linear(HID_F, OUT_F), r=5, lora_alpha=5, blocksize=32,
                                           double_quant=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def build_model(device="cpu") -> Net:
    """The same model on every call: seeded weights; B random (not PEFT's zeros) so A gets gradients at once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = Net()
        with torch.no_grad():
            for layer in (model.fc1, model.fc2):
                layer.lora_B.normal_(0.0, 0.3)
    return model.to(device)


def global_batch(device="cpu"):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(GLOBAL_BATCH, IN_F, generator=g)
    y = torch.randn(GLOBAL_BATCH, OUT_F, generator=g)
    return x.to(device), y.to(device)


def lora_params(model):
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


def train(model, x, y, steps=STEPS, lr=LR):
    """SGD with momentum on the LoRA parameters; the loss is the mean over the rows given."""
    opt = torch.optim.SGD(lora_params(model), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def lora_state(model):
    """{name: full fp32 CPU tensor} of the LoRA parameters (all-gathering DTensors)."""
    out = {}
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n.replace("module.", "")] = t.detach().float().cpu().clone()
    return out


def nf4_tensors(layer):
    """{param name: CPU copy} of a QLoRALinear's NF4 tensors as its forward sees them."""
    from lora_ops.modules import _NF4_PARAMS

    return {n: t.detach().cpu().clone() for n, t in zip(_NF4_PARAMS, layer.nf4_weight.tensors()) if t is not None}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the runs

def run_ddp(rank, world, device, x, y):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    train(ddp, x.chunk(world)[rank], y.chunk(world)[rank])
    return {"lora": lora_state(model)}


def _shard_report(model):
    """Per NF4 parameter: full bytes, this rank's bytes (local shard, and its padded storage), placement."""
    from torch.distributed.tensor import DTensor

    from lora_ops import QLoRALinear
    from lora_ops.modules import _NF4_PARAMS

    rows = {}
    for lname, layer in model.named_modules():
        if not isinstance(layer, QLoRALinear):
            continue
        for pname in _NF4_PARAMS:
            p = layer._parameters[pname]
            if p is None:
                continue
            is_dt = isinstance(p, DTensor)
            local = p.to_local() if is_dt else p
            rows[f"{lname}.{pname}"] = {
                "dtensor": is_dt,
                "placements": [str(pl) for pl in p.placements] if is_dt else None,
                "full_bytes": p.numel() * p.element_size(),
                "local_bytes": local.numel() * local.element_size(),
                "storage_bytes": local.untyped_storage().nbytes(),
            }
    return rows


def run_fsdp(rank, world, device, x, y):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world,))
    model = build_model(device)
    original = {name: nf4_tensors(layer) for name, layer in (("fc1", model.fc1), ("fc2", model.fc2))}
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    res = {"original": original, "shards": _shard_report(model),
           "buffers": [n for n, _ in model.named_buffers()]}

    # state_dict() of the sharded model: bitsandbytes' keys, the NF4 tensors as DTensor shards. Gathered here;
    # the test compares them with the unsharded model's state dict.
    sd = model.state_dict()
    res["state_dict_types"] = {k: type(v).__name__ for k, v in sd.items()}
    res["state_dict_full"] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                              for k, v in sd.items()}
    try:  # plain (full) NF4 tensors cannot go into a sharded layer in place: must be refused, not ignored
        nf4_only = {k: v for k, v in build_model(device).state_dict().items() if ".weight" in k}
        model.load_state_dict(nf4_only, strict=False)
        res["full_into_sharded_error"] = None
    except RuntimeError as e:
        res["full_into_sharded_error"] = str(e)
    try:  # torch.distributed.checkpoint's helper resolves every key to an attribute path
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        res["dcp_full_state_dict"] = {k: v.detach().cpu().clone() for k, v in full.items()}
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        res["dcp_full_state_dict"] = f"{type(e).__name__}: {e}"

    # What fully_shard does with a buffer: nothing; every rank keeps all of it.
    probe = nn.Linear(8, 8).to(device)
    probe.register_buffer("kept", torch.arange(64, dtype=torch.uint8, device=device))
    fully_shard(probe, mesh=mesh)
    res["buffer_probe"] = {"type": type(probe.kept).__name__, "numel": probe.kept.numel(),
                           "weight_local_numel": probe.weight.to_local().numel()}

    # What the forward computes with: the all-gathered tensors, caught inside the layer's forward (FSDP's
    # pre-forward unshard runs before this hook, its post-forward reshard after the forward returns).
    seen = {}

    def catch(name):
        def hook(layer, args):
            if name not in seen:
                seen[name] = {"tensors": nf4_tensors(layer),
                              "dtensor": isinstance(layer._parameters["weight"], DTensor)}
        return hook

    handles = [layer.register_forward_pre_hook(catch(n)) for n, layer in (("fc1", model.fc1), ("fc2", model.fc2))]
    train(model, x.chunk(world)[rank], y.chunk(world)[rank])
    for h in handles:
        h.remove()
    res["gathered"] = seen
    res["resharded_after_training"] = all(isinstance(l._parameters["weight"], DTensor) for l in (model.fc1, model.fc2))
    res["lora"] = lora_state(model)
    res["dcp"] = dcp_round_trip(model, mesh, device, x)
    # A full-weight all-gather outside the forward: DTensor.full_tensor() of every NF4 parameter.
    res["full_tensor"] = {f"{ln}.{pn}": p.full_tensor().cpu() for ln, l in (("fc1", model.fc1), ("fc2", model.fc2))
                          for pn, p in l.named_parameters(recurse=False) if pn.startswith("weight")}
    return res


def gathered_state(model):
    """model.state_dict() with every DTensor all-gathered, on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


def dcp_round_trip(model, mesh, device, x):
    """Save the sharded (trained) model with torch.distributed.checkpoint; load it into a fresh sharded model
    whose NF4 shards, offset and LoRA weights were zeroed first; return what differs afterwards."""
    import tempfile

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    ckpt = [tempfile.mkdtemp(prefix="lora_ops_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(ckpt, src=0)
    dcp.save(model.state_dict(), checkpoint_id=ckpt[0])
    fresh = build_model(device)
    for layer in (fresh.fc1, fresh.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    sd = fresh.state_dict()
    with torch.no_grad():
        for p in fresh.parameters():
            p.to_local().zero_()
    want = gathered_state(model)
    zeroed = gathered_state(fresh)  # the control: before the load, the fresh model differs from the saved one
    dcp.load(sd, checkpoint_id=ckpt[0])
    fresh.load_state_dict(sd)
    got = gathered_state(fresh)
    with torch.no_grad():
        same_output = torch.equal(model(x), fresh(x))
    return {"keys_equal": sorted(want) == sorted(got),
            "differing": sorted(k for k in want if k in got and not (want[k].dtype == got[k].dtype
                                                                     and torch.equal(want[k], got[k]))),
            "same_output": same_output,
            "differing_before_load": sorted(k for k in want if not torch.equal(want[k], zeroed[k]))}


def run_fsdp_mixed_precision(rank, world, device, x, y):
    """MixedPrecisionPolicy(param_dtype=bf16) on the root alone casts the fp32 NF4 quant state: the layer must
    refuse it. Sharding each QLoRALinear first without a param_dtype keeps the state intact and trains."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    res = {}
    bad = build_model(device)
    fully_shard(bad, mesh=mesh, mp_policy=mp)
    try:
        bad(xs)
        res["root_only_error"] = None
    except TypeError as e:
        res["root_only_error"] = str(e)
    good = build_model(device)
    for layer in (good.fc1, good.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(good, mesh=mesh, mp_policy=mp)
    loss = F.mse_loss(good(xs).float(), ys)
    loss.backward()
    res["recipe_loss"] = float(loss.detach())
    res["recipe_grads_finite"] = all(p.grad is not None and bool(torch.isfinite(p.grad.full_tensor()).all())
                                     for p in lora_params(good))
    return res


def worker(rank, world, out_dir, port, device_type):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    result = {"backend": backend, "device": str(device)}
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        x, y = global_batch(device)
        result["ddp"] = run_ddp(rank, world, device, x, y)
        result["fsdp"] = run_fsdp(rank, world, device, x, y)
        result["fsdp_mp"] = run_fsdp_mixed_precision(rank, world, device, x, y)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks past every collective before either tears its group down: a gloo peer that closes its
        # connections while the other still talks to it can abort that process ("terminate called without an
        # active exception").
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for rank<r>.pt")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--device cuda --world {args.world} needs {args.world} GPUs, found {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(args.world, args.out, free_port(), args.device), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
