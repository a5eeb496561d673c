"""What PRM scoring costs on R1-length traces: tokens the PRM reads per trace token, and throughput.

    python benchmarks/prm_windows.py [--traces 64] [--context 4096] [--read-factor 1.5] [--backend transformers]

Trace lengths are drawn as R1-distill traces run: lognormal with a median of 3,000 tokens and
sigma 0.8, capped at 32,000 (about 36% are longer than a 4k context). Each trace is demo-domain
reasoning (factory.demo.arith.long_reasoning: a chain worked, then checked again and again, with
one-line asides) cut to its drawn length, with blank-line steps of ~30 tokens (R1's median
paragraph is ~130 characters), under a short demo question. The PRM is a random-weight tiny
stand-in in Qwen2.5-Math-PRM-7B's layout (prm.tiny.qwen_prm: Qwen2ForProcessRewardModel, its own
modelling code) with 4,096 positions, the real one's context.

What it measures:
- tokens read per trace token: a property of the window plan (prm.windows) and the tokenizer,
  not of the model's size, so it carries over to the real PRM (whose tokenizer writes a trace in
  fewer tokens: its prompt is a smaller share, which only lowers the figure);
- throughput (trace tokens scored per second on this CPU): the scorer's whole path, planning and
  tokenization included, with a 64-wide, 2-layer model reading 4k-token windows. It is the
  overhead and the shape (attention over 4k windows), not a 7B PRM's speed; for that, the PRM's
  forward costs about 2 x parameters FLOPs per token read, printed as GFLOP per trace token for
  a 7B model.

With `--r1 FILE` the traces are real ones instead: a JSONL of R1-distill outputs (fields
`question` and `trace`, the whole output from `<think>` to the answer), scored through the score
stage itself (prm.score.score_table, the recipe's default split) with the stand-in at
`--context` positions; it prints how many traces with a reasoning part had every step scored,
and the longest trace against the context. Where such traces come from: NOTES.md (public
DeepSeek-R1-Distill traces on MATH level 5; not shipped here, they are not this project's writing).

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def r1_like_items(n: int, tokenizer, seed: int = 0, median: int = 3000, sigma: float = 0.8,
                  cap: int = 32000) -> tuple[list[tuple[str, list[str]]], list[int]]:
    """(question, steps) pairs whose reasoning is a lognormal number of tokens; and those numbers."""
    from factory.demo import arith
    from prm.steps import SplitConfig, split_steps

    rng = random.Random(seed)
    items, targets = [], []
    for k in range(n):
        target = min(cap, max(64, int(rng.lognormvariate(math.log(median), sigma))))
        p = arith.make_problem(rng, 1 + k % 6)
        ops = [tuple(o) for o in p["chain"]["ops"]]
        text = arith.long_reasoning(p["chain"]["start"], ops, max(2, target // 20), rng)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(ids) < target:  # the asides are short: draw more steps until the length is reached
            text = arith.long_reasoning(p["chain"]["start"], ops, 2 * text.count("\n\n") + 2, rng)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = tokenizer.decode(ids[:target])
        items.append((p["question"], split_steps(cut, SplitConfig())[0]))
        targets.append(target)
    return items, targets


def real_traces(path: Path, scorer, context: int, merge_tokens: int | None) -> dict:
    """Real R1 traces through the score stage: every step scored? (acceptance of issue 26)."""
    import pyarrow as pa

    from factory.answers import split_think
    from prm.score import ScoreConfig, score_table
    from prm.steps import SplitConfig

    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            rows.append({"question": r["question"], "reasoning": split_think(r["trace"]).reasoning,
                         "model": r.get("model", "?")})
    cfg = ScoreConfig(split=SplitConfig(merge_tokens=merge_tokens))
    cfg.prm.model = scorer.cfg.model
    t0 = time.perf_counter()
    table, stats = score_table(pa.Table.from_pylist(rows), cfg, scorer)
    seconds = time.perf_counter() - t0
    out = table.to_pylist()
    with_reasoning = [r for r in out if r["prm_num_unmerged_steps"]]
    every = [r for r in with_reasoning if r["prm_status"] == "ok" and len(r["prm_step_scores"]) == r["prm_num_steps"]]
    longest = max(r["prm_num_tokens"] or 0 for r in out)
    steps = [r["prm_num_steps"] for r in with_reasoning]
    windows = [r["prm_windows"] for r in every]
    least = [r["prm_min_context_tokens"] for r in every if r["prm_min_context_tokens"] is not None]
    read = sum(r["prm_tokens_read"] for r in every) / max(1, sum(r["prm_num_tokens"] for r in every))
    print(f"{path}: {len(out)} traces, {len(with_reasoning)} with a reasoning part; steps per trace median "
          f"{statistics.median(steps):.0f}, max {max(steps)} (merge_tokens {merge_tokens}); PRM context {context} "
          f"tokens, longest trace {longest} tokens ({longest / context:.1f}x the context)")
    print(f"every step scored: {len(every)} of {len(with_reasoning)} ({len(every) / max(1, len(with_reasoning)):.0%}); "
          f"statuses {stats['prm_status']}; windows per trace median {statistics.median(windows):.0f}, max {max(windows)}; "
          f"least preceding context median {statistics.median(least) if least else None} tokens; "
          f"tokens read per trace token {read:.3f}; {seconds:.1f} s")
    return {"file": str(path), "traces": len(out), "with_reasoning": len(with_reasoning), "every_step_scored": len(every),
            "statuses": stats["prm_status"], "context": context, "longest_trace_tokens": longest,
            "longest_over_context": round(longest / context, 2), "steps_median": statistics.median(steps),
            "steps_max": max(steps), "merge_tokens": merge_tokens, "windows_median": statistics.median(windows),
            "windows_max": max(windows), "least_context_median": statistics.median(least) if least else None,
            "tokens_read_per_trace_token": round(read, 4), "seconds": round(seconds, 2), "cpu": cpu_name(),
            "backend": scorer.cfg.backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096, help="the stand-in's max_position_embeddings")
    ap.add_argument("--read-factor", type=float, default=1.5, help="prm.window_read_factor")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r1", type=Path, help="a JSONL of real R1 traces (question, trace) to score instead")
    ap.add_argument("--merge-tokens", type=int, default=None, help="--r1: score.split.merge_tokens")
    args = ap.parse_args()

    from prm import tiny
    from prm.scorer import OK, PRMConfig, PRMScorer

    with tempfile.TemporaryDirectory() as d:
        out = tiny.qwen_prm(Path(d) / "prm", max_positions=args.context)
        cfg = PRMConfig(model=str(out), trust_remote_code=True, backend=args.backend, batch_size=args.batch_size,
                        window_read_factor=args.read_factor)
        scorer = PRMScorer(cfg)
        if args.r1:
            result = real_traces(args.r1, scorer, args.context, args.merge_tokens)
            if args.backend == "vllm":
                scorer.model.close()
            print(json.dumps(result))
            return
        items, targets = r1_like_items(args.traces, scorer.tokenizer, args.seed)
        t0 = time.perf_counter()
        results = scorer.score(items)
        seconds = time.perf_counter() - t0
        if args.backend == "vllm":
            scorer.model.close()
    ok = [r for r in results if r.status == OK]
    rendered = sum(r.num_tokens for r in ok)
    read = sum(r.tokens_read for r in ok)
    reasoning = sum(t for t, r in zip(targets, results) if r.status == OK)
    windowed = [r for r in ok if r.windows > 1]
    print(f"{len(items)} traces, reasoning tokens: median {statistics.median(targets):.0f}, "
          f"mean {statistics.mean(targets):.0f}, max {max(targets)}; {len(ok)} scored, "
          f"{len(windowed)} ({len(windowed) / len(items):.0%}) longer than the {scorer.max_length}-token context")
    print(f"tokens read per trace token: {read / rendered:.3f} (per reasoning token: {read / reasoning:.3f})")
    buckets = [(0, 4096), (4096, 8192), (8192, 16384), (16384, 10**9)]
    for lo, hi in buckets:
        sel = [r for r in ok if lo < r.num_tokens <= hi]
        if sel:
            least = [r.min_context for r in sel if r.min_context is not None]
            print(f"  traces of {lo}-{hi if hi < 10**9 else 'max'} tokens: {len(sel)}, read "
                  f"{sum(r.tokens_read for r in sel) / sum(r.num_tokens for r in sel):.3f}x, windows "
                  f"{statistics.mean(r.windows for r in sel):.1f}"
                  + (f", least context median {statistics.median(least):.0f} tokens" if least else ""))
    print(f"throughput ({args.backend}, tiny stand-in, {cpu_name()}): {rendered / seconds:,.0f} trace tokens/s "
          f"({read / seconds:,.0f} read/s), {len(items) / seconds:.2f} traces/s")
    gflop_7b = 2 * 7.6e9 * read / rendered / 1e9
    print(f"a 7B PRM would spend ~{gflop_7b:.1f} GFLOP per trace token (2 x 7.6B parameters x {read / rendered:.3f})")
    print(json.dumps({
        "traces": len(items), "scored": len(ok), "context": scorer.max_length, "read_factor": args.read_factor,
        "median_reasoning_tokens": statistics.median(targets), "windowed_share": round(len(windowed) / len(items), 3),
        "tokens_read_per_trace_token": round(read / rendered, 4), "tokens_read_per_reasoning_token": round(read / reasoning, 4),
        "least_context_median": statistics.median([r.min_context for r in windowed]) if windowed else None,
        "trace_tokens_per_s": round(rendered / seconds, 1), "traces_per_s": round(len(items) / seconds, 3),
        "seconds": round(seconds, 2), "backend": args.backend, "cpu": cpu_name(),
        "prm": f"tiny Qwen2ForProcessRewardModel stand-in, 64 hidden, 2 layers, {args.context} positions"}))


if __name__ == "__main__":
    main()
