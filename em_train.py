"""em_train.py -- the AutoCode EM loop: E-step (explore.py), then an off-policy M-step.

Each iteration (paper section 2, "M-step" and "loop"):
  1. Draw `--queries-per-iter` queries x from the training data.
  2. E-step (explore.explore): K prefix-forced rollouts per decision c, q_hat(x,c), pi(c|x),
     s_star(c|x), and the subsample D drawn with weights s_star. The policy that sampled D
     is frozen: its per-token behaviour log-probs pi_old were recorded while sampling.
  3. M-step, `--epochs` passes over D, minimising

        L = - E_D[ clip(ratio, 1 - eps, 1 + eps) * A ]  -  lambda * E_{c ~ s_star}[ log pi_theta(c | x) ]

     ratio = pi_theta(y_t | ...) / pi_old(y_t | ...) on the tokens the model sampled (prompt,
     forced prefix and execution output are masked out); A = the rewards of one query's
     rollouts whitened by their mean and std (all-equal rewards give A = 0). This is a bare
     clip of the ratio times A, as transcribed from the paper, not PPO's min.
     log pi_theta(c|x), the decision-alignment term: the log-probability of decision c's
     forcing prefix ("By hand: " or "```python\nprint("), unnormalised (`--decision-form raw`).
     At the token where the prefixes part its optimum is p("```") = s_star(code), p("By") =
     s_star(cot) and nothing left for other openings, so it teaches when to open a code block
     and how the words the E-step scored begin (see decision_logprobs for the other forms and
     what each did: the two-way form left "To" free to take the mass; the code-token-only
     form let one seed's own words drift to wrong guesses).
     Both terms are normalised per optimiser step, whatever its split into micro-batches:
     the ratio term by the step's sampled tokens, the decision term by the step's queries,
     each query counted once (`plan_step`; a test checks the gradient is split-invariant).
     A query on which both decisions scored the same (all rewards equal included) says
     nothing about c, so by default it adds no decision term (`--decision-queries all`
     restores the literal form);
     the exception is a tie where both succeeded, which under `--ties cot` (default) is
     evidence that words suffice, the paper's oracle rule (explore.py; `--ties perfect`:
     only where both always succeeded).
     Each micro-batch runs two backwards, the ratio term's and then the decision term's
     (`accumulate`): the same gradient as one backward of their sum, with one graph alive
     at a time.
  4. Log one JSON line of metrics, evaluate every `--eval-every`, checkpoint atomically.

Baselines, one flag away (`--algo`). What is equal across them, per query: the rollouts
sampled (2K prefix-forced + `--native-k` unforced for em and sft; 2K + native_k unforced for
rl), and the M-step budget: at most `--keep` (default K) items, with the same --epochs,
--batch-size, --grad-accum and lr, hence the same number of optimiser steps (sft: fewer where
fewer than `keep` rollouts succeeded).
  em   the above (default)
  rl   the paper's "standard RL": the same ratio term on `keep` of the query's native
       (unforced) rollouts, drawn uniformly, whitened over all of them; no E-step, no
       decision term
  sft  rejection-sampled fine-tuning: negative log-likelihood of up to `keep` successful
       prefix-forced rollouts (prefix and sampled tokens; execution output masked)

Choices the paper leaves open (flags): `--is-mode surrogate` (gradient through the clipped
ratio: zero outside the clip range) or `weighted_nll` (stop-gradient clipped ratio times
log pi); `--ratio token|sequence|sequence_mean` (the plain sequence ratio drifts with length
and, clipped, soon carries no gradient; sequence_mean is its length-normalised form);
`--adv whiten|raw`; whitening statistics are taken over all of a query's rollouts, not
only the kept ones; `--decision-coef` (lambda) 1; `--kl-coef` 0 (if set, the k3 estimate of
KL(pi_old || pi_theta) on the sampled tokens); AdamW, grad-norm clip 1.0. Sampling is plain
temperature sampling, which the loss also uses so that ratio = 1 on-policy; top-p and
top-k are refused in training, because teacher forcing uses the full softmax. The
autonomous prompt of every rollout and evaluation is `--autonomous-prompt neutral` (names
neither decision; the untrained embedded model then almost never codes by itself) or
`invite` (evaluate.AUTONOMOUS): which one decides what `rl` can discover (README, Results).

Run:  python em_train.py                                     # SmolLM2-135M, built-in task, CPU
      python em_train.py --model tiny --iterations 2        # the whole loop in about a minute
      python em_train.py --model Qwen2.5-0.5B --data ../shared/data/gsm8k_train.jsonl --eval-data builtin:test
      python em_train.py --out runs/em --resume             # continue a killed run
      torchrun --nproc_per_node 8 em_train.py --fsdp --model Qwen2.5-7B --dtype bf16   # see distributed.py
Outputs under --out: metrics.jsonl, explore-iter{N}.jsonl, eval-iter{N}/, checkpoint/.
"""
import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
import zipfile

import numpy as np
import torch
from tqdm import tqdm

import distributed as D
import evaluate as E
import explore as X
import model as M
from model import release_freed_memory


# ---------------------------------------------------------------------------------------
# Advantages and the loss
# ---------------------------------------------------------------------------------------
def whiten(rewards, eps=1e-6):
    """A_i = (r_i - mean) / (std + eps) within one query's group; all-equal rewards give 0."""
    r = torch.tensor(rewards, dtype=torch.float64)
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).tolist()


def ratio_term(logp, old, sampled, adv, clip_eps=0.2, is_mode="surrogate", ratio="token"):
    """-clip(ratio, 1-eps, 1+eps) * A for a micro-batch, summed, with stats.

    logp: list of [R_i] teacher-forced log-probs (with grad); old: list of [R_i] behaviour
    log-probs; sampled: list of [R_i] bool masks; adv: list of floats. Returns (sum over the
    aggregation units, number of units, stats dict) so callers can average across micro-batches.
    ratio: "token" (one ratio per sampled token), "sequence" (the product over the sequence:
    exp of the summed log-ratio; it drifts with length, so after one step at a moderate lr
    most sequences sit outside the clip range and, with the surrogate, get no gradient), or
    "sequence_mean" (exp of the mean per-token log-ratio: a length-normalised sequence ratio
    that stays near 1 as long as each token's ratio does).
    """
    total, units = 0.0 * sum(lp.sum() for lp in logp), 0      # a graph even if no token was sampled
    ratios, clipped = [], 0
    for lp, lo, m, a in zip(logp, old, sampled, adv):
        lp, lo = lp[m], lo[m]
        if lp.numel() == 0:
            continue
        log_rho = {"token": lambda: lp - lo, "sequence": lambda: (lp - lo).sum().reshape(1),
                   "sequence_mean": lambda: (lp - lo).mean().reshape(1)}[ratio]()
        rho = torch.exp(log_rho)
        rho_c = rho.clamp(1 - clip_eps, 1 + clip_eps)
        if is_mode == "surrogate":
            term = -(rho_c * a)
        else:                      # stop-gradient weight on log pi: the same direction, no zeroing
            log_pi = {"token": lp, "sequence": lp.sum().reshape(1), "sequence_mean": lp.mean().reshape(1)}[ratio]
            term = -(rho_c.detach() * a) * log_pi       # on-policy: the surrogate's gradient, in every --ratio
        total = total + term.sum()
        units += rho.numel()
        ratios.append(rho.detach())
        clipped += int(((rho.detach() < 1 - clip_eps) | (rho.detach() > 1 + clip_eps)).sum())
    allr = torch.cat(ratios) if ratios else None               # no sampled token: no ratio to report
    return total, units, {"ratio_mean": None if allr is None else float(allr.mean()),
                          "ratio_max": None if allr is None else float(allr.max()),
                          "clipped": clipped, "ratio_n": sum(r.numel() for r in ratios)}


def k3(logp, old):
    """Per-token k3 estimate of KL(pi_old || pi_theta) for tokens sampled from pi_old:
    rho - 1 - log rho with rho = pi_theta / pi_old. Its expectation under pi_old is exactly
    that KL, and every term is >= 0 (Schulman's "approximating KL divergence" note)."""
    log_rho = logp - old
    return torch.exp(log_rho) - 1 - log_rho


def kl_term(logp, old, sampled):
    """The k3 estimate summed over the sampled tokens of a micro-batch, and their count."""
    total, n = 0.0, 0
    for lp, lo, m in zip(logp, old, sampled):
        total = total + k3(lp[m], lo[m]).sum()
        n += int(m.sum())
    return total, n


def decision_logprobs(model, prompts, prefixes, temperature=1.0, form="raw"):
    """log pi_theta(c|x) for every prompt and decision, as a [queries, decisions] tensor.

    form="raw" (default): the summed log-probability of decision c's whole prefix. Weighted by
    s_star and summed over c, the term is, at the token d where the prefixes part, the
    cross-entropy between the model's next-token distribution and a target that puts s_star(c)
    on each decision's token and nothing elsewhere, plus "continue c's prefix this way" weighted
    by s_star(c). Its optimum is p(code token) = s_star(code) and p(CoT token) = s_star(cot):
    it moves what the model opens with against every other token and names the opening of the
    words the E-step scored. Six seeds with it: 0.73-0.82 on 256 held-out problems and the
    code-rate target in all six; two continued to 12 iterations kept their words (README).
    form="absolute": pi(code|x) = p(code token at d) times the rest of the code prefix,
    pi(cot|x) = 1 - p(code token): any other opening counts as words. It names no opening for
    words, and continued to 12 iterations one seed's own words drifted from the "By hand: ..."
    ones the E-step scored to short wrong guesses (add_small 0.12 right; README).
    form="opening": both decisions' tokens at d, normalised over the two, plus the log-prob of
    the rest of c's prefix. It ignores every other opening: after EM with it the greedy model
    opened 58-78 of 128 code-worthy test problems with "To" and wrote no code, while the
    two-way pi(code|x) read 0.6-0.8, because pushing "```" up against "By" left "To" free.
    form="normalized": the whole prefix's probability normalised over c; a push towards CoT
    then also lowers p(`print(` | "```python"), i.e. it teaches worse code (measured: after one
    iteration the greedy model opened code blocks with `def` and never printed)."""
    return decision_form(M.sequence_logprobs(model, *decision_sequences(prompts, prefixes), temperature), prefixes, form)


def decision_sequences(prompts, prefixes):
    """The (prompt, response) pairs whose teacher-forced log-probs decision_form reads: each
    prompt with each decision's prefix, in the order of `prefixes`."""
    return [p for p in prompts for _ in prefixes], [prefixes[c] for _ in prompts for c in prefixes]


def decision_form(lps, prefixes, form="raw"):
    """log pi_theta(c|x) as a [queries, decisions] tensor, from the log-probs of
    decision_sequences (see decision_logprobs for the forms)."""
    cs = list(prefixes)
    rows = [lps[i:i + len(cs)] for i in range(0, len(lps), len(cs))]
    d = len(os.path.commonprefix([prefixes[c] for c in cs]))
    if any(d >= len(prefixes[c]) for c in cs):
        raise ValueError("decision prefixes must differ at a token both have (one is a prefix of the other)")
    total = torch.stack([torch.stack([lp.sum() for lp in row]) for row in rows])
    if form == "raw":
        return total
    if form == "normalized":
        return torch.log_softmax(total, dim=1)
    choice = torch.stack([torch.stack([lp[d] for lp in row]) for row in rows])
    rest = torch.stack([torch.stack([lp[d + 1:].sum() for lp in row]) for row in rows])
    if form == "absolute":                  # code: its opening token; words: every other token
        code = choice[:, cs.index("code")]
        words = torch.log((-torch.expm1(code)).clamp(min=1e-12))     # log(1 - p), stable near p = 1
        return torch.stack([code + rest[:, j] if c == "code" else words for j, c in enumerate(cs)], dim=1)
    return torch.log_softmax(choice, dim=1) + rest


def decision_term(logp, prefixes, s_star):
    """-sum_c s_star(c|x) * log pi_theta(c|x), summed over the queries: logp is decision_logprobs'
    [queries, decisions] tensor, s_star one dict per query."""
    weights = torch.tensor([[s[c] for c in prefixes] for s in s_star], dtype=logp.dtype, device=logp.device)
    return -(weights * logp).sum()


def informative(record, ties="cot"):
    """Does a query carry evidence about c? Not when both decisions scored the same
    (all rewards equal included): then s_star only echoes the prior, and training pi(c|x)
    towards it would be imitation of the prefixes, not learning when to code. Except, under
    `--ties cot`, a tie where both succeeded (`--ties perfect`: always): that says "words
    suffice" (explore.py)."""
    q = record["q_hat"]
    return q["cot"] != q["code"] or X.tied_success(q, ties)


# ---------------------------------------------------------------------------------------
# Data for the M-step
# ---------------------------------------------------------------------------------------
def training_data(algo, records, adv_mode, keep, rng):
    """Turn rollout records into M-step items: tokens, masks, behaviour log-probs, A.

    The M-step budget is the same for every --algo: at most `keep` items per query.
    em trains on the E-step's subsample (drawn with weights s_star, `kept`); rl on `keep` of
    its native rollouts drawn uniformly; sft on up to `keep` successful forced rollouts drawn
    uniformly (fewer where fewer succeeded). Advantages are whitened over all of a query's
    rollouts, kept or not."""
    groups = {}
    for r in records:
        groups.setdefault(r["query_id"], []).append(r)
    items = []
    for qid, rs in groups.items():
        adv = whiten([r["reward"] for r in rs]) if adv_mode == "whiten" else [r["reward"] for r in rs]
        if algo == "em":
            chosen = [i for i, r in enumerate(rs) if r["kept"]]
        else:
            pool = [i for i, r in enumerate(rs) if algo == "rl" or r["reward"] >= 1]
            chosen = sorted(rng.sample(pool, min(keep, len(pool))))
        for i in chosen:
            r, train_mask = rs[i], list(rs[i]["sampled"])
            if algo == "sft":              # imitate the decision prefix too
                train_mask = [m or j < r["n_prefix"] for j, m in enumerate(r["sampled"])]
            items.append({"query_id": qid, "prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"],
                          "mask": train_mask, "old": r["behaviour_logprobs"], "adv": adv[i]})
    return items


def native_records(model, tok, problems, n, args, seed):
    """The `rl` baseline's data: n unforced rollouts per query, graded."""
    prompts = [E.autonomous_chat(tok, p["question"], args.fewshot, args.autonomous_prompt) for p in problems]
    jobs = [qi for qi in range(len(problems)) for _ in range(n)]
    records = []
    bar = E.Progress(len(jobs), "rollouts", enabled=D.is_main(), max_new_tokens=args.max_new_tokens)
    for start in range(0, len(jobs), args.sample_batch):
        part = jobs[start:start + args.sample_batch]
        outs = M.sample(model, tok, [prompts[qi] for qi in part], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, seed=seed * 100003 + start, progress=bar.hook)
        bar.batch_done(outs)
        for qi, o in zip(part, outs):
            p = problems[qi]
            records.append({"query_id": p["id"], "query": p["question"], "answer": p["answer"], "decision": "native",
                            "response": o.text, "reward": float(E.grade(p, o.text)[1]), "kept": True,
                            "code_calls": len(o.code_calls), "prompt_ids": o.prompt_ids,
                            "response_ids": o.response_ids, "sampled": o.sampled, "n_prefix": 0,
                            "behaviour_logprobs": o.logprobs})
    bar.close()
    return records


# ---------------------------------------------------------------------------------------
# The M-step
# ---------------------------------------------------------------------------------------
def plan_step(step, batch_size, ctx, args):
    """Split one optimiser step into micro-batches and fix what normalises its loss, so the
    step's gradient does not depend on how it is split: the ratio term is averaged over the
    step's units (tokens or sequences), the decision term over the step's queries, and each
    query's decision term is added once, in the first micro-batch that holds one of its items.
    Items are sorted by prompt, so that rollouts of one query sit together and share their prompt
    in the packed forward (sequence_logprobs), and a micro-batch takes at most `batch_size` items
    and at most `--micro-tokens` packed tokens, its decision prefixes included (one item alone may
    exceed it): a 486-token response beside three others once set a run's peak memory."""
    def carries_decision(q):
        return args.algo == "em" and bool(args.decision_coef) and (
            args.decision_queries == "all" or informative(ctx["record_of"][q], args.ties))
    micro, seqs, seen = [], [], set()
    for it in sorted(step, key=lambda it: (it["prompt_ids"], len(it["response_ids"]))):
        new = [(it["prompt_ids"], it["response_ids"])]
        if it["query_id"] not in seen and carries_decision(it["query_id"]):     # its decision term rides here
            new += zip(*decision_sequences([ctx["record_of"][it["query_id"]]["prompt_ids"]], ctx["prefixes"]))
        seen.add(it["query_id"])
        if micro and len(micro[-1]) < batch_size and M.packed_length(*zip(*seqs + new)) <= args.micro_tokens:
            micro[-1].append(it)
            seqs += new
        else:
            micro.append([it])
            seqs = new
    per_token = args.ratio == "token" or args.algo == "sft"
    first = {}
    for j, mb in enumerate(micro):
        for it in mb:
            first.setdefault(it["query_id"], j)
    decide = [[q for q, j0 in first.items() if j0 == j and carries_decision(q)] for j in range(len(micro))]
    ctx.update(units=max(1, sum(sum(it["mask"]) if per_token else 1 for it in step)),
               tokens=max(1, sum(sum(it["mask"]) for it in step)), queries=max(1, len(first)))
    return micro, decide


def micro_loss(model, mb, queries, ctx, args, stats):
    """The loss of one micro-batch, normalised by its whole optimiser step (ctx), so the
    micro-batches of a step simply add up: the ratio (or sft) term of its rollouts, plus lambda
    times the decision term of `queries` (plan_step gives each query's to one micro-batch; none
    under --algo rl/sft or --decision-coef 0). One packed forward holds both: a query's decision
    prefixes follow its rollouts behind the opening they share (sequence_logprobs), so the few-shot
    demonstrations are not run again for the decision term. Under --fsdp a rank with nothing left still runs a forward and a
    backward (each is a collective): one token, weight 0. Adds the loss terms to ctx["terms"]
    and ratio stats to `stats`."""
    if queries and args.decision_trust:
        queries = within_trust(model, queries, ctx, args)
    prompts, responses = decision_sequences([ctx["record_of"][q]["prompt_ids"] for q in queries], ctx["prefixes"])
    prompts, responses = [it["prompt_ids"] for it in mb] + prompts, [it["response_ids"] for it in mb] + responses
    if not prompts:
        return 0.0 * M.sequence_logprobs(model, [[0]], [[0]])[0].sum()
    logp = M.sequence_logprobs(model, prompts, responses, args.temperature)
    loss = ratio_loss(logp[:len(mb)], mb, ctx, args, stats) if mb else 0.0
    if queries:
        d = decision_term(decision_form(logp[len(mb):], ctx["prefixes"], args.decision_form), ctx["prefixes"],
                          [ctx["record_of"][q]["s_star"] for q in queries]) * args.decision_coef / ctx["queries"]
        ctx["terms"]["loss_decision"] += d.item()
        loss = loss + d
    return loss


def ratio_loss(logp, mb, ctx, args, stats):
    """The ratio (or sft) term of the rollouts `mb`, from their teacher-forced log-probs."""
    dev = logp[0].device                       # every tensor of the loss lives where the model does
    masks = [torch.tensor(it["mask"], dtype=torch.bool, device=dev) for it in mb]
    old = [torch.tensor(it["old"], dtype=torch.float32, device=dev) for it in mb]
    if args.algo == "sft":
        loss = -sum(lp[m].sum() for lp, m in zip(logp, masks)) / ctx["units"]
        ctx["terms"]["loss_sft"] += loss.item()
        return loss
    total, _, st = ratio_term(logp, old, masks, [it["adv"] for it in mb], args.clip_eps, args.is_mode, args.ratio)
    loss = total / ctx["units"]
    ctx["terms"]["loss_ratio"] += loss.item()
    for key in ("ratio_mean", "ratio_max"):
        if st["ratio_n"]:                      # a micro-batch of forced tokens only would read as 1.0
            stats[key].append(st[key])
    stats["clipped"] += st["clipped"]
    stats["ratio_n"] += st["ratio_n"]
    if args.kl_coef:
        kl, _ = kl_term(logp, old, masks)
        loss = loss + args.kl_coef * kl / ctx["tokens"]
        ctx["terms"]["loss_kl"] += kl.item() / ctx["tokens"]
    return loss


def decision_prefixes(tok, args):
    """The token ids of the prefixes that force each decision (--cot-prefix, --code-prefix)."""
    return {c: tok(p, add_special_tokens=False).input_ids for c, p in (("cot", args.cot_prefix),
                                                                     ("code", args.code_prefix))}


def choice_probability(model, prompts, prefixes, chunk=8, form="absolute", temperature=1.0):
    """pi(code|x) at the token where the decisions' prefixes part, for each prompt (no gradient):
    the code token's own probability (form "absolute"), else normalised over the two decisions'
    tokens; at `temperature` (the trust region measures the tempered policy the loss trains). `chunk` prompts per forward: one forward over an evaluation's 32 few-shot prompts
    (64 sequences) took 1.1 GB more than the rest of the loop's peak."""
    d = len(os.path.commonprefix(list(prefixes.values())))
    cut = {c: ids[:d + 1] for c, ids in prefixes.items()}
    code = list(prefixes).index("code")
    # on the cut prefixes "normalized" equals "opening"; "raw" is logged as "opening" too
    form = "absolute" if form == "absolute" else "opening"
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), chunk):
            out += decision_logprobs(model, prompts[s:s + chunk], cut, temperature, form)[:, code].exp().tolist()
    return out


def within_trust(model, decide, ctx, args):
    """--decision-trust: of the queries in `decide`, those whose pi(code|x) has not yet moved
    `--decision-trust` towards s_star(code) since the M-step began (ctx["pi_old"]). A trust
    region in the spirit of PPO's clip, for the decision: the E-step's targets stay fixed for
    the whole M-step, and without a bound pi(code) moved by up to 0.3-0.4 from one iteration
    to the next at the defaults (README, Results). It bounds the gradient, not AdamW's momentum,
    so a dropped query can still drift on. Costs one extra forward over the step's decision prompts."""
    now = choice_probability(model, [ctx["record_of"][q]["prompt_ids"] for q in decide], ctx["prefixes"],
                             form=args.decision_form, temperature=args.temperature)
    keep = []
    for q, p in zip(decide, now):
        old = ctx["pi_old"][q]
        towards = 1.0 if ctx["record_of"][q]["s_star"]["code"] > old else -1.0
        if towards * (p - old) < args.decision_trust:
            keep.append(q)
    ctx["trust_dropped"] += len(decide) - len(keep)
    ctx["trust_seen"] += len(decide)
    return keep


def trimming(model, every):
    """Hooks that call release_freed_memory at every `every`-th decoder layer, for the M-step
    (returns their handles; remove them after): once after the layer's forward, and once when
    the backward reaches it (a hook on the gradient of its output). Trimming between
    micro-batches alone is not enough: inside one, the recomputed activations and the
    gradients, all of different sizes, leave holes that glibc keeps resident (1.2-1.3 GB of free
    heap at the peak of a default M-step). Replaying three of em-s0's M-steps (ad hoc, 2-core
    CPU, alone, the same losses in each): peak 4.05 GB in 227 s without; every 5th layer's
    forward only 3.74 GB in 214 s; forward and backward at every 5th layer 3.48 GB in 253 s, at
    every 10th 3.50 GB in 244 s (the default: --trim-every 10). 0: off."""
    def hook(layer, inputs, output):
        release_freed_memory()
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: release_freed_memory())
    layers = list(getattr(getattr(model, "model", None), "layers", [])) if every else []
    return [layer.register_forward_hook(hook) for i, layer in enumerate(layers) if i % every == every - 1]


def accumulate(model, micro, decide, ctx, args, stats, bar=None):
    """The forwards and backwards of one optimiser step; the gradients add up in .grad."""
    for j in range(D.all_max(len(micro))):
        loss = micro_loss(model, *((micro[j], decide[j]) if j < len(micro) else ([], [])), ctx, args, stats)
        loss.backward()
        del loss
        release_freed_memory()
        if bar is not None:
            bar.update(len(micro[j]) if j < len(micro) else 0)


def m_step(model, tok, opt, items, records, args, rng):
    """`--epochs` passes over the items; returns averaged loss terms and optimiser stats."""
    model.train()
    ctx = {"prefixes": decision_prefixes(tok, args), "record_of": {r["query_id"]: r for r in records}}
    stats = {"loss_ratio": [], "loss_decision": [], "loss_kl": [], "loss_sft": [], "grad_norm": [],
             "ratio_mean": [], "ratio_max": [], "clipped": 0, "ratio_n": 0}
    steps = []
    for epoch in range(args.epochs):
        order = list(range(len(items)))
        rng.shuffle(order)
        size = args.batch_size * args.grad_accum
        steps += [[items[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
    if args.algo == "em" and args.decision_trust:     # pi(code|x) where the M-step starts
        qs = [q for q, r in ctx["record_of"].items() if args.decision_queries == "all" or informative(r, args.ties)]
        ctx["pi_old"] = dict(zip(qs, choice_probability(model, [ctx["record_of"][q]["prompt_ids"] for q in qs],
                                                        ctx["prefixes"], form=args.decision_form,
                                                        temperature=args.temperature) if qs else []))
        ctx["trust_dropped"] = ctx["trust_seen"] = 0
    n_steps = D.all_max(len(steps))
    hooks = trimming(model, args.trim_every)
    bar = tqdm(total=sum(map(len, steps)), desc="M-step", unit="rollout", disable=not D.is_main())
    for s in range(n_steps):
        step = steps[s] if s < len(steps) else []
        micro, decide = plan_step(step, args.batch_size, ctx, args)
        ctx["terms"] = {"loss_ratio": 0.0, "loss_decision": 0.0, "loss_kl": 0.0, "loss_sft": 0.0}
        opt.zero_grad(set_to_none=True)
        accumulate(model, micro, decide, ctx, args, stats, bar)
        if step:
            for k, v in ctx["terms"].items():
                stats[k].append(v)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        stats["grad_norm"].append(D.scalar(norm))
        opt.step()
    opt.zero_grad(set_to_none=True)             # the gradients are not needed while sampling: free them
    for h in hooks:
        h.remove()
    release_freed_memory()
    bar.close()
    model.eval()
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    terms = ["loss_sft"] if args.algo == "sft" else ["loss_ratio"]
    terms += ["loss_decision"] * (args.algo == "em" and bool(args.decision_coef)) + ["loss_kl"] * bool(args.kl_coef)
    return {**{k: mean(stats[k]) for k in terms},
            "ratio_mean": mean(stats["ratio_mean"]), "ratio_max": max(stats["ratio_max"], default=None),
            "clip_frac": stats["clipped"] / stats["ratio_n"] if stats["ratio_n"] else None,
            "grad_norm": mean(stats["grad_norm"]), "optimizer_steps": len(stats["grad_norm"]),
            **({"decision_trust_dropped": ctx["trust_dropped"] / max(1, ctx["trust_seen"])}
               if args.algo == "em" and args.decision_trust else {})}


# ---------------------------------------------------------------------------------------
# Checkpoints: atomic save, exact resume
# ---------------------------------------------------------------------------------------
def save_checkpoint(out, model, tok, opt, iteration, save_dtype="fp32", dtype="fp32"):
    """model (transformers format) + optimizer + RNG + iteration + the dtype it computed in,
    swapped in atomically.
    save_dtype "bf16" also writes export-bf16/ inside it (so it is swapped in with the rest):
    the weights cast to bf16 with config and tokenizer, a light copy for inference or sharing
    that resume never reads."""
    if D.ENABLED:
        model_state, opt_state = D.full_state(model, opt)          # every rank takes part
    else:
        model_state, opt_state = None, opt.state_dict()
    if not D.is_main():
        return
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    if save_dtype == "bf16":                  # first: save_pretrained empties the dict it is given
        export_bf16(os.path.join(tmp, "export-bf16"), model, tok, model_state)
    model.save_pretrained(tmp, state_dict=model_state)
    tok.save_pretrained(tmp)
    torch.save({"optimizer": opt_state, "iteration": iteration, "dtype": dtype,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)                     # a kill before this line leaves checkpoint.old
    shutil.rmtree(old, ignore_errors=True)


def export_bf16(path, model, tok, state=None):
    """A transformers-format copy of the weights in bf16, its config saying so."""
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in (state if state is not None else model.state_dict()).items()}
    model.save_pretrained(path, state_dict=state)
    tok.save_pretrained(path)
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config["dtype"] = "bfloat16"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def find_checkpoint(out):
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def append_metrics(path, row, keep_until=None):
    """Append one JSON line; with keep_until, first drop lines past that iteration (resume).
    The file is rewritten whole and swapped in: a kill leaves the old file or the new one, never
    half a line for the next --resume to stumble on."""
    rows = []
    if os.path.exists(path):
        rows = [_metrics_line(path, n, line) for n, line in enumerate(open(path), 1) if line.strip()]
    rows = [r for r in rows if keep_until is None or r["iteration"] <= keep_until]
    X.write_jsonl_atomic(path, rows + ([row] if row is not None else []))


def _metrics_line(path, lineno, line):
    try:
        row = json.loads(line)
        int(row["iteration"])
        return row
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {path}:{lineno}: not a metrics line (a JSON object with an 'iteration'); "
                         f"move the file away to start its metrics afresh") from None


# ---------------------------------------------------------------------------------------
# Precision: fp32 master weights and optimizer state; --dtype bf16 computes in bf16 (auto, the
# default: bf16 where its matrix products are fast, model.fast_bf16; fp32 elsewhere)
# ---------------------------------------------------------------------------------------
def sampler_of(model, args):
    """The model the sampler runs. With --dtype bf16 in one process: a bf16 copy of the fp32
    master weights, taken afresh before every sampling phase (bf16 matrix products are ~2.5x
    faster on recent CPUs and GPUs; the copy costs half the weights' memory while it lives).
    Its behaviour log-probs then differ from the M-step's teacher forcing (fp32 weights,
    bf16 autocast) by bf16 rounding, so the on-policy ratio is 1 within bf16 noise. Under
    --fsdp the gathered parameters are already bf16 (distributed.shard's policy)."""
    if args.dtype != "bf16" or args.fsdp:
        return model
    # each weight cast straight to bf16 as the copy is made: deepcopy then .to() held a whole
    # fp32 copy for a moment (measured on the embedded model: +0.58 GB at the copy, now +0.26)
    # Buffers stay fp32, as under FSDP's bf16 and in a model loaded in bf16: RoPE's inv_freq
    # rounded to bf16 moved the embedded model's cos/sin at position 300 by up to 0.41 against
    # the M-step's fp32 ones.
    memo = {id(t): torch.nn.Parameter(t.detach().to(torch.bfloat16), requires_grad=False)
            for t in model.parameters() if t.is_floating_point()}
    return copy.deepcopy(model, memo).eval()


def snap_to_bf16(model):
    """Round the fp32 master weights to the nearest bf16 values, once, before the first M-step
    of a fresh --dtype bf16 run (a resumed run's masters are its own and stay as they are).
    The bf16 forward (autocast's casts, the sampler's copy, FSDP's bf16 parameters) rounds each
    weight to nearest, ties to even. The embedded model's weights come from f16 and 8% of them
    sit exactly on a tie, so the first step of any size, even lr 1e-7, tips every one of them a
    whole bf16 spacing in the direction of its gradient's sign (Adam's first step): the bf16
    model moved as if the learning rate were ~1e-5 whatever --lr said, and one step swung
    pi(code|x) from ~0.5 to 0.05-0.1 on every query (README, Results). Starting the masters on the
    bf16 grid changes nothing the sampler sees and removes the ties."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))


def computed_in(ckpt):
    """The dtype a checkpoint's run computed in (None: no checkpoint). With --dtype auto a run
    started in fp32 on one machine may go on in bf16 on another: its masters, off the bf16 grid
    after fp32 steps, are snapped then as a fresh run's are. Checkpoints from before the dtype
    was saved say nothing; bf16 was the default then, so they count as bf16."""
    if not ckpt:
        return None
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False, mmap=True).get("dtype", "bf16")


def agree_dtype(dtype):
    """Under --fsdp every rank must compute in one dtype (their all-gathers move one): ranks on
    different hardware that resolved --dtype auto differently all take fp32."""
    chosen = set(D.gather([dtype]))
    if len(chosen) > 1 and D.is_main():
        print(f"[em] --dtype auto: the ranks resolved it to {sorted(chosen)}; all compute in fp32", file=sys.stderr)
    return dtype if len(chosen) == 1 else "fp32"


def autocast(model, args):
    """bf16 matrix products over fp32 weights for the M-step under --dtype bf16 in one
    process; gradients and AdamW state stay fp32, so a step of lr 1e-6 still moves a weight
    of 0.02 (a bf16 weight could not: its spacing there is ~1.2e-4).
    Without its cast cache: autocast keeps the bf16 copy of each weight it has cast until the
    outermost context exits, and the M-step runs inside one context, so every step after the
    first would compute its forward (and the ratio pi_theta/pi_old, and the clip) at the weights
    the M-step started from while AdamW moves the real ones. That bug made every earlier bf16
    run's ratio 1 and its clip inert (README, Results)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and not args.fsdp,
                          cache_enabled=False)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def evaluate_iteration(model, tok, args, iteration, rank=0, world=1):
    problems = E.load_problems(args.eval_data, args.eval_n)[rank::world]
    out = os.path.join(args.out, f"eval-iter{iteration}", f"rank{rank}" if world > 1 else "")
    with D.gathered(model):
        records, _ = E.run(sampler_of(model, args), tok, problems, args.eval_modes, out, max_new_tokens=args.max_new_tokens,
                           batch_size=args.sample_batch, fewshot=args.fewshot, progress=D.is_main(),
                           autonomous=args.autonomous_prompt)
    release_freed_memory()
    records = D.gather(records)
    s = E.summarize(records, args.eval_modes)
    row = {f"eval_acc_{m}": s[m]["accuracy"] for m in args.eval_modes if m in s}
    if "autonomous" in s:
        row["eval_code_rate"] = s["autonomous"]["code_rate"]
        for g, v in s["autonomous"].get("code_rate_by_group", {}).items():   # built-in task: compute / easy / hard
            row[f"eval_code_rate_{g}"] = v
        for g, v in s["autonomous"].get("accuracy_by_group", {}).items():
            row[f"eval_acc_autonomous_{g}"] = v
        if not args.fsdp:
            pi = code_probability(model, tok, problems, args)
            for g in sorted({p["group"] for p in problems if "group" in p}):
                row[f"eval_pi_code_{g}"] = _mean(q for p, q in zip(problems, pi) if p.get("group") == g)
    if "selection_accuracy" in s:
        row["eval_selection_acc"] = s["selection_accuracy"]["value"]
    return row


def code_probability(model, tok, problems, args):
    """pi(code|x) at the token where the decisions' prefixes part, for each problem's
    autonomous prompt. The greedy code rate flips every query at once when a shared bias
    crosses 1/2; this shows whether the model tells kinds apart underneath."""
    prompts = [E.autonomous_chat(tok, p["question"], args.fewshot, args.autonomous_prompt) for p in problems]
    with autocast(model, args):
        pi = choice_probability(model, prompts, decision_prefixes(tok, args), form=args.decision_form)
    release_freed_memory()
    return pi


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algo", default="em", choices=["em", "rl", "sft"])
    ap.add_argument("--model", default=M.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="auto", choices=["auto", *M.DTYPES],
                    help="bf16: fp32 master weights and AdamW state, bf16 matrix products (~2.5x faster on "
                         "CPUs with native bf16 and GPUs, ~50x slower on AVX2-only CPUs); auto: bf16 where it is native, else fp32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data", default="builtin:train")
    ap.add_argument("--train-size", type=int, default=2000, help="queries drawn from (built-in task size)")
    ap.add_argument("--iterations", type=int, default=8,
                    help="EM iterations (8: where both default seeds had separated the kinds; README, Results)")
    ap.add_argument("--queries-per-iter", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per forward (micro-batch)")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--micro-tokens", type=int, default=1536,
                    help="at most this many tokens per micro-batch, as packed (the shared prompt opening once, "
                         "then each sequence's rest: model.packed_length); "
                         "--batch-size * --grad-accum items still make one optimizer step")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--clip-eps", type=float, default=0.2)
    ap.add_argument("--decision-coef", type=float, default=1.0, help="lambda")
    ap.add_argument("--decision-trust", type=float, default=0.0,
                    help="drop a query's decision term once pi(code|x) has moved this far towards s_star "
                         "within the M-step (0: off; e.g. 0.1)")
    ap.add_argument("--decision-form", default="raw", choices=["raw", "absolute", "opening", "normalized"],
                    help="log pi(c|x): the prefix's own log-prob (raw), the code token's probability against "
                         "every other token (absolute), the two deciding tokens normalised plus the rest of the "
                         "prefix (opening), or the whole prefix normalised over the decisions")
    ap.add_argument("--decision-queries", default="informative", choices=["informative", "all"],
                    help="train pi(c|x) only on queries whose decisions scored differently, or on all (literal)")
    ap.add_argument("--is-mode", default="surrogate", choices=["surrogate", "weighted_nll"])
    ap.add_argument("--ratio", default="token", choices=["token", "sequence", "sequence_mean"])
    ap.add_argument("--adv", default="whiten", choices=["whiten", "raw"])
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--sample-batch", type=int, default=32, help="rollouts sampled together")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--eval-data", default=None, help="default builtin:test when --data is builtin")
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--no-eval-first", dest="eval_first", action="store_false",
                    help="skip evaluating the untrained model as iteration 0")
    ap.add_argument("--eval-modes", nargs="+", default=list(E.MODES), choices=list(E.MODES))
    ap.add_argument("--out", default="runs/em")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 across torchrun ranks (distributed.py)")
    ap.add_argument("--cpu-offload", action="store_true",
                    help="with --fsdp: keep the shards, their gradients and the optimizer state in CPU memory")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="activation checkpointing: keep only each layer's input, recompute the rest in backward "
                         "(default on; one default M-step on a 2-core CPU: 6-11%% longer, and with --trim-every's trimming "
                         "a 4.2 GB peak instead of 7.6 GB)")
    ap.add_argument("--trim-every", type=int, default=10,
                    help="in the M-step, give freed memory back to the OS at every N-th decoder layer, after its "
                         "forward and when the backward reaches it (see trimming); 0: only between micro-batches")
    ap.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the checkpoint is always fp32 (what resume needs); bf16 also writes checkpoint/export-bf16")
    X.add_args(ap)
    ap.set_defaults(max_new_tokens=64)
    args = ap.parse_args(argv)
    if args.cpu_offload and not args.fsdp:
        ap.error("--cpu-offload shards with FSDP2: add --fsdp (torchrun --nproc_per_node 1 works)")
    if args.eval_data is None and args.data.startswith("builtin"):
        args.eval_data = "builtin:test"
    return args


def check_args(args):
    """Every flag and file, before the model loads or anything is written (one line each).
    Returns the number of training problems in a --data file (None for built-in or hub data)."""
    args.eval_modes = list(dict.fromkeys(args.eval_modes))      # "--eval-modes cot cot" is cot once
    E.check_numbers(args, positive=("--train-size", "--iterations", "--queries-per-iter", "--epochs", "--lr",
                                    "--batch-size", "--grad-accum", "--micro-tokens", "--max-grad-norm", "--clip-eps",
                                    "--sample-batch", "--eval-n"),
                    non_negative=("--decision-coef", "--decision-trust", "--kl-coef", "--eval-every",
                                  "--trim-every"))
    if args.decision_trust and args.fsdp:
        E.fail("--decision-trust is for one process (its extra forwards differ between ranks); drop --fsdp")
    X.check_estep_args(args, uses_prior=args.algo != "rl")
    n_data = E.check_data(args.data, "--data")
    if args.eval_data:
        E.check_data(args.eval_data, "--eval-data")
    E.check_writable(args.out)
    ckpt = find_checkpoint(args.out) if args.resume else None
    if ckpt:
        check_trainer_state(os.path.join(ckpt, "trainer_state.pt"))
    return n_data


def check_trainer_state(path):
    """torch.save writes a zip archive: a truncated or damaged one fails its directory or a
    CRC here, with one line, instead of a torch traceback after the model has loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        bad = str(e)
    if bad:
        E.fail(f"{path} is damaged ({bad}); delete that checkpoint folder to start over, or restore it")


def print_plan(args, n_data, device, world):
    """One paragraph at the start: what will run, how long it should take, where it goes."""
    q, k, nk = args.queries_per_iter, args.k, args.native_k
    rollouts = q * (2 * k + nk)
    if args.algo == "rl":
        how = f"{rollouts} unforced rollouts ({q} queries x {2 * k + nk})"
    else:
        how = f"{rollouts} rollouts ({q} queries x (2 decisions x K={k} forced + {nk} unforced))"
    size = args.train_size if args.data.startswith("builtin") else n_data
    data = f"{args.data} ({size} problems)" if size else args.data
    ranks = f" x {world} ranks" if world > 1 else ""
    evaluation, eval_rollouts = "", 0
    if args.eval_data and args.eval_every:
        eval_rollouts = args.eval_n * len(args.eval_modes) / args.eval_every
        evaluation = (f", then evaluates on {args.eval_data} ({args.eval_n} problems x {len(args.eval_modes)} modes)"
                      + (f" every {args.eval_every} iterations" if args.eval_every > 1 else ""))
    time_left = E.expected_time(args.model, device, args.dtype, rollouts + eval_rollouts, args.max_new_tokens,
                                 args.iterations)
    again = "" if args.resume else "the same command with "
    E.print_plan(f"""Plan: {args.algo} training of {args.model} ({args.dtype} on {device}{ranks}) on {data},
        {args.iterations} iteration{'s' * (args.iterations != 1)}. Each iteration samples {how} of up to {args.max_new_tokens} new tokens,
        then takes {args.epochs} epoch(s) of optimiser steps on them{evaluation}. Expected time: {time_left}.
        Output: {args.out} (metrics.jsonl, explore-iter*.jsonl, eval-iter*/, checkpoint/). Ctrl-C stops it;
        {again}--resume continues after the last finished iteration.""")


def main(argv=None):
    args = parse_args(argv)
    n_data = check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = 0, 1
    if args.fsdp:
        rank, world, device = D.setup(args.cpu_offload)
    args.dtype = agree_dtype(M.pick_dtype(args.dtype, device))   # auto: bf16 where it is native, else fp32
    if D.is_main():
        print_plan(args, n_data, device, world)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt = find_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print(f"[em] --resume: no checkpoint under {args.out}; starting from {args.model}", file=sys.stderr)
    model, tok = M.load_model(ckpt or args.model, "fp32", device)    # master weights: always fp32
    if args.dtype == "bf16" and computed_in(ckpt) != "bf16":        # fresh, or an fp32 run going on in bf16
        snap_to_bf16(model)
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp:
        D.shard(model, M.DTYPES[args.dtype], args.cpu_offload)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start_iter = restore(args, ckpt, model, opt, metrics_path)
    D.barrier()                                # rank 0 has removed stale evaluations before any rank writes one
    pool = E.load_problems(args.data, args.train_size if args.data.startswith("builtin") else None)
    if start_iter == 1 and args.eval_data and args.eval_every and args.eval_first:
        t0 = time.time()                    # the untrained model, the baseline every curve starts from
        row = {"iteration": 0, "algo": args.algo, **evaluate_iteration(model, tok, args, 0, rank, world)}
        if D.is_main():
            append_metrics(metrics_path, {**row, "seconds": time.time() - t0})
    for it in range(start_iter, args.iterations + 1):
        t0 = time.time()
        seed = args.seed * 1000 + it                  # everything an iteration draws derives from this
        rng = random.Random(seed)
        problems = rng.sample(pool, min(args.queries_per_iter, len(pool)))[rank::world]
        with D.gathered(model):
            policy = sampler_of(model, args)
            if args.algo == "rl":
                records = native_records(policy, tok, problems, 2 * args.k + args.native_k, args, seed + 7919 * rank)
            else:
                records = X.explore(policy, tok, problems, k=args.k, native_k=args.native_k, estep=args.estep,
                                    alpha=args.alpha, prior=args.prior, keep=args.keep, ties=args.ties,
                                    prefixes_text={"cot": args.cot_prefix, "code": args.code_prefix},
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    seed=seed + 7919 * rank, batch_size=args.sample_batch, fewshot=args.fewshot,
                                    progress=D.is_main(), autonomous=args.autonomous_prompt)
        del policy
        release_freed_memory()          # the sampler's cache and the bf16 copy are gone: give them back
        t_sample = time.time() - t0
        items = training_data(args.algo, records, args.adv, args.keep or args.k, rng)
        t1 = time.time()
        with autocast(model, args):
            losses = m_step(model, tok, opt, items, records, args, rng)
        t_train = time.time() - t1
        records, n_items = D.gather(records), sum(D.gather([len(items)]))
        if D.is_main():
            X.write_jsonl_atomic(os.path.join(args.out, f"explore-iter{it}.jsonl"), records)
        row = iteration_row(it, args, records, n_items, losses, t_sample, t_train)
        if args.eval_data and args.eval_every and it % args.eval_every == 0:
            row.update(evaluate_iteration(model, tok, args, it, rank, world))
        row["seconds"] = time.time() - t0
        if D.is_main():                           # the row first: a kill before the checkpoint is in
            append_metrics(metrics_path, row)     # place reruns this iteration, and restore drops the row
        save_checkpoint(args.out, model, tok, opt, it, args.save_dtype, args.dtype)
        if D.is_main():
            print(f"[em] iter {it}/{args.iterations} reward {row['reward_mean']:.3f} "
                  f"q_hat cot/code {_fmt(row['q_hat_cot'])}/{_fmt(row['q_hat_code'])} s*(code) "
                  f"{_fmt(row['s_star_code'])} loss {_fmt(row.get('loss_ratio', row.get('loss_sft')))} "
                  f"ratio max {_fmt(row.get('ratio_max'))} eval {_fmt(row.get('eval_acc_autonomous'))} "
                  f"{row['seconds']:.0f}s")
        D.barrier()
    D.finish()
    return metrics_path


def restore(args, ckpt, model, opt, metrics_path):
    """The iteration to start from. From a checkpoint: the optimizer, the random states and the
    metrics up to its iteration come back. A fresh start drops an older run's metrics. Either
    way the evaluations from the starting iteration on are removed: an evaluation resumes from
    its own samples, never from a stale run's."""
    start_iter = 1
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False,
                           mmap=True)         # under --fsdp every rank reads it: one copy in the page cache
        D.load_optimizer(model, opt, state["optimizer"]) if args.fsdp else opt.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        start_iter = state["iteration"] + 1
        if D.is_main():
            append_metrics(metrics_path, None, keep_until=state["iteration"])
        print(f"[em] resumed from {ckpt} after iteration {state['iteration']}", file=sys.stderr)
    elif os.path.exists(metrics_path) and D.is_main():
        os.remove(metrics_path)
    if D.is_main():
        for name in os.listdir(args.out):
            if name.startswith("eval-iter") and name[9:].isdigit() and int(name[9:]) >= start_iter - (start_iter == 1):
                shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    return start_iter


def iteration_row(it, args, records, n_items, losses, t_sample, t_train):
    """The metrics line of one iteration (losses and ratios are rank 0's under --fsdp)."""
    by_q = {r["query_id"]: r for r in records}
    sampled = sum(sum(r["sampled"]) for r in records)
    if args.algo == "rl":
        native = _mean(float(r["code_calls"] > 0) for r in records)
    else:
        native = _mean(r["native_code_rate"] for r in by_q.values() if r.get("native_code_rate") is not None)
    native_k = args.native_k if args.algo != "rl" else 0      # unforced rollouts explore sampled for pi(c|x)
    return {"iteration": it, "algo": args.algo, "queries": len(by_q), "rollouts": len(records),
            "rollouts_sampled": len(records) + native_k * len(by_q),
            "trained_on": n_items, "reward_mean": _mean(r["reward"] for r in records),
            "q_hat_cot": _mean(r["q_hat"]["cot"] for r in by_q.values() if "q_hat" in r),
            "q_hat_code": _mean(r["q_hat"]["code"] for r in by_q.values() if "q_hat" in r),
            "s_star_code": _mean(r["s_star"]["code"] for r in by_q.values() if "s_star" in r),
            "native_code_rate": native, **losses,
            "sample_tokens_per_s": sampled / t_sample if t_sample else None, "sample_s": t_sample, "train_s": t_train}


def _mean(values):
    v = list(values)
    return sum(v) / len(v) if v else None


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
