"""The top-up stage (difficulty-aware sampling) against the simulated teacher server, whose
per-problem pass rates spread over [0, 1) and whose traces are deterministic in (prompt, seed):
more samples go only to problems in the band, their first-K pass rates stay as without a top-up,
the extra correct traces reach the curriculum marked with their wave, the tokens are counted
apart, and a run SIGKILLed in the top-up resumes to the uninterrupted run's products. One test
runs the stage on the in-process vLLM engine too."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory import store
from factory.run import pipeline
from factory.stages import grade
from factory.stages.rollout import RolloutConfig, rollout_table
from factory.engines import make_engine
from factory.run.topup_stream import topup_shards
from factory.stages.topup import TopupConfig, topup_table

from conftest import load
from test_continuous import ROOT, products, recipe_data, sim  # noqa: F401  (sim: the fixture)
from test_faults import set_faults

TOPUP = {"min_pass_rate": 0.0, "max_pass_rate": 0.5, "target_correct": 3, "wave_size": 4, "max_samples": 16}


def problems_file(path: Path, n: int = 40) -> Path:
    rng = random.Random(11)
    path.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric"})
                            + "\n" for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(n))))
    return path


def with_topup(out: Path, url: str, problems: Path) -> dict:
    data = recipe_data(out, url, problems)
    data["topup"] = dict(TOPUP)
    return data


def test_topup_samples_only_the_band_and_keeps_first_k_pass_rates(sim, tmp_path):  # noqa: F811
    problems = problems_file(tmp_path / "problems.jsonl")
    plain, topped = tmp_path / "plain", tmp_path / "topped"
    pipeline.run(load(recipe_data(plain, sim, problems)), log=lambda m: None)
    manifest = pipeline.run(load(with_topup(topped, sim, problems)), log=lambda m: None)
    before = {r["problem_id"]: r for r in pq.read_table(plain / "difficulty.parquet").to_pylist()}
    after = {r["problem_id"]: r for r in pq.read_table(topped / "difficulty.parquet").to_pylist()}
    assert before.keys() == after.keys()
    band = {pid for pid, r in before.items() if 0 < r["pass_rate"] <= 0.5}
    assert 3 <= len(band) < len(before)  # the sim's pass rates leave problems on both sides
    for pid, r in after.items():
        # difficulty is the first K traces' whatever the top-up added
        assert (r["num_traces"], r["num_correct"], r["pass_rate"], r["difficulty"]) == \
            (before[pid]["num_traces"], before[pid]["num_correct"], before[pid]["pass_rate"], before[pid]["difficulty"])
        if pid not in band:
            assert r["topup_traces"] == 0, pid
            continue
        assert r["topup_traces"] > 0 and r["topup_traces"] % TOPUP["wave_size"] == 0
        total_correct = r["num_correct"] + r["topup_correct"]
        samples = r["num_traces"] + r["topup_traces"]
        # waves stop at the target, or when the next wave would pass the cap
        assert total_correct >= TOPUP["target_correct"] or samples + TOPUP["wave_size"] > TOPUP["max_samples"]
        assert total_correct - TOPUP["target_correct"] < TOPUP["wave_size"]  # no wave after the target was met
    traces = store.StageDir(topped, "topup").read().to_pylist()
    first = [t for t in traces if t["topup_wave"] == 0]
    assert len(first) == len(store.StageDir(plain, "grade").read())  # every rollout trace kept, as wave 0
    extra = [t for t in traces if t["topup_wave"] >= 1]
    assert {t["problem_id"] for t in extra} == band
    assert len({t["trace_id"] for t in traces}) == len(traces)
    assert all(t["sample_index"] >= 4 for t in extra)  # continues after the first K = 4
    # the extra correct traces reach SFT rows and pairs, marked with their wave
    cur = [r for s in manifest["curriculum"] for r in pq.read_table(topped / s["file"]).to_pylist()]
    assert any(r["topup_wave"] >= 1 for r in cur) and all(r["topup_wave"] is not None for r in cur)
    assert all(r["problem_id"] in band for r in cur if r["topup_wave"] >= 1)
    pairs = [r for f in manifest["pairs"] for r in pq.read_table(topped / f).to_pylist()]
    assert any(r["chosen_topup_wave"] >= 1 for r in pairs)
    # its tokens are counted apart from the rollout's, in the manifest and the card
    t, st = manifest["tokens"], manifest["stages"]
    assert t["topup"]["completion"] == st["topup"]["generated_tokens"] > 0
    assert t["completion"] == st["rollout"]["generated_tokens"] + st["topup"]["generated_tokens"]
    assert st["topup"]["topup"]["in_band"] == len(band) and st["topup"]["topup"]["traces"] == len(extra)
    card = (topped / "README.md").read_text()
    assert "of which the top-up" in card and f"{st['topup']['generated_tokens']:,} tokens" in card


def test_streamed_waves_give_the_per_shard_stage(sim, tmp_path):  # noqa: F811
    """The pipeline streams every shard's waves through one Engine.stream; each shard it wrote is
    the one `topup_table` makes of the same graded shard with one engine call per wave: the same
    traces in the same order, the same rejected rows, counts and tokens. Some samples fail for
    good (the server answers 500 to a share of requests), so the rejected rows' order is checked."""
    problems = problems_file(tmp_path / "problems.jsonl", 36)
    out = tmp_path / "run"
    data = with_topup(out, sim, problems)
    data["engine"]["server"]["max_retries"] = 1
    recipe = load(data)
    set_faults(sim, fail_share=0.1)
    try:
        pipeline.run(recipe, log=lambda m: None)
        graded, topped = store.StageDir(out, "grade"), store.StageDir(out, "topup")
        engine = make_engine(recipe.engine, str(tmp_path / "reference"))  # its own journal: no answers reused
        pool = grade.make_pool(recipe.grade)
        try:
            waves, failed = 0, 0
            for i in range(graded.num_shards()):
                want, rejected, stats = topup_table(graded.read_shard(i), recipe.topup, recipe.rollout, engine,
                                                    recipe.grade, pool)
                assert topped.read_shard(i).to_pylist() == want.to_pylist(), i
                assert pq.read_table(topped.rejected_shard(i)).to_pylist() == rejected.to_pylist(), i
                got = topped.stats(i)
                assert "driver_cpu_seconds" in got  # written by the stream (topup_table's stats have none)
                assert got["topup"] == stats["topup"], i
                assert (got["generated_tokens"], got["prompt_tokens"]) == (stats["generated_tokens"], stats["prompt_tokens"])
                waves += stats["topup"].get("wave_2", 0)
                failed += rejected.num_rows
        finally:
            pool.close()
    finally:
        set_faults(sim, fail_share=0.0)
    assert waves > 0 and failed > 0  # problems went through more than one wave; some samples failed


def test_sigkill_in_the_topup_resumes_to_the_same_products(sim, tmp_path):  # noqa: F811
    problems = problems_file(tmp_path / "problems.jsonl", 60)
    clean = tmp_path / "clean"
    pipeline.run(load(with_topup(clean, sim, problems)), log=lambda m: None)
    expected = products(clean)

    out = tmp_path / "killed"
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(with_topup(out, sim, problems)))
    topup = out / "stages" / "topup"
    rng, killed = random.Random(3), 0
    for _ in range(6):
        if (topup / "_complete.json").exists():
            break
        before = len(list(topup.glob("*.done"))) if topup.exists() else -1
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and \
                not (topup.exists() and len(list(topup.glob("*.done"))) != before):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.5))  # somewhere inside the next shard's waves
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 3
    pipeline.run(load(with_topup(out, sim, problems)), log=lambda m: None)
    got = products(out)
    for name in expected:
        assert got[name] == expected[name], name
    ids = [t["trace_id"] for t in store.StageDir(out, "topup").read().to_pylist()]
    assert len(ids) == len(set(ids))


def test_topup_on_the_in_process_engine(engine, tmp_path):
    """The same stage on vLLM in this process (the session's tiny addition teacher), graded in the
    grade stage's pool: only in-band problems get waves, and a second call gives the same traces."""
    rows = [{"problem_id": f"p{i}", "question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric",
             "source": "toy_addition", "split": "train"}
            for i, (a, b) in enumerate([(3, 4), (5, 2), (9, 9), (7, 8), (1, 6), (8, 6), (0, 0), (9, 1)])]
    from factory import schema

    rollout = RolloutConfig(num_traces=4, temperature=1.0, top_p=1.0, max_tokens=48, question_template="{question}")
    cfg = grade.GradeConfig(workers=1)
    pool = grade.make_pool(cfg)
    try:
        traces, _, _ = rollout_table(schema.table(rows, schema.PROBLEMS), rollout, engine)
        graded = grade.grade_table(traces, cfg, pool)
        band = TopupConfig(min_pass_rate=0.0, max_pass_rate=1.0, target_correct=6, wave_size=4, max_samples=12)
        out, rejected, stats = topup_table(graded, band, rollout, engine, cfg, pool)
        again, _, _ = topup_table(graded, band, rollout, engine, cfg, pool)
        # the same waves streamed through the engine's own stream (the pipeline's path)
        up = store.StageDir(tmp_path, "grade")
        up.write_shard(0, graded, schema.table([], schema.REJECTED), {})
        up.finish(1, {})
        streamed = store.StageDir(tmp_path, "topup")
        topup_shards(streamed, up, [0], band, rollout, cfg, engine, pool)
    finally:
        pool.close()
    correct = {}
    for t in graded.to_pylist():
        correct[t["problem_id"]] = correct.get(t["problem_id"], 0) + (t["verdict"] == "correct")
    extra = [t for t in out.to_pylist() if t["topup_wave"] >= 1]
    assert {t["problem_id"] for t in extra} == {p for p, c in correct.items() if c > 0}  # no wave for 0 of 4
    assert stats["generated_tokens"] == sum(t["num_tokens"] for t in extra) > 0
    assert rejected.num_rows == 0
    assert [(t["trace_id"], t["text"]) for t in out.to_pylist()] == [(t["trace_id"], t["text"]) for t in again.to_pylist()]
    assert streamed.read_shard(0).to_pylist() == out.to_pylist()
    assert streamed.stats(0)["topup"] == stats["topup"]
