"""executor=ray: the same recipe on a local Ray instance gives the local executor's products."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.run import pipeline

from conftest import load, toy_recipe, write_jsonl

ray = pytest.importorskip("ray")


def products(run) -> dict:
    def read(pattern):
        return pa.concat_tables(pq.read_table(p) for p in sorted(run.glob(pattern))).to_pylist()

    graded = read("stages/grade/shard-*.parquet")
    return {
        "curriculum": [(r["problem_id"], r["trace_id"], r["difficulty"]) for r in read("curriculum/*.parquet")],
        "pairs": [(r["problem_id"], r["chosen_trace_id"], r["rejected_trace_id"], r["rejected_verdict"])
                  for r in read("pairs/*.parquet")],
        "verdicts": [(r["trace_id"], r["verdict"], r["text"]) for r in graded],
        "rejected": sorted((r["stage"], r["drop_reason"], r["trace_id"] or r["problem_id"]) for r in read("rejected/*/*.parquet")),
    }


def test_ray_executor_matches_local(tmp_path, engine, teacher_dir, problems_file):
    rows = [json.loads(line) for line in problems_file.read_text().splitlines()][:30]
    problems = write_jsonl(tmp_path / "problems.jsonl", rows)
    local = toy_recipe(tmp_path / "local", str(teacher_dir), problems)
    pipeline.run(load(local), engine=engine, log=lambda m: None)

    logs = []
    distributed = toy_recipe(tmp_path / "ray", str(teacher_dir), problems)
    distributed.update(executor="ray", ray={"num_cpus": 2, "cpu_actors": 2, "engine_replicas": 1})
    try:
        manifest = pipeline.run(load(distributed), log=logs.append)
    finally:
        ray.shutdown()
    assert any("rollout: 3 shards on Ray" in m for m in logs) and any("grade: 3 shards on Ray" in m for m in logs)
    a, b = products(tmp_path / "local"), products(tmp_path / "ray")
    assert len(a["verdicts"]) == 30 * local["rollout"]["num_traces"]
    for key in a:
        assert a[key] == b[key], key
    assert manifest["stages"]["grade"]["out"] == 240
