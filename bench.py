"""bench.py -- speed of the sampler and the sandbox, measured side by side in one run.

  python bench.py sampler     # model.sample vs model.generate, batch 8 / 32 / 128, 128 new tokens,
                              # the sampler on plain and on prepacked weights, 2 rounds (--rounds),
                              # and the floor: one decode step's matrix products alone
  python bench.py code        # code-calling rollouts, 8 and 32 of them: model.sample vs generate + re-encode loop,
                              # one mirrored round (--code-rounds): sample, re-encode, re-encode, sample
  python bench.py continuous  # 256 prompts of mixed lengths: continuous batching vs fixed chunks
  python bench.py sandbox     # sandbox latency p50 vs `python -c`, and a 64-cell batch
  python bench.py             # all four
  python bench.py sampler code continuous --device cuda --dtype bf16 --model random:.gpu/configs/<shape>

Every number is printed next to its baseline from the same run on the same machine; the
targets (issue text) are ratios, so they hold or fail here and now. No test asserts them.
Both sides of each comparison decode greedily with EOS ignored (`min_new_tokens` for
generate), so they produce the same number of tokens and the tokens/s compare work, not luck.
The sampler and code rows time each side twice per round, in mirrored order (A B C C B A), and report
the median of the rounds' ratios with their range: a CPU shared with other tenants drifts by
10-30% within minutes, which one run of each side, one after the other, reads as a difference
in speed (a steady drift costs every side of a mirrored round alike).
Both sides run in the same dtype on the same device. On CUDA the sampler's decode step is a
replayed CUDA graph (captured inside each call, so its capture time is in its numbers).
`--out FILE` also writes every measured row as a JSON line (rewritten whole, atomically, after
each row, so an interrupted run keeps the rows it finished), each with the machine, device,
dtype, model and commit it came from.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

import model as M
import sandbox

QUESTIONS = ["What is 17 * 23 + 5?", "Find the sum of all primes below 100.", "Solve x^2 - 5x + 6 = 0.",
             "How many ways can 5 books be arranged on a shelf?", "What is 2^100 mod 7?",
             "A rectangle has perimeter 30 and area 56. Find its sides.", "Compute 123456 * 654321.",
             "What is the gcd of 1071 and 462?"]
DEMO = ("Example.\nQuestion: What is 2**10 + 3**5?\nAnswer:\n```python\na = 2**10\nprint(a)\n```\n```output\n1024\n```\n"
        "```python\nb = 3**5\nprint(a + b)\n```\n```output\n1267\n```\nSo the answer is \\boxed{1267}.\n\n")
# 32 distinct questions, so that no two greedy rollouts of a 32-row run are alike and reach
# their code blocks together (the E-step's sampled rollouts part after the prompt as well)
CODE_QUESTIONS = [f"What is {a}**{b} + {c}**{d}?" for a, b, c, d in
                  [(2, 20, 3, 7), (5, 9, 7, 6), (11, 5, 13, 4), (6, 8, 9, 5), (4, 11, 3, 12), (7, 7, 2, 30),
                   (12, 6, 5, 10), (3, 15, 8, 6)]
                  + [(2 + i % 11, 5 + 3 * i % 13, 3 + 5 * i % 7, 4 + 7 * i % 9) for i in range(24)]]


ROWS, OUT, CONTEXT = [], None, {}


def record(**row):
    """Keep one measured row; with --out, rewrite the JSON-lines file with every row so far."""
    ROWS.append(dict(CONTEXT, **row))
    if OUT:
        tmp = f"{OUT}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
        os.replace(tmp, OUT)


def commit():
    """The checkout's commit, "-dirty" if it has changes; None outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class Ticks(StoppingCriteria):
    """A bar (stderr) over the tokens one benchmark row decodes, moved after every decode step
    by both sides alike: model.sample through `progress=ticks.sampled`, generate through
    `stopping_criteria=[ticks]`, a criterion that counts the step's rows and stops none."""

    def __init__(self, total, desc):
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False, file=sys.stderr, dynamic_ncols=True,
                        disable=None)           # off where stderr is not a terminal (a log file)

    def sampled(self, new_tokens, finished_rows):
        self.bar.update(new_tokens)

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed(fn, device):
    """(result, seconds) of fn(), the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def matmul_floor(model, b, reps=10):
    """Milliseconds that the matrix products of one decode step take alone at batch b: each
    linear layer of the model, with its own weights (so they are read from memory as in a
    step), applied once to b rows; the median of `reps` steps. On a CPU the weights are the
    prepacked copies the sampler uses (M.packed_linears), the faster of the two kernels here. No
    sampler of this model can step faster, so generate's time a step over this bounds what
    any sampler can gain."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    w = layers[0].weight
    xs = {n: torch.randn(b, n, dtype=w.dtype, device=w.device) for n in {m.in_features for m in layers}}

    def step():
        for m in layers:
            m(xs[m.in_features])
    with torch.no_grad(), M.packed_linears(model, b):
        step()
        return 1000 * statistics.median(timed(step, w.device)[1] for _ in range(reps))


def mirrored(sides, rounds, device):
    """Run every side of a comparison twice per round in mirrored order (A B C C B A), so that a
    steady drift of the machine's speed costs every side alike. Returns (the last output of each
    side, secs) with secs[side] = [[first, second run's seconds] for each round]."""
    secs, outs = {k: [] for k in sides}, {}
    for _ in range(rounds):
        runs = {k: [] for k in sides}
        for k in list(sides) + list(sides)[::-1]:
            outs[k], t = timed(sides[k], device)
            runs[k].append(t)
        for k in sides:
            secs[k].append(runs[k])
    return outs, secs


def per_round(secs, base):
    """(each side's round times: the mean of its two runs; each side's ratios base / side, one a round)."""
    mean = {k: [sum(pair) / 2 for pair in v] for k, v in secs.items()}
    return mean, {k: [b / t for b, t in zip(mean[base], mean[k])] for k in secs}


def bench_sampler(model, tok, batches, new_tokens, rounds=2):
    device = model.device
    cpu = device.type == "cpu"
    print(f"\n== sampler vs generate: greedy, {new_tokens} new tokens, EOS ignored, {rounds} round(s) ==")
    print("(plain weights: sample(pack_weights=False), the model's own linear layers, as generate uses them;")
    print(" packed: the default, weights prepacked for oneDNN (model.packed_linears), CPU only;")
    print(" each round times every side twice, in mirrored order (A B C C B A: a steady drift of the machine's")
    print(" speed then costs every side alike); a side's round time is its two runs' mean, tok/s come from")
    print(" its median round, a ratio is the median of the rounds' ratios and `spread` their range;")
    print(" floor: one decode step's matrix products alone, ms;")
    print(" bound: generate's time a step over the floor, the most any sampler of this model could gain)")
    print(f"{'batch':>5} {'generate tok/s':>15} {'plain weights':>14} {'ratio':>6} {'packed':>12} {'ratio':>6} "
          f"{'spread':>11} {'same tokens':>12} {'floor':>6} {'bound':>6}")
    for b in batches:
        prompts = [M.chat_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(b)]
        ids, mask = (t.to(device) for t in M.left_pad(prompts, tok.pad_token_id))
        ticks = Ticks(rounds * 2 * (2 + cpu) * b * new_tokens, f"batch {b}")
        sides = {"generate": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                    min_new_tokens=new_tokens, do_sample=False,
                                                    pad_token_id=tok.pad_token_id,
                                                    stopping_criteria=StoppingCriteriaList([ticks]))}
        for pack in [True] + [False] * cpu:       # plain weights only where packing applies (CPU)
            sides["packed" if pack else "plain"] = lambda pack=pack: M.sample(
                model, tok, prompts, max_new_tokens=new_tokens, greedy=True, code=False, ignore_eos=True,
                pack_weights=pack, progress=ticks.sampled)
        outs, secs = mirrored(sides, rounds, device)
        ticks.bar.close()
        ref, n = outs["generate"], b * new_tokens
        same = sum(o.response_ids == ref[i, ids.shape[1]:].tolist() for i, o in enumerate(outs["packed"]))
        mean, ratios = per_round(secs, "generate")
        tok_s = {k: n / statistics.median(v) for k, v in mean.items()}
        ratio = {k: statistics.median(v) for k, v in ratios.items()}
        floor = matmul_floor(model, b)
        bound = 1000 * statistics.median(mean["generate"]) / new_tokens / floor
        plain = f"{tok_s['plain']:>14.1f} {ratio['plain']:>5.2f}x" if cpu else f"{'-':>14} {'-':>6}"
        spread = f"{min(ratios['packed']):.2f}-{max(ratios['packed']):.2f}x"
        print(f"{b:>5} {tok_s['generate']:>15.1f} {plain} {tok_s['packed']:>12.1f} {ratio['packed']:>5.2f}x "
              f"{spread:>11} {same:>8}/{b} {floor:>6.1f} {bound:>5.2f}x")
        record(bench="sampler", batch=b, new_tokens=new_tokens, rounds=rounds, generate_tok_s=tok_s["generate"],
               plain_tok_s=tok_s.get("plain"), sample_tok_s=tok_s["packed"], ratio=ratio["packed"],
               plain_ratio=ratio.get("plain"), round_ratios=ratios["packed"], generate_s=secs["generate"],
               sample_s=secs["packed"], plain_s=secs.get("plain"), same_tokens=same, floor_ms=floor)


def reencode_loop(model, tok, prompts, prefixes, max_new_tokens, max_code_calls=4, max_output_chars=400,
                  ticks=None):
    """The baseline: generate until a row closes a ```python block, run it, append the
    output as text, and call generate again on the whole re-encoded context. `ticks` (a
    Ticks) counts each call's kept tokens when it returns."""
    eos = set(M.stop_token_ids(model, tok))
    ctx = [list(p) + list(f) for p, f in zip(prompts, prefixes)]
    texts = [tok.decode(f) for f in prefixes]
    scan, budget, calls, cells = [0] * len(ctx), [max_new_tokens] * len(ctx), [0] * len(ctx), [[] for _ in ctx]
    active = list(range(len(ctx)))

    class CloseOrBudget(StoppingCriteria):
        def __init__(self, rows, start):
            self.rows, self.start = rows, start

        def __call__(self, input_ids, scores, **kw):
            stop = []
            for j, i in enumerate(self.rows):
                new = input_ids[j, self.start:].tolist()
                text = texts[i] + tok.decode(new)
                stop.append(len(new) >= budget[i] or bool(M.CODE_BLOCK.search(text, scan[i])) or new[-1] in eos)
            return torch.tensor(stop, device=input_ids.device)

    while active:
        ids, mask = (t.to(model.device) for t in M.left_pad([ctx[i] for i in active], tok.pad_token_id))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budget[i] for i in active),
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([CloseOrBudget(active, ids.shape[1])]))
        still = []
        for j, i in enumerate(active):
            new = []
            for t in out[j, ids.shape[1]:].tolist():
                new.append(t)
                piece = tok.decode(new)
                if t in eos or len(new) >= budget[i] or M.CODE_BLOCK.search(texts[i] + piece, scan[i]):
                    break
            ctx[i] += new
            budget[i] -= len(new)
            if ticks is not None:
                ticks.bar.update(len(new))
            texts[i] += tok.decode(new)
            m = M.CODE_BLOCK.search(texts[i], scan[i])
            if new and new[-1] in eos or budget[i] <= 0 or not m:
                continue
            scan[i] = m.end()
            if calls[i] >= max_code_calls:
                shown = "Reach max function call limit."
            else:
                calls[i] += 1
                res = sandbox.run_cells(cells[i] + [m.group(1)])
                cells[i].append(m.group(1))
                shown = res.output if not res.error or res.error in res.output else res.output + res.error
                shown = M.truncate_middle(shown, max_output_chars)
            block = ("" if texts[i].endswith("\n") else "\n") + "```output\n" + shown.rstrip("\n") + "\n```\n"
            ctx[i] += tok(block, add_special_tokens=False).input_ids
            texts[i] += block
            scan[i] = len(texts[i])
            still.append(i)
        active = still
    return [c[len(p):] for c, p in zip(ctx, prompts)], calls


def bench_code(model, tok, n, new_tokens, rounds=1):
    print(f"\n== code-calling rollouts: {n} prompts, greedy, {new_tokens} sampled tokens each, "
          f"{rounds} mirrored round(s) (sample, re-encode, re-encode, sample) ==")
    prompts = [M.chat_prompt(tok, DEMO + "Question: " + CODE_QUESTIONS[i % len(CODE_QUESTIONS)]) for i in range(n)]
    prefix = tok("```python\na = ", add_special_tokens=False).input_ids
    sandbox.run_cells(["pass"])
    ticks = Ticks(rounds * 4 * n * new_tokens, f"{n} code rollouts")      # the re-encode loop stops rows at EOS
    sides = {"sample": lambda: M.sample(model, tok, prompts, [prefix] * n, max_new_tokens=new_tokens, greedy=True,
                                        ignore_eos=True, progress=ticks.sampled),
             "reencode": lambda: reencode_loop(model, tok, prompts, [prefix] * n, new_tokens, ticks=ticks)}
    outs, secs = mirrored(sides, rounds, model.device)
    ticks.bar.close()
    (ref, calls), outs = outs["reencode"], outs["sample"]
    mean, ratios = per_round(secs, "reencode")
    t_ours, t_ref, ratio = (statistics.median(v) for v in (mean["sample"], mean["reencode"], ratios["sample"]))
    sampled = sum(o.n_sampled for o in outs)
    same = sum(o.response_ids == r for o, r in zip(outs, ref))
    print(f"code calls per rollout: {[len(o.code_calls) for o in outs]} (baseline {calls})")
    runs = lambda side: ", ".join(f"{a:.1f} + {b:.1f}" for a, b in secs[side])
    print(f"re-encode loop: {t_ref:6.1f} s  {sampled / t_ref:6.1f} sampled tok/s   (runs: {runs('reencode')} s)")
    print(f"model.sample:   {t_ours:6.1f} s  {sampled / t_ours:6.1f} sampled tok/s   (runs: {runs('sample')} s)   "
          f"ratio {ratio:.2f}x (rounds {min(ratios['sample']):.2f}-{max(ratios['sample']):.2f}x)   "
          f"identical rollouts {same}/{n}")
    record(bench="code", prompts=n, new_tokens=new_tokens, rounds=rounds,
           code_calls=sum(len(o.code_calls) for o in outs), reencode_s=t_ref, sample_s=t_ours, ratio=ratio,
           round_ratios=ratios["sample"], reencode_runs_s=secs["reencode"], sample_runs_s=secs["sample"],
           identical=same)


def bench_continuous(model, tok, n, width, new_tokens):
    """Rows that end at different times (temperature 1, EOS on): fixed chunks of `width` wait
    for their longest row; continuous batching gives a finished row's slot to the next prompt."""
    print(f"\n== continuous batching: {n} prompts of mixed lengths, width {width}, temperature 1, "
          f"up to {new_tokens} new tokens, EOS on ==")
    prompts = [M.chat_prompt(tok, (DEMO if i % 3 == 0 else "") + QUESTIONS[i % len(QUESTIONS)] * (1 + i % 4))
               for i in range(n)]
    ticks = Ticks(2 * n * new_tokens, f"{n} prompts")     # an upper bound: rows end at EOS
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, seed=0, code=False, progress=ticks.sampled)
    chunks, t_chunks = timed(lambda: [o for s in range(0, n, width)
                                      for o in M.sample(model, tok, prompts[s:s + width], **kw)], model.device)
    outs, t_cont = timed(lambda: M.sample(model, tok, prompts, batch_size=width, **kw), model.device)
    ticks.bar.close()
    lengths = sorted(len(p) for p in prompts)
    print(f"prompt lengths {lengths[0]}..{lengths[-1]} tokens; sampled tokens per row "
          f"{min(o.n_sampled for o in outs)}..{max(o.n_sampled for o in outs)}")
    a, b = sum(o.n_sampled for o in chunks), sum(o.n_sampled for o in outs)
    print(f"fixed chunks of {width}: {t_chunks:6.1f} s  {a / t_chunks:7.1f} sampled tok/s")
    print(f"continuous, width {width}: {t_cont:6.1f} s  {b / t_cont:7.1f} sampled tok/s   ratio {t_chunks / t_cont:.2f}x "
          f"(tokens/s ratio {(b / t_cont) / (a / t_chunks):.2f}x)")
    record(bench="continuous", prompts=n, width=width, new_tokens=new_tokens, chunks_s=t_chunks,
           chunks_tok_s=a / t_chunks, continuous_s=t_cont, continuous_tok_s=b / t_cont, ratio=t_chunks / t_cont)


def bench_sandbox(reps):
    print("\n== sandbox ==")
    sandbox.run_cells(["pass"])
    print(f"isolated namespaces: {sandbox.isolated()}")
    rows = []
    for name, code in [("print(1+1)", "print(1+1)"), ("sympy cell", "import sympy\nprint(sympy.factorint(2**64 - 1))")]:
        ts = []
        for _ in range(reps):
            time.sleep(0.02)          # a caller does other work between calls (sampling, grading)
            t = time.perf_counter()
            sandbox.run_cells([code])
            ts.append(1000 * (time.perf_counter() - t))
        back = []
        for _ in range(reps):
            t = time.perf_counter()
            sandbox.run_cells([code])
            back.append(1000 * (time.perf_counter() - t))
        fresh = []
        for _ in range(max(3, reps // 5)):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], capture_output=True, env=sandbox.SAFE_ENV)
            fresh.append(1000 * (time.perf_counter() - t))
        rows.append((name, statistics.median(ts), statistics.median(back), statistics.median(fresh)))
    print(f"{'cell':>12} {'p50 ms':>7} {'p50 back-to-back':>17} {'python -c ms':>13} {'ratio':>6}")
    for name, p50, b2b, fresh in rows:
        print(f"{name:>12} {p50:7.1f} {b2b:17.1f} {fresh:13.1f} {fresh / p50:5.1f}x")
        record(bench="sandbox", cell=name, p50_ms=p50, back_to_back_ms=b2b, python_c_ms=fresh, ratio=fresh / p50)
    sandbox.run_batch([["pass"]] * (os.cpu_count() or 1))      # start one zygote per core
    batch = [[f"print(sum(range({i})))"] for i in range(64)]
    t = time.perf_counter()
    results = sandbox.run_batch(batch)
    dt = time.perf_counter() - t
    print(f"batch of 64 cells on {os.cpu_count()} cores: {64 / dt:.0f} cells/s, all ok: {all(r.ok for r in results)}")
    record(bench="sandbox-batch", cells=64, cells_per_s=64 / dt, all_ok=all(r.ok for r in results))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="*", help="any of: all sampler code continuous sandbox (default: all)")
    ap.add_argument("--model", default=M.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="fp32", choices=list(M.DTYPES))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both sides of every comparison run there)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2,
                    help="sampler benchmark: rounds of two runs per side in mirrored order (A B C C B A); "
                         "ratios are medians over rounds")
    ap.add_argument("--code-rounds", type=int, default=1,
                    help="code benchmark: mirrored rounds (sample, re-encode, re-encode, sample)")
    ap.add_argument("--code-prompts", type=int, nargs="+", default=[8, 32],
                    help="rollouts of the code benchmark, one run per value (32: the E-step's --sample-batch)")
    ap.add_argument("--cb-prompts", type=int, default=256, help="prompts of the continuous-batching run")
    ap.add_argument("--cb-width", type=int, default=64, help="batch width of the continuous-batching run")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", help="also write every measured row to this JSON-lines file")
    args = ap.parse_args()
    args.what = args.what or ["all"]
    if set(args.what) - {"all", "sampler", "code", "continuous", "sandbox"}:
        raise SystemExit(f"error: unknown benchmark in {args.what}: choose from all, sampler, code, continuous, sandbox")
    if min(args.batches + args.code_prompts + [args.new_tokens, args.cb_prompts, args.cb_width, args.reps,
                                              args.rounds, args.code_rounds]) < 1:
        raise SystemExit("error: --batches, --new-tokens, --code-prompts, --cb-prompts, --cb-width, --reps, "
                         "--rounds and --code-rounds must be at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: unknown device '{args.device}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    global OUT
    if args.out:
        OUT = args.out
        try:
            open(OUT, "w").close()
        except OSError as e:
            ap.error(f"--out {OUT}: {e.strerror}")
    CONTEXT.update(cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(), commit=commit())
    if {"all", "sandbox"} & set(args.what):
        bench_sandbox(args.reps)
    if {"all", "sampler", "code", "continuous"} & set(args.what):
        model, tok = M.load_model(args.model, args.dtype, args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"model: {args.model} {args.dtype} on {args.device} ({name})")
        CONTEXT.update(model=args.model, dtype=args.dtype, device=args.device, device_name=name)
        M.sample(model, tok, [M.chat_prompt(tok, "Hi")], max_new_tokens=2, code=False)     # warm up the kernels
        warm = torch.tensor([M.chat_prompt(tok, "Hi")], device=device)                     # ...and generate's
        model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2,
                       pad_token_id=tok.pad_token_id)
        if {"all", "sampler"} & set(args.what):
            bench_sampler(model, tok, args.batches, args.new_tokens, args.rounds)
        if {"all", "code"} & set(args.what):
            for n in args.code_prompts:
                bench_code(model, tok, n, args.new_tokens, args.code_rounds)
        if {"all", "continuous"} & set(args.what):
            bench_continuous(model, tok, args.cb_prompts, args.cb_width, args.new_tokens)


if __name__ == "__main__":
    main()
