"""Rounds: run -> SFT -> eval, the student becomes the next round's teacher; a loop stopped
between rounds goes on without redoing the finished one, and writes the round table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory import config as config_mod
from factory.training import rounds
from conftest import ROOT, toy_recipe, write_jsonl


def loop_recipe(out: Path, teacher: Path, problems: Path, heldout: Path, n_rounds: int,
                control: dict | None = None) -> rounds.RoundsRecipe:
    sft = yaml.safe_load((ROOT / "recipes" / "toy_addition_sft.yaml").read_text())
    sft["train"].update(extra={"max_steps": 3}, save_steps=100000)
    ev = yaml.safe_load((ROOT / "recipes" / "toy_addition_eval.yaml").read_text())
    ev["ingest"]["paths"] = [str(heldout)]
    ev["rollout"]["num_traces"] = 2
    ev["eval"] = {"k": [1], "group_by": "none"}
    ev["run"]["progress"] = False
    return config_mod.from_dict(rounds.RoundsRecipe, {
        "pipeline": toy_recipe(out / "unused", str(teacher), problems), "sft": sft, "eval": ev,
        "rounds": {"rounds": n_rounds, "output_dir": str(out), "student": str(teacher), "train": ["sft"],
                   "next_problems": "unsolved", "control_order": control}})


def test_two_rounds_resume_between_rounds_and_write_the_table(tmp_path, engine, teacher_dir, problems_file):
    rows = [json.loads(l) for l in problems_file.read_text().splitlines()]
    problems = write_jsonl(tmp_path / "problems.jsonl", rows[:30])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{**r, "split": "test"} for r in rows[90:]])
    out = tmp_path / "loop"
    model_before = engine.model_name

    control = {"strategy": "shuffled", "epochs": 1.5}  # round 1's control SFT, beside the recipe's sorted order
    first = rounds.run_loop(loop_recipe(out, teacher_dir, problems, heldout, 1, control), engine=engine,
                            log=lambda m: None)
    assert len(first) == 1 and (out / "round-1" / "round.json").exists() and not (out / "round-2").exists()
    assert list(first[0]["students"]) == ["base", "sft", "sft-shuffled"]
    trained = json.loads((out / "round-1" / "student-sft-shuffled" / "factory_train.json").read_text())
    assert trained["recipe"]["data"]["order"]["strategy"] == "shuffled"
    assert trained["recipe"]["data"]["order"]["epochs"] == 1.5
    assert trained["recipe"]["model"]["path"] == str(teacher_dir)  # the control starts from the same student
    assert engine.model_name == model_before  # the shared engine is handed back with its own weights
    made = {p: p.stat().st_mtime_ns for p in [out / "round-1" / "run" / "manifest.json",
                                              out / "round-1" / "student-sft" / "model.safetensors",
                                              out / "round-1" / "eval" / "sft" / "eval.json"]}

    said: list[str] = []
    table = rounds.run_loop(loop_recipe(out, teacher_dir, problems, heldout, 2, control), engine=engine,
                            log=said.append)
    assert any("round 1: finished before" in m for m in said)
    assert {p: p.stat().st_mtime_ns for p in made} == made  # round 1 was not redone
    assert [r["round"] for r in table] == [1, 2]
    r1, r2 = table
    assert r1["teacher"] == str(teacher_dir) and r2["teacher"] == str(out / "round-1" / "student-sft")
    assert r1["next_student"] == r2["teacher"]  # expert iteration: round 2 trains on from round 1's student
    # round 2 rolls out only on what round 1's teacher did not always solve
    diff = pq.read_table(out / "round-1" / "run" / "difficulty.parquet").to_pylist()
    unsolved = sorted(d["problem_id"] for d in diff if d["pass_rate"] < 1)
    assert sorted(pq.read_table(out / "round-2" / "problems.parquet")["problem_id"].to_pylist()) == unsolved
    assert r2["problems"] == len(unsolved) <= r1["problems"] == 30
    manifest2 = json.loads((out / "round-2" / "run" / "manifest.json").read_text())
    assert manifest2["config"]["engine"]["model"] == r2["teacher"]
    for r in table:
        assert 0 <= r["teacher_pass_rate"] <= 1 and r["curriculum_rows"] > 0
        assert 0 <= r["students"]["sft"]["pass@1"] <= 1
    assert json.loads((out / "rounds.json").read_text()) == table
    text = (out / "rounds.txt").read_text()
    assert list(r1["students"]) == ["base", "sft", "sft-shuffled"] and list(r2["students"]) == ["sft"]  # the start is evaluated once; the control is round 1's
    assert text.splitlines()[0].startswith("round") and len(text.splitlines()) == 5  # one line a student
    assert "<svg" in (out / "rounds.html").read_text()
    assert engine.model_name == model_before


def test_control_is_another_order_of_the_same_sft_and_never_the_same_one(tmp_path):
    def recipe(order: dict, **rounds_cfg) -> rounds.RoundsRecipe:
        return config_mod.from_dict(rounds.RoundsRecipe, {
            "sft": {"data": {"order": order}},
            "rounds": {"student": "s", "train": ["sft"], **rounds_cfg}})

    replay = {"strategy": "replay", "buckets": 4, "replay": 0.25, "epochs": 2, "group_by_length": 8}
    control = rounds.control_order(recipe(replay, shuffled_control=True))
    assert control.strategy == "shuffled" and (control.epochs, control.group_by_length) == (2, 8)  # the rest kept
    assert rounds.control_order(recipe(replay)) is None
    same = recipe({"strategy": "shuffled", "epochs": 2.375}, shuffled_control=True)
    with pytest.raises(ValueError, match="shuffled already"):
        rounds.control_order(same)
    with pytest.raises(ValueError, match="shuffled already"):  # refused before any work is done
        rounds.run_loop(same, log=lambda m: None)
    given = rounds.control_order(recipe({"strategy": "shuffled"}, control_order=replay))
    assert (given.strategy, given.buckets, given.replay) == ("replay", 4, 0.25)
    with pytest.raises(ValueError, match="SFT's own order"):
        rounds.control_order(recipe(replay, control_order=replay))
    with pytest.raises(ValueError, match="name one control"):
        rounds.check(recipe(replay, shuffled_control=True, control_order=replay).rounds)
    with pytest.raises(ValueError, match="needs an sft step"):
        rounds.check(config_mod.from_dict(rounds.RoundsConfig, {"student": "s", "train": ["grpo"],
                                                                "control_order": replay}))
    with pytest.raises(ValueError, match="epochs"):  # fractions are shuffled's only
        rounds.check(config_mod.from_dict(rounds.RoundsConfig, {"student": "s", "control_order": {
            **replay, "epochs": 2.5}}))


def test_round_report_draws_each_grpo_reward_curve():
    history = [{"step": s, "accuracy": a, "format": 1.0, "zero_advantage_groups": z}
               for s, a, z in [(5, 0.40, 0.3), (10, 0.55, 0.2), (15, 0.61, 0.2)]]
    row = {"round": 1, "teacher": "t", "problems": 3, "teacher_pass_rate": 0.5, "curriculum_rows": 2, "pairs": 0,
           "students": {"sft": {"pass@1": 0.3, "by_group": {}}, "grpo": {"pass@1": 0.4, "by_group": {}}},
           "reward_history": {"grpo": history}}
    page = rounds.html([row])
    assert page.count("<svg") == 2 and "round 1, grpo: reward per logged step" in page
    # the accuracy line climbs: its last point is drawn higher (a smaller y) than its first
    line = page.split('<polyline points="')[1].split('"')[0].split()
    assert float(line[-1].split(",")[1]) < float(line[0].split(",")[1])
    assert rounds.html([{**row, "reward_history": {}}]).count("<svg") == 1


def test_round_table_gives_mean_and_spread_over_seeds():
    def ev(p, l1):
        return {"overall": {"pass@1": p}, "groups": {"1": {"pass@1": l1}}}

    entry = rounds.student_entry([ev(0.40, 0.8), ev(0.44, 0.9), ev(0.42, 0.85)])
    assert entry["seeds"] == 3 and abs(entry["pass@1"] - 0.42) < 1e-12 and abs(entry["spread"] - 0.02) < 1e-12
    assert abs(entry["by_group"]["1"] - 0.85) < 1e-12 and abs(entry["by_group_spread"]["1"] - 0.05) < 1e-12
    single = rounds.student_entry([ev(0.3, 0.5)])
    assert single == {"pass@1": 0.3, "by_group": {"1": 0.5}}  # one seed: no spread claimed
    row = {"round": 1, "teacher": "t", "problems": 3, "teacher_pass_rate": 0.5, "curriculum_rows": 2, "pairs": 0,
           "students": {"base": single, "sft": entry}}
    lines = rounds.table([row]).splitlines()
    assert lines[1].split()[-2:] == ["30.0%", "50.0%"]
    assert lines[2].split()[-2:] == ["42.0±2.0%", "85.0±5.0%"]
    assert "sft 3" in lines[-1] and "standard deviation" in lines[-1]
