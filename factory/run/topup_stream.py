"""The top-up's waves of every pending shard through one `Engine.stream`.

    topup_shards(out_stage, graded_stage, pending_shards, topup, rollout, grade_config, engine, pool)

`topup_table` makes one engine call per wave per shard, so the teacher drains at the end of
every wave: a wave is a shard's few in-band problems, and the call waits for its longest trace.
Measured on the simulated 256-slot teacher (`benchmarks/fleet.py --topup`, 512 problems x 8,
R1-like lengths): the top-up's waves kept 11.5% of the slots busy. Here each problem goes
through its waves on its own: the moment a problem's wave is in, its traces are graded (in the
grade stage's pool) and, if it still needs samples, its next wave is the next request the engine
gets; the shards' problems (this shard's or the next's) fill the window meanwhile.

A problem's waves are the requests `topup_table` sends it (same seeds, same sample indices),
and a shard is written only once all its problems are done, in `topup_table`'s order, so the
products are the same. The unit of resume is the shard, as for the map stage: a killed run
redoes the shards it had open (a server's journal answers the requests that were in).

Not streamed: a rollout with a thinking budget (`rollout.max_think_tokens`: a wave's second
phase would need the continuous rollout's follow-ups), which goes through `topup_table`.

Memory on the driver: the requests in flight (the engine's window), and per open shard its
in-band problems' rows and the top-up traces made so far; the shard's own traces are read
again when it is written.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from factory import store
from factory.engines import Engine, Request
from factory.stages import grade
from factory.stages.rollout import RolloutConfig, prepare, sampling_key, trace_rows, traces_table
from factory.stages.topup import (TopupConfig, absorb, assemble, band_state, check, needs_wave, new_counts,
                                  problem_schema, wave_config)


@dataclass
class OpenShard:
    index: int
    state: dict  # problem id -> its top-up state (topup.band_state)
    schema: object  # the problems' columns (what a wave's request is made from)
    counts: dict
    extra: list = field(default_factory=list)  # the top-up's graded traces so far
    rejected: list = field(default_factory=list)
    busy: int = 0  # waves in flight or due (queued for the engine)
    submitted: bool = False  # every problem's first wave has been handed to the engine (or it needs none)
    tokens: int = 0
    prompt_tokens: int = 0


class StreamedTopup:
    """Streams the top-up of the pending shards of `upstream` (graded) through `engine` into `sd`."""

    def __init__(self, sd: store.StageDir, upstream: store.StageDir, cfg: TopupConfig, rollout: RolloutConfig,
                 grade_cfg: grade.GradeConfig, engine: Engine, pool, window: int | None = None,
                 on_shard: Callable[[dict], None] | None = None):
        check(cfg, rollout)
        self.sd, self.up, self.cfg, self.rollout, self.grade_cfg = sd, upstream, cfg, rollout, grade_cfg
        self.engine, self.pool, self.window = engine, pool, window
        self.on_shard = on_shard or (lambda stats: None)
        self.key = sampling_key(rollout, engine.model_name)
        self.open: dict[int, OpenShard] = {}
        self.due: collections.deque = collections.deque()  # (shard, problem id): its next wave, not yet sent
        self._clock, self._cpu = time.perf_counter(), time.process_time()

    def request(self, shard: OpenShard, pid: str) -> Request:
        """Problem `pid`'s next wave (its number in the key), counted as topup_table counts it."""
        st = shard.state[pid]
        wave = st["waves"] + 1
        shard.counts["sampled"] += wave == 1
        shard.counts[f"wave_{wave}"] = shard.counts.get(f"wave_{wave}", 0) + 1
        fits, rejected, _ = prepare([st["row"]], wave_config(self.rollout, self.cfg, wave), self.engine)
        if not fits:  # cannot happen for a problem rolled out before (same prompt, same context)
            raise RuntimeError(f"topup: problem {pid} no longer fits the engine: {rejected[0]['detail']}")
        return Request((shard.index, pid, wave, fits[0]), fits[0].ids, fits[0].sampling)

    def requests(self, shards: list[int]) -> Iterator[Request | None]:
        """Pulled by the engine as it has room: problems' next waves first, then the open shard's
        first waves, then the next shard's; None while only waves in flight can bring more."""
        for i in shards:
            graded = self.up.read_shard(i)
            pschema = problem_schema(graded.schema)
            state = band_state(graded.to_pylist(), self.cfg, self.rollout, pschema.names)
            del graded
            shard = self.open[i] = OpenShard(i, state, pschema, new_counts(state))
            for pid in sorted(state):
                while self.due:
                    yield self.request(*self.due.popleft())
                if needs_wave(state[pid], self.cfg):
                    shard.busy += 1
                    yield self.request(shard, pid)
            shard.submitted = True
            if not shard.busy:  # nothing in the band, or every wave already back
                self.write(shard)
        while self.open:
            yield self.request(*self.due.popleft()) if self.due else None

    def run(self, shards: list[int]) -> None:
        for (i, pid, wave, p), completions in self.engine.stream(self.requests(shards), self.window):
            shard = self.open[i]
            traces, dropped, tokens = trace_rows(p, completions, self.key, self.engine.model_name)
            shard.tokens += tokens
            shard.prompt_tokens += len(p.ids) * len(traces)
            graded = grade.grade_table(traces_table(traces, shard.schema), self.grade_cfg, self.pool).to_pylist()
            t, r = absorb(shard.state, wave, graded, dropped, [pid], self.key, self.cfg, shard.counts)
            shard.extra += t
            shard.rejected += r
            if needs_wave(shard.state[pid], self.cfg):
                self.due.append((shard, pid))  # stays busy
            else:
                shard.busy -= 1
                if shard.submitted and not shard.busy:
                    self.write(shard)
        if self.open:
            raise RuntimeError(f"topup: shards {sorted(self.open)} still have problems in their waves")

    def write(self, shard: OpenShard) -> None:
        """The shard's output, as topup_table makes it, with its done marker."""
        graded = self.up.read_shard(shard.index)
        out, dropped = assemble(graded.to_pylist(), graded.schema, shard.extra, shard.rejected, shard.state,
                                self.cfg, shard.counts)
        now, cpu = time.perf_counter(), time.process_time()
        # the stream's time since the previous write: summed over shards it is the stage's
        stats = {"generated_tokens": shard.tokens, "prompt_tokens": shard.prompt_tokens,
                 "generate_seconds": now - self._clock, "topup": shard.counts, "rows_in": graded.num_rows,
                 "rows_out": out.num_rows, "dropped": store.count_reasons(dropped), "seconds": now - self._clock,
                 "driver_cpu_seconds": cpu - self._cpu}
        failed = [d.split(":", 1)[0] for d in dropped.column("detail").to_pylist() if d]
        if failed:  # by cause: a failed request's detail starts with it
            stats["failures"] = {c: failed.count(c) for c in set(failed)}
        self._clock, self._cpu = now, cpu
        self.sd.write_shard(shard.index, out, dropped, stats, source=self.up.seal(shard.index))
        del self.open[shard.index]
        self.on_shard(stats)


def streamable(rollout: RolloutConfig) -> bool:
    """Whether the top-up's waves can stream (else: `topup_table` per shard): not with a
    thinking budget, whose second phase the stream does not send."""
    return rollout.max_think_tokens is None


def topup_shards(sd: store.StageDir, upstream: store.StageDir, shards: list[int], cfg: TopupConfig,
                 rollout: RolloutConfig, grade_cfg: grade.GradeConfig, engine: Engine, pool,
                 window: int | None = None, on_shard: Callable[[dict], None] | None = None) -> None:
    """The top-up of `shards` of `upstream` into `sd`, streamed; returns when all are written."""
    if shards:
        StreamedTopup(sd, upstream, cfg, rollout, grade_cfg, engine, pool, window, on_shard).run(shards)
