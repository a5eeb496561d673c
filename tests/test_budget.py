"""The thinking budget (rollout.max_think_tokens, s1's budget forcing) on both backends: a
sample still inside <think> at the budget is closed, continued with a short answer budget and
flagged forced_answer; it counts for the pass rate and is not an SFT row. The streamed path
and the one-call path (the Ray executor's unit) give the same traces."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from factory import answers, config as config_mod, store
from factory.engines import EngineConfig, make_engine
from factory.run import pipeline
from factory.run.continuous import rollout_shards
from factory.stages.rollout import RolloutConfig, rollout_table

from conftest import load, toy_recipe
from test_continuous import ROOT, recipe_data, sim  # noqa: F401  (the simulated teacher fixture)


def check_forced(traces: list[dict], cfg: RolloutConfig) -> list[dict]:
    forced = [t for t in traces if t["forced_answer"]]
    for t in traces:
        split = answers.split_think(t["text"])
        if t["forced_answer"]:
            # the first phase ran into the budget inside <think>; the answer budget is on top
            assert cfg.force_answer_text in t["text"] and split.think_closed
            assert cfg.max_think_tokens < t["num_tokens"] <= cfg.max_think_tokens + cfg.forced_answer_tokens
        else:
            assert t["num_tokens"] <= cfg.max_tokens
    return forced


def test_thinking_budget_on_the_server(sim, tmp_path):  # noqa: F811
    problems = ROOT / "data" / "toy_addition" / "problems.jsonl"
    data = recipe_data(tmp_path / "run", sim, problems,
                       rollout={"max_think_tokens": 100, "forced_answer_tokens": 24})
    manifest = pipeline.run(load(data))
    run = tmp_path / "run"
    cfg = config_mod.from_dict(RolloutConfig, data["rollout"])
    traces = store.StageDir(run, "rollout").read().to_pylist()
    forced = check_forced(traces, cfg)
    # the simulated teacher's lengths: lognormal around 120 tokens, so about 40% run past 100
    assert 0.2 * len(traces) < len(forced) < 0.7 * len(traces)
    graded = {t["trace_id"]: t for t in store.StageDir(run, "grade").read().to_pylist()}
    forced_right = [t for t in forced if graded[t["trace_id"]]["verdict"] == "correct"]
    assert forced_right and all(graded[t["trace_id"]]["extracted_answer"] is not None for t in forced)
    # forced traces count for the pass rate, and are no SFT rows
    diff = {r["problem_id"]: r for r in pq.read_table(run / "difficulty.parquet").to_pylist()}
    for pid in {t["problem_id"] for t in forced_right}:
        assert diff[pid]["num_correct"] == sum(g["verdict"] == "correct" for g in graded.values() if g["problem_id"] == pid)
    kept = {r["trace_id"] for s in manifest["curriculum"] for r in pq.read_table(run / s["file"]).to_pylist()}
    assert not kept & {t["trace_id"] for t in forced}
    assert manifest["stages"]["curate"]["dropped"]["forced_answer"] == len(forced_right)
    # the one-call path gives the same traces
    engine = make_engine(config_mod.from_dict(EngineConfig, data["engine"]), tmp_path)
    ingest = store.StageDir(run, "ingest")
    one_call = [r for i in range(ingest.num_shards()) for r in rollout_table(ingest.read_shard(i), cfg, engine)[0].to_pylist()]
    assert one_call == traces


def test_thinking_budget_in_process(engine, teacher_dir, problems_file, tmp_path):
    """The tiny teacher writes `<think>\\na + b = c\\n</think>\\n\\boxed{c}` (~15 tokens): a budget of
    4 tokens cuts every trace inside its thinking."""
    data = toy_recipe(tmp_path / "run", str(teacher_dir), problems_file,
                      rollout={"max_think_tokens": 4, "forced_answer_tokens": 8, "force_answer_text": "\n</think>\n"},
                      ingest={"problems_per_shard": 25})
    recipe = load(data)
    runner = pipeline.Runner(recipe, engine)
    ingest = runner.run_ingest()
    sd = store.StageDir(tmp_path / "run", "rollout")
    sd.open("fp", {})
    rollout_shards(sd, ingest, list(range(ingest.num_shards())), recipe.rollout, engine)
    streamed = [r for i in range(ingest.num_shards()) for r in sd.read_shard(i).to_pylist()]
    forced = check_forced(streamed, recipe.rollout)
    assert len(forced) > 0.9 * len(streamed)
    assert sum("\\boxed" in t["answer_text"] for t in forced) > 0.5 * len(forced)  # it does answer
    one_call = [r for i in range(ingest.num_shards()) for r in rollout_table(ingest.read_shard(i), recipe.rollout, engine)[0].to_pylist()]
    assert [(t["trace_id"], t["text"], t["forced_answer"]) for t in one_call] == \
        [(t["trace_id"], t["text"], t["forced_answer"]) for t in streamed]
    runner.close()


def test_budget_must_leave_room_for_the_answer():
    from factory.stages.rollout import check_budget

    with pytest.raises(ValueError, match="max_think_tokens=4096 must be between 0 and rollout.max_tokens=4096"):
        check_budget(RolloutConfig(max_think_tokens=4096))
    with pytest.raises(ValueError, match="must close the think block"):
        check_budget(RolloutConfig(max_think_tokens=100, force_answer_text="Final answer:"))
    check_budget(RolloutConfig(max_think_tokens=100))
