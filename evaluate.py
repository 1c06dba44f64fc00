"""evaluate.py -- benchmarks, the paper's three prompt modes, and its metrics.

  python evaluate.py --data ../shared/data/math500.jsonl --limit 50 --modes autonomous cot code
  python evaluate.py --data builtin:test --model runs/em/checkpoint     # a trained model
  python evaluate.py --data ../shared/data/gsm8k_test.jsonl --n 4 --temperature 0.7   # pass@4, maj@4

Pieces, top to bottom:
  data     load_problems(path): JSON lines in the MATH500 (problem / answer), GSM8K
           (question / "... #### n"), AIME (integer answer), AMC (float answer) formats, and
           the project's built-in task (`builtin:train`, `builtin:test`, see task.py).
           Malformed input fails with file:line and the field. A file whose answers are all
           integers (AIME ships them as strings, "025") is graded as exact numbers.
  modes    MODES: autonomous (the model decides; AUTONOMOUS holds its two wordings, one that
           invites code and a neutral one), forced CoT, forced code.
           A forced mode is a prompt instruction plus a forced start of the response; forced
           CoT also runs no code. explore.py forces its decisions with the same prefixes.
  grading  grader.py (extract_answer / is_equiv); GSM8K, AIME, AMC and built-in answers
           compare as exact numbers.
  metrics  accuracy (sample 0: greedy when --n 1), pass@k and maj@k (a vote among equal
           answers) over --n samples, code rate, mean code calls, execution error rate,
           selection accuracy (when all three modes ran: the oracle decision per problem is
           the forced mode that solved it, CoT preferred on ties, as in the paper; the
           autonomous run's decision is "code" when it executed a block), per-level /
           per-subject / per-group accuracy (sample 0) and code rate (all samples), tokens/s.
  output   <out>/samples.jsonl (every sample, appended as it is graded), <out>/summary.json
           (written atomically) and a printed table. Re-running with the same --out resumes,
           with the settings that made its samples only (<out>/run.json).

Choices the paper leaves open: the neutral, CoT and code prompts (Qwen2.5-Math's wording for
the latter two), the two forcing prefixes below (flags in explore.py; the paper's reported code
prefix "Let's first analyze the problem, then consider if python code could help." derailed the
135M model, so the default is the bare block opening), and a two-example format
demonstration (FEWSHOT, on by default; --no-fewshot for the paper's zero-shot setting).
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import tempfile
import textwrap
import time
from collections import defaultdict

from tqdm import tqdm

import grader

# ---------------------------------------------------------------------------------------
# Prompt modes: the one place the prompts live
# ---------------------------------------------------------------------------------------
# The autonomous instruction comes in two wordings (--autonomous-prompt). "neutral" (default, the
# paper's "neutral prompt") names neither words nor code: the untrained 135M model then almost
# never codes on its own (0-4% per kind) while prefix-forced code still solves the compute kinds,
# the paper's starting point, where outcome-reward RL from the base model rarely samples code
# (README, Results). "invite" says code is allowed: the model then codes on about 40% of compute
# problems, and `rl` finds code by itself.
AUTONOMOUS = {"neutral": "Solve the problem, and put your final answer within \\boxed{}.",
              "invite": "Solve the problem. You may use Python code in ```python blocks if it helps, "
                        "and put your final answer within \\boxed{}."}
MODES = {
    "autonomous": {"prefix": "", "code": True},             # its instruction: AUTONOMOUS[--autonomous-prompt]
    "cot": {"instruction": "Please reason step by step, and put your final answer within \\boxed{}.",
            "prefix": "By hand: ", "code": False},
    "code": {"instruction": "Please integrate natural language reasoning with programs to solve the problem above, "
                            "and put your final answer within \\boxed{}.",
             "prefix": "```python\nprint(", "code": True},
}
# A two-example demonstration, given as two earlier chat turns (--no-fewshot drops it): one
# solved by a one-line program, one in words, each opening with its decision's prefix. Small
# models (the embedded 135M one) otherwise almost never write \\boxed{} or a runnable block:
# zero-shot, SmolLM2-135M boxed 0 of 150 answers on GSM8K and MATH500. As earlier turns, not
# text inside the question, the model answers in the assistant's style and ends its turn
# instead of writing the next example problem itself.
# Problem fields carried into each record and summarised per value (MATH's level and subject;
# the built-in task's kind, as subject, and its group: compute / easy / hard).
GROUP_KEYS = ("level", "subject", "group")

FEWSHOT = (("What is 123 \\times 45?",
            "```python\nprint(123 * 45)\n```\n```output\n5535\n```\nThe final answer is \\boxed{5535}."),
           ("What is 3 + 4?", "By hand: 3 + 4 = 7. The final answer is \\boxed{7}."))


def chat(tok, question, instruction, fewshot=True):
    """The prompt of one question: the demonstration turns (if fewshot), then the question."""
    import model as M
    return M.chat_prompt(tok, question, instruction, shots=FEWSHOT if fewshot else ())


def autonomous_chat(tok, question, fewshot=True, autonomous="neutral"):
    """The autonomous prompt (the model decides) in the wording `autonomous` of AUTONOMOUS."""
    return chat(tok, question, AUTONOMOUS[autonomous], fewshot)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def _bad(path, lineno, msg):
    raise SystemExit(f"error: {path}:{lineno}: {msg}")


def parse_record(rec, path, lineno):
    """One JSON object -> {id, question, answer, numeric, level?, subject?}; formats detected."""
    if not isinstance(rec, dict):
        _bad(path, lineno, "expected a JSON object")
    question = rec.get("problem") if rec.get("problem") is not None else rec.get("question")
    if not isinstance(question, str) or not question.strip():
        _bad(path, lineno, "no question: field 'problem' or 'question' is missing or empty")
    if "answer" not in rec or rec["answer"] is None or str(rec["answer"]).strip() == "":
        _bad(path, lineno, "no answer: field 'answer' is missing or empty")
    raw = rec["answer"]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        _bad(path, lineno, f"field 'answer' is a {type(raw).__name__}; expected a string or a number")
    if isinstance(raw, (int, float)) and not math.isfinite(raw):
        _bad(path, lineno, f"field 'answer' is {raw}, not a finite number")
    if isinstance(raw, (int, float)):                                   # AIME (int), AMC (27.0)
        answer = str(int(raw)) if float(raw).is_integer() else repr(float(raw))
        numeric = True
    elif "####" in raw:                                                 # GSM8K
        answer = raw.rsplit("####", 1)[1].strip().replace(",", "")
        numeric = True
        if not answer:
            _bad(path, lineno, "field 'answer' has nothing after '####'")
    else:                                                               # MATH
        answer, numeric = raw.strip(), bool(rec.get("numeric", False))
    pid = rec.get("id", rec.get("unique_id"))
    out = {"id": str(pid) if pid is not None else f"{os.path.basename(path)}:{lineno}",
           "question": question.strip(), "answer": answer, "numeric": numeric}
    for key in GROUP_KEYS:
        if key in rec:
            out[key] = rec[key]
    return out


def load_problems(path, limit=None, seed=0, shuffle=False):
    if path.startswith("builtin"):
        import task
        split, groups = task.parse_name(path)
        problems = task.problems(split, n=limit or 200, groups=groups)
    elif os.path.exists(path):
        problems, line_of = [], {}
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    _bad(path, lineno, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                       "expected JSON lines")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(path, lineno, f"bad JSON ({e.msg} at column {e.colno})")
                except ValueError as e:                                 # e.g. an integer of 5,000 digits
                    _bad(path, lineno, f"bad JSON ({e})")
                problems.append(parse_record(rec, path, lineno))
                if line_of.setdefault(problems[-1]["id"], lineno) != lineno:
                    _bad(path, lineno, f"field 'id': {problems[-1]['id']!r} is also line {line_of[problems[-1]['id']]}'s "
                                       "(samples are stored by id: each must be unique)")
        if not problems:
            raise SystemExit(f"error: {path}: no problems (the file is empty or has only blank lines)")
        if all(p["numeric"] or re.fullmatch(r"-?\d+", p["answer"]) for p in problems):
            for p in problems:            # AIME as shipped: integers written as strings ("025")
                p["numeric"] = True
    else:
        problems = _load_hub(path)
    if shuffle:
        random.Random(seed).shuffle(problems)
    return problems[:limit] if limit else problems


def _load_hub(name):
    """A hub dataset id, where the `datasets` package and a network exist."""
    try:
        import datasets
        rows = datasets.load_dataset(name, split="test")
    except Exception as e:
        raise SystemExit(f"error: '{name}' is neither a local file nor a loadable hub dataset ({e.__class__.__name__}). "
                         "Pass a JSON-lines path, e.g. ../shared/data/math500.jsonl, or builtin:test.")
    return [parse_record(dict(r), name, i + 1) for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------
# Sampling and grading
# ---------------------------------------------------------------------------------------
def grade(problem, text):
    pred = grader.extract_answer(text)
    return pred, grader.is_equiv(pred, problem["answer"], numeric=problem["numeric"])


def prompt_for(tok, problem, mode, fewshot=True, autonomous="neutral"):
    spec = MODES[mode]
    instruction = AUTONOMOUS[autonomous] if mode == "autonomous" else spec["instruction"]
    return (chat(tok, problem["question"], instruction, fewshot),
            tok(spec["prefix"], add_special_tokens=False).input_ids if spec["prefix"] else [])


def read_samples(path):
    """Samples already on disk. A killed run's last line may be torn anywhere, even just before
    its newline (then it still parses, and the next sample would be appended onto it): it is
    dropped and the file cut back to the line before. A bad line elsewhere is an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.readlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.endswith(b"\n") else None
            row["id"], row["mode"], row["sample"]                 # what names a sample
            rows.append(row)
        except (ValueError, KeyError, TypeError):
            if lineno < len(lines):
                raise SystemExit(f"error: {path}:{lineno}: not a sample line (only the last line of a "
                                 "killed run can be torn); mend it or move the file away")
            with open(path, "r+b") as f:
                f.truncate(sum(map(len, lines[:-1])))
    return rows


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """A tqdm bar over rollouts that moves while they are sampled, with tokens/s and the time
    left. Pass `hook` as model.sample's `progress=`: the sampler calls it after every forward
    that samples with (tokens sampled in it, rows that finished since the last call), and with
    0 tokens when rows end as an output goes in. After each sample call,
    batch_done(outs) settles the counts with what came back, so the totals are exact even from
    a sampler that reported nothing.

    Time left = tokens still to sample / tokens per second, where a rollout not yet returned
    is expected to be as long as the returned ones on average (max_new_tokens until one is):
    rollouts of a batch finish together, so their own rate says little until late."""

    def __init__(self, total, desc, enabled=True, max_new_tokens=None):
        self.bar = tqdm(total=total, desc=desc, unit="rollout", disable=not enabled,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.hook = self if enabled else None
        self.max_new_tokens = max_new_tokens
        self.tokens = self.rows = 0                 # what the batches already returned hold
        self.batch_tokens = self.batch_rows = 0     # what the hook reported of the batch under way
        self.start = time.time()

    def __call__(self, new_tokens, finished_rows):
        self.batch_tokens += new_tokens
        self.batch_rows += finished_rows
        self._show(finished_rows)

    def batch_done(self, outs):
        unreported = max(len(outs) - self.batch_rows, 0)
        self.tokens += sum(o.n_sampled for o in outs)
        self.rows += len(outs)
        self.batch_tokens = self.batch_rows = 0
        self._show(unreported)

    def tokens_per_s(self):
        return (self.tokens + self.batch_tokens) / max(time.time() - self.start, 1e-9)

    def seconds_left(self):
        per_rollout = self.tokens / self.rows if self.rows else self.max_new_tokens
        rate = self.tokens_per_s()
        if per_rollout is None or rate <= 0:
            return None
        return max((self.bar.total - self.rows) * per_rollout - self.batch_tokens, 0) / rate

    def _show(self, rows):
        left = self.seconds_left()
        self.bar.set_postfix_str(f"{self.tokens_per_s():.0f} tok/s" +
                                 (f", ~{tqdm.format_interval(left)} left" if left is not None else ""),
                                 refresh=False)
        self.bar.update(rows)                       # redraws at most every 0.1 s, also when rows == 0

    def close(self):
        self.bar.close()


def sample_seed(seed, pid, mode, k):
    """The random stream of sample k of problem `pid` in `mode`: the same whatever else runs in
    its batch and however often the run was resumed (keyed by position in the run's to-do list,
    the samples drawn after a resume repeated those drawn before it)."""
    digest = hashlib.blake2b(json.dumps([seed, pid, mode, k]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def run(model, tok, problems, modes, out_dir, n=1, temperature=0.0, max_new_tokens=512, batch_size=16,
        seed=0, fewshot=True, progress=True, autonomous="neutral"):
    """Sample, grade and record every (problem, mode, sample). Returns all records."""
    import model as M
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "samples.jsonl")
    records = read_samples(path)
    done = {(r["id"], r["mode"], r["sample"]) for r in records}
    todo = [(p, mode, k) for mode in modes for p in problems for k in range(n) if (p["id"], mode, k) not in done]
    timing = defaultdict(lambda: [0.0, 0])
    bar = Progress(len(todo), "evaluate", enabled=progress, max_new_tokens=max_new_tokens)
    with open(path, "a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for mode in dict.fromkeys(m for _, m, _ in chunk):
                part = [(p, k) for p, m, k in chunk if m == mode]
                prompts, prefixes = zip(*(prompt_for(tok, p, mode, fewshot, autonomous) for p, _ in part))
                t = time.time()
                outs = M.sample(model, tok, list(prompts), list(prefixes), max_new_tokens=max_new_tokens,
                                greedy=temperature == 0, temperature=max(temperature, 1e-5),
                                seed=[sample_seed(seed, p["id"], mode, k) for p, k in part],
                                code=MODES[mode]["code"], progress=bar.hook)
                bar.batch_done(outs)
                timing[mode][0] += time.time() - t
                timing[mode][1] += sum(o.n_sampled for o in outs)
                for (p, k), o in zip(part, outs):
                    pred, ok = grade(p, o.text)
                    rec = {"id": p["id"], "mode": mode, "sample": k, "question": p["question"], "text": o.text,
                           "pred": pred, "answer": p["answer"], "numeric": p["numeric"], "correct": ok, "finish": o.finish,
                           "tokens": o.n_sampled, "code_calls": o.code_calls,
                           **{key: p[key] for key in GROUP_KEYS if key in p}}
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                f.flush()
    bar.close()
    return records, {m: {"seconds": s, "tokens": n_, "tokens_per_s": n_ / s if s else None}
                     for m, (s, n_) in timing.items()}


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------
def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(rs):
    """maj@k of one problem's samples: answers vote together when they are equal (is_equiv,
    so "1/2", "0.5" and "\\frac{1}{2}" are one vote, where their text was three); the largest
    group wins, a tie going to the group of the lowest-numbered sample. No answer, no vote."""
    groups = []
    for r in sorted(rs, key=lambda r: r["sample"]):
        if not r["pred"]:
            continue
        for g in groups:
            if grader.is_equiv(r["pred"], g[0]["pred"], numeric=r.get("numeric", False)):
                g.append(r)
                break
        else:
            groups.append([r])
    return bool(groups) and max(groups, key=len)[0]["correct"]


def summarize(records, modes):
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["mode"]][r["id"]].append(r)
    summary = {}
    for mode in modes:
        probs = by.get(mode, {})
        if not probs:
            continue
        first = [sorted(rs, key=lambda r: r["sample"])[0] for rs in probs.values()]
        flat = [r for rs in probs.values() for r in rs]
        calls = [c for r in flat for c in r["code_calls"]]
        n = min(len(rs) for rs in probs.values())
        maj = [majority_correct(rs) for rs in probs.values()]
        s = {"problems": len(probs), "samples_per_problem": n,
             "accuracy": sum(r["correct"] for r in first) / len(first),
             f"pass@{n}": sum(pass_at_k(len(rs), sum(r["correct"] for r in rs), n) for rs in probs.values()) / len(probs),
             f"maj@{n}": sum(maj) / len(maj),
             "code_rate": sum(bool(r["code_calls"]) for r in flat) / len(flat),
             "mean_code_calls": len(calls) / len(flat),
             "exec_error_rate": sum(not c.get("ok", True) for c in calls) / len(calls) if calls else 0.0,
             "no_answer_rate": sum(r["pred"] is None for r in flat) / len(flat)}
        for key in GROUP_KEYS:      # accuracy from sample 0, code rate from every sample, as above
            firsts, alls = defaultdict(list), defaultdict(list)
            for rs, group in ((first, firsts), (flat, alls)):
                for r in rs:
                    if key in r:
                        group[str(r[key])].append(r)
            if firsts:
                s[f"accuracy_by_{key}"] = {g: sum(r["correct"] for r in v) / len(v) for g, v in sorted(firsts.items())}
                s[f"code_rate_by_{key}"] = {g: sum(bool(r["code_calls"]) for r in v) / len(v)
                                            for g, v in sorted(alls.items())}
        summary[mode] = s
    if all(m in by for m in ("autonomous", "cot", "code")):
        hits, total = 0, 0
        for pid, rs in by["autonomous"].items():
            cot, code = by["cot"].get(pid), by["code"].get(pid)
            if not cot or not code:
                continue
            cot, code, auto = (min(x, key=lambda r: r["sample"]) for x in (cot, code, rs))      # sample 0
            oracle = "cot" if cot["correct"] else "code" if code["correct"] else None
            if oracle is None:
                continue
            decision = "code" if auto["code_calls"] else "cot"
            hits += decision == oracle
            total += 1
        summary["selection_accuracy"] = {"value": hits / total if total else None, "problems_with_oracle": total}
    return summary


def print_table(summary, timing, wall):
    modes = {m: s for m, s in summary.items() if m != "selection_accuracy"}
    if not modes:
        return
    names = ["accuracy", "pass@{}", "maj@{}", "code_rate", "mean_code_calls", "exec_error_rate", "no_answer_rate"]
    n = next(iter(modes.values()))["samples_per_problem"]
    widths = [max(8, len(c.format(n))) for c in names]           # every header whole (was cut at 14)
    print(f"\n{'mode':<11} {'n':>4} " + " ".join(f"{c.format(n):>{w}}" for c, w in zip(names, widths)) +
          f" {'tok/s':>7}")
    for mode, s in modes.items():
        vals = [s[c.format(s["samples_per_problem"])] for c in names]
        tps = (timing.get(mode) or {}).get("tokens_per_s")
        print(f"{mode:<11} {s['problems']:>4} " + " ".join(f"{v:>{w}.3f}" for v, w in zip(vals, widths)) +
              (f" {tps:>7.1f}" if tps else f" {'-':>7}"))
    if "selection_accuracy" in summary and summary["selection_accuracy"]["value"] is not None:
        sa = summary["selection_accuracy"]
        print(f"selection accuracy: {sa['value']:.3f} over {sa['problems_with_oracle']} problems with an oracle")
    for mode, s in summary.items():
        whats = ("accuracy", "code_rate") if mode == "autonomous" else ("accuracy",)   # forced modes: 0 or 1
        for key in [f"{what}_by_{g}" for g in GROUP_KEYS for what in whats]:
            if mode != "selection_accuracy" and key in s:
                print(f"{mode} {key}: " + ", ".join(f"{g}={v:.2f}" for g, v in s[key].items()))
    print(f"wall time {wall:.0f} s")


# ---------------------------------------------------------------------------------------
# Checking arguments, and the plan printed at the start (shared by the entry points)
# ---------------------------------------------------------------------------------------
def fail(message):
    raise SystemExit(f"error: {message}")


def check_numbers(args, positive=(), non_negative=()):
    """Each named flag's value (None = unset, passes) must be finite and > 0, or >= 0."""
    for flag in positive + non_negative:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        ok = value > 0 if flag in positive else value >= 0
        if not ok or not math.isfinite(value):
            fail(f"{flag} must be {'> 0' if flag in positive else '>= 0'} (got {value})")


def check_data(path, flag="--data"):
    """A built-in split, a JSON-lines file (parsed in full here, so a bad line, a binary or an
    empty file stops the run before the model loads), or else a hub dataset id. Returns the
    number of problems in a file, None otherwise."""
    if path.startswith("builtin"):
        load_problems(path, limit=1)                 # the loader refuses an unknown split
        return None
    if os.path.isdir(path):
        fail(f"{flag} {path} is a directory; give a JSON-lines file")
    if os.path.exists(path):
        return len(load_problems(path))
    if path.endswith((".jsonl", ".json")) or path.startswith(("/", ".", "~")) or path.count("/") > 1:
        fail(f"{flag} {path}: no such file")
    return None


def check_writable(path, flag="--out", file=False):
    """The directory that will hold `path` (a directory, or a file's folder) can be created and
    written: a temporary directory is made in its nearest existing ancestor and removed again."""
    target = os.path.abspath(path)
    if file and os.path.isdir(target):
        fail(f"{flag} {path} is a directory; give a file name")
    if not file and os.path.exists(target) and not os.path.isdir(target):
        fail(f"{flag} {path} exists and is not a directory")
    base = os.path.dirname(target) if file else target
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        fail(f"{flag} {path}: {base} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=base))
    except OSError as e:
        fail(f"{flag} {path}: cannot create files under {base} ({e.strerror})")


# Seconds per rollout per allowed new token, and where they were measured (README, Results), by
# model, device and dtype. One default em_train.py iteration is 160 E-step + 96 evaluation
# rollouts of up to 64 tokens and the M-step: on a 2-core CPU with native bf16 it took 116-129 s,
# 124 s on average (bf16, seed 4 at 1a1f70e, packed teacher forcing; 127-155 s before it); on a
# 2-core AVX2-only CPU, where --dtype auto is fp32, 309-372 s, ~340 s (seed 0 at 414b324).
# `--model tiny --iterations 2` took 76 s (an older measurement, either dtype). Only the plans
# use them.
SECONDS_PER_ROLLOUT_TOKEN = {
    ("smollm2-135m", "cpu", "bf16"): (124 / (256 * 64), "a 2-core CPU with native bf16 (measured there, in bf16"),
    ("smollm2-135m", "cpu", "fp32"): (340 / (256 * 64), "a 2-core AVX2-only CPU (measured there, in fp32"),
    ("tiny", "cpu", None): (38 / (144 * 256), "a 2-core CPU (measured there"),
}


def expected_time(model, device, dtype, rollouts, max_new_tokens, iterations=1):
    """'about 24 min (8 min per iteration) on a 2-core CPU ...' from the table above, or a
    sentence saying that it has no row for this model, device and dtype."""
    device = (device or "cpu").split(":")[0]
    row = SECONDS_PER_ROLLOUT_TOKEN.get((model, device, dtype)) or SECONDS_PER_ROLLOUT_TOKEN.get((model, device, None))
    if row is None:
        return (f"not measured for {model} in {dtype} on {device}; the progress bars show the time left once "
                "rollouts finish")
    rate, where = row
    minutes = rate * rollouts * max_new_tokens / 60

    def fmt(m):
        return f"about {m:.0f} min" if m >= 1 else "under a minute"
    each = f" ({fmt(minutes)} per iteration)" if iterations > 1 else ""
    return f"{fmt(minutes * iterations)}{each} on {where}; this machine has {os.cpu_count()} cores)"


def print_plan(text):
    print(textwrap.fill(" ".join(text.split()), width=100), flush=True)


def check_args(args):
    """Every flag and file of evaluate.py, before the model loads or anything is written."""
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be >= 1 (got {args.limit}); leave it out to use every problem")
    check_numbers(args, positive=("--n", "--max-new-tokens", "--batch-size"),
                  non_negative=("--temperature",))
    if args.n > 1 and args.temperature == 0:
        fail("--n > 1 needs --temperature > 0 (greedy samples are identical)")
    check_data(args.data)
    if args.out is None:
        name = f"{os.path.basename(args.data)}-{os.path.basename(args.model.rstrip('/'))}"
        args.out = os.path.join("results", re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    check_writable(args.out)


def run_settings(args):
    """What decides the samples of a run (--n, --modes and --limit only add or leave out some)."""
    where = lambda path: os.path.abspath(path) if os.path.exists(path) else path
    return json.loads(json.dumps({
        "data": where(args.data), "model": where(args.model), "dtype": args.dtype, "seed": args.seed,
        "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "autonomous": AUTONOMOUS[args.autonomous_prompt], "fewshot": FEWSHOT if args.fewshot else None,
        "modes": MODES}))


def check_resume(args):
    """The same --out resumes a run only with the settings that made its samples (main keeps
    them in <out>/run.json): another temperature or prompt would reuse samples it did not make."""
    path, now = os.path.join(args.out, "run.json"), run_settings(args)
    then = json.load(open(path)) if os.path.exists(path) else now
    changed = [k for k in now if then.get(k) != now[k]]
    if changed:
        fail(f"--out {args.out} holds samples made with other settings ({', '.join(changed)} differ: "
             f"{', '.join(f'{then.get(k)!r} then, {now[k]!r} now' for k in changed if k not in ('modes', 'fewshot'))}); "
             "give another --out, or remove it to start again")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="builtin:test", help="JSON-lines path, builtin:train|test, or a hub id")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="samples per problem (pass@n, maj@n)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-fewshot", dest="fewshot", action="store_false", help="zero-shot prompts (drop FEWSHOT)")
    ap.add_argument("--autonomous-prompt", default="neutral", choices=list(AUTONOMOUS),
                    help="the autonomous instruction: invite code, or name neither decision (see AUTONOMOUS)")
    ap.add_argument("--out", default=None, help="output directory (default results/<data>-<model>)")
    args = ap.parse_args(argv)
    args.modes = list(dict.fromkeys(args.modes))            # "--modes cot cot" is cot once
    check_args(args)
    check_resume(args)
    import torch
    import model as M
    problems = load_problems(args.data, args.limit, args.seed, args.shuffle)
    out = args.out
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rollouts = len(problems) * len(args.modes) * args.n
    print_plan(f"""Plan: evaluate {args.model} ({args.dtype} on {device}) on {args.data}: {len(problems)} problems x
        {len(args.modes)} modes ({', '.join(args.modes)}) x {args.n} sample(s) = {rollouts} rollouts of up to
        {args.max_new_tokens} new tokens, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'},
        {'with' if args.fewshot else 'without'} the few-shot demonstration. Expected time:
        {expected_time(args.model, device, args.dtype, rollouts, args.max_new_tokens)}. Samples go to
        {os.path.join(out, 'samples.jsonl')} as they are graded (the same --out again resumes); the metrics and the
        exact prompts to {os.path.join(out, 'summary.json')}.""")
    model, tok = M.load_model(args.model, args.dtype, device)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "run.json"), run_settings(args))
    t = time.time()
    records, timing = run(model, tok, problems, args.modes, out, n=args.n, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                          fewshot=args.fewshot, autonomous=args.autonomous_prompt)
    wall = time.time() - t
    ids = {p["id"] for p in problems}
    summary = summarize([r for r in records if r["id"] in ids and r["mode"] in args.modes and r["sample"] < args.n],
                        args.modes)
    summary["_run"] = {"data": args.data, "model": args.model, "dtype": args.dtype, "device": device,
                       "modes": args.modes, "limit": args.limit, "shuffle": args.shuffle, "seed": args.seed,
                       "n": args.n, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                       "batch_size": args.batch_size, "timing": timing, "wall_s": wall,
                       "grader_timeouts": grader.TIMEOUTS, "prompts": MODES,
                       "autonomous_instruction": AUTONOMOUS[args.autonomous_prompt],
                       "fewshot": FEWSHOT if args.fewshot else None}
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    print_table({k: v for k, v in summary.items() if k != "_run"}, timing, wall)
    print(f"samples: {os.path.join(out, 'samples.jsonl')}  summary: {os.path.join(out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
