"""Stage `judge` (optional): an LLM judge for the traces the symbolic grader could not settle.

In:  graded traces.   Out: graded + judge_verdict, judge_text, judge_model.

A trace goes to the judge when its verdict is in `judge.verdicts`: by default `unverifiable`
(the reference can't be read) and `no_answer` with an answer part present (the trace answered
in a form extraction missed); add `wrong` to re-check answers the grader compared and found
different (open-r1 recovered about 12% of OpenR1-Math this way where math-verify failed). The
judge sees the question, the reference and the trace's answer, and its reply is read as
correct / wrong (`yes_pattern` / `no_pattern`) or `unclear`.

The symbolic verdict is never overwritten: `judge_verdict` sits beside it, null for traces
not judged. Curate (with `curate.use_judge`, the default) counts the judge's correct / wrong
in place of the symbolic verdict, for the pass rate too; `unclear` leaves the symbolic one.
The manifest counts judged, flipped (the judge's verdict differs from the symbolic one),
unclear and failed traces. Traces of one problem with the same answer share one judgement.

The judge is an engine like the teacher: `judge.model` names a model served with the
engine section's settings (in-process or the same server), or, unset, the teacher judges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from factory import answers, schema
from factory.engines import Engine, Sampling

DEFAULT_TEMPLATE = (
    "You are checking a student's final answer against the reference answer.\n\n"
    "Problem:\n{question}\n\nReference answer: {reference}\nStudent's answer: {answer}\n\n"
    "Are the two answers mathematically equivalent (same value, set, expression or choice; "
    "ignore formatting and units written differently)? Reply with one word: yes or no."
)
CORRECT, WRONG, UNCLEAR = "correct", "wrong", "unclear"


@dataclass
class JudgeConfig:
    model: str | None = None
    """The judge model, served with the engine section's settings (backend, server, dtype);
    unset: the teacher engine judges."""
    verdicts: list[str] = field(default_factory=lambda: ["unverifiable", "no_answer"])
    """Symbolic verdicts sent to the judge (any of wrong, no_answer, unverifiable, timeout)."""
    require_answer_part: bool = True
    """Judge a trace only when it has an answer part (its <think> closed, or it had none)."""
    template: str = DEFAULT_TEMPLATE
    """The judge's user message; {question}, {reference}, {answer} (the extracted answer, else
    the trace's answer part, cut to max_answer_chars)."""
    system_prompt: str | None = None
    max_answer_chars: int = 1000
    """Longer answer parts are cut (from the start: the end holds the final answer)."""
    max_tokens: int = 64
    """The judge's reply budget (a reasoning judge needs more: its reply is read after </think>)."""
    temperature: float = 0.0
    seed: int = 0
    yes_pattern: str = r"^\W*(yes|equivalent|same|correct|true)\b"
    """Read from the reply (case-insensitive, after any </think>): a match is `correct`."""
    no_pattern: str = r"^\W*(no|not|different|incorrect|wrong|false)\b"
    """A match is `wrong`; a reply matching neither is `unclear`."""


def check(cfg: JudgeConfig) -> None:
    from factory.verify import CORRECT as SYMBOLIC_CORRECT

    allowed = set(schema.VERDICTS) - {SYMBOLIC_CORRECT}
    bad = [v for v in cfg.verdicts if v not in allowed]
    if bad:
        raise ValueError(f"judge.verdicts has {bad}; use any of {', '.join(sorted(allowed))}")
    for key in ("yes_pattern", "no_pattern"):
        try:
            re.compile(getattr(cfg, key))
        except re.error as e:
            raise ValueError(f"judge.{key}={getattr(cfg, key)!r} is not a regex ({e})") from None
    missing = [k for k in ("{reference}", "{answer}") if k not in cfg.template]
    if missing:
        raise ValueError(f"judge.template lacks {', '.join(missing)}")


def wants_judge(row: dict, cfg: JudgeConfig) -> bool:
    if row["verdict"] not in cfg.verdicts:
        return False
    return not cfg.require_answer_part or bool((row.get("answer_text") or "").strip())


def judge_prompt(row: dict, cfg: JudgeConfig, engine: Engine) -> str:
    answer = row["extracted_answer"] or (row.get("answer_text") or "").strip()
    if len(answer) > cfg.max_answer_chars:
        answer = "..." + answer[-cfg.max_answer_chars:]
    content = cfg.template.format(question=row["question"], reference=row["answer"], answer=answer)
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": content}]
    return engine.apply_chat_template(messages)


def read_reply(text: str, cfg: JudgeConfig) -> str:
    reply = answers.split_think(text).answer_text if answers.THINK_CLOSE in text else text
    reply = (reply or "").strip()
    if re.search(cfg.yes_pattern, reply, re.I):
        return CORRECT
    if re.search(cfg.no_pattern, reply, re.I):
        return WRONG
    return UNCLEAR


def effective_verdict(row: dict) -> str:
    """The verdict curate counts: the judge's correct / wrong where it gave one, else the symbolic one."""
    jv = row.get("judge_verdict")
    return jv if jv in (CORRECT, WRONG) else row["verdict"]


def judge_table(graded: pa.Table, cfg: JudgeConfig, engine: Engine) -> tuple[pa.Table, dict, dict]:
    """Judge the rows that want it; returns (table + schema.JUDGE_COLUMNS, counts, failures): a row
    whose judgement failed for good counts in counts["failed"] and, by its cause (the start of the
    request's error, e.g. http_500), in failures, the per-cause count every stage reports."""
    check(cfg)
    rows = graded.to_pylist()
    for r in rows:
        r.update(judge_verdict=None, judge_text=None, judge_model=None)
    counts = {"judged": 0, "flipped": 0, "unclear": 0, "failed": 0}
    failures: dict[str, int] = {}
    asks: dict[tuple[str, str], list[int]] = {}  # one judgement per (problem, prompt): traces often agree
    for i, r in enumerate(rows):
        if wants_judge(r, cfg):
            asks.setdefault((r["problem_id"], judge_prompt(r, cfg, engine)), []).append(i)
    if asks:
        sampling = Sampling(n=1, temperature=cfg.temperature, top_p=1.0, max_tokens=cfg.max_tokens, seed=cfg.seed)
        outs = engine.generate([prompt for _, prompt in asks], [sampling] * len(asks))
        for idx, out in zip(asks.values(), outs):
            completion = out[0]
            for i in idx:
                if completion.error:  # a server request that failed its retries: not a judgement
                    counts["failed"] += 1
                    cause = completion.error.split(":", 1)[0]
                    failures[cause] = failures.get(cause, 0) + 1
                    continue
                verdict = read_reply(completion.text, cfg)
                rows[i].update(judge_verdict=verdict, judge_text=completion.text, judge_model=engine.model_name)
                counts["judged"] += 1
                counts["unclear"] += verdict == UNCLEAR
                counts["flipped"] += verdict != UNCLEAR and (verdict == CORRECT) != (rows[i]["verdict"] == CORRECT)
    return schema.table(rows, schema.extend(graded.schema, schema.JUDGE_COLUMNS)), counts, failures
