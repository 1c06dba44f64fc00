"""em_train.py -- the AutoCode EM loop (paper section 2): E-step in explore.py, M-step here.

STATUS: the M-step (the off-policy loss, checkpoints, --resume, the rl/sft baselines) is not
written yet; see issue "explore.py + em_train.py". Until it lands, this script runs one
E-step on the built-in task and prints what the M-step would train on, so that
`python em_train.py` does something useful and shows the exploration data end to end.

Run:  python em_train.py                    # embedded SmolLM2-135M, 4 queries, K=2 per decision
      python em_train.py --model tiny       # seconds
"""
import argparse
import os

import torch

import evaluate as E
import explore as X
import model as M


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=M.DEFAULT_MODEL)
    ap.add_argument("--dtype", default="fp32", choices=list(M.DTYPES))
    ap.add_argument("--data", default="builtin:train")
    ap.add_argument("--queries-per-iter", type=int, default=4)
    ap.add_argument("--out", default="runs/em")
    X.add_args(ap)
    ap.set_defaults(k=2, max_new_tokens=192)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = M.load_model(args.model, args.dtype, device)
    problems = E.load_problems(args.data, args.queries_per_iter, args.seed, shuffle=True)
    records = X.explore(model, tok, problems, args.k, args.native_k, args.estep, args.alpha, args.prior, args.keep,
                        {"cot": args.cot_prefix, "code": args.code_prefix}, args.max_new_tokens,
                        args.temperature, args.seed)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "explore-iter0.jsonl")
    X.write_jsonl_atomic(path, records)
    kept = [r for r in records if r["kept"]]
    print(f"E-step: {len(records)} rollouts over {len(problems)} queries, mean reward "
          f"{sum(r['reward'] for r in records) / len(records):.3f}; {len(kept)} kept for the M-step "
          f"({sum(r['decision'] == 'code' for r in kept)} code, {sum(r['decision'] == 'cot' for r in kept)} CoT)")
    print(f"exploration data -> {path}  (M-step: not implemented yet)")


if __name__ == "__main__":
    main()
