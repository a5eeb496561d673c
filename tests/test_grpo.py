"""GRPO on the factory's rule rewards: the rewards are the grade stage's verdicts, the prompts
leave out what a group cannot learn from, and TRL's trainer runs on a factory run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from factory import schema
from factory.stages.grade import GradeConfig, grade_table, make_pool
from factory.training import grpo

ROOT = Path(__file__).resolve().parents[1]

# (completion, reference, domain): correct, wrong, no answer, bad format, each kind of miss
COMPLETIONS = [
    ("<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}", "7", "numeric"),            # correct, R1 format
    ("<think>\n3 + 4 = 8\n</think>\n\n\\boxed{8}", "7", "numeric"),            # wrong
    ("<think>\n3 + 4 = 7\n</think>\n\nI am not sure.", "7", "numeric"),        # no answer
    ("\\boxed{7}", "7", "numeric"),                                              # correct, no think: bad format
    ("<think>\n3 + 4 is seven \\boxed{7}", "7", "numeric"),                     # think never closed: boxed counts, format not
    ("<think>\nhalf of one\n</think>\n\nThe answer is $\\frac{1}{2}$.", "0.5", "math"),  # correct, math domain
    ("<think>\nx\n</think>\n\n\\boxed{\\frac{1}{3}}", "0.5", "math"),           # wrong, math domain
    ("<think>\n</think>\n\n\\boxed{7}", "7", "numeric"),                         # empty reasoning: bad format
]


def graded_table():
    base = {"problem_id": "p", "choices": None, "source": "t", "split": "train", "question": "q",
            "sample_index": 0, "num_tokens": 1, "truncated": False}
    rows = [{**base, "trace_id": f"t{i}", "text": t, "answer": a, "domain": d} for i, (t, a, d) in enumerate(COMPLETIONS)]
    return schema.table(rows, schema.TRACES)


def test_rewards_are_the_grade_stage_verdict_and_format():
    cfg = GradeConfig(workers=1)
    with make_pool(cfg) as pool:
        graded = grade_table(graded_table(), cfg, pool).to_pylist()
        rewards = grpo.Rewards(cfg, pool)
        texts, refs, domains = zip(*COMPLETIONS)
        choices = [None] * len(texts)
        as_text = rewards.accuracy(list(texts), answer=list(refs), domain=list(domains), choices=choices)
        chat = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational completions
        as_chat = rewards.accuracy(chat, answer=list(refs), domain=list(domains), choices=choices, trainer_state=None)
        fmt = rewards.format(chat)
    verdicts = [g["verdict"] for g in graded]
    assert verdicts == ["correct", "wrong", "no_answer", "correct", "correct", "correct", "wrong", "correct"]
    assert as_text == as_chat == [1.0 if v == "correct" else 0.0 for v in verdicts]
    assert fmt == [1.0 if g["format_ok"] else 0.0 for g in graded] == [1, 1, 1, 0, 0, 1, 1, 0]


def problems(rows):
    base = {"question": "q", "answer": "1", "domain": "numeric", "choices": None, "level": 1,
            "num_traces": 8, "unverifiable": False, "split": "train"}
    return pa.Table.from_pylist([{**base, "problem_id": f"p{i}", "pass_rate": r.pop("pass_rate"),
                                  "difficulty": 0.0, **r} for i, r in enumerate(rows)])


def test_prompts_leave_out_all_solved_none_solved_and_unverifiable_problems():
    table = problems([{"pass_rate": 1.0}, {"pass_rate": 0.0}, {"pass_rate": 0.5}, {"pass_rate": 0.125},
                      {"pass_rate": 0.5, "unverifiable": True}, {"pass_rate": 0.5, "split": "test"}])
    kept, left_out = grpo.select_problems(table, grpo.GRPOData())
    assert kept["problem_id"].to_pylist() == ["p2", "p3"]
    assert left_out == {"split": 1, "unverifiable": 1, "all_solved": 1, "none_solved": 1}
    kept, left_out = grpo.select_problems(table, grpo.GRPOData(keep_all_solved=True, keep_none_solved=True))
    assert kept["problem_id"].to_pylist() == ["p0", "p1", "p2", "p3"]  # unverifiable never reaches RL
    assert left_out["unverifiable"] == 1


def tiny_grpo(run_dir, teacher_dir, out, *overrides: str) -> grpo.GRPORecipe:
    """Two steps of 2 prompts x 4 completions of the tiny teacher on a test run."""
    return grpo.load_recipe(None, [
        f"model.path={teacher_dir}", f"data.run_dir={run_dir}", f"train.output_dir={out}",
        "train.learning_rate=1e-4", "train.per_device_train_batch_size=8", "train.logging_steps=1",
        "train.save_steps=100000", "train.extra={max_steps: 2}", "grpo.num_generations=4",
        "grpo.max_completion_length=48", "grade.workers=1", *overrides])


def test_grpo_trains_a_student_on_a_run(full_run, teacher_dir, tmp_path):
    run_dir, _ = full_run
    out = tmp_path / "grpo"
    recipe = tiny_grpo(run_dir, teacher_dir, out)
    report = grpo.train(recipe, log=lambda m: None)
    prompts = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and report["prompts"]["per_step"] == 2 and report["prompts"]["steps"] == 2
    rates = [p["pass_rate"] for p in prompts]
    assert all(0 < r < 1 for r in rates) and rates == sorted(rates, reverse=True)  # easy -> hard, none solved-by-all
    history = report["reward_history"]
    assert [h["step"] for h in history] == [1, 2]
    assert all(0 <= h["accuracy"] <= 1 and 0 <= h["format"] <= 1 and 0 <= h["zero_advantage_groups"] <= 1 for h in history)
    saved = json.loads((out / "factory_train.json").read_text())
    assert saved["reward_history"] == history and saved["recipe"]["reward"] == {"accuracy": 1.0, "format": 0.5}
    from transformers import AutoModelForCausalLM

    before, after = AutoModelForCausalLM.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_gpu_grpo_recipe_dry_run(full_run):
    recipe = grpo.load_recipe(ROOT / "recipes" / "grpo_qwen2.5-math-1.5b.yaml", [f"data.run_dir={full_run[0]}"])
    assert not Path(recipe.model.path).exists()  # no 1.5B weights here: the plan loads none
    report = grpo.train(recipe, dry_run=True, log=lambda m: None)
    args = report["trl_args"]
    assert args["use_vllm"] == "True" and args["bf16"] == "True" and args["vllm_mode"] == "colocate"
    assert float(args["beta"]) == recipe.grpo.beta and args["reward_weights"] == str([1.0, recipe.reward.format])
    assert report["prompts"]["selected"] >= 1 and report["prompts"]["steps"] >= 1
    from factory.training import train

    sft = train.load_recipe("sft", ROOT / "recipes" / "sft_qwen2.5-math-1.5b.yaml")
    assert recipe.model.path == sft.train.output_dir  # GRPO starts from the SFT student


def test_grpo_train_only_moves_only_the_named_parameters(full_run, teacher_dir, tmp_path):
    run_dir, _ = full_run
    out = tmp_path / "grpo-norm"
    recipe = tiny_grpo(run_dir, teacher_dir, out, "train.learning_rate=1e-2", r"model.train_only=['^model\.norm\.weight$']")
    report = grpo.train(recipe, log=lambda m: None)
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(teacher_dir).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["model.norm.weight"]
    t = report["trainable"]
    assert t["parameters"] == changed and t["trainable"] == before["model.norm.weight"].numel() < t["total"]


def test_train_only_errors_name_the_field(teacher_dir):
    from transformers import AutoModelForCausalLM

    from factory.training.params import restrict_training
    from factory.training.train import LoraConfig, ModelConfig

    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with pytest.raises(ValueError, match=r"model.train_only=\['nothing_like_this'\] matches no parameter"):
        restrict_training(model, ModelConfig(path=teacher_dir, train_only=["nothing_like_this"]))
    with pytest.raises(ValueError, match="model.train_only: '\\(' is not a regular expression"):
        restrict_training(model, ModelConfig(path=teacher_dir, train_only=["("]))
    with pytest.raises(ValueError, match="exclude each other"):
        restrict_training(model, ModelConfig(path=teacher_dir, train_only=["norm"], lora=LoraConfig(enabled=True)))
    assert all(p.requires_grad for p in model.parameters())  # a rejected list froze nothing
    every = restrict_training(model, ModelConfig(path=teacher_dir))
    assert every["trainable"] == every["total"] == sum(p.numel() for p in model.parameters())
