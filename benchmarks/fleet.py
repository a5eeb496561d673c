"""Fleet behaviour without a fleet: `factory run` against a simulated teacher server.

    python benchmarks/fleet.py                         # utilization, traces/s, driver CPU per trace
    python benchmarks/fleet.py --ray                   # + Ray Data LLM's HTTP processor on the same server
                                                       #   (--ray-settings: its defaults, and the best setting found)
    python benchmarks/fleet.py --memory --problems 800 # peak RSS of the whole run at N and 10N problems
    python benchmarks/fleet.py --executor ray --replicas 8 --slots 32 [--baseline]
                                                       # executor=ray over 8 simulated replicas of 32 slots
                                                       # (+ one 256-slot server on the local executor)

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

With `--executor ray` the teacher is `--replicas` simulated replicas inside Ray (engine
backend `sim`: each replica actor holds its own `simserver.Teacher` with `--slots` slots at
`--rate`), and the run is `executor: ray` with `ray.engine_replicas` = replicas; utilization
is the replicas' busy slot-seconds over replicas x slots x the window from the first
request any replica saw to the last answer any gave (the rollout's wall time, measured as for
one server). `--baseline` also runs the local executor against one server of replicas x
slots slots on the same problems and says whether the products (curriculum, pairs,
difficulty, rejected rows) are identical. The last line printed is JSON with the figures.
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


def recipe(out: Path, problems: Path, port: int | None, args) -> Path:
    """The benchmark's recipe: the server backend on `port`, or (port None) executor=ray over
    simulated replicas."""
    tokenizer = str(ROOT / "data" / "demo" / "teacher")
    if port is None:
        engine = {"backend": "sim", "sim": {"slots": args.slots, "rate": args.rate, "median": args.median,
                                            "sigma": args.sigma, "tokenizer": tokenizer}}
    else:
        server = {"base_url": f"http://127.0.0.1:{port}/v1", "tokenizer": tokenizer}
        if args.concurrency:
            server["max_concurrency"] = args.concurrency
        engine = {"backend": "server", "server": server}
    data = {
        "run": {"output_dir": str(out), "progress": False},
        "engine": {**engine, "model": "sim", "max_model_len": args.max_tokens + 1024},
        "ingest": {"paths": [str(problems)], "default_domain": "numeric", "problems_per_shard": args.shard},
        "rollout": {"num_traces": args.k, "max_tokens": args.max_tokens, "question_template": "{question}"},
        "grade": {"workers": 1},
        "curate": {"max_traces_per_problem": 2},
    }
    if args.topup:  # difficulty-aware sampling after grade, at its defaults
        data["topup"] = {}
    if port is None:
        data.update(executor="ray", ray={"engine_replicas": args.replicas, "num_cpus": os.cpu_count(), "cpu_actors": 2})
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_factory(recipe_path: Path) -> tuple[float, int, int]:
    """Run `factory run` in a subprocess; return (wall seconds, peak RSS of its process tree, peak
    RSS of the driver process alone). On Ray the tree holds Ray's own processes and its actors."""
    t0 = time.perf_counter()
    log = open(recipe_path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(recipe_path)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    root, peak, driver = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            own = root.memory_info().rss
            rss = own + sum(p.memory_info().rss for p in root.children(recursive=True))
            peak, driver = max(peak, rss), max(driver, own)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"factory run failed ({proc.returncode}); see {recipe_path.with_suffix('.log')}")
    return time.perf_counter() - t0, peak, driver


def fleet_stats(out: Path, slots: int) -> dict:
    """The simulated replicas' counts (RUN/stages/rollout/_complete.json) as one server's /sim/stats."""
    reps = [r["engine"] for r in json.loads((out / "stages" / "rollout" / "_complete.json").read_text())["replicas"]]
    window = max(r["last"] for r in reps) - min(r["first"] for r in reps)
    busy = sum(r["busy_slot_seconds"] for r in reps)
    return {"slots": slots * len(reps), "busy_slot_seconds": busy, "window_seconds": window,
            "utilization": busy / (slots * len(reps) * window), "tokens": sum(r["tokens"] for r in reps),
            "sequences": sum(r["sequences"] for r in reps),
            "replica_utilization": [round(r["utilization"], 4) for r in reps]}


def factory_side(args, port: int | None, work: Path, n: int, name: str = "run") -> dict:
    """`factory run` on n problems against the server on `port` (or, port None, on Ray's simulated replicas)."""
    if port is not None and name != "serve":
        http(f"http://127.0.0.1:{port}/sim/reset", b"")
    out = work / f"{name}-{n}"
    ray_cpu = ray_cpu_seconds() if name == "serve" else 0.0
    wall, peak, driver = run_factory(recipe(out, write_problems(work / f"problems-{n}.jsonl", n), port, args))
    ray_cpu = ray_cpu_seconds() - ray_cpu if name == "serve" else None
    m = json.loads((out / "manifest.json").read_text())
    ro = m["stages"]["rollout"]
    if name == "serve":  # busy slot-seconds are tokens / rate (a sequence holds its slot that long)
        slots = args.slots * args.replicas
        sim = {"tokens": ro["generated_tokens"], "window_seconds": ro["seconds"], "sequences": ro["out"],
               "utilization": ro["generated_tokens"] / args.rate / (slots * ro["seconds"])}
    else:
        sim = http(f"http://127.0.0.1:{port}/sim/stats") if port is not None else fleet_stats(out, args.slots)
    # the rollout stage's own tokens (the sim's count holds the top-up's too, when it ran)
    sim["stage_utilization"] = ro["generated_tokens"] / args.rate / (sim.get("slots", args.slots * args.replicas) * ro["seconds"])
    topup = m["stages"].get("topup")
    if topup:  # the teacher's slots while the top-up's waves ran: busy slot-seconds are tokens / rate
        slots = sim.get("slots", args.slots * args.replicas)
        sim["topup"] = {"tokens": topup["generated_tokens"], "seconds": topup["seconds"],
                        **topup.get("topup", {}),
                        "utilization": topup["generated_tokens"] / args.rate / (slots * topup["seconds"])}
        print(f"top-up: {topup['generated_tokens']} tokens in {topup['seconds']:.1f} s "
              f"(ideal {topup['generated_tokens'] / args.rate / slots:.1f} s): utilization {sim['topup']['utilization']:.3f}",
              flush=True)
    text_bytes = sum(os.path.getsize(p) for p in (out / "stages" / "rollout").glob("shard-*.parquet"))
    return {"wall": wall, "peak_rss": peak, "driver_peak_rss": driver, "sim": sim, "rollout": ro, "traces": ro["out"],
            "serve_cpu_seconds": ray_cpu,
            "rollout_seconds": ro["seconds"], "text_bytes": sim["tokens"] * 4, "rollout_parquet_bytes": text_bytes,
            "out": out}


def ray_cpu_seconds() -> float:
    """CPU seconds used so far by this process's Ray instance (Serve's proxy, router and replicas)."""
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] != [sys.executable]:  # Ray's processes, not a `factory run`
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def products_digest(run: Path) -> str:
    """A hash of what a user reads from a run: curriculum and pair rows in file order, the
    difficulty table, and the rejected rows (sorted)."""
    import hashlib

    import pyarrow.parquet as pq

    m = json.loads((run / "manifest.json").read_text())
    h = hashlib.sha256()
    for f in [s["file"] for s in m["curriculum"]] + m["pairs"] + ["difficulty.parquet"]:
        h.update(json.dumps(pq.read_table(run / f).to_pylist(), sort_keys=True, default=str).encode())
    rejected = sorted(json.dumps(r, sort_keys=True, default=str)
                      for f in sorted((run / "rejected").glob("*/*.parquet")) for r in pq.read_table(f).to_pylist())
    h.update("".join(rejected).encode())
    return h.hexdigest()[:16]


def start_serve(args) -> tuple[int, object]:
    """Ray Serve with `--replicas` replicas of a deployment holding simserver's Teacher
    (`--slots` each) behind Serve's HTTP proxy, on this process's Ray instance; returns its port.
    The replicas keep no window of their own: Serve's router hands each request to a replica
    with fewer than `--serve-ongoing` requests (power of two choices), and the factory's server
    client (local executor) keeps its window of requests in flight against the proxy."""
    import asyncio

    import ray
    from ray import serve
    from starlette.responses import JSONResponse

    from factory.engines.simserver import Teacher

    @serve.deployment
    class SimReplica:
        # the completions route of simserver's app, on Serve (which routes each request to a replica)
        def __init__(self, slots, rate, median, sigma, max_model_len):
            self.teacher = Teacher(slots, rate, median, sigma, max_model_len)

        async def __call__(self, request):
            t = self.teacher
            body = await request.json()
            prompt, n, max_tokens = body["prompt"], int(body.get("n") or 1), int(body.get("max_tokens") or 16)
            outs = await asyncio.gather(*(t.run_sequence(prompt, int(body["seed"]) + i, max_tokens) for i in range(n)))
            return JSONResponse({"choices": [{"index": i, "text": x, "finish_reason": f} for i, (x, _, f) in enumerate(outs)],
                                 "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": sum(k for _, k, _ in outs)}})

    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = SimReplica.options(num_replicas=args.replicas, max_ongoing_requests=args.serve_ongoing,
                             ray_actor_options={"num_cpus": 0}).bind(args.slots, args.rate, args.median, args.sigma,
                                                                     args.max_tokens + 1024)
    handle = serve.run(app, route_prefix="/v1", name="sim")
    return port, handle


def ray_side(args, port: int, n: int, actors: int, batch: int) -> dict:
    """Ray Data LLM's HTTP request processor against the same server: K rows of n=1 per problem,
    `actors` HTTP actors (its `concurrency`) and `batch` rows per batch."""
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
                                        batch_size=batch, concurrency=actors,
                                        http_request_stage={"num_cpus": min(0.1, 1.5 / actors)})
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


def report(label: str, n: int, r: dict, slots: int, args) -> dict:
    """Print one run's line; return its figures."""
    sim = r["sim"]
    ideal = sim["tokens"] / (slots * args.rate)
    cpu_ms = r["rollout"].get("driver_cpu_seconds")
    print(f"{label} {n:>6} problems x {args.k}: utilization {sim['utilization']:.3f} "
          f"(rollout window {sim['window_seconds']:.1f} s, ideal {ideal:.1f} s), "
          f"{r['traces'] / max(sim['window_seconds'], 1e-9):.1f} traces/s, peak RSS {r['peak_rss'] / 2**20:.0f} MB "
          f"(driver {r['driver_peak_rss'] / 2**20:.0f} MB), trace text {r['text_bytes'] / 2**30:.2f} GB"
          + (f", driver CPU {1000 * cpu_ms / max(r['traces'], 1):.2f} ms/trace "
             f"({4 * sim['tokens'] / max(r['traces'], 1) / 1024:.1f} KB/trace)" if cpu_ms is not None else ""), flush=True)
    return {"problems": n, "utilization": round(sim["utilization"], 4), "window_seconds": round(sim["window_seconds"], 2),
            "stage_utilization": round(sim["stage_utilization"], 4), "rollout_seconds": round(r["rollout_seconds"], 2),
            "ideal_seconds": round(ideal, 2), "traces": r["traces"], "wall_seconds": round(r["wall"], 1),
            "peak_rss_mb": round(r["peak_rss"] / 2**20), "driver_peak_rss_mb": round(r["driver_peak_rss"] / 2**20),
            "text_gb": round(r["text_bytes"] / 2**30, 3),
            "driver_cpu_ms_per_trace": round(1000 * cpu_ms / max(r["traces"], 1), 3) if cpu_ms is not None else None,
            **({"replica_utilization": sim["replica_utilization"]} if "replica_utilization" in sim else {}),
            **({"topup": sim["topup"]} if "topup" in sim else {}),
            **({"serve_cpu_ms_per_trace": round(1000 * r["serve_cpu_seconds"] / max(r["traces"], 1), 3)}
               if r.get("serve_cpu_seconds") is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--k", type=int, default=8, help="traces per problem")
    ap.add_argument("--executor", choices=("local", "ray", "serve"), default="local",
                    help="local: factory run against one simulated server; ray: executor=ray over --replicas simulated "
                         "replicas; serve: the local executor against --replicas simulated replicas on Ray Serve")
    ap.add_argument("--serve-ongoing", type=int, default=None,
                    help="--executor serve: Serve's max_ongoing_requests per replica (default: 1.25 x --slots)")
    ap.add_argument("--replicas", type=int, default=8, help="--executor ray: simulated engine replicas")
    ap.add_argument("--slots", type=int, default=256, help="slots of the server (local) or of each replica (ray)")
    ap.add_argument("--baseline", action="store_true",
                    help="--executor ray: also the local executor against one server of replicas x slots; compare products")
    ap.add_argument("--rate", type=float, default=2000.0, help="tokens/s per slot")
    ap.add_argument("--median", type=float, default=3000.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--shard", type=int, default=256, help="ingest.problems_per_shard")
    ap.add_argument("--concurrency", type=int, default=None, help="engine.server.max_concurrency (default: the project's)")
    ap.add_argument("--ray", action="store_true", help="also run Ray Data LLM's HTTP processor")
    ap.add_argument("--ray-settings", default="1x64@8,64x8@512",
                    help="--ray: Ray Data LLM runs, each ACTORSxBATCH@PROBLEMS (its concurrency, batch_size, and "
                         "the problems sent); the default: its defaults (1 actor, batches of 64) on 8 problems, "
                         "and the best found here (64 actors, batches of 8) on 512")
    ap.add_argument("--memory", action="store_true", help="peak RSS at N and 10N problems")
    ap.add_argument("--topup", action="store_true",
                    help="with the top-up stage at its defaults; its own utilization is reported apart")
    args = ap.parse_args()
    total = args.slots * (args.replicas if args.executor != "local" else 1)
    args.serve_ongoing = args.serve_ongoing or args.slots + args.slots // 4
    work = Path(tempfile.mkdtemp(prefix="fleet-"))
    port, server = None, None
    if args.executor == "local" or args.baseline or args.ray:  # one server with every slot
        port = free_port()
        server = start_server(argparse.Namespace(**{**vars(args), "slots": total}), port)
    serve_port = start_serve(args)[0] if args.executor == "serve" else None
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    teacher = {"ray": f"{args.replicas} replicas x {args.slots} slots on Ray",
               "serve": f"{args.replicas} replicas x {args.slots} slots on Ray Serve (max_ongoing_requests "
                        f"{args.serve_ongoing})"}.get(args.executor, f"{args.slots} slots")
    print(f"machine: {cpu}, {os.cpu_count()} cores; simulated teacher: {teacher} x {args.rate:g} tok/s, "
          f"lengths lognormal(median {args.median:g}, sigma {args.sigma}) capped at {args.max_tokens}", flush=True)
    out = {"cpu": cpu, "cores": os.cpu_count(), "executor": args.executor, "slots": args.slots, "k": args.k,
           "rate": args.rate, "median": args.median, "sigma": args.sigma, "max_tokens": args.max_tokens,
           **({"replicas": args.replicas} if args.executor != "local" else {}),
           **({"serve_max_ongoing_requests": args.serve_ongoing} if args.executor == "serve" else {})}
    try:
        sizes = [args.problems, 10 * args.problems] if args.memory else [args.problems]
        results, runs = {}, {}
        for n in sizes:
            results[n] = factory_side(args, {"ray": None, "serve": serve_port}.get(args.executor, port), work, n, args.executor)
            runs[n] = report(f"factory ({args.executor})", n, results[n], total, args)
        out.update({k: v for k, v in runs[sizes[0]].items()})
        if args.memory:
            a, b = results[sizes[0]], results[sizes[1]]
            print(f"peak RSS {sizes[1]} / {sizes[0]} problems: {b['peak_rss'] / 2**20:.0f} MB / {a['peak_rss'] / 2**20:.0f} MB "
                  f"= {b['peak_rss'] / a['peak_rss']:.2f}x; driver alone {b['driver_peak_rss'] / 2**20:.0f} MB / "
                  f"{a['driver_peak_rss'] / 2**20:.0f} MB = {b['driver_peak_rss'] / a['driver_peak_rss']:.2f}x")
            out["memory"] = {"runs": [runs[n] for n in sizes], "peak_rss_ratio": round(b["peak_rss"] / a["peak_rss"], 3),
                             "driver_peak_rss_ratio": round(b["driver_peak_rss"] / a["driver_peak_rss"], 3)}
        if args.executor != "local" and args.baseline:
            n = args.problems
            base = factory_side(args, port, work, n, "local")
            figures = report("factory (local, one server)", n, base, total, args)
            same = products_digest(base["out"]) == products_digest(results[n]["out"])
            print(f"one {total}-slot server: utilization {figures['utilization']:.3f}; ray - server = "
                  f"{out['utilization'] - figures['utilization']:+.3f}; products identical: {same}")
            out["baseline"] = {"slots": total, "utilization": figures["utilization"],
                               "window_seconds": figures["window_seconds"], "wall_seconds": figures["wall_seconds"]}
            out["products_identical"] = same
        if args.ray:
            out["ray_data_llm"] = []
            for setting in args.ray_settings.split(","):
                shape, n = setting.split("@")
                actors, batch = map(int, shape.split("x"))
                r = ray_side(args, port, int(n), actors, batch)
                sim = r["sim"]
                print(f"ray.data.llm {int(n):>4} problems x {args.k}: utilization {sim['utilization']:.3f} "
                      f"(window {sim['window_seconds']:.1f} s), {r['traces'] / max(sim['window_seconds'], 1e-9):.1f} "
                      f"traces/s (wall {r['wall']:.1f} s, batch_size {batch}, {actors} actors)", flush=True)
                out["ray_data_llm"].append({"problems": int(n), "utilization": round(sim["utilization"], 4),
                                            "window_seconds": round(sim["window_seconds"], 2), "wall_seconds": round(r["wall"], 1),
                                            "traces_per_s": round(r["traces"] / max(sim["window_seconds"], 1e-9), 2),
                                            "batch_size": batch, "actors": actors})
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print(f"work dir: {work}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
