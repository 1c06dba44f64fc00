"""em_train.py --fsdp on two CPU ranks (gloo): sharded sampling, padded M-step, full
checkpoints, resume. The same code path runs on GPUs with NCCL."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--fsdp", "--model", "tiny", "--queries-per-iter", "3", "--k", "2", "--max-new-tokens", "8",
        "--eval-n", "3", "--eval-modes", "cot", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
        "--decision-coef", "0.1"]


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "em_train.py"), *ARGS, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp_two_ranks_train_checkpoint_and_resume(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torchrun("--iterations", "2", "--out", a)
    rows = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["queries"] == 3 for r in rows)
    recs = [json.loads(x) for x in open(os.path.join(a, "explore-iter1.jsonl"))]
    assert len(recs) == 3 * 2 * 2 and len({r["query_id"] for r in recs}) == 3   # both ranks' rollouts
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(a, "checkpoint"))      # a full, plain checkpoint
    import model as M
    init = M.tiny_model(M.load_tokenizer("tiny"))
    trained = weights(a)
    assert any(not torch.equal(trained[k], v) for k, v in init.state_dict().items() if k in trained)
    torchrun("--iterations", "1", "--out", b)
    torchrun("--iterations", "2", "--out", b, "--resume")
    wb = weights(b)
    assert all(torch.equal(trained[k], wb[k]) for k in trained)
