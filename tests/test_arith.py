"""The synthetic arithmetic domain: problems, gold traces, and ground-truth step labels."""

import json

import pytest

from factory import answers, verify
from factory.demo import arith
from prm.steps import SplitConfig, split_steps


def test_problems_are_deterministic_balanced_and_in_range():
    a, b = arith.make_problems(60, seed=3), arith.make_problems(60, seed=3)
    assert a == b and a != arith.make_problems(60, seed=4)
    assert [sum(p["level"] == lv for p in a) for lv in arith.LEVELS] == [10] * 6
    assert len({p["question"] for p in a}) == 60 and len({p["source"] for p in a}) == 4  # four phrasings
    for p in a:
        values = arith.run_chain(p["chain"]["start"], [tuple(o) for o in p["chain"]["ops"]])
        assert len(values) == p["level"] and all(0 <= v <= 99 for v in values) and p["answer"] == str(values[-1])


def test_gold_traces_are_r1_shaped_and_graded_correct():
    for p in arith.make_problems(30, seed=0):
        text = arith.gold_trace(p["chain"]["start"], [tuple(o) for o in p["chain"]["ops"]])
        split = answers.split_think(text)
        steps, status = split_steps(split.reasoning, SplitConfig())
        assert status == "ok" and len(steps) == p["level"] and answers.format_ok(text)
        extracted, _ = answers.extract_answer(text, [])
        assert verify.compare(extracted, p["answer"], "numeric", None, 1e-6, 1e-9, 6) == "correct"
        assert arith.step_labels(p["chain"], steps) == ([1] * len(steps), -1)


CHAIN = {"start": 7, "ops": [["+", 3], ["*", 2], ["-", 5]]}  # 10, 20, 15


@pytest.mark.parametrize("steps,labels,first", [
    (["7 + 3 = 10", "10 * 2 = 20", "20 - 5 = 15"], [1, 1, 1], -1),
    (["7 + 3 = 11", "11 * 2 = 22", "22 - 5 = 17"], [0, 0, 0], 0),  # an arithmetic slip
    (["7 + 3 = 10", "10 * 3 = 30", "30 - 5 = 25"], [1, 0, 0], 1),  # the wrong operand
    (["7 + 3 = 10", "10 * 2 = 20", "20 - 5 = 15", "15 + 1 = 16"], [1, 1, 1, 0], 3),  # one step too many
    (["7 + 3 = 10", "10 * 2 = 20"], [1, 0], 1),  # stopped short: the last step ended it early
    (["add them up", "10 * 2 = 20", "20 - 5 = 15"], [0, 1, 1], 0),  # not a step the checker can read
])
def test_step_labels(steps, labels, first):
    assert arith.step_labels(CHAIN, steps) == (labels, first)


def test_written_sets_are_disjoint(tmp_path):
    train, held = arith.write_sets(tmp_path, n_train=60, n_heldout=30, seed=1)
    tr = [json.loads(l) for l in train.read_text().splitlines()]
    he = [json.loads(l) for l in held.read_text().splitlines()]
    assert len(tr) == 60 and len(he) == 30 and all(p["split"] == "test" for p in he)
    assert not {p["question"] for p in tr} & {p["question"] for p in he}
