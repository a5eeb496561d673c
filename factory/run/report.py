"""A run's text report: per-stage counts (`summary`), the pass-rate histogram (`histogram`), and both
with the curriculum shard index (`inspect`, what `factory inspect RUN` prints)."""

from __future__ import annotations

import json
import math
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
            if s.get("prm_reads", {}).get("from_memo"):
                notes += f"; {s['prm_reads']['from_memo']} scores kept from an earlier run"
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


def nice_ticks(top: float, pct: bool) -> list[float]:
    """Tick values from 0 to at least `top`: 4-5 steps of 1, 2 or 5 x 10^k (whole percents for shares)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [round(i * step, 12) for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def fmt_value(v: float, pct: bool) -> str:
    return f"{100 * v:.1f}%" if pct else (f"{v:g}" if abs(v) < 1e4 else f"{v:,.0f}")


def y_axis(ticks: list[float], pct: bool, x: float, w: float, y) -> list[str]:
    """A left axis with labelled ticks and faint grid lines across the plot."""
    out = [f'<line x1="{x}" y1="{y(0)}" x2="{x}" y2="{y(ticks[-1])}" stroke="#999"/>']
    for t in ticks:
        label = f"{100 * t:g}%" if pct else f"{t:g}"
        out.append(f'<line x1="{x - 4}" y1="{y(t):.1f}" x2="{w}" y2="{y(t):.1f}" stroke="#eee"/>'
                   f'<text x="{x - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{label}</text>')
    return out


def svg_bars(title: str, labels: list[str], series: dict[str, list[float]], pct: bool = True,
             ylabel: str | None = None) -> str:
    """A grouped bar chart as inline SVG (no plotting library needed): a y axis with ticks, each
    bar's value written over it, the category under each group and a legend."""
    w, h, left, right = 640, 240, 52, 10
    n, k = len(labels), len(series)
    ticks = nice_ticks(max([v for vs in series.values() for v in vs] + [0.0]), pct)
    top = ticks[-1]

    def y(v):
        return h - (h - 40) * v / top
    bw = (w - left - right) / max(1, n) / (k + 1)
    small = 9 if bw < 26 else 10  # value labels narrower than their bar would collide
    parts = [f'<svg width="{w}" height="{h + 40}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{left}" y="14" font-weight="bold">{title}</text>']
    parts += y_axis(ticks, pct, left, w - right, y)
    if ylabel or pct:
        parts.append(f'<text x="12" y="{(h + 40) / 2}" transform="rotate(-90 12 {(h + 40) / 2})" '
                     f'text-anchor="middle">{ylabel or "pass rate"}</text>')
    parts.append(f'<line x1="{left}" y1="{h}" x2="{w - right}" y2="{h}" stroke="#999"/>')
    for i, lab in enumerate(labels):
        x0 = left + bw / 2 + i * (k + 1) * bw
        parts.append(f'<text x="{x0 + k * bw / 2:.1f}" y="{h + 15}" text-anchor="middle">{lab}</text>')
        for j, (name, vals) in enumerate(series.items()):
            v = vals[i] if i < len(vals) else 0
            shown = fmt_value(v, pct)
            parts.append(f'<rect x="{x0 + j * bw:.1f}" y="{y(v):.1f}" width="{bw - 1:.1f}" height="{h - y(v):.1f}" '
                         f'fill="{COLORS[j % 5]}"><title>{name}: {shown}</title></rect>'
                         f'<text x="{x0 + j * bw + (bw - 1) / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" '
                         f'font-size="{small}">{shown.rstrip("%") if pct and bw < 26 else shown}</text>')
    return "\n".join(parts + legend(list(series), h, left, 130) + ["</svg>"])


def svg_lines(title: str, xs: list[float], series: dict[str, list[float]], xlabel: str = "step") -> str:
    """A line chart as inline SVG (a training curve: y from 0 to the largest value), with both
    axes ticked and each series' last value written at its end."""
    w, h, left, right = 640, 240, 52, 48
    ticks = nice_ticks(max([v for vs in series.values() for v in vs] + [0.0]), False)
    top = ticks[-1]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    def x(v):
        return left + (w - left - right) * (v - x_lo) / ((x_hi - x_lo) or 1)
    def y(v):
        return h - (h - 40) * v / top
    parts = [f'<svg width="{w}" height="{h + 40}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{left}" y="14" font-weight="bold">{title}</text>',
             f'<line x1="{left}" y1="{h}" x2="{w - right}" y2="{h}" stroke="#999"/>']
    parts += y_axis(ticks, False, left, w - right, y)
    for t in nice_ticks(x_hi - x_lo, False) if xs else []:
        if x_lo + t <= x_hi:
            parts.append(f'<line x1="{x(x_lo + t):.1f}" y1="{h}" x2="{x(x_lo + t):.1f}" y2="{h + 4}" stroke="#999"/>'
                         f'<text x="{x(x_lo + t):.1f}" y="{h + 15}" text-anchor="middle">{x_lo + t:g}</text>')
    parts.append(f'<text x="{w - right}" y="{h + 28}" text-anchor="end">{xlabel}</text>')
    for j, (name, vals) in enumerate(series.items()):
        points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, vals))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[j % 5]}" stroke-width="2">'
                     f'<title>{name}</title></polyline>')
        if xs and vals:
            parts.append(f'<text x="{x(xs[len(vals) - 1]) + 4:.1f}" y="{y(vals[-1]) + 4:.1f}" '
                         f'fill="{COLORS[j % 5]}">{vals[-1]:.3g}</text>')
    return "\n".join(parts + legend(list(series), h + 12, left, 150) + ["</svg>"])
