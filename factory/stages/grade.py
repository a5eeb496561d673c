"""Stage `grade`: judge each trace's final answer against the reference.

In:  traces (rollout's table).   Out: graded = traces + extracted_answer, verdict,
format_ok, grade_detail. Grading drops nothing: every trace gets a verdict, one of
correct | wrong | no_answer | unverifiable (the reference can't be read) | timeout.

Problems ingested without a reference (`ingest.allow_unlabeled`) are labelled first
(`label_unlabeled`): the majority answer of their traces, equivalent answers counted together
by the grader, becomes the reference (`reference_source` majority, `reference_agreement` its
share of the traces) when it has at least `unlabeled_min_agreement`; otherwise the problem's
traces are rejected (`low_agreement` / `no_majority`, with the votes). A majority-labelled
problem's pass rate is at least its agreement by construction: it measures consistency, not
accuracy. A problem's traces share a rollout shard, so the vote sees all of them.

A trace whose answer part boxes several distinct answers (R1 boxes each part of a multi-part
answer) is graded on all of them as one answer, a set, an ordered tuple or a union as the
reference is written (verify.compare_boxes); `grade_detail` names the rule ("multi-box: 3
boxes as an unordered set"). One box is read as before ("answer from boxed").

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
    unlabeled_min_agreement: float = 0.6
    """Unlabeled problems: the share of a problem's traces that must give the majority answer
    for it to become the reference (else the problem is dropped as low_agreement)."""
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
    if source == "boxes":  # several boxed answers: one multi-part answer, compared as a whole
        verdict, extracted, rule = verify.compare_boxes(
            answers.answer_boxes(job.text), job.reference, job.domain, job.choices, job.config.numeric_rel_tol,
            job.config.numeric_abs_tol, job.config.math_float_rounding,
        )
        return verdict, extracted, f"multi-box: {rule}"
    verdict = verify.compare(
        extracted, job.reference, job.domain, job.choices, job.config.numeric_rel_tol,
        job.config.numeric_abs_tol, job.config.math_float_rounding,
    )
    return verdict, extracted, f"answer from {source}"


def vote(extracted: list[str | None], same: dict[tuple[str, str], bool]) -> list[tuple[str, int]]:
    """Cluster equivalent answers; returns (representative, votes) sorted by votes, first-seen
    first on ties. `same[(a, b)]` says whether normalized answers a and b are equivalent
    (pairs not in it are different); None answers do not vote."""
    clusters: list[list] = []  # [representative, normalized rep, votes]
    for a in extracted:
        if a is None:
            continue
        n = answers.vote_key(a)
        for c in clusters:
            if n == c[1] or same.get((n, c[1])) or same.get((c[1], n)):
                c[2] += 1
                break
        else:
            clusters.append([a, n, 1])
    order = sorted(range(len(clusters)), key=lambda i: (-clusters[i][2], i))
    return [(clusters[i][0], clusters[i][2]) for i in order]


def equivalences(groups: list[tuple[list[str | None], str, list[str] | None]], grade: GradeConfig,
                 pool: TimeoutPool) -> dict[tuple[str, str], bool]:
    """Which distinct answers within each group are equivalent, by the grader (math-verify for
    math) in the worker pool: one job per unordered pair of distinct normalized answers."""
    jobs, keys = [], []
    for extracted, domain, choices in groups:
        distinct = {}
        for a in extracted:
            if a is not None:
                distinct.setdefault(answers.vote_key(a), a)
        items = list(distinct.items())
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                keys.append((items[i][0], items[j][0]))
                jobs.append(GradeJob(answers.as_completion(items[i][1]), items[j][1], domain, choices, grade))
    out = {}
    for key, result in zip(keys, pool.map(jobs)):
        out[key] = isinstance(result, tuple) and result[0] == "correct"  # timeouts and errors: different
    return out


def label_unlabeled(traces: pa.Table, config: GradeConfig, pool: TimeoutPool) -> tuple[pa.Table, list[dict], dict]:
    """Give unlabeled problems their traces' majority answer as reference; returns (traces with
    labels, rejected rows for the problems that got none, counts)."""
    if "reference_source" not in traces.column_names or \
            "unlabeled" not in set(traces.column("reference_source").to_pylist()):
        return traces, [], {}
    rows = traces.to_pylist()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["reference_source"] == "unlabeled":
            groups.setdefault(r["problem_id"], []).append(r)
    extracted = {pid: [answers.extract_answer(r["text"], config.answer_patterns,
                                              config.fallback_extraction and r["domain"] in ("math", "numeric"))[0]
                       for r in group] for pid, group in groups.items()}
    same = equivalences([(extracted[pid], g[0]["domain"], g[0]["choices"]) for pid, g in groups.items()], config, pool)
    rejected, dropped, counts = [], set(), {"labelled": 0, "low_agreement": 0, "no_majority": 0}
    for pid, group in groups.items():
        ranked = vote(extracted[pid], same)
        votes = ", ".join(f"{a!r} x{v}" for a, v in ranked[:3]) or "no answers"
        if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
            reason, detail = "no_majority", f"the {len(group)} traces' answers have no single majority ({votes})"
        elif ranked[0][1] / len(group) < config.unlabeled_min_agreement:
            reason, detail = "low_agreement", (f"majority answer {ranked[0][0]!r} has {ranked[0][1]}/{len(group)} votes "
                                               f"< unlabeled_min_agreement {config.unlabeled_min_agreement} ({votes})")
        else:
            reason = None
            for r in group:
                r.update(answer=ranked[0][0], reference_source="majority", reference_agreement=ranked[0][1] / len(group))
            counts["labelled"] += 1
        if reason:
            counts[reason] += 1
            dropped.add(pid)
            for r in group:
                r["reference_agreement"] = (ranked[0][1] / len(group)) if ranked else 0.0
                rejected.append(schema.rejected_row("grade", reason, r, detail, problem_id=pid, trace_id=r["trace_id"]))
    kept = [r for r in rows if r["problem_id"] not in dropped]
    return schema.table(kept, traces.schema), rejected, {"unlabeled": counts}


def grade_many(jobs: list[GradeJob], pool: TimeoutPool) -> list[tuple[str, str | None, str]]:
    """(verdict, extracted answer, detail) per job, in order: the grade stage's verdicts, and the
    GRPO trainer's accuracy reward (factory.training.grpo), from this one function."""
    out = []
    for result in pool.map(jobs):
        if isinstance(result, TimedOut):
            out.append((verify.TIMEOUT, None, f"grading took over {result.seconds:g}s"))
        elif isinstance(result, Failed):
            # a grader bug must not pass as a wrong answer: keep it visible and unverifiable
            out.append((verify.UNVERIFIABLE, None, "grader error: " + result.error[-500:]))
        else:
            out.append(result)
    return out


def grade_table(traces: pa.Table, config: GradeConfig, pool: TimeoutPool) -> pa.Table:
    """Add the grade columns to a traces table (one verdict per row, in order)."""
    rows = traces.to_pylist()
    jobs = [GradeJob(r["text"], r["answer"], r["domain"], r["choices"], config) for r in rows]
    for row, (verdict, extracted, detail) in zip(rows, grade_many(jobs, pool)):
        row.update(verdict=verdict, extracted_answer=extracted, grade_detail=detail,
                   format_ok=answers.format_ok(row["text"]))
    return schema.table(rows, schema.extend(traces.schema, schema.GRADE_COLUMNS))


def make_pool(config: GradeConfig) -> TimeoutPool:
    return TimeoutPool(grade_one, workers=config.workers, timeout_s=config.timeout_s)
