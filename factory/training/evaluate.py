"""`factory eval`: sample a model on held-out problems and grade it with the pipeline's graders.

In:  an eval recipe: the model (engine), the problems (ingest), sampling (rollout: n samples
     per problem), grading, and `eval` (which k to report, how to group problems).
Out: RUN/eval.json with pass@1, pass@k and maj@k overall and per group, and RUN/stages/
     (the samples and their grades, resumable like any run). A printed table.

With a `judge:` section (the pipeline's, factory.stages.judge) the samples the symbolic grader
could not settle go to an LLM judge, and a sample counts as correct by its effective verdict,
as curate counts the data the student was trained on: the same graders before and after.
`judge.model` must be named (the model under test would otherwise judge its own answers);
eval.json then also holds the symbolic-only figures (`symbolic`) and the judge's counts.

    factory eval recipes/demo_eval.yaml engine.model=runs/demo/student-sft run.output_dir=runs/demo/eval-sft
    factory eval --compare runs/demo/eval-base/eval.json runs/demo/eval-sft/eval.json

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are
correct, 1 - C(n-c, k) / C(n, k), averaged over problems. maj@k is majority voting over
disjoint groups of k samples (n // k groups, averaged): every correct answer counts as one
vote for the reference (they are all equal to it), wrong answers vote by their normalized
text, samples without an answer do not vote, ties go to the answer seen first.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from factory import config as config_mod
from factory import answers, console, store
from factory.engines import Engine, EngineConfig
from factory.stages.grade import GradeConfig
from factory.stages.ingest import IngestConfig
from factory.stages.judge import JudgeConfig, effective_verdict
from factory.run.pipeline import Runner
from factory.run.recipe import RunConfig
from factory.run.products import package_versions
from factory.stages.rollout import RolloutConfig


@dataclass
class EvalConfig:
    k: list[int] = field(default_factory=lambda: [1, 4, 8])
    """Report pass@k and maj@k for these k (each at most rollout.num_traces)."""
    group_by: str = "level"
    """Per-group results: level (the problems' own level) | difficulty (bucket from a teacher run,
    see difficulty_from) | none."""
    difficulty_from: str | None = None
    """group_by=difficulty: a `factory run` directory whose difficulty.parquet buckets the problems."""


@dataclass
class EvalRecipe:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/eval"))
    engine: EngineConfig = field(default_factory=EngineConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grade: GradeConfig = field(default_factory=GradeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig | None = None
    """An LLM judge for the samples the grader could not settle; absent: the grader alone."""


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> EvalRecipe:
    return config_mod.load(EvalRecipe, path, overrides)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    # the ratio of binomials as a product, stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _vote_key(row: dict) -> str | None:
    if row["verdict"] == "correct":
        return "\x00correct"  # all correct answers equal the reference, hence each other
    ans = row["extracted_answer"]
    return None if ans is None else answers.vote_key(ans)


def maj_at_k(samples: list[dict], k: int) -> float:
    """Majority vote over disjoint groups of k samples (in sample order), averaged over groups."""
    groups = [samples[i:i + k] for i in range(0, len(samples) - k + 1, k)]
    if not groups:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(samples)}")
    wins = 0
    for g in groups:
        votes: dict[str, int] = {}
        for r in g:
            key = _vote_key(r)
            if key is not None:
                votes[key] = votes.get(key, 0) + 1  # dicts keep first-seen order: ties go to the first
        if votes and max(votes, key=votes.get) == "\x00correct":
            wins += 1
    return wins / len(groups)


def metrics(by_problem: dict[str, list[dict]], ks: list[int]) -> dict:
    """Mean pass@k / maj@k over problems, plus sample-level counts."""
    out: dict = {"problems": len(by_problem)}
    if not by_problem:
        return out
    samples = [r for rows in by_problem.values() for r in rows]
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(rs), sum(r["verdict"] == "correct" for r in rs), k)
                               for rs in by_problem.values()) / len(by_problem)
    for k in ks:
        if k > 1:
            out[f"maj@{k}"] = sum(maj_at_k(rs, k) for rs in by_problem.values()) / len(by_problem)
    out["samples"] = len(samples)
    out["format_ok"] = sum(bool(r["format_ok"]) for r in samples) / len(samples)
    out["no_answer"] = sum(r["verdict"] == "no_answer" for r in samples) / len(samples)
    out["mean_tokens"] = sum(r["num_tokens"] for r in samples) / len(samples)
    return out


def group_of(cfg: EvalConfig) -> Callable[[dict], str | None]:
    if cfg.group_by == "none":
        return lambda row: None
    if cfg.group_by == "level":
        return lambda row: None if row.get("level") is None else f"level {row['level']}"
    if cfg.group_by == "difficulty":
        if not cfg.difficulty_from:
            raise ValueError("eval.group_by=difficulty needs eval.difficulty_from (a factory run directory)")
        t = pq.read_table(Path(cfg.difficulty_from) / "difficulty.parquet").to_pylist()
        bucket = {r["problem_id"]: r["difficulty_bucket"] for r in t}
        return lambda row: f"bucket {bucket[row['problem_id']]}" if row["problem_id"] in bucket else "unbucketed"
    raise ValueError(f"eval.group_by={cfg.group_by!r}; use level, difficulty or none")


def summarize(graded: list[dict], cfg: EvalConfig, n: int) -> dict:
    ks = sorted(set(cfg.k))
    if any(k > n or k < 1 for k in ks):
        raise ValueError(f"eval.k={cfg.k}: each k must be between 1 and rollout.num_traces={n}")
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(graded, key=lambda r: (r["problem_id"], r["sample_index"])):
        by_problem[r["problem_id"]].append(r)
    short = {p: rs for p, rs in by_problem.items() if len(rs) < n}
    if short:
        raise ValueError(f"{len(short)} problems have fewer than {n} samples (e.g. {next(iter(short))})")
    key = group_of(cfg)
    groups: dict[str, dict] = defaultdict(dict)
    for p, rs in by_problem.items():
        g = key(rs[0])
        if g is not None:
            groups[g][p] = rs
    return {"overall": metrics(by_problem, ks),
            "groups": {g: metrics(groups[g], ks) for g in sorted(groups, key=_natural)}}


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def evaluate(recipe: EvalRecipe, engine: Engine | None = None, log=console.say, judge: Engine | None = None) -> dict:
    """Sample, grade (and judge) and score; writes run.output_dir/eval.json and returns it.
    Pass `judge` to reuse a judge engine already loaded."""
    if recipe.judge is not None and not recipe.judge.model:
        raise ValueError("eval: judge.model is unset, so the model under test would judge its own answers; "
                         "name the judge model (e.g. the teacher)")
    runner = Runner(recipe, engine, log, command="eval", judge=judge)
    runner.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        graded = runner.run_grade(runner.run_rollout(runner.run_ingest()))
        if recipe.judge is not None:
            graded = runner.run_judge(graded)
    except BaseException as e:
        runner.progress.finish("failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        runner.close()
    runner.progress.finish("finished")
    rows = graded.read().to_pylist()
    n = recipe.rollout.num_traces
    extra = {}
    if recipe.judge is not None:  # the grader's figures alone, beside the ones that count the judge
        extra = {"symbolic": summarize(rows, recipe.eval, n), "judge": {"model": recipe.judge.model, **{
            k: sum(s.get("judge", {}).get(k, 0) for s in graded.shard_stats()) for k in ("judged", "flipped", "unclear", "failed")}}}
        rows = [{**r, "verdict": effective_verdict(r)} for r in rows]
    result = {"model": recipe.engine.model, "n": n, "temperature": recipe.rollout.temperature,
              **summarize(rows, recipe.eval, n), **extra, "config": config_mod.to_dict(recipe),
              "packages": package_versions()}
    store.write_json(result, runner.run_dir / "eval.json")
    return result


def _metric_names(*results: dict) -> list[str]:
    names = []
    for r in results:
        for k in r["overall"]:
            if (k.startswith("pass@") or k.startswith("maj@")) and k not in names:
                names.append(k)
    return sorted(names, key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])))


def table(result: dict) -> str:
    names = _metric_names(result)
    lines = [f"{result['model']}  (n={result['n']}, temperature={result['temperature']})",
             f"{'group':<14}{'problems':>9}" + "".join(f"{m:>9}" for m in names)]
    rows = [("overall", result["overall"])] + list(result["groups"].items())
    for g, m in rows:
        lines.append(f"{g:<14}{m['problems']:>9}" + "".join(
            f"{100 * m[k]:>8.1f}%" if k in m else f"{'-':>9}" for k in names))
    if "judge" in result:
        j, sym = result["judge"], result["symbolic"]["overall"]
        alone = f"; the grader alone: pass@1 {100 * sym['pass@1']:.1f}%" if "pass@1" in sym else ""
        lines.append(f"judge {j['model']}: {j['judged']} samples judged, {j['flipped']} verdicts flipped, "
                     f"{j['unclear']} unclear, {j['failed']} failed{alone}")
    return "\n".join(lines)


def compare(a: dict, b: dict) -> str:
    """Two results side by side: A, B and B - A in points, per group."""
    names = _metric_names(a, b)
    lines = [f"A: {a['model']}", f"B: {b['model']}",
             f"{'group':<14}{'metric':>8}{'A':>9}{'B':>9}{'B-A':>9}"]
    groups = ["overall"] + [g for g in a["groups"] if g in b["groups"]]
    for g in groups:
        ma = a["overall"] if g == "overall" else a["groups"][g]
        mb = b["overall"] if g == "overall" else b["groups"][g]
        for k in names:
            if k in ma and k in mb:
                lines.append(f"{g:<14}{k:>8}{100 * ma[k]:>8.1f}%{100 * mb[k]:>8.1f}%{100 * (mb[k] - ma[k]):>+8.1f}")
    return "\n".join(lines)


def read_result(path: str | Path) -> dict:
    p = Path(path)
    p = p / "eval.json" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"{p}: no eval result here; run `factory eval` first")
    return json.loads(p.read_text())
