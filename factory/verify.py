"""Comparing an extracted answer with the reference, per domain.

    math     math-verify, gold parsed first; an unparsable gold is `unverifiable`. Both sides
             are normalized first the way MATH-style data needs (`normalize_math`), and a
             solution-style reference is reduced to its boxed (or GSM8K `####`) answer
    numeric  numbers with thousands separators, units, %, fractions; relative/absolute tolerance
    choice   a letter ((B), B., "option B") or the option's text, against a letter or text
    exact    normalized strings (case, spaces, trailing punctuation, \\text{})

Several boxed answers (`compare_boxes`) are compared with the reference as a whole: as a set,
an ordered tuple or a union, as the reference is written, or each box alone against a one-part
reference.

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


def _math_gold(gold: str) -> tuple[str, list | None]:
    """The reference's answer, normalized, and as math-verify parsed it (None when nothing can
    read it: prose, unparsable)."""
    from math_verify import parse  # imported in the worker, not by every importer

    gold = normalize_math(reference_answer(gold) or gold)
    if is_prose(gold):
        return gold, None
    return gold, parse(_as_latex(gold), parsing_timeout=None) or None


def _verify_math(pred: str, gold_parsed: list, float_rounding: int) -> str:
    from math_verify import parse, verify

    pred_parsed = parse(_as_latex(normalize_math(pred)), parsing_timeout=None)
    if not pred_parsed:
        return NO_ANSWER
    ok = verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None)
    return CORRECT if ok else WRONG


def compare_math(pred: str, gold: str, float_rounding: int = 6) -> str:
    gold_parsed = _math_gold(gold)[1]
    if gold_parsed is None:
        return UNVERIFIABLE
    return _verify_math(pred, gold_parsed, float_rounding)


# ---- several boxed answers -----------------------------------------------------------------


def _one_tuple(gold: str) -> bool:
    """`(a, b, ...)`: one pair of parentheses around the whole reference, a comma at its top level."""
    s = re.sub(r"\\(?:left|right|big|Big)\s*", "", gold).strip()
    if len(s) < 2 or s[0] != "(" or s[-1] != ")":
        return False
    depth, comma = 0, False
    for i, ch in enumerate(s):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if depth == 0 and i < len(s) - 1:
            return False  # the first parenthesis closes before the end: "(x+1)(x-1)"
        comma |= ch == "," and depth == 1
    return comma


def _labels(gold: str) -> list[str] | None:
    """The names of a labelled list `x = 2, y = 3` (also joined by "and" / "or"), in the
    order it writes them; None unless every part is `name = value` with a name of its own."""
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}|\b(?:and|or)\b", ",", gold)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s + ","):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts = [p for p in parts if p]
    names = [p.split("=")[0].strip() for p in parts if p.count("=") == 1]
    return names if len(names) == len(parts) and len(set(names)) == len(names) and all(names) else None


def _combine(verdicts: list[str]) -> str:
    """One verdict for boxes each compared alone with the whole reference."""
    for v in (UNVERIFIABLE, WRONG, NO_ANSWER):
        if v in verdicts:
            return v
    return CORRECT


def compare_boxes(boxes: list[str], gold: str, domain: str, choices: list[str] | None = None,
                  rel_tol: float = 1e-6, abs_tol: float = 1e-9, float_rounding: int = 6) -> tuple[str, str, str]:
    """Several boxed answers (a multi-part answer) against the reference as a whole.

    The reference's own form says how the parts combine (math domain); the boxes joined that
    way are compared as one answer by math-verify:
      a set or list (`\\{1,2,3\\}`, "1, 2, and 3", "(2, 2), (6, 2)", "x = 2 or x = 3", `\\pm`)
          the boxes as an unordered set: every part once, in any order, nothing extra
      a labelled list `x = 2, y = 3`, against as many unlabelled boxes
          the boxes take its labels in the order it writes them (x = first box, y = second):
          the labels are what orders it (math-verify alone drops them and compares {2, 3})
      one tuple `(a, b, ...)`
          the boxes as its components, in order: `\\boxed{2}, \\boxed{3}` is (2, 3), not
          (3, 2); a box that is itself a whole tuple is one component, so two pairs against
          one pair are wrong (an extra solution). math-verify reads a 2-tuple as an open
          interval; both sides are read alike, so that is the same comparison
      a union of intervals   the boxes joined by \\cup
      anything else (one number, an expression, a closed interval, a matrix)
          one part: several boxes are right only if each of them alone is (the same answer
          written twice, `\\frac12` and `0.5`); a hedge `\\boxed{3} or \\boxed{5}` is wrong
    Boxes that do not make the whole are still right when each box alone is the whole answer
    (a restatement: `\\boxed{(2, 3)}` then `\\boxed{\\left(2, 3\\right)}`). The other domains
    have one-part references: each box alone.

    Returns:
        (verdict, the boxes as written joined in the form compared, the rule that applied,
        e.g. "3 boxes as an unordered set").
    """
    n = len(boxes)
    listed = ", ".join(boxes)
    if domain != "math":
        each = [compare(b, gold, domain, choices, rel_tol, abs_tol, float_rounding) for b in boxes]
        verdict = _combine(each)
        return verdict, listed, f"{n} boxes" + (", each the whole answer" if verdict == CORRECT else
                                                " against a one-part answer")
    gold_text, gold_parsed = _math_gold(gold)
    if gold_parsed is None:
        return UNVERIFIABLE, listed, f"{n} boxes, reference unreadable"
    import sympy

    # each box is normalized alone (a unit is trailing only within its box), then joined
    parts = [normalize_math(b) for b in boxes]
    ref = gold_parsed[0]
    labels = _labels(gold_text) if isinstance(ref, sympy.FiniteSet) else None
    if labels and len(labels) == n and not any("=" in b for b in parts):
        form, rule = (lambda xs: ", ".join(f"{name} = {x}" for name, x in zip(labels, xs)),
                      f"as {', '.join(labels)} in the reference's order")
    elif isinstance(ref, sympy.FiniteSet):
        form, rule = ", ".join, "as an unordered set"
    elif isinstance(ref, (sympy.Tuple, sympy.Interval)) and _one_tuple(gold_text):
        form, rule = (lambda xs: "(" + ", ".join(xs) + ")"), "as an ordered tuple"
    elif isinstance(ref, sympy.Union):
        form, rule = r" \cup ".join, "as a union"
    else:
        form, rule = None, "against a one-part answer"
    verdict = _verify_math(form(parts), gold_parsed, float_rounding) if form else None
    if verdict == CORRECT:
        return verdict, form(boxes), f"{n} boxes {rule}"
    each = [_verify_math(p, gold_parsed, float_rounding) for p in parts]
    if all(v == CORRECT for v in each):
        return CORRECT, listed, f"{n} boxes, each the whole answer"
    return verdict or _combine(each), form(boxes) if form else listed, f"{n} boxes {rule}"


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
