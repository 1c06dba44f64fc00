"""em_train.py --fsdp on two CPU ranks (gloo): sharded sampling, padded M-step, full
checkpoints, resume; every tensor handed to a collective checked against the backend's device.
The same code path runs on GPUs with NCCL. Mixed precision and the collective-device rule are
also checked in one process (a world of one)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import distributed as D
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--fsdp", "--model", "tiny", "--queries-per-iter", "3", "--k", "2", "--max-new-tokens", "8",
        "--eval-n", "3", "--eval-modes", "cot", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
        "--decision-coef", "0.1", "--decision-queries", "all",   # all: rewards of a random model are all 0
        "--dtype", "bf16"]                                        # one path on every machine (auto picks per CPU)
needs_dist = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

# Run em_train.main() with every torch.distributed collective wrapped: each tensor handed to one
# must be on D.collective_device() (NCCL: the rank's GPU, gloo: the CPU), or the rank dies.
CHECKED_ENTRY = '''
import atexit, json, os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import distributed as D

NAMES = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
         "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv"]
seen = {{}}

def tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors(y)

def checked(name, fn):
    def collective(*args, **kwargs):
        want = D.collective_device()
        for t in tensors([args, list(kwargs.values())]):
            assert t.device == want, f"{{name}} was handed a tensor on {{t.device}}; the backend needs {{want}}"
            seen[name] = seen.get(name, 0) + 1
        return fn(*args, **kwargs)
    return collective

for name in NAMES:
    wrapped = checked(name, getattr(c10d, name))
    setattr(c10d, name, wrapped)
    setattr(dist, name, wrapped)
atexit.register(lambda: json.dump(seen, open(os.path.join({log!r}, "rank" + os.environ["RANK"] + ".json"), "w")))
import em_train
em_train.main(sys.argv[1:])
'''


def torchrun(tmp_path, *args):
    entry = tmp_path / "checked_em_train.py"
    log = tmp_path / "collectives"
    log.mkdir(exist_ok=True)
    entry.write_text(CHECKED_ENTRY.format(root=ROOT, log=str(log)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(entry), *ARGS, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()                  # torchrun passes SIGTERM on to the ranks: a hang leaves nothing behind
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail("em_train --fsdp hung (ranks running different collectives?):\n" + stderr[-3000:])
    assert proc.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        seen = json.load(open(log / f"rank{rank}.json"))
        assert seen.get("all_reduce", 0) > 0, seen          # all_max ran through the checker
    return stdout


def weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


@needs_dist
def test_fsdp_two_ranks_train_checkpoint_and_resume(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torchrun(tmp_path, "--iterations", "2", "--out", a)
    rows = [r for r in map(json.loads, open(os.path.join(a, "metrics.jsonl"))) if r["iteration"] > 0]  # 0: before training
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["queries"] == 3 for r in rows)
    recs = [json.loads(x) for x in open(os.path.join(a, "explore-iter1.jsonl"))]
    assert len(recs) == 3 * 2 * 2 and len({r["query_id"] for r in recs}) == 3   # both ranks' rollouts
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(a, "checkpoint"))      # a full, plain checkpoint
    init = M.tiny_model(M.load_tokenizer("tiny"))
    trained = weights(a)
    assert any(not torch.equal(trained[k], v) for k, v in init.state_dict().items() if k in trained)
    torchrun(tmp_path, "--iterations", "1", "--out", b)
    torchrun(tmp_path, "--iterations", "2", "--out", b, "--resume")
    wb = weights(b)
    assert all(torch.equal(trained[k], wb[k]) for k in trained)


@needs_dist
def test_fsdp_bf16_keeps_fp32_master_weights_with_grad_ckpt_and_a_bf16_export(tmp_path):
    out = str(tmp_path / "c")
    torchrun(tmp_path, "--iterations", "1", "--out", out, "--dtype", "bf16", "--grad-ckpt", "--save-dtype", "bf16",
             "--lr", "1e-6")
    trained = weights(out)
    assert {v.dtype for v in trained.values()} == {torch.float32}           # the master copy, for resume
    init = M.tiny_model(M.load_tokenizer("tiny"), dtype=torch.bfloat16).float().state_dict()
    changed = sum(int((trained[k] != init[k]).sum()) for k in trained)
    assert changed > 0.2 * sum(v.numel() for v in trained.values())     # lr 1e-6 moved fp32 weights
    from transformers import AutoModelForCausalLM
    export = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint", "export-bf16"))
    assert export.dtype == torch.bfloat16
    assert torch.equal(export.lm_head.weight, trained["lm_head.weight"].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------
# In one process
# ---------------------------------------------------------------------------------------
def test_the_collective_device_is_the_backends():
    assert D.collective_device("nccl").type == "cuda"          # NCCL moves only GPU tensors
    assert D.collective_device("cpu:gloo,cuda:nccl").type == "cuda"
    assert D.collective_device("gloo") == torch.device("cpu")


@pytest.mark.parametrize("cpu_offload,backend", [(False, "nccl"), (True, "cpu:gloo,cuda:nccl")])
def test_setup_on_gpus_gives_cpu_tensors_a_backend_when_offloading(monkeypatch, cpu_offload, backend):
    """On GPUs, --cpu-offload leaves the gradients on the CPU, and clipping all-reduces their
    norms there: the group must hold gloo beside NCCL, or it fails with 'No backend type
    associated with device type cpu' on more than one GPU. And no ten-minute NCCL timeout."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("device", device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(D, "collective_device", lambda backend=None: torch.device("cuda", 1))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(D, "ENABLED", False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.setup(cpu_offload) == (1, 2, "cuda:1")
    assert seen["backend"] == backend and seen["device_id"] == torch.device("cuda", 1) == seen["device"]
    assert seen["timeout"].total_seconds() >= 3600


def test_all_max_hands_its_collective_the_backends_device(monkeypatch):
    """The NCCL failure, without a GPU: make the backend's device one that is not the CPU (meta)
    and see what all_max hands to all_reduce. A CPU tensor here is the 'No backend type
    associated with device type cpu' of an NCCL-only group."""
    handed = []

    class Handed(Exception):
        pass

    def all_reduce(t, *args, **kwargs):
        handed.append(t.device)
        raise Handed

    monkeypatch.setattr(D, "ENABLED", True)
    monkeypatch.setattr(D, "collective_device", lambda backend=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Handed):
        D.all_max(3)
    assert handed == [torch.device("meta")]


@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    monkeypatch.setattr(D, "ENABLED", True)
    yield
    dist.destroy_process_group()


@needs_dist
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_mixed_precision_fp32_master_bf16_compute_and_a_1e6_step_moves_the_weights(world_of_one, tok,
                                                                                        cpu_offload):
    model = M.tiny_model(tok, dtype=torch.bfloat16)            # as if loaded in bf16: shard makes it fp32
    before = {k: v.float().clone() for k, v in model.state_dict().items()}
    D.shard(model, torch.bfloat16, cpu_offload)
    assert {p.dtype for p in model.parameters()} == {torch.float32}           # master weights
    computed = []
    model.model.layers[0].mlp.register_forward_hook(lambda mod, i, o: computed.append(mod.up_proj.weight.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    model.train()
    logp = M.sequence_logprobs(model, [[1, 2, 3, 4]], [[5, 6, 7]])
    (-logp[0].sum()).backward()
    assert computed == [torch.bfloat16]                                      # matrix products in bf16
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    nonzero = {n: p.grad.full_tensor() != 0 for n, p in model.named_parameters()}
    opt.step()
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}
    state, _ = D.full_state(model, opt)
    assert {v.dtype for v in state.values()} == {torch.float32}
    moved = sum(int(((state[n] != before[n]) & g).sum()) for n, g in nonzero.items())
    total = sum(int(g.sum()) for g in nonzero.values())
    assert moved > 0.9 * total, (moved, total)        # pure bf16 moves ~2% of them at lr 1e-6 (issue 9)
