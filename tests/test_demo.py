"""The embedded demo, cut down: a few problems per level through the whole loop and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory import demo, store

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


def pick(path: Path, per_level: int) -> list[str]:
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    out = []
    for lv in sorted({r["level"] for r in rows}):
        out += [json.dumps(r) for r in rows if r["level"] == lv][:per_level]
    return out


@pytest.mark.skipif(not (DEMO / "teacher" / "config.json").exists(), reason="data/demo models not built")
def test_cut_down_demo(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("\n".join(pick(DEMO / "problems" / "train.jsonl", 8)) + "\n")
    held.write_text("\n".join(pick(DEMO / "problems" / "heldout.jsonl", 4)) + "\n")
    run = tmp_path / "demo"
    recipe = demo.load_recipe(ROOT / "recipes" / "demo.yaml", [
        f"pipeline.run.output_dir={run}", "pipeline.run.progress=false", f"pipeline.ingest.paths=[{train}]",
        f"eval.ingest.paths=[{held}]", "eval.rollout.num_traces=2", "eval.eval.k=[1,2]", "eval.run.progress=false",
        "sft.data.order.epochs=1", f"demo.problems=[{train}]", "demo.unfiltered_control=true"])
    summary = demo.run_demo(recipe, log=lambda m: None)
    assert summary["manifest"]["rollout"]["out"] == 48 * 8
    assert set(summary["eval"]) == {"student-base", "student-sft", "student-sft-unfiltered", "student-dpo"}
    assert all(e["problems"] == 24 and 0.0 <= e["pass@1"] <= 1.0 for e in summary["eval"].values())
    # the shipped PRM never saw these problems; it has to find their first wrong steps
    prm = summary["prm_vs_ground_truth"]
    assert prm["correct"] > 50 and prm["erroneous"] > 50 and prm["f1"] >= 0.7, prm
    assert summary["manifest"]["curate"]["dropped"].get("prm_below_threshold", 0) > 0
    text = (run / "report" / "report.txt").read_text()
    for needle in ("pass rate over traces", "teacher pass@1 by level", "PRM mean step score",
                   "ProcessBench F1", "student-sft-unfiltered", "verdict_wrong", "pass@1 by phrasing"):
        assert needle in text, needle
    html = (run / "report" / "report.html").read_text()
    assert html.count("<svg") == 4
    # each student's pass@1 per phrasing is the share of its correct held-out traces in that phrasing
    for name, by_style in summary["eval_phrasings"].items():
        graded = store.StageDir(run / "eval" / name, "grade").read().to_pylist()
        styles = {r["source"].split("/")[1] for r in graded}
        assert set(by_style) == styles and len(styles) > 1
        for style, value in by_style.items():
            rows = [r for r in graded if r["source"] == f"arith/{style}"]
            assert value == sum(r["verdict"] == "correct" for r in rows) / len(rows)
    for name in ("student-sft", "student-sft-unfiltered", "student-dpo"):
        assert (run / name / "model.safetensors").exists() and (run / name / "order.jsonl").exists()
    # a second run with the same recipe reuses every step and reports the same figures
    again = demo.run_demo(recipe, log=lambda m: None)
    assert again["eval"] == summary["eval"] and again["prm_vs_ground_truth"] == summary["prm_vs_ground_truth"]


def test_a_train_or_eval_step_is_reused_only_for_the_same_inputs(tmp_path):
    out = tmp_path / "step"
    assert not demo.reuse(out, {"data": "a"}, "done.json")
    (out / "checkpoint-10").write_text("x")
    # same inputs, not finished: start again but keep the checkpoints to resume from
    assert not demo.reuse(out, {"data": "a"}, "done.json") and (out / "checkpoint-10").exists()
    (out / "done.json").write_text("{}")
    assert demo.reuse(out, {"data": "a"}, "done.json")
    # new data: nothing of the old step survives
    assert not demo.reuse(out, {"data": "b"}, "done.json")
    assert sorted(f.name for f in out.iterdir()) == ["demo_inputs.json"]
