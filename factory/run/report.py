"""A run's text report: per-stage counts (`summary`), the pass-rate histogram (`histogram`), and both
with the curriculum shard index (`inspect`, what `factory inspect RUN` prints)."""

from __future__ import annotations

import json
from pathlib import Path


def summary(manifest: dict) -> str:
    lines = [f"{'stage':<10}{'in':>9}{'out':>9}{'seconds':>10}  dropped / notes"]
    for name, s in manifest["stages"].items():
        notes = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items()))
        if "tokens_per_s" in s:
            notes = f"{s['generated_tokens']} tokens at {s['tokens_per_s']:.0f} tok/s" + (f"; {notes}" if notes else "")
        if "verdicts" in s:
            notes = ", ".join(f"{k}={v}" for k, v in sorted(s["verdicts"].items())) + (f"; dropped {notes}" if notes else "")
        if s.get("unlabeled"):
            notes += f"; majority-labelled problems={s['unlabeled']['labelled']}"
        if "judge" in s:
            notes = ", ".join(f"{k}={v}" for k, v in s["judge"].items())
        if "prm_status" in s:
            notes = "prm_status: " + ", ".join(f"{k}={v}" for k, v in sorted(s["prm_status"].items()))
        if "pairs" in s:
            notes = f"pairs={s['pairs']}; " + notes
        lines.append(f"{name:<10}{s['in']:>9}{s['out']:>9}{s['seconds']:>10.1f}  {notes}")
    t = manifest.get("tokens")
    if t and (t["prompt"] or t["completion"]):
        cost = f"; estimated cost {t['cost']:,.2f} {t['currency']}" if "cost" in t else ""
        lines.append(f"teacher tokens: {t['prompt']:,} prompt, {t['completion']:,} generated{cost}")
    return "\n".join(lines)


def histogram(run_dir: Path, bins: int = 8) -> str:
    import pyarrow.parquet as pq

    path = run_dir / "difficulty.parquet"
    if not path.exists():
        return "(no difficulty.parquet yet: the run has not reached curate)"
    rates = pq.read_table(path).column("pass_rate").to_pylist()
    if not rates:
        return "(no problems)"
    counts = [0] * (bins + 1)
    for r in rates:
        counts[min(bins, round(r * bins))] += 1
    width = max(counts)
    lines = [f"pass rate over traces ({len(rates)} problems; difficulty = 1 - pass rate)"]
    for i, c in enumerate(counts):
        lines.append(f"  {i / bins:5.3f} {c:6d} {'#' * round(40 * c / width) if width else ''}")
    return "\n".join(lines)


def inspect(run_dir: Path) -> str:
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: not found; is {run_dir} a finished run directory?")
    manifest = json.loads(manifest_path.read_text())
    shards = "\n".join(f"  {s['file']}: {s['rows']} rows, difficulty {s['difficulty_min']}..{s['difficulty_max']}"
                       for s in manifest["curriculum"])
    return f"{summary(manifest)}\n\ncurriculum shards (easy -> hard):\n{shards}\n\n{histogram(run_dir)}"
