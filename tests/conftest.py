"""Shared fixtures: a tiny teacher built here, and one vLLM engine for the whole session.

The engine takes 25-50 s to start on a CPU, so every test that generates shares it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory import tiny
from factory.engine import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return tiny.build_addition_teacher(tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture(scope="session")
def engine_config(teacher_dir) -> EngineConfig:
    return EngineConfig(model=str(teacher_dir), max_model_len=256, cpu_kv_cache_space_gb=1)


@pytest.fixture(scope="session")
def engine(engine_config):
    from factory.engine import VLLMEngine

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
