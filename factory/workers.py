"""A process pool with a hard timeout per item.

Why not concurrent.futures: its pool cannot stop one running task, so a single sympy
expression that never finishes would hang the run. Here each worker is a process fed one
item at a time; an item that outlives `timeout_s` gets its worker killed and replaced, and
comes back as `TimedOut`. Workers are spawned (not forked) so a parent that holds an
inference engine's threads is never copied into them.

An item's clock starts when its worker is ready, not when the item is sent: a spawned worker
first re-imports the parent's `__main__` module, and a script that imports vLLM and the
trainer takes 16 s to start on 2 busy cores. Timed from the send, every first item of a fresh
worker timed out, the worker was replaced, and the next fresh one met the same fate: a pool
that never graded anything. A worker that is not ready within `start_timeout_s` fails its item.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator


@dataclass(frozen=True)
class TimedOut:
    seconds: float


@dataclass(frozen=True)
class Failed:
    error: str


_READY = (None, None)


def _serve(fn: Callable[[Any], Any], conn: Connection) -> None:
    conn.send(_READY)  # imports done: from now on an item's time is its own
    while True:
        item = conn.recv()
        if item is None:
            return
        try:
            conn.send((True, fn(item)))
        except Exception:  # a bug in fn for this item: report it, keep serving
            conn.send((False, traceback.format_exc(limit=3)))


class _Worker:
    def __init__(self, ctx, fn):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(fn, child), daemon=True)
        self.proc.start()
        child.close()
        self.job: int | None = None
        self.started = 0.0  # when the current item's clock started
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class TimeoutPool:
    """Map a picklable top-level function over items in `workers` processes.

    Use as a context manager; `map` yields results in input order, each either fn's value,
    a `TimedOut`, or a `Failed` carrying the traceback.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int = 2, timeout_s: float = 5.0,
                 start_timeout_s: float = 300.0):
        self.fn, self.timeout_s, self.start_timeout_s = fn, timeout_s, start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, fn) for _ in range(max(1, workers))]
        self.restarts = 0

    def __enter__(self) -> "TimeoutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.kill()
        self._workers = []

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        results: dict[int, Any] = {}
        pending = iter(range(len(items)))
        next_out = 0
        idle = list(self._workers)
        busy: list[_Worker] = []
        exhausted = False
        while next_out < len(items):
            while idle and not exhausted:
                j = next(pending, None)
                if j is None:
                    exhausted = True
                    break
                w = idle.pop()
                w.job, w.started = j, time.monotonic()
                w.conn.send(items[j])
                busy.append(w)
            now = time.monotonic()
            deadline = min(w.started + self._limit(w) for w in busy) - now
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline))
            for w in list(busy):
                if w.conn in ready:
                    try:
                        ok, value = w.conn.recv()
                    except EOFError:  # the worker died (e.g. out of memory): replace it
                        results[w.job] = Failed("worker process died")
                        busy.remove(w)
                        idle.append(self._replace(w))
                        continue
                    if ok is None:  # started up: the item sent to it starts its clock now
                        w.ready, w.started = True, time.monotonic()
                        continue
                    results[w.job] = value if ok else Failed(value)
                elif time.monotonic() - w.started >= self._limit(w):
                    results[w.job] = (TimedOut(self.timeout_s) if w.ready else
                                      Failed(f"worker process did not start in {self.start_timeout_s:g}s"))
                    busy.remove(w)
                    idle.append(self._replace(w))
                    continue
                else:
                    continue
                busy.remove(w)
                idle.append(w)
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1

    def _limit(self, w: _Worker) -> float:
        return self.timeout_s if w.ready else self.start_timeout_s

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        fresh = _Worker(self._ctx, self.fn)
        self._workers[self._workers.index(w)] = fresh
        self.restarts += 1
        return fresh
