"""pass@k / maj@k on known values, and `factory eval` on the tiny teacher through the shared engine."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory import cli
from factory.training import evaluate
from factory.training.evaluate import EvalConfig, maj_at_k, pass_at_k, summarize

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,c,k,expected", [
    (10, 3, 1, 0.3),
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (8, 2, 2, 1 - 15 / 28),  # 1 - C(6,2)/C(8,2)
    (8, 1, 8, 1.0),
    (5, 0, 3, 0.0),
    (5, 5, 3, 1.0),
    (16, 4, 4, 1 - 495 / 1820),  # 1 - C(12,4)/C(16,4)
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_everywhere():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="pass@9 needs at least 9"):
        pass_at_k(8, 2, 9)


def s(verdict: str, answer: str | None) -> dict:
    return {"verdict": verdict, "extracted_answer": answer}


@pytest.mark.parametrize("samples,k,expected", [
    ([s("correct", "1/2"), s("correct", "0.5"), s("wrong", "3"), s("no_answer", None)], 4, 1.0),  # equal forms pool
    ([s("correct", "7"), s("wrong", "5"), s("wrong", " 5"), s("no_answer", None)], 4, 0.0),  # 5 wins 2:1
    ([s("correct", "7"), s("wrong", "5")], 2, 1.0),  # a tie goes to the answer seen first
    ([s("wrong", "5"), s("correct", "7")], 2, 0.0),
    ([s("no_answer", None)] * 4, 4, 0.0),  # nobody votes: not correct
    ([s("correct", "7"), s("wrong", "1"), s("wrong", "2"), s("wrong", "2")], 2, 0.5),  # two groups of 2
])
def test_maj_at_k(samples, k, expected):
    assert maj_at_k(samples, k) == expected


def rows(pid: str, verdicts: str, level: int | None = None) -> list[dict]:
    """c = correct, w = wrong (answer 'x'), n = no answer."""
    return [{"problem_id": pid, "sample_index": i, "level": level, "verdict": {"c": "correct", "w": "wrong",
             "n": "no_answer"}[v], "extracted_answer": None if v == "n" else "x", "format_ok": v != "n",
             "num_tokens": 10} for i, v in enumerate(verdicts)]


def test_summarize_overall_and_by_level():
    graded = rows("a", "cccc", 1) + rows("b", "cwww", 1) + rows("c", "wwnn", 2)
    out = summarize(graded, EvalConfig(k=[1, 2, 4]), 4)
    o = out["overall"]
    assert o["problems"] == 3 and o["samples"] == 12
    assert o["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert o["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)  # b: 1 - C(3,2)/C(4,2) = 0.5
    assert o["maj@4"] == pytest.approx(1 / 3) and o["no_answer"] == pytest.approx(2 / 12)
    assert set(out["groups"]) == {"level 1", "level 2"} and out["groups"]["level 2"]["pass@4"] == 0.0
    with pytest.raises(ValueError, match="between 1 and rollout.num_traces=4"):
        summarize(graded, EvalConfig(k=[8]), 4)
    with pytest.raises(ValueError, match="fewer than 4 samples"):
        summarize(graded[:-1], EvalConfig(k=[1]), 4)


def test_eval_on_the_teacher_and_compare(tmp_path, engine, teacher_dir, capsys):
    probs = []
    for a in range(10):
        for b in (1, 8):
            probs.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric",
                          "level": 1 if a + b < 10 else 2})
    src = write_jsonl(tmp_path / "heldout.jsonl", probs)
    recipe = evaluate.load_recipe(ROOT / "recipes" / "toy_addition_eval.yaml", [
        f"engine.model={teacher_dir}", f"ingest.paths=[{src}]", f"run.output_dir={tmp_path / 'ev'}",
        "run.progress=false", "eval.group_by=level"])
    result = evaluate.evaluate(recipe, engine=engine)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["overall"] == result["overall"]
    # independent count from the graded shards: pass@1 = share of correct samples; pass@8 = any correct
    graded = pq.read_table(tmp_path / "ev" / "stages" / "grade" / "shard-00000.parquet").to_pylist()
    assert len(graded) == 20 * 8
    assert result["overall"]["pass@1"] == pytest.approx(sum(r["verdict"] == "correct" for r in graded) / 160)
    solved = {r["problem_id"] for r in graded if r["verdict"] == "correct"}
    assert result["overall"]["pass@8"] == pytest.approx(len(solved) / 20)
    assert 0.1 < result["overall"]["pass@1"] < 0.95  # the under-trained teacher errs sometimes
    assert set(result["groups"]) == {"level 1", "level 2"}
    assert sum(g["problems"] for g in result["groups"].values()) == 20
    # a re-run reuses the samples (no engine needed) and --compare prints both
    again = evaluate.evaluate(recipe, engine=None)
    assert again["overall"] == result["overall"]
    other = dict(result, model="B", overall={**result["overall"], "pass@1": result["overall"]["pass@1"] + 0.1})
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert cli.main(["eval", "--compare", str(tmp_path / "ev"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "+10.0" in out and "maj@8" in out and "level 2" in out
