"""Reading a completion's boxed answers (factory/answers.py): which boxes make the answer."""

from __future__ import annotations

import pytest

from factory import answers


@pytest.mark.parametrize("text,boxes", [
    (r"\boxed{1}, \boxed{2}", ["1", "2"]),
    (r"\boxed{\frac{1}{2}} and \fbox{3}", [r"\frac{1}{2}", "3"]),
    (r"\boxed{\boxed{5}} \boxed{6}", ["5", "6"]),  # a box in a box is its inner box
    (r"\boxed{1 \boxed{2}", ["2"]),  # the outer one never closes
    (r"\boxed{} \boxed{4}", ["", "4"]),
])
def test_all_boxed(text, boxes):
    assert answers.all_boxed(text) == boxes


@pytest.mark.parametrize("text,boxes", [
    (r"<think>\boxed{9}</think> \boxed{1}, \boxed{2}", ["1", "2"]),  # the reasoning's boxes do not count
    (r"<think>unfinished \boxed{1}, \boxed{2}", []),
    (r"\boxed{1} and \boxed{2}", ["1", "2"]),  # no think block: all answer
    (r"<think>.</think> \boxed{} \boxed{4}", ["4"]),
    # an answer written out again counts once, its last copy kept
    (r"<think>.</think> \boxed{5}. Final Answer: \boxed{ 5 }", ["5"]),
    (r"<think>.</think> \boxed{1}, \boxed{2}. So: \boxed{1}, \boxed{2}", ["1", "2"]),
    (r"<think>.</think> \boxed{1}, \boxed{2}, \boxed{1}", ["1", "2", "1"]),  # not one block repeated
    (r"<think>.</think> \boxed{2}, \boxed{2}, \boxed{3}", ["2", "2", "3"]),
])
def test_answer_boxes(text, boxes):
    assert answers.answer_boxes(text) == boxes


@pytest.mark.parametrize("text,answer,source", [
    (r"<think>.</think> \boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(2, 2), (6, 2)", "boxes"),
    (r"<think>.</think> \boxed{7}", "7", "boxed"),
    (r"<think>.</think> \boxed{7} so \boxed{7}", "7", "boxed"),
    (r"<think>maybe \boxed{6} or \boxed{7}", "7", "boxed"),  # unfinished: its last box, as before
    (r"<think>.</think> The answer is 7.", "7", "answer_line"),
])
def test_extract_answer_joins_several_boxes(text, answer, source):
    assert answers.extract_answer(text) == (answer, source)


@pytest.mark.parametrize("text,how,reference", [
    (r"So the roots are $\boxed{2}$ and $\boxed{3}$.", "boxed", "2, 3"),
    (r"The answer is $\boxed{7}$; again, $\boxed{7}$.", "boxed", "7"),
    (r"Thus $\boxed{\frac{1}{2}}$.", "auto", r"\frac{1}{2}"),
    ("no box here", "boxed", None),
    ("She has 5.\n#### 5", "auto", "5"),
])
def test_reference_answer_reads_every_boxed_part(text, how, reference):
    assert answers.reference_answer(text, how) == reference
