"""A run's progress, on the terminal and in `RUN/progress.json` for `factory status RUN`.

    progress = Progress(run_dir, show=True)
    progress.begin("rollout", total=15, done=3, unit="shard")
    progress.advance(1, traces=1600, tokens=210_000)   # or progress.add(...) without a unit
    progress.end()
    progress.finish("finished")

The file is rewritten at most every `every_s` seconds (and at every stage boundary) by
writing a temporary file and renaming it over the old one, so a reader always gets whole,
valid JSON. It holds the current stage (units done / total, rate, ETA), running counts of
the stage (traces, tokens, tok/s, verdicts so far), the finished stages, and the writer's
pid and host, so `factory status` can tell a running run from one whose process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from factory import console


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Progress:
    def __init__(self, run_dir: Path | str, show: bool = True, every_s: float = 2.0, command: str = "run"):
        self.path = Path(run_dir) / "progress.json"
        self.show, self.every_s = show, every_s
        self.state = {"run_dir": str(run_dir), "command": command, "state": "running", "pid": os.getpid(),
                      "host": socket.gethostname(), "started_at": _now(), "updated_at": _now(),
                      "stage": None, "stages_done": [], "current": None}
        self._bar = None
        self._t0 = self._written = 0.0
        self._done0 = 0

    # -- a stage ---------------------------------------------------------------------------

    def begin(self, stage: str, total: int | None, done: int = 0, unit: str = "shard") -> None:
        self.end()
        self._t0, self._done0 = time.monotonic(), done
        self.state["stage"] = stage
        self.state["current"] = {"stage": stage, "unit": unit, "done": done, "total": total, "rate_per_s": None,
                                 "eta_s": None, "elapsed_s": 0.0, "counts": {}}
        if self.show:
            self._bar = console.bar(total, stage, unit, done)
        self.write(force=True)

    def add(self, **counts) -> None:
        """Running counts of the stage (summed; a dict value is summed key by key)."""
        cur = self.state["current"]
        if cur is None:
            return
        c = cur["counts"]
        for k, v in counts.items():
            if isinstance(v, dict):
                d = c.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            else:
                c[k] = c.get(k, 0) + v
        elapsed = time.monotonic() - self._t0
        if c.get("tokens") and elapsed > 0:
            cur["tok_s"] = round(c["tokens"] / elapsed, 1)
        self._postfix()
        self.write()

    def advance(self, n: int = 1, **counts) -> None:
        cur = self.state["current"]
        if cur is None:
            return
        cur["done"] += n
        elapsed = time.monotonic() - self._t0
        cur["elapsed_s"] = round(elapsed, 1)
        progressed = cur["done"] - self._done0
        if progressed > 0 and elapsed > 0:
            rate = progressed / elapsed
            cur["rate_per_s"] = round(rate, 4)
            if cur["total"] is not None:
                cur["eta_s"] = round(max(0, cur["total"] - cur["done"]) / rate, 1)
        if self._bar is not None:
            self._bar.update(n)
        self.add(**counts)

    def _postfix(self) -> None:
        if self._bar is None:
            return
        cur = self.state["current"]
        c, post = cur["counts"], {}
        if "traces" in c:
            post["traces"] = c["traces"]
        if cur.get("tok_s"):
            post["tok/s"] = f"{cur['tok_s']:.0f}"
        if "verdicts" in c:
            post["correct"] = c["verdicts"].get("correct", 0)
        self._bar.set_postfix(post, refresh=False)

    def end(self) -> None:
        cur = self.state["current"]
        if cur is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        cur["elapsed_s"] = round(time.monotonic() - self._t0, 1)
        cur["eta_s"] = 0.0 if cur["total"] is not None and cur["done"] >= cur["total"] else cur["eta_s"]
        self.state["stages_done"].append(cur)
        self.state["current"] = None
        self.write(force=True)

    # -- the run ---------------------------------------------------------------------------

    def finish(self, state: str = "finished", **extra) -> None:
        self.end()
        self.state.update(state=state, stage=None, **extra)
        self.write(force=True)

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < self.every_s:
            return
        self._written = now
        self.state["updated_at"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".progress.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _stage_line(cur: dict) -> str:
    total = "?" if cur["total"] is None else cur["total"]
    parts = [f"{cur['stage']:<9} {cur['done']}/{total} {cur['unit']}s"]
    c = cur.get("counts", {})
    for k in ("problems", "traces", "tokens", "rows", "pairs"):
        if k in c:
            parts.append(f"{c[k]:,} {k}")
    if cur.get("tok_s"):
        parts.append(f"{cur['tok_s']:,.0f} tok/s")
    if "verdicts" in c:
        parts.append(", ".join(f"{k}={v}" for k, v in sorted(c["verdicts"].items())))
    for k in ("retries", "failed"):  # the server's faults: retried tries, samples failed for good
        if c.get(k):
            parts.append(f"{k} " + ", ".join(f"{kk}={vv}" for kk, vv in sorted(c[k].items())))
    parts.append(f"{_duration(cur.get('elapsed_s'))} elapsed")
    if cur.get("eta_s") is not None and cur["done"] != cur["total"]:
        parts.append(f"ETA {_duration(cur['eta_s'])}")
    return "  ".join(parts)


def status(run_dir: Path | str) -> str:
    """What `factory status RUN` prints: the run's state, its current stage and the finished ones."""
    path = Path(run_dir) / "progress.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; has a run been started in {run_dir}?")
    p = json.loads(path.read_text())
    state = p["state"]
    if state == "running" and p.get("host") == socket.gethostname() and not _alive(p["pid"]):
        state = "stopped (its process is gone; run the same command again to resume)"
    age = (datetime.now(timezone.utc) - datetime.fromisoformat(p["updated_at"])).total_seconds()
    lines = [f"{p['run_dir']}: {state}  ({p['command']}, pid {p['pid']} on {p['host']}, "
             f"started {p['started_at']}, updated {age:.0f} s ago)"]
    if p.get("current"):
        lines.append("now   " + _stage_line(p["current"]))
    for s in p.get("stages_done", []):
        lines.append("done  " + _stage_line(s))
    for k in ("summary",):
        if k in p:
            lines += ["", p[k]]
    return "\n".join(lines)
