"""grader.py -- is this answer right? Every reported number and every reward goes through here.

Contract:
  extract_answer(text) -> str | None
      The content of the LAST non-empty \\boxed{...} (nested braces), also `\\boxed 5`,
      `\\boxed B` and \\fbox{...}, looked for only outside ```output blocks (execution output is
      not the model's answer). An unbalanced box is no answer; an empty one (an echoed
      instruction) and a bare \\boxed before a word are not answers.
  is_equiv(pred, ref, numeric=False) -> bool
      numeric=True (GSM8K, AIME, AMC, the built-in task): both must be plain numbers (after
      removing $, thousands separators, spacing, bold, degrees, units at the end); compared
      exactly as fractions (18.00 == 18, 033 == 33), no tolerance, no percent fallback, no
      last-number fallback; an arithmetic expression (2^{10}, 1.8\\times10^1, \\sqrt{324}: no
      words, no relation like \\le or \\in) goes to the MATH comparison below.
      numeric=False (MATH): math-verify under a thin normalisation layer for its known misses
      (thin spaces and {,} thousands separators, Unicode minus, \\fbox, text answers compared
      as words rather than as products of symbols).
      When both sides parse to plain numbers (no free symbol) the verdict is not math-verify's,
      whose fixed rounding calls 1/2^60 and 1/2^61 equal: if both are exact (integers,
      rationals, powers, factorials, surds, pi) sympy decides exactly; if either is written as
      a decimal (an inexact value) they must agree to a relative REL_TOL. Never an absolute
      tolerance, so tiny and huge magnitudes are compared as carefully as 1 and 2. An infinite
      or undefined value (\\infty, 1.0/0) equals only the same value: within a relative
      tolerance it had matched every number, a reward any rollout could collect.
  Every comparison runs in a worker process under a hard time limit (math-verify's own
  signal-based timeout can hang and fails outside the main thread); on timeout the worker
  is killed and restarted, the verdict is False and `TIMEOUTS` counts it.

Run: python grader.py "\\boxed{2\\sqrt{2}}" "\\sqrt{8}"
"""
import json
import re
import subprocess
import sys
import threading
from decimal import Decimal
from fractions import Fraction

TIME_LIMIT = 5.0
START_LIMIT = 120.0     # seconds a new worker may take to import math-verify and sympy
REL_TOL = 1e-9          # decimals must agree to ~9 significant digits (3.14159 is not pi)
DECIMAL = re.compile(r"\d\.\d|(^|[^\d])\.\d")
TIMEOUTS = 0
PLAIN = re.compile(r"-?\d+(\.\d+)?")     # a plain number, as the numeric mode wants it
OUTPUT_BLOCK = re.compile(r"```output\n.*?(```|$)", re.S)


def extract_answer(text):
    if text is None:
        return None
    text = OUTPUT_BLOCK.sub("", text)
    # from the last box back, so that a text of thousands of unclosed boxes (a looping sample)
    # costs one scan, not one per box (2,000 took 2 s, 4,000 8.5 s)
    for m in reversed(list(re.finditer(r"\\(boxed|fbox)\s*", text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            if depth:
                return None                                           # unbalanced: no answer
            inside = text[i + 1:j].strip()
            if inside:                                                # an empty box (an echoed
                return inside                                         # instruction) is none
        elif m.group(1) == "boxed" and text[m.start() + 6:m.end()].strip() == "" and m.end() > m.start() + 6:
            tok = re.match(r"[-+\u2212]?(?:[\d.\\([]|[A-Za-z](?![A-Za-z]))[^\s$]*", text[i:])   # \boxed 5, x^2
            answer = tok.group(0).rstrip(".,") if tok else ""
            if answer:                                                # not "\boxed as instructed"
                return answer
    return None


def normalize(s):
    """String fixes applied before math-verify sees an answer."""
    s = s.strip().strip("$").strip()
    s = s.replace("\u2212", "-").replace("\\fbox", "\\boxed").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(\d)\s*(\\,|\\!|\{,\}|\\ )\s*(?=\d{3})", r"\1", s)          # 1\,000 / 1{,}000
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)                           # 1,000 (not 1,2)
    whole = re.fullmatch(r"\\text\{(.*)\}", s)     # (\s*(.*?)\s* here took seconds on 2,000 spaces)
    s = whole.group(1).strip() if whole else s
    s = re.sub(r"\\(left|right)", "", s)
    s = re.sub(r"\\?%$", "", s)             # 50\% and 50 are one answer; never scaled by 100
    return s


def as_number(s):
    """A plain number (an exact Fraction) or None. Accepts $, commas, spacing commands, bold,
    degrees, and units at the end (\\text{ cm}^2, \\mathrm{kg}: no digit inside, so that
    "12\\text{ or 13}" is not 12 and "3\\text{ h } 20\\text{ min}" is not 320)."""
    s = normalize(s).rstrip(".").strip()
    if len(s) > 400:                                  # the unit patterns below are not linear
        return _exact(s) if PLAIN.fullmatch(s) else None
    if re.search(r"\b(hundred|thousand|million|billion|dozen)s?\b", s):
        return None                                   # "5\\text{ thousand}" is not 5
    s = re.sub(r"\\(textbf|mathbf|boldsymbol)\{([^{}]*)\}", r"\2", s)
    s = re.sub(r"\\[,;:! ]|~|\\q?quad", " ", s).strip()
    s = re.sub(r"^\\(text|mbox)\{[^}\d]*\}", "", s).strip()    # \\text{\\$ }18, \\text{Answer: }18
    s = re.sub(r"(\s*\\(text|mbox|mathrm)\{(?:[^}\d]|\^\d)*\}(\^\{?\d\}?)?)+$|\^\{?\\circ\}?$", "", s)
    if re.search(r"\d\s+\d(?!\d\d(\D|$))", s):
        return None                                   # "5 \\quad 7" is not 57 ("1 000" is 1000)
    s = re.sub(r"\\\$|\$|\\%|%", "", s).replace(" ", "").rstrip(".")
    if PLAIN.fullmatch(s):
        return _exact(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}|(-?\d+)/(\d+)", s)
    if m:
        sign, a, b, c, d = m.groups()
        num, den = (_exact(a), _exact(b)) if a else (_exact(c), _exact(d))
        return (-1 if sign else 1) * num / den if den else None     # 1/0 is no number (it raised)
    return None


def _exact(digits):
    """Fraction of a decimal string, via Decimal: int() refuses past 4,300 digits."""
    return Fraction(Decimal(digits))


def _is_words(s):
    return re.fullmatch(r"[A-Za-z][A-Za-z ]*", s) is not None and len(s) > 1


def _verify(pred, ref):
    """math-verify on normalised strings (runs inside the worker)."""
    from math_verify import parse, verify
    p, r = normalize(pred), normalize(ref)
    if p == r:
        return True
    if _is_words(p) or _is_words(r):          # math-verify reads "Evelyn" as E*e*l*n*v*y
        return p.lower() == r.lower()
    gold = parse("$" + r + "$", parsing_timeout=None)
    target = parse("$" + p + "$", parsing_timeout=None)
    if gold and target:
        same = _compare_numbers(target[0], gold[0], inexact=bool(DECIMAL.search(p) or DECIMAL.search(r)))
        if same is not None:
            return same
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


def _compare_numbers(a, b, inexact):
    """Exactly, or within REL_TOL when a side is a decimal; None if either is not a number."""
    import sympy
    if not (isinstance(a, sympy.Basic) and isinstance(b, sympy.Basic) and a.is_number and b.is_number):
        return None
    # \infty, 1.0/0: within any *relative* tolerance of anything. Judged on the evaluated value:
    # sympy's is_finite of the unevaluated 1.0/0 is True or False with the hash seed
    x, y = sympy.N(a, 40), sympy.N(b, 40)
    unbounded = [v.has(sympy.oo, sympy.zoo, sympy.nan) or v.is_finite is False for v in (x, y)]
    if any(unbounded):
        return all(unbounded) and a == b
    if inexact or a.has(sympy.Float) or b.has(sympy.Float):
        return bool(abs(x - y) <= REL_TOL * max(abs(x), abs(y)))
    if a.is_Rational and b.is_Rational:
        return a == b
    zero = sympy.simplify(a - b).is_zero
    if zero is not None:
        return bool(zero)
    x, y = sympy.N(a, 80), sympy.N(b, 80)              # undecided: 80 digits, relative
    return bool(abs(x - y) <= sympy.Float(10, 80) ** -60 * max(abs(x), abs(y)))


class _Worker:
    """One comparison at a time in a child process. TIME_LIMIT times the comparison alone: a new
    worker first says "ready" once its imports are done (math-verify and sympy take seconds on
    a cold or slow machine), or the first answer after every restart, right ones included,
    could be a timeout and False."""
    command = [sys.executable, __file__, "--serve"]

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()

    def start(self):
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if _read_line(proc, START_LIMIT) != "ready\n":      # died (EOF) or hung while importing
            raise RuntimeError(f"the grader's worker process did not start within {START_LIMIT:g} s (it died or hung "
                               "while importing math-verify); run `python grader.py 1 1` to see why")
        self.proc = proc                          # only a worker that said "ready" takes questions

    def ask(self, pred, ref):
        global TIMEOUTS
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            self.proc.stdin.write(json.dumps([pred, ref]) + "\n")
            self.proc.stdin.flush()
            line = _read_line(self.proc, TIME_LIMIT)
            if line is None:                      # math-verify hung (or died): it is killed; count it, say False
                self.proc = None
                TIMEOUTS += 1
                return False
            return json.loads(line)


def _read_line(proc, limit):
    """The worker's next line within `limit` seconds; else None, with the worker killed."""
    line = [None]
    reader = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()))
    reader.start()
    reader.join(limit)
    if reader.is_alive() or not line[0]:
        proc.kill()
        proc.wait()
        reader.join()
        return None
    return line[0]


_worker = _Worker()


def is_equiv(pred, ref, numeric=False):
    if pred is None or ref is None:
        return False
    pred, ref = str(pred), str(ref)
    if numeric:
        a, b = as_number(pred), as_number(ref)
        if a is not None and b is not None:
            return a == b
        arithmetic = re.sub(r"\\(d|t)?frac|\\sqrt|\\times|\\cdot|\\div|\\pi\b|\\left|\\right", "", normalize(pred))
        if b is not None and a is None and re.search(r"[a-zA-Z=]", arithmetic):
            return False                          # words, a relation (\le, \to, \in) or an equation
    return _worker.ask(pred, ref)


def serve():
    import logging
    import math_verify  # noqa: F401  (import once, before the first request)
    logging.disable(logging.WARNING)          # it warns that we time out for it: we do
    sys.stdout.write("ready\n")               # the clock on each comparison starts after this
    sys.stdout.flush()
    for line in sys.stdin:
        pred, ref = json.loads(line)
        try:
            ok = _verify(pred, ref)
        except Exception:
            ok = False
        sys.stdout.write(json.dumps(ok) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif len(sys.argv) == 3:
        p = extract_answer(sys.argv[1]) or sys.argv[1]
        print(json.dumps({"extracted": p, "equiv": is_equiv(p, sys.argv[2])}))
    else:
        print(__doc__)
