"""A newcomer's mistakes: every entry point refuses bad input with one line before it loads a
model or writes a file; offline or unknown model names fail in seconds; progress moves per
decode step and its totals match what was sampled."""
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import types

import pytest
import torch

import bench
import em_train as T
import evaluate as E
import explore as X
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.fixture
def refused(tmp_path, monkeypatch):
    """Run main(argv) in tmp_path with model loading forbidden; return the one-line message
    after checking that nothing was written there."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(M, "load_model", load)
    monkeypatch.chdir(tmp_path)

    def run(main, argv):
        before = tree(tmp_path)
        with pytest.raises(SystemExit) as e:
            main(argv)
        message = str(e.value)
        assert message.startswith("error: ") and "\n" not in message, message
        assert tree(tmp_path) == before, "something was written"
        return message
    return run


@pytest.fixture
def files(tmp_path):
    """Bad data files a newcomer might pass."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n   \n\t\n")
    (tmp_path / "binary.jsonl").write_bytes(b'{"problem": "1+1", "answer": "2"}\n\n\x89PNG\r\n\x1a\n\xff\xfe\x00\x01\n')
    (tmp_path / "good.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    return {p.stem: str(p) for p in tmp_path.iterdir()}


# ---------------------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expect", [
    (["--limit", "-1"], "--limit"),
    (["--limit", "0"], "leave it out to use every problem"),
    (["--n", "0"], "--n must be > 0"),
    (["--n", "4"], "--temperature > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--out", "/proc/x"], "--out /proc/x"),
    (["--out", "/proc/x/y"], "--out /proc/x/y"),
    (["--data", "builtin:nonsense"], "builtin:nonsense"),
    (["--data", "no/such/file.jsonl"], "no such file"),
    (["--data", "."], "is a directory"),
])
def test_evaluate_refuses_bad_flags(refused, argv, expect):
    assert expect in refused(E.main, argv + ["--model", "tiny"])


def test_evaluate_refuses_an_out_that_is_a_file(refused, files):
    assert "is not a directory" in refused(E.main, ["--out", files["good"]])


@pytest.mark.parametrize("name,expect", [
    ("empty", "no problems (the file is empty"),
    ("blank", "no problems (the file is empty or has only blank lines)"),
    ("binary", "binary.jsonl:3: not UTF-8 text"),
])
def test_evaluate_refuses_bad_data_files(refused, files, name, expect):
    message = refused(E.main, ["--data", files[name]])
    assert files[name] in message and expect in message


# ---------------------------------------------------------------------------------------
# em_train.py
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expect", [
    (["--iterations", "0"], "--iterations must be > 0"),
    (["--k", "0"], "--k must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "inf"], "--lr must be > 0"),
    (["--queries-per-iter", "0"], "--queries-per-iter"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--clip-eps", "0"], "--clip-eps"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--sample-batch", "0"], "--sample-batch"),
    (["--eval-n", "0"], "--eval-n"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--decision-coef", "-0.5"], "--decision-coef"),
    (["--kl-coef", "-1"], "--kl-coef"),
    (["--train-size", "0"], "--train-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--keep", "9"], "--keep 9 is more than"),
    (["--code-prefix", "```python\nprint(1)\n```\n"], "--code-prefix closes a ```python block"),
    (["--native-k", "0"], "--native-k >= 1"),
    (["--native-k", "-1", "--algo", "rl"], "--native-k must be >= 0"),
    (["--alpha", "-1"], "--alpha"),
    (["--out", "/proc/x"], "--out /proc/x"),
    (["--data", "builtin:nonsense"], "builtin:nonsense"),
    (["--eval-data", "builtin:nonsense"], "builtin:nonsense"),
])
def test_em_train_refuses_bad_flags(refused, argv, expect):
    assert expect in refused(T.main, argv + ["--model", "tiny"] + ([] if "--out" in argv else ["--out", "run"]))


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
@pytest.mark.parametrize("name,expect", [
    ("empty", "no problems"), ("blank", "no problems"), ("binary", "binary.jsonl:3: not UTF-8 text")])
def test_em_train_refuses_bad_data_files_before_any_checkpoint(refused, files, flag, name, expect):
    message = refused(T.main, [flag, files[name], "--out", "run"])
    assert files[name] in message and expect in message


def damaged_checkpoint(tmp_path, how):
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    path = ckpt / "trainer_state.pt"
    torch.save({"iteration": 1, "optimizer": {"state": {0: torch.arange(4096.0)}}}, path)
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:                                      # one flipped byte inside the tensor's bytes
        at = bytes(data).index(torch.arange(4096.0)[100:104].numpy().tobytes())
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_resume_over_a_damaged_trainer_state_is_one_line(refused, tmp_path, how):
    path = damaged_checkpoint(tmp_path, how)
    message = refused(T.main, ["--model", "tiny", "--out", "run", "--resume"])
    assert os.path.relpath(path, tmp_path) in message and "damaged" in message


def test_an_intact_trainer_state_passes_the_check(tmp_path):
    path = tmp_path / "trainer_state.pt"
    torch.save({"iteration": 1, "optimizer": {}}, path)
    T.check_trainer_state(str(path))


# ---------------------------------------------------------------------------------------
# explore.py, model.py, bench.py
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,expect", [
    (["--k", "0"], "--k must be > 0"),
    (["--queries", "0"], "--queries"),
    (["--keep", "9"], "--keep 9"),
    (["--native-k", "0"], "--native-k >= 1"),
    (["--temperature", "-1"], "--temperature"),
    (["--code-prefix", "```python\nx = 1\n```"], "--code-prefix closes a ```python block"),
    (["--out", "."], "is a directory"),
    (["--out", "/proc/x/explore.jsonl"], "--out /proc/x/explore.jsonl"),
    (["--data", "builtin:nonsense"], "builtin:nonsense"),
])
def test_explore_refuses_bad_flags(refused, argv, expect):
    assert expect in refused(X.main, argv + ["--model", "tiny"])


def test_explore_refuses_an_empty_data_file(refused, files):
    assert "no problems" in refused(X.main, ["--data", files["empty"], "--out", "e.jsonl"])


@pytest.mark.parametrize("argv,expect", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--question", " "], "--question is empty"),
    (["--prefix", "\\x"], "--prefix"),
    (["--prefix", "```python\\nprint(1)\\n```"], "--prefix closes a ```python block"),
])
def test_model_main_refuses_bad_flags(refused, argv, expect):
    assert expect in refused(M.main, argv + ["--model", "tiny"])


@pytest.mark.parametrize("flag, values", [("--batches", ["8", "0"]), ("--code-prompts", ["8", "0"]),
                                          ("--rounds", ["0"]), ("--code-rounds", ["0"])])
def test_bench_refuses_bad_counts(refused, monkeypatch, flag, values):
    monkeypatch.setattr(sys, "argv", ["bench.py", "sampler", flag] + values)
    assert flag in refused(lambda argv: bench.main(), None)


def test_good_arguments_pass_the_checks(tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    T.check_args(T.parse_args(["--data", files["good"], "--out", "run", "--resume"]))
    args = types.SimpleNamespace(data="builtin:test", limit=None, n=1, temperature=0.0, max_new_tokens=8,
                                 batch_size=2, model="tiny", out=None)
    E.check_args(args)
    assert args.out == os.path.join("results", "builtin_test-tiny") and not os.path.exists("results")


# ---------------------------------------------------------------------------------------
# Model names that cannot load: seconds, one line, the installed hub client's command
# ---------------------------------------------------------------------------------------
CHILD = """
import sys, time
import model
t = time.time()
try:
    model.load_model(sys.argv[1])
except SystemExit as e:
    print(f"{time.time() - t:.1f}")
    sys.exit(str(e))
"""


def load_in_child(name, endpoint, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-c", CHILD, name], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name,repo", [("no-such-model", "no-such-model"), ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")])
def test_unreachable_hub_fails_fast_with_one_line(tmp_path, name, repo):
    rc, seconds, err = load_in_child(name, f"http://127.0.0.1:{closed_port()}", tmp_path)
    assert rc == 1 and "\n" not in err, err                    # was: 22 lines of retries, then the error
    assert f"hf download {repo}" in err and "huggingface-cli" not in err and "cannot be reached" in err
    assert float(seconds) < 20                                  # was: 49 s of retries


def test_unknown_id_on_a_reachable_hub_is_one_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()      # answers 501 to everything
    try:
        rc, _, err = load_in_child("org/no-such-model", f"http://127.0.0.1:{server.server_port}", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 1 and "\n" not in err and "'org/no-such-model' did not load" in err, err


def test_a_cached_snapshot_loads_without_the_hub(tmp_path, monkeypatch):
    """A hub id already in the local cache needs no network: hub_source returns its folder."""
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_files_only: str(snapshot))
    monkeypatch.setattr(M, "_reachable", lambda url: pytest.fail("probed the hub for a cached model"))
    assert M.hub_source("org/cached") == str(snapshot)


# ---------------------------------------------------------------------------------------
# Progress: per decode step, exact totals, and wired into every sampling loop
# ---------------------------------------------------------------------------------------
def rollout(n_tokens):
    return M.Rollout(prompt_ids=[1], response_ids=[5] * n_tokens, logprobs=[0.0] * n_tokens,
                     sampled=[True] * n_tokens, text="\\boxed{2}", finish="eos")


def test_progress_moves_with_the_hook_and_settles_on_the_outputs(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(E.time, "time", lambda: now[0])          # a clock the test moves
    bar = E.Progress(total=5, desc="t", enabled=False, max_new_tokens=100)
    assert bar.hook is None                                      # disabled: the sampler gets nothing
    bar = E.Progress(total=5, desc="t", enabled=True, max_new_tokens=100)
    assert bar.seconds_left() is None                            # no token yet: no rate
    now[0] += 1
    bar.hook(4, 0)
    assert bar.tokens_per_s() == 4 and bar.bar.n == 0
    assert bar.seconds_left() == (5 * 100 - 4) / 4               # nothing returned yet: max_new_tokens each
    bar.hook(2, 1)
    assert bar.bar.n == 1                                        # a row finished mid-batch: it shows
    bar.batch_done([rollout(2), rollout(4)])                     # the sampler reported 1 of 2 rows
    assert bar.bar.n == 2 and bar.tokens == 6
    bar.batch_done([rollout(3)])                                 # a sampler that reported nothing
    assert bar.bar.n == 3 and bar.tokens == 9
    now[0] += 2
    assert bar.tokens_per_s() == 3 and bar.seconds_left() == 2 * 3 / 3   # 2 left, 3 tokens each so far
    bar.close()


@pytest.fixture
def fake_sampler(monkeypatch):
    """model.sample replaced by one that reports every step through `progress`, as the
    sampler's contract says: (tokens sampled in the step, rows that finished in it)."""
    bars = []
    real = E.Progress

    class Recorded(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = []
            bars.append(self)

        def __call__(self, new_tokens, finished_rows):
            self.calls.append((new_tokens, finished_rows))
            super().__call__(new_tokens, finished_rows)

    def sample(model, tok, prompts, prefixes=None, *, progress=None, **kw):
        assert progress is not None
        for step in range(3):
            progress(len(prompts), len(prompts) if step == 2 else 0)
        return [rollout(3) for _ in prompts]

    monkeypatch.setattr(E, "Progress", Recorded)
    monkeypatch.setattr(M, "sample", sample)
    return bars


def test_evaluate_run_reports_progress(fake_sampler, tok, tmp_path):
    problems = E.load_problems("builtin:test", limit=3)
    E.run(None, tok, problems, ["cot", "code"], str(tmp_path / "r"), max_new_tokens=3, batch_size=4)
    [bar] = fake_sampler
    assert bar.bar.n == bar.bar.total == 6 and bar.tokens == 18
    assert len(bar.calls) == 3 * 3                   # 3 sample calls (4 + 2 rollouts, split by mode), 3 steps each


def test_explore_reports_progress(fake_sampler, tok):
    problems = E.load_problems("builtin:train", limit=2)
    X.explore(None, tok, problems, k=2, native_k=1, max_new_tokens=3, batch_size=8)
    [bar] = fake_sampler
    assert bar.bar.n == bar.bar.total == 2 * 5 and bar.calls and bar.tokens == 30


def test_rl_rollouts_report_progress(fake_sampler, tok):
    args = T.parse_args(["--sample-batch", "4", "--max-new-tokens", "3"])
    T.native_records(None, tok, E.load_problems("builtin:train", limit=3), 2, args, seed=0)
    [bar] = fake_sampler
    assert bar.bar.n == bar.bar.total == 6 and len(bar.calls) == 3 * 2


def test_bench_writes_each_measured_row_as_a_json_line(tmp_path, monkeypatch, capsys):
    """--out: one JSON line per printed row, with the context a reader needs to compare runs,
    and the ratios equal to the times they come from."""
    out = tmp_path / "bench.jsonl"
    for name, fresh in (("ROWS", []), ("OUT", None), ("CONTEXT", {})):
        monkeypatch.setattr(bench, name, fresh)
    bars = []

    class Bar(ShownBar):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)
    monkeypatch.setattr(bench, "tqdm", Bar)
    monkeypatch.setattr(sys, "argv", ["bench.py", "sampler", "continuous", "--model", "tiny", "--batches", "1", "2",
                                      "--new-tokens", "3", "--cb-prompts", "3", "--cb-width", "2", "--out", str(out)])
    bench.main()
    # a bar per row, moved by every decode step of every side: 2 rounds x 2 runs x 3 sides (CPU) x b x 3 tokens
    assert [(b.n, b.total) for b in bars[:2]] == [(2 * 2 * 3 * b * 3, 2 * 2 * 3 * b * 3) for b in (1, 2)]
    assert 2 * 3 <= bars[2].n <= bars[2].total == 2 * 3 * 3      # continuous: rows may end at EOS
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["bench"], r.get("batch")) for r in rows] == [("sampler", 1), ("sampler", 2), ("continuous", None)]
    assert all(r["model"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "fp32" and r["cores"] for r in rows)
    for r in rows[:2]:
        n = r["batch"] * r["new_tokens"]
        assert r["rounds"] == 2 == len(r["generate_s"]) == len(r["sample_s"]) == len(r["round_ratios"])
        assert all(len(pair) == 2 for pair in r["generate_s"] + r["sample_s"] + r["plain_s"])
        assert r["round_ratios"] == pytest.approx([sum(g) / sum(t) for g, t in zip(r["generate_s"], r["sample_s"])])
        assert r["ratio"] == pytest.approx(statistics.median(r["round_ratios"]))
        assert r["sample_tok_s"] == pytest.approx(n / statistics.median(sum(t) / 2 for t in r["sample_s"]))
        assert r["generate_tok_s"] == pytest.approx(n / statistics.median(sum(t) / 2 for t in r["generate_s"]))
        assert r["same_tokens"] <= r["batch"] and r["plain_tok_s"] > 0 and r["floor_ms"] > 0
    assert rows[2]["ratio"] == pytest.approx(rows[2]["chunks_s"] / rows[2]["continuous_s"])
    assert "sampler vs generate" in capsys.readouterr().out
    assert not os.path.exists(f"{out}.tmp")


def test_bench_sampler_mirrors_each_round_so_a_steady_drift_costs_every_side_alike(tiny, tok, monkeypatch,
                                                                                   capsys):
    """A machine whose speed drifts: each round runs the sides in mirrored order (A B C C B A)
    and a side's round time is the mean of its two runs. Here every run is slower than the one
    before (a fake clock: the n-th run takes n seconds), so three equally fast sides must come
    out level; run in one order, the side that runs first would look faster."""
    calls, real_generate = [], tiny.generate
    monkeypatch.setattr(tiny, "generate", lambda *a, **k: calls.append("generate") or real_generate(*a, **k))
    real_sample = M.sample
    monkeypatch.setattr(bench.M, "sample", lambda *a, pack_weights=True, **k: calls.append(
        "packed" if pack_weights else "plain") or real_sample(*a, pack_weights=pack_weights, **k))
    clock = iter(range(1, 100))
    monkeypatch.setattr(bench, "timed", lambda fn, device: (fn(), next(clock)))
    monkeypatch.setattr(bench, "matmul_floor", lambda model, b: 1.0)
    for name, fresh in (("ROWS", []), ("OUT", None), ("CONTEXT", {})):
        monkeypatch.setattr(bench, name, fresh)
    bench.bench_sampler(tiny, tok, [2], 3, rounds=2)
    sides = ["generate", "packed", "plain"]              # plain weights: a CPU-only side
    assert calls == (sides + sides[::-1]) * 2
    [row] = bench.ROWS
    assert row["generate_s"] == [[1, 6], [7, 12]] and row["sample_s"] == [[2, 5], [8, 11]]
    assert row["plain_s"] == [[3, 4], [9, 10]]
    assert row["round_ratios"] == [1.0, 1.0] and row["ratio"] == row["plain_ratio"] == 1.0
    assert row["sample_tok_s"] == row["generate_tok_s"] == pytest.approx(2 * 3 / 6.5)   # the median round: 3.5, 9.5
    assert "2 round(s)" in capsys.readouterr().out


def test_bench_code_mirrors_its_round_and_writes_each_run(tiny, tok, monkeypatch, capsys):
    """The code rows time the sampler and the re-encode loop as the sampler rows do: sample,
    re-encode, re-encode, sample, on a fake clock where each run takes a second more than the
    last, so that two equally fast sides come out level (one run each, in one order, read 2x)."""
    calls = []
    real_sample, real_loop = M.sample, bench.reencode_loop
    monkeypatch.setattr(bench.M, "sample", lambda *a, **k: calls.append("sample") or real_sample(*a, **k))
    monkeypatch.setattr(bench, "reencode_loop", lambda *a, **k: calls.append("reencode") or real_loop(*a, **k))
    clock = iter(range(1, 100))
    monkeypatch.setattr(bench, "timed", lambda fn, device: (fn(), next(clock)))
    for name, fresh in (("ROWS", []), ("OUT", None), ("CONTEXT", {})):
        monkeypatch.setattr(bench, name, fresh)
    bench.bench_code(tiny, tok, 2, 3, rounds=2)
    assert calls == ["sample", "reencode", "reencode", "sample"] * 2
    [row] = bench.ROWS
    assert row["sample_runs_s"] == [[1, 4], [5, 8]] and row["reencode_runs_s"] == [[2, 3], [6, 7]]
    assert row["round_ratios"] == [1.0, 1.0] and row["ratio"] == 1.0 and row["rounds"] == 2
    assert row["sample_s"] == row["reencode_s"] == 4.5           # the median of the rounds' means 2.5, 6.5
    assert 0 <= row["identical"] <= 2
    assert "runs: 1.0 + 4.0, 5.0 + 8.0 s" in capsys.readouterr().out


class ShownBar(bench.tqdm):
    """bench's bar, on though pytest's stderr is no terminal (disable=None turns it off there)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "disable": False})


def test_bench_progress_criterion_leaves_generate_unchanged(tiny, tok, monkeypatch):
    """The bar's stopping criterion counts tokens and stops nothing: generate returns what it
    returns without it, and the bar has counted every row of every step."""
    monkeypatch.setattr(bench, "tqdm", ShownBar)
    ids, mask = M.left_pad([M.chat_prompt(tok, q) for q in ("Hi", "What is 2 + 2?")], tok.pad_token_id)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=tok.pad_token_id)
    ticks = bench.Ticks(2 * 6, "test")
    counted = tiny.generate(**kw, stopping_criteria=bench.StoppingCriteriaList([ticks]))
    assert torch.equal(counted, tiny.generate(**kw))
    assert ticks.bar.n == 2 * 6


def test_bench_matmul_floor_reads_every_linear_weight_once_per_step(tiny):
    """The floor bench.py prints beside generate must be one whole decode step's matrix
    products: every linear layer of the model (LM head included), each once, at the batch,
    on the kernels the sampler uses (prepacked weights on this CPU)."""
    seen = []
    linears = [m for m in tiny.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((id(m), args[0].shape[0], "forward" in m.__dict__)))
             for m in linears]
    try:
        ms = bench.matmul_floor(tiny, 5, reps=3)
    finally:
        for h in hooks:
            h.remove()
    steps = 1 + 3                                   # a warm-up step, then the timed ones
    assert len(seen) == steps * len(linears)
    assert {m for m, _, _ in seen} == {id(m) for m in linears} and {b for _, b, _ in seen} == {5}
    assert all(packed for _, _, packed in seen) == M.packed_linears(tiny, 5).on
    assert ms > 0 and not any("forward" in m.__dict__ for m in linears)
