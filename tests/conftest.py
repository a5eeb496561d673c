"""Shared fixtures: a tiny teacher built here, and one vLLM engine for the whole session.

The engine takes 25-50 s to start on a CPU, so every test that generates shares it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import yaml

from factory import config as config_mod
from factory.run import pipeline
from factory.run.recipe import Recipe
from factory import tiny
from factory.engines import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return tiny.build_addition_teacher(tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture(scope="session")
def engine_config(teacher_dir) -> EngineConfig:
    # float32 on every machine: a learned-quality assertion must not hinge on whether this CPU has native bf16
    return EngineConfig(model=str(teacher_dir), max_model_len=256, cpu_kv_cache_space_gb=1, dtype="float32")


@pytest.fixture(scope="session")
def engine(engine_config):
    from factory.engines.inprocess import VLLMEngine

    eng = VLLMEngine(engine_config)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def problems_file(tmp_path_factory) -> Path:
    """The 100 toy additions shipped in data/, as the demo uses them."""
    return ROOT / "data" / "toy_addition" / "problems.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_recipe(out: Path, model: str, problems: Path, **sections) -> dict:
    data = yaml.safe_load((ROOT / "recipes" / "toy_addition.yaml").read_text())
    data["run"] = {"output_dir": str(out), "progress": False}
    data["engine"]["model"] = model
    # as the session engine: a run compared with another engine's must not hinge on this CPU's bf16
    data["engine"]["dtype"] = "float32"
    data["ingest"]["paths"] = [str(problems)]
    data["ingest"]["problems_per_shard"] = 10
    for section, values in sections.items():
        data[section].update(values)
    return data


def load(data: dict) -> Recipe:
    return config_mod.from_dict(Recipe, data)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, engine, teacher_dir, problems_file):
    out = tmp_path_factory.mktemp("run") / "full"
    manifest = pipeline.run(load(toy_recipe(out, str(teacher_dir), problems_file)), engine=engine)
    return out, manifest


STEP_COUNTS = (3, 5, 40, 80, 150, 220, 300)  # two that fit a 512-token PRM, five that do not


def long_traces(counts=STEP_COUNTS, seed: int = 0) -> list[dict]:
    """Demo-domain problems (short questions, levels 1-6) with R1-length reasoning of `counts`
    blank-line paragraphs each (arith.long_reasoning: the chain, then checked again and again):
    the 300-step one is ~10k tokens for the tiny tokenizers, 19x a 512-token PRM."""
    import random

    from factory.demo import arith

    rng = random.Random(seed)
    out = []
    for k, n in enumerate(counts):
        p = arith.make_problem(rng, 1 + k % 6)
        ops = [tuple(o) for o in p["chain"]["ops"]]
        out.append({**p, "reasoning": arith.long_reasoning(p["chain"]["start"], ops, n, rng)})
    return out


@contextlib.contextmanager
def simulated_teacher(*args: str):
    """factory.engines.simserver on a free loopback port with these command-line args; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "factory.engines.simserver", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/sim/stats")
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait()
