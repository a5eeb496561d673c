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

A score shard keeps what the PRM returned for each of its traces (`Memo`, keyed by the question
and the trace's steps, under `memo/score/` of the run), and a re-made shard sends the PRM only the
traces it has not read before. The shard is re-made whenever anything upstream changes (a top-up
added, a grader fixed, the judge switched on) or a curate-side setting here does (`threshold`,
`filter_aggregate`, `keep_unscored`), and none of those change a step's score; a change to
`score.prm` (or to the PRM's files) clears the memo.

    factory run RECIPE            (with a `score:` section; it runs between grade and curate)
    factory prm score RECIPE      (scores a run's graded traces into a Parquet file)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from factory import config as config_mod
from factory import schema, store
from prm import context
from prm.scorer import OK, PRMConfig, PRMScorer, StepScores, aggregates
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


def memo_key(question: str, steps: list[str]) -> str:
    """What the PRM reads of a trace, hashed: equal keys, equal scores (for one PRM and its settings)."""
    return hashlib.sha256(json.dumps([question, steps], ensure_ascii=False).encode()).hexdigest()


class Memo:
    """The PRM's results for one score shard, by memo_key: those read from `path` (what an
    earlier run of this shard scored) and those `put` this time. `save` keeps only the keys
    asked for this time, so the file holds the shard's traces and no more (memory and disk:
    one shard's step scores)."""

    @staticmethod
    def claim(run_dir: Path, prm: PRMConfig) -> None:
        """Keep the run's memos while the PRM and how it reads hold (its settings, and its files
        where they are local); clear them otherwise."""
        settings = config_mod.to_dict(prm)
        files = store.input_signature([prm.model]) if prm.model and Path(prm.model).exists() else []
        store.claim_dir(Path(run_dir) / "memo" / "score", store.fingerprint("score-memo", settings, files),
                        {"stage": "score", "prm": settings}, "_memo.json")

    @classmethod
    def of_shard(cls, run_dir: Path, i: int) -> "Memo":
        return cls(Path(run_dir) / "memo" / "score" / f"shard-{i:05d}.parquet")

    def __init__(self, path: Path):
        self.path, self.used = Path(path), {}
        self.known: dict[str, StepScores] = {}
        if self.path.exists():  # written whole or not at all (store.write_parquet)
            for r in pq.read_table(self.path).to_pylist():
                self.known[r["key"]] = StepScores(r["prm_step_scores"], r["prm_status"], r["prm_num_tokens"],
                                                  r["prm_windows"] or 0, r["prm_min_context_tokens"],
                                                  r["prm_tokens_read"] or 0, cut_steps=r["prm_cut_steps"] or 0)

    def get(self, key: str) -> StepScores | None:
        got = self.known.get(key)
        if got is not None:
            self.used[key] = got
        return got

    def put(self, key: str, res: StepScores) -> None:
        self.used[key] = res

    def save(self) -> None:
        rows = [{"key": k, "prm_status": r.status, "prm_step_scores": r.scores, "prm_num_tokens": r.num_tokens,
                 "prm_windows": r.windows, "prm_min_context_tokens": r.min_context, "prm_tokens_read": r.tokens_read,
                 "prm_cut_steps": r.cut_steps} for k, r in self.used.items()]
        store.write_parquet(schema.table(rows, schema.PRM_MEMO), self.path)


def score_table(graded: pa.Table, cfg: ScoreConfig, scorer: PRMScorer, memo: Memo | None = None) -> tuple[pa.Table, dict]:
    """Add the PRM columns to every row; returns (table, stats). With a `memo`, a trace whose
    question and steps it holds is not read again, and what the PRM returns goes into it; a
    trace whose question and steps repeat within the table is read once either way. Stats'
    prm_reads: traces the PRM read (scored), found in the memo (from_memo), repeats of a trace
    read here (repeats); they sum to the traces with reasoning."""
    check(cfg)
    rows = graded.to_pylist()
    count = lambda texts: [len(ids) for ids in scorer.tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    split = [split_and_merge(r["reasoning"], cfg.split, count) for r in rows]
    todo = [i for i, (_, _, status) in enumerate(split) if status == OK]
    keys = [memo_key(rows[i]["question"], split[i][0]) for i in todo]
    found = {k: got for k in dict.fromkeys(keys) if memo is not None and (got := memo.get(k)) is not None}
    fresh = {k: i for k, i in zip(keys, todo) if k not in found}  # one read per distinct key
    for k, res in zip(fresh, scorer.score([(rows[i]["question"], split[i][0]) for i in fresh.values()])):
        found[k] = res
        if memo is not None:
            memo.put(k, res)
    results = [found[k] for k in keys]
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
    return table, {"prm_status": statuses, "prm_fail": sum(not r["prm_pass"] for r in rows), "prm_tokens": tokens,
                   "prm_reads": {"scored": len(fresh), "from_memo": sum(k not in fresh for k in keys),
                                 "repeats": sum(k in fresh for k in keys) - len(fresh)}}
