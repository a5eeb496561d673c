"""A teacher server that misbehaves: every fault a long job meets is retried until the answer
is whole, a re-run sends again what failed for good, and a run left with failures says so.

The simulated teacher (factory.engines.simserver) injects the faults deterministically per
request, so a faulty run's products can be compared with a fault-free run's exactly."""

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

from factory.engines import EngineConfig, Request, Sampling, ServerConfig, make_engine
from factory.engines.simserver import Faults
from factory.run import pipeline
from factory.run.recipe import EXIT_FAILED_REQUESTS
from factory.stages.rollout import RolloutConfig

from conftest import load, simulated_teacher
from test_continuous import TOKENIZER, products, recipe_data

ROOT = Path(__file__).resolve().parents[1]
EVERY_FAULT = ["500", "429", "drop", "cut", "html", "empty", "notext", "nousage"]


@pytest.fixture(scope="module")
def sim():
    """A simulated teacher whose faults each test sets (POST /sim/faults)."""
    with simulated_teacher("--slots", "64", "--rate", "400", "--median", "120", "--sigma", "0.8", "--max-model-len", "2048") as url:
        yield url


def set_faults(url: str, **faults) -> None:
    req = urllib.request.Request(url + "/sim/faults", data=json.dumps(faults).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()


def injected(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/sim/stats").read())["faults_injected"]


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "problems.jsonl"
    pairs = random.Random(11).sample([(a, b) for a in range(100) for b in range(100)], 64)  # 64 distinct problems
    path.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b), "domain": "numeric"}) + "\n"
                            for a, b in pairs))
    return path


def recipe(out: Path, url: str, problems: Path, **server) -> dict:
    data = recipe_data(out, url, problems, rollout={"num_traces": 8})
    data["engine"]["server"].update(max_concurrency=256, **server)
    return data


@pytest.fixture(scope="module")
def clean(sim, problems, tmp_path_factory) -> dict:
    """The fault-free run's products: what every recovered run must equal."""
    set_faults(sim)
    out = tmp_path_factory.mktemp("clean") / "run"
    manifest = pipeline.run(load(recipe(out, sim, problems)))
    assert manifest["stages"]["rollout"]["out"] == 512 and manifest["failed_requests"]["total"] == 0
    return products(out)


def test_fault_pick_is_deterministic_and_in_turn():
    f = Faults(classes=["500", "cut", "html"], first_tries=2)
    picks = [f.pick("req-a", t) for t in range(4)]
    assert picks[2:] == [None, None] and len(set(picks[:2])) == 2 and set(picks[:2]) <= {"500", "cut", "html"}
    assert picks == [f.pick("req-a", t) for t in range(4)]
    always = Faults(fail_share=0.5)
    keys = [f"r{i}" for i in range(200)]
    failing = [k for k in keys if always.pick(k, 0) == "500"]
    assert 70 < len(failing) < 130 and all(always.pick(k, 9) == "500" for k in failing)
    with pytest.raises(ValueError, match="unknown fault"):
        Faults(classes=["teapot"])


def test_every_fault_on_the_first_two_tries_loses_nothing(sim, problems, clean, tmp_path):
    """Each request fails its first two tries (a 5xx, a 429, a dropped connection, a 200 cut in
    half, an HTML page, no choices, choices without text, no usage), at default retry settings:
    nothing is lost and the products are the fault-free run's; the manifest counts the retries."""
    set_faults(sim, classes=EVERY_FAULT, first_tries=2)
    assert RolloutConfig().retry_failed and ServerConfig().max_retries == 5  # the defaults
    manifest = pipeline.run(load(recipe(tmp_path / "run", sim, problems)))
    got = products(tmp_path / "run")
    for name in clean:
        assert got[name] == clean[name], name
    retries = manifest["stages"]["rollout"]["retries"]
    assert sum(retries.values()) == 2 * 512  # every per-sample request, twice
    assert set(retries) == {"http_500", "http_429", "connection", "bad_json", "html", "too_few_choices", "no_text",
                            "no_usage"}
    assert manifest["failed_requests"] == {"total": 0, "by_stage": {}, "by_cause": {}}
    assert sum(injected(sim).values()) == 2 * 512
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    rollout = next(s for s in progress["stages_done"] if s["stage"] == "rollout")
    assert rollout["counts"]["retries"] == retries


def test_a_stall_past_the_timeout_is_retried(sim, tmp_path):
    set_faults(sim, classes=["stall"], first_tries=1, stall_s=3.0)
    cfg = EngineConfig(backend="server", model="sim", max_model_len=2048,
                       server=ServerConfig(base_url=sim + "/v1", tokenizer=str(TOKENIZER), timeout_s=1.0))
    engine = make_engine(cfg, tmp_path)
    requests = [Request(i, engine.tokenize([f"What is {i} + 2?"])[0], Sampling(n=2, max_tokens=100, seed=i))
                for i in range(4)]
    got = dict(engine.stream(requests))
    assert all(c.error is None and c.text for outs in got.values() for c in outs)
    assert engine.retries == {"timeout": 8} and not engine.failures
    set_faults(sim)


def run_cli(recipe_path: Path, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def test_permanent_failures_are_loud_and_a_rerun_recovers_them_through_kills(sim, problems, clean, tmp_path):
    """5% of requests always fail (max_retries 2): the run exits 3 and says how many, why and how
    to retry; status, card and difficulty rows show it. Then the server heals and a plain re-run,
    SIGKILLed at least 5 times on the way, sends only the failed samples: 0 failures left and the
    products are the fault-free run's."""
    set_faults(sim, fail_share=0.05)
    out = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(out, sim, problems, max_retries=2)))
    proc = run_cli(recipe_path)
    _, err = proc.communicate(timeout=600)
    manifest = json.loads((out / "manifest.json").read_text())
    failed = manifest["failed_requests"]
    assert proc.returncode == EXIT_FAILED_REQUESTS, err
    assert 0 < failed["total"] < 512 * 0.15 and failed["by_stage"] == {"rollout": failed["total"]}
    assert failed["by_cause"] == {"http_500": failed["total"]}
    assert manifest["stages"]["rollout"]["dropped"]["request_failed"] == failed["total"]
    assert manifest["stages"]["rollout"]["out"] + failed["total"] == 512
    assert f"FAILED REQUESTS: {failed['total']}" in err and f"factory run {recipe_path}" in err
    status = subprocess.run([sys.executable, "-m", "factory.cli", "status", str(out)], cwd=ROOT, capture_output=True,
                            text=True).stdout
    assert "finished with failed requests" in status and f"FAILED REQUESTS: {failed['total']}" in status
    assert f"Incomplete: {failed['total']:,} requests failed" in (out / "README.md").read_text()
    difficulty = pq.read_table(out / "difficulty.parquet").to_pylist()
    assert sum(r["num_failed"] for r in difficulty) <= failed["total"]  # a problem with all 8 failed has no row
    assert any(r["num_failed"] for r in difficulty) and all(r["num_traces"] + r["num_failed"] == 8 for r in difficulty)
    # allow_failures: the same state exits 0
    ok = run_cli(recipe_path, "run.allow_failures=true")
    ok.communicate(timeout=600)
    assert ok.returncode == 0

    set_faults(sim)  # the server is healthy again
    sent_before = json.loads(urllib.request.urlopen(sim + "/sim/stats").read())["requests"]
    rng, kills = random.Random(3), []
    # kill once the run has written something new in the target stage (rollout: a re-opened
    # shard's partial file or its seal; grade and curate: a redone shard), after a random delay
    for target in ["rollout"] * 3 + ["grade"] * 2 + ["curate"] * 2:
        launched = time.time()
        proc = run_cli(recipe_path)

        def reached() -> bool:
            d = out / "stages" / target
            files = d.glob("*") if target == "rollout" else d.glob("*.done")
            return any(f.stat().st_mtime > launched for f in files if f.exists())

        while proc.poll() is None and not reached() and time.time() - launched < 120:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3) if target == "rollout" else 0.0)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills.append(target)
        proc.wait()
    assert len(kills) >= 5 and "rollout" in kills, kills
    final = run_cli(recipe_path)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failed_requests"]["total"] == 0 and "request_failed" not in manifest["stages"]["rollout"]["dropped"]
    got = products(out)
    for name in clean:
        assert got[name] == clean[name], name
    # only the failed samples went out again (kills may repeat a few in flight, never the whole run)
    resent = json.loads(urllib.request.urlopen(sim + "/sim/stats").read())["requests"] - sent_before
    assert failed["total"] <= resent < 512 // 2, resent


def test_rewrite_judge_and_thinking_budget_recover_their_failures(sim, tmp_path):
    """Every stage that sends requests: rewrite (the rewriter and its check), rollout under a
    thinking budget (a failed first phase or continuation), the judge. 30% of requests
    fail at once (max_retries 0); after the server heals, a plain re-run leaves no failure and
    gives the products of a run that never met one."""
    pairs = random.Random(5).sample([(a, b) for a in range(50) for b in range(50)], 24)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b),
                                            "domain": "numeric"}) + "\n" for a, b in pairs))

    def data(out: Path) -> dict:
        d = recipe(out, sim, problems, max_retries=0)
        d["rewrite"] = {"modes": ["paraphrase", "variant"], "per_problem": 1, "check_samples": 4, "max_tokens": 64,
                        "min_agreement": 0.5}
        d["rollout"].update(num_traces=4, max_think_tokens=60, forced_answer_tokens=16)
        d["judge"] = {"verdicts": ["wrong"], "require_answer_part": False}
        return d

    set_faults(sim)
    pipeline.run(load(data(tmp_path / "clean")))
    expected = products(tmp_path / "clean")
    set_faults(sim, fail_share=0.3)
    first = pipeline.run(load(data(tmp_path / "run")))
    failed = first["failed_requests"]
    assert {"rewrite", "rollout", "judge"} <= set(failed["by_stage"]), failed
    assert failed["by_cause"] == {"http_500": failed["total"]}, failed  # the judge's failures have their cause too
    set_faults(sim)
    again = pipeline.run(load(data(tmp_path / "run")))
    assert again["failed_requests"]["total"] == 0, again["failed_requests"]
    got = products(tmp_path / "run")
    for name in expected:
        assert got[name] == expected[name], name
    def traces(run: str) -> list[tuple]:
        return [(r["trace_id"], r["text"], r["forced_answer"]) for f in sorted((tmp_path / run / "stages" / "rollout").glob(
            "shard-*.parquet")) for r in pq.read_table(f).to_pylist()]

    assert traces("run") == traces("clean") and any(forced for _, _, forced in traces("run"))
    assert again["stages"]["rewrite"]["rewrites"] == pipeline.run(load(data(tmp_path / "clean")))["stages"]["rewrite"]["rewrites"]
