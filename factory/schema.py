"""The data contract: every column of every table the factory writes, in one place.

Tables grow stage by stage; a stage adds columns and never rewrites or drops upstream ones:

    problems   (ingest)   problem_id, question, answer, domain, choices, source, split, level,
                          origin, parent_problem_id, answer_raw, reference_source, reference_agreement
    rewritten  (rewrite)  problems (+ rewrites) + rewrite_model, check_* (the teacher's vote)
    traces     (rollout)  problems + trace_id, sample_index, text, reasoning, answer_text, ...
    graded     (grade)    traces + extracted_answer, verdict, format_ok, grade_detail
    topped up  (topup)    graded + topup_wave, and the top-up's own graded traces
    judged     (judge)    graded + judge_verdict, judge_text, judge_model
    scored     (score)    graded + prm_step_scores, prm_mean/min/prod/last, prm_status, prm_pass,
                          prm_windows, prm_min_context_tokens, ...
    curriculum (curate)   SFT rows: prompt/completion messages + ids + difficulty
    pairs      (curate)   DPO rows: prompt/chosen/rejected messages + ids
    rejected   (any)      what a stage dropped, why, and the whole dropped record

Every row carries `problem_id` from ingest to shard, and `trace_id` from rollout on.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

DOMAINS = ("math", "numeric", "choice", "exact")
VERDICTS = ("correct", "wrong", "no_answer", "unverifiable", "timeout")
ORIGINS = ("original", "paraphrase", "variant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("domain", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("source", pa.string()),
        ("split", pa.string()),
        ("level", pa.int32()),  # difficulty level given by the source (e.g. MATH's 1-5); null if none
        ("origin", pa.string()),  # original (ingested) | paraphrase | variant (made by rewrite)
        ("parent_problem_id", pa.string()),  # the problem a rewrite was made from; null for originals
        ("answer_raw", pa.string()),  # the answer column as given, when ingest read `answer` out of it
        # how `answer` was read: given | boxed | gsm8k | regex | index | choice_text (ingest),
        # unlabeled (no reference yet) | majority (grade's vote over the traces)
        ("reference_source", pa.string()),
        ("reference_agreement", pa.float64()),  # majority: the share of traces that gave it
    ]
)

# Added by the rewrite stage (factory/stages/rewrite.py); null on original rows.
REWRITE_COLUMNS = [
    ("rewrite_model", pa.string()),
    ("check_answers", pa.list_(pa.string())),  # the teacher's extracted answers on the rewrite (null: none)
    ("check_answer", pa.string()),  # their majority answer (a variant's pseudo-label)
    ("check_votes", pa.int32()),  # how many answers agree with it
    ("check_agreement", pa.float64()),  # check_votes / number of check rollouts
]

ROLLOUT_COLUMNS = [
    ("trace_id", pa.string()),
    ("sample_index", pa.int32()),
    ("text", pa.string()),  # the raw completion, prefilled "<think>" restored
    ("reasoning", pa.string()),  # inside <think>…</think>; null when the block never opened
    ("answer_text", pa.string()),  # after </think>; null when the block never closed
    ("finish_reason", pa.string()),
    ("num_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("forced_answer", pa.bool_()),  # still thinking at rollout.max_think_tokens: closed and continued
    ("teacher_model", pa.string()),
    ("sampling", pa.string()),  # JSON of the sampling parameters, request seed included
]
TRACES = pa.schema(list(PROBLEMS) + [pa.field(n, t) for n, t in ROLLOUT_COLUMNS])

GRADE_COLUMNS = [
    ("extracted_answer", pa.string()),
    ("verdict", pa.string()),
    ("format_ok", pa.bool_()),
    ("grade_detail", pa.string()),
]
GRADED = pa.schema(list(TRACES) + [pa.field(n, t) for n, t in GRADE_COLUMNS])

# Added by the top-up stage (factory/stages/topup.py); carried onto curriculum rows and pairs.
TOPUP_COLUMNS = [
    # 0: one of the problem's first K rollout traces (its pass rate counts only these);
    # w >= 1: sampled in top-up wave w; null: the run had no top-up stage
    ("topup_wave", pa.int32()),
]

# Added by the judge stage (factory/stages/judge.py); null on traces it did not judge.
JUDGE_COLUMNS = [
    ("judge_verdict", pa.string()),  # correct | wrong | unclear: the judge's, beside the symbolic verdict
    ("judge_text", pa.string()),  # the judge's reply
    ("judge_model", pa.string()),
]

# Added by the score stage (prm/score.py); curate carries every prm_* column into the curriculum.
SCORE_COLUMNS = [
    ("prm_step_scores", pa.list_(pa.float64())),  # one per step; null when not scored
    ("prm_num_steps", pa.int32()),
    ("prm_mean", pa.float64()),
    ("prm_min", pa.float64()),
    ("prm_prod", pa.float64()),
    ("prm_last", pa.float64()),
    ("prm_status", pa.string()),  # ok | no_reasoning | step_exceeds_context | separator_mismatch
    ("prm_pass", pa.bool_()),  # false: curate drops the trace (under the threshold, or unscored)
    ("prm_model", pa.string()),
    ("prm_num_unmerged_steps", pa.int32()),  # parts the split found, before split.merge_tokens joined them
    ("prm_num_tokens", pa.int32()),  # the trace rendered once for the PRM (prompt included); null: not encoded
    ("prm_windows", pa.int32()),  # PRM inputs it was read in (1: whole; more: longer than the PRM's context)
    ("prm_min_context_tokens", pa.int32()),  # fewest preceding-step tokens a step was scored with; null: none cut
    ("prm_tokens_read", pa.int32()),  # tokens the PRM read for it, all windows together
    ("prm_cut_steps", pa.int32()),  # steps too long for the PRM's context, read in pieces (score.prm.cut_long_steps)
]

# Per-problem statistics computed by curate and carried on its output rows.
DIFFICULTY_COLUMNS = [
    ("num_traces", pa.int32()),
    ("num_failed", pa.int32()),  # of the K samples asked for, how many failed for good (request_failed)
    ("num_correct", pa.int32()),
    ("pass_rate", pa.float64()),
    ("difficulty", pa.float64()),
    ("difficulty_bucket", pa.int32()),
]

CURRICULUM = pa.schema(
    [
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("problem_id", pa.string()),
        ("trace_id", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("level", pa.int32()),
        ("origin", pa.string()),
        ("parent_problem_id", pa.string()),
        ("answer", pa.string()),
        ("num_tokens", pa.int32()),
    ]
    + [pa.field(n, t) for n, t in DIFFICULTY_COLUMNS + TOPUP_COLUMNS]
)

PAIRS = pa.schema(
    [
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("problem_id", pa.string()),
        ("chosen_trace_id", pa.string()),
        ("rejected_trace_id", pa.string()),
        ("rejected_verdict", pa.string()),
        ("source", pa.string()),
        ("pass_rate", pa.float64()),
        ("difficulty", pa.float64()),
        ("chosen_topup_wave", pa.int32()),  # the chosen trace's topup_wave
    ]
)

# What the PRM returned for one (question, steps), kept per score shard so a re-made shard reads only
# the traces it has not scored yet (prm.score.Memo); the key is memo_key(question, steps)
PRM_MEMO = pa.schema(
    [
        ("key", pa.string()),
        ("prm_status", pa.string()),
        ("prm_step_scores", pa.list_(pa.float64())),
        ("prm_num_tokens", pa.int32()),
        ("prm_windows", pa.int32()),
        ("prm_min_context_tokens", pa.int32()),
        ("prm_tokens_read", pa.int32()),
        ("prm_cut_steps", pa.int32()),
    ]
)

REJECTED = pa.schema(
    [
        ("stage", pa.string()),
        ("drop_reason", pa.string()),
        ("problem_id", pa.string()),
        ("trace_id", pa.string()),
        ("detail", pa.string()),  # human-readable: file, row, field, what to do
        ("record", pa.string()),  # the dropped row as JSON, so nothing is lost
    ]
)


def rejected_row(
    stage: str, reason: str, record: Any, detail: str = "", problem_id: str | None = None,
    trace_id: str | None = None,
) -> dict:
    """One row of the rejected table; `record` is kept whole as JSON."""
    return {
        "stage": stage,
        "drop_reason": reason,
        "problem_id": problem_id,
        "trace_id": trace_id,
        "detail": detail,
        "record": json.dumps(record, ensure_ascii=False, default=str),
    }


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table with exactly `schema`'s columns (missing keys become null, extra keys are ignored)."""
    return pa.Table.from_pylist(rows, schema=schema)


def extend(schema: pa.Schema, columns: list[tuple[str, pa.DataType]]) -> pa.Schema:
    """`schema` plus columns a later stage adds (skipping any it already has)."""
    have = set(schema.names)
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in columns if n not in have])
