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
        if s.get("retries"):
            notes += "; retried " + ", ".join(f"{k}={v}" for k, v in sorted(s["retries"].items()))
        lines.append(f"{name:<10}{s['in']:>9}{s['out']:>9}{s['seconds']:>10.1f}  {notes}")
    t = manifest.get("tokens")
    if t and (t["prompt"] or t["completion"]):
        cost = f"; estimated cost {t['cost']:,.2f} {t['currency']}" if "cost" in t else ""
        lines.append(f"teacher tokens: {t['prompt']:,} prompt, {t['completion']:,} generated{cost}")
    failed = failures_line(manifest)
    if failed:
        lines += ["", failed]
    return "\n".join(lines)


def failures_line(manifest: dict, command: str = "the same `factory run` command") -> str:
    """What a run with requests that failed for good says about them ('' when none did)."""
    f = manifest.get("failed_requests") or {}
    if not f.get("total"):
        return ""
    where = ", ".join(f"{k} {v}" for k, v in sorted(f["by_stage"].items()))
    why = ", ".join(f"{k} {v}" for k, v in sorted(f["by_cause"].items(), key=lambda kv: -kv[1]))
    return (f"FAILED REQUESTS: {f['total']} ({where}){f'; causes: {why}' if why else ''}. Their samples are "
            f"missing from the products (rejected/<stage>/ as request_failed). Run {command} again once the "
            "server is healthy: only the failed requests are sent.")


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


COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2"]


def legend(names: list[str], h: int, pad: int, spacing: int) -> list[str]:
    """A chart's legend under its plot area: a colour box and the series name, left to right."""
    return [f'<rect x="{pad + j * spacing}" y="{h + 24}" width="10" height="10" fill="{COLORS[j % 5]}"/>'
            f'<text x="{pad + j * spacing + 14}" y="{h + 33}">{name}</text>' for j, name in enumerate(names)]


def svg_bars(title: str, labels: list[str], series: dict[str, list[float]], pct: bool = True) -> str:
    """A grouped bar chart as inline SVG (no plotting library needed)."""
    w, h, pad = 640, 240, 30
    n, k = len(labels), len(series)
    top = max([v for vs in series.values() for v in vs] + [1e-9])
    bw = (w - 2 * pad) / max(1, n) / (k + 1)
    parts = [f'<svg width="{w}" height="{h + 40}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{pad}" y="14" font-weight="bold">{title}</text>']
    for i, lab in enumerate(labels):
        x0 = pad + i * (k + 1) * bw
        parts.append(f'<text x="{x0 + k * bw / 2}" y="{h + 15}" text-anchor="middle">{lab}</text>')
        for j, (name, vals) in enumerate(series.items()):
            v = vals[i] if i < len(vals) else 0
            bh = (h - 40) * v / top
            shown = f"{100 * v:.1f}%" if pct else f"{v}"
            parts.append(f'<rect x="{x0 + j * bw}" y="{h - bh}" width="{bw - 1}" height="{bh}" fill="{COLORS[j % 5]}">'
                         f'<title>{name}: {shown}</title></rect>')
    return "\n".join(parts + legend(list(series), h, pad, 130) + ["</svg>"])


def svg_lines(title: str, xs: list[float], series: dict[str, list[float]], xlabel: str = "step") -> str:
    """A line chart as inline SVG (a training curve: y from 0 to the largest value)."""
    w, h, pad = 640, 240, 40
    top = max([v for vs in series.values() for v in vs] + [1e-9])
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    def x(v):
        return pad + (w - 2 * pad) * (v - x_lo) / ((x_hi - x_lo) or 1)
    def y(v):
        return h - (h - 40) * v / top
    parts = [f'<svg width="{w}" height="{h + 40}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{pad}" y="14" font-weight="bold">{title}</text>',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#999"/>',
             f'<text x="{pad}" y="{h + 15}">{x_lo:g}</text>',
             f'<text x="{w - pad}" y="{h + 15}" text-anchor="end">{xlabel} {x_hi:g}</text>',
             f'<text x="4" y="{y(top) + 4}">{top:.2f}</text>']
    for j, (name, vals) in enumerate(series.items()):
        points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, vals))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[j % 5]}" stroke-width="2">'
                     f'<title>{name}</title></polyline>')
    return "\n".join(parts + legend(list(series), h, pad, 150) + ["</svg>"])
