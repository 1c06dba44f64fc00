"""The built-in task: seeded splits, the groups and kinds, answers that are right, varied wording."""
import ast
import operator
import re

import pytest

import evaluate as E
import task


def test_splits_are_seeded_and_differ():
    a, b = E.load_problems("builtin:train", limit=40), E.load_problems("builtin:train", limit=40)
    t = E.load_problems("builtin:test", limit=40)
    assert a == b and a != t
    big = lambda ps: {p["question"] for p in ps if p["group"] == "compute"}   # noqa: E731
    assert big(a).isdisjoint(big(t))            # the code-worthy kinds never repeat across splits


def test_default_mix_is_compute_and_easy_and_hard_is_a_flag():
    groups = lambda name: {p["group"] for p in E.load_problems(name, limit=48)}   # noqa: E731
    assert groups("builtin:train") == {"compute", "easy"}
    assert groups("builtin:train+hard") == {"compute", "easy", "hard"}
    assert groups("builtin:test+only-hard") == {"hard"}
    kinds = {p["subject"] for p in E.load_problems("builtin:train", limit=48)}
    assert kinds == {k for k, (g, _) in task.KINDS.items() if g in ("compute", "easy")}


@pytest.mark.parametrize("name", ["builtin:nonsense", "builtin:train+easy", "builtin:Train"])
def test_unknown_builtin_names_fail_in_one_line(name):
    with pytest.raises(SystemExit, match="unknown built-in data"):
        task.parse_name(name)


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow,
       ast.Mod: operator.mod}


def _eval(node):
    if isinstance(node, ast.Constant):
        return node.value
    return OPS[type(node.op)](_eval(node.left), _eval(node.right))


def expression(p):
    """The arithmetic a problem of the compute/easy kinds asks for, rebuilt from its words."""
    q, nums = p["question"], [int(x) for x in re.findall(r"\d+", p["question"])]
    kind = p["subject"]
    if kind in ("mul_3digit", "mul_small"):
        return f"{nums[0]} * {nums[1]}"
    if kind in ("sum_many", "add_small"):
        return " + ".join(map(str, nums))
    if kind == "power":
        return f"{nums[0]} ** {nums[1]}"
    if kind == "remainder":
        return f"{nums[0]} % {nums[1]}"
    if kind == "next_number":
        return f"{nums[0]} + 1"
    gives = any(w in q for w in ("gives away", "lost"))
    return f"{nums[0]} {'-' if gives else '+'} {nums[1]}"


def test_answers_match_the_question():
    for p in E.load_problems("builtin:train", limit=160):
        assert _eval(ast.parse(expression(p), mode="eval").body) == int(p["answer"]), p


def test_each_kind_has_several_phrasings():
    ps = E.load_problems("builtin:train", limit=200)
    for kind in {p["subject"] for p in ps}:
        shapes = {re.sub(r"\d+", "N", p["question"]) for p in ps if p["subject"] == kind}
        assert len(shapes) >= 3, (kind, shapes)


def test_hard_kinds_are_right():
    ps = {p["subject"]: p for p in task.problems("train", 40, groups=("hard",))}
    n = int(re.findall(r"\d+", ps["prime_count"]["question"])[0])
    assert int(ps["prime_count"]["answer"]) == sum(all(k % d for d in range(2, int(k ** 0.5) + 1))
                                                   for k in range(2, n + 1))
    n, d = map(int, re.findall(r"\d+", ps["count_divisible"]["question"])[1:3])
    assert int(ps["count_divisible"]["answer"]) == sum(1 for x in range(1, n + 1) if x % d == 0 and x % (d + 1))


def test_table_from_explore_groups_rewards_by_kind(tmp_path):
    import json
    pool = task.problems("train", 16)
    path = tmp_path / "explore-iter1.jsonl"
    with open(path, "w") as f:
        for p in pool[:2]:                          # kinds mul_3digit and sum_many
            for decision, reward in (("cot", 0.0), ("code", 1.0), ("code", 0.0)):
                f.write(json.dumps({"query_id": p["id"], "decision": decision, "reward": reward,
                                    "native_code_rate": 0.5}) + "\n")
    table = task.table_from_explore([str(path)], "builtin:train", 16)
    assert set(table) == {pool[0]["subject"], pool[1]["subject"]}
    row = table[pool[0]["subject"]]
    assert row["q_hat_cot"] == 0.0 and row["q_hat_code"] == 0.5 and row["native_code_rate"] == 0.5
