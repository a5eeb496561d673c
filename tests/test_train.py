"""`factory train` on the pipeline's own shards with a real tiny Qwen2: order, lengths, DPO, resume.

The student is the tiny addition model the session builds (conftest.teacher_dir); the data is
the toy run's curriculum and pairs (conftest.full_run). Each training takes seconds on a CPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from factory.training import train
from factory.training.curriculum import pacing_limits
from factory.store import write_json, write_parquet

ROOT = Path(__file__).resolve().parents[1]


def sft_recipe(out: Path, run_dir: Path, model: Path, *overrides: str) -> train.SFTRecipe:
    return train.load_recipe("sft", ROOT / "recipes" / "toy_addition_sft.yaml", [
        f"model.path={model}", f"data.run_dir={run_dir}", f"train.output_dir={out}", "data.order.epochs=1",
        *overrides])


def dpo_recipe(out: Path, run_dir: Path, policy: Path, *overrides: str) -> train.DPORecipe:
    return train.load_recipe("dpo", ROOT / "recipes" / "toy_addition_dpo.yaml", [
        f"model.path={policy}", f"dpo.ref_model={policy}", f"data.run_dir={run_dir}", f"train.output_dir={out}",
        *overrides])


def seen(out: Path, column: str = "trace_id") -> list[str]:
    return [i for rec in train.read_order(out) for i in rec[column]]


def curriculum(run_dir: Path) -> pa.Table:
    return train.read_run(str(run_dir), "sft")[0]


@pytest.fixture(scope="module")
def sft_sorted(tmp_path_factory, full_run, teacher_dir):
    out = tmp_path_factory.mktemp("sft") / "sorted"
    report = train.train("sft", sft_recipe(out, full_run[0], teacher_dir))
    return out, report


def test_sorted_sees_the_curriculum_in_order(sft_sorted, full_run):
    out, report = sft_sorted
    cur = curriculum(full_run[0])
    assert seen(out) == cur.column("trace_id").to_pylist()
    order = train.read_order(out)
    assert [r["step"] for r in order] == list(range(len(order)))  # one micro-batch per step here
    assert report["order"]["steps"] == len(order) == math.ceil(cur.num_rows / 16)
    # the run can be traced to its exact shards
    files = report["data"]["files"]
    assert [f["file"] for f in files] == [s["file"] for s in full_run[1]["curriculum"]]
    assert sum(f["rows"] for f in files) == cur.num_rows and all(len(f["sha256"]) == 64 for f in files)
    saved = json.loads((out / "factory_train.json").read_text())
    assert saved["recipe"]["data"]["order"]["strategy"] == "sorted"
    assert saved["trl_args"]["train_sampling_strategy"] == "sequential" and "torch" in saved["packages"]
    losses = [h["loss"] for h in saved["log_history"] if "loss" in h]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)


def test_sft_output_loads_in_vllm_and_evaluates(sft_sorted, tmp_path, problems_file):
    """`factory eval` on the SFT output, in its own process (a second vLLM engine)."""
    out, _ = sft_sorted
    lines = problems_file.read_text().splitlines()[:12]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    ev = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "factory.cli", "eval", str(ROOT / "recipes" / "toy_addition_eval.yaml"),
         f"engine.model={out}", f"run.output_dir={ev}", f"ingest.paths=[{small}]", "rollout.num_traces=4",
         "eval.k=[1,4]", "run.progress=false", "engine.enforce_eager=true"],  # eager: a faster start
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ev / "eval.json").read_text())
    assert result["model"] == str(out) and result["overall"]["problems"] == 12
    assert result["overall"]["samples"] == 48 and 0.0 <= result["overall"]["pass@1"] <= 1.0
    assert "pass@4" in proc.stdout and "maj@4" in proc.stdout


def test_shuffled_differs_and_too_long_rows_are_left_out(tmp_path, full_run, teacher_dir):
    cur = curriculum(full_run[0])
    probe = train.plan("sft", sft_recipe(tmp_path / "probe", full_run[0], teacher_dir), log=lambda m: None)
    limit = sorted(probe.lengths)[int(0.9 * len(probe.lengths))]  # cut the longest ~10%
    out = tmp_path / "shuffled"
    report = train.train("sft", sft_recipe(out, full_run[0], teacher_dir, "data.order.strategy=shuffled",
                                           f"data.max_length={limit}"))
    too_long = {cur.column("trace_id")[i].as_py() for i, n in enumerate(probe.lengths) if n > limit}
    assert too_long and report["lengths"]["too_long"] == len(too_long) and report["lengths"]["max_length"] == limit
    dropped = [json.loads(l) for l in (out / "dropped_too_long.jsonl").read_text().splitlines()]
    assert {d["trace_id"] for d in dropped} == too_long and all(d["tokens"] > limit for d in dropped)
    kept = [t for t in cur.column("trace_id").to_pylist() if t not in too_long]
    order = seen(out)
    assert sorted(order) == sorted(kept) and order != kept  # every kept row once, not in curriculum order
    with pytest.raises(ValueError, match=f"longer than data.max_length={limit}"):
        train.plan("sft", sft_recipe(out, full_run[0], teacher_dir, f"data.max_length={limit}",
                                     "data.on_too_long=error"), log=lambda m: None)


def test_staged_repeats_the_hard_stage(tmp_path, full_run, teacher_dir):
    cur = curriculum(full_run[0])
    out = tmp_path / "staged"
    train.train("sft", sft_recipe(out, full_run[0], teacher_dir, "data.order.strategy=staged",
                                  "data.order.stages=[{epochs: 1}, {min_difficulty: 0.5, epochs: 1}]"))
    ids, diff = cur.column("trace_id").to_pylist(), cur.column("difficulty").to_pylist()
    hard = [t for t, d in zip(ids, diff) if d >= 0.5]
    assert 0 < len(hard) < len(ids)
    assert seen(out) == ids + hard


def test_the_order_maps_onto_the_rows_trl_tokenized():
    kept, order = ["a", "b", "c"], [0, 1, 2, 2, 0, 1]
    assert train.in_order(kept, kept, order) == order  # each row tokenized once, then put in order
    # a row TRL dropped leaves the order; the others keep their places
    assert train.in_order(["a", "c"], kept, order) == [0, 1, 1, 0]


def test_pacing_draws_from_a_growing_easy_prefix(tmp_path, full_run, teacher_dir):
    cur = curriculum(full_run[0])
    rank = {t: i for i, t in enumerate(cur.column("trace_id").to_pylist())}
    diff = cur.column("difficulty").to_pylist()
    out = tmp_path / "pacing"
    recipe = sft_recipe(out, full_run[0], teacher_dir, "data.order.strategy=pacing", "data.order.epochs=2",
                        "data.order.initial_competence=0.2", "train.per_device_train_batch_size=8",
                        "train.gradient_accumulation_steps=2")
    train.train("sft", recipe)
    steps: dict[int, list[int]] = {}
    for rec in train.read_order(out):
        steps.setdefault(rec["step"], []).extend(rank[t] for t in rec["trace_id"])
    limits = pacing_limits(cur.num_rows, len(steps), 16, recipe.data.order)
    assert sum(len(v) for v in steps.values()) == 2 * cur.num_rows
    for s, ranks in steps.items():
        assert max(ranks) < limits[s], f"step {s} drew a row beyond the easiest {limits[s]}"
    assert limits[0] == math.ceil(0.2 * cur.num_rows) and limits[-1] == cur.num_rows
    first, last = steps[0], steps[len(steps) - 1]
    assert sum(diff[i] for i in first) / len(first) < sum(diff[i] for i in last) / len(last)


def test_loss_is_on_the_completion_only(tmp_path, full_run, teacher_dir):
    recipe = sft_recipe(tmp_path / "masks", full_run[0], teacher_dir)
    p = train.plan("sft", recipe, log=lambda m: None)
    trainer = train.build_trainer(recipe, p)
    row = trainer.train_dataset[0]
    prompt_ids = p.tokenizer.apply_chat_template(p.kept.column("prompt")[p.order[0]].as_py(), tokenize=False,
                                                 add_generation_prompt=True)
    n_prompt = len(p.tokenizer(prompt_ids, add_special_tokens=False)["input_ids"])
    labels = row["labels"]
    assert all(x == -100 for x in labels[:n_prompt]) and all(x != -100 for x in labels[n_prompt:])
    assert p.tokenizer.decode(row["input_ids"][n_prompt:]).startswith("<think>")


def test_rows_trl_drops_are_counted_and_listed(tmp_path, full_run, teacher_dir):
    """TRL drops a row its truncation leaves without a completion token; the plan's lengths keep
    that from happening, so here TRL is handed a shorter max_length than the plan measured."""
    recipe = sft_recipe(tmp_path / "short", full_run[0], teacher_dir)
    p = train.plan("sft", recipe, log=lambda m: None)
    ids = p.kept.column("trace_id").to_pylist()
    # the toy prompts are all as long: every third gets a longer question
    chats = [[{**m, "content": m["content"] + " Think it over."} if i % 3 == 0 and m["role"] == "user" else m
              for m in chat] for i, chat in enumerate(p.kept.column("prompt").to_pylist())]
    p.kept = p.kept.set_column(p.kept.schema.get_field_index("prompt"), "prompt",
                               pa.array(chats, type=p.kept.schema.field("prompt").type))
    prompts = [len(p.tokenizer(p.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]) for m in chats]
    cut = max(prompts)  # rows whose prompt alone fills max_length lose every label
    gone = {t for t, n in zip(ids, prompts) if n >= cut}
    assert 0 < len(gone) < len(ids)
    p.args.max_length = cut
    trainer = train.build_trainer(recipe, p)
    assert set(p.dropped_by_trl) == gone and p.report["lengths"]["dropped_by_trl"] == len(gone)
    assert not gone & set(trainer.train_dataset["trace_id"])
    (tmp_path / "short").mkdir(exist_ok=True)
    train.write_dropped(p, tmp_path / "short")
    listed = [json.loads(l) for l in (tmp_path / "short" / "dropped_too_long.jsonl").read_text().splitlines()]
    assert {d["trace_id"] for d in listed} == gone
    problem_of = dict(zip(ids, p.kept.column("problem_id").to_pylist()))
    assert all(d["problem_id"] == problem_of[d["trace_id"]] for d in listed)
    assert {d["drop_reason"] for d in listed} == {"no_completion_token_after_trl_truncation"}


def test_resume_continues_the_order(tmp_path, full_run, teacher_dir):
    """Stopped after 10 steps (with a checkpoint at 10), the re-run resumes and sees each row once."""
    out = tmp_path / "resumed"
    args = ["train.save_steps=5"]
    train.train("sft", sft_recipe(out, full_run[0], teacher_dir, *args, "train.extra={max_steps: 10}"))
    assert len(train.read_order(out)) == 10 and (out / "checkpoint-10").exists()
    report = train.train("sft", sft_recipe(out, full_run[0], teacher_dir, *args))
    assert report["resumed_from"].endswith("checkpoint-10")
    assert seen(out) == curriculum(full_run[0]).column("trace_id").to_pylist()


def mini_run(path: Path, pairs: pa.Table) -> Path:
    """A run directory holding only `pairs` (a fixed batch)."""
    write_parquet(pairs, path / "pairs" / "pairs-00000.parquet")
    write_json({"curriculum": [], "pairs": ["pairs/pairs-00000.parquet"]}, path / "manifest.json")
    return path


def test_dpo_loss_falls_on_a_fixed_batch(tmp_path, sft_sorted, full_run):
    policy = sft_sorted[0]
    pairs = pq.read_table(full_run[0] / "pairs" / "pairs-00000.parquet").slice(0, 4)
    run = mini_run(tmp_path / "run", pairs)
    out = tmp_path / "dpo"
    report = train.train("dpo", dpo_recipe(out, run, policy, "data.order.strategy=sorted", "data.order.epochs=8",
                                           "train.per_device_train_batch_size=4", "train.logging_steps=1",
                                           "train.learning_rate=2e-3"))
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    assert len(losses) == 8
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.1 and losses[-1] == min(losses)
    assert all(set(r["problem_id"]) == set(pairs.column("problem_id").to_pylist()) for r in train.read_order(out))


def test_dpo_on_the_pipeline_pairs_from_the_sft_output(tmp_path, sft_sorted, full_run):
    from transformers import AutoModelForCausalLM

    policy = sft_sorted[0]
    out = tmp_path / "dpo"
    report = train.train("dpo", dpo_recipe(out, full_run[0], policy))
    assert report["ref_model"] == str(policy)
    pairs = pq.read_table(full_run[0] / "pairs")  # every pairs-*.parquet shard
    assert sorted(seen(out, "chosen_trace_id")) == sorted(pairs.column("chosen_trace_id").to_pylist())
    before = AutoModelForCausalLM.from_pretrained(policy)
    after = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(a, b)]
    assert changed, "DPO saved the SFT weights unchanged"


@pytest.mark.parametrize("name", ["sft_qwen2.5-math-1.5b.yaml", "dpo_qwen2.5-math-1.5b.yaml"])
def test_gpu_recipes_dry_run_without_weights(name, full_run, teacher_dir):
    """The 1.5B recipes plan a run here: no weights exist on this machine (model.path is a hub name
    or a directory that isn't there), only a stand-in tokenizer to measure the toy data with."""
    kind = name[:3]
    recipe = train.load_recipe(kind, ROOT / "recipes" / name,
                               [f"data.run_dir={full_run[0]}", f"model.tokenizer={teacher_dir}"])
    assert not Path(recipe.model.path).exists()
    report = train.train(kind, recipe, dry_run=True, log=lambda m: None)
    args = report["trl_args"]
    assert args["bf16"] == "True" and args["gradient_checkpointing"] == "True"
    assert report["lengths"]["max_length"] >= 16384 and report["lengths"]["too_long"] == 0
    assert report["order"]["examples_per_step"] >= 16 and report["order"]["steps"] >= 1
    if kind == "sft":
        assert recipe.model.config_overrides["max_position_embeddings"] >= recipe.data.max_length
        assert recipe.data.order.strategy in ("shuffled", "sorted", "staged", "pacing", "replay", "hard_weighted")
    else:
        sft = train.load_recipe("sft", ROOT / "recipes" / "sft_qwen2.5-math-1.5b.yaml")
        assert recipe.model.path == recipe.dpo.ref_model == sft.train.output_dir  # DPO starts from the SFT output


def test_lora_adapters_are_merged_into_a_plain_model(tmp_path, full_run, teacher_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train.train("sft", sft_recipe(out, full_run[0], teacher_dir, "model.lora.enabled=true", "model.lora.r=4"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)  # a plain Qwen2 checkpoint, as vLLM wants
    base, tuned = AutoModelForCausalLM.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(out)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(base.named_parameters())[q], dict(tuned.named_parameters())[q])
