"""executor=ray: the same recipe on a local Ray instance gives the local executor's products,
with a real vLLM replica and with simulated replicas; a run whose driver, or one of whose
replicas, is SIGKILLed at random moments resumes to the same products."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory import store
from factory.run import pipeline

from conftest import load, toy_recipe, write_jsonl
from test_continuous import TOKENIZER, products as run_products, recipe_data

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


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
    # float32 like the local side's engine (the `engine` fixture): on a CPU with native bf16 the
    # recipe's dtype auto would run the replica in bf16, and the traces would differ
    distributed = toy_recipe(tmp_path / "ray", str(teacher_dir), problems, engine={"dtype": "float32"})
    distributed.update(executor="ray", ray={"num_cpus": 2, "cpu_actors": 2, "engine_replicas": 1})
    try:
        manifest = pipeline.run(load(distributed), log=logs.append)
    finally:
        ray.shutdown()
    assert any("engine replica(s)" in m for m in logs) and any("grade: 3 shards on Ray" in m for m in logs)
    a, b = products(tmp_path / "local"), products(tmp_path / "ray")
    assert len(a["verdicts"]) == 30 * local["rollout"]["num_traces"]
    for key in a:
        assert a[key] == b[key], key
    assert manifest["stages"]["grade"]["out"] == 240


def sim_recipe(out: Path, problems: Path, executor: str, address: str | None = None, rate: int = 100) -> dict:
    """The simulated teacher in-process: 3 replicas of 8 slots on Ray, or one of 24 locally
    (traces of ~120 tokens at `rate` tok/s per slot: at 100 a rollout of ~20 s)."""
    data = recipe_data(out, "http://unused", problems)
    replicas = 3
    data["engine"] = {"backend": "sim", "model": "sim", "max_model_len": 2048,
                      "sim": {"slots": 8 if executor == "ray" else 8 * replicas, "rate": rate, "median": 120,
                              "sigma": 0.8, "tokenizer": str(TOKENIZER)}}
    data.update(executor=executor, ray={"address": address, "engine_replicas": replicas, "cpu_actors": 1})
    return data


def launch(recipe_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def partial_bytes(stage: Path) -> int:
    """Bytes in a stage's partial files; one sealed (removed) while this looks counts nothing."""
    total = 0
    for p in stage.glob("*.partial.jsonl"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def running_replicas() -> list[psutil.Process]:
    """The engine replica actors of this test's Ray instance (its processes are this process's
    descendants) that have started (Ray titles one still starting `ray::Replica.__init__`)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if (p.name().startswith("ray::Replica") and "__init__" not in p.name()
                    and p.status() != psutil.STATUS_ZOMBIE):  # a killed one Ray has not reaped yet
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_sigkill_of_the_driver_or_a_replica_resumes_to_the_local_products(tmp_path):
    """Simulated replicas on Ray: a run whose replicas are SIGKILLed 5 times at random moments
    finishes with the local executor's products (a dead replica's requests are re-sent); a run
    whose driver is SIGKILLed 5 times at random moments, then run again plainly, gives them too."""
    problems = tmp_path / "problems.jsonl"
    rng = random.Random(11)
    problems.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric"}) + "\n"
                                for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(60))))
    # the products do not depend on the simulated decode rate: the baseline runs 50x faster
    pipeline.run(load(sim_recipe(tmp_path / "local", problems, "local", rate=5000)), log=lambda m: None)
    expected = run_products(tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # every driver below joins this instance
    address = ray.get_runtime_context().gcs_address
    try:
        # replicas killed while the run goes on: Ray restarts them, the driver re-sends their requests
        out = tmp_path / "replica-kills"
        recipe_path = tmp_path / "replica-kills.yaml"
        # at 60 tok/s per slot the rollout takes ~33 s: five kills, each waiting for the last one's
        # restart (2-5 s on 2 cores), fall inside the stream (a kill after its end is not seen)
        recipe_path.write_text(yaml.safe_dump(sim_recipe(out, problems, "ray", address, rate=60)))
        proc, kills = launch(recipe_path), 0
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and kills < 5:
            while len(running_replicas()) < 3 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)  # the last one killed is back
            time.sleep(rng.uniform(0.5, 2.0))
            rollout = out / "stages" / "rollout"
            alive = running_replicas()
            streaming = any(rollout.glob("*.done")) or partial_bytes(rollout) > 0
            if alive and streaming and not (rollout / "_complete.json").exists():  # a kill before the stream is not a loss
                rng.choice(alive).send_signal(signal.SIGKILL)
                kills += 1
        assert proc.wait(timeout=300) == 0
        assert kills >= 5, kills
        replicas = json.loads((out / "stages" / "rollout" / "_complete.json").read_text())["replicas"]
        # the losses the fleet saw (one killed again before it answered after its restart counts once)
        assert sum(r["restarts"] for r in replicas) >= 3, replicas
        pipeline.run(load(sim_recipe(out, problems, "ray", address, rate=60)), log=lambda m: None)  # the plain re-run
        assert run_products(out) == expected

        # the driver killed at random moments (its replicas die with it), then a plain re-run
        out = tmp_path / "driver-kills"
        recipe_path = tmp_path / "driver-kills.yaml"
        recipe_path.write_text(yaml.safe_dump(sim_recipe(out, problems, "ray", address)))
        stages, kills = out / "stages", 0

        def progress():  # problems durable, shards sealed or graded
            return tuple((len(list(d.glob("*.done"))), partial_bytes(d))
                         for d in (stages / "rollout", stages / "grade"))

        for _ in range(8):
            if kills >= 5 or (stages / "grade" / "_complete.json").exists():
                break
            before = progress()
            proc = launch(recipe_path)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and progress() == before:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 1.5))  # a random moment once this launch has made progress
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        assert kills >= 5, kills
        pipeline.run(load(sim_recipe(out, problems, "ray", address)), log=lambda m: None)
        assert run_products(out) == expected
        trace_ids = [r["trace_id"] for r in store.StageDir(out, "rollout").read().to_pylist()]
        local_ids = [r["trace_id"] for r in store.StageDir(tmp_path / "local", "rollout").read().to_pylist()]
        assert len(trace_ids) == len(set(trace_ids)) and trace_ids == local_ids  # nothing lost or duplicated
        deadline = time.time() + 60  # the killed drivers' replicas died with them; the last run closed its own
        while running_replicas() and time.time() < deadline:
            time.sleep(0.5)
        assert not running_replicas()
    finally:
        ray.shutdown()


def test_requests_and_completions_cross_ray_whole():
    """The fleet's wire tuples carry every field of Sampling and Completion, in order: a field
    added to either dataclass and not to the wire fails here, not as a silently lost value."""
    from dataclasses import astuple, fields

    from factory.engines.base import Completion, Request, Sampling
    from factory.engines.fleet import unwire_request, wire_completion, wire_request

    r = Request("caller's key", [1, 2, 3], Sampling(n=3, temperature=0.7, top_p=0.9, max_tokens=77, seed=5,
                                                     stop=("</answer>",)))
    back = unwire_request(wire_request(41, r))
    assert back == Request(41, [1, 2, 3], r.sampling)
    assert len(wire_request(41, r)[2]) == len(fields(Sampling))
    c = Completion("text", 12, "length", error=None, max_tokens=30, forced_answer=True)
    assert wire_completion(c) == astuple(c) and len(wire_completion(c)) == len(fields(Completion))
    assert Completion(*wire_completion(c)) == c
