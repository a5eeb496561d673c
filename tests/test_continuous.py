"""Continuous rollout and streaming curate against the simulated teacher server (deterministic
in prompt and seed, so products can be compared exactly): same products as one engine call per
shard, per-problem durability, and a run SIGKILLed at random moments in every stage that
resumes to the uninterrupted run's products."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory import config as config_mod
from factory.run import pipeline
from factory import store
from factory.run.continuous import PartialLog
from factory.engines import Completion, EngineConfig, ServerConfig, make_engine
from factory.stages.rollout import RolloutConfig, rollout_table

from conftest import load, simulated_teacher

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "demo" / "teacher"  # shipped: renders the chat prompt, counts prompt tokens


@pytest.fixture(scope="module")
def sim():
    """A 32-slot simulated teacher: traces of ~120 tokens (lognormal, sigma 0.8) at 200 tok/s per slot."""
    with simulated_teacher("--slots", "32", "--rate", "200", "--median", "120", "--sigma", "0.8", "--max-model-len", "2048") as url:
        yield url


def recipe_data(out: Path, url: str, problems: Path, **over) -> dict:
    data = {
        "run": {"output_dir": str(out), "progress": False},
        "engine": {"backend": "server", "model": "sim", "max_model_len": 2048,
                   "server": {"base_url": url + "/v1", "tokenizer": str(TOKENIZER), "max_concurrency": 48}},
        "ingest": {"paths": [str(problems)], "problems_per_shard": 6},
        "rollout": {"num_traces": 4, "max_tokens": 400, "question_template": "{question}"},
        "grade": {"workers": 1, "timeout_s": 5},
        "curate": {"max_traces_per_problem": 2, "rows_per_shard": 7, "pairs_per_problem": 2},
    }
    for section, values in over.items():
        data[section].update(values)
    return data


def products(run: Path) -> dict:
    """Everything a user reads from a run, in file order, with run-specific paths and timings left out."""
    m = json.loads((run / "manifest.json").read_text())
    rows = lambda files: [r for f in files for r in pq.read_table(run / f).to_pylist()]  # noqa: E731
    rejected = sorted((r["stage"], r["drop_reason"], r["trace_id"] or "", r["problem_id"] or "", r["detail"] or "")
                      for f in sorted((run / "rejected").glob("*/*.parquet")) for r in pq.read_table(f).to_pylist())
    return {"curriculum": rows([s["file"] for s in m["curriculum"]]), "pairs": rows(m["pairs"]),
            "difficulty": pq.read_table(run / "difficulty.parquet").to_pylist(), "rejected": rejected,
            "counts": {k: (v["in"], v["out"], v["dropped"]) for k, v in m["stages"].items()}}


def test_partial_log_survives_a_cut_line(tmp_path):
    log = PartialLog(tmp_path / "p.jsonl")
    log.append("a", [Completion("x", 1, "stop")])
    log.close()
    with open(tmp_path / "p.jsonl", "ab") as f:
        f.write(b'{"problem_id": "b", "compl')  # a kill in the middle of a write
    log = PartialLog(tmp_path / "p.jsonl")
    log.append("c", [Completion("y", 2, "length", None, 7)])
    log.close()
    got = log.read()
    assert set(got) == {"a", "c"} and got["c"][0] == Completion("y", 2, "length", None, 7)
    # a failed request: durable for sealing, re-sent by a resumed run, replaced when it succeeds
    log.append("d", [Completion("", 0, "error", "HTTP 500")])
    log.close()
    assert "d" in log.read() and "d" not in log.read(with_failures=False)
    log.append("d", [Completion("z", 3, "stop")])
    log.close()
    assert log.read()["d"][0].text == "z" and log.read(with_failures=False)["d"][0].text == "z"


def test_merge_sorted_bounds_its_open_files(tmp_path):
    """More inputs than the fan-in: merged through runs, the order is a full sort (ties: file order)."""
    import pyarrow as pa

    rng, files, everything = random.Random(0), [], []
    for i in range(11):
        rows = sorted(({"k": rng.randrange(20), "src": i, "pos": j} for j in range(rng.randrange(0, 9))),
                      key=lambda r: r["k"])
        rows = [{**r, "pos": j} for j, r in enumerate(rows)]
        everything += rows
        f = tmp_path / f"in-{i}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("k", pa.int64()), ("src", pa.int64()), ("pos", pa.int64())])), f)
        files.append(f)
    out = []
    store.merge_sorted(files, lambda r: r["k"], out.append, tmp_path / "scratch", fan_in=3)
    assert out == sorted(everything, key=lambda r: (r["k"], r["src"], r["pos"]))
    assert not (tmp_path / "scratch").exists()


def test_stream_equals_one_call_per_shard_and_shrinks_budgets(sim, tmp_path):
    """The continuous run's traces are the per-shard path's (the Ray executor's unit), row for row;
    a request whose prompt + max_tokens overflow the server's context gets the budget that fits."""
    problems = ROOT / "data" / "toy_addition" / "problems.jsonl"
    data = recipe_data(tmp_path / "run", sim, problems)
    manifest = pipeline.run(load(data))
    ro = manifest["stages"]["rollout"]
    assert ro["out"] == 400 and ro["driver_cpu_seconds"] > 0
    streamed = store.StageDir(tmp_path / "run", "rollout")
    problems_sd = store.StageDir(tmp_path / "run", "ingest")
    engine = make_engine(config_mod.from_dict(EngineConfig, data["engine"]), tmp_path)
    cfg = config_mod.from_dict(RolloutConfig, data["rollout"])
    for i in range(problems_sd.num_shards()):
        one_call, _, _ = rollout_table(problems_sd.read_shard(i), cfg, engine)
        assert one_call.to_pylist() == streamed.read_shard(i).to_pylist()
    assert not list(streamed.path.glob("*.partial.jsonl"))  # sealed shards leave no partial file

    # the server's context (2048) is shorter than the local config believes: 400, then the budget that fits
    big = ServerConfig(base_url=sim + "/v1", tokenizer=str(TOKENIZER))
    wide = make_engine(EngineConfig(backend="server", model="sim", max_model_len=100_000, server=big), tmp_path / "w")
    from factory.engines import Request, Sampling

    (key, outs), = list(wide.stream([Request("q", wide.tokenize(["What is 1 + 2?"])[0], Sampling(n=2, max_tokens=5000, seed=3))]))
    assert key == "q" and all(c.error is None and c.max_tokens is not None and c.max_tokens < 2048 for c in outs)
    assert all(c.num_tokens <= c.max_tokens for c in outs)


def test_sigkill_at_random_moments_resumes_to_the_same_products(sim, tmp_path):
    """At least 10 SIGKILLs spread over rollout, grade, curate and the end of the run, each followed
    by a plain re-run: the products equal an uninterrupted run's, nothing lost or duplicated."""
    problems = tmp_path / "problems.jsonl"
    rng = random.Random(7)
    problems.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric"}) + "\n"
                                for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(60))))
    clean = tmp_path / "clean"
    pipeline.run(load(recipe_data(clean, sim, problems)))
    expected = products(clean)

    out = tmp_path / "killed"
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_data(out, sim, problems)))
    stages = out / "stages"
    # where to kill: once the stage has made progress since this launch, after a random delay
    def progress(stage: str):
        d = stages / stage
        return (len(list(d.glob("*.done"))), sum(p.stat().st_size for p in d.glob("*.partial.jsonl")),
                (d / "_complete.json").exists())

    plan = ["rollout"] * 5 + ["grade"] * 3 + ["curate"] * 2 + ["end"] * 2
    killed_in = []
    for target in plan:
        stage = "curate" if target == "end" else target
        before = progress(stage) if (stages / stage).exists() else None
        if before and before[2]:
            continue  # that stage already finished
        proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120

        def reached() -> bool:
            if not (stages / stage).exists():
                return False
            now = progress(stage)
            return now[2] if target == "end" else now != before

        while proc.poll() is None and not reached() and time.time() < deadline:
            time.sleep(0.005)
        if target == "rollout":  # a random moment inside the stream; grade and curate shards are quick
            time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_in.append(target)
        proc.wait()
    assert len(killed_in) >= 10, killed_in
    pipeline.run(load(recipe_data(out, sim, problems)))
    got = products(out)
    for name in expected:
        assert got[name] == expected[name], name
    trace_ids = [r["trace_id"] for r in store.StageDir(out, "rollout").read().to_pylist()]
    assert len(trace_ids) == len(set(trace_ids)) == 60 * 4


def test_server_generate_journals_and_resends_nothing_twice(sim, tmp_path):
    """`generate` (rewrite, PRM labels) journals every sample; a new engine on the same journal
    (a resumed run) answers from it without sending; a cut last line is re-sent, not misread."""
    from factory.engines import Sampling

    cfg = EngineConfig(backend="server", model="sim", max_model_len=2048,
                       server=ServerConfig(base_url=sim + "/v1", tokenizer=str(TOKENIZER)))
    prompts, sampling = ["What is 2 + 3?", "What is 4 + 4?"], [Sampling(n=3, max_tokens=300, seed=s) for s in (1, 2)]
    first = make_engine(cfg, tmp_path)
    got = first.generate(prompts, sampling)
    first.close()
    assert first.sent == 6 and all(c.error is None and c.text for outs in got for c in outs)
    journal = tmp_path / "server_journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    again = make_engine(cfg, tmp_path)
    assert again.generate(prompts, sampling) == got and again.sent == 0
    again.close()
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # a kill in the middle of the last line
    third = make_engine(cfg, tmp_path)
    assert third.generate(prompts, sampling) == got and third.sent == 1
    third.close()
