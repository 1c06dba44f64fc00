"""The M-step loss against REINFORCE, clipping, masking, whitening; the loop end to end and
an exact resume."""
import json
import os
import sys

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


@pytest.mark.parametrize("ratio", ["token", "sequence", "sequence_mean"])
@pytest.mark.parametrize("is_mode", ["surrogate", "weighted_nll"])
def test_on_policy_gradient_equals_reinforce(tiny, tok, is_mode, ratio):
    """On-policy (ratio 1, no clipping) both importance modes are REINFORCE with the unit --ratio
    names: sum of log-probs per token averaged over tokens, or per sequence (summed, or averaged
    over its tokens: sequence_mean) averaged over sequences."""
    prompts, outs = rollouts(tiny, tok)
    adv = T.whiten([1.0, 0.0, 0.0, 1.0])
    masks = [torch.tensor(o.sampled) for o in outs]
    old = [torch.tensor(o.logprobs) for o in outs]
    n = int(sum(m.sum() for m in masks)) if ratio == "token" else len(outs)
    logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs])
    total, units, st = T.ratio_term(logp, old, masks, adv, 0.2, is_mode, ratio)
    assert units == n and st["ratio_max"] == pytest.approx(1.0, abs=1e-4) and st["clipped"] == 0
    g_ours = grads(tiny, total / units)
    logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs])
    per_unit = {"token": torch.sum, "sequence": torch.sum, "sequence_mean": torch.mean}[ratio]
    reinforce = -sum(a * per_unit(lp[m]) for a, lp, m in zip(adv, logp, masks)) / n
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


def test_raw_decision_term_is_s_star_weighted_prefix_logprob(tiny, tok):
    prompt = M.chat_prompt(tok, "What is 2+2?")
    prefixes = {"cot": tok("Think.", add_special_tokens=False).input_ids,
                "code": tok("Code.", add_special_tokens=False).input_ids}
    with torch.no_grad():
        d = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form="raw"), prefixes, [{"cot": 0.25, "code": 0.75}])
        lp = M.sequence_logprobs(tiny, [prompt, prompt], [prefixes["cot"], prefixes["code"]])
    assert d.item() == pytest.approx(-(0.25 * float(lp[0].sum()) + 0.75 * float(lp[1].sum())), rel=1e-5)


FAST = ["--model", "tiny", "--queries-per-iter", "2", "--k", "2", "--max-new-tokens", "8", "--eval-n", "2",
        "--eval-modes", "cot", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--decision-coef", "0.1",
        "--dtype", "bf16"]                 # what auto picks where bf16 is native, on every machine


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "checkpoint", "model.safetensors"))


def test_two_iterations_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    T.main(FAST + ["--iterations", "2", "--out", out, "--eval-modes", "autonomous", "cot"])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [0, 1, 2]            # 0: the untrained model, evaluated only
    assert "eval_acc_cot" in rows[0] and "reward_mean" not in rows[0]
    for key in ("reward_mean", "q_hat_cot", "s_star_code", "loss_ratio", "loss_decision", "ratio_max", "clip_frac",
                "grad_norm", "sample_tokens_per_s", "eval_acc_cot", "eval_code_rate_compute", "seconds"):
        assert key in rows[1], key
    recs = [json.loads(x) for x in open(os.path.join(out, "explore-iter1.jsonl"))]
    assert len(recs) == 2 * 2 * 2 and sum(r["kept"] for r in recs) == 4
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint"))   # plain transformers loads it


@pytest.mark.parametrize("algo", ["rl", "sft"])
def test_baselines_run(tmp_path, algo):
    out = str(tmp_path / algo)
    T.main(FAST + ["--iterations", "1", "--algo", algo, "--eval-every", "0", "--out", out])
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).read())
    assert row["rollouts_sampled"] == 2 * (2 * 2 + 2) and ("loss_ratio" in row) == (algo == "rl")


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
    T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", str(tmp_path / "c"), "--lr", "1e-2",
                   "--decision-queries", "all"])        # a random tiny model earns no reward: train the prefixes
    assert not all(torch.equal(first[k], weights(str(tmp_path / "c"))[k]) for k in first)   # training moves weights


def test_a_kill_just_after_a_checkpoint_loses_no_metrics_row(tmp_path, monkeypatch):
    """Killed the moment iteration 1's checkpoint is in place: --resume starts at iteration 2
    and metrics.jsonl still holds iteration 1's row (it is written before the checkpoint)."""
    out = str(tmp_path / "run")
    save = T.save_checkpoint
    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", out])
    monkeypatch.setattr(T, "save_checkpoint", save)
    T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", out, "--resume"])
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [1, 2]


def test_a_bad_metrics_line_is_one_clear_line_on_resume(tmp_path):
    out = str(tmp_path / "run")
    T.main(FAST + ["--iterations", "1", "--eval-every", "0", "--out", out])
    path = os.path.join(out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"iteration": 2, "reward_me\n')                 # half a line, as an old append left it
    with pytest.raises(SystemExit) as e:
        T.main(FAST + ["--iterations", "2", "--eval-every", "0", "--out", out, "--resume"])
    assert str(e.value).startswith(f"error: {path}:2: not a metrics line")
    assert len(open(path).read().splitlines()) == 2              # nothing lost


# ---------------------------------------------------------------------------------------
# The update says what the paper says (issue 8, part 1)
# ---------------------------------------------------------------------------------------
def args_for(**kw):
    a = T.parse_args(["--model", "tiny"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def step_records(tiny, tok, rewards_per_query, k=3, seed=0):
    """Records shaped like the E-step's: one query per reward list, k rollouts each, all kept."""
    questions = ["What is 2+2?", "Name a prime.", "What is 7*8?", "Count to 3."]
    prefix = tok("Let's see.", add_special_tokens=False).input_ids
    records = []
    for qi, rewards in enumerate(rewards_per_query):
        prompt = M.chat_prompt(tok, questions[qi])
        outs = M.sample(tiny, tok, [prompt] * k, [prefix] * k, max_new_tokens=6, seed=seed + qi, code=False)
        q_hat = {"cot": sum(rewards[:1]) / 1, "code": sum(rewards[1:]) / max(1, len(rewards) - 1)}
        for o, r in zip(outs, rewards):
            records.append({"query_id": f"q{qi}", "prompt_ids": o.prompt_ids, "response_ids": o.response_ids,
                            "sampled": o.sampled, "behaviour_logprobs": o.logprobs, "n_prefix": o.n_prefix,
                            "reward": r, "kept": True, "decision": "cot", "q_hat": q_hat,
                            "s_star": {"cot": 0.3, "code": 0.7}})
    return records


def step_gradient(model, tok, records, args):
    """The gradient of one optimiser step over all items, as m_step accumulates it."""
    items = T.training_data("em", records, "whiten", 99, __import__("random").Random(0))
    ctx = {"prefixes": {"cot": tok("Think.", add_special_tokens=False).input_ids,
                        "code": tok("```python\n", add_special_tokens=False).input_ids},
           "record_of": {r["query_id"]: r for r in records}}
    stats = {"ratio_mean": [], "ratio_max": [], "clipped": 0, "ratio_n": 0}
    micro, decide = T.plan_step(items, args.batch_size, ctx, args)
    ctx["terms"] = {"loss_ratio": 0.0, "loss_decision": 0.0, "loss_kl": 0.0, "loss_sft": 0.0}
    model.zero_grad(set_to_none=True)
    T.accumulate(model, micro, decide, ctx, args, stats)
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g, ctx["terms"]


def test_step_gradient_does_not_depend_on_micro_batching(tiny, tok):
    """The same 9 items in one, three or nine micro-batches: the same loss and gradient
    (before, each query's decision term was added once per micro-batch holding it)."""
    records = step_records(tiny, tok, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    runs = [step_gradient(tiny, tok, records, args_for(batch_size=b, kl_coef=0.1)) for b in (9, 3, 1)]
    for g, terms in runs[1:]:
        assert terms["loss_decision"] == pytest.approx(runs[0][1]["loss_decision"], rel=1e-5)
        assert torch.allclose(g, runs[0][0], atol=1e-5, rtol=1e-4)   # fp32 sums in another order: ~1e-6
    assert runs[0][1]["loss_decision"] != 0 and runs[0][0].abs().max() > 1


def test_uninformative_queries_do_not_move_the_decision(tiny, tok):
    """All rewards 0, or all 1 under --ties none: no advantage, no evidence about c, so by
    default no gradient at all; the literal form (--decision-queries all) still trains the
    prefixes."""
    records = step_records(tiny, tok, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    g, terms = step_gradient(tiny, tok, records, args_for(batch_size=2, ties="none"))
    assert terms["loss_decision"] == 0 and g.abs().max() == 0
    g_all, terms_all = step_gradient(tiny, tok, records, args_for(batch_size=2, ties="none", decision_queries="all"))
    assert terms_all["loss_decision"] != 0 and g_all.abs().max() > 0


def test_a_successful_tie_trains_the_decision_under_ties_cot(tiny, tok):
    """Both decisions always right (--ties cot, the default): evidence that words suffice, so
    that query's decision term is on; the all-wrong query still adds nothing."""
    failed = step_records(tiny, tok, [[0.0, 0.0, 0.0]])
    g, terms = step_gradient(tiny, tok, failed, args_for(batch_size=2))
    assert terms["loss_decision"] == 0 and g.abs().max() == 0
    both = step_records(tiny, tok, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    g, terms = step_gradient(tiny, tok, both, args_for(batch_size=2))
    assert terms["loss_decision"] != 0 and g.abs().max() > 0
    g_perfect, _ = step_gradient(tiny, tok, both, args_for(batch_size=2, ties="perfect"))
    assert torch.equal(g_perfect, g)                             # a tie at q_hat 1 counts under both
    half = {"q_hat": {"cot": 0.5, "code": 0.5}}                  # a tie at 1/2: only --ties cot trains on it
    assert T.informative(half, "cot") and not T.informative(half, "perfect") and not T.informative(half, "none")


def test_normalised_decision_term_is_cross_entropy(tiny, tok):
    """log pi(c|x) normalised over the decisions: the term is zero-gradient when pi = s_star,
    and equals -sum_c s* log softmax(prefix log-probs)."""
    prompt = M.chat_prompt(tok, "What is 2+2?")
    prefixes = {"cot": tok("Think.", add_special_tokens=False).input_ids,
                "code": tok("Code.", add_special_tokens=False).input_ids}
    with torch.no_grad():
        lp = M.sequence_logprobs(tiny, [prompt, prompt], [prefixes["cot"], prefixes["code"]])
        raw = torch.stack([lp[0].sum(), lp[1].sum()])
        pi = torch.softmax(raw, 0)
        d = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form="normalized"), prefixes, [{"cot": 0.25, "code": 0.75}])
    assert d.item() == pytest.approx(-(0.25 * torch.log(pi[0]) + 0.75 * torch.log(pi[1])).item(), rel=1e-5)
    s_eq = [{"cot": float(pi[0]), "code": float(pi[1])}]
    tiny.zero_grad(set_to_none=True)
    T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form="normalized"), prefixes, s_eq).backward()
    g = torch.cat([p.grad.flatten() for p in tiny.parameters() if p.grad is not None])
    tiny.zero_grad(set_to_none=True)
    assert g.abs().max() < 1e-5


def test_absolute_form_is_the_code_tokens_own_probability_against_every_other_token(tiny, tok):
    """pi(code|x) = p(the code prefix's deciding token) from the full softmax, times the rest of
    the code prefix; pi(cot|x) = 1 - p(that token), whatever the other openings are. At
    s_star = pi over the deciding tokens alone the term is stationary (a binary cross-entropy),
    which the two-way "opening" form is not there: it ignores the mass of every third token."""
    prompt = M.chat_prompt(tok, "What is 2+2?")
    prefixes = {"cot": tok("By hand: ", add_special_tokens=False).input_ids,
                "code": tok("```python\n", add_special_tokens=False).input_ids}
    with torch.no_grad():
        full = torch.log_softmax(tiny(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
        p = full[prefixes["code"][0]].exp()
        rest = M.sequence_logprobs(tiny, [prompt], [prefixes["code"]])[0][1:].sum()
        lp = T.decision_logprobs(tiny, [prompt], prefixes, form="absolute")[0]
        d = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form="absolute"), prefixes, [{"cot": 0.25, "code": 0.75}])
    assert p < 0.5 and lp[1].item() == pytest.approx((torch.log(p) + rest).item(), rel=1e-4)
    assert lp[0].item() == pytest.approx(torch.log1p(-p).item(), abs=1e-6)
    assert d.item() == pytest.approx(-(0.25 * lp[0] + 0.75 * lp[1]).item(), rel=1e-5)
    assert T.choice_probability(tiny, [prompt], prefixes, form="absolute")[0] == pytest.approx(p.item(), rel=1e-4)

    cut = {c: ids[:1] for c, ids in prefixes.items()}
    pi = T.choice_probability(tiny, [prompt], cut, form="absolute")[0]
    for form in ("absolute", "opening"):
        term = T.decision_term(T.decision_logprobs(tiny, [prompt], cut, form=form), cut, [{"cot": 1 - pi, "code": pi}])
        g = grads(tiny, term)
        assert (g.abs().max() < 1e-5) == (form == "absolute"), form
        tiny.zero_grad(set_to_none=True)


def test_opening_form_never_pushes_a_decisions_continuation_down(tiny, tok, monkeypatch):
    """The "opening" form: a cross-entropy at the token where the prefixes part, plus each
    prefix's continuation weighted by s_star. A target of pure CoT must leave the code
    prefix's continuation (`print(` after "```python") alone, in this form and in "raw" (the
    default: each prefix's own log-prob, weighted by s_star) and "absolute"; the "normalized"
    form lowers it."""
    prompt = M.chat_prompt(tok, "What is 2+2?")
    prefixes = {"cot": tok("By hand: ", add_special_tokens=False).input_ids,
                "code": tok("```python\nprint(", add_special_tokens=False).input_ids}
    with torch.no_grad():
        lp = M.sequence_logprobs(tiny, [prompt, prompt], [prefixes["cot"], prefixes["code"]])
        d = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form="opening"), prefixes, [{"cot": 0.25, "code": 0.75}])
    choice = torch.log_softmax(torch.stack([lp[0][0], lp[1][0]]), 0)
    expected = -(0.25 * (choice[0] + lp[0][1:].sum()) + 0.75 * (choice[1] + lp[1][1:].sum()))
    assert d.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():
        d = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes), prefixes, [{"cot": 0.25, "code": 0.75}])
    assert d.item() == pytest.approx(-(0.25 * lp[0].sum() + 0.75 * lp[1].sum()).item(), rel=1e-5)

    real = M.sequence_logprobs
    for form, moved in (("raw", False), ("absolute", False), ("opening", False), ("normalized", True)):
        seen = []                      # the prefixes' log-prob tensors the term is built from
        monkeypatch.setattr(M, "sequence_logprobs", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
        term = T.decision_term(T.decision_logprobs(tiny, [prompt], prefixes, form=form), prefixes, [{"cot": 1.0, "code": 0.0}])
        (g,) = torch.autograd.grad(term, seen[0][1])
        assert bool((g[1:] != 0).any()) == moved, form
    monkeypatch.setattr(M, "sequence_logprobs", real)
    with pytest.raises(ValueError, match="differ"):
        T.decision_term(T.decision_logprobs(tiny, [prompt], {"cot": [5, 6], "code": [5, 6, 7]}), {"cot": [5, 6], "code": [5, 6, 7]}, [{"cot": 1.0, "code": 0.0}])


def test_k3_is_unbiased_for_kl_old_to_theta():
    """Summed exactly over a categorical: E_{pi_old}[k3] = KL(pi_old || pi_theta)."""
    old = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    new = torch.log_softmax(torch.tensor([1.0, 0.5, -0.2, 0.0]), 0)
    expected = (old.exp() * (old - new)).sum()
    assert (old.exp() * T.k3(new, old)).sum().item() == pytest.approx(expected.item(), rel=1e-5)
    assert bool((T.k3(new, old) >= 0).all())


def test_length_normalised_sequence_ratio_stays_in_range():
    """A drift of -0.01 nats per token over 100 tokens: the plain sequence ratio is e^1 and
    clipped (no surrogate gradient); the length-normalised one is e^0.01 and is not."""
    old = torch.zeros(100)
    lp = torch.full((100,), 0.01, requires_grad=True)
    m = torch.ones(100, dtype=torch.bool)
    _, _, st = T.ratio_term([lp], [old], [m], [1.0], 0.2, "surrogate", "sequence")
    assert st["clipped"] == 1 and st["ratio_max"] == pytest.approx(2.71828, rel=1e-4)
    total, units, st = T.ratio_term([lp], [old], [m], [1.0], 0.2, "surrogate", "sequence_mean")
    assert st["clipped"] == 0 and units == 1 and st["ratio_max"] == pytest.approx(1.01005, rel=1e-4)
    (g,) = torch.autograd.grad(total, lp)
    assert g.abs().min() > 0


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.4])
def test_ratio_is_one_on_policy_at_every_training_temperature(tiny, tok, temperature):
    prompts, _ = rollouts(tiny, tok)
    outs = M.sample(tiny, tok, prompts, max_new_tokens=12, temperature=temperature, seed=3, code=False)
    with torch.no_grad():
        logp = M.sequence_logprobs(tiny, prompts, [o.response_ids for o in outs], temperature)
    _, _, st = T.ratio_term(logp, [torch.tensor(o.logprobs) for o in outs], [torch.tensor(o.sampled) for o in outs],
                            [1.0] * len(outs), 0.2, "surrogate", "token")
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and abs(st["ratio_max"] - 1) < 1e-3


def test_training_refuses_greedy_rollouts(tiny, tok):
    import evaluate as E
    import explore as X
    with pytest.raises(ValueError, match="temperature"):
        X.explore(tiny, tok, E.load_problems("builtin:train", limit=1), k=1, temperature=0.0, progress=False)


def test_baselines_spend_the_same_budget(tmp_path):
    rows = {}
    for algo in ("em", "rl"):
        out = str(tmp_path / algo)
        T.main(FAST + ["--iterations", "1", "--algo", algo, "--eval-every", "0", "--native-k", "2", "--out", out])
        rows[algo] = json.loads(open(os.path.join(out, "metrics.jsonl")).read())
    assert rows["em"]["rollouts_sampled"] == rows["rl"]["rollouts_sampled"] == 2 * (2 * 2 + 2)
    assert rows["em"]["trained_on"] == rows["rl"]["trained_on"] == 2 * 2
    assert rows["em"]["optimizer_steps"] == rows["rl"]["optimizer_steps"]


def test_m_step_keeps_every_tensor_on_the_model_device(tok, monkeypatch):
    """The whole loss on a model placed on the `meta` device: an op that mixes in a CPU
    tensor raises there, as cuda vs cpu does on a GPU (values of meta tensors read as 0)."""
    from transformers import LlamaForCausalLM
    cpu_model = M.tiny_model(tok)
    records = step_records(cpu_model, tok, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cpu_model.config)
    import torch.fx.experimental._config as fx_config
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)   # boolean masks on meta
    for name, zero in (("item", 0), ("__float__", 0.0), ("__int__", 0), ("__bool__", False)):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, _r=real, _z=zero: _z if t.is_meta else _r(t))
    args = args_for(batch_size=2, kl_coef=0.1)
    items = T.training_data("em", records, "whiten", 99, __import__("random").Random(0))
    ctx = {"prefixes": {"cot": [1, 2], "code": [3]}, "record_of": {r["query_id"]: r for r in records},
           "terms": {"loss_ratio": 0.0, "loss_decision": 0.0, "loss_kl": 0.0, "loss_sft": 0.0}}
    micro, decide = T.plan_step(items, 2, ctx, args)
    stats = {"ratio_mean": [], "ratio_max": [], "clipped": 0, "ratio_n": 0}
    assert decide[0]                           # the micro-batch carries a decision term too
    loss = T.micro_loss(meta_model, micro[0], decide[0], ctx, args, stats)
    assert loss.is_meta
    loss.backward()


def test_bf16_keeps_fp32_master_weights_that_a_tiny_lr_still_moves(tmp_path, tok):
    """--dtype bf16: the checkpoint (master weights) stays fp32 and one step at lr 1e-6 moves
    nearly every weight that got a gradient; a pure-bf16 weight of 0.02 could not move by 1e-6."""
    from safetensors.torch import load_file
    out = str(tmp_path / "bf16")
    T.main(FAST + ["--iterations", "1", "--eval-every", "0", "--dtype", "bf16", "--lr", "1e-6", "--grad-accum", "99",
                   "--decision-queries", "all", "--out", out])
    after = load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    before = M.tiny_model(tok).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert after[name].dtype == torch.float32
    moved = (after[name] != before[name].to(torch.bfloat16).float()).float().mean().item()   # snapped, then moved
    assert moved > 0.9
    w = torch.full((1000,), 0.02, dtype=torch.bfloat16)
    assert torch.equal(w - 1e-6, w)                         # why the master weights must be fp32


def test_bf16_m_step_sees_the_weights_each_step_moved_to(tok, monkeypatch):
    """The M-step runs inside one autocast context; with autocast's cast cache every step after
    the first computed its forward at the starting weights (ratio ~1 throughout, the clip
    inert). Under --dtype bf16 each step's ratio must follow the fp32 run's."""
    import random
    seen, orig = {}, T.ratio_term
    for dtype in ("fp32", "bf16"):
        model = M.tiny_model(tok, seed=0).eval()
        records = step_records(model, tok, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        args = args_for(dtype=dtype, batch_size=3, grad_accum=1, lr=1e-3, algo="rl")
        ratios = seen[dtype] = []

        def spy(*a, ratios=ratios, **k):
            out = orig(*a, **k)
            ratios.append(out[2]["ratio_mean"])
            return out
        monkeypatch.setattr(T, "ratio_term", spy)
        items = T.training_data("rl", records, "whiten", 99, random.Random(0))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        with T.autocast(model, args):
            T.m_step(model, tok, opt, items, records, args, random.Random(0))
    assert len(seen["fp32"]) == 3 and abs(seen["fp32"][1] - seen["fp32"][0]) > 0.05     # the steps do move
    assert seen["bf16"] == pytest.approx(seen["fp32"], abs=0.01)


def test_snapped_masters_have_no_bf16_ties_for_a_tiny_step_to_tip(tok):
    """Master weights exactly halfway between two bf16 values (8% of the embedded model's) make
    the bf16 forward jump a whole bf16 spacing on a step of any size; after snap_to_bf16 a step
    far below the spacing leaves the bf16 forward as it was."""
    model = M.tiny_model(tok, seed=0).eval()
    args = T.parse_args(["--model", "tiny", "--dtype", "bf16"])
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        for p in model.parameters():           # put every weight on a tie: grid value + half a spacing
            low = p.to(torch.bfloat16).float()
            high = (low.view(torch.int32) + (1 << 16)).view(torch.float32)
            p.copy_(low + (high - low) / 2)

    def nudged_change():
        with torch.no_grad(), T.autocast(model, args):
            before = model(x).logits.float()
            for p in model.parameters():
                p.add_(1e-9 * torch.sign(p))    # far below bf16's spacing (~1e-4 at 0.02)
            return (model(x).logits.float() - before).abs().max().item()
    assert nudged_change() > 1e-3
    T.snap_to_bf16(model)
    assert nudged_change() < 1e-5


def test_sampler_gets_a_bf16_copy_and_the_master_stays_fp32(tiny):
    args = T.parse_args(["--model", "tiny", "--dtype", "bf16"])
    view = T.sampler_of(tiny, args)
    assert view is not tiny and next(view.parameters()).dtype == torch.bfloat16
    assert next(tiny.parameters()).dtype == torch.float32
    assert T.sampler_of(tiny, T.parse_args(["--model", "tiny", "--dtype", "fp32"])) is tiny
    # the same model as a copy with every parameter cast (a model loaded in bf16), tied weights
    # still tied; buffers (RoPE's inv_freq) stay fp32 as there: in bf16 they turn far positions
    import copy
    whole = copy.deepcopy(tiny)
    for p in whole.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 and torch.equal(b, m) for b, m in zip(view.buffers(), tiny.buffers()))
    x, far = torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.tensor([[300]])
    assert torch.equal(view.model.rotary_emb(x, far)[0], tiny.model.rotary_emb(x.float(), far)[0].to(torch.bfloat16))
    mine, ref = view.state_dict(), whole.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) and mine[k].dtype == ref[k].dtype for k in ref)
    assert all(not p.requires_grad for p in view.parameters()) and not view.training
    tied_master = copy.deepcopy(tiny)                   # the embedded model ties its LM head to the embedding
    tied_master.lm_head.weight = tied_master.model.embed_tokens.weight
    tied_view = T.sampler_of(tied_master, args)
    assert tied_view.lm_head.weight is tied_view.model.embed_tokens.weight
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(view(x).logits, whole(x).logits)


def test_release_freed_memory_returns_heap_holes_to_the_os():
    """Freed tensors below glibc's mmap threshold stay in the heap (resident) while a live one
    sits among them; release_freed_memory must hand those pages back."""
    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    T.release_freed_memory()
    held = [torch.ones(12_000 + 8 * (i % 5)) for i in range(4000)]    # ~48 KB each, ~190 MB, touched
    pins = held[::100]                         # a few stay alive among them: free() alone cannot trim
    del held
    before = rss_mb()
    T.release_freed_memory()
    after = rss_mb()
    assert before - after > 100, (before, after)
    del pins


def test_m_step_trims_between_layers_in_forward_and_backward_and_leaves_no_hook(tiny, tok, monkeypatch):
    """--trim-every N: release_freed_memory at every N-th decoder layer, after its forward and
    when the backward reaches it, with or without activation checkpointing; the weights come out
    bit for bit as without it, and no hook outlives the M-step (the sampler must not trim)."""
    import copy
    import random
    records = step_records(tiny, tok, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    items = T.training_data("em", records, "whiten", 99, random.Random(0))
    calls = []
    monkeypatch.setattr(T, "release_freed_memory", lambda: calls.append(1))
    weights = {}
    for ckpt in (False, True):
        base, extra = None, {}
        for every in (0, 1, 2):
            model = copy.deepcopy(tiny)             # two decoder layers
            if ckpt:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            forwards = []
            model.model.layers[-1].register_forward_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
            args = args_for(batch_size=1, grad_accum=2, lr=1e-3, trim_every=every)
            calls.clear()
            T.m_step(model, tok, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), items,
                     records, args, random.Random(1))
            base = len(calls) if base is None else base                  # trims between micro-batches
            extra[every] = len(calls) - base
            assert all(forwards) and len(forwards) >= 4      # every forward of the M-step has a backward
            weights[ckpt, every] = [p.detach().clone() for p in model.parameters()]
            calls.clear()
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]))
            assert calls == [], "a trimming hook outlived the M-step"
        assert extra[2] == 2 * (len(forwards) - 1), ckpt     # (the last is the no_grad check)    # the second layer: after its forward, and in backward
        assert extra[1] == 2 * extra[2], ckpt         # both layers
    for key, w in weights.items():
        assert all(torch.equal(a, b) for a, b in zip(w, weights[False, 0])), key


@pytest.mark.parametrize("form", ["absolute", "opening"])
def test_code_probability_is_the_deciding_tokens_softmax(tiny, tok, form):
    """pi(code|x) logged at evaluation: the next-token probability of the code prefix's first
    token ("```"), on its own (absolute) or normalised over it and the CoT prefix's ("By")."""
    import evaluate as E
    args = args_for(dtype="fp32", decision_form=form)
    problems = E.load_problems("builtin:test", 3)
    pi = T.code_probability(tiny, tok, problems, args)
    first = {c: tok(p, add_special_tokens=False).input_ids[:1] for c, p in (("cot", args.cot_prefix),
                                                                          ("code", args.code_prefix))}
    for p, got in zip(problems, pi):
        prompt = E.autonomous_chat(tok, p["question"], args.fewshot, args.autonomous_prompt)
        with torch.no_grad():
            lp = M.sequence_logprobs(tiny, [prompt, prompt], [first["cot"], first["code"]])
        want = lp[1][0].exp() if form == "absolute" else torch.softmax(torch.stack([lp[0][0], lp[1][0]]), 0)[1]
        assert got == pytest.approx(want.item(), rel=1e-4)
        assert 0 < got < 1


def test_decision_trust_drops_a_query_once_its_pi_has_moved_far_enough(tiny, tok):
    """--decision-trust 0.1: a query whose pi(code|x) is already 0.2 above its value at the
    M-step's start, in the direction of s_star, adds no decision term; one that has not moved
    still does, and so does one that moved the wrong way."""
    records = step_records(tiny, tok, [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    for r in records:
        r["s_star"] = {"cot": 0.1, "code": 0.9}                  # every query: towards code
    args = args_for(decision_trust=0.1)
    ctx = {"prefixes": {"cot": tok("By hand: ", add_special_tokens=False).input_ids,
                        "code": tok("```python\nprint(", add_special_tokens=False).input_ids},
           "record_of": {r["query_id"]: r for r in records}, "trust_dropped": 0, "trust_seen": 0}
    now = T.choice_probability(tiny, [ctx["record_of"][q]["prompt_ids"] for q in ("q0", "q1", "q2")],
                               ctx["prefixes"], form=args.decision_form, temperature=args.temperature)
    ctx["pi_old"] = {"q0": now[0] - 0.2, "q1": now[1], "q2": now[2] + 0.2}
    assert T.within_trust(tiny, ["q0", "q1", "q2"], ctx, args) == ["q1", "q2"]
    assert (ctx["trust_dropped"], ctx["trust_seen"]) == (1, 3)
    with pytest.raises(SystemExit, match="--decision-trust is for one process"):
        T.check_args(T.parse_args(["--model", "tiny", "--decision-trust", "0.1", "--fsdp"]))


def test_decision_trust_measures_the_tempered_policy_the_loss_trains(tiny, tok):
    """The decision term trains pi at --temperature; the trust region must measure the same pi.
    A query that has not moved at all (pi_old = pi now, tempered) stays in, even with s_star
    pointing to where the untempered pi lies, which measured at temperature 1 would look like a
    move past the region and drop it."""
    records = step_records(tiny, tok, [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    args = args_for(decision_trust=0.1, temperature=0.05, decision_form="opening")
    prefixes = {"cot": tok("By hand: ", add_special_tokens=False).input_ids,
                "code": tok("```python\nprint(", add_special_tokens=False).input_ids}
    qs = ["q0", "q1", "q2"]
    prompts = [records[3 * i]["prompt_ids"] for i in range(3)]
    tempered = T.choice_probability(tiny, prompts, prefixes, form="opening", temperature=0.05)
    plain = T.choice_probability(tiny, prompts, prefixes, form="opening")
    assert min(abs(a - b) for a, b in zip(tempered, plain)) > 0.1
    for r in records:
        i = int(r["query_id"][1:])
        r["s_star"] = {"cot": 0.0, "code": 1.0} if plain[i] > tempered[i] else {"cot": 1.0, "code": 0.0}
    ctx = {"prefixes": prefixes, "record_of": {r["query_id"]: r for r in records}, "trust_dropped": 0,
           "trust_seen": 0, "pi_old": dict(zip(qs, tempered))}
    assert T.within_trust(tiny, qs, ctx, args) == qs


def test_m_step_is_its_steps_and_frees_the_gradients(tiny, tok):
    """m_step over several optimiser steps: the weights are those of the steps spelled out
    (shuffle, plan_step, accumulate, clip, AdamW), and no gradient outlives the M-step (the
    sampler runs next and needs the memory)."""
    import copy
    import random
    records = step_records(tiny, tok, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    args = args_for(batch_size=1, grad_accum=2, lr=1e-3)
    items = T.training_data("em", records, "whiten", 99, random.Random(0))
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    T.m_step(a, tok, torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.0), items, records, args,
             random.Random(1))
    assert all(p.grad is None for p in a.parameters())
    opt = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.0)
    order = list(range(len(items)))
    random.Random(1).shuffle(order)
    ctx = {"prefixes": T.decision_prefixes(tok, args), "record_of": {r["query_id"]: r for r in records}}
    stats = {"ratio_mean": [], "ratio_max": [], "clipped": 0, "ratio_n": 0}
    b.train()
    steps = [[items[i] for i in order[s:s + 2]] for s in range(0, len(order), 2)]
    for step in steps:
        micro, decide = T.plan_step(step, 1, ctx, args)
        ctx["terms"] = {"loss_ratio": 0.0, "loss_decision": 0.0, "loss_kl": 0.0, "loss_sft": 0.0}
        opt.zero_grad(set_to_none=True)
        T.accumulate(b, micro, decide, ctx, args, stats)
        torch.nn.utils.clip_grad_norm_(b.parameters(), args.max_grad_norm)
        opt.step()
    assert len(steps) >= 3
    moved = 0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), tiny.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), name
        moved += not torch.equal(pa, p0)
    assert moved > 0


@pytest.mark.parametrize("algo", ["em", "rl"])
def test_autonomous_prompt_reaches_every_rollout_and_evaluation(tmp_path, tok, monkeypatch, algo):
    """--autonomous-prompt invite (not the default): the E-step's forced and native rollouts,
    rl's rollouts, the evaluation's autonomous samples and pi(code|x) all see the inviting
    instruction, never the default neutral one."""
    import evaluate as E
    seen = []
    real_sample, real_choice = M.sample, T.choice_probability

    def spy_sample(model, tok_, prompts, *a, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        return real_sample(model, tok_, prompts, *a, **kw)

    def spy_choice(model, prompts, *a, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        return real_choice(model, prompts, *a, **kw)
    monkeypatch.setattr(M, "sample", spy_sample)
    monkeypatch.setattr(T, "choice_probability", spy_choice)
    T.main(FAST + ["--iterations", "1", "--algo", algo, "--eval-modes", "autonomous", "--autonomous-prompt", "invite",
                   "--out", str(tmp_path / algo)])
    assert len(seen) >= 2 * (2 * 2 + 2) + 2 * 2 * 2          # training rollouts + two evaluations (+ pi)
    assert all(E.AUTONOMOUS["invite"] in s and E.AUTONOMOUS["neutral"] not in s for s in seen)
    assert "Python" not in E.AUTONOMOUS["neutral"] and "code" not in E.AUTONOMOUS["neutral"]


def test_the_token_budget_counts_the_decision_prefixes_a_micro_batch_carries():
    """A query's decision term rides in the forward of the micro-batch holding its first rollout,
    so --micro-tokens counts its two prefix sequences too: here the four rollouts alone would
    fit in one micro-batch (400 tokens packed), with both queries' prefixes they do not (576)."""
    demo = list(range(3, 163))
    records = [{"query_id": f"q{i}", "prompt_ids": demo + [500 + i] * 40, "s_star": {"cot": 0.5, "code": 0.5},
                "q_hat": {"cot": 0.0, "code": 1.0}} for i in range(2)]
    step = [{"query_id": r["query_id"], "prompt_ids": r["prompt_ids"], "response_ids": [2] * 20, "mask": [1]}
            for r in records for _ in range(2)]
    ctx = {"prefixes": {"cot": [1, 2, 3, 4], "code": [5, 6, 7, 8]}, "record_of": {r["query_id"]: r for r in records}}
    assert M.packed_length([it["prompt_ids"] for it in step], [it["response_ids"] for it in step]) == 400
    micro, decide = T.plan_step(step, 4, ctx, args_for(micro_tokens=450))
    assert [[it["query_id"] for it in mb] for mb in micro] == [["q0", "q0"], ["q1", "q1"]] and decide == [["q0"], ["q1"]]
    for mb, qs in zip(micro, decide):
        extra = T.decision_sequences([ctx["record_of"][q]["prompt_ids"] for q in qs], ctx["prefixes"])
        assert M.packed_length([it["prompt_ids"] for it in mb] + extra[0], [it["response_ids"] for it in mb] + extra[1]) <= 450
    micro, decide = T.plan_step(step, 4, ctx, args_for(micro_tokens=450, decision_coef=0.0))
    assert len(micro) == 1 and decide == [[]]                 # no decision term, nothing to count


def test_a_micro_batch_without_a_sampled_token_still_runs_its_backward(tiny, tok):
    """Under --fsdp every rank runs every backward: an item whose tokens were all forced (none
    sampled) gives a zero loss that still has a graph, not a float 0, and no ratio to the statistics."""
    records = step_records(tiny, tok, [[1.0, 0.0, 1.0]])
    items = T.training_data("em", records, "whiten", 99, __import__("random").Random(0))
    for it in items:
        it["mask"] = [0] * len(it["mask"])
    args = args_for(algo="rl")
    ctx = {"prefixes": {}, "record_of": {r["query_id"]: r for r in records}, "units": 1, "tokens": 1, "queries": 1,
           "terms": {"loss_ratio": 0.0, "loss_decision": 0.0, "loss_kl": 0.0, "loss_sft": 0.0}}
    stats = {"ratio_mean": [], "ratio_max": [], "clipped": 0, "ratio_n": 0}
    loss = T.micro_loss(tiny, items, [], ctx, args, stats)
    loss.backward()
    assert loss.item() == 0.0 and stats["ratio_n"] == 0
    assert stats["ratio_mean"] == stats["ratio_max"] == []     # it adds no ratio of 1.0 to the means
    tiny.zero_grad(set_to_none=True)


def test_micro_batches_group_a_querys_rollouts_within_a_packed_token_budget():
    """plan_step sorts a step's items by prompt and closes a micro-batch at --batch-size items or
    --micro-tokens packed tokens (the shared prompt opening counted once); an item longer than
    the budget goes alone. Every item is in exactly one micro-batch, and a query's rollouts sit
    together: four 600-token prompts' rollouts fit in one (1,003 tokens packed, 2,800 padded)."""
    rng = __import__("random").Random(0)
    demo = list(range(3, 163))                                   # the few-shot opening every prompt shares
    questions = {f"q{i}": [500 + i] * rng.randint(20, 60) for i in range(5)}
    step = [{"query_id": f"q{i % 5}", "prompt_ids": demo + questions[f"q{i % 5}"],
             "response_ids": [2] * rng.choice([20, 40, 60, 300, 490]), "mask": [1]} for i in range(16)]
    step.append({"query_id": "q9", "prompt_ids": demo + [9] * 40, "response_ids": [2] * 2000, "mask": [1]})
    step += [{"query_id": "q8", "prompt_ids": demo + [8] * 440, "response_ids": [2] * 100, "mask": [1]} for _ in range(4)]
    rng.shuffle(step)
    args = args_for(algo="rl", micro_tokens=1536)
    micro, _ = T.plan_step(step, 4, {"record_of": {}}, args)
    assert sorted(id(it) for mb in micro for it in mb) == sorted(id(it) for it in step)
    for mb in micro:
        packed = M.packed_length([it["prompt_ids"] for it in mb], [it["response_ids"] for it in mb])
        assert len(mb) <= 4 and (packed <= 1536 or len(mb) == 1), [len(it["response_ids"]) for it in mb]
    order = [it["query_id"] for mb in micro for it in mb]
    assert all(order.index(q) + order.count(q) - 1 == len(order) - 1 - order[::-1].index(q) for q in set(order))
    assert [mb for mb in micro if any(it["query_id"] == "q9" for it in mb)] == [[next(it for it in step if it["query_id"] == "q9")]]
    assert [len(mb) for mb in micro if mb[0]["query_id"] == "q8"] == [4]
    assert max(map(len, micro)) == 4            # short items still fill a micro-batch


@pytest.mark.parametrize("fast", [True, False])
def test_dtype_auto_computes_in_bf16_only_where_bf16_is_fast(monkeypatch, capsys, tmp_path, fast):
    """The default --dtype auto: on a CPU without native bf16 (AVX2 only, here) a bf16 matrix
    product ran ~50x slower than fp32, so auto trains and samples in fp32 there and says so;
    where bf16 is fast it is bf16, the master weights fp32 either way."""
    monkeypatch.setattr(M, "fast_bf16", lambda device: fast)
    seen = {}

    class Planned(Exception):
        pass

    def stop_at_plan(args, *rest):
        seen["dtype"] = args.dtype
        raise Planned
    monkeypatch.setattr(T, "print_plan", stop_at_plan)
    with pytest.raises(Planned):
        T.main(["--model", "tiny", "--out", str(tmp_path / "run")])
    assert T.parse_args([]).dtype == "auto"
    assert seen["dtype"] == ("bf16" if fast else "fp32")
    assert ("--dtype auto: fp32" in capsys.readouterr().err) is not fast


def test_an_fp32_run_resumed_in_bf16_snaps_its_masters_as_a_fresh_one(monkeypatch, tmp_path):
    """--dtype auto can resume on another machine in another dtype. fp32 steps leave the masters
    off the bf16 grid (on ties that one step tips a whole bf16 spacing), so going on in bf16
    snaps them first, as a fresh bf16 run does; bf16 going on in bf16 or anything in fp32 does not."""
    snapped = []
    monkeypatch.setattr(T, "snap_to_bf16", lambda model: snapped.append(True))
    base = [a for a in FAST if a not in ("--dtype", "bf16")] + ["--eval-every", "0"]
    out = str(tmp_path / "run")
    T.main(base + ["--out", out, "--iterations", "1", "--dtype", "fp32"])
    assert T.computed_in(os.path.join(out, "checkpoint")) == "fp32" and snapped == []
    T.main(base + ["--out", out, "--iterations", "2", "--dtype", "bf16", "--resume"])
    assert snapped == [True] and T.computed_in(os.path.join(out, "checkpoint")) == "bf16"
    T.main(base + ["--out", out, "--iterations", "3", "--dtype", "bf16", "--resume"])
    assert snapped == [True]                                   # bf16 on bf16: its own masters


def test_ranks_that_resolve_auto_differently_all_take_fp32(monkeypatch):
    monkeypatch.setattr(T.D, "gather", lambda items: items + ["fp32"])
    assert T.agree_dtype("bf16") == "fp32" and T.agree_dtype("fp32") == "fp32"
    monkeypatch.setattr(T.D, "gather", lambda items: items * 4)
    assert T.agree_dtype("bf16") == "bf16"
