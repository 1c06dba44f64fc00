"""explore.py -- the E-step: structured exploration and the reference strategy s*(c|x).

For each query x of the batch (paper section 2, "E-step" and "structured exploration"):
  1. K rollouts per decision c in {cot, code}, each decision forced by a prefix on the
     response (prefix-guided generation); CoT rollouts run no code.
  2. Optionally `--native-k` unforced rollouts, to estimate pi(c|x) as their code rate.
  3. Grade every rollout (grader.py): r in {0, 1}.
  4. q_hat(x, c) = mean reward of the K rollouts forced to c.
  5. pi(c|x) by `--prior native` (code rate of the native rollouts; 1/2 each if none) or
     `--prior prefix` (the model's probability of each decision prefix, normalised over the
     two decisions; whole-prefix probabilities, so a longer prefix is a priori less likely).
  6. s_star(c|x) by `--estep`:
        softmax   exp(alpha * pi * q_hat) / Z            (ACL version, Eq. 5; --alpha)
        posterior pi * q_hat / Z                          (the exact E-step; uniform if all 0)
        hardmax   the decision with the larger pi*q_hat   (v1, alpha = infinity; ties -> cot)
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
from tqdm import tqdm

import evaluate as E
import model as M

DECISIONS = ("cot", "code")


def reference_strategy(pi, q_hat, estep="softmax", alpha=5.0):
    """s_star(c|x) for c in DECISIONS from pi(c|x) and q_hat(x,c) (dicts keyed by decision)."""
    score = {c: pi[c] * q_hat[c] for c in DECISIONS}
    if estep == "softmax":
        z = sum(math.exp(alpha * score[c]) for c in DECISIONS)
        return {c: math.exp(alpha * score[c]) / z for c in DECISIONS}
    if estep == "posterior":
        z = sum(score.values())
        return {c: score[c] / z if z > 0 else 1.0 / len(DECISIONS) for c in DECISIONS}
    if estep == "hardmax":
        best = max(DECISIONS, key=lambda c: (score[c], c == "cot"))
        return {c: float(c == best) for c in DECISIONS}
    raise ValueError(f"unknown --estep {estep}")


def weighted_subsample(weights, keep, rng):
    """Indices of `keep` items drawn without replacement with probability ~ weights."""
    keys = sorted(((rng.random() ** (1.0 / w), i) for i, w in enumerate(weights) if w > 0), reverse=True)
    return sorted(i for _, i in keys[:keep])          # Efraimidis-Spirakis keys u^(1/w)


@torch.no_grad()
def prefix_prior(model, tok, prompt, prefixes):
    """pi(c|x) from the model's probability of each decision prefix, normalised."""
    lps = M.sequence_logprobs(model, [prompt] * len(prefixes), [prefixes[c] for c in DECISIONS])
    logp = {c: float(lp.sum()) for c, lp in zip(DECISIONS, lps)}
    z = max(logp.values())
    w = {c: math.exp(logp[c] - z) for c in DECISIONS}
    return {c: w[c] / sum(w.values()) for c in DECISIONS}


def explore(model, tok, problems, k=4, native_k=0, estep="softmax", alpha=5.0, prior="native", keep=None,
            prefixes_text=None, max_new_tokens=384, temperature=1.0, seed=0, batch_size=32, fewshot=True,
            progress=True):
    """Run the E-step over `problems`; return one record per rollout (see the docstring).
    Rollouts of all queries for one decision are sampled together, `batch_size` at a time."""
    prefixes_text = prefixes_text or {c: E.MODES[c]["prefix"] for c in DECISIONS}
    prefixes = {c: tok(prefixes_text[c], add_special_tokens=False).input_ids for c in DECISIONS}
    instruction = E.MODES["autonomous"]["instruction"]
    prompts = [M.chat_prompt(tok, E.question_text(p["question"], fewshot), instruction) for p in problems]
    keep = keep or k
    rng = random.Random(seed)
    jobs = [(c, qi) for c in DECISIONS for qi in range(len(problems)) for _ in range(k)]
    jobs += [("native", qi) for qi in range(len(problems)) for _ in range(native_k)]
    rollouts = {}
    bar = tqdm(total=len(jobs), desc="E-step", disable=not progress, unit="rollout")
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        for c in dict.fromkeys(c for c, _ in chunk):
            part = [qi for d, qi in chunk if d == c]
            outs = M.sample(model, tok, [prompts[qi] for qi in part],
                            [prefixes[c] if c in prefixes else [] for _ in part], max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed * 100003 + start, code=(c != "cot"))
            for qi, o in zip(part, outs):
                rollouts.setdefault((c, qi), []).append(o)
            bar.update(len(part))
    bar.close()
    records = []
    for qi, p in enumerate(problems):
        pool = [(c, o) for c in DECISIONS for o in rollouts[(c, qi)]]
        native = rollouts.get(("native", qi), [])
        rewards = [float(E.grade(p, o.text)[1]) for _, o in pool]
        q_hat = {c: sum(r for (d, _), r in zip(pool, rewards) if d == c) / k for c in DECISIONS}
        native_rate = sum(bool(o.code_calls) for o in native) / len(native) if native else None
        if prior == "prefix":
            pi = prefix_prior(model, tok, prompts[qi], prefixes)
        else:
            rate = native_rate if native_rate is not None else 0.5
            pi = {"cot": 1.0 - rate, "code": rate}
        s_star = reference_strategy(pi, q_hat, estep, alpha)
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
    ap.add_argument("--native-k", type=int, default=0, help="unforced rollouts to estimate pi(c|x)")
    ap.add_argument("--estep", default="softmax", choices=["softmax", "posterior", "hardmax"])
    ap.add_argument("--alpha", type=float, default=5.0)
    ap.add_argument("--prior", default="native", choices=["native", "prefix"])
    ap.add_argument("--keep", type=int, default=None, help="rollouts kept per query (default k)")
    ap.add_argument("--cot-prefix", default=E.MODES["cot"]["prefix"])
    ap.add_argument("--code-prefix", default=E.MODES["code"]["prefix"])
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fewshot", dest="fewshot", action="store_false", help="drop evaluate.FEWSHOT")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=M.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="fp32", choices=list(M.DTYPES))
    ap.add_argument("--data", default="builtin:train")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", default="runs/explore.jsonl")
    add_args(ap)
    args = ap.parse_args()
    model, tok = M.load_model(args.model, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    problems = E.load_problems(args.data, args.queries, args.seed, shuffle=True)
    records = explore(model, tok, problems, args.k, args.native_k, args.estep, args.alpha, args.prior, args.keep,
                      {"cot": args.cot_prefix, "code": args.code_prefix}, args.max_new_tokens, args.temperature,
                      args.seed, fewshot=args.fewshot)
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
