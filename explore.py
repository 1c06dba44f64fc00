"""explore.py -- the E-step: structured exploration and the reference strategy s*(c|x).

For each query x of the batch (paper section 2, "E-step" and "structured exploration"):
  1. K rollouts per decision c in {cot, code}, each decision forced by a prefix on the
     response (prefix-guided generation); CoT rollouts run no code.
  2. Optionally `--native-k` unforced rollouts, to estimate pi(c|x) as their code rate.
  3. Grade every rollout (grader.py): r in {0, 1}.
  4. q_hat(x, c) = mean reward of the K rollouts forced to c.
  5. pi(c|x), the current policy's probability of each decision, by `--prior`:
        native   (default) the code rate of `--native-k` unforced rollouts, Laplace-smoothed:
                 (n_code + 1) / (native_k + 2). It is what pi(c|x) means (c = 1 iff an
                 unguided solution runs code), it follows the policy as training moves it,
                 and it does not depend on how the forcing prefixes are worded or how long
                 they are; the smoothing keeps a few rollouts from giving pi = 0 or 1.
        prefix   the model's probability of each decision prefix, normalised over the two
                 decisions. Cheap (no sampling) but an artefact of wording and length: with
                 the default prefixes the embedded model gives log p = -18.4 to the CoT prefix
                 and -1.39 to the code prefix, so pi(cot) ~ 4e-8 whatever the query.
        uniform  1/2 each: s_star then depends on q_hat only (the paper's pi*Q is lost).
  6. s_star(c|x) by `--estep`:
        softmax   exp(alpha * pi * q_hat) / Z            (ACL version, Eq. 5; --alpha)
        posterior pi * q_hat / Z                          (the exact E-step; uniform if all 0)
        hardmax   the decision with the larger pi*q_hat   (v1, alpha = infinity; ties -> cot)
     Ties in q_hat (`--ties`, a choice of ours: the paper is silent). When both decisions
     succeeded equally often, and at all, pi*Q prefers whichever the policy already leans
     to, so nothing ever teaches "words suffice here". The paper's selection-accuracy oracle
     prefers CoT when both succeed (no execution needed), so by default (`--ties cot`) such a
     query gets s_star = CoT; `--ties perfect` only when both succeeded on every rollout.
     `--ties none` leaves them to the formula above.
  7. Subsample `--keep` rollouts from the pooled 2K with weights s_star(c|x) / K, without
     replacement (failed rollouts stay eligible: the whitened advantage needs them).

Output: JSON lines, one per rollout, readable: query, decision, prefix, response, reward,
q_hat, prior, s_star, kept; plus the token ids, sampled mask and behaviour log-probs the
M-step needs.

Choices the paper leaves open (flags): the prefixes (--cot-prefix, --code-prefix; default
evaluate.MODES), K (default 4 here, 8 in the paper), alpha (default 5), the prior, keep.

Run:  python explore.py --model tiny --data builtin:train --queries 4 --k 2 --out runs/explore.jsonl
"""
import argparse
import json
import math
import os
import random

import torch

import evaluate as E
import model as M

DECISIONS = ("cot", "code")


def reference_strategy(pi, q_hat, estep="softmax", alpha=5.0, ties="cot"):
    """s_star(c|x) for c in DECISIONS from pi(c|x) and q_hat(x,c) (dicts keyed by decision)."""
    if tied_success(q_hat, ties):
        return {c: float(c == "cot") for c in DECISIONS}
    score = {c: pi[c] * q_hat[c] for c in DECISIONS}
    if estep == "softmax":             # max-subtracted: exp never overflows, whatever alpha
        top = max(alpha * score[c] for c in DECISIONS)
        w = {c: math.exp(alpha * score[c] - top) for c in DECISIONS}
        return {c: w[c] / sum(w.values()) for c in DECISIONS}
    if estep == "posterior":
        z = sum(score.values())
        return {c: score[c] / z if z > 0 else 1.0 / len(DECISIONS) for c in DECISIONS}
    if estep == "hardmax":
        best = max(DECISIONS, key=lambda c: (score[c], c == "cot"))
        return {c: float(c == best) for c in DECISIONS}
    raise ValueError(f"unknown --estep {estep}")


def tied_success(q_hat, ties="cot"):
    """Does the tie rule send this query to CoT (words are cheaper)? `cot`: both decisions
    succeeded, equally often; `perfect`: both succeeded on every rollout. The paper's oracle
    looks at one answer per decision; at q_hat 1/4 against 1/4 it would most often see
    neither succeed, yet `cot` reads such a tie as "words suffice", also on kinds where this
    model's code is right about twice as often as its words (story, next-number). One seed
    with `perfect` ended no more accurate than one with `cot` (README, Results)."""
    if q_hat["cot"] != q_hat["code"] or ties == "none":
        return False
    return q_hat["cot"] == 1 if ties == "perfect" else q_hat["cot"] > 0


def weighted_subsample(weights, keep, rng):
    """Indices of `keep` items drawn without replacement with probability ~ weights."""
    keys = sorted(((rng.random() ** (1.0 / w), i) for i, w in enumerate(weights) if w > 0), reverse=True)
    return sorted(i for _, i in keys[:keep])          # Efraimidis-Spirakis keys u^(1/w)


@torch.no_grad()
def prefix_prior(model, tok, prompt, prefixes, temperature=1.0):
    """pi(c|x) from the model's probability of each decision prefix, normalised, at the
    sampling temperature (the policy the rollouts come from)."""
    lps = M.sequence_logprobs(model, [prompt] * len(prefixes), [prefixes[c] for c in DECISIONS], temperature)
    logp = {c: float(lp.sum()) for c, lp in zip(DECISIONS, lps)}
    z = max(logp.values())
    w = {c: math.exp(logp[c] - z) for c in DECISIONS}
    return {c: w[c] / sum(w.values()) for c in DECISIONS}


def explore(model, tok, problems, k=4, native_k=2, estep="softmax", alpha=5.0, prior="native", keep=None,
            prefixes_text=None, max_new_tokens=384, temperature=1.0, seed=0, batch_size=32, fewshot=True,
            progress=True, ties="cot", autonomous="neutral"):
    """Run the E-step over `problems`; return one record per rollout (see the docstring).
    Rollouts of all queries for one decision are sampled together, `batch_size` at a time.
    Sampling is plain temperature sampling (no top-p / top-k): the M-step's teacher-forced
    log-probs use the full tempered softmax, so only then is the ratio exactly 1 on-policy."""
    if prior == "native" and native_k < 1:
        raise ValueError("prior 'native' needs native_k >= 1 unforced rollouts per query")
    if temperature <= 0:
        raise ValueError("the E-step samples at a temperature > 0 (greedy rollouts have no behaviour policy)")
    prefixes_text = prefixes_text or {c: E.MODES[c]["prefix"] for c in DECISIONS}
    prefixes = {c: tok(prefixes_text[c], add_special_tokens=False).input_ids for c in DECISIONS}
    prompts = [E.autonomous_chat(tok, p["question"], fewshot, autonomous) for p in problems]
    keep = keep or k
    rng = random.Random(seed)
    jobs = [(c, qi) for c in DECISIONS for qi in range(len(problems)) for _ in range(k)]
    jobs += [("native", qi) for qi in range(len(problems)) for _ in range(native_k)]
    rollouts = {}
    bar = E.Progress(len(jobs), "E-step", enabled=progress, max_new_tokens=max_new_tokens)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        for c in dict.fromkeys(c for c, _ in chunk):
            part = [qi for d, qi in chunk if d == c]
            outs = M.sample(model, tok, [prompts[qi] for qi in part],
                            [prefixes[c] if c in prefixes else [] for _ in part], max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed * 100003 + start, code=(c != "cot"), progress=bar.hook)
            bar.batch_done(outs)
            for qi, o in zip(part, outs):
                rollouts.setdefault((c, qi), []).append(o)
    bar.close()
    records = []
    for qi, p in enumerate(problems):
        pool = [(c, o) for c in DECISIONS for o in rollouts[(c, qi)]]
        native = rollouts.get(("native", qi), [])
        rewards = [float(E.grade(p, o.text)[1]) for _, o in pool]
        q_hat = {c: sum(r for (d, _), r in zip(pool, rewards) if d == c) / k for c in DECISIONS}
        native_rate = sum(bool(o.code_calls) for o in native) / len(native) if native else None
        if prior == "prefix":
            pi = prefix_prior(model, tok, prompts[qi], prefixes, temperature)
        elif prior == "native":
            rate = (sum(bool(o.code_calls) for o in native) + 1) / (len(native) + 2)
            pi = {"cot": 1.0 - rate, "code": rate}
        else:
            pi = {c: 1.0 / len(DECISIONS) for c in DECISIONS}
        s_star = reference_strategy(pi, q_hat, estep, alpha, ties)
        kept = set(weighted_subsample([s_star[c] / k for c, _ in pool], keep, rng))
        for j, ((c, o), r) in enumerate(zip(pool, rewards)):
            records.append({
                "query_id": p["id"], "query": p["question"], "answer": p["answer"], "decision": c,
                "prefix": prefixes_text[c], "response": o.text, "reward": r, "q_hat": q_hat, "prior": pi,
                "s_star": s_star, "kept": j in kept, "code_calls": len(o.code_calls),
                "native_code_rate": native_rate, "prompt_ids": o.prompt_ids, "response_ids": o.response_ids,
                "sampled": o.sampled, "n_prefix": o.n_prefix, "behaviour_logprobs": o.logprobs})
    return records


def write_jsonl_atomic(path, records):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def add_args(ap):
    ap.add_argument("--k", type=int, default=4, help="rollouts per decision (paper: 8)")
    ap.add_argument("--native-k", type=int, default=2, help="unforced rollouts per query, to estimate pi(c|x)")
    ap.add_argument("--estep", default="softmax", choices=["softmax", "posterior", "hardmax"])
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--ties", default="cot", choices=["cot", "perfect", "none"],
                    help="s_star when both decisions succeeded equally often: CoT (the oracle's rule), or the formula")
    ap.add_argument("--prior", default="native", choices=["native", "prefix", "uniform"])
    ap.add_argument("--keep", type=int, default=None, help="rollouts kept per query (default k)")
    ap.add_argument("--cot-prefix", default=E.MODES["cot"]["prefix"])
    ap.add_argument("--code-prefix", default=E.MODES["code"]["prefix"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fewshot", dest="fewshot", action="store_false", help="drop evaluate.FEWSHOT")
    ap.add_argument("--autonomous-prompt", default="neutral", choices=list(E.AUTONOMOUS),
                    help="the prompt's instruction (evaluate.AUTONOMOUS): invite code, or name neither decision")


def check_estep_args(args, uses_prior=True):
    """The flags add_args defines (explore.py and em_train.py), checked before anything loads."""
    E.check_numbers(args, positive=("--k", "--keep", "--max-new-tokens", "--temperature"),
                    non_negative=("--native-k", "--alpha"))
    if args.keep is not None and args.keep > 2 * args.k:
        E.fail(f"--keep {args.keep} is more than the 2 * --k = {2 * args.k} rollouts of a query")
    if uses_prior and args.prior == "native" and args.native_k < 1:
        E.fail("--prior native estimates pi(c|x) from unforced rollouts: it needs --native-k >= 1")
    if M.CODE_BLOCK.search(args.code_prefix):
        E.fail(f"--code-prefix {M.CLOSED_PREFIX}")


def check_args(args):
    check_estep_args(args)
    E.check_numbers(args, positive=("--queries",))
    E.check_data(args.data)
    E.check_writable(args.out, file=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=M.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="fp32", choices=list(M.DTYPES))
    ap.add_argument("--data", default="builtin:train")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", default="runs/explore.jsonl")
    add_args(ap)
    args = ap.parse_args(argv)
    check_args(args)
    problems = E.load_problems(args.data, args.queries, args.seed, shuffle=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rollouts = len(problems) * (2 * args.k + args.native_k)
    E.print_plan(f"""Plan: E-step of {args.model} ({args.dtype} on {device}) on {len(problems)} queries of {args.data}:
        {rollouts} rollouts ({args.k} per decision, {args.native_k} unforced, per query) of up to {args.max_new_tokens}
        new tokens. Expected time: {E.expected_time(args.model, device, args.dtype, rollouts, args.max_new_tokens)}. Output:
        {args.out}.""")
    model, tok = M.load_model(args.model, args.dtype, device)
    records = explore(model, tok, problems, args.k, args.native_k, args.estep, args.alpha, args.prior, args.keep,
                      {"cot": args.cot_prefix, "code": args.code_prefix}, args.max_new_tokens, args.temperature,
                      args.seed, fewshot=args.fewshot, ties=args.ties, autonomous=args.autonomous_prompt)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_jsonl_atomic(args.out, records)
    by = {}
    for r in records:
        by.setdefault(r["query_id"], r)
    print(f"{'query':<22} {'q_hat cot':>9} {'q_hat code':>10} {'pi code':>8} {'s* code':>8}")
    for qid, r in by.items():
        print(f"{qid:<22} {r['q_hat']['cot']:>9.2f} {r['q_hat']['code']:>10.2f} {r['prior']['code']:>8.2f} "
              f"{r['s_star']['code']:>8.2f}")
    print(f"{len(records)} rollouts, {sum(r['kept'] for r in records)} kept -> {args.out}")


if __name__ == "__main__":
    main()
