"""Continuous rollout: every pending shard's problems through one `Engine.stream`.

    rollout_shards(out_stage, in_stage, pending_shards, rollout_config, engine)

One engine call per shard waits for the shard's slowest trace before the next shard starts,
and reasoning traces are heavy-tailed, so the teacher idles at every boundary. Here requests
flow without boundaries: the engine keeps `window` sequences in flight and pulls the next
problem (of this shard or the next) as soon as one finishes.

Durability is per problem. When a problem's K samples are in (or its request failed after
the client's retries), they are appended to
`stages/rollout/shard-NNNNN.partial.jsonl` (flushed at once, fsynced at most every second;
a SIGKILL loses nothing flushed). When every problem of a shard is in, the shard is
*sealed*: its traces are built from the partial file exactly as `rollout_table` builds them
(same ids, same order), written with its done marker, and the partial file is removed. A
re-run reads the partial files of unsealed shards and sends only the problems missing there,
and for a problem whose request failed, only its failed samples: sample k alone, seeded
seed+k, is the sample k that a request of n samples seeded seed gives (vLLM seeds child k of
an n-request so), so the recovered traces are exactly a fault-free run's.

A sealed shard with failed samples (`request_failed` rows) is re-opened by the next run
(`rollout.retry_failed`, on by default; `reopen`): its partial file is written back from the
sealed traces and failures, then its done marker is removed, so a kill at any moment leaves
either the sealed shard or an unsealed one that resumes. It is sealed again once its failed
samples are in; the stages downstream redo that shard (their markers name the seal they read).

Memory on the driver is bounded by the window (texts in flight), the open shards' problem
rows, and one shard's traces while it is sealed, never by the run.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq

from factory import schema, store
from factory.engines import Completion, Engine, Request
from factory.stages.rollout import (Prepared, RolloutConfig, think_prefix, continuations, merge_continuation, prepare,
                                    sampling_key, trace_rows, traces_table)


class PartialLog:
    """A shard's finished problems, one JSON line each: {"problem_id", "completions": [...]}."""

    FSYNC_EVERY_S = 1.0

    def __init__(self, path: Path):
        self.path = path
        self._f = None
        self._synced = time.monotonic()

    def read(self, with_failures: bool = True) -> dict[str, list[Completion]]:
        """Problems already in the file (a line cut by a kill is ignored: that problem is re-sent).
        A problem with a failed request is left out when `with_failures` is false (a resumed run
        tries it again) and replaced by a later line that has no failure."""
        done = {}
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    got = [Completion(*c) for c in r["completions"]]
                    failed = any(c.error is not None for c in got)
                    old = done.get(r["problem_id"])
                    if (old is None or any(c.error is not None for c in old)) and (with_failures or not failed):
                        done[r["problem_id"]] = got
        return done

    @staticmethod
    def line(problem_id: str, completions: list[Completion]) -> bytes:
        rec = {"problem_id": problem_id, "completions": [c.as_tuple() for c in completions]}
        return json.dumps(rec, ensure_ascii=False).encode() + b"\n"

    def append(self, problem_id: str, completions: list[Completion]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")
            if self._f.tell():  # a cut line from a killed run must not swallow this one
                self._f.write(b"\n")
        self._f.write(self.line(problem_id, completions))
        self._f.flush()
        if time.monotonic() - self._synced > self.FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def rewrite(self, problems: dict[str, list[Completion]]) -> None:
        """Replace the file by these problems' lines, whole or not at all (temp file + rename)."""
        self.close()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            for pid, completions in problems.items():
                f.write(self.line(pid, completions))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def failed_samples(stats: dict) -> int:
    """Samples of a sealed rollout shard whose request failed for good (its done marker's count)."""
    return stats.get("dropped", {}).get("request_failed", 0)


@dataclass
class OpenShard:
    index: int
    requests: list[Prepared]
    rejected: list[dict]  # prompt_too_long, known before anything is sent
    shrunk: int
    rows_in: int
    schema: object
    log: PartialLog
    waiting: set[str] = field(default_factory=set)  # problem ids not yet durable
    submitted: bool = False  # every request of the shard has been handed to the engine
    by_id: dict | None = None  # problem id -> Prepared, built when the thinking budget needs it
    failures: Counter = field(default_factory=Counter)  # cause -> samples that failed for good (this run)


class ContinuousRollout:
    """Streams the pending shards of `upstream` through `engine` into stage dir `sd`."""

    def __init__(self, sd: store.StageDir, upstream: store.StageDir, cfg: RolloutConfig, engine: Engine,
                 window: int | None = None, on_seal: Callable[[int, dict], None] | None = None,
                 on_problem: Callable[[int, int, int], None] | None = None):
        self.sd, self.up, self.cfg, self.engine, self.window = sd, upstream, cfg, engine, window
        self.on_seal = on_seal or (lambda i, stats: None)
        # (problems, traces, tokens) as they become durable: for the live progress line
        self.on_problem = on_problem or (lambda problems, traces, tokens: None)
        self.key = sampling_key(cfg, engine.model_name)
        self.open: dict[int, OpenShard] = {}
        self._clock, self._cpu = time.perf_counter(), time.process_time()
        # the thinking budget's second phase: problems waiting for continuations, and the
        # continuation requests not yet handed to the engine (sent before new problems)
        self.forcing: dict[tuple[int, str], list] = {}
        self.followups: collections.deque = collections.deque()
        # problems whose failed samples are re-sent: (shard, pid) -> [completions, samples out, samples back]
        self.retrying: dict[tuple[int, str], list] = {}
        self._retries = Counter()  # the engine's retries by cause already reported
        self._sealed_retries = Counter()  # ... and already put in a sealed shard's stats

    def partial(self, i: int) -> PartialLog:
        return PartialLog(self.sd.shard(i).with_suffix(".partial.jsonl"))

    def requests(self, shards: list[int]) -> Iterator[Request]:
        """Pulled by the engine as it has room: opens shards one at a time, in order."""
        for i in shards:
            table = self.up.read_shard(i)
            fits, rejected, shrunk = prepare(table.to_pylist(), self.cfg, self.engine)
            log = self.partial(i)
            had = log.read()  # a problem with failed samples: only those are sent again
            durable = {pid for pid, got in had.items() if all(c.error is None for c in got)}
            shard = self.open[i] = OpenShard(i, fits, rejected, shrunk, table.num_rows, table.schema, log)
            del table
            shard.waiting = {p.row["problem_id"] for p in fits} - durable
            self.on_problem(len(fits) - len(shard.waiting) + len(rejected),
                            sum(len(had[p.row["problem_id"]]) for p in fits if p.row["problem_id"] in durable), 0)
            for p in fits:
                while self.followups:
                    yield self.followups.popleft()
                pid = p.row["problem_id"]
                if pid not in shard.waiting:
                    continue
                old = had.get(pid)
                if old is None or len(old) != p.sampling.n:
                    yield Request((i, pid), p.ids, p.sampling)
                    continue
                failed = [k for k, c in enumerate(old) if c.error is not None]
                self.retrying[(i, pid)] = [list(old), set(failed), set()]
                for k in failed:
                    seed = None if p.sampling.seed is None else p.sampling.seed + k
                    yield Request((i, pid, "retry", k), p.ids, replace(p.sampling, n=1, seed=seed))
            del had
            shard.submitted = True
            if not shard.waiting:  # everything was durable already (or nothing fits)
                self.seal(shard)
        # the last problems' continuations: until every open shard's problems are durable, a
        # problem in flight may still come back cut at the thinking budget
        while self.cfg.max_think_tokens is not None and any(s.waiting for s in self.open.values()):
            yield self.followups.popleft() if self.followups else None

    def run(self, shards: list[int]) -> None:
        try:
            for key, completions in self.engine.stream(self.requests(shards), self.window):
                if len(key) == 3:  # a continuation of sample k
                    i, pid, k = key
                    entry = self.forcing[(i, pid)]
                    entry[0][k] = merge_continuation(entry[0][k], completions[0], entry[1].pop(k), self.cfg)
                    if entry[1]:
                        continue
                    completions = entry[0]
                    del self.forcing[(i, pid)]
                elif len(key) == 4:  # a failed sample k sent again
                    i, pid, _, k = key
                    entry = self.retrying[(i, pid)]
                    entry[0][k] = completions[0]
                    entry[1].discard(k)
                    entry[2].add(k)
                    if entry[1]:
                        continue
                    completions, resent = entry[0], entry[2]
                    del self.retrying[(i, pid)]
                    # only the re-sent samples may need their second phase; the others had theirs
                    if self.cfg.max_think_tokens is not None and self.budget(i, pid, completions, resent):
                        continue
                else:
                    i, pid = key
                    if self.cfg.max_think_tokens is not None and self.budget(i, pid, completions):
                        continue
                shard = self.open[i]
                shard.log.append(pid, completions)
                shard.waiting.discard(pid)
                failed = Counter(c.error.split(":", 1)[0] for c in completions if c.error is not None)
                shard.failures.update(failed)
                self.on_problem(1, sum(c.error is None for c in completions), sum(c.num_tokens for c in completions),
                                **self.counts(failed))
                if shard.submitted and not shard.waiting:
                    self.seal(shard)
        finally:
            for shard in self.open.values():
                shard.log.close()
        if self.open:
            raise RuntimeError(f"rollout: shards {sorted(self.open)} still have problems without traces")

    def counts(self, failed: Counter) -> dict:
        """What the progress file adds: the engine's retries by cause since the last report, and
        samples that failed for good."""
        out = {}
        now = Counter(getattr(self.engine, "retries", None) or {})
        if now != self._retries:
            out["retries"] = dict(now - self._retries)
            self._retries = now
        if failed:
            out["failed"] = dict(failed)
        return out

    def budget(self, i: int, pid: str, completions: list[Completion], only: set[int] | None = None) -> bool:
        """Queue the continuations of the samples cut at the thinking budget (of samples `only`,
        when given); False if none."""
        shard = self.open[i]
        if shard.by_id is None:
            shard.by_id = {p.row["problem_id"]: p for p in shard.requests}
        p = shard.by_id[pid]
        todo = [c for c in continuations(p, completions, self.cfg, self.engine) if only is None or c[0] in only]
        if not todo:
            return False
        self.forcing[(i, pid)] = [list(completions), {k: forced for k, _, _, forced in todo}]
        self.followups.extend(Request((i, pid, k), ids, sampling) for k, ids, sampling, _ in todo)
        return True

    def seal(self, shard: OpenShard) -> None:
        """Build the shard's traces from its partial file, in problem order, and write it whole."""
        shard.log.close()
        got = shard.log.read()
        traces, rejected, tokens, prompt_tokens = [], list(shard.rejected), 0, 0
        for p in shard.requests:
            t, r, n = trace_rows(p, got[p.row["problem_id"]], self.key, self.engine.model_name)
            traces += t
            rejected += r
            tokens += n
            prompt_tokens += len(p.ids) * len(t)  # each sample's request carries the prompt
        out, dropped = traces_table(traces, shard.schema), schema.table(rejected, schema.REJECTED)
        del traces, got
        now, cpu = time.perf_counter(), time.process_time()
        # the stream's time and driver CPU since the previous seal: summed over shards they are the stage's
        failures = Counter(r["detail"].split(":", 1)[0] for r in rejected if r["drop_reason"] == "request_failed")
        retries = Counter(getattr(self.engine, "retries", None) or {})
        stats = {"generated_tokens": tokens, "prompt_tokens": prompt_tokens, "generate_seconds": now - self._clock,
                 "budget_shrunk": shard.shrunk,
                 "driver_cpu_seconds": cpu - self._cpu, "rows_in": shard.rows_in, "rows_out": out.num_rows,
                 "dropped": store.count_reasons(dropped), "seconds": now - self._clock,
                 # retries since the previous seal (summed over shards: the stage's), failures left in this shard
                 "retries": dict(retries - self._sealed_retries), "failures": dict(failures)}
        self._clock, self._cpu, self._sealed_retries = now, cpu, retries
        self.sd.write_shard(shard.index, out, dropped, stats, source=self.up.seal(shard.index))
        shard.log.remove()
        del self.open[shard.index]
        self.on_seal(shard.index, stats)


def reopen(sd: store.StageDir, upstream: store.StageDir, i: int, cfg: RolloutConfig, engine: Engine) -> int:
    """Turn sealed shard `i` back into an unsealed one whose partial file holds every problem's
    samples as sealed (traces and failures alike), so the stream re-sends only the failed ones.
    Returns the number of failed samples. Memory: one shard."""
    fits, _, _ = prepare(upstream.read_shard(i).to_pylist(), cfg, engine)
    by_id = {p.row["problem_id"]: p for p in fits}
    got: dict[str, list] = {p.row["problem_id"]: [None] * p.sampling.n for p in fits}
    for t in sd.read_shard(i).to_pylist():
        p = by_id[t["problem_id"]]
        budget = json.loads(t["sampling"])["max_tokens"]
        got[t["problem_id"]][t["sample_index"]] = Completion(
            t["text"][len(think_prefix(p)):], t["num_tokens"], t["finish_reason"], None,
            None if budget == p.sampling.max_tokens else budget, t["forced_answer"])
    failed = 0
    for r in pq.read_table(sd.rejected_shard(i)).to_pylist():
        if r["drop_reason"] == "request_failed":
            got[r["problem_id"]][json.loads(r["record"])["sample_index"]] = Completion("", 0, "error", error=r["detail"])
            failed += 1
    missing = [pid for pid, cs in got.items() if any(c is None for c in cs)]
    if missing:  # a shard that does not hold all its samples was not made from this input
        raise RuntimeError(f"rollout shard {i} in {sd.path} lacks samples of {len(missing)} problems "
                           f"(e.g. {missing[0]}); delete {sd.path} to roll out again")
    log = PartialLog(sd.shard(i).with_suffix(".partial.jsonl"))
    log.rewrite(got)
    sd.shard(i).with_suffix(".done").unlink()  # from here on the shard is unsealed and resumes
    return failed


def rollout_shards(sd: store.StageDir, upstream: store.StageDir, shards: list[int], cfg: RolloutConfig,
                   engine: Engine, window: int | None = None,
                   on_seal: Callable[[int, dict], None] | None = None,
                   on_problem: Callable[..., None] | None = None) -> None:
    """Roll out `shards` of `upstream` into `sd` continuously; returns when all are sealed."""
    if shards:
        ContinuousRollout(sd, upstream, cfg, engine, window, on_seal, on_problem).run(shards)
