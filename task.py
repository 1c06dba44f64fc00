"""task.py -- the built-in task: the paper's effect in miniature, sized for a 135M model on a CPU.

AutoCode's claim is about *when* to code: some problems are solved by a short program and
not by reasoning in words, others the other way round, and EM should learn which is which
per query. To show that on a laptop, the task must contain both situations for the small
default model (SmolLM2-135M-Instruct), or there is no signal to learn from. So the problem
kinds come in three groups, each kind with several phrasings (the model should learn the
kind, not a template):

  compute   a one-line program gets it right and mental arithmetic does not
            (multi-digit products, sums of several numbers, powers, remainders)
  easy      reasoning in words is right (single-digit arithmetic, counting in a short story)
  hard      beyond the 135M model either way (prime counts, divisor counts, big gcd/lcm,
            modular powers): off by default, `builtin:train+hard` adds them (`+only-hard`: them alone)

`python task.py --measure` prints, for an untrained model, q_hat(cot) and q_hat(code) per
kind (K prefix-forced rollouts each, the E-step's own estimate) and the native code rate; the
README's table comes from it. The default mix is the compute and easy kinds.

Data names: `builtin:train` and `builtin:test` (different seeds; see `problems`), with an
optional `+hard` (all three groups) or `+only-hard`. Every problem has an exact integer answer
and its kind in "subject", so evaluate.py reports accuracy per kind.
"""
import argparse
import math
import random


def _mul(rng):
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return rng.choice(["What is {a} \\times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.",
                       "What is the product of {a} and {b}?"]).format(a=a, b=b), a * b


def _sum_many(rng):
    xs = [rng.randint(100, 9999) for _ in range(rng.randint(4, 6))]
    listed = ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"
    return rng.choice(["What is {s}?", "Add up {l}.", "What is the sum of {l}?",
                       "Find the total of {l}."]).format(s=" + ".join(map(str, xs)), l=listed), sum(xs)


def _power(rng):
    a, e = rng.randint(3, 9), rng.randint(7, 13)
    return rng.choice(["What is {a}^{{{e}}}?", "Compute {a} to the power of {e}.",
                       "What is {a} raised to the {e}th power?"]).format(a=a, e=e), a ** e


def _remainder(rng):
    a, m = rng.randint(10000, 999999), rng.randint(13, 97)
    return rng.choice(["What is the remainder when {a} is divided by {m}?", "What is {a} mod {m}?",
                       "Find {a} modulo {m}."]).format(a=a, m=m), a % m


def _add_small(rng):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.",
                       "What is the sum of {a} and {b}?"]).format(a=a, b=b), a + b


def _mul_small(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return rng.choice(["What is {a} \\times {b}?", "What is {a} times {b}?",
                       "Multiply {a} by {b}."]).format(a=a, b=b), a * b


def _story(rng):
    name = rng.choice(["Sam", "Ana", "Lee", "Mia", "Tom", "Zoe"])
    thing = rng.choice(["apples", "books", "coins", "shells", "pencils"])
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = rng.choice(["{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
                        "{n} had {a} {t}. A friend gave {n} {b} more. How many {t} does {n} have?"])
        return q.format(n=name, t=thing, a=a, b=b), a + b
    a = a + b
    q = rng.choice(["{n} has {a} {t} and gives away {b}. How many {t} are left?",
                    "{n} had {a} {t} and lost {b} of them. How many {t} does {n} have now?"])
    return q.format(n=name, t=thing, a=a, b=b), a - b


def _next(rng):
    a = rng.randint(10, 98)
    return rng.choice(["What number comes right after {a}?", "What is one more than {a}?",
                       "What is {a} + 1?"]).format(a=a), a + 1


def _prime_count(rng):
    n = rng.randint(100, 20000)
    sieve = bytearray([1]) * (n + 1)
    sieve[:2] = b"\x00\x00"
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytearray(len(sieve[p * p::p]))
    return f"How many prime numbers are less than or equal to {n}?", sum(sieve)


def _count_divisible(rng):
    n, d = rng.randint(1000, 100000), rng.randint(3, 13)
    return (f"How many integers from 1 to {n} are divisible by {d} but not by {d + 1}?",
            n // d - n // (d * (d + 1)))        # multiples of d that are multiples of d+1 too


def _gcd_lcm(rng):
    g = rng.randint(2, 999)
    a, b = g * rng.randint(100, 9999), g * rng.randint(100, 9999)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)
    return f"What is the least common multiple of {a} and {b}?", a * b // math.gcd(a, b)


def _mod_pow(rng):
    a, e, m = rng.randint(2, 99), rng.randint(50, 5000), rng.randint(7, 999)
    return f"What is the remainder when {a}^{{{e}}} is divided by {m}?", pow(a, e, m)


KINDS = {   # kind -> (group, generator)
    "mul_3digit": ("compute", _mul), "sum_many": ("compute", _sum_many), "power": ("compute", _power),
    "remainder": ("compute", _remainder),
    "add_small": ("easy", _add_small), "mul_small": ("easy", _mul_small), "story": ("easy", _story),
    "next_number": ("easy", _next),
    "prime_count": ("hard", _prime_count), "count_divisible": ("hard", _count_divisible),
    "gcd_lcm": ("hard", _gcd_lcm), "mod_pow": ("hard", _mod_pow),
}
GROUPS = {"": ("compute", "easy"), "hard": ("compute", "easy", "hard"), "only-hard": ("hard",)}
SPLITS = ("train", "test")


def parse_name(name):
    """'builtin:train+hard' -> ('train', ('compute', 'easy', 'hard')); one line on a bad name."""
    spec = name.split(":", 1)[1] if ":" in name else "train"
    split, _, extra = spec.partition("+")
    if split not in SPLITS or extra not in GROUPS:
        raise SystemExit(f"error: unknown built-in data '{name}': use builtin:train or builtin:test, "
                         "optionally with +hard or +only-hard")
    return split, GROUPS[extra]


def problems(split="train", n=200, groups=("compute", "easy"), seed=0):
    """n problems cycling through the kinds of `groups`, seeded per split. Train and test draw
    from different random streams: the compute kinds (about 10^5 or more questions each) never
    repeat across splits in practice, while the easy kinds (single digits) have only a few
    dozen questions each and do repeat; what the test split measures there is the decision,
    on draws the model was not trained on in that iteration, not recall of an answer."""
    rng = random.Random(f"autocode-{split}-{seed}")
    kinds = [k for k, (g, _) in KINDS.items() if g in groups]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        question, answer = KINDS[kind][1](rng)
        out.append({"id": f"builtin-{split}-{i}", "question": question, "answer": str(answer), "numeric": True,
                    "subject": kind, "group": KINDS[kind][0]})
    return out


def measure(model, tok, per_kind=8, k=4, native_k=4, max_new_tokens=64, temperature=0.5, seed=0,
            groups=("compute", "easy", "hard"), autonomous="neutral"):
    """q_hat(cot), q_hat(code) and the native code rate per kind, from the E-step's own
    prefix-forced rollouts (explore.explore), for the table in the README."""
    import explore as X
    n_kinds = sum(g in groups for g, _ in KINDS.values())
    probs = problems("train", per_kind * n_kinds, groups, seed)
    records = X.explore(model, tok, probs, k=k, native_k=native_k, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, autonomous=autonomous)
    kind_of = {p["id"]: p["subject"] for p in probs}
    rows = {}
    for r in records:
        row = rows.setdefault(kind_of[r["query_id"]], {"cot": [], "code": [], "native": {}})
        row[r["decision"]].append(r["reward"])
        row["native"][r["query_id"]] = r["native_code_rate"]
    table = {}
    for kind, row in rows.items():
        native = [v for v in row["native"].values() if v is not None]
        table[kind] = {"group": KINDS[kind][0], "q_hat_cot": sum(row["cot"]) / len(row["cot"]),
                       "q_hat_code": sum(row["code"]) / len(row["code"]),
                       "native_code_rate": sum(native) / len(native) if native else None}
    return table


def table_from_explore(paths, data="builtin:train", pool_size=2000):
    """The same per-kind table from E-step records already on disk (em_train.py's
    explore-iter1.jsonl holds the untrained model's rollouts): no sampling needed. `data`
    and `pool_size` must be the run's --data and --train-size (they fix which id is which kind)."""
    import json
    split, groups = parse_name(data)
    pool = {p["id"]: p for p in problems(split, pool_size, groups)}
    rows = {}
    for path in paths:
        with open(path) as f:
            for r in map(json.loads, f):
                kind = pool[r["query_id"]]["subject"]
                row = rows.setdefault(kind, {"cot": [], "code": [], "native": {}})
                row[r["decision"]].append(r["reward"])
                row["native"][(path, r["query_id"])] = r["native_code_rate"]
    return {kind: {"group": KINDS[kind][0], "q_hat_cot": sum(row["cot"]) / len(row["cot"]),
                   "q_hat_code": sum(row["code"]) / len(row["code"]), "rollouts_per_decision": len(row["cot"]),
                   "native_code_rate": _mean(v for v in row["native"].values() if v is not None)}
            for kind, row in sorted(rows.items(), key=lambda kv: (KINDS[kv[0]][0], kv[0]))}


def _mean(values):
    v = list(values)
    return sum(v) / len(v) if v else None


def print_table(table):
    fmt = lambda x: "-" if x is None else f"{x:.2f}"   # noqa: E731
    print("| kind | group | q_hat(cot) | q_hat(code) | native code rate | rollouts per decision |\n|---|---|---|---|---|---|")
    for kind, t in table.items():
        print(f"| {kind} | {t['group']} | {fmt(t['q_hat_cot'])} | {fmt(t['q_hat_code'])} | "
              f"{fmt(t['native_code_rate'])} | {t.get('rollouts_per_decision', '-')} |")


def main():
    import evaluate as E          # here, not at the top: evaluate imports this module
    ap = argparse.ArgumentParser(description="The built-in task: list problems, or measure q_hat per kind.")
    ap.add_argument("--data", default="builtin:train")
    ap.add_argument("--show", type=int, default=12, help="print this many problems")
    ap.add_argument("--measure", action="store_true", help="q_hat(cot), q_hat(code) per kind for --model")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autonomous-prompt", default="neutral", choices=list(E.AUTONOMOUS),
                    help="the instruction of the measured prompts (evaluate.AUTONOMOUS)")
    ap.add_argument("--from-explore", nargs="+", metavar="JSONL", help="tabulate E-step records instead of sampling")
    args = ap.parse_args()
    if args.from_explore:
        return print_table(table_from_explore(args.from_explore, args.data))
    split, groups = parse_name(args.data)
    if not args.measure:
        for p in problems(split, args.show, groups):
            print(f"{p['subject']:<16} {p['question']}  ->  {p['answer']}")
        return
    import json

    import torch

    import model as M
    model, tok = M.load_model(args.model, args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    table = measure(model, tok, args.per_kind, args.k, args.k, args.max_new_tokens, args.temperature, args.seed,
                    groups, autonomous=args.autonomous_prompt)
    print_table(table)
    print(json.dumps({"model": args.model, "per_kind": args.per_kind, "k": args.k,
                      "autonomous_prompt": args.autonomous_prompt, "table": table}))


if __name__ == "__main__":
    main()
