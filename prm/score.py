"""Stage `score`: a process reward model's score for every step of every graded trace.

In:  graded traces.   Out: graded + schema.SCORE_COLUMNS (prm_step_scores, prm_num_steps,
     prm_mean / prm_min / prm_prod / prm_last, prm_status, prm_pass, prm_model, and how the PRM
     read the trace: prm_num_tokens, prm_windows, prm_min_context_tokens, prm_tokens_read,
     prm_num_unmerged_steps, prm_cut_steps).

Every step of every trace with reasoning is scored, whatever the trace's length or number of
steps: a trace longer than the PRM's context is read in windows (prm.windows), and
`prm_windows` / `prm_min_context_tokens` say how, so a user can filter on them. A single step
too long to fit beside the question is read in pieces and scored at its last one
(`score.prm.cut_long_steps`, on by default; `prm_cut_steps` counts them). The only traces left
unscored are those without reasoning, those whose separators miscount (separator_mismatch),
and, with cut_long_steps off, those with such a step (step_exceeds_context).

Scoring drops nothing (difficulty is the pass rate over *all* K traces, so curate must still
see every one): it marks. `prm_pass` is false for a trace whose `filter_aggregate` is under
`threshold`, and for one that could not be scored unless `keep_unscored`; curate then drops
such correct traces with drop_reason `prm_below_threshold` or `prm_<status>`. Wrong traces are
scored too: DPO pairs and PRM evaluation use their scores.

    factory run RECIPE            (with a `score:` section; it runs between grade and curate)
    factory prm score RECIPE      (scores a run's graded traces into a Parquet file)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from factory import schema
from prm import context
from prm.scorer import OK, PRMConfig, PRMScorer, aggregates
from prm.steps import SplitConfig, split_and_merge

AGGREGATES = ("prm_mean", "prm_min", "prm_prod", "prm_last")


@dataclass
class ScoreConfig:
    prm: PRMConfig = field(default_factory=PRMConfig)
    """The PRM and how to read it."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """How a trace's reasoning is cut into steps."""
    filter_aggregate: str = "prm_mean"
    """The aggregate the threshold applies to: prm_mean (the seed recipe's) | prm_min | prm_prod | prm_last."""
    threshold: float | None = None
    """Correct traces whose aggregate is under this are dropped by curate; None: score, don't filter."""
    keep_unscored: bool = False
    """With a threshold: keep traces that could not be scored (else dropped as prm_<status>)."""


def check(cfg: ScoreConfig) -> None:
    if cfg.filter_aggregate not in AGGREGATES:
        raise ValueError(f"score.filter_aggregate={cfg.filter_aggregate!r}; use one of {', '.join(AGGREGATES)}")
    if cfg.split.merge_tokens is not None and cfg.split.merge_tokens < 1:
        raise ValueError(f"score.split.merge_tokens={cfg.split.merge_tokens}: a step holds at least one token")


def check_context(cfg: ScoreConfig) -> dict:
    """`score.prm.max_length` against the PRM's context, read from its files without loading
    it (prm.context): an error when it asks for more. Returns what was checked, and against what."""
    limit, source = context.find_limit(cfg.prm.model) if cfg.prm.model else (None, "score.prm.model is empty")
    context.check_max_length(cfg.prm.max_length, cfg.prm.model, limit, source, "score.prm.max_length")
    return {"model": cfg.prm.model, "max_length": cfg.prm.max_length, "context": limit, "source": source,
            "checked": limit is not None}


def score_table(graded: pa.Table, cfg: ScoreConfig, scorer: PRMScorer) -> tuple[pa.Table, dict]:
    """Add the PRM columns to every row; returns (table, stats)."""
    check(cfg)
    rows = graded.to_pylist()
    count = lambda texts: [len(ids) for ids in scorer.tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    split = [split_and_merge(r["reasoning"], cfg.split, count) for r in rows]
    todo = [i for i, (_, _, status) in enumerate(split) if status == OK]
    results = scorer.score([(rows[i]["question"], split[i][0]) for i in todo])
    statuses: dict[str, int] = {}
    tokens = {"traces": 0, "read": 0, "windowed": 0}
    for row, (steps, parts, status) in zip(rows, split):
        row.update(prm_step_scores=None, prm_num_steps=len(steps), prm_status=status, prm_model=cfg.prm.model,
                   prm_num_unmerged_steps=parts, **{a: None for a in AGGREGATES})
    for i, res in zip(todo, results):
        rows[i].update(prm_status=res.status, prm_num_tokens=res.num_tokens)
        if res.status == OK:
            rows[i].update(prm_step_scores=res.scores, prm_windows=res.windows, prm_min_context_tokens=res.min_context,
                           prm_tokens_read=res.tokens_read, prm_cut_steps=res.cut_steps, **aggregates(res.scores))
            tokens["traces"] += res.num_tokens
            tokens["read"] += res.tokens_read
            tokens["windowed"] += res.windows > 1
    for row in rows:
        statuses[row["prm_status"]] = statuses.get(row["prm_status"], 0) + 1
        if row["prm_status"] != OK:
            row["prm_pass"] = cfg.threshold is None or cfg.keep_unscored
        else:
            row["prm_pass"] = cfg.threshold is None or row[cfg.filter_aggregate] >= cfg.threshold
    table = schema.table(rows, schema.extend(graded.schema, schema.SCORE_COLUMNS))
    return table, {"prm_status": statuses, "prm_fail": sum(not r["prm_pass"] for r in rows), "prm_tokens": tokens}
