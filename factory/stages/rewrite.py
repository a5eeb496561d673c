"""Stage `rewrite`: more problems from the ones we have, kept only when a check backs them.

In:  problems (ingest's table).   Out: the same problems plus accepted rewrites, with
`origin` (original | paraphrase | variant), `parent_problem_id` and the check's outcome
(schema.REWRITE_COLUMNS); rejected rewrites go to rejected/rewrite/ with the reason.

Two modes, each asking the rewriter model (`rewrite.model`, by default the teacher) with a
prompt template from the recipe:

- paraphrase: the same problem in other words. The teacher answers the rewrite
  `check_samples` times; the paraphrase is kept only if the majority answer equals the
  parent's reference (`answer_changed` or `no_majority` otherwise).
- variant: a new problem in the parent's style (other numbers), whose answer nobody knows.
  Its answer is the teacher's majority answer (a pseudo-label), kept only if that answer got
  at least `min_agreement` of the votes (`low_agreement` otherwise).

The check's rollouts use their own seeds (derived from `rewrite.seed`), never the rollout
stage's: a variant's difficulty is measured later by the rollout stage on an independent set
of K traces, not from the votes that labelled it. The votes are kept on the row
(check_answers, check_answer, check_votes, check_agreement) for anyone who wants to audit
them.

A rewrite is validated like an ingested row (empty, too long: `rewrite_<reason>`), must differ
from its parent (`rewrite_unchanged`), is dropped when its check could not run
(`check_prompt_too_long`, `check_request_failed` with a server backend; `request_failed`
when the rewriter's own request failed), and inherits its parent's split, source, domain and
level: a rewrite of a held-out problem is held out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import pyarrow as pa

from factory import answers, schema
from factory.stages.dedup import exact_key
from factory.engines import Engine, Sampling
from factory.stages.grade import GradeConfig, GradeJob, equivalences, vote
from factory.stages.ingest import IngestConfig, Raw, validate
from factory.stages.rollout import RolloutConfig, request_seed, rollout_table
from factory.workers import TimeoutPool

MODES = ("paraphrase", "variant")


@dataclass
class RewriteConfig:
    modes: list[str] = field(default_factory=lambda: ["paraphrase"])
    """Which rewrites to make: paraphrase, variant, or both."""
    per_problem: int = 1
    """Rewrites asked for per problem and mode."""
    model: str | None = None
    """Rewriter model directory; unset: the teacher (engine.model) rewrites."""
    paraphrase_prompt: str = (
        "Rewrite the following problem in different words. Keep every number and every condition, "
        "so that its answer stays the same. Reply with the rewritten problem only.\n\n{question}")
    """User message asking for a paraphrase; {question} is the parent's question."""
    variant_prompt: str = (
        "Write a new problem in the same style as the following one, with different numbers. "
        "Reply with the new problem only.\n\n{question}")
    """User message asking for a variant; {question} is the parent's question."""
    temperature: float = 0.8
    """Rewriter sampling temperature."""
    top_p: float = 0.95
    """Rewriter nucleus sampling mass."""
    max_tokens: int = 512
    """Rewriter completion budget (a reasoning rewriter needs room for its <think> block)."""
    seed: int = 0
    """Base seed of the rewriter's requests and of the check's rollouts."""
    check_samples: int = 8
    """Teacher rollouts per rewrite for the check (the rollout section's prompt and sampling)."""
    min_agreement: float = 0.6
    """Variants: share of check_samples that must agree on the majority answer."""
    splits: list[str] | None = None
    """Rewrite only problems of these splits; unset: all (rewrites keep their parent's split)."""


def check_config(cfg: RewriteConfig) -> None:
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise ValueError(f"rewrite.modes={cfg.modes!r}; use one or both of {', '.join(MODES)}")
    if not 0.0 < cfg.min_agreement <= 1.0:
        raise ValueError(f"rewrite.min_agreement={cfg.min_agreement}; use a share in (0, 1]")
    if cfg.check_samples < 1 or cfg.per_problem < 1:
        raise ValueError("rewrite.check_samples and rewrite.per_problem must be at least 1")


_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten|new|paraphrased)?\s*(?:problem|question)\s*:\s*(?:\*\*)?\s*", re.I)


def parse_rewrite(text: str) -> str:
    """The rewritten question from a completion: after </think> when the rewriter reasons,
    without a leading 'New problem:' label or wrapping quotes."""
    split = answers.split_think(text)
    body = split.answer_text if split.answer_text is not None else text
    body = _LABEL.sub("", body.strip()).strip()
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        body = body[1:-1].strip()
    return body


def decide(mode: str, ranked: list[tuple[str, int]], samples: int, reference_matches: bool | None,
           min_agreement: float) -> tuple[str | None, str]:
    """Accept or reject one rewrite from its check votes.

    Args:
        ranked: vote()'s clusters. samples: check rollouts (the agreement's denominator,
            unanswered ones included). reference_matches: paraphrase only, whether the
            majority answer equals the parent's reference.
    Returns:
        (None, why) when accepted, else (drop reason, detail).
    """
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        tops = ", ".join(f"{a!r} x{v}" for a, v in ranked[:3]) or "no answers"
        return "no_majority", f"the teacher's {samples} answers have no single majority ({tops})"
    answer, votes = ranked[0]
    if mode == "paraphrase":
        if not reference_matches:
            return "answer_changed", f"majority answer {answer!r} ({votes}/{samples}) differs from the reference"
        return None, f"majority answer {answer!r} ({votes}/{samples}) equals the reference"
    share = votes / samples
    if share < min_agreement:
        return "low_agreement", f"majority answer {answer!r} has {votes}/{samples} votes < min_agreement {min_agreement}"
    return None, f"pseudo-label {answer!r} with {votes}/{samples} votes"


def rewrite_table(problems: pa.Table, cfg: RewriteConfig, rewriter: Engine, teacher: Engine,
                  rollout: RolloutConfig, grade: GradeConfig, ingest: IngestConfig,
                  pool: TimeoutPool) -> tuple[pa.Table, pa.Table, dict]:
    """Rewrite the problems of one shard and check the rewrites with the teacher.

    Returns:
        (originals + accepted rewrites, rejected rewrites, stats counting both per mode).
    """
    check_config(cfg)
    # a rewrite is a row in our own fields: checked like an ingested one, without the
    # input-side settings (column names, answer_from, options) that read the source files
    checks = replace(ingest, preset=None, columns={}, answer_from="column", choice_columns=[], shuffle_choices=False,
                     choices_in_question=False, allow_unlabeled=False)
    rows = problems.to_pylist()
    out_schema = schema.extend(problems.schema, schema.REWRITE_COLUMNS)
    parents = [r for r in rows if cfg.splits is None or r["split"] in cfg.splits]
    rejected: list[dict] = []
    counts = {f"{m}_{k}": 0 for m in cfg.modes for k in ("asked", "accepted")}

    def reject(cand: dict, reason: str, detail: str) -> None:
        rejected.append(schema.rejected_row("rewrite", reason, cand, detail, problem_id=cand["problem_id"]))

    # 1. ask the rewriter
    requests = [(p, m) for p in parents for m in cfg.modes]
    prompts = [rewriter.apply_chat_template([{"role": "user", "content": getattr(cfg, f"{m}_prompt").format(
        question=p["question"])}]) for p, m in requests]
    sampling = [Sampling(n=cfg.per_problem, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                         seed=request_seed(cfg.seed, f"{p['problem_id']}:{m}")) for p, m in requests]
    prompt_ids = rewriter.tokenize(prompts) if requests else []
    outputs = rewriter.generate(prompt_ids, sampling) if requests else []
    tokens = {"prompt_tokens": sum(len(ids) * s.n for ids, s in zip(prompt_ids, sampling)),
              "generated_tokens": sum(c.num_tokens for cs in outputs for c in cs if c.error is None)}
    candidates = []
    for (parent, mode), completions in zip(requests, outputs):
        for k, c in enumerate(completions):
            counts[f"{mode}_asked"] += 1
            if c.error is not None:
                rejected.append(schema.rejected_row("rewrite", "request_failed", parent, c.error,
                                                    problem_id=f"{parent['problem_id']}~{mode}{k}"))
                continue
            question = parse_rewrite(c.text)
            # a variant's answer is unknown until the check votes on it
            cand = {**parent, "problem_id": f"{parent['problem_id']}~{mode}{k}", "question": question,
                    "answer": parent["answer"] if mode == "paraphrase" else None, "origin": mode,
                    "parent_problem_id": parent["problem_id"], "rewrite_model": rewriter.model_name}
            row, reason, detail = validate(Raw(f"rewrite of {parent['problem_id']}", k,
                                               {**cand, "answer": parent["answer"]}), checks)
            if row is None:
                reject(cand, f"rewrite_{reason}", detail)
            elif exact_key(question) == exact_key(parent["question"]):
                reject(cand, "rewrite_unchanged", "the rewrite is the parent's question")
            else:
                candidates.append(cand)
    # 2. the teacher answers every candidate check_samples times, on seeds of its own
    check_rollout = replace(rollout, num_traces=cfg.check_samples, seed=request_seed(cfg.seed, "rewrite-check"))
    if check_rollout.seed == rollout.seed:  # would reproduce the rollout stage's traces exactly
        raise ValueError("rewrite.seed gives the check the rollout stage's seed; pick another rewrite.seed")
    traces, check_rejected, check_stats = rollout_table(schema.table(candidates, problems.schema), check_rollout, teacher) \
        if candidates else (None, schema.table([], schema.REJECTED), {})
    for k in tokens:  # the rewriter's tokens and the teacher's check rollouts
        tokens[k] += check_stats.get(k, 0)
    unchecked: dict[str, tuple[str, str]] = {}  # a prompt too long, or a server request that failed
    for r in check_rejected.to_pylist():
        unchecked.setdefault(r["problem_id"], (f"check_{r['drop_reason']}", r["detail"]))
    by_id: dict[str, list[str | None]] = {}
    for t in traces.to_pylist() if traces is not None else []:
        extracted, _ = answers.extract_answer(t["text"], grade.answer_patterns)
        by_id.setdefault(t["problem_id"], []).append(extracted)
    checked = []
    for c in candidates:
        if c["problem_id"] in unchecked:
            reject(c, *unchecked[c["problem_id"]])
        else:
            checked.append(c)
    # 3. vote; a paraphrase's majority is compared with its parent's reference by the grader
    same = equivalences([(by_id[c["problem_id"]], c["domain"], c["choices"]) for c in checked], grade, pool)
    ranked = {c["problem_id"]: vote(by_id[c["problem_id"]], same) for c in checked}
    paraphrases = [c for c in checked if c["origin"] == "paraphrase" and ranked[c["problem_id"]]]
    jobs = [GradeJob(answers.as_completion(ranked[c["problem_id"]][0][0]), c["answer"], c["domain"], c["choices"], grade)
            for c in paraphrases]
    ref_ok = {c["problem_id"]: isinstance(r, tuple) and r[0] == "correct" for c, r in zip(paraphrases, pool.map(jobs))}
    accepted = []
    for c in checked:
        votes = by_id[c["problem_id"]]
        top = ranked[c["problem_id"]]
        c.update(check_answers=votes, check_answer=top[0][0] if top else None,
                 check_votes=top[0][1] if top else 0, check_agreement=(top[0][1] if top else 0) / len(votes))
        reason, detail = decide(c["origin"], top, len(votes), ref_ok.get(c["problem_id"]), cfg.min_agreement)
        if reason is None and c["origin"] == "variant":
            c["answer"] = c["check_answer"]  # the pseudo-label must pass the same checks as a reference
            row, why, msg = validate(Raw(f"rewrite of {c['parent_problem_id']}", 0, c), checks)
            reason, detail = (None, detail) if row else (f"rewrite_{why}", msg)
        if reason is None:
            accepted.append(c)
            counts[f"{c['origin']}_accepted"] += 1
        else:
            reject(c, reason, detail)
    out = schema.table(rows + accepted, out_schema)
    return out, schema.table(rejected, schema.REJECTED), {"rewrites": counts, **tokens}
