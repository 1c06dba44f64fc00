"""The M-step loss against REINFORCE, clipping, masking, whitening; the loop end to end and
an exact resume."""
import json
import os

import pytest
import torch

import em_train as T
import model as M


def test_whitening():
    a = T.whiten([1.0, 0.0, 1.0, 0.0])
    assert a == pytest.approx([1, -1, 1, -1], abs=1e-5)
    assert T.whiten([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]            # all-equal rewards: no signal
    assert T.whiten([0.0, 0.0]) == [0.0, 0.0]
    assert sum(T.whiten([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-9)


def rollouts(tiny, tok, n=4, seed=0):
    prompts = [M.chat_prompt(tok, q) for q in ["What is 2+2?", "Name a prime.", "Hi", "Count to 3."]][:n]
    prefix = tok("Let's see.", add_special_tokens=False).input_ids
    outs = M.sample(tiny, tok, prompts, [prefix] * n, max_new_tokens=10, seed=seed, code=False)
    return prompts, outs


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("is_mode", ["surrogate", "weighted_nll"])
def test_on_policy_gradient_equals_reinforce(tiny, tok, is_mode):
    prompts, outs = rollouts(tiny, tok)
    adv = T.whiten([1.0, 0.0, 0.0, 1.0])
    masks = [torch.tensor(o.sampled) for o in outs]
    old = [torch.tensor(o.logprobs) for o in outs]
    n = int(sum(m.sum() for m in masks))
    logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs])
    total, units, st = T.ratio_term(logp, old, masks, adv, 0.2, is_mode, "token")
    assert units == n and st["ratio_max"] == pytest.approx(1.0, abs=1e-4) and st["clipped"] == 0
    g_ours = grads(tiny, total / units)
    logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs])
    reinforce = -sum(a * lp[m].sum() for a, lp, m in zip(adv, logp, masks)) / n
    g_ref = grads(tiny, reinforce)
    assert torch.allclose(g_ours, g_ref, atol=1e-5, rtol=1e-4)
    assert g_ref.abs().max() > 1e-4                                    # a real, non-zero gradient


def test_surrogate_clipping_zeroes_gradient_outside_range(tiny, tok):
    prompts, outs = rollouts(tiny, tok, n=2)
    masks = [torch.tensor(o.sampled) for o in outs]
    logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs])
    far = [torch.tensor(o.logprobs) - 1.0 for o in outs]                # ratio = e > 1.2 everywhere
    total, _, st = T.ratio_term(logp, far, masks, [1.0, -1.0], 0.2, "surrogate", "token")
    assert st["clipped"] == st["ratio_n"]
    assert grads(tiny, total).abs().max() == 0
    near = [torch.tensor(o.logprobs) - 0.1 for o in outs]               # ratio = 1.105: inside
    total, _, st = T.ratio_term(M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs]), near, masks,
                                [1.0, -1.0], 0.2, "surrogate", "token")
    assert st["clipped"] == 0 and grads(tiny, total).abs().max() > 0


def test_masked_tokens_get_no_gradient(tiny, tok):
    """Prefix tokens (and, the same way, execution output) are not in the ratio term."""
    prompts, outs = rollouts(tiny, tok, n=1)
    o = outs[0]
    mask = torch.tensor(o.sampled)
    assert (~mask).sum() > 0 and mask.sum() > 0
    lp = M.sequence_logprobs(tiny, prompts, [o.response_ids])[0]
    total, _, _ = T.ratio_term([lp], [torch.tensor(o.logprobs)], [mask], [1.0], 0.2, "surrogate", "token")
    (g,) = torch.autograd.grad(total, lp)
    assert torch.all(g[~mask] == 0) and torch.all(g[mask] != 0)


def test_decision_term_is_s_star_weighted_prefix_logprob(tiny, tok):
    prompt = M.chat_prompt(tok, "What is 2+2?")
    prefixes = {"cot": tok("Think.", add_special_tokens=False).input_ids,
                "code": tok("Code.", add_special_tokens=False).input_ids}
    with torch.no_grad():
        d = T.decision_term(tiny, [prompt], prefixes, [{"cot": 0.25, "code": 0.75}])
        lp = M.sequence_logprobs(tiny, [prompt, prompt], [prefixes["cot"], prefixes["code"]])
    assert d.item() == pytest.approx(-(0.25 * float(lp[0].sum()) + 0.75 * float(lp[1].sum())), rel=1e-5)


FAST = ["--model", "tiny", "--queries-per-iter", "2", "--k", "2", "--max-new-tokens", "8", "--eval-n", "2",
        "--eval-modes", "cot", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--decision-coef", "0.1"]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "checkpoint", "model.safetensors"))


def test_two_iterations_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    T.main(FAST + ["--iterations", "2", "--out", out])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("reward_mean", "q_hat_cot", "s_star_code", "loss_ratio", "loss_decision", "ratio_max", "clip_frac",
                "grad_norm", "sample_tokens_per_s", "eval_acc_cot", "seconds"):
        assert key in rows[0], key
    recs = [json.loads(x) for x in open(os.path.join(out, "explore-iter1.jsonl"))]
    assert len(recs) == 2 * 2 * 2 and sum(r["kept"] for r in recs) == 4
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint"))   # plain transformers loads it


@pytest.mark.parametrize("algo", ["rl", "sft"])
def test_baselines_run(tmp_path, algo):
    out = str(tmp_path / algo)
    T.main(FAST + ["--iterations", "1", "--algo", algo, "--eval-every", "0", "--out", out])
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).read())
    assert row["rollouts"] == 2 * 2 * 2 and ("loss_ratio" in row) == (algo == "rl")


def test_resume_matches_uninterrupted(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", a])
    T.main(FAST + ["--iterations", "1", "--eval-every", "0", "--out", b])      # "killed" after iteration 1
    T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", b, "--resume"])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = [json.loads(x) for x in open(os.path.join(a, "metrics.jsonl"))]
    rb = [json.loads(x) for x in open(os.path.join(b, "metrics.jsonl"))]
    assert [r["loss_ratio"] for r in ra] == [r["loss_ratio"] for r in rb]
    first = weights(a)
    T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", str(tmp_path / "c"), "--lr", "1e-2"])
    assert not all(torch.equal(first[k], weights(str(tmp_path / "c"))[k]) for k in first)   # training moves weights
