"""Fleet behaviour without a fleet: `factory run` against a simulated teacher server.

    python benchmarks/fleet.py                         # utilization, traces/s, driver CPU per trace
    python benchmarks/fleet.py --ray                   # + Ray Data LLM's HTTP processor on the same server
    python benchmarks/fleet.py --memory --problems 800 # peak RSS of the whole run at N and 10N problems

The teacher is `factory.engines.simserver` in its own process: `--slots` sequence slots decoding
`--rate` tokens/s each, lognormal trace lengths (median `--median`, sigma `--sigma`, capped
at `--max-tokens`), ~4 bytes of text per token, a boxed answer that is right with a
per-problem probability. The factory runs the recipe it writes (server backend, the
project's default concurrency unless `--concurrency`), in a subprocess whose process tree
is sampled for RSS. Printed:

- utilization = busy slot-seconds / (slots x the server's window from first request to last
  answer), and the ideal rollout time (all tokens / (slots x rate));
- traces/s and the rollout stage's driver CPU per trace (from the manifest, where recorded);
- with --ray, the same figures for `ray.data.llm`'s HTTP request processor sending the same
  prompts (one sample per row: Ray Data has no n, so K rows per problem);
- with --memory, peak RSS (all processes) at N and 10N problems, their ratio, and the bytes
  of trace text each run produced.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")) as r:
        return json.loads(r.read())


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "factory.engines.simserver", "--port", str(port), "--slots", str(args.slots),
           "--rate", str(args.rate), "--median", str(args.median), "--sigma", str(args.sigma),
           "--max-model-len", str(args.max_tokens + 1024)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        try:
            http(f"http://127.0.0.1:{port}/sim/stats")
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the simulated teacher did not start")


def write_problems(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randrange(10**6), rng.randrange(10**6)
            f.write(json.dumps({"id": f"q{i:07d}", "question": f"Problem {i}: what is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def recipe(out: Path, problems: Path, port: int, args) -> Path:
    server = {"base_url": f"http://127.0.0.1:{port}/v1", "tokenizer": str(ROOT / "data" / "demo" / "teacher")}
    if args.concurrency:
        server["max_concurrency"] = args.concurrency
    data = {
        "run": {"output_dir": str(out), "progress": False},
        "engine": {"backend": "server", "model": "sim", "max_model_len": args.max_tokens + 1024, "server": server},
        "ingest": {"paths": [str(problems)], "default_domain": "numeric", "problems_per_shard": args.shard},
        "rollout": {"num_traces": args.k, "max_tokens": args.max_tokens, "question_template": "{question}"},
        "grade": {"workers": 1},
        "curate": {"max_traces_per_problem": 2},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_factory(recipe_path: Path) -> tuple[float, int]:
    """Run `factory run` in a subprocess; return (wall seconds, peak RSS of its process tree)."""
    t0 = time.perf_counter()
    log = open(recipe_path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], stdout=log, stderr=subprocess.STDOUT)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"factory run failed ({proc.returncode}); see {recipe_path.with_suffix('.log')}")
    return time.perf_counter() - t0, peak


def factory_side(args, port: int, work: Path, n: int) -> dict:
    http(f"http://127.0.0.1:{port}/sim/reset", b"")
    out = work / f"run-{n}"
    wall, peak = run_factory(recipe(out, write_problems(work / f"problems-{n}.jsonl", n), port, args))
    sim = http(f"http://127.0.0.1:{port}/sim/stats")
    m = json.loads((out / "manifest.json").read_text())
    ro = m["stages"]["rollout"]
    text_bytes = sum(os.path.getsize(p) for p in (out / "stages" / "rollout").glob("shard-*.parquet"))
    return {"wall": wall, "peak_rss": peak, "sim": sim, "rollout": ro, "traces": ro["out"],
            "rollout_seconds": ro["seconds"], "text_bytes": sim["tokens"] * 4, "rollout_parquet_bytes": text_bytes}


def ray_side(args, port: int, n: int) -> dict:
    """Ray Data LLM's HTTP request processor against the same server: K rows of n=1 per problem."""
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    http(f"http://127.0.0.1:{port}/sim/reset", b"")
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10**6), rng.randrange(10**6)
        for k in range(args.k):
            rows.append({"prompt": f"Problem {i}: what is {a} + {b}?", "seed": 1000 * i + k})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # `concurrency` is Ray's actor count; each actor sends a batch's requests one after another
    # (ray/llm/_internal/batch/stages/http_request_stage.py), so actors x batches in flight per
    # actor is what keeps the server's slots fed; a small CPU share each lets them all fit here
    config = HttpRequestProcessorConfig(url=f"http://127.0.0.1:{port}/v1/completions", qps=None,
                                        batch_size=args.ray_batch, concurrency=args.ray_actors,
                                        http_request_stage={"num_cpus": min(0.1, 1.5 / args.ray_actors)})
    proc = build_processor(
        config,
        preprocess=lambda r: {"payload": {"model": "sim", "prompt": r["prompt"], "max_tokens": args.max_tokens,
                                          "seed": int(r["seed"]), "n": 1}},
        postprocess=lambda r: {"text": r["http_response"]["choices"][0]["text"]},
    )
    t0 = time.perf_counter()
    got = proc(ray.data.from_items(rows)).count()
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"wall": wall, "traces": got, "sim": http(f"http://127.0.0.1:{port}/sim/stats")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--k", type=int, default=8, help="traces per problem")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--rate", type=float, default=2000.0, help="tokens/s per slot")
    ap.add_argument("--median", type=float, default=3000.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--shard", type=int, default=256, help="ingest.problems_per_shard")
    ap.add_argument("--concurrency", type=int, default=None, help="engine.server.max_concurrency (default: the project's)")
    ap.add_argument("--ray", action="store_true", help="also run Ray Data LLM's HTTP processor")
    ap.add_argument("--ray-batch", type=int, default=64, help="Ray Data LLM's batch_size (its default)")
    ap.add_argument("--ray-actors", type=int, default=16, help="Ray Data LLM's concurrency (HTTP actors)")
    ap.add_argument("--memory", action="store_true", help="peak RSS at N and 10N problems")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    port = free_port()
    server = start_server(args, port)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; simulated teacher: {args.slots} slots x {args.rate:g} tok/s, "
          f"lengths lognormal(median {args.median:g}, sigma {args.sigma}) capped at {args.max_tokens}")
    try:
        sizes = [args.problems, 10 * args.problems] if args.memory else [args.problems]
        results = {}
        for n in sizes:
            r = results[n] = factory_side(args, port, work, n)
            sim = r["sim"]
            ideal = sim["tokens"] / (args.slots * args.rate)
            cpu_ms = r["rollout"].get("driver_cpu_seconds")
            print(f"factory  {n:>6} problems x {args.k}: utilization {sim['utilization']:.3f} "
                  f"(rollout window {sim['window_seconds']:.1f} s, ideal {ideal:.1f} s), "
                  f"{r['traces'] / max(sim['window_seconds'], 1e-9):.1f} traces/s, peak RSS {r['peak_rss'] / 2**20:.0f} MB, "
                  f"trace text {r['text_bytes'] / 2**30:.2f} GB"
                  + (f", driver CPU {1000 * cpu_ms / max(r['traces'], 1):.2f} ms/trace "
                     f"({4 * sim['tokens'] / max(r['traces'], 1) / 1024:.1f} KB/trace)" if cpu_ms is not None else ""))
        if args.memory:
            a, b = results[sizes[0]]["peak_rss"], results[sizes[1]]["peak_rss"]
            print(f"peak RSS {sizes[1]} / {sizes[0]} problems: {b / 2**20:.0f} MB / {a / 2**20:.0f} MB = {b / a:.2f}x")
        if args.ray:
            r = ray_side(args, port, args.problems)
            sim = r["sim"]
            print(f"ray.data.llm {args.problems:>3} problems x {args.k}: utilization {sim['utilization']:.3f} "
                  f"(window {sim['window_seconds']:.1f} s), {r['traces'] / max(sim['window_seconds'], 1e-9):.1f} traces/s "
                  f"(wall {r['wall']:.1f} s, batch_size {args.ray_batch}, {args.ray_actors} actors)")
    finally:
        server.terminate()
        server.wait()
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
