"""Answer equivalence on the forms public math data writes, graded through the grade stage's
own path (extraction + comparison in grade_one).

The pairs follow the patterns public answer-equivalence suites cover (math-verify's own tests,
MATH / Minerva-style normalization, GSM8K references): units in \\text{}, degrees, percentages,
thousands separators, relations, sets and intervals, matrices, tuples, solution-style
references, and answers without \\boxed{}. Each pair carries the mathematically right verdict;
KNOWN_GAPS lists the ones the graders still get wrong, with what they say instead, so the
agreement figure is measured here, not assumed."""

from __future__ import annotations

import pytest

from factory import answers, verify
from factory.stages.grade import GradeConfig, grade_one, GradeJob

C, W = "correct", "wrong"

# (boxed model answer, reference, right verdict)
PAIRS = [
    # units in \text{} and plain words
    ("100", r"100\text{ square units}", C),
    ("10", r"100\text{ square units}", W),
    ("100", r"100 \text{ cm}^2", C),
    (r"100\text{ cm}", "100", C),
    (r"5\text{ cm}", "5", C),
    (r"6 \, \text{m}", "6", C),
    (r"4 \text{ units}^2", "4", C),
    (r"\frac{1}{2} \text{ hours}", "0.5", C),
    ("18 dollars", "18", C),
    ("19 dollars", "18", W),
    (r"18\text{ dollars}", r"\$18", C),
    (r"\$18", "18", C),
    (r"\text{5}", "5", C),
    # degrees
    ("45", r"45^\circ", C),
    (r"45^{\circ}", "45", C),
    ("45", r"45^{\circ}", C),
    ("40", r"45^\circ", W),
    # percentages
    ("30", r"30\%", C),
    (r"30\%", "30", C),
    (r"12\%", "0.12", C),
    ("31", r"30\%", W),
    # thousands separators and spacing
    (r"10,\!000", "10000", C),
    ("10000", r"10,\!000", C),
    ("10,000", "10000", C),
    ("1,234,567", "1234567", C),
    (r"6\,000", "6000", C),
    (r"1{,}000", "1000", C),
    ("1,001", "1000", W),
    # fractions
    (r"\dfrac{1}{2}", r"\frac12", C),
    (r"\tfrac{3}{4}", "0.75", C),
    (r"\frac{1}{3}", r"\dfrac{1}{3}", C),
    ("0.5", r"\frac{1}{2}", C),
    ("0.333", r"\frac{1}{3}", W),
    ("1/2", r"\frac{1}{2}", C),
    (r"-\frac{1}{2}", "-0.5", C),
    (r"\frac{-1}{2}", r"-\frac{1}{2}", C),
    # numbers
    ("-3", "3", W),
    ("1e3", "1000", C),
    ("1000", "1000.0", C),
    (r"2^{10}", "1024", C),
    (r"10^{-3}", "0.001", C),
    ("5.", "5", C),
    (r"\mathbf{1}", "1", C),
    # relations
    ("x = 3", "3", C),
    ("3", "x=3", C),
    ("a=1", "a = 2", W),
    (r"y = 2x + 3", "2x+3", C),
    (r"f(x) = x^2", "x^2", C),
    (r"x \le 3", r"(-\infty, 3]", C),
    # sets, intervals, tuples
    (r"(-\infty, 3]", r"(-\infty,3]", C),
    ("[1, 2)", "[1,2)", C),
    ("(1, 2)", "[1,2]", W),
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}", C),
    (r"\{1, 2\}", r"\{1, 3\}", W),
    ("1,2,3", r"\{1,2,3\}", C),
    (r"\varnothing", r"\emptyset", C),
    ("3, 5", "5, 3", C),
    ("x=2, y=3", "(2,3)", C),
    ("(2, 3)", "(2,3)", C),
    ("(3, 2)", "(2,3)", W),
    (r"\left( 1, 2 \right)", "(1,2)", C),
    (r"12 \text{ and } 15", "12, 15", C),
    # matrices and vectors
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", C),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", W),
    # radicals, pi, expressions
    (r"\sqrt{8}", r"2\sqrt{2}", C),
    (r"3\sqrt{2}", r"\sqrt{18}", C),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", C),
    (r"2\pi", r"2 \pi", C),
    (r"\pi/2", r"\frac{\pi}{2}", C),
    ("3.14", r"\pi", W),
    (r"90^\circ", r"\frac{\pi}{2}", W),
    ("x^2+2x+1", "(x+1)^2", C),
    ("2x+1", "1+2x", C),
    (r"\infty", r"\infty", C),
    # choices written in text
    (r"\text{(B)}", "B", C),
    ("B", r"\text{(B)}", C),
    # solution-style references: the boxed answer, or GSM8K's #### line
    ("7", r"The answer is $\boxed{7}$ because 3+4=7.", C),
    ("32349", r"We add the numbers, so the total is $\boxed{32349}$.", C),
    ("32348", r"We add the numbers, so the total is $\boxed{32349}$.", W),
    ("14", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 14", C),
    ("1014", "So she needs 1,014 more.\n#### 1,014", C),
    ("15", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 14", W),
]

# the graders' verdict where it is not the right one
KNOWN_GAPS = {
    (r"x \le 3", r"(-\infty, 3]"): W,  # math-verify compares a relation with an interval as unequal
}


def grade(model_answer_text: str, reference: str, domain: str = "math") -> tuple[str, str | None, str]:
    return grade_one(GradeJob(model_answer_text, reference, domain, None, GradeConfig()))


@pytest.mark.parametrize("pred,gold,right", PAIRS)
def test_pair(pred, gold, right):
    verdict, _, _ = grade(f"<think>work</think> \\boxed{{{pred}}}", gold)
    assert verdict == KNOWN_GAPS.get((pred, gold), right)


def test_agreement_figure():
    assert len(PAIRS) >= 60 and len({(p, g) for p, g, _ in PAIRS}) == len(PAIRS)
    agree = sum(grade(f"<think>.</think> \\boxed{{{p}}}", g)[0] == r for p, g, r in PAIRS)
    assert agree == len(PAIRS) - len(KNOWN_GAPS)  # 83 of 84 (98.8%) on this list


@pytest.mark.parametrize("raw,normalized", [
    (r"100\text{ square units}", "100"),
    (r"5 \, \mbox{cm}^2", "5"),
    ("18 dollars", "18"),
    (r"\varnothing", r"\emptyset"),
    (r"6\,000", "6000"),
    (r"1{,}000", "1,000"),
    ("1e3", r"1\times 10^{3}"),
    (r"12 \text{ and } 15", r"12 \text{ and } 15"),  # a word between numbers is not a unit
    (r"\text{(B)}", r"\text{(B)}"),
    (r"x \text{ cm}", "x"),
])
def test_normalize_math(raw, normalized):
    assert verify.normalize_math(raw) == normalized


def test_unverifiable_is_for_references_nothing_can_read():
    assert grade("<think>.</think> \\boxed{5}", "see the proof above")[0] == verify.UNVERIFIABLE
    assert grade("<think>.</think> \\boxed{5}", r"The proof is left to the reader, no \boxed{} here")[0] == \
        verify.UNVERIFIABLE
    # a boxed answer inside running text is readable
    assert grade("<think>.</think> \\boxed{5}", r"Thus the value is $\boxed{5}$, as claimed.")[0] == verify.CORRECT


@pytest.mark.parametrize("text,answer,source,verdict", [
    ("<think>so a third</think>\nThe probability is $\\frac{1}{3}$", r"\frac{1}{3}", "fallback_latex", C),
    ("<think>adding</think>\nFinal: 42", "42", "fallback_number", C),
    ("<think>adding</think>\nSo we get 41 in total.", "42", "fallback_number", W),
    ("<think>adding</think>\n\\[ x = 7 \\]", "7", "fallback_latex", C),
    ("She has 1,234 apples left.", "1234", "fallback_number", C),  # no think block: all answer
])
def test_fallback_extraction_is_its_own_source(text, answer, source, verdict):
    got, extracted, detail = grade(text, answer)
    assert (got, detail) == (verdict, f"answer from {source}")
    assert answers.extract_answer(text)[1] == "none"  # without the fallback: nothing found


def test_no_fallback_into_unfinished_reasoning():
    # the think block never closed: its last number is not an answer
    assert grade("<think>adding 40 and 2 gives 42", "42")[0] == verify.NO_ANSWER
    assert grade("<think>adding</think>\nI am not sure.", "42")[0] == verify.NO_ANSWER
    # the fallback is for math and numeric only
    assert grade("<think>.</think>\nParis", "Paris", "exact")[0] == verify.NO_ANSWER
