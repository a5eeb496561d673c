"""Stage `curate`: difficulty labels, filters, curriculum shards and DPO pairs.

In:  graded traces (every trace of every problem).
Out: curriculum rows (schema.CURRICULUM) in easy -> hard order, DPO pairs (schema.PAIRS),
     per-problem difficulty (pass rate over its K traces), and rejected rows.

Every trace ends in exactly one place: a curriculum row, or the rejected table with why
(its problem outside the keep band, a wrong verdict, truncated, bad format, failed by the
PRM (prm_pass false, set by the score stage), or not selected among the problem's correct
traces). The pass rate counts every correct trace of the problem's first K, whatever the PRM
says; a top-up stage's extra traces (topup_wave >= 1) leave it alone and compete for the SFT
rows and pairs like the first K. Pairs are a second view over the same traces: a
correct trace that passed the quality filters against an incorrect one of the same problem.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from factory import schema
from factory.stages.judge import effective_verdict


@dataclass
class CurateConfig:
    min_pass_rate: float = 0.0
    """Problems below this pass rate are dropped (e.g. 0.125 drops those no trace solves)."""
    max_pass_rate: float = 1.0
    """Problems above this pass rate are dropped (e.g. 0.875 drops those every trace solves)."""
    difficulty_buckets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Edges on difficulty (1 - pass rate); bucket i holds edges[i-1] <= d < edges[i]."""
    keep_forced: bool = False
    """Traces closed at the thinking budget (rollout.max_think_tokens, forced_answer) count for
    the pass rate either way; false: they are not SFT rows or chosen sides of pairs."""
    drop_truncated: bool = True
    """Drop correct traces that hit max_tokens (their reasoning was cut off)."""
    require_format: bool = True
    """Drop correct traces without a closed <think> block followed by an answer."""
    max_traces_per_problem: int = 4
    """M: correct traces kept per problem for SFT."""
    max_traces_topped_up: int | None = None
    """Correct traces kept for a problem the top-up stage sampled again (None: max_traces_per_problem).
    DART-Math's point: the hard problems get more traces, not only one more chance at some."""
    selection: str = "shortest"
    """Which correct traces to keep: shortest | random | prm (highest prm_column)."""
    prm_column: str = "prm_mean"
    """Score column used by selection=prm (written by the score stage)."""
    rows_per_shard: int = 5000
    """Curriculum rows per Parquet shard."""
    pairs_per_problem: int = 2
    """Maximum DPO pairs per problem."""
    pairing: str = "random"
    """random: shuffled correct x incorrect; length_matched: each chosen with the rejected trace
    closest in length (keeps DPO from learning length alone)."""
    use_judge: bool = True
    """Where the judge stage gave a trace correct or wrong, count that in place of the symbolic
    verdict (pass rate, SFT rows, pairs); both stay in the row."""
    rejected_verdicts: list[str] = field(default_factory=lambda: ["wrong"])
    """Verdicts whose traces may be the rejected side of a pair."""
    seed: int = 0
    """Seed of random selection and pairing."""
    drop_incomplete: bool = False
    """Leave out problems some of whose K samples failed for good at the server (their pass rate
    is over fewer than K traces; `num_failed` says how many). Off by default: a server fault
    does not depend on the trace, so the pass rate over the rest is still an unbiased estimate,
    the run already exits non-zero, and a re-run sends the failed samples again."""


def bucket_of(difficulty: float, edges: list[float]) -> int:
    return bisect.bisect_right(edges, difficulty)


def _check(cfg: CurateConfig, columns: list[str]) -> None:
    if cfg.selection not in ("shortest", "random", "prm"):
        raise ValueError(f"curate.selection={cfg.selection!r}; use shortest, random or prm")
    if cfg.selection == "prm" and cfg.prm_column not in columns:
        raise ValueError(f"curate.selection=prm needs column {cfg.prm_column!r}; add a score stage first")
    if cfg.pairing not in ("random", "length_matched"):
        raise ValueError(f"curate.pairing={cfg.pairing!r}; use random or length_matched")


def _pairs(good: list[dict], bad: list[dict], cfg: CurateConfig, rng: random.Random) -> list[tuple[dict, dict]]:
    if not good or not bad:
        return []
    if cfg.pairing == "length_matched":
        out, free = [], list(bad)
        for g in sorted(good, key=lambda t: t["num_tokens"]):
            if not free or len(out) >= cfg.pairs_per_problem:
                break
            b = min(free, key=lambda t: (abs(t["num_tokens"] - g["num_tokens"]), t["trace_id"]))
            free.remove(b)
            out.append((g, b))
        return out
    good, bad = rng.sample(good, len(good)), rng.sample(bad, len(bad))
    n = min(cfg.pairs_per_problem, len(good) * len(bad))
    # walk the grid diagonally: distinct pairs, each trace reused as little as possible
    return [(good[i % len(good)], bad[(i % len(good) + i // len(good)) % len(bad)]) for i in range(n)]


def curate_table(graded: pa.Table, cfg: CurateConfig, prompt_fn: Callable[[str], list[dict]],
                 num_samples: int | None = None):
    """Label difficulty, filter, select and pair.

    Args:
        graded: every graded trace.
        prompt_fn: question -> prompt messages (the rollout's, so SFT sees what the teacher saw).
        num_samples: K, the samples asked for per problem (rollout.num_traces): a problem with
            fewer traces lost the others to failed requests. None: every problem is whole.
    Returns:
        (curriculum, pairs, difficulty, rejected) tables; curriculum sorted easy -> hard.
    """
    _check(cfg, graded.column_names)
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for t in graded.to_pylist():
        by_problem[t["problem_id"]].append(t)
    keep, pairs, problems, rejected = [], [], [], []

    def drop(t: dict, reason: str, detail: str) -> None:
        rejected.append(schema.rejected_row("curate", reason, t, detail, t["problem_id"], t["trace_id"]))

    def verdict(t: dict) -> str:
        return effective_verdict(t) if cfg.use_judge else t["verdict"]

    for pid in sorted(by_problem):
        traces = sorted(by_problem[pid], key=lambda t: t["sample_index"])
        first = [t for t in traces if not t.get("topup_wave")]  # the first K: the pass rate's sample
        topped = len(traces) - len(first)
        n_correct = sum(verdict(t) == "correct" for t in first)
        pass_rate = n_correct / len(first)
        difficulty = 1.0 - pass_rate
        num_failed = max(0, num_samples - len(first)) if num_samples else 0  # of the first K only
        stats = {"num_traces": len(first), "num_failed": num_failed, "num_correct": n_correct, "pass_rate": pass_rate,
                 "difficulty": difficulty, "difficulty_bucket": bucket_of(difficulty, cfg.difficulty_buckets)}
        in_band = cfg.min_pass_rate <= pass_rate <= cfg.max_pass_rate
        incomplete = cfg.drop_incomplete and num_failed > 0
        problems.append({"problem_id": pid, "source": traces[0]["source"], "split": traces[0]["split"],
                         "level": traces[0].get("level"), "origin": traces[0].get("origin"),
                         "parent_problem_id": traces[0].get("parent_problem_id"), "in_band": in_band and not incomplete,
                         **stats, "topup_traces": topped,
                         "topup_correct": sum(verdict(t) == "correct" for t in traces) - n_correct})
        if incomplete:
            for t in traces:
                drop(t, "incomplete_samples", f"{num_failed} of {num_samples} samples failed at the server; "
                     "re-run to send them again (curate.drop_incomplete)")
            continue
        if not in_band:
            reason = "pass_rate_below_band" if pass_rate < cfg.min_pass_rate else "pass_rate_above_band"
            for t in traces:
                drop(t, reason, f"pass rate {pass_rate:.3f} outside [{cfg.min_pass_rate}, {cfg.max_pass_rate}]")
            continue
        good = []  # correct traces that pass the quality filters: SFT rows and chosen sides of pairs
        for t in traces:
            if verdict(t) != "correct":
                judged = f"; judge: {t['judge_verdict']}" if t.get("judge_verdict") else ""
                drop(t, f"verdict_{verdict(t)}", (t["grade_detail"] or "") + judged)
            elif t.get("forced_answer") and not cfg.keep_forced:
                drop(t, "forced_answer", f"still thinking at the budget; answered after a forced close "
                     f"({t['num_tokens']} tokens)")
            elif cfg.drop_truncated and t["truncated"]:
                drop(t, "truncated", f"hit max_tokens after {t['num_tokens']} tokens")
            elif cfg.require_format and not t["format_ok"]:
                drop(t, "bad_format", "no closed <think> block followed by an answer")
            elif t.get("prm_pass") is False:  # marked by the score stage
                if t["prm_status"] == "ok":
                    drop(t, "prm_below_threshold", f"prm_mean={t['prm_mean']:.3f}, prm_min={t['prm_min']:.3f}")
                else:
                    drop(t, f"prm_{t['prm_status']}", f"not scored ({t['prm_status']}, {t['prm_num_steps']} steps)")
            else:
                good.append(t)
        rng = random.Random(f"{cfg.seed}:{pid}")
        if cfg.selection == "shortest":
            ranked = sorted(good, key=lambda t: (t["num_tokens"], t["sample_index"]))
        elif cfg.selection == "random":
            ranked = rng.sample(good, len(good))
        else:
            ranked = sorted(good, key=lambda t: (-(t[cfg.prm_column] or 0.0), t["sample_index"]))
        m = cfg.max_traces_per_problem if not topped or cfg.max_traces_topped_up is None else cfg.max_traces_topped_up
        for t in ranked[m:]:
            drop(t, "not_selected", f"beyond the {m} kept by selection={cfg.selection}")
        prompt = prompt_fn(traces[0]["question"])
        for t in ranked[:m]:
            keep.append({**t, **stats, "prompt": prompt,
                         "completion": [{"role": "assistant", "content": t["text"]}]})
        bad = [t for t in traces if verdict(t) in cfg.rejected_verdicts]
        for g, b in _pairs(good, bad, cfg, rng):
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": g["text"]}],
                          "rejected": [{"role": "assistant", "content": b["text"]}], "problem_id": pid,
                          "chosen_trace_id": g["trace_id"], "rejected_trace_id": b["trace_id"],
                          "rejected_verdict": verdict(b), "source": g["source"], **stats,
                          "chosen_topup_wave": g.get("topup_wave")})
    keep.sort(key=lambda r: (r["difficulty"], r["problem_id"], r["num_tokens"], r["trace_id"]))
    pairs.sort(key=lambda r: (r["difficulty"], r["problem_id"]))
    # score-stage, judge and rewrite-check columns travel on, and the symbolic verdict beside the judge's
    extra = [f for f in graded.schema if f.name.startswith(("prm_", "check_", "judge_"))]
    if any(f.name == "judge_verdict" for f in extra):
        extra = [graded.schema.field("verdict")] + extra
    curriculum = schema.table(keep, pa.schema(list(schema.CURRICULUM) + extra))
    difficulty_schema = pa.schema([("problem_id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                                   ("level", pa.int32()), ("origin", pa.string()), ("parent_problem_id", pa.string()),
                                   ("in_band", pa.bool_())] + [pa.field(n, t) for n, t in schema.DIFFICULTY_COLUMNS]
                                  + [pa.field("topup_traces", pa.int32()), pa.field("topup_correct", pa.int32())])
    return (curriculum, schema.table(pairs, schema.PAIRS), schema.table(problems, difficulty_schema),
            schema.table(rejected, schema.REJECTED))
