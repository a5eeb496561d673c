"""Comparing an extracted answer with the reference, per domain.

    math     math-verify, gold parsed first; an unparsable gold is `unverifiable`. Both sides
             are normalized first the way MATH-style data needs (`normalize_math`), and a
             solution-style reference is reduced to its boxed (or GSM8K `####`) answer
    numeric  numbers with thousands separators, units, %, fractions; relative/absolute tolerance
    choice   a letter ((B), B., "option B") or the option's text, against a letter or text
    exact    normalized strings (case, spaces, trailing punctuation, \\text{})

Everything here may run long on hostile input (sympy), so grade.py calls it in worker
processes with a hard timeout; math-verify's own signal-based timeouts are switched off
(they only work in a main thread).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from factory.answers import reference_answer

CORRECT, WRONG, NO_ANSWER, UNVERIFIABLE, TIMEOUT = "correct", "wrong", "no_answer", "unverifiable", "timeout"


def normalize_text(s: str) -> str:
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("$", "").strip().lower()
    s = re.sub(r"\s+", " ", s)
    return s.strip(" .;:!")


# ---- numeric -----------------------------------------------------------------------------

_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_number(s: str) -> float | None:
    """A number from text such as '1,234.5 cm', '$12', '45%', '-3/4', '\\frac{1}{2}', '2.5e3'."""
    s = s.replace("\\$", "").replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    s = normalize_text(s)
    s = re.sub(r"^[a-z]\s*=\s*", "", s)  # x = 3
    frac = re.fullmatch(r"\s*(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}.*", s) or re.fullmatch(
        r"\s*(-?)(-?\d+)\s*/\s*(\d+)\b.*", s
    )
    if frac:
        sign, num, den = frac.groups()
        if int(den) == 0:
            return None
        value = float(Fraction(int(num), int(den)))
        return -value if sign else value
    m = _NUM.match(s.lstrip("€£¥"))
    if not m or not re.search(r"\d", m.group(0)):
        return None
    value = float(m.group(0).replace(",", ""))
    rest = s[m.end():].strip()
    if rest.startswith("%"):
        value /= 100.0
    return value


def compare_numeric(pred: str, gold: str, rel_tol: float, abs_tol: float) -> str:
    g = parse_number(gold)
    if g is None:
        return UNVERIFIABLE
    p = parse_number(pred)
    if p is None:
        return NO_ANSWER
    return CORRECT if math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol) else WRONG


# ---- choice ------------------------------------------------------------------------------

_LETTER = re.compile(r"^\(?([a-z])\)?(?:[.):]|\s|$)|(?:option|choice|answer)\s*\(?([a-z])\)?\b", re.I)


def choice_letter(s: str, choices: list[str] | None) -> str | None:
    """The option letter named by `s`: a letter form, or the exact text of one option."""
    n = normalize_text(s)
    if choices:
        for i, c in enumerate(choices):
            if n == normalize_text(c):
                return chr(ord("A") + i)
    m = _LETTER.search(n)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if not choices or ord(letter) - ord("A") < len(choices):
            return letter
    return None


def compare_choice(pred: str, gold: str, choices: list[str] | None) -> str:
    g = choice_letter(gold, choices)
    if g is None:
        return UNVERIFIABLE
    p = choice_letter(pred, choices)
    if p is None:
        return NO_ANSWER
    return CORRECT if p == g else WRONG


# ---- math --------------------------------------------------------------------------------


# a trailing unit in \\text{}: "100\\text{ square units}", "5 \\, \\mbox{cm}^2"
_TEXT_UNIT = re.compile(r"(?:\s|\\[,;:! ])*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
                        r"(?:\s*\^\s*\{?[23]\}?)?\s*$")
# a number followed by unit words: "18 dollars", "6 cm", "2.5 square feet"
_PLAIN_UNIT = re.compile(r"^(?P<num>[-+]?\\?\$?\d[\d,]*(?:\.\d+)?)\s*(?:[A-Za-z]+\.?\s*){1,3}$")
_SCIENTIFIC = re.compile(r"^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$")


def normalize_math(s: str) -> str:
    """What MATH-style answers write that math-verify does not read as meant: trailing units
    (`\\text{ cm}`, `^2` after one, plain words after a number), `\\varnothing`, thin-space
    thousands (`6\\,000`, `1{,}000`), scientific `1e3`. `\\dfrac`, `^\\circ`, `\\%` and
    `10,\\!000` math-verify handles itself (tests/test_verify.py holds the pairs)."""
    s = s.strip()
    for _ in range(3):  # "5 \\text{ m} \\text{ long}"
        stripped = _TEXT_UNIT.sub("", s).strip()
        if not stripped or stripped == s:
            break
        s = stripped
    m = _PLAIN_UNIT.match(s)
    if m:
        s = m.group("num")
    s = s.replace("\\varnothing", "\\emptyset").replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}\b)", "", s)
    s = _SCIENTIFIC.sub(r"\1\\times 10^{\2}", s)
    return s


def _as_latex(s: str) -> str:
    s = s.strip()
    return s if s.startswith("$") or "\\boxed" in s else f"${s}$"


def is_prose(s: str) -> bool:
    """Running text ("see the proof above"): math-verify would read it as a product of symbols."""
    bare = re.sub(r"\\[a-zA-Z]+", " ", s)
    return re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", bare) is not None


def compare_math(pred: str, gold: str, float_rounding: int = 6) -> str:
    from math_verify import parse, verify  # imported in the worker, not by every importer

    gold = normalize_math(reference_answer(gold) or gold)
    pred = normalize_math(pred)
    if is_prose(gold):
        return UNVERIFIABLE
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        return UNVERIFIABLE
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
    if not pred_parsed:
        return NO_ANSWER
    ok = verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None)
    return CORRECT if ok else WRONG


def compare(pred: str, gold: str, domain: str, choices: list[str] | None = None, rel_tol: float = 1e-6,
            abs_tol: float = 1e-9, float_rounding: int = 6) -> str:
    if domain == "numeric":
        return compare_numeric(pred, reference_answer(gold) or gold, rel_tol, abs_tol)
    if domain == "choice":
        return compare_choice(pred, gold, choices)
    if domain == "exact":
        if not normalize_text(gold):
            return UNVERIFIABLE
        return CORRECT if normalize_text(pred) == normalize_text(gold) else WRONG
    if domain == "math":
        return compare_math(pred, gold, float_rounding)
    raise ValueError(f"unknown domain {domain!r}")
