"""Answer comparison per domain: >= 40 (prediction, reference) pairs with known verdicts."""

import pytest

from factory.stages.grade import GradeConfig, GradeJob, grade_one

CASES = [
    # (model output, reference, domain, choices, expected verdict)
    # math, through math-verify
    ("<think>half</think>\\boxed{\\frac{1}{2}}", "0.5", "math", None, "correct"),
    ("<think>.</think>\\boxed{0.5}", "\\frac{1}{2}", "math", None, "correct"),
    ("<think>.</think>\\boxed{x=3}", "3", "math", None, "correct"),
    ("<think>.</think>\\boxed{3}", "x = 3", "math", None, "correct"),
    ("<think>.</think>\\boxed{[1,2)}", "[1,2)", "math", None, "correct"),
    ("<think>.</think>\\boxed{[1,2]}", "(1,2]", "math", None, "wrong"),
    ("<think>.</think>\\boxed{\\sqrt{8}}", "2\\sqrt{2}", "math", None, "correct"),
    ("<think>.</think>\\boxed{1,000}", "1000", "math", None, "correct"),
    ("<think>.</think>\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", "math", None, "correct"),
    ("<think>.</think>\\boxed{\\frac{2}{3}}", "\\frac{3}{4}", "math", None, "wrong"),
    ("<think>.</think>\\boxed{2x+2}", "2(x+1)", "math", None, "correct"),
    ("<think>.</think>\\boxed{x^2-1}", "(x-1)(x+1)", "math", None, "correct"),
    ("<think>.</think>\\boxed{\\pi}", "\\pi", "math", None, "correct"),
    ("<think>.</think>\\boxed{3.14}", "\\pi", "math", None, "wrong"),
    ("<think>.</think>\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", "math", None, "correct"),
    ("<think>.</think>\\boxed{(-\\infty, 0)}", "(-\\infty,0)", "math", None, "correct"),
    ("<think>work</think> The answer is 42.", "42", "math", None, "correct"),
    ("<think>work</think> <answer>7</answer>", "7", "math", None, "correct"),
    ("<think>a \\boxed{5} guess</think> final: \\boxed{6}", "6", "math", None, "correct"),
    ("<think>never closes, \\boxed{6}", "6", "math", None, "correct"),
    ("<think>thinking</think> I am not sure.", "6", "math", None, "no_answer"),
    ("<think>.</think>\\boxed{5}", "see the proof above", "math", None, "unverifiable"),
    # numeric
    ("<think>.</think>\\boxed{1,234}", "1234", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{12 cm}", "12", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{\\$12.50}", "12.5", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{50\\%}", "0.5", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{3/4}", "0.75", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{-\\frac{1}{2}}", "-0.5", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{2.5e3}", "2500", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{3.14}", "3.14159", "numeric", None, "wrong"),
    ("<think>.</think>\\boxed{100.001}", "100", "numeric", None, "wrong"),
    ("<think>.</think>\\boxed{x = 7}", "7", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{seven}", "7", "numeric", None, "no_answer"),
    ("<think>.</think>\\boxed{7}", "n/a", "numeric", None, "unverifiable"),
    ("<think>.</think>\\boxed{1,000,000}", "1e6", "numeric", None, "correct"),
    # choice
    ("<think>.</think>\\boxed{(B)}", "B", "choice", ["1", "2", "3", "4"], "correct"),
    ("<think>.</think>\\boxed{B}", "(B)", "choice", None, "correct"),
    ("<think>.</think> The answer is C.", "B", "choice", ["1", "2", "3", "4"], "wrong"),
    ("<think>.</think>\\boxed{Paris}", "C", "choice", ["London", "Rome", "Paris"], "correct"),
    ("<think>.</think>\\boxed{option d}", "D", "choice", None, "correct"),
    ("<think>.</think>\\boxed{E}", "A", "choice", ["x", "y"], "no_answer"),
    ("<think>.</think>\\boxed{A}", "Berlin", "choice", ["Paris", "Rome"], "unverifiable"),
    # exact
    ("<think>.</think>\\boxed{\\text{Yes}}", "yes", "exact", None, "correct"),
    ("<think>.</think>\\boxed{Blue  Whale.}", "blue whale", "exact", None, "correct"),
    ("<think>.</think>\\boxed{no}", "yes", "exact", None, "wrong"),
    # several boxes against a one-part reference: each box must be the answer (a hedge is wrong)
    ("<think>.</think>\\boxed{12} cm, that is \\boxed{12 cm}", "12", "numeric", None, "correct"),
    ("<think>.</think>\\boxed{3} or \\boxed{12}", "12", "numeric", None, "wrong"),
    ("<think>.</think>\\boxed{12} or \\boxed{3}", "12", "numeric", None, "wrong"),
    ("<think>.</think>\\boxed{B}, i.e. \\boxed{(B)}", "B", "choice", ["1", "2", "3"], "correct"),
    ("<think>.</think>\\boxed{B} or \\boxed{C}", "C", "choice", ["1", "2", "3"], "wrong"),
    ("<think>.</think>\\boxed{no} \\boxed{yes}", "yes", "exact", None, "wrong"),
    ("<think>.</think>\\boxed{2} and \\boxed{3}", "3, 2", "math", None, "correct"),
]


@pytest.mark.parametrize("text,reference,domain,choices,expected", CASES)
def test_verdicts(text, reference, domain, choices, expected):
    verdict, extracted, detail = grade_one(GradeJob(text, reference, domain, choices, GradeConfig()))
    assert verdict == expected, (extracted, detail)


def test_enough_cases_across_domains():
    assert len(CASES) >= 40
    assert {c[2] for c in CASES} == {"math", "numeric", "choice", "exact"}
    assert {c[4] for c in CASES} >= {"correct", "wrong", "no_answer", "unverifiable"}


def test_custom_answer_pattern():
    cfg = GradeConfig(answer_patterns=[r"RESULT=(\d+)"])
    verdict, extracted, _ = grade_one(GradeJob("<think>x</think>RESULT=12", "12", "numeric", None, cfg))
    assert (verdict, extracted) == ("correct", "12")
