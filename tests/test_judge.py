"""The judge stage: which traces it asks about, how it reads a reply, that it never overwrites
the symbolic verdict, and a run end to end with the shipped tiny judge (data/judge) judging
the simulated teacher's digit answers against references written in words."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory import tiny
from factory.stages.judge import JudgeConfig, check, effective_verdict, read_reply, wants_judge

from test_continuous import ROOT, recipe_data, sim  # noqa: F401  (the simulated teacher fixture)

JUDGE = ROOT / "data" / "judge"
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen").split()


@pytest.mark.parametrize("reply,verdict", [
    ("yes", "correct"), ("Yes, they are the same.", "correct"), ("  Equivalent.", "correct"),
    ("no", "wrong"), ("No. 7 is not 8", "wrong"), ("Not equivalent", "wrong"),
    ("<think>7 and seven... same</think>\nyes", "correct"), ("<think>hmm, yes?</think>\nno", "wrong"),
    ("maybe", "unclear"), ("", "unclear"),
])
def test_reply_reading(reply, verdict):
    assert read_reply(reply, JudgeConfig()) == verdict


def test_which_traces_are_judged():
    cfg = JudgeConfig()
    row = lambda verdict, answer_text="The answer is 7.": {"verdict": verdict, "answer_text": answer_text}  # noqa: E731
    assert wants_judge(row("unverifiable"), cfg) and wants_judge(row("no_answer"), cfg)
    assert not wants_judge(row("no_answer", None), cfg)  # unfinished reasoning: nothing to judge
    assert not wants_judge(row("wrong"), cfg) and not wants_judge(row("correct"), cfg)
    assert wants_judge(row("wrong"), JudgeConfig(verdicts=["wrong"]))
    with pytest.raises(ValueError, match="judge.verdicts"):
        check(JudgeConfig(verdicts=["correct"]))
    with pytest.raises(ValueError, match="lacks {answer}"):
        check(JudgeConfig(template="Is {reference} right?"))


def test_the_judge_sits_beside_the_symbolic_verdict():
    assert effective_verdict({"verdict": "wrong", "judge_verdict": "correct"}) == "correct"
    assert effective_verdict({"verdict": "unverifiable", "judge_verdict": "unclear"}) == "unverifiable"
    assert effective_verdict({"verdict": "no_answer", "judge_verdict": None}) == "no_answer"


def word_problems(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The toy additions with their references in words, graded as exact strings: every right
    digit answer is `wrong` to the symbolic grader, which is what the judge is for."""
    truth, rows = {}, []
    for line in (ROOT / "data" / "toy_addition" / "problems.jsonl").read_text().splitlines()[:40]:
        p = json.loads(line)
        truth[p["question"]] = int(p["answer"])
        rows.append({"question": p["question"], "answer": WORDS[int(p["answer"])], "domain": "exact"})
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, truth


def test_judge_stage_end_to_end(tmp_path, sim):  # noqa: F811
    problems, truth = word_problems(tmp_path)
    run = tmp_path / "run"
    data = recipe_data(run, sim, problems, rollout={"num_traces": 4, "max_tokens": 2000})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    from factory import cli
    from factory.engines.base import EngineConfig
    from factory.engines.inprocess import VLLMEngine
    from factory.run.pipeline import run as run_recipe
    from factory.run.recipe import load_recipe
    from factory.training.evaluate import evaluate, load_recipe as load_eval, table as evaluate_table

    # without a judge: every right answer is a string mismatch, nothing reaches the curriculum
    assert cli.main(["run", str(recipe), f"run.output_dir={tmp_path / 'plain'}"]) == 0
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert plain["stages"]["curate"]["out"] == 0

    # the toy judge names both values before its verdict: read the verdict at the reply's end
    data["judge"] = {"model": str(JUDGE), "verdicts": ["wrong"], "max_tokens": 12, "template": tiny.JUDGE_PROMPT,
                     "yes_pattern": r"\byes\W*$", "no_pattern": r"\bno\W*$"}
    recipe.write_text(yaml.safe_dump(data))
    # eager: no torch.compile at start (~15 s against 25-40 s here); the session's engine covers compiled
    judge = VLLMEngine(EngineConfig(model=str(JUDGE), max_model_len=128, cpu_kv_cache_space_gb=1, dtype="float32",
                                    enforce_eager=True))
    try:
        manifest = run_recipe(load_recipe(recipe), judge=judge)
        # `factory eval` with the same judge: the same graders for the student as for its data
        ev = {k: data[k] for k in ("engine", "ingest", "rollout", "grade", "judge")}
        ev.update(run={"output_dir": str(tmp_path / "eval"), "progress": False}, eval={"k": [1, 4], "group_by": "none"})
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(ev))
        result = evaluate(load_eval(tmp_path / "eval.yaml"), judge=judge)
    finally:
        judge.close()
    samples = [r for f in sorted((tmp_path / "eval" / "stages" / "judge").glob("shard-*.parquet"))
               for r in pq.read_table(f).to_pylist()]
    assert len(samples) == result["overall"]["samples"] == 4 * len(truth)
    assert result["symbolic"]["overall"]["pass@1"] == 0  # the grader alone: every right digit is a mismatch
    correct = sum(effective_verdict(r) == "correct" for r in samples)
    assert result["overall"]["pass@1"] == pytest.approx(correct / len(samples)) and correct > 0
    assert result["judge"]["flipped"] == correct and result["judge"]["failed"] == 0
    right = sum(str(truth[r["question"]]) == r["extracted_answer"] for r in samples)
    assert abs(correct - right) <= 0.1 * len(samples), (correct, right)  # what the truth says, within the judge's errors
    assert "judge " + str(JUDGE) in evaluate_table(result)
    with pytest.raises(ValueError, match="judge.model is unset"):
        evaluate(load_eval(tmp_path / "eval.yaml", ["judge.model=null"]))
    rows = [r for f in sorted((run / "stages" / "judge").glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    judged = [r for r in rows if r["judge_verdict"] is not None]
    assert judged and all(r["verdict"] == "wrong" for r in judged)  # the symbolic verdict is kept
    right = [str(truth[r["question"]]) == r["extracted_answer"] for r in judged]
    agree = sum((r["judge_verdict"] == "correct") == ok for r, ok in zip(judged, right))
    assert agree / len(judged) >= 0.9, f"judge agrees with the truth on {agree}/{len(judged)}"
    counts = manifest["stages"]["judge"]["judge"]
    assert counts["judged"] == len(judged) and counts["failed"] == 0
    assert counts["flipped"] == sum(r["judge_verdict"] == "correct" for r in judged) > 0
    # curate counts the judge's verdicts: right answers become SFT rows and chosen sides of pairs
    assert manifest["stages"]["curate"]["out"] > 0
    kept = [r for f in (run / "curriculum").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    by_id = {r["trace_id"]: r for r in rows}
    assert kept and all(r["judge_verdict"] == "correct" == by_id[r["trace_id"]]["judge_verdict"] for r in kept)
    assert all(r["verdict"] == "wrong" for r in kept)  # the curriculum row still says what the grader said
