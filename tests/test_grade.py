"""The grade stage through its worker pool: verdicts in order, hard timeouts, recovery."""

from __future__ import annotations

import time


from factory import schema
from factory.stages.grade import GradeConfig, grade_table, label_unlabeled, make_pool
from factory.workers import Failed, TimedOut, TimeoutPool


def traces(rows):
    base = {"problem_id": "p", "domain": "math", "choices": None, "source": "t", "split": "train",
            "question": "q", "sample_index": 0, "num_tokens": 1, "truncated": False}
    return schema.table([{**base, "trace_id": f"t{i}", **r} for i, r in enumerate(rows)], schema.TRACES)


def test_pathological_expression_times_out_and_the_rest_is_graded():
    cfg = GradeConfig(timeout_s=3, workers=2)
    table = traces([
        {"text": "<think>easy</think>\\boxed{7}", "answer": "7"},
        {"text": "<think>huge</think>\\boxed{9^{9^{9^{9}}}}", "answer": "7"},  # sympy never finishes
        {"text": "<think>half</think>\\boxed{\\frac{1}{2}}", "answer": "0.5"},
        {"text": "<think>no</think>\\boxed{8}", "answer": "7"},
        {"text": "<think>lost", "answer": "7"},
    ])
    t0 = time.monotonic()
    with make_pool(cfg) as pool:
        graded = grade_table(table, cfg, pool)
        assert pool.restarts == 1
        # the pool still works after replacing the killed worker
        again = grade_table(table.slice(0, 1), cfg, pool)
    assert time.monotonic() - t0 < 60
    assert graded.column("verdict").to_pylist() == ["correct", "timeout", "correct", "wrong", "no_answer"]
    assert graded.column("format_ok").to_pylist() == [True, True, True, True, False]
    assert "over 3s" in graded.column("grade_detail").to_pylist()[1]
    assert again.column("verdict").to_pylist() == ["correct"]
    assert graded.column_names[: len(schema.TRACES)] == schema.TRACES.names  # nothing upstream dropped


def test_multi_part_answers_through_the_pool_and_the_majority_vote():
    cfg = GradeConfig(workers=1)
    graded_rows = traces([
        {"text": "<think>.</think>\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "answer": "(2, 2), (6, 2)"},
        {"text": "<think>.</think>\\boxed{3}, \\boxed{2}", "answer": "(2, 3)"},
        {"text": "<think>.</think>\\boxed{(6, 2)}", "answer": "(2, 2), (6, 2)"},
    ])
    unlabeled = traces([{"text": t, "answer": None, "reference_source": "unlabeled"} for t in [
        "<think>.</think>\\boxed{1}, \\boxed{2}", "<think>.</think>\\boxed{2} and \\boxed{1}",
        "<think>.</think>\\boxed{1, 2}", "<think>.</think>\\boxed{2}"]])
    with make_pool(cfg) as pool:
        graded = grade_table(graded_rows, cfg, pool)
        labelled, rejected, counts = label_unlabeled(unlabeled, cfg, pool)
    assert graded.column("verdict").to_pylist() == ["correct", "wrong", "wrong"]
    assert graded.column("grade_detail").to_pylist() == [
        "multi-box: 2 boxes as an unordered set", "multi-box: 2 boxes as an ordered tuple", "answer from boxed"]
    assert graded.column("extracted_answer").to_pylist() == ["(2, 2), (6, 2)", "(3, 2)", "(6, 2)"]
    # several boxes vote as one answer: {1, 2} three times, in any order or one box
    assert (rejected, counts["unlabeled"]["labelled"]) == ([], 1)
    assert labelled.column("answer").to_pylist() == ["1, 2"] * 4
    assert labelled.column("reference_agreement").to_pylist() == [0.75] * 4


def _crash_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x * 10


def _sleep(x: float) -> float:
    time.sleep(x)
    return x


def test_pool_orders_results_and_reports_failures():
    with TimeoutPool(_crash_on_odd, workers=2, timeout_s=10) as pool:
        out = list(pool.map(range(6)))
    assert [o for o in out if not isinstance(o, Failed)] == [0, 20, 40]
    assert [i for i, o in enumerate(out) if isinstance(o, Failed)] == [1, 3, 5]
    assert "odd 3" in out[3].error


def test_pool_timeout_per_item():
    with TimeoutPool(_sleep, workers=2, timeout_s=1.0) as pool:
        out = list(pool.map([0.0, 5.0, 0.1, 5.0, 0.0]))
    assert out[0] == 0.0 and out[2] == 0.1 and out[4] == 0.0
    assert isinstance(out[1], TimedOut) and isinstance(out[3], TimedOut)


def test_an_item_is_timed_from_its_worker_being_ready_not_from_its_send(tmp_path, monkeypatch):
    # a worker spends its first seconds importing (the parent's __main__, the function's module):
    # those seconds are not the item's, or a pool with a short timeout never grades anything
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(2.0)\n\ndef double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_to_import

    with TimeoutPool(slow_to_import.double, workers=2, timeout_s=0.5) as pool:
        assert list(pool.map([1, 2, 3])) == [2, 4, 6]
        assert pool.restarts == 0
    with TimeoutPool(slow_to_import.double, workers=1, timeout_s=0.5, start_timeout_s=0.5) as pool:
        out = list(pool.map([1]))
    assert isinstance(out[0], Failed) and "did not start" in out[0].error
