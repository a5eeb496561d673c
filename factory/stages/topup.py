"""Stage `topup`: more samples for the problems the teacher rarely solves (difficulty-aware
rejection sampling, DART-Math).

In:  graded traces (a problem's K rollout traces with their verdicts).
Out: the same traces, each marked `topup_wave` 0, followed by the top-up's own traces (graded
     like the rest, `topup_wave` w >= 1), and the samples whose request failed (rejected).

Fixed-K sampling leaves the hardest problems with one correct trace or none (DART-Math: 51% of
MATH's hardest queries lost). After a problem's first K traces, one whose pass rate over them is
above `min_pass_rate` (so the teacher can solve it: never a problem no trace solved) and at most
`max_pass_rate` is sampled again, `wave_size` samples per wave, until it has `target_correct`
correct traces or `max_samples` samples in all. The problem's pass rate and difficulty stay
those of its first K traces (curate counts only wave 0), so they mean what they mean without a
top-up; the extra correct traces become SFT rows and chosen sides of pairs.

Each wave's request for a problem is seeded from (rollout.seed, wave, problem_id), and sample k
of it is sample k of that request, so a re-run (or a shard redone after a SIGKILL) sends the same
requests and gets the same traces; trace ids continue the problem's sample indices
(K, K+1, ...) under the rollout's sampling key. A wave is one engine call for every problem of
the shard that still needs samples; the traces are graded with the grade stage's functions in
its pool. The map stage's per-shard done markers (factory.run.pipeline) make finished shards
skip on resume.

    factory run RECIPE     # with a `topup:` section (recipes/demo_topup.yaml)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pyarrow as pa

from factory import schema
from factory.engines import Engine
from factory.stages import grade
from factory.stages.rollout import RolloutConfig, request_seed, rollout_table, sampling_key, trace_id


@dataclass
class TopupConfig:
    min_pass_rate: float = 0.0
    """Problems whose first-K pass rate is above this are in the band (0: any correct trace)."""
    max_pass_rate: float = 0.375
    """... and at most this (0.375: 1 to 3 correct traces of 8)."""
    target_correct: int = 4
    """M: stop sampling a problem once it has this many correct traces (first K included)."""
    wave_size: int = 8
    """Samples per problem per wave (one request, prefilled once)."""
    max_samples: int = 32
    """Cap on a problem's samples, its first K included; waves stop there."""


def check(cfg: TopupConfig, rollout: RolloutConfig) -> None:
    if not 0.0 <= cfg.min_pass_rate < cfg.max_pass_rate <= 1.0:
        raise ValueError(f"topup: min_pass_rate={cfg.min_pass_rate}, max_pass_rate={cfg.max_pass_rate}; "
                         "need 0 <= min_pass_rate < max_pass_rate <= 1")
    if cfg.wave_size < 1 or cfg.target_correct < 1:
        raise ValueError(f"topup: wave_size={cfg.wave_size}, target_correct={cfg.target_correct}; both must be >= 1")
    if cfg.max_samples < rollout.num_traces + cfg.wave_size:
        raise ValueError(f"topup.max_samples={cfg.max_samples} leaves no room for a wave after the first "
                         f"{rollout.num_traces} traces (wave_size {cfg.wave_size}); raise it")


def wave_seed(base: int, wave: int) -> int:
    """The rollout seed a wave's requests derive from (request_seed(wave_seed, problem_id))."""
    return request_seed(base, f"topup:{wave}")


def in_band(n_correct: int, n_traces: int, cfg: TopupConfig) -> bool:
    return n_traces > 0 and n_correct > 0 and cfg.min_pass_rate < n_correct / n_traces <= cfg.max_pass_rate


def problem_schema(graded_schema: pa.Schema) -> pa.Schema:
    """What a wave's request is made from: the problem's columns (and rewrite's), not a trace's."""
    per_trace = {n for n, _ in schema.ROLLOUT_COLUMNS + schema.GRADE_COLUMNS + schema.TOPUP_COLUMNS}
    return pa.schema([f for f in graded_schema if f.name not in per_trace])


def band_state(rows: list[dict], cfg: TopupConfig, rollout: RolloutConfig, names: list[str]) -> dict[str, dict]:
    """Per problem in the band, from its first K graded traces: its row (columns `names`), samples
    so far, correct so far, the next sample index and the waves it had."""
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    state = {}
    for pid, traces in by_problem.items():
        n_correct = sum(t["verdict"] == "correct" for t in traces)
        if in_band(n_correct, len(traces), cfg):
            state[pid] = {"row": {k: traces[0][k] for k in names}, "samples": len(traces), "correct": n_correct,
                          "next": max([rollout.num_traces - 1] + [t["sample_index"] for t in traces]) + 1, "waves": 0}
    return state


def needs_wave(st: dict, cfg: TopupConfig) -> bool:
    return st["correct"] < cfg.target_correct and st["samples"] + cfg.wave_size <= cfg.max_samples


def wave_config(rollout: RolloutConfig, cfg: TopupConfig, wave: int) -> RolloutConfig:
    """The rollout config of wave `wave`'s requests (K = wave_size, the wave's own seed)."""
    return replace(rollout, num_traces=cfg.wave_size, seed=wave_seed(rollout.seed, wave))


def absorb(state: dict[str, dict], wave: int, graded: list[dict], dropped: list[dict], pids: list[str],
           key: str, cfg: TopupConfig, counts: dict) -> tuple[list[dict], list[dict]]:
    """Wave `wave` of problems `pids` is in (its traces graded, its failed samples' rejected rows
    from the rollout): renumber them as the problems' next samples, count their correct ones;
    returns (traces, rejected rows)."""
    for t in graded:  # the problem's next sample indices, under the rollout's own sampling key
        st = state[t["problem_id"]]
        index = st["next"] + t["sample_index"]
        t.update(sample_index=index, trace_id=trace_id(t["problem_id"], index, key), topup_wave=wave)
        st["correct"] += t["verdict"] == "correct"
        counts["correct"] += t["verdict"] == "correct"
    rejected = []
    for r in dropped:  # samples whose server request failed after its retries
        rec = json.loads(r["record"])
        index = state[r["problem_id"]]["next"] + rec["sample_index"]
        rejected.append(schema.rejected_row("topup", r["drop_reason"], {**rec, "sample_index": index,
                                            "topup_wave": wave}, r["detail"], r["problem_id"],
                                            trace_id(r["problem_id"], index, key)))
    for pid in pids:
        state[pid]["samples"] += cfg.wave_size
        state[pid]["next"] += cfg.wave_size
        state[pid]["waves"] = wave
    return graded, rejected


def assemble(rows: list[dict], graded_schema: pa.Schema, extra: list[dict], rejected: list[dict],
             state: dict[str, dict], cfg: TopupConfig, counts: dict) -> tuple[pa.Table, pa.Table]:
    """The shard's output: its traces (wave 0) in their order, then the top-up's by (problem,
    sample); the rejected rows by (wave, problem, sample): the same whichever order the waves
    came back in."""
    counts["traces"] = len(extra)
    for st in state.values():
        counts["reached_target"] += st["correct"] >= cfg.target_correct
        counts["at_cap"] += st["correct"] < cfg.target_correct
    extra.sort(key=lambda t: (t["problem_id"], t["sample_index"]))
    rejected.sort(key=lambda r: (json.loads(r["record"])["topup_wave"], r["problem_id"],
                                 json.loads(r["record"])["sample_index"]))
    out_schema = schema.extend(graded_schema, schema.TOPUP_COLUMNS)
    return schema.table([{**r, "topup_wave": 0} for r in rows] + extra, out_schema), schema.table(rejected, schema.REJECTED)


def new_counts(state: dict) -> dict:
    return {"in_band": len(state), "sampled": 0, "reached_target": 0, "at_cap": 0, "traces": 0, "correct": 0}


def topup_table(graded: pa.Table, cfg: TopupConfig, rollout: RolloutConfig, engine: Engine,
                grade_cfg: grade.GradeConfig, pool) -> tuple[pa.Table, pa.Table, dict]:
    """The shard's traces (wave 0) followed by its top-up traces, graded: one engine call per
    wave over the shard's problems that still need samples (`factory.run.topup_stream` streams
    every shard's waves through one `Engine.stream` instead, with the same products).

    Args:
        graded: a graded shard (all K traces of each of its problems).
        rollout: the run's rollout config (prompt, sampling; its seed seeds the waves).
        engine: the teacher (in-process vLLM or a server: only `generate` is used).
        pool: the grade stage's worker pool.
    Returns:
        (traces, rejected (request_failed), stats: tokens apart from the rollout's, and counts).
    """
    check(cfg, rollout)
    rows = graded.to_pylist()
    pschema = problem_schema(graded.schema)
    state = band_state(rows, cfg, rollout, pschema.names)
    key = sampling_key(rollout, engine.model_name)
    extra, rejected = [], []
    stats = {"generated_tokens": 0, "prompt_tokens": 0, "generate_seconds": 0.0}
    counts = new_counts(state)
    wave = 0
    while True:
        need = [pid for pid in sorted(state) if needs_wave(state[pid], cfg)]
        if not need:
            break
        wave += 1
        if wave == 1:
            counts["sampled"] = len(need)
        counts[f"wave_{wave}"] = len(need)
        problems = schema.table([state[pid]["row"] for pid in need], pschema)
        traces, dropped, s = rollout_table(problems, wave_config(rollout, cfg, wave), engine)
        for k in ("generated_tokens", "prompt_tokens", "generate_seconds"):
            stats[k] += s[k]
        traces = grade.grade_table(traces, grade_cfg, pool).to_pylist()
        t, r = absorb(state, wave, traces, dropped.to_pylist(), need, key, cfg, counts)
        extra += t
        rejected += r
    out, dropped = assemble(rows, graded.schema, extra, rejected, state, cfg, counts)
    return out, dropped, {**stats, "topup": counts}
