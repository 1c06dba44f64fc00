"""plot.py -- turn the metrics.jsonl of several runs into one figure and one table.

  python plot.py runs/em-s0 runs/em-s1 runs/rl-s0 runs/rl-s1 runs/sft-s0 --out results/curves.png

Each argument is an em_train.py output directory. The figure has one panel per held-out
metric (autonomous accuracy, code rate on the code-worthy kinds, code rate on the easy kinds,
selection accuracy, and the model's probability of opening with code, pi(code|x), on each
group), one line per run, iteration 0 being the untrained model. The table
(markdown, printed) gives each metric at iteration 0 and at the last iteration, per run and,
where an algorithm has several seeds, their mean and spread (max - min).
matplotlib is an optional extra (`pip install matplotlib`); without it only the table prints.
"""
import argparse
import json
import os
import sys

PANELS = [("eval_acc_autonomous", "held-out accuracy (autonomous)"),
          ("eval_code_rate_compute", "code rate, code-worthy kinds"),
          ("eval_code_rate_easy", "code rate, easy kinds"),
          ("eval_selection_acc", "selection accuracy"),
          ("eval_pi_code_compute", "pi(code|x), code-worthy kinds"),
          ("eval_pi_code_easy", "pi(code|x), easy kinds")]


def read_run(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path}: no such file (is {folder} an em_train.py --out directory?)")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{lineno}: bad JSON ({e.msg})")
    evals = {r["iteration"]: r for r in rows if any(k in r for k, _ in PANELS)}
    if not evals:
        raise SystemExit(f"error: {path}: no evaluation rows (run with --eval-every 1)")
    return {"name": os.path.basename(os.path.normpath(folder)), "algo": rows[0].get("algo", "?"), "evals": evals}


def table(runs):
    """Markdown: each metric at iteration 0 and at the last one, per run, then per algorithm."""
    head = "| run | iterations | " + " | ".join(f"{label} (0 -> last)" for _, label in PANELS) + " |"
    lines = [head, "|" + "---|" * (len(PANELS) + 2)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"   # noqa: E731
    for run in runs:
        first, last = run["evals"][min(run["evals"])], run["evals"][max(run["evals"])]
        cells = [f"{fmt(first.get(k))} -> {fmt(last.get(k))}" for k, _ in PANELS]
        lines.append(f"| {run['name']} | {max(run['evals'])} | " + " | ".join(cells) + " |")
    by_algo = {}
    for run in runs:
        by_algo.setdefault(run["algo"], []).append(run["evals"][max(run["evals"])])
    for algo, lasts in by_algo.items():
        if len(lasts) < 2:
            continue
        cells = []
        for k, _ in PANELS:
            v = [r[k] for r in lasts if r.get(k) is not None]
            cells.append(f"last {sum(v) / len(v):.2f} (spread {max(v) - min(v):.2f})" if v else "-")
        lines.append(f"| {algo}, {len(lasts)} seeds | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure, table only", file=sys.stderr)
        return None
    cols = 3
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    axes = axes.flatten()
    colors = {"em": "tab:blue", "rl": "tab:orange", "sft": "tab:green"}
    styles = ["-", "--", ":", "-."]                 # the n-th run of an algorithm (its seeds)
    nth = {}
    for run in runs:
        nth[run["name"]] = sum(r["algo"] == run["algo"] for r in runs[:runs.index(run)])
    for ax, (key, label) in zip(axes, PANELS):
        for run in runs:
            xs = sorted(i for i, r in run["evals"].items() if r.get(key) is not None)
            ax.plot(xs, [run["evals"][i][key] for i in xs], marker="o", label=run["name"],
                    color=colors.get(run["algo"]), linestyle=styles[nth[run["name"]] % len(styles)], alpha=0.85)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("EM iteration (0 = untrained)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="em_train.py --out directories")
    ap.add_argument("--out", default="results/curves.png")
    args = ap.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    print(table(runs))
    path = figure(runs, args.out)
    if path:
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
