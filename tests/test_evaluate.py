"""Loaders for the five formats, malformed input, metrics, and an end-to-end tiny-model run."""
import json
import os

import pytest

import evaluate as E

HERE = os.path.dirname(os.path.abspath(__file__))


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_formats(tmp_path):
    path = write(tmp_path, [
        json.dumps({"problem": "P1", "answer": "\\frac{1}{2}", "level": "Level 3", "subject": "Algebra"}),  # MATH
        json.dumps({"question": "Q", "answer": "steps\n#### 1,234"}),                                       # GSM8K
        json.dumps({"problem": "A", "answer": 33, "id": 7}),                                                # AIME
        json.dumps({"problem": "B", "answer": 27.0}),                                                       # AMC
        json.dumps({"problem": "C", "answer": 2.5}),
    ])
    p = E.load_problems(path)
    assert [x["answer"] for x in p] == ["\\frac{1}{2}", "1234", "33", "27", "2.5"]
    assert [x["numeric"] for x in p] == [False, True, True, True, True]
    assert p[0]["level"] == "Level 3" and p[2]["id"] == "7"
    both = E.load_problems(write(tmp_path, ['{"problem": null, "question": "Q", "answer": "1"}'], "n.jsonl"))
    assert both[0]["question"] == "Q"                               # a null field is no field


@pytest.mark.parametrize("line,field", [
    ('{"problem": "x", "answer": ', "bad JSON"),
    ('{"answer": "3"}', "no question"),
    ('{"problem": "x"}', "no answer"),
    ('{"question": "x", "answer": "#### "}', "nothing after '####'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"problem": "x", "answer": [1, 2]}', "field 'answer' is a list"),
    ('{"problem": "x", "answer": {"v": 1}}', "field 'answer' is a dict"),
    ('{"problem": "x", "answer": NaN}', "not a finite number"),
    ('{"problem": "x", "answer": 1e400}', "not a finite number"),
    ('{"problem": "x", "answer": ' + "9" * 5000 + '}', "bad JSON"),
    ('{"problem": "x", "answer": "1", "id": "d.jsonl:1"}', "field 'id'"),       # line 1's id, made from its place
])
def test_malformed_names_file_line_and_field(tmp_path, line, field):
    path = write(tmp_path, [json.dumps({"problem": "ok", "answer": "1"}), line])
    with pytest.raises(SystemExit) as e:
        E.load_problems(path)
    assert f"{path}:2:" in str(e.value) and field in str(e.value)


def test_ids_null_and_repeated(tmp_path):
    """A null id is no id (the file and line name the problem); a repeated one is refused, since
    samples are stored by id and two problems would merge into one."""
    p = E.load_problems(write(tmp_path, ['{"problem": "a", "answer": "1", "id": null}',
                                         '{"problem": "b", "answer": "2", "id": null}']))
    assert [x["id"] for x in p] == ["d.jsonl:1", "d.jsonl:2"]
    with pytest.raises(SystemExit, match=r"d.jsonl:3: field 'id': '5' is also line 1's"):
        E.load_problems(write(tmp_path, ['{"problem": "a", "answer": "1", "id": 5}', '{"problem": "b", "answer": "2"}',
                                         '{"problem": "c", "answer": "3", "id": "5"}']))


def test_integer_answers_written_as_strings_are_graded_as_numbers(tmp_path):
    """AIME as shipped ("answer": "025"): exact numbers, as for integer answers; a file with any
    other answer keeps MATH's grading for all its lines."""
    aime = E.load_problems(write(tmp_path, ['{"problem": "a", "answer": "025"}', '{"problem": "b", "answer": 204}']))
    assert [p["numeric"] for p in aime] == [True, True]
    assert E.grade(aime[0], "so \\boxed{25}")[1] and not E.grade(aime[0], "\\boxed{24.99999999999}")[1]
    assert not E.grade(aime[0], "\\boxed{x = 25}")[1]
    math = E.load_problems(write(tmp_path, ['{"problem": "a", "answer": "025"}', '{"problem": "b", "answer": "\\\\frac{1}{2}"}'],
                                 "m.jsonl"))
    assert [p["numeric"] for p in math] == [False, False]


def test_limit_shuffle_seed():
    a = E.load_problems(os.path.join(HERE, "fixtures", "mini.jsonl"), limit=2, shuffle=True, seed=1)
    b = E.load_problems(os.path.join(HERE, "fixtures", "mini.jsonl"), limit=2, shuffle=True, seed=1)
    assert a == b and len(a) == 2


def test_metrics_and_selection_accuracy():
    def rec(pid, mode, k, correct, code, pred="1"):
        return {"id": pid, "mode": mode, "sample": k, "correct": correct, "pred": pred,
                "code_calls": [{"ok": True}] if code else []}
    records = [rec("a", "cot", 0, True, False), rec("a", "code", 0, True, True), rec("a", "autonomous", 0, True, False),
               rec("b", "cot", 0, False, False), rec("b", "code", 0, True, True), rec("b", "autonomous", 0, False, False),
               rec("c", "cot", 0, False, False), rec("c", "code", 0, False, True), rec("c", "autonomous", 0, False, True)]
    for r, group in zip(records, "eeeeeeccc"):
        r["group"] = {"e": "easy", "c": "compute"}[group]
    s = E.summarize(records, ["autonomous", "cot", "code"])
    assert s["cot"]["accuracy"] == pytest.approx(1 / 3) and s["code"]["code_rate"] == 1.0
    assert s["autonomous"]["accuracy_by_group"] == {"compute": 0.0, "easy": 0.5}
    assert s["autonomous"]["code_rate_by_group"] == {"compute": 1.0, "easy": 0.0}
    # oracle: a -> cot (tie, CoT preferred), b -> code, c -> none; autonomous chose cot, cot
    assert s["selection_accuracy"] == {"value": 0.5, "problems_with_oracle": 2}
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25) and E.pass_at_k(4, 1, 4) == 1.0
    # a second sample that codes where the first did not: the code rates (overall and per group)
    # count every sample, the accuracies sample 0
    records.append(dict(rec("b", "autonomous", 1, True, True), group="easy"))
    s = E.summarize(records, ["autonomous"])["autonomous"]
    assert s["code_rate"] == pytest.approx(2 / 4) and s["code_rate_by_group"] == {"compute": 1.0, "easy": 1 / 3}
    assert s["accuracy_by_group"] == {"compute": 0.0, "easy": 0.5}


@pytest.mark.parametrize("preds,correct,numeric,want", [
    (["1/2", "0.5", "\\frac{1}{2}", "3", "3"], [1, 1, 1, 0, 0], False, True),    # equal answers are one vote
    (["18", "18.00", "\\$18", "17", "17"], [1, 1, 1, 0, 0], True, True),
    (["3", "4"], [1, 0], False, True),                                          # a tie: the lower sample's group
    (["4", "3"], [0, 1], False, False),
    ([None, None, "7"], [0, 0, 1], True, True),                                 # no answer, no vote
    ([None, ""], [0, 0], True, False),
])
def test_majority_votes_on_equal_answers(preds, correct, numeric, want):
    rs = [{"sample": k, "pred": p, "correct": bool(c), "numeric": numeric} for k, (p, c) in enumerate(zip(preds, correct))]
    assert E.majority_correct(rs) is want
    assert E.majority_correct(rs[::-1]) is want                  # the file's order does not matter


def test_end_to_end_tiny_and_resume(tiny, tok, tmp_path):
    problems = E.load_problems(os.path.join(HERE, "fixtures", "mini.jsonl"))
    out = str(tmp_path / "run")
    recs, timing = E.run(tiny, tok, problems, ["cot", "code"], out, max_new_tokens=8, progress=False)
    assert len(recs) == 6 and {r["mode"] for r in recs} == {"cot", "code"}
    lines = open(os.path.join(out, "samples.jsonl")).read().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["answer"] for x in lines)
    # a torn last line is dropped, and only missing samples are redone
    with open(os.path.join(out, "samples.jsonl"), "w") as f:
        f.write("\n".join(lines[:4]) + "\n" + lines[4][:10])
    recs2, _ = E.run(tiny, tok, problems, ["cot", "code"], out, max_new_tokens=8, progress=False)
    assert len(recs2) == 6 and len(open(os.path.join(out, "samples.jsonl")).read().splitlines()) == 6
    s = E.summarize(recs2, ["cot", "code"])
    assert s["cot"]["accuracy_by_level"].keys() == {"Level 1", "Level 2"}
    # a line cut just before its newline still parses: dropped too, or the next sample joins it
    path = os.path.join(out, "samples.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines[:5]))
    for _ in range(2):
        recs3, _ = E.run(tiny, tok, problems, ["cot", "code"], out, max_new_tokens=8, progress=False)
        assert len(recs3) == 6 and [json.loads(x) for x in open(path).read().splitlines()] == recs3
    # a bad line before the last is no torn write: refused, and the file left as it was
    with open(path, "w") as f:
        f.write("\n".join(lines[:2] + ["{oops"] + lines[3:]) + "\n")
    before = open(path).read()
    with pytest.raises(SystemExit, match=r"samples.jsonl:3: not a sample line"):
        E.run(tiny, tok, problems, ["cot", "code"], out, max_new_tokens=8, progress=False)
    assert open(path).read() == before


def test_a_resumed_evaluation_samples_what_an_uninterrupted_one_would(tiny, tok, tmp_path):
    """Each sample's random stream is its own (problem, mode, index): killed after some samples
    and resumed (at another batch width), the run ends with the samples of one never killed,
    and the n samples of a problem are not copies of each other."""
    problems = E.load_problems(os.path.join(HERE, "fixtures", "mini.jsonl"))
    kw = dict(n=3, temperature=1.0, max_new_tokens=12, progress=False, seed=4)
    whole, _ = E.run(tiny, tok, problems, ["cot", "code"], str(tmp_path / "a"), batch_size=16, **kw)
    out = tmp_path / "b"
    out.mkdir()
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:4]))   # the kill
    resumed, _ = E.run(tiny, tok, problems, ["cot", "code"], str(out), batch_size=5, **kw)
    text = lambda recs: {(r["id"], r["mode"], r["sample"]): r["text"] for r in recs}
    assert text(resumed) == text(whole) and len(whole) == 18
    assert all(len({text(whole)[(p["id"], m, k)] for k in range(3)}) > 1 for p in problems for m in ("cot", "code"))


def test_an_out_resumes_only_the_settings_that_made_it(tmp_path):
    """Samples on disk are reused only by a run with the same settings (run.json); --n, --modes
    and --limit choose among them, and the summary counts only what this run asked for."""
    data = os.path.join(HERE, "fixtures", "mini.jsonl")
    out = str(tmp_path / "out")
    base = ["--model", "tiny", "--data", data, "--max-new-tokens", "4", "--out", out, "--temperature", "0.7"]
    s = E.main(base + ["--modes", "cot", "cot", "code", "--n", "2"])
    assert s["cot"]["samples_per_problem"] == 2 and "pass@2" in s["cot"]
    assert len(open(os.path.join(out, "samples.jsonl")).read().splitlines()) == 3 * 2 * 2
    s = E.main(base + ["--modes", "cot", "--n", "1", "--limit", "2"])
    assert set(s) == {"cot", "_run"} and s["cot"]["problems"] == 2 and "pass@1" in s["cot"]
    for other in (["--temperature", "0.5"], ["--seed", "1"], ["--autonomous-prompt", "invite"]):
        with pytest.raises(SystemExit, match="holds samples made with other settings"):
            E.main(base + other)
    assert len(open(os.path.join(out, "samples.jsonl")).read().splitlines()) == 12


def test_autonomous_prompt_wording_changes_only_the_autonomous_mode(tok):
    """--autonomous-prompt picks the autonomous instruction; the forced modes keep theirs."""
    p = E.load_problems("builtin:test", 1)[0]
    for mode in E.MODES:
        invite = tok.decode(E.prompt_for(tok, p, mode, autonomous="invite")[0])
        neutral = tok.decode(E.prompt_for(tok, p, mode, autonomous="neutral")[0])
        assert (invite != neutral) == (mode == "autonomous")
        assert tok.decode(E.prompt_for(tok, p, mode)[0]) == neutral           # the default
    assert E.AUTONOMOUS["neutral"] in tok.decode(E.prompt_for(tok, p, "autonomous", autonomous="neutral")[0])
    assert E.AUTONOMOUS["invite"] in tok.decode(E.prompt_for(tok, p, "autonomous", autonomous="invite")[0])


def test_the_plan_quotes_a_time_measured_in_its_own_dtype():
    """The plans' expected time: a default em_train.py run (256 rollouts of up to 64 tokens an
    iteration, 8 iterations) took ~17 min in bf16 on a CPU with native bf16 and ~45 min in fp32,
    which --dtype auto picks on an AVX2-only CPU; each plan quotes the one of its own dtype and
    says where it was measured."""
    bf16 = E.expected_time("smollm2-135m", "cpu", "bf16", 256, 64, 8)
    fp32 = E.expected_time("smollm2-135m", "cpu", "fp32", 256, 64, 8)
    assert bf16.startswith("about 17 min (about 2 min per iteration)") and "native bf16" in bf16
    assert fp32.startswith("about 45 min (about 6 min per iteration)") and "AVX2-only CPU" in fp32
    assert "in fp32" in fp32
    assert "not measured for smollm2-135m in bf16 on cuda" in E.expected_time("smollm2-135m", "cuda:1", "bf16", 9, 64)
    assert E.expected_time("tiny", "cpu", "fp32", 10, 8).startswith("under a minute")
