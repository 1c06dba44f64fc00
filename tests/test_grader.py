"""The grader against a table of (prediction, reference, verdict) a careful human agrees with."""
import sys

import pytest

import grader

EQUIV = [  # (pred, ref, numeric, verdict)
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", False, True), ("\\dfrac{3}{4}", "\\frac34", False, True),
    ("0.333", "\\frac{1}{3}", False, False), ("2/4", "\\frac{1}{2}", False, True),
    # thousands separators
    ("1,000", "1000", False, True), ("1{,}000", "1000", False, True), ("1\\,000", "1000", False, True),
    ("1,2", "12", False, False),
    # scientific notation
    ("1.5\\times10^3", "1500", False, True), ("1.5 \\times 10^{3}", "1501", False, False),
    # percent: equal to the number, never scaled by 100
    ("50\\%", "50", False, True), ("100", "1", False, False), ("1", "100\\%", False, False),
    # radicals
    ("2\\sqrt{2}", "\\sqrt{8}", False, True), ("\\sqrt{2}", "2", False, False), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", False, True),
    # pi forms
    ("2\\pi", "2 \\pi", False, True), ("\\pi", "3.14159", False, False), ("\\frac{\\pi}{2}", "\\pi/2", False, True),
    # degrees and units
    ("10^\\circ", "10", False, True), ("30^{\\circ}", "30", False, True), ("5\\text{ cm}", "5", False, True),
    # text answers
    ("\\text{Evelyn}", "Evelyn", False, True), ("Nevlye", "\\text{Evelyn}", False, False), ("\\text{(C)}", "(C)", False, True),
    # sets and ordered tuples
    ("\\{1,2\\}", "\\{2,1\\}", False, True), ("(1,2)", "(2,1)", False, False), ("(1, 2)", "(1,2)", False, True),
    # intervals
    ("[0,1)", "[0, 1)", False, True), ("(0,1]", "[0,1)", False, False), ("(-\\infty, 3]", "(-\\infty,3]", False, True),
    # equations
    ("x=3", "3", False, True), ("y = 2x + 1", "2x+1", False, True),
    # matrices
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False, True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False, False),
    # complex numbers
    ("3+4i", "4i+3", False, True), ("3-4i", "3+4i", False, False),
    # Unicode minus, mixed numbers
    ("\u22125", "-5", False, True), ("1\\frac{1}{2}", "\\frac{3}{2}", False, True),
    # numeric mode (GSM8K / AIME / AMC): exact numbers
    ("18.00", "18", True, True), ("033", "33", True, True), ("\\$18", "18", True, True), ("1,234", "1234", True, True),
    ("18.5", "18", True, False), ("27", "27.0", True, True), ("100", "1", True, False), ("x = 18", "18", True, False),
    ("\\frac{36}{2}", "18", True, True), ("17.999999", "18", True, False),
    # tiny and huge magnitudes: exact when both sides are exact, never an absolute tolerance
    ("\\frac{1}{2^{60}}", "\\frac{1}{2^{61}}", False, False), ("2^{-60}", "\\frac{1}{2^{60}}", False, True),
    ("2^{-1000}", "2^{-1001}", False, False), ("10^{-20}", "2\\cdot 10^{-20}", False, False),
    ("10^{-20}", "\\frac{1}{10^{20}}", False, True), ("10^{-30}+10^{-40}", "10^{-30}", False, False),
    ("10^{30}", "10^{30}+1", False, False), ("10^{30}", "1000000000000000000000000000000", False, True),
    ("1000000000000000000000000000001", "10^{30}", True, False), ("2^{-60}", "2^{-61}", True, False),
    ("20!", "2432902008176640000", False, True), ("20!", "2432902008176640001", False, False),
    ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}", False, True), ("\\sqrt{2}", "\\frac{99}{70}", False, False),
    # a decimal is inexact: a relative tolerance (1e-9), still never an absolute one
    ("0.00000000000000000001", "0.00000000000000000002", False, False),
    ("0.00000000000000000001", "10^{-20}", False, True), ("\\sqrt{2}", "1.414", False, False),
    ("1.5\\times10^{30}", "15\\times10^{29}", False, True), ("1.5\\times10^{30}", "1.5\\times10^{30}+10^{25}", False, False),
    # found by an attack on the grader: an infinite value was within a relative tolerance of
    # every number (a reward any rollout could collect), and 1/0 crashed the numeric mode
    ("1.0/0", "18", True, False), ("1.0/0", "0", True, False), ("\\frac{1.0}{0}", "-3", True, False),
    ("1.0/0", "\\frac{1}{2}", False, False), ("1.0\\cdot\\infty", "18", False, False),
    ("\\infty+0.5", "2.5", False, False), ("0.0\\infty", "2.5", False, False), ("\\infty", "\\$18.90", True, False),
    ("\\infty", "\\infty", False, True), ("-\\infty", "\\infty", False, False),
    ("1/0", "18", True, False), ("-\\frac{1}{0}", "18", True, False), ("0/0", "18", True, False),
    # ...exact past 28 digits, and units, spacing, bold and degrees in the numeric mode
    ("\\frac{180000000000000000000000000001}{10000000000000000000000000000}", "18", True, False),
    ("1" * 5000, "1" * 5000, True, True), ("1" * 5000 + "1", "1" * 5000, True, False),
    ("18 \\, \\text{cm}", "18", True, True), ("18\\ \\text{cm}", "18", True, True), ("18~\\text{cm}", "18", True, True),
    ("18 \\mathrm{cm}", "18", True, True), ("18\\text{ m}^2", "18", True, True), ("\\textbf{18}", "18", True, True),
    ("18^\\circ", "18", True, True), ("1.8\\times10^{1}", "18", True, True), ("18 \\div 1", "18", True, True),
    ("3 \\text{ hours } 20 \\text{ minutes}", "320", True, False), ("12\\text{ or 13}", "12", True, False),
    ("5\\text{ thousand}", "5", True, False), ("18 \\text{ apples}", "18", True, True),
    # ...and what a review of those changes found them to lose or let through
    ("18 \\text{ dollars}.", "18", True, True), ("18\\text{ m^2}", "18", True, True), ("\\text{\\$}18", "18", True, True),
    ("5\\text{ scores}", "5", True, True), ("5 \\quad 7", "57", True, False), ("1 000", "1000", True, True),
    # ...and a second attack: relations and ranges are no number; a leading \text is no unit
    ("17 \\lor 18", "18", True, False), ("\\in (17, 19)", "19", True, False), ("\\le 18", "18", True, False),
    ("\\approx 18.0000000001", "18", True, False), ("\\sqrt{324}", "18", True, True),
    ("\\text{\\$ }18", "18", True, True), ("\\text{USD }18", "18", True, True), ("\\text{Answer: }18", "18", True, True),
]


@pytest.mark.parametrize("pred,ref,numeric,verdict", EQUIV)
def test_is_equiv(pred, ref, numeric, verdict):
    assert grader.is_equiv(pred, ref, numeric=numeric) is verdict


EXTRACT = [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                       # nested braces
    ("first \\boxed{1} then \\boxed{2}", "2"),                        # the last box wins
    ("\\boxed{\\frac{1}{2}", None),                                   # unbalanced: no answer
    ("the answer is \\boxed 5.", "5"),
    ("\\fbox{7}", "7"),
    ("no box here, the answer is 5", None),
    ("\\boxed{3}\n```output\n\\boxed{99}\n```\n", "3"),               # never from execution output
    ("maybe \\boxed{2} or \\boxed{3}?", "3"),                         # a hedged answer: the last one
    ("\\boxed{\\text{(A)}}", "\\text{(A)}"),
    ("\\boxed{}", None),
    ("So \\boxed{18}.\n\nPut your final answer within \\boxed{}.", "18"),   # an echoed instruction
    ("So \\boxed{18}. I used \\boxed as instructed.", "18"),         # \\boxed before a word
    ("the choice is \\boxed B.", "B"),
    ("\\boxed x^2", "x^2"), ("\\boxed -x", "-x"), ("\\boxed{7}, then \\boxed as said", "7"),
    ("\\boxed [0,1)", "[0,1)"), ("\\boxed \u22125", "\u22125"),
]


@pytest.mark.parametrize("text,answer", EXTRACT)
def test_extract_answer(text, answer):
    assert grader.extract_answer(text) == answer


def test_hard_time_limit_kills_and_counts(monkeypatch):
    monkeypatch.setattr(grader, "TIME_LIMIT", 0.5)
    before = grader.TIMEOUTS
    # a power tower that sympy tries to evaluate: it would run for minutes
    slow = "2^{2^{2^{2^{2^{2}}}}}"
    assert grader.is_equiv(slow, "1") is False
    assert grader.TIMEOUTS == before + 1
    assert grader.is_equiv("2", "2") is True                          # the worker came back


def test_the_time_limit_does_not_count_a_new_workers_imports(monkeypatch):
    """A restarted worker imports math-verify before it can answer; on a slow machine that took
    longer than the limit and the right answer after a timeout came back False. A worker whose
    start takes 1.5 s still answers under a 0.5 s limit."""
    slow_start = ("import runpy, sys, time; time.sleep(1.5); sys.argv = [sys.argv[1], '--serve']; "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
    worker = grader._Worker()
    monkeypatch.setattr(worker, "command", [sys.executable, "-c", slow_start, grader.__file__])
    monkeypatch.setattr(grader, "TIME_LIMIT", 0.5)
    before = grader.TIMEOUTS
    try:
        assert worker.ask("\\frac{1}{2}", "0.5") is True
        assert grader.TIMEOUTS == before
    finally:
        if worker.proc is not None:
            worker.proc.kill()
            worker.proc.wait()


def test_a_worker_that_dies_while_importing_is_one_clear_error(monkeypatch):
    worker = grader._Worker()
    monkeypatch.setattr(worker, "command", [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="died or hung while importing"):
        worker.ask("1", "1")
    assert worker.proc is None


def test_a_worker_that_hangs_while_importing_is_killed_and_one_clear_error(monkeypatch):
    """Its start has a limit of its own: the lock every grading thread waits on is not held forever."""
    worker = grader._Worker()
    monkeypatch.setattr(worker, "command", [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(grader, "START_LIMIT", 0.5)
    with pytest.raises(RuntimeError, match="within 0.5 s"):
        worker.ask("1", "1")
    assert worker.proc is None
