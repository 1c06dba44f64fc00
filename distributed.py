"""distributed.py -- the FSDP2 plumbing behind `em_train.py --fsdp`, kept out of the loop's way.

  torchrun --nproc_per_node 8 em_train.py --fsdp --model Qwen2.5-7B --dtype bf16 ...

What --fsdp changes (everything else in em_train.py reads the same with or without it):
  - every decoder layer and then the whole model are sharded with torch's FSDP2 `fully_shard`
    over all ranks (NCCL on GPUs, gloo on CPUs, which is how the tests run it);
  - each rank explores its own share of the iteration's queries (query i goes to rank
    i % world), so whitening, which is per query, stays local;
  - while sampling, the parameters are gathered once and kept whole (`gathered`): ranks
    decode different numbers of steps, and per-step all-gathers would deadlock;
  - the M-step pads every rank to the same number of optimiser steps and micro-batches with
    zero-weight passes, because each backward is a collective; FSDP averages the gradients;
  - rank 0 gathers the rollouts and evaluation samples, writes every file, and saves a full
    (unsharded) checkpoint that plain transformers loads.
Not done here: tensor parallelism, a separate inference engine, sharded (distributed)
checkpoints. Gathering whole parameters for sampling needs the unsharded model to fit on one
device (a 7B model in bf16 is ~15 GB).
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

ENABLED = False


def setup():
    """Start the process group from torchrun's environment; return (rank, world, device)."""
    global ENABLED
    if "RANK" not in os.environ:
        raise SystemExit("error: --fsdp needs a torchrun launch, e.g. torchrun --nproc_per_node 2 em_train.py --fsdp")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    ENABLED = True
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size(), f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model):
    """Whole parameters on every rank for the duration (sampling, evaluation)."""
    if not ENABLED:
        yield
        return
    mods = _fsdp_modules(model)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def is_main():
    return not ENABLED or dist.get_rank() == 0


def all_max(n):
    """The largest of an integer across ranks."""
    if not ENABLED:
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def gather(items):
    """Concatenate a list from every rank, in rank order, on every rank."""
    if not ENABLED:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    if ENABLED:
        dist.barrier()


def full_state(model, opt):
    """(model state dict, optimizer state dict), unsharded and on the CPU, on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer(model, opt, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def scalar(x):
    """A plain float from a tensor that may be a DTensor (grad norms under FSDP)."""
    return float(x.full_tensor()) if hasattr(x, "full_tensor") else float(x)
