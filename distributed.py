"""distributed.py -- the FSDP2 plumbing behind `em_train.py --fsdp`, kept out of the loop's way.

  torchrun --nproc_per_node 8 em_train.py --fsdp --model Qwen2.5-7B --dtype bf16 ...

What --fsdp changes (everything else in em_train.py reads the same with or without it):
  - every decoder layer and then the whole model are sharded with torch's FSDP2 `fully_shard`
    over all ranks (NCCL on GPUs, with gloo beside it for --cpu-offload's CPU gradients;
    gloo on CPUs, which is how the tests run it);
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
import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

ENABLED = False


def collective_device(backend=None):
    """The device every tensor handed to a collective must live on: NCCL moves only CUDA
    tensors (the rank's own GPU), gloo only CPU ones here. The one place this rule lives."""
    backend = str(backend or dist.get_backend())
    if "nccl" in backend:                              # "nccl", or "cpu:gloo,cuda:nccl" (setup)
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def setup(cpu_offload=False):
    """Start the process group from torchrun's environment; return (rank, world, device).
    With cpu_offload the gradients are CPU tensors, and clipping all-reduces their norms where
    they are: NCCL moves only CUDA tensors, so CPU ones go through gloo in the same group.
    The timeout is two hours, not NCCL's ten minutes: ranks wait in a collective while others
    finish longer rollouts, and while rank 0 alone writes a 7B checkpoint (~90 GB)."""
    global ENABLED
    if "RANK" not in os.environ:
        raise SystemExit("error: --fsdp needs a torchrun launch, e.g. torchrun --nproc_per_node 2 em_train.py --fsdp")
    timeout = datetime.timedelta(hours=2)
    if torch.cuda.is_available():
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(gpu)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cpu_offload else "nccl", device_id=gpu,
                                timeout=timeout)          # bound to this rank's GPU
    else:
        dist.init_process_group("gloo", timeout=timeout)
    ENABLED = True
    device = collective_device()
    return dist.get_rank(), dist.get_world_size(), str(device)


def shard(model, compute_dtype=torch.float32, cpu_offload=False):
    """FSDP2 over every decoder layer, then the whole model, with mixed precision the standard
    way: the sharded parameters (what AdamW updates, and its state) stay fp32 -- the model is
    cast to fp32 here whatever it was loaded in -- the all-gathered copies that the forward and
    backward use are `compute_dtype`, and gradients are reduce-scattered in fp32.
    cpu_offload keeps the shards, their gradients and the optimizer state in CPU memory (the
    optimizer step runs on the CPU): how 7B trains on one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    model.float()
    mesh = init_device_mesh(collective_device().type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
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
    t = torch.tensor([n], dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


def finish():
    """End the process group (left open, NCCL warns at every exit)."""
    global ENABLED
    if ENABLED:
        dist.destroy_process_group()
        ENABLED = False


def full_state(model, opt):
    """(model state dict, optimizer state dict), unsharded and on the CPU, on rank 0 only; the
    weights in fp32 (the master copy), which is what an exact resume needs."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return weights, get_optimizer_state_dict(model, opt, options=options)


def load_optimizer(model, opt, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def scalar(x):
    """A plain float from a tensor that may be a DTensor (grad norms under FSDP)."""
    return float(x.full_tensor()) if hasattr(x, "full_tensor") else float(x)


# ---------------------------------------------------------------------------------------
# The memory plan: what a run holds on each GPU, from the model's shape alone
# ---------------------------------------------------------------------------------------
GiB = 2 ** 30
SHAPES = {   # from the public config.json of each model
    "Qwen2.5-0.5B": dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, tied=True),
    "Qwen2.5-1.5B": dict(vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, tied=True),
    "Qwen2.5-7B": dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, tied=False),
}


def shape_of(config):
    """The plan's shape from a config.json dict (Qwen2 has biases on q, k and v; Llama none)."""
    return dict(vocab=config["vocab_size"], hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
                intermediate=config["intermediate_size"], tied=config.get("tie_word_embeddings", False),
                qkv_bias=config.get("model_type") == "qwen2" or config.get("attention_bias", False))


def n_params(s):
    h, kv = s["hidden"], s["kv_heads"] * s["hidden"] // s["heads"]
    bias = h + 2 * kv if s.get("qkv_bias", True) else 0
    layer = 2 * h * h + 2 * h * kv + bias + 3 * h * s["intermediate"] + 2 * h
    return s["vocab"] * h * (1 if s["tied"] else 2) + s["layers"] * layer + h


def memory_plan(s, world=1, dtype="bf16", micro_batch=4, prompt_len=200, new_tokens=256, sample_batch=32,
                grad_ckpt=False, fsdp=False, cpu_offload=False, decision=True):
    """Bytes (in GiB) one GPU holds, term by term, for em_train.py with these flags.

    dtype: "fp32" (everything fp32), "bf16" (fp32 master weights, gradients and AdamW state,
    bf16 matrix products), or "pure-bf16" (everything bf16: what --dtype bf16 did before issue
    9, kept to check the plan against the measurement made then). Sequences in the M-step are
    prompt + an 8-token forcing prefix + new_tokens long; with `decision`, each micro-batch also
    runs the decision term over two prefixes of up to micro_batch prompts. Every sequence is
    counted whole: teacher forcing packs them behind the opening their prompts share
    (model.sequence_logprobs), so this is an upper bound, and the packed row's L x L attention mask
    (about 5 MB a layer as a bf16 bias at L = 1536) is left out. Not counted: the CUDA
    context (~0.5 GiB), the caching allocator's reserved-but-free blocks, NCCL buffers; leave
    10-15% of the card for them. Activations are counted for HF's eager PyTorch layers with SDPA
    attention (no seq x seq matrix of scores kept)."""
    N, h, L, i, V = n_params(s), s["hidden"], s["layers"], s["intermediate"], s["vocab"]
    kv = s["kv_heads"] * h // s["heads"]
    master, c = {"fp32": (4, 4), "bf16": (4, 2), "pure-bf16": (2, 2)}[dtype]
    fsdp = fsdp or world > 1 or cpu_offload
    on_gpu = 0 if cpu_offload else 1 / world          # the share of the fp32 state this GPU keeps
    p = {"params_B": N / 1e9,
         "weights": N * master * on_gpu, "gradients": N * master * on_gpu, "optimizer": 2 * N * master * on_gpu,
         "optimizer_step_temp": N * master * on_gpu}   # foreach AdamW's sqrt(v) buffer, alive during step()
    # The compute-dtype copy of the weights: under FSDP the whole model while sampling (gathered)
    # and the root (embeddings, head) plus about two layers in training. In one process with
    # bf16 compute the sampler's copy holds all of it; in training autocast (its cache off)
    # casts each weight where it is used and backward keeps the casts of the layers whose
    # activations it keeps: all of them, or with activation checkpointing the head and the
    # layer being recomputed (two, counted like FSDP's prefetch).
    layer = (N - V * h * (1 if s["tied"] else 2)) / L
    whole = N * c if fsdp or c != master else 0
    p["compute_copy_training"] = (V * h * (1 if s["tied"] else 2) + 2 * layer) * c if fsdp or (grad_ckpt and whole) \
        else whole
    p["compute_copy_sampling"] = whole
    seq = prompt_len + 8 + new_tokens
    tokens = micro_batch * seq + (2 * micro_batch * (prompt_len + 8) if decision else 0)
    per_token_layer = 2 * (4 + 2 * c) * h + c * (3 * h + 2 * kv) + 4 * c * i   # 2 RMSNorms, attention, SwiGLU
    if grad_ckpt:          # each layer keeps its input; one layer's activations exist again in backward
        per_token = L * c * h + per_token_layer
    else:
        per_token = L * per_token_layer
    # the head's output, the copy of its real (unpadded) positions and their gradient, in the compute
    # dtype, and one chunk of 256 positions log-softmaxed in fp32 (model.sequence_logprobs)
    logits = micro_batch * (new_tokens + 8) * V * 3 * c + 256 * V * 12
    p["activations"] = tokens * per_token + logits
    # model.SlotCache: per row the prompt, the forcing prefix, the new tokens, one output block
    # (model.sample's estimate: 400 // 2 + 48 tokens; longer outputs grow it) and a scratch column
    columns = prompt_len + 8 + new_tokens + (400 // 2 + 48) + 1
    p["kv_cache"] = sample_batch * columns * L * 2 * kv * c
    p["prefill_temp"] = sample_batch * prompt_len * 3 * c * i   # SwiGLU intermediates of the prompt forward
    state = p["weights"] + p["gradients"] + p["optimizer"]
    p["peak_training"] = state + max(p["compute_copy_training"] + p["activations"], p["optimizer_step_temp"])
    sampling = p["weights"] + p["compute_copy_sampling"] + p["kv_cache"] + p["prefill_temp"]
    p["peak_sampling_first"] = sampling                       # iteration 1: no gradients or AdamW state yet
    p["peak_sampling"] = sampling + p["gradients"] + p["optimizer"]   # later: both stay allocated
    p["host"] = 4 * N * master / world if cpu_offload else 0      # shards, gradients, AdamW state (per-tensor step on CPU)
    return {k: v if k == "params_B" else v / GiB for k, v in p.items()}


FITS = [   # (what, flags, world, memory_plan keywords); em_train.py checkpoints activations by default
    ("1 GPU", "--dtype bf16 --no-grad-ckpt", 1, {}),
    ("1 GPU", "--dtype bf16", 1, {"grad_ckpt": True}),
    ("1 GPU", "torchrun --nproc_per_node 1 ... --fsdp --cpu-offload --dtype bf16", 1,
     {"cpu_offload": True, "grad_ckpt": True}),
    ("8 GPUs", "torchrun --nproc_per_node 8 ... --fsdp --dtype bf16 --no-grad-ckpt", 8, {}),
    ("8 GPUs", "torchrun --nproc_per_node 8 ... --fsdp --dtype bf16", 8, {"grad_ckpt": True}),
]


def plan_table():
    """The README's table: one GPU, --dtype bf16, em_train.py's defaults; then what fits 7B."""
    terms = ["weights", "gradients", "optimizer", "optimizer_step_temp", "activations", "kv_cache",
             "peak_training", "peak_sampling"]
    plans = {name: memory_plan(s, grad_ckpt=True) for name, s in SHAPES.items()}
    lines = ["| GiB, 1 GPU, `--dtype bf16`, defaults | " + " | ".join(plans) + " |", "|---" * (len(plans) + 1) + "|",
             "| parameters | " + " | ".join(f"{p['params_B']:.2f} B" for p in plans.values()) + " |"]
    lines += [f"| {t.replace('_', ' ')} | " + " | ".join(f"{p[t]:.1f}" for p in plans.values()) + " |" for t in terms]
    lines += ["", "| Qwen2.5-7B | flags | GiB per GPU, training | sampling | host memory |", "|---|---|---|---|---|"]
    for what, flags, world, kw in FITS:
        p = memory_plan(SHAPES["Qwen2.5-7B"], world=world, **kw)
        lines.append(f"| {what} | `{flags}` | {p['peak_training']:.1f} | {p['peak_sampling']:.1f} | "
                     f"{p['host']:.0f} |" if p["host"] else
                     f"| {what} | `{flags}` | {p['peak_training']:.1f} | {p['peak_sampling']:.1f} | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Memory plan of em_train.py for Qwen2.5 0.5B / 1.5B / 7B.")
    ap.add_argument("--plan", action="store_true", help="print the table (the README's)")
    if ap.parse_args().plan:
        print(plan_table())
    else:
        ap.print_help()
