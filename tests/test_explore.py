"""The E-step's reference strategy and subsampling, and a tiny end-to-end exploration."""
import random

import pytest

import explore as X
import model as M


def test_hardmax_picks_larger_pi_times_q():
    s = X.reference_strategy({"cot": 0.8, "code": 0.2}, {"cot": 0.25, "code": 0.75}, "hardmax")
    assert s == {"cot": 1.0, "code": 0.0}                     # 0.2 > 0.15
    s = X.reference_strategy({"cot": 0.5, "code": 0.5}, {"cot": 0.25, "code": 0.75}, "hardmax")
    assert s == {"cot": 0.0, "code": 1.0}
    s = X.reference_strategy({"cot": 0.5, "code": 0.5}, {"cot": 0.5, "code": 0.5}, "hardmax")
    assert s == {"cot": 1.0, "code": 0.0}                     # ties go to CoT


@pytest.mark.parametrize("estep", ["softmax", "posterior", "hardmax"])
def test_a_successful_tie_goes_to_cot_whatever_the_prior(estep):
    """Both decisions right equally often: the oracle's rule (words suffice) beats pi*Q, which
    would follow a policy leaning to code; --ties none leaves the formula alone."""
    pi = {"cot": 0.25, "code": 0.75}
    assert X.reference_strategy(pi, {"cot": 1.0, "code": 1.0}, estep) == {"cot": 1.0, "code": 0.0}
    assert X.reference_strategy(pi, {"cot": 0.5, "code": 0.5}, estep) == {"cot": 1.0, "code": 0.0}
    literal = X.reference_strategy(pi, {"cot": 1.0, "code": 1.0}, estep, ties="none")
    assert literal["code"] > literal["cot"]
    failed = X.reference_strategy(pi, {"cot": 0.0, "code": 0.0}, estep)   # no success: no evidence for words
    assert failed == X.reference_strategy(pi, {"cot": 0.0, "code": 0.0}, estep, ties="none")
    # --ties perfect: only a tie at q_hat 1 says words suffice; 1/2 against 1/2 follows pi*Q
    assert X.reference_strategy(pi, {"cot": 1.0, "code": 1.0}, estep, ties="perfect") == {"cot": 1.0, "code": 0.0}
    half = X.reference_strategy(pi, {"cot": 0.5, "code": 0.5}, estep, ties="perfect")
    assert half == X.reference_strategy(pi, {"cot": 0.5, "code": 0.5}, estep, ties="none") and half["code"] >= half["cot"]


def test_posterior_is_proportional():
    s = X.reference_strategy({"cot": 0.6, "code": 0.4}, {"cot": 0.5, "code": 1.0}, "posterior")
    assert s["code"] / s["cot"] == pytest.approx((0.4 * 1.0) / (0.6 * 0.5))
    assert sum(s.values()) == pytest.approx(1.0)
    assert X.reference_strategy({"cot": 0.5, "code": 0.5}, {"cot": 0, "code": 0}, "posterior") == {"cot": 0.5, "code": 0.5}


def test_softmax_tends_to_hardmax_as_alpha_grows():
    pi, q = {"cot": 0.7, "code": 0.3}, {"cot": 0.2, "code": 0.9}
    hard = X.reference_strategy(pi, q, "hardmax")
    gaps = [abs(X.reference_strategy(pi, q, "softmax", a)["code"] - hard["code"]) for a in (1, 10, 100, 1000)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6 and gaps[0] > 0.1


def test_weighted_subsample_follows_weights():
    rng = random.Random(0)
    counts = [0] * 4
    for _ in range(4000):
        for i in X.weighted_subsample([0.1, 0.1, 0.4, 0.0], 1, rng):
            counts[i] += 1
    assert counts[3] == 0 and counts[2] / 4000 == pytest.approx(0.4 / 0.6, abs=0.03)
    assert X.weighted_subsample([1, 0, 1], 5, rng) == [0, 2]


def test_explore_tiny_end_to_end(tiny, tok):
    import evaluate as E
    problems = E.load_problems("builtin:train", limit=2)
    recs = X.explore(tiny, tok, problems, k=2, native_k=2, max_new_tokens=6, progress=False)
    assert len(recs) == 8 and sum(r["kept"] for r in recs) == 4
    for r in recs:
        assert set(r["s_star"]) == {"cot", "code"} and r["reward"] in (0.0, 1.0)
        assert len(r["response_ids"]) == len(r["sampled"]) == len(r["behaviour_logprobs"])
        assert r["response"].startswith(r["prefix"].rstrip("\n")[:10])
    rec = X.explore(tiny, tok, problems[:1], k=1, prior="prefix", max_new_tokens=4, progress=False)[0]
    pri = rec["prior"]
    import math
    import torch
    with torch.no_grad():
        ids = {c: tok(p, add_special_tokens=False).input_ids for c, p in
               (("cot", E.MODES["cot"]["prefix"]), ("code", E.MODES["code"]["prefix"]))}
        lp = {c: float(M.sequence_logprobs(tiny, [rec["prompt_ids"]], [ids[c]])[0].sum()) for c in ids}
    assert pri["code"] == pytest.approx(1 / (1 + math.exp(lp["cot"] - lp["code"])), abs=1e-6)
    assert sum(pri.values()) == pytest.approx(1.0)
    # at another sampling temperature the prior is that tempered policy's, not the T = 1 one's
    hot = X.explore(tiny, tok, problems[:1], k=1, prior="prefix", max_new_tokens=4, temperature=3.0,
                    progress=False)[0]["prior"]
    with torch.no_grad():
        lp = {c: float(M.sequence_logprobs(tiny, [rec["prompt_ids"]], [ids[c]], 3.0)[0].sum()) for c in ids}
    assert hot["code"] == pytest.approx(1 / (1 + math.exp(lp["cot"] - lp["code"])), abs=1e-6)
    logit = lambda q: math.log(q["code"] / q["cot"])
    assert abs(logit(hot) - logit(pri)) > 0.1


def test_softmax_survives_a_huge_alpha():
    s = X.reference_strategy({"cot": 0.5, "code": 0.5}, {"cot": 0.25, "code": 1.0}, "softmax", alpha=1000)
    assert s["code"] == pytest.approx(1.0) and s["cot"] >= 0
    s = X.reference_strategy({"cot": 0.5, "code": 0.5}, {"cot": 1.0, "code": 1.0}, "softmax", alpha=1e6, ties="none")
    assert s == {"cot": 0.5, "code": 0.5}


def test_native_prior_is_laplace_smoothed_code_rate(tiny, tok):
    import evaluate as E
    problems = E.load_problems("builtin:train", limit=1)
    recs = X.explore(tiny, tok, problems, k=1, native_k=2, max_new_tokens=4, progress=False)
    rate = recs[0]["native_code_rate"]
    assert recs[0]["prior"]["code"] == pytest.approx((2 * rate + 1) / 4)
    with pytest.raises(ValueError, match="native_k"):
        X.explore(tiny, tok, problems, k=1, native_k=0, prior="native", progress=False)
    assert X.explore(tiny, tok, problems, k=1, native_k=0, prior="uniform", max_new_tokens=4,
                     progress=False)[0]["prior"] == {"cot": 0.5, "code": 0.5}
