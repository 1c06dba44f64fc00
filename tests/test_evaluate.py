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


@pytest.mark.parametrize("line,field", [
    ('{"problem": "x", "answer": ', "bad JSON"),
    ('{"answer": "3"}', "no question"),
    ('{"problem": "x"}', "no answer"),
    ('{"question": "x", "answer": "#### "}', "nothing after '####'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_names_file_line_and_field(tmp_path, line, field):
    path = write(tmp_path, [json.dumps({"problem": "ok", "answer": "1"}), line])
    with pytest.raises(SystemExit) as e:
        E.load_problems(path)
    assert f"{path}:2:" in str(e.value) and field in str(e.value)


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
