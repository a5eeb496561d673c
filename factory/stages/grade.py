"""Stage `grade`: judge each trace's final answer against the reference.

In:  traces (rollout's table).   Out: graded = traces + extracted_answer, verdict,
format_ok, grade_detail. Grading drops nothing: every trace gets a verdict, one of
correct | wrong | no_answer | unverifiable (the reference can't be read) | timeout.

Each trace is graded in a worker process with a hard timeout (factory.workers), so a
pathological expression ends as `timeout` instead of hanging the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from factory import answers, schema, verify
from factory.workers import Failed, TimedOut, TimeoutPool


@dataclass
class GradeConfig:
    timeout_s: float = 5.0
    """Hard limit per trace (extraction + comparison); past it the verdict is `timeout`."""
    workers: int = 2
    """Grading processes."""
    answer_patterns: list[str] = field(default_factory=list)
    """Extra regexes (first group = answer) tried after \\boxed{}, <answer> and 'answer is'."""
    numeric_rel_tol: float = 1e-6
    """Relative tolerance of the numeric domain."""
    numeric_abs_tol: float = 1e-9
    """Absolute tolerance of the numeric domain."""
    math_float_rounding: int = 6
    """Decimal places math-verify rounds floats to before comparing."""
    fallback_extraction: bool = True
    """Math and numeric domains: an answer part with no \\boxed{}, <answer> or "answer is" gives
    its last LaTeX expression or number (grade_detail "answer from fallback_latex" /
    "fallback_number", so it can be filtered on). Never from inside an unclosed <think>."""


@dataclass(frozen=True)
class GradeJob:
    text: str
    reference: str
    domain: str
    choices: list[str] | None
    config: GradeConfig


def grade_one(job: GradeJob) -> tuple[str, str | None, str]:
    """Verdict, extracted answer and how it was found, for one trace (runs in a worker)."""
    fallback = job.config.fallback_extraction and job.domain in ("math", "numeric")
    extracted, source = answers.extract_answer(job.text, job.config.answer_patterns, fallback)
    if extracted is None:
        return verify.NO_ANSWER, None, "no final answer found"
    verdict = verify.compare(
        extracted, job.reference, job.domain, job.choices, job.config.numeric_rel_tol,
        job.config.numeric_abs_tol, job.config.math_float_rounding,
    )
    return verdict, extracted, f"answer from {source}"


def grade_table(traces: pa.Table, config: GradeConfig, pool: TimeoutPool) -> pa.Table:
    """Add the grade columns to a traces table (one verdict per row, in order)."""
    rows = traces.to_pylist()
    jobs = [GradeJob(r["text"], r["answer"], r["domain"], r["choices"], config) for r in rows]
    for row, result in zip(rows, pool.map(jobs)):
        if isinstance(result, TimedOut):
            verdict, extracted, detail = verify.TIMEOUT, None, f"grading took over {result.seconds:g}s"
        elif isinstance(result, Failed):
            # a grader bug must not pass as a wrong answer: keep it visible and unverifiable
            verdict, extracted, detail = verify.UNVERIFIABLE, None, "grader error: " + result.error[-500:]
        else:
            verdict, extracted, detail = result
        row.update(verdict=verdict, extracted_answer=extracted, grade_detail=detail,
                   format_ok=answers.format_ok(row["text"]))
    return schema.table(rows, schema.extend(traces.schema, schema.GRADE_COLUMNS))


def make_pool(config: GradeConfig) -> TimeoutPool:
    return TimeoutPool(grade_one, workers=config.workers, timeout_s=config.timeout_s)
