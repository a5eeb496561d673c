"""The driver's memory in the global stages: ingest + dedup + decontam of N synthetic problems.

    python benchmarks/global_stages.py [--problems 1000000] [--small 100000] [--code DIR]

Writes N word problems as JSONL (the dedup benchmark's kind: 40 templates over a 2,000-word
vocabulary, 30-70 words and a few numbers each, 10% planted duplicates: exact copies with other
case and spacing, and copies with one word changed; one in 10,000 a copy of a benchmark
question) and a benchmark of 1,000 questions from templates of its own, then runs the recipe's first stages (`Runner.run_ingest`, `run_dedup`,
`run_decontam`) in a subprocess whose peak RSS is sampled, at `--small` problems and at N.
`--code DIR` runs them with another checkout of the factory (e.g. the commit before the
stages streamed) for the same figures. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import resource, sys, time, json
sys.path.insert(0, sys.argv[1])
from factory.run import pipeline
from factory.run.recipe import Recipe
from factory import config as config_mod
def main():
    recipe = config_mod.from_dict(Recipe, json.loads(open(sys.argv[2]).read()))
    r = pipeline.Runner(recipe, log=lambda m: None)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MB so far
    t0, stages = time.perf_counter(), {"imports": peak()}
    sd = r.run_ingest()
    stages["ingest"] = peak()
    sd = r.run_dedup(sd)
    stages["dedup"] = peak()
    sd = r.run_decontam(sd)
    stages["decontam"] = peak()
    counts = [json.loads(p.read_text()) for p in sorted(sd.path.glob("shard-*.done"))]
    print(json.dumps({"seconds": time.perf_counter() - t0, "kept": sum(c["rows_out"] for c in counts),
                      "peak_mb_after": stages}))
    r.close()
if __name__ == "__main__":
    main()
"""


def question(i: int, seed: int, vocab: list[str], templates: list[list[str]]) -> str:
    rng = random.Random(f"{seed}:{i}")  # a question is made from its own seed: a duplicate remakes its source
    words = list(rng.choice(templates))
    for _ in range(rng.randint(2, 6)):
        words[rng.randrange(len(words))] = rng.choice(vocab)
    for _ in range(rng.randint(2, 4)):
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**6)))
    return " ".join(words) + "?"


def write_problems(path: Path, n: int, dup_share: float = 0.1, seed: int = 0) -> tuple[int, Path]:
    """N problems as JSONL, written as they are made; and a benchmark of 1,000 questions made
    from templates of their own, one in 10,000 problems being a copy of one of them."""
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(10**6):06d}" for _ in range(2000)]
    templates = [[rng.choice(vocab) for _ in range(rng.randint(30, 70))] for _ in range(40)]
    other = [[rng.choice(vocab) for _ in range(rng.randint(30, 70))] for _ in range(40)]
    bench_questions = [question(i, seed + 1, vocab, other) for i in range(1000)]
    bench = path.with_name(path.stem + "-bench.jsonl")
    bench.write_text("".join(json.dumps({"question": q}) + "\n" for q in bench_questions))
    n_unique = int(n * (1 - dup_share))
    size = 0
    with open(path, "w") as f:
        for i in range(n):
            if i % 10_000 == 5_000:
                q = bench_questions[rng.randrange(1000)]  # contaminated
            elif i < n_unique:
                q = question(i, seed, vocab, templates)
            else:
                src = question(rng.randrange(n_unique), seed, vocab, templates)
                if rng.random() < 0.5:
                    q = "  " + src.upper().replace(" ", "   ", 3) + " "
                else:
                    words = src.split(" ")
                    k = rng.choice([j for j, w in enumerate(words) if not w.isdigit()])
                    words[k] = rng.choice(vocab)
                    q = " ".join(words)
            line = json.dumps({"id": f"q{i:07d}", "question": q, "answer": str(i % 97)}) + "\n"
            size += len(line)
            f.write(line)
    return size, bench


def measure(code: Path, work: Path, n: int) -> dict:
    problems = work / f"problems-{n}.jsonl"
    size, bench = write_problems(problems, n)
    recipe = {"run": {"output_dir": str(work / f"run-{n}-{code.name}"), "progress": False},
              "ingest": {"paths": [str(problems)], "default_domain": "numeric", "problems_per_shard": 256},
              "dedup": {}, "decontam": {"benchmarks": [{"name": "bench", "paths": [str(bench)]}]}}
    recipe_path = work / f"recipe-{n}.json"
    recipe_path.write_text(json.dumps(recipe))
    child = work / "child.py"
    child.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(child), str(code), str(recipe_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=code)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, root.memory_info().rss + sum(p.memory_info().rss for p in root.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode or not out:
        raise RuntimeError(f"the stages failed ({proc.returncode}) at {n} problems with {code}")
    got = json.loads(out[-1])
    problems.unlink()
    return {"problems": n, "input_mb": round(size / 2**20), "peak_rss_mb": round(peak / 2**20),
            "seconds": round(got["seconds"], 1), "kept": got["kept"], "peak_mb_after": got["peak_mb_after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--code", type=Path, default=ROOT, help="the factory checkout to run (default: this one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="global-stages-"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; code: {args.code}", flush=True)
    runs = []
    for n in (args.small, args.problems):
        r = measure(args.code.resolve(), work, n)
        runs.append(r)
        print(f"{n:>8} problems ({r['input_mb']} MB of JSONL): ingest + dedup + decontam {r['seconds']} s, "
              f"peak RSS {r['peak_rss_mb']} MB (the driver's peak after each stage, MB: {r['peak_mb_after']}), "
              f"{r['kept']} kept", flush=True)
    print(f"work dir: {work}")
    print(json.dumps({"cpu": cpu, "code": str(args.code), "runs": runs,
                      "peak_rss_ratio": round(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
