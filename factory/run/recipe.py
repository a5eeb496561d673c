"""A run's recipe: the dataclass tree `factory run` reads from YAML (`load_recipe`), one section
per stage, and `dry_run`, the checks a run makes before its first stage with nothing loaded.

Kept apart from `factory.run.pipeline` (which runs the stages) so that what reads recipes (the
CLI, the demo, rounds, training's evaluation, benchmarks) needs only the configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factory import config as config_mod
from factory.engines import EngineConfig
from factory.run.ray_executor import RayConfig
from factory.stages.curate import CurateConfig
from factory.stages.decontam import DecontamConfig
from factory.stages.dedup import DedupConfig
from factory.stages.grade import GradeConfig
from factory.stages.ingest import IngestConfig
from factory.stages.judge import JudgeConfig, check as check_judge
from factory.stages.rewrite import RewriteConfig, check_config as check_rewrite
from factory.stages.rollout import RolloutConfig, check_budget
from factory.stages.topup import TopupConfig, check as check_topup
from prm.score import ScoreConfig, check as check_score, check_context


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Where the run's stages and products are written; re-running resumes there."""
    progress: bool = True
    """Show a live line per stage on the terminal (RUN/progress.json is written either way)."""
    allow_failures: bool = False
    """`factory run` exits 0 even when requests failed for good after their retries. false: it
    exits with status 3 (EXIT_FAILED_REQUESTS), so a batch scheduler sees an incomplete run."""


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    rewrite: RewriteConfig | None = None
    """Paraphrases / variants checked by the teacher; absent: no rewrite stage."""
    dedup: DedupConfig | None = None
    """Exact and MinHash near-duplicate removal; absent: only ingest's exact merge."""
    decontam: DecontamConfig | None = None
    """N-gram overlap removal against benchmark questions; absent: no check."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grade: GradeConfig = field(default_factory=GradeConfig)
    topup: TopupConfig | None = None
    """More samples, in waves, for problems whose first-K pass rate is low but not zero (after
    grade); absent: K traces per problem."""
    judge: JudgeConfig | None = None
    """An LLM judge for traces the grader could not settle (after grade); absent: no judge stage."""
    score: ScoreConfig | None = None
    """PRM scoring between grade and curate; absent: no score stage."""
    curate: CurateConfig = field(default_factory=CurateConfig)
    executor: str = "local"
    """local: map stages run shard by shard in this process | ray: on a Ray cluster (section `ray`)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster address and actor counts for executor: ray."""


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    return config_mod.load(Recipe, path, overrides)


EXIT_FAILED_REQUESTS = 3  # `factory run`'s status when requests failed for good (run.allow_failures: false)


def dry_run(recipe: Recipe) -> dict:
    """`factory run RECIPE --dry-run`: the checks a run makes before its stages, and the PRM's
    context against score.prm.max_length (prm.context: from the model's files, or its published
    figure where it is not on this machine, or reported unchecked), with no model loaded and
    nothing written. Returns what was checked."""
    r = recipe
    optional = [n for n in ("rewrite", "dedup", "decontam") if getattr(r, n) is not None]
    report: dict = {"stages": ["ingest", *optional, "rollout", "grade", *(["topup"] if r.topup else []),
                               *(["judge"] if r.judge else []), *(["score"] if r.score else []), "curate"]}
    check_budget(r.rollout)
    if r.topup is not None:
        check_topup(r.topup, r.rollout)
    if r.rewrite is not None:
        check_rewrite(r.rewrite)
    if r.judge is not None:
        check_judge(r.judge)
    if r.score is not None:
        check_score(r.score)
        report["prm_context"] = check_context(r.score)
    return report
