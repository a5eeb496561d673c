"""Stage `rollout`: K reasoning traces per problem from the teacher.

In:  problems.   Out: traces (schema.TRACES), one row per sample; problems whose prompt
does not fit the engine's context are rejected (prompt_too_long) instead of failing a batch,
and samples whose server request failed after its retries are rejected (request_failed).

All K samples of a problem are one request (`Sampling(n=K)`) so its prompt is prefilled
once. Each request's seed derives from (rollout.seed, problem_id): a problem gets the same
traces whichever shard it lands in and however often the run is resumed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from factory import answers, schema
from factory.engines import Completion, Engine, Sampling

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {question} Assistant:"
)


@dataclass
class RolloutConfig:
    num_traces: int = 8
    """K: traces per problem; the pass rate over them is the problem's difficulty."""
    temperature: float = 0.6
    """Sampling temperature (0.6 with top_p 0.95 is DeepSeek-R1's recommendation)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_tokens: int = 4096
    """Completion budget per trace; traces that hit it are marked truncated."""
    seed: int = 0
    """Base seed; each request's seed is derived from it and the problem id."""
    prompt_format: str = "chat"
    """chat: the model's chat template; r1_zero: DeepSeek-R1-Zero's plain-text template."""
    system_prompt: str | None = None
    """Optional system message (chat format only)."""
    question_template: str = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    """How the question is put to the teacher; {question} is replaced, {{ }} are literal braces."""
    chat_template: str | None = None
    """Override of the tokenizer's chat template: a Jinja string or a path to a .jinja file."""
    stop: list[str] | None = None
    """Extra stop strings."""
    max_think_tokens: int | None = None
    """Thinking budget (s1's budget forcing): a sample still inside <think> after this many
    tokens is closed with `force_answer_text` and continued for `forced_answer_tokens` more,
    flagged forced_answer; one that closed its think block in time but is cut while
    answering gets the rest of max_tokens. Unset: no budget (max_tokens alone)."""
    forced_answer_tokens: int = 64
    """Answer budget after a forced close."""
    force_answer_text: str = "\n</think>\n\n"
    """Appended to a sample cut inside its thinking, before the answer is asked for."""
    retry_failed: bool = True
    """A re-run sends again the requests that failed for good in an earlier run (after the
    client's retries): rollout's failed samples (only those, with their own seeds, so the
    recovered traces are a fault-free run's), and the failed requests of rewrite and the judge
    (their shards are redone; the server's journal answers what had succeeded). false: such
    failures stay request_failed rows."""


def check_budget(cfg: RolloutConfig) -> None:
    if cfg.max_think_tokens is not None and not 0 < cfg.max_think_tokens < cfg.max_tokens:
        raise ValueError(f"rollout.max_think_tokens={cfg.max_think_tokens} must be between 0 and "
                         f"rollout.max_tokens={cfg.max_tokens} (the budget leaves room for the answer)")
    if cfg.max_think_tokens is not None and answers.THINK_CLOSE not in cfg.force_answer_text:
        raise ValueError(f"rollout.force_answer_text={cfg.force_answer_text!r} must close the think block (</think>)")



def request_seed(base: int, problem_id: str) -> int:
    return int(hashlib.sha256(f"{base}:{problem_id}".encode()).hexdigest()[:8], 16)


def trace_id(problem_id: str, sample_index: int, sampling_key: str) -> str:
    return hashlib.sha256(f"{problem_id}:{sample_index}:{sampling_key}".encode()).hexdigest()[:16]


def prompt_messages(question: str, cfg: RolloutConfig) -> list[dict]:
    """The conversation that curriculum and DPO rows use as their `prompt`."""
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return msgs + [{"role": "user", "content": cfg.question_template.format(question=question)}]


def render_prompt(question: str, cfg: RolloutConfig, engine: Engine) -> str:
    if cfg.prompt_format == "r1_zero":
        return R1_ZERO_TEMPLATE.format(question=question)
    if cfg.prompt_format != "chat":
        raise ValueError(f"rollout.prompt_format={cfg.prompt_format!r}; use chat or r1_zero")
    template = cfg.chat_template
    if template and Path(template).is_file():
        template = Path(template).read_text()
    return engine.apply_chat_template(prompt_messages(question, cfg), template)


@dataclass
class Prepared:
    """A problem's request: its row, the rendered prompt and its ids, and its sampling."""
    row: dict
    prompt: str
    ids: list
    sampling: Sampling


def sampling_key(cfg: RolloutConfig, model: str) -> str:
    """What a trace id hashes besides (problem, sample): model, sampling and format, not the
    per-request seed or a budget shrunk to fit the context (so ids are stable)."""
    base = Sampling(n=cfg.num_traces, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                    stop=tuple(cfg.stop or ()))
    key = {"model": model, **{k: v for k, v in base.to_dict().items() if k != "seed"},
           "seed": cfg.seed, "format": cfg.prompt_format}
    if cfg.max_think_tokens is not None:  # (absent otherwise: ids of runs without a budget stay as they were)
        key["think_budget"] = [cfg.max_think_tokens, cfg.forced_answer_tokens, cfg.force_answer_text]
    return json.dumps(key, sort_keys=True)


def prepare(rows: list[dict], cfg: RolloutConfig, engine: Engine) -> tuple[list[Prepared], list[dict], int]:
    """Render and tokenize each problem's prompt once: to reject prompts that can't fit (vLLM
    would fail the whole batch, a server the request) and to hand the engine ids. A prompt that
    fits but leaves less than max_tokens gets the budget that is left (a server would answer
    400; NeMo-Skills shrinks the same way); its `sampling` column records the budget it had.

    Returns:
        (requests, rejected rows (prompt_too_long), number of budgets shrunk).
    """
    check_budget(cfg)
    if cfg.max_think_tokens is not None and not getattr(engine, "can_continue", True):
        raise ValueError("rollout.max_think_tokens continues cut traces from their text: it needs "
                         "engine.server.api: completions (a chat API cannot continue a message)")
    prompts = [render_prompt(r["question"], cfg, engine) for r in rows]
    token_ids = engine.tokenize(prompts) if prompts else []  # a tokenizer fails on an empty batch
    fits, rejected, shrunk = [], [], 0
    for row, prompt, ids in zip(rows, prompts, token_ids):
        room = engine.max_model_len - len(ids)
        if room <= 0:
            rejected.append(schema.rejected_row(
                "rollout", "prompt_too_long", row, problem_id=row["problem_id"],
                detail=f"prompt has {len(ids)} tokens; engine.max_model_len is {engine.max_model_len}"))
            continue
        shrunk += room < cfg.max_tokens and bool(ids)  # a hosted chat API gives no local ids
        budget = min(cfg.max_tokens, room) if ids else cfg.max_tokens
        if cfg.max_think_tokens is not None:  # the first phase stops at the thinking budget
            budget = min(budget, cfg.max_think_tokens)
        fits.append(Prepared(row, prompt, ids, Sampling(
            n=cfg.num_traces, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget,
            seed=request_seed(cfg.seed, row["problem_id"]), stop=tuple(cfg.stop or ()))))
    return fits, rejected, shrunk


# -- the thinking budget ---------------------------------------------------------------------

def think_prefix(p: Prepared) -> str:
    # an R1-distill template prefills "<think>\n": the completion is inside the block from its start
    return answers.THINK_OPEN + "\n" if p.prompt.rstrip().endswith(answers.THINK_OPEN) else ""


def continuations(p: Prepared, completions: list[Completion], cfg: RolloutConfig, engine: Engine) -> list[tuple]:
    """The second requests of a budgeted rollout: (sample index, prompt ids, sampling, forced)
    for each sample the first phase cut at the budget. Inside <think>: closed with
    force_answer_text and given forced_answer_tokens; already answering: continued with the
    rest of max_tokens. Samples that ended on their own need nothing."""
    if cfg.max_think_tokens is None:
        return []
    out = []
    for k, c in enumerate(completions):
        if c.error is not None or c.finish_reason != "length":
            continue
        text = think_prefix(p) + c.text
        split = answers.split_think(text)
        forced = split.reasoning is not None and not split.think_closed
        prompt = p.prompt + c.text + (cfg.force_answer_text if forced else "")
        ids = engine.tokenize([prompt])[0]
        budget = cfg.forced_answer_tokens if forced else cfg.max_tokens - c.num_tokens
        room = engine.max_model_len - len(ids) if len(ids) else budget
        if budget <= 0 or room <= 0:
            continue  # no room left: the sample stays truncated
        seed = None if p.sampling.seed is None else request_seed(p.sampling.seed, f"continue:{k}")
        out.append((k, ids, replace(p.sampling, n=1, max_tokens=min(budget, room), seed=seed), forced))
    return out


def merge_continuation(first: Completion, second: Completion, forced: bool, cfg: RolloutConfig) -> Completion:
    """A sample's two phases as one completion: its text reads as one trace (the forced close
    included), its tokens are the generated ones, its finish reason the second phase's."""
    if second.error is not None:
        return Completion(first.text, first.num_tokens, first.finish_reason, second.error, first.max_tokens, forced)
    return Completion(first.text + (cfg.force_answer_text if forced else "") + second.text,
                      first.num_tokens + second.num_tokens, second.finish_reason, None, first.max_tokens, forced)



def trace_rows(p: Prepared, completions: list[Completion], key: str, model: str) -> tuple[list[dict], list[dict], int]:
    """A problem's K completions as trace rows (and request_failed rejections); returns tokens too."""
    row = p.row
    # an R1-distill template prefills "<think>\n": put it back so the trace reads whole
    prefix = think_prefix(p)
    traces, rejected, tokens = [], [], 0
    sampling_json: dict[int | None, str] = {}  # per budget: a problem's K traces share one or two
    for k, c in enumerate(completions):
        tid = trace_id(row["problem_id"], k, key)
        if c.error is not None:  # a server request that failed after its retries
            rejected.append(schema.rejected_row("rollout", "request_failed", {**row, "sample_index": k},
                                                problem_id=row["problem_id"], trace_id=tid, detail=c.error))
            continue
        if c.max_tokens not in sampling_json:
            request = p.sampling if c.max_tokens is None else replace(p.sampling, max_tokens=c.max_tokens)
            sampling_json[c.max_tokens] = json.dumps(request.to_dict())
        text = prefix + c.text
        split = answers.split_think(text)
        tokens += c.num_tokens
        traces.append({
            **row, "trace_id": tid, "sample_index": k,
            "text": text, "reasoning": split.reasoning, "answer_text": split.answer_text,
            "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
            "truncated": c.finish_reason == "length", "forced_answer": c.forced_answer, "teacher_model": model,
            "sampling": sampling_json[c.max_tokens],
        })
    return traces, rejected, tokens


def rollout_table(problems: pa.Table, cfg: RolloutConfig, engine: Engine, progress: bool = False) -> tuple[pa.Table, pa.Table, dict]:
    """Generate K traces for each problem of `problems` in one engine call (the Ray executor's
    unit; the local executor streams every shard through `factory.run.continuous`).

    Returns:
        (traces, rejected, stats) with stats holding tokens and seconds for tokens/s.
    """
    fits, rejected, shrunk = prepare(problems.to_pylist(), cfg, engine)
    t0 = time.perf_counter()
    outputs = engine.generate([p.ids for p in fits], [p.sampling for p in fits], progress=progress) if fits else []
    second = [(i, *c) for i, (p, out) in enumerate(zip(fits, outputs)) for c in continuations(p, out, cfg, engine)]
    if second:  # the thinking budget's second phase, all in one call
        more = engine.generate([c[2] for c in second], [c[3] for c in second])
        for (i, k, _, _, forced), got in zip(second, more):
            outputs[i] = list(outputs[i])
            outputs[i][k] = merge_continuation(outputs[i][k], got[0], forced, cfg)
    seconds = time.perf_counter() - t0
    key, traces, tokens, prompt_tokens = sampling_key(cfg, engine.model_name), [], 0, 0
    for p, completions in zip(fits, outputs):
        t, r, n = trace_rows(p, completions, key, engine.model_name)
        traces += t
        rejected += r
        tokens += n
        prompt_tokens += len(p.ids) * len(t)
    stats = {"generated_tokens": tokens, "prompt_tokens": prompt_tokens, "generate_seconds": seconds,
             "budget_shrunk": shrunk}
    return traces_table(traces, problems.schema), schema.table(rejected, schema.REJECTED), stats


def traces_table(traces: list[dict], problems_schema: pa.Schema) -> pa.Table:
    return schema.table(traces, schema.extend(problems_schema, schema.ROLLOUT_COLUMNS))
