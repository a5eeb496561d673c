"""Curate on inline graded tables: pass rates, band filters, selection, pairs, accounting."""

from __future__ import annotations

from factory import schema
from factory.stages.curate import CurateConfig, bucket_of, curate_table


def graded(spec: dict[str, list[str]], **overrides):
    """spec: problem_id -> verdicts of its traces; trace k has 10 * (k + 1) tokens."""
    rows = []
    for pid, verdicts in spec.items():
        for k, v in enumerate(verdicts):
            rows.append({"problem_id": pid, "question": f"Q {pid}", "answer": "1", "domain": "numeric",
                         "source": "s", "split": "train", "trace_id": f"{pid}-{k}", "sample_index": k,
                         "text": f"<think>r{k}</think>\\boxed{{1}}", "num_tokens": 10 * (k + 1),
                         "truncated": False, "verdict": v, "format_ok": True, "grade_detail": "", **overrides.get(f"{pid}-{k}", {})})
    return schema.table(rows, schema.GRADED)


def prompt(q):
    return [{"role": "user", "content": q}]


C, W, N = "correct", "wrong", "no_answer"


def test_difficulty_band_selection_and_order():
    table = graded({"easy": [C] * 8, "mid": [C, W, C, W, N, C, W, W], "hard": [W] * 8, "one": [W] * 7 + [C]})
    cfg = CurateConfig(min_pass_rate=0.1, max_pass_rate=0.9, max_traces_per_problem=2)
    cur, pairs, diff, rej = curate_table(table, cfg, prompt)
    d = {r["problem_id"]: r for r in diff.to_pylist()}
    assert d["easy"]["pass_rate"] == 1.0 and d["mid"]["pass_rate"] == 3 / 8 and d["one"]["pass_rate"] == 1 / 8
    assert d["mid"]["difficulty"] == 5 / 8 and d["mid"]["difficulty_bucket"] == bucket_of(5 / 8, [0.25, 0.5, 0.75]) == 2
    assert not d["easy"]["in_band"] and not d["hard"]["in_band"]
    # 'mid' (difficulty .625) before 'one' (.875); shortest two of mid's correct traces
    assert cur.column("trace_id").to_pylist() == ["mid-0", "mid-2", "one-7"]
    reasons = rej.column("drop_reason").to_pylist()
    assert reasons.count("pass_rate_above_band") == 8 and reasons.count("pass_rate_below_band") == 8
    assert reasons.count("not_selected") == 1 and reasons.count("verdict_no_answer") == 1
    assert cur.num_rows + rej.num_rows == table.num_rows
    assert cur.column("prompt").to_pylist()[0] == prompt("Q mid")


def test_quality_filters_and_pairs():
    table = graded({"p": [C, C, C, W, W, N]},
                   **{"p-0": {"truncated": True}, "p-1": {"format_ok": False}})
    cfg = CurateConfig(pairs_per_problem=5)
    cur, pairs, _, rej = curate_table(table, cfg, prompt)
    assert cur.column("trace_id").to_pylist() == ["p-2"]
    assert {r["drop_reason"] for r in rej.to_pylist() if r["trace_id"] in ("p-0", "p-1")} == {"truncated", "bad_format"}
    # chosen only from traces that passed the filters; rejected only from wrong ones (not no_answer)
    assert set(pairs.column("chosen_trace_id").to_pylist()) == {"p-2"}
    assert set(pairs.column("rejected_trace_id").to_pylist()) == {"p-3", "p-4"}
    assert pairs.num_rows == 2  # 1 chosen x 2 rejected, though 5 were allowed


def test_pair_strategies_and_caps():
    table = graded({"p": [C, C, C, W, W, W, W, W]})
    rnd = curate_table(table, CurateConfig(pairs_per_problem=3), prompt)[1].to_pylist()
    assert len(rnd) == 3 and len({(r["chosen_trace_id"], r["rejected_trace_id"]) for r in rnd}) == 3
    lm = curate_table(table, CurateConfig(pairs_per_problem=2, pairing="length_matched"), prompt)[1].to_pylist()
    # shortest chosen (10 tokens) pairs with the closest wrong trace (40), the next (20) with 50
    assert [(r["chosen_trace_id"], r["rejected_trace_id"]) for r in lm] == [("p-0", "p-3"), ("p-1", "p-4")]
    again = curate_table(table, CurateConfig(pairs_per_problem=3), prompt)[1].to_pylist()
    assert again == rnd  # seeded


def test_prm_selection_needs_scores():
    import pytest

    with pytest.raises(ValueError, match="score stage"):
        curate_table(graded({"p": [C]}), CurateConfig(selection="prm"), prompt)
