"""Math-Shepherd style Monte-Carlo step labels for a run's traces.

In:  a finished `factory run` (its graded traces) and the rollout engine.
Out: LABEL.output/labels.parquet, one row per trace (schema LABELS): its steps, and per step
     the share of N sampled continuations from that step's prefix that reach the reference
     answer (soft label), whether any does (hard label) and how many were sampled; `first_error` is the index of the
     first step with hard label 0, or -1 (ProcessBench's form). `split` puts a share of the
     problems aside (by a hash of problem_id) for evaluating the PRM trained on the rest.

A step prefix is the prompt the teacher saw, "<think>\\n", and the steps up to and including
this one (blank-line separated), ending on the step's last character; the teacher continues
from there, with another step or by closing the reasoning. With
`propagate_errors` (the default) sampling stops at a trace's first hard-0 step and the later
steps are labelled 0 (marked `propagated`): a chain that has already gone wrong is wrong.
Traces that can't be labelled (no reasoning, over the split limits, a prefix longer than the
engine's context, a continuation request that failed for good at a server: `request_failed`)
keep a row with their `status` and no labels; a failed continuation is never graded as a wrong
one. Running `factory prm label` again sends only what failed (the server's journal answers
the rest).

    factory prm label recipes/toy_addition_prm.yaml
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm.auto import tqdm

from factory import answers
from factory.engines import Engine, Sampling
from factory.stages.grade import GradeConfig, GradeJob, make_pool
from factory.stages.rollout import RolloutConfig, render_prompt, request_seed
from factory.workers import Failed, TimedOut
from prm.steps import OK, SplitConfig, split_steps

LABELS = pa.schema([
    ("problem_id", pa.string()), ("trace_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("domain", pa.string()), ("level", pa.int32()), ("split", pa.string()), ("verdict", pa.string()),
    ("steps", pa.list_(pa.string())), ("step_soft", pa.list_(pa.float64())), ("step_hard", pa.list_(pa.int32())),
    ("propagated", pa.list_(pa.bool_())), ("step_samples", pa.list_(pa.int32())), ("first_error", pa.int32()), ("status", pa.string()),
    ("label_source", pa.string()),
])


@dataclass
class LabelConfig:
    run_dir: str = ""
    """The `factory run` whose graded traces are labelled."""
    output: str = "runs/prm_labels"
    """Directory for labels.parquet."""
    num_completions: int = 8
    """N: continuations sampled from each step prefix."""
    max_completions: int | None = None
    """When all N continuations of a prefix miss the answer, sample N more at a time up to this
    many before calling the step wrong (None: N only). A weak completer makes false "wrong" labels
    on long problems; this spends the extra samples only on those prefixes."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    """Budget of each continuation."""
    seed: int = 0
    max_traces: int | None = None
    """Label at most this many traces (the first by trace_id); None: all."""
    verdicts: list[str] = field(default_factory=lambda: ["correct", "wrong"])
    """Which traces to label (by the grader's verdict on the whole trace)."""
    propagate_errors: bool = True
    """Stop at the first hard-0 step; later steps are labelled 0."""
    heldout_fraction: float = 0.2
    """Share of problems whose traces get split=test."""


def split_of(problem_id: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha256(f"prm-split:{problem_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < heldout_fraction else "train"


def first_error(hard: list[int]) -> int:
    return next((i for i, h in enumerate(hard) if h == 0), -1)


def prefix_prompt(prompt: str, steps: list[str]) -> str:
    """The prompt, "<think>", and the steps up to this one (blank-line separated), ending right
    after the step's text: the model's next token decides between another step ("\n\n") and
    closing the reasoning ("\n</think>"). Ending on a newline would cut those tokens in two
    (byte-level BPE merges "\n\n") and decide for it."""
    head = prompt if prompt.rstrip().endswith(answers.THINK_OPEN) else prompt + answers.THINK_OPEN
    return head.rstrip("\n") + "\n" + "\n\n".join(steps)


def sample_prefixes(fits: dict[tuple, list[dict]], k: int, cfg: LabelConfig, grade: GradeConfig, engine: Engine,
                    pool) -> dict[tuple, tuple[int, int]]:
    """(continuations that reached the answer, continuations sampled) for each (prefix prompt,
    reference answer) key of `fits`; None for a key whose continuation request failed for good.
    Rounds of N continuations; a prefix gets another round while it has none right and
    `max_completions` allows (its seeds differ by round)."""
    counts = {p: (0, 0) for p in fits}
    failed = set()  # prefixes a continuation request of which failed for good: not labelled
    budget = max(cfg.num_completions, cfg.max_completions or 0)
    todo, rnd = list(fits), 0
    while todo:
        sampling = []
        for p in todo:
            n = min(cfg.num_completions, budget - counts[p][1])
            key = f"{fits[p][0]['row']['trace_id']}:{k}" + (f":{rnd}" if rnd else "")
            sampling.append(Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                     seed=request_seed(cfg.seed, key)))
        outs = engine.generate([p for p, _ in todo], sampling)
        jobs, owners, got = [], [], {}
        for p, completions in zip(todo, outs):
            it = fits[p][0]
            r, head = it["row"], answers.THINK_OPEN + "\n" + "\n\n".join(it["steps"][: k + 1])
            if any(c.error is not None for c in completions):  # never graded as a wrong continuation
                failed.add(p)
                got[p] = 0
                continue
            for c in completions:
                jobs.append(GradeJob(head + c.text, r["answer"], r["domain"], r["choices"], grade))
                owners.append(p)
            counts[p], got[p] = (counts[p][0], counts[p][1] + len(completions)), len(completions)
        for p, res in zip(owners, pool.map(jobs)):
            ok = not isinstance(res, (TimedOut, Failed)) and res[0] == "correct"
            counts[p] = (counts[p][0] + ok, counts[p][1])
        todo = [p for p in todo if counts[p][0] == 0 and got[p] and counts[p][1] < budget]
        rnd += 1
    for p in failed:
        counts[p] = None
    return counts


def label_traces(graded: pa.Table, cfg: LabelConfig, split_cfg: SplitConfig, rollout: RolloutConfig,
                 grade: GradeConfig, engine: Engine, progress: bool = True) -> pa.Table:
    """Monte-Carlo labels for every selected trace (one output row per trace)."""
    rows = sorted((r for r in graded.to_pylist() if r["verdict"] in cfg.verdicts), key=lambda r: r["trace_id"])
    rows = rows[: cfg.max_traces] if cfg.max_traces is not None else rows
    items = []
    for r in rows:
        steps, status = split_steps(r["reasoning"], split_cfg)
        items.append({"row": r, "steps": steps, "status": status, "soft": [], "hard": [], "prop": [], "samples": [],
                      "prompt": render_prompt(r["question"], rollout, engine) if status == OK else None})
    pool = make_pool(grade)
    try:
        depth = max((len(it["steps"]) for it in items if it["status"] == OK), default=0)
        for k in tqdm(range(depth), desc="label (step)", disable=not progress):
            # one engine call per step index: every live trace's k-th prefix
            live = [it for it in items if it["status"] == OK and k < len(it["steps"])
                    and not (cfg.propagate_errors and 0 in it["hard"])]
            fits: dict[tuple, list[dict]] = {}  # (prefix prompt, answer) -> the live traces sharing it
            prompts = [prefix_prompt(it["prompt"], it["steps"][: k + 1]) for it in live]
            lengths = engine.tokenize(prompts) if prompts else []
            for it, p, ids in zip(live, prompts, lengths):
                if len(ids) >= engine.max_model_len:
                    it["status"] = "prefix_too_long"
                else:
                    fits.setdefault((p, it["row"]["answer"]), []).append(it)
            counts = sample_prefixes(fits, k, cfg, grade, engine, pool)
            for p, group in fits.items():
                if counts[p] is None:  # a server request failed for good: a re-run sends it again
                    for it in group:   # (the server's journal answers the ones that succeeded)
                        it["status"] = "request_failed"
                    continue
                c, n = counts[p]
                for it in group:
                    it["soft"].append(c / n if n else 0.0)
                    it["hard"].append(int(c > 0))
                    it["prop"].append(False)
                    it["samples"].append(n)
    finally:
        pool.close()
    out = []
    for it in items:
        r, ok = it["row"], it["status"] == OK
        if ok and cfg.propagate_errors and len(it["hard"]) < len(it["steps"]):
            n = len(it["steps"]) - len(it["hard"])
            it["soft"] += [0.0] * n
            it["hard"] += [0] * n
            it["prop"] += [True] * n
            it["samples"] += [0] * n
        out.append({
            "problem_id": r["problem_id"], "trace_id": r["trace_id"], "question": r["question"],
            "answer": r["answer"], "domain": r["domain"], "level": r.get("level"),
            "split": split_of(r["problem_id"], cfg.heldout_fraction), "verdict": r["verdict"],
            "steps": it["steps"], "step_soft": it["soft"] if ok else None, "step_hard": it["hard"] if ok else None,
            "propagated": it["prop"] if ok else None, "step_samples": it["samples"] if ok else None, "first_error": first_error(it["hard"]) if ok else None,
            "status": it["status"], "label_source": "monte_carlo"})
    return pa.Table.from_pylist(out, schema=LABELS)
