"""Scaling up: the memory plan against the model shapes and the measured 7B run, activation
checkpointing, the bf16 export, and the random-weight models the GPU check builds."""
import json
import os
import subprocess
import sys

import pytest
import torch

import distributed as D
import em_train as T
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "..", "shared", "gpu", "configs")


# ---------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(CONFIGS), reason="no ../shared/gpu/configs")
@pytest.mark.parametrize("name,fname", [("Qwen2.5-0.5B", "qwen2.5-0.5b.json"), ("Qwen2.5-7B", "qwen2.5-7b.json"),
                                        (None, "smollm2-135m.json")])
def test_plan_shapes_and_parameter_counts_match_the_configs(name, fname):
    from transformers import AutoConfig, AutoModelForCausalLM
    path = os.path.join(CONFIGS, fname)
    shape = D.shape_of(json.load(open(path)))
    if name:
        assert {k: shape[k] for k in D.SHAPES[name]} == D.SHAPES[name]
    with torch.device("meta"):                       # the real module tree, no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert D.n_params(shape) == sum(p.numel() for p in model.parameters())


def test_plan_against_the_measured_7b_run():
    """Issue 9 measured, 7B shape, one process, pure bf16, 4 queries x 4 rollouts (16 sampled
    together), 128 new tokens, micro-batch 2: peak 77 GiB, 14.7 GiB while sampling.

    Sampling (first iteration): bf16 weights 14.19 GiB + the KV cache of 16 rows (today's
    model.SlotCache: prompt + prefix + new tokens + one output block, 575 columns, 0.49 GiB; the
    sampler measured then held 2 x the ~190-token prompt, 0.32 GiB) + the prompt forward's SwiGLU
    intermediates (0.32 GiB) = 15.00 GiB, 2% over the 14.7 measured. Tolerance 5%.

    Training: the largest moment is the first optimizer step: bf16 weights + gradients + the two
    AdamW moments created in that step + foreach AdamW's sqrt(v) buffer = 5 x 14.19 = 70.9 GiB.
    The backward before it holds weights + gradients + ~9.1 GiB of activations (two ~330-token
    sequences, the decision term's four prompts, the fp32 logits); later steps add the AdamW
    state to that, 65.9 GiB, still below. The measurement is 6 GiB (8%) higher: memory that is
    not tensors of the run -- most likely the caching allocator's reserved-but-free blocks
    (freed activations whose segments the new AdamW buffers could not reuse); the issue does not
    say whether it read allocated or reserved memory. Tolerance: the plan within 10% below."""
    p = D.memory_plan(D.SHAPES["Qwen2.5-7B"], dtype="pure-bf16", micro_batch=2, prompt_len=190, new_tokens=128,
                      sample_batch=16)
    assert p["peak_sampling_first"] == pytest.approx(14.7, rel=0.05)
    assert 0.90 * 77 <= p["peak_training"] <= 77


def test_plan_terms_follow_the_flags():
    s = D.SHAPES["Qwen2.5-7B"]
    one, mixed = D.memory_plan(s, dtype="pure-bf16"), D.memory_plan(s, dtype="bf16")
    assert mixed["weights"] == pytest.approx(2 * one["weights"])             # fp32 master weights
    assert mixed["optimizer"] == pytest.approx(2 * mixed["weights"])          # two fp32 AdamW moments
    eight = D.memory_plan(s, world=8)
    assert eight["optimizer"] == pytest.approx(mixed["optimizer"] / 8)       # sharded
    assert eight["compute_copy_sampling"] == pytest.approx(mixed["weights"] / 2)   # gathered bf16 copy
    ckpt = D.memory_plan(s, grad_ckpt=True)
    assert ckpt["activations"] < mixed["activations"] / 3
    off = D.memory_plan(s, cpu_offload=True)
    assert off["weights"] == off["optimizer"] == 0 and off["host"] == pytest.approx(4 * mixed["weights"])
    assert D.memory_plan(s, sample_batch=64)["kv_cache"] == pytest.approx(2 * mixed["kv_cache"])
    assert D.memory_plan(s, micro_batch=8)["activations"] > 1.9 * mixed["activations"]


def test_plan_command_prints_the_three_models():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "distributed.py"), "--plan"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(n in out.stdout for n in D.SHAPES) and "--cpu-offload" in out.stdout


# ---------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------
def test_grad_ckpt_flag_gives_the_same_loss_and_gradients_and_recomputes(tok):
    assert T.parse_args([]).grad_ckpt and T.parse_args(["--grad-ckpt"]).grad_ckpt
    assert not T.parse_args(["--no-grad-ckpt"]).grad_ckpt
    model = M.tiny_model(tok, seed=3).train()
    calls, mlp = [], model.model.layers[0].mlp
    inner = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)
    mlp.forward = counted

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        calls.clear()
        logp = M.sequence_logprobs(model, [[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13]])
        loss = -(logp[0].sum() + 2 * logp[1].sum())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], len(calls)

    loss, grads, n = loss_and_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_c, grads_c, n_c = loss_and_grads()
    assert (n, n_c) == (1, 2)                          # the layer ran again in backward
    assert torch.equal(loss, loss_c)
    assert all(torch.allclose(g, gc, atol=1e-6, rtol=1e-5) for g, gc in zip(grads, grads_c))


# ---------------------------------------------------------------------------------------
# Checkpoints: fp32 for resume, a bf16 export on request
# ---------------------------------------------------------------------------------------
SMALL = ["--model", "tiny", "--queries-per-iter", "2", "--k", "2", "--max-new-tokens", "6", "--eval-every", "0",
         "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--save-dtype", "bf16"]


def _weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


def test_bf16_export_loads_as_bf16_and_resume_stays_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    T.main(SMALL + ["--iterations", "2", "--out", a])
    T.main(SMALL + ["--iterations", "1", "--out", b])
    T.main(SMALL + ["--iterations", "2", "--out", b, "--resume"])
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)               # the export did not disturb resume
    from transformers import AutoModelForCausalLM
    export = AutoModelForCausalLM.from_pretrained(os.path.join(a, "checkpoint", "export-bf16"))
    assert export.dtype == torch.bfloat16
    assert all(torch.equal(v, wa[k].to(torch.bfloat16)) for k, v in export.state_dict().items())
    assert M.load_tokenizer(os.path.join(a, "checkpoint", "export-bf16")).decode([42]) == M.load_tokenizer("tiny").decode([42])
    assert not os.path.exists(os.path.join(a, "checkpoint.tmp"))


def test_fp32_save_writes_no_export(tmp_path, tiny, tok):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-6)
    T.save_checkpoint(str(tmp_path), tiny, tok, opt, 1)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint", "export-bf16"))
    assert T.parse_args([]).save_dtype == "fp32"


# ---------------------------------------------------------------------------------------
# random:<config> models (what the GPU check builds)
# ---------------------------------------------------------------------------------------
def _small_config(folder, tok):
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": len(tok),
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id}
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return config


def test_random_model_from_a_config_with_its_own_or_the_embedded_tokenizer(tmp_path, tok):
    bare, with_tok = str(tmp_path / "bare"), str(tmp_path / "with_tok")
    _small_config(bare, tok)
    _small_config(with_tok, tok)
    tok.save_pretrained(with_tok)
    for folder in (bare, with_tok):
        model, t = M.load_model("random:" + folder, "bf16")
        assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2 and not model.training
        assert D.n_params(D.shape_of(json.load(open(os.path.join(folder, "config.json"))))) == \
            sum(p.numel() for p in model.parameters())
        assert t("What is 2+2?").input_ids == tok("What is 2+2?").input_ids
    m1, _ = M.load_model("random:" + os.path.join(bare, "config.json"))        # the json file itself
    m2, _ = M.load_model("random:" + bare)
    assert all(torch.equal(x, y) for x, y in zip(m1.parameters(), m2.parameters()))   # same seed on every rank


def test_random_model_missing_config_is_one_line():
    with pytest.raises(SystemExit) as e:
        M.load_model("random:/nonexistent/cfg")
    assert "random:" in str(e.value) and "/nonexistent/cfg" in str(e.value) and "\n" not in str(e.value)
