"""Rollout on Ray's engine replicas vs each replica's all-at-once LLM.generate, heavy-tailed lengths.

    python benchmarks/rollout_ray.py [--model DIR] [--replicas 2] [--problems 200] [--shard 10] [--rounds 2]
    python benchmarks/rollout_ray.py --modes "all at once,fleet" --abba --rounds 12   # the ratio, pooled

The requests are `rollout_continuous.py`'s: every request ignores EOS and gets its own budget,
drawn lognormal (median `--median`, sigma `--sigma`, capped at `--cap`) from its seed. Each of
`--replicas` Ray actors (one CPU each) holds one in-process vLLM engine (float32 by default)
with those forced lengths, and per round:

- all at once: every replica runs one `LLM.generate` over its share of the requests (the
  problems dealt round-robin), all replicas at the same time: the ceiling per replica;
- fleet:       the pipeline's continuous rollout (`factory.run.continuous`, shards of `--shard`
               problems, partial files and all) through an `EngineFleet` of the same actors,
               each replica streaming what it takes from its inbox;
- requests only: `EngineFleet.stream` over the same requests already prepared (no rollout
               stage on the driver), which separates the fleet from the driver's own work;
- engine stream: each replica's share through its engine's own `stream` inside the actor (fed
               from a list, no inbox, no driver), which separates the engine's stream from the fleet.

With `--pin`, replica j runs on a core of its own (the last `--replicas` cores) and the driver
with Ray's own processes on the others: this separates what the fleet costs a replica from what
sharing its core with the driver costs it (`--replicas` must then be fewer than the cores).

Within each replica's process, the CPU seconds of its engine's thread (the busiest) and of the
rest (Ray's threads, the fleet's poll and submit) and how often the kernel took the core from the
engine's thread, per mode: every mode decodes the same tokens, so these compare as they are.

Prints each replica's tokens/s on both sides (fleet: its tokens over the time from the first
request it took to the last it finished) and their ratio, then a JSON line. With `--ray-data`,
the same requests also go through Ray Data LLM's vLLM engine processor (`--replicas` engines of
one CPU each), timed end to end with its engines' start (`ray_data_llm` says which settings).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import rollout_continuous  # noqa: E402  (its ForcedLengths engine, sent to the actors by value)
from rollout_continuous import ForcedLengths  # noqa: E402

from factory import schema, store, tiny  # noqa: E402
from factory.engines import EngineConfig, Sampling  # noqa: E402
from factory.engines.fleet import EngineFleet, HFTokenizer  # noqa: E402
from factory.run.continuous import rollout_shards  # noqa: E402
from factory.stages.rollout import RolloutConfig, prepare  # noqa: E402


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this process and of every process of its Ray instance, by name."""
    import psutil

    out: dict[str, float] = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            name = "driver" if p.pid == me.pid else p.name()
            t = p.cpu_times()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def stolen_s() -> float:
    """CPU seconds the hypervisor gave to others so far, all cores together (/proc/stat's steal):
    what a round lost to the VM's neighbours, not to anything it ran."""
    fields = open("/proc/stat").readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after if after[k] - before.get(k, 0.0) >= 0.05}


def generate_share(requests: list[tuple[list[int], Sampling]], engine) -> dict:
    """In a replica: one LLM.generate over its share (the engine's forced lengths applied)."""
    params = [engine.sampling_params(s) for _, s in requests]
    t0 = time.perf_counter()
    outs = engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(c.token_ids) for o in outs for c in o.outputs), "seconds": seconds}


def stream_share(requests: list[tuple[list[int], Sampling]], engine) -> dict:
    """In a replica: its share through the engine's own `stream` (what the fleet runs there, fed
    from a list instead of the inbox)."""
    from factory.engines import Request

    t0, tokens = time.perf_counter(), 0
    for _, outs in engine.stream([Request(i, ids, s) for i, (ids, s) in enumerate(requests)]):
        tokens += sum(c.num_tokens for c in outs)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def thread_times(_engine=None) -> dict[int, tuple[float, int]]:
    """In a replica: CPU seconds and involuntary context switches (times the kernel took the core
    from it) of each of its process's threads, by thread id."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            status = open(f"/proc/self/task/{tid}/status").read()
        except OSError:  # a thread that ended meanwhile
            continue
        switches = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        name = status.split("Name:", 1)[1].split("\n", 1)[0].strip()
        out[int(tid)] = ((int(stat[11]) + int(stat[12])) / tick, switches, name)
    return out


def gc_clock(engine) -> dict:
    """In a replica: the garbage collector's seconds and collections so far, by generation (a
    clock installed on first call, kept on the engine object: this module is pickled by value, a
    fresh copy per call)."""
    import gc

    clock = getattr(engine, "_gc_clock", None)
    if clock is None:
        clock = engine._gc_clock = {"s": [0.0, 0.0, 0.0], "n": [0, 0, 0], "t0": [0.0]}

        def tick(phase, info, clock=clock):
            if phase == "start":
                clock["t0"][0] = time.perf_counter()
            else:
                g = info["generation"]
                clock["s"][g] += time.perf_counter() - clock["t0"][0]
                clock["n"][g] += 1

        gc.callbacks.append(tick)
    return {"s": list(clock["s"]), "n": list(clock["n"])}


def gc_split(before: dict, after: dict) -> dict:
    return {"gc_s": round(sum(after["s"]) - sum(before["s"]), 3),
            "gc_gen2": after["n"][2] - before["n"][2], "gc_gen2_s": round(after["s"][2] - before["s"][2], 3)}


def thread_split(before: dict, after: dict) -> dict:
    """The busiest thread over a span (the engine's) against the rest of its process."""
    delta = {t: (after[t][0] - before.get(t, (0.0, 0))[0], after[t][1] - before.get(t, (0.0, 0))[1]) for t in after}
    top = max(delta, key=lambda t: delta[t][0])
    others = collections.Counter()  # the rest by thread name (Ray's threads are named by role)
    for t, d in delta.items():
        if t != top and d[0] > 0:
            others[after[t][2]] += d[0]
    return {"engine_thread_s": round(delta[top][0], 2), "other_threads_s": round(sum(d[0] for t, d in delta.items() if t != top), 2),
            "engine_thread_preempted": delta[top][1],
            "other_threads_by_name": {k: round(v, 2) for k, v in others.most_common(6)}}


def pin_process(cores: list[int]) -> list[int]:
    """Every thread of this process onto `cores` (sched_setaffinity acts on one thread; threads
    started later inherit their creator's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build the tiny addition teacher)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--shard", type=int, default=10, help="problems per shard")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--median", type=float, default=60)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--cap", type=int, default=400)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefetch", type=int, default=2, help="EngineFleet prefetch")
    ap.add_argument("--linger", type=float, default=0.05, help="EngineFleet linger_s")
    ap.add_argument("--queue", type=float, default=0.5, help="EngineFleet queue_s")
    ap.add_argument("--modes", default="all at once,fleet,requests only,engine stream",
                    help="comma-separated modes to run each round (all at once is always run: it is the baseline)")
    ap.add_argument("--abba", action="store_true",
                    help="reverse the modes' order every other round, so a drift of the machine's speed "
                         "over the run weighs on every mode alike")
    ap.add_argument("--pin", action="store_true", help="each replica on a core of its own, the driver and Ray on the rest")
    ap.add_argument("--ray-data", action="store_true", help="also Ray Data LLM's vLLM engine processor, end to end")
    ap.add_argument("--ray-data-batch", type=int, default=64, help="its batch_size")
    args = ap.parse_args()
    import ray
    import ray.cloudpickle

    cores = sorted(os.sched_getaffinity(0))
    if args.pin and args.replicas >= len(cores):
        ap.error(f"--pin needs more cores ({len(cores)}) than replicas ({args.replicas})")
    tmp = Path(tempfile.mkdtemp(prefix="rollout-ray-"))
    model = args.model or str(tiny.build_addition_teacher(tmp / "teacher"))
    if args.pin:
        pin_process(cores[:-args.replicas])  # the driver, and the Ray processes it starts
    config = EngineConfig(model=model, max_model_len=args.cap + 64, cpu_kv_cache_space_gb=1, dtype=args.dtype)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(rollout_continuous)  # the actors cannot import benchmarks/
    t0 = time.perf_counter()
    fleet = EngineFleet(functools.partial(ForcedLengths, config, args.median, args.sigma, args.cap), HFTokenizer(model),
                        args.replicas, {"num_cpus": 1}, prefetch=args.prefetch, linger_s=args.linger, queue_s=args.queue)
    start = time.perf_counter() - t0
    if args.pin:
        pinned = ray.get([r.call.remote(lambda e, c=c: pin_process([c])) for r, c in
                          zip(fleet.replicas, cores[-args.replicas:])])
        print(f"replicas pinned to cores {pinned}; the driver and Ray on {sorted(os.sched_getaffinity(0))}")
    rows = [{"problem_id": f"p{i}", "question": p["question"], "answer": p["answer"], "domain": "numeric",
             "choices": None, "source": "bench", "split": "train"}
            for i, p in enumerate(tiny.addition_problems(args.problems, seed=1))]
    cfg = RolloutConfig(num_traces=8, temperature=1.0, top_p=1.0, max_tokens=args.cap, question_template="{question}")
    ingest = store.StageDir(tmp / "run", "ingest")
    n_shards = -(-len(rows) // args.shard)
    for i in range(n_shards):
        ingest.write_shard(i, schema.table(rows[i * args.shard:(i + 1) * args.shard], schema.PROBLEMS),
                           schema.table([], schema.REJECTED), {})
    ingest.finish(n_shards, {})
    fits, _, _ = prepare(rows, cfg, fleet)
    share = [[(list(p.ids), p.sampling) for p in fits[j::args.replicas]] for j in range(args.replicas)]

    def all_at_once() -> list[float]:
        got = ray.get([r.call.remote(functools.partial(generate_share, share[j])) for j, r in enumerate(fleet.replicas)])
        return [g["tokens"] / g["seconds"] for g in got]

    def engine_stream() -> list[float]:
        got = ray.get([r.call.remote(functools.partial(stream_share, share[j])) for j, r in enumerate(fleet.replicas)])
        return [g["tokens"] / g["seconds"] for g in got]

    fleet_seconds, driver_cpu = [], []  # a round's wall time, and the CPU the driver spent in it

    def streamed() -> list[float]:
        fleet.stats(reset=True)
        out = store.StageDir(tmp / "run", "rollout")
        shutil.rmtree(out.path, ignore_errors=True)
        t0, cpu0 = time.perf_counter(), time.process_time()
        rollout_shards(out, ingest, list(range(n_shards)), cfg, fleet)
        fleet_seconds.append(round(time.perf_counter() - t0, 2))
        driver_cpu.append(round(time.process_time() - cpu0, 2))
        # per replica: its tokens over the span from the first request it took to its last answer
        return [s["tokens"] / (s["last_done"] - s["first_taken"]) for s in fleet.stats()]

    def requests_only() -> list[float]:
        """fleet.stream over the prepared requests: the fleet without the pipeline's work on the driver."""
        from factory.engines import Request

        fleet.stats(reset=True)
        for _ in fleet.stream([Request(i, p.ids, p.sampling) for i, p in enumerate(fits)]):
            pass
        return [s["tokens"] / (s["last_done"] - s["first_taken"]) for s in fleet.stats()]

    all_at_once()  # warm up both paths
    streamed()
    base, fleet_rates, raw, own, cpu_use = [], [], [], [], {}
    wanted = {m.strip() for m in args.modes.split(",")} | {"all at once", "fleet"}
    modes = [m for m in (("all at once", all_at_once, base), ("fleet", streamed, fleet_rates),
                         ("requests only", requests_only, raw), ("engine stream", engine_stream, own))
             if m[0] in wanted]
    nan = [float("nan")] * args.replicas
    for k in range(args.rounds):
        for name, side, got in (modes[::-1] if args.abba and k % 2 else modes):
            c0, t0, st0 = cpu_by_process(), time.perf_counter(), stolen_s()
            th0 = ray.get([r.call.remote(thread_times) for r in fleet.replicas])
            g0 = ray.get([r.call.remote(gc_clock) for r in fleet.replicas])
            got.append(side())
            g1 = ray.get([r.call.remote(gc_clock) for r in fleet.replicas])
            th1 = ray.get([r.call.remote(thread_times) for r in fleet.replicas])
            # where the cores went during the round (the replicas are the ray::Replica processes),
            # and within each replica, its engine's thread against Ray's and the fleet's threads
            cpu_use.setdefault(name, []).append({"wall_s": round(time.perf_counter() - t0, 2), "stolen_s": round(stolen_s() - st0, 2),
                                                 **cpu_delta(c0, cpu_by_process()),
                                                 "replica_threads": [thread_split(a, b) | gc_split(c, d)
                                                                     for a, b, c, d in zip(th0, th1, g0, g1)]})
        for got in (raw, own):
            if len(got) <= k:
                got.append(nan)
        print(f"round {k + 1}: " + "   ".join(f"replica {j}: all at once {base[-1][j]:7.0f} tok/s, fleet {fleet_rates[-1][j]:7.0f} "
                                              f"({fleet_rates[-1][j] / base[-1][j]:.3f}x; requests only "
                                              f"{raw[-1][j] / base[-1][j]:.3f}x; its engine's stream alone "
                                              f"{own[-1][j] / base[-1][j]:.3f}x)" for j in range(args.replicas)),
              flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    draw = types.SimpleNamespace(median=args.median, sigma=args.sigma, cap=args.cap)  # the engines' draw
    lengths = sorted(ForcedLengths.budget(draw, p.sampling.seed) for p in fits)
    ratios = [statistics.median(f[j] / b[j] for f, b in zip(fleet_rates, base)) for j in range(args.replicas)]
    print(f"\n{cpu}; {args.replicas} replicas x 1 CPU, dtype {args.dtype}, engine start {start:.0f} s")
    print(f"{args.problems} problems x 8 in {n_shards} shards of {args.shard}; forced lengths median "
          f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]} tokens")
    for name, rounds in cpu_use.items():
        print(f"CPU seconds by process, {name}: {rounds[-1]}")
    for name, rounds in cpu_use.items():  # the same tokens in every mode: these compare as they are
        med = lambda key, j: statistics.median(r["replica_threads"][j][key] for r in rounds)
        print(f"replica threads, {name} (medians over rounds): " + "; ".join(
            f"replica {j}: engine thread {med('engine_thread_s', j):.2f} s, other threads {med('other_threads_s', j):.2f} s, "
            f"engine thread preempted {med('engine_thread_preempted', j):.0f} times, garbage collector "
            f"{med('gc_s', j):.2f} s ({med('gc_gen2', j):.0f} full collections)" for j in range(args.replicas)))
    for name, rounds in cpu_use.items():
        print(f"stolen by the hypervisor, {name}: " + ", ".join(f"{r['stolen_s']:.2f}" for r in rounds)
              + " CPU-s per round (both cores)")
    walls = {name: sum(r["wall_s"] for r in rounds) for name, rounds in cpu_use.items()}
    walls.setdefault("requests only", float("nan"))
    print(f"the rounds end to end (both replicas, the driver's work included): all at once {walls['all at once']:.1f} s, "
          f"fleet {walls['fleet']:.1f} s ({walls['all at once'] / walls['fleet']:.3f}x the throughput), requests only "
          f"{walls['requests only']:.1f} s ({walls['all at once'] / walls['requests only']:.3f}x)")
    # pooled over the rounds: each replica's mean fleet rate over its mean all-at-once rate, with the
    # spread of the per-round ratios (one round's ratio on a shared VM says little: NOTES.md)
    per_round = [[f[j] / b[j] for f, b in zip(fleet_rates, base)] for j in range(args.replicas)]
    pooled = [statistics.fmean(f[j] for f in fleet_rates) / statistics.fmean(b[j] for b in base)
              for j in range(args.replicas)]
    for j in range(args.replicas):
        q = sorted(per_round[j])
        print(f"replica {j}: pooled fleet / all at once {pooled[j]:.3f} over {len(q)} rounds; per round "
              f"min {q[0]:.3f}, quartiles {q[len(q) // 4]:.3f} / {q[(3 * len(q)) // 4]:.3f}, max {q[-1]:.3f}")
    raw_ratios = [statistics.median(f[j] / b[j] for f, b in zip(raw, base)) for j in range(args.replicas)]
    for j, r in enumerate(ratios):
        print(f"replica {j}: fleet / all at once over its share = {r:.3f}; the fleet on the prepared requests alone "
              f"(no rollout stage on the driver) {raw_ratios[j]:.3f} (medians of per-round ratios)")
    result = {"cpu": cpu, "replicas": args.replicas, "pinned": args.pin, "problems": args.problems, "shard": args.shard,
              "dtype": args.dtype, "all_at_once_tok_s": base, "fleet_tok_s": fleet_rates,
              "ratio_per_replica": [round(r, 3) for r in ratios], "pooled_ratio_per_replica": [round(r, 3) for r in pooled],
              "per_round_ratio": [[round(r, 3) for r in rs] for rs in per_round], "modes": [m[0] for m in modes],
              "abba": args.abba, "engine_start_s": round(start, 1),
              "requests_only_tok_s": raw if "requests only" in wanted else None,
              "requests_only_ratio_per_replica": [round(r, 3) for r in raw_ratios] if "requests only" in wanted else None,
              "engine_stream_tok_s": own if "engine stream" in wanted else None,
              "wall_ratio": round(walls["all at once"] / walls["fleet"], 3),
              "fleet_round_s": fleet_seconds, "driver_cpu_s": driver_cpu, "prefetch": args.prefetch, "linger_s": args.linger, "queue_s": args.queue, "cpu_seconds": cpu_use}
    fleet.close()
    if args.ray_data:
        result["ray_data_llm"] = ray_data_llm(args, model, fits)
        r = result["ray_data_llm"]
        print(f"Ray Data LLM vLLMEngineProcessorConfig ({r['settings']}): {r['tokens']} tokens in {r['seconds']:.1f} s "
              f"end to end ({r['tokens'] / r['seconds']:.0f} tok/s); the fleet: start {start:.0f} s + "
              f"{min(fleet_seconds):.1f} s per round")
    print(json.dumps(result))
    ray.shutdown()


def ray_data_llm(args, model: str, fits) -> dict:
    """The same requests through Ray Data LLM's vLLM engine processor, `--replicas` engines, end to
    end (its engines' start included). One row per sample (its engine stage returns one output
    per row), seeded seed+i as vLLM seeds sample i of an n-request; lengths forced as above.
    The settings that let it start on a CPU-only cluster: a placement group of one CPU bundle
    (without one the engine stage asks for a GPU per engine), and no chat-template, tokenize or
    detokenize stages (a CPU actor each: with them a 2-CPU cluster cannot run the engine)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    draw = types.SimpleNamespace(median=args.median, sigma=args.sigma, cap=args.cap)
    rows = [{"ids": list(p.ids), "seed": p.sampling.seed + i, "budget": ForcedLengths.budget(draw, p.sampling.seed)}
            for p in fits for i in range(p.sampling.n)]
    settings = dict(batch_size=args.ray_data_batch, concurrency=args.replicas, max_concurrent_batches=8,
                    placement_group_config={"bundles": [{"CPU": 1}]},
                    chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    config = vLLMEngineProcessorConfig(
        model_source=model, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        engine_kwargs={"dtype": args.dtype, "max_model_len": args.cap + 64, "enable_chunked_prefill": False},
        **settings)
    proc = build_processor(config, preprocess=lambda r: {
        "tokenized_prompt": r["ids"], "sampling_params": {"n": 1, "temperature": 1.0, "top_p": 1.0, "seed": int(r["seed"]),
                                                          "max_tokens": int(r["budget"]), "ignore_eos": True}},
        postprocess=lambda r: {"tokens": r["num_generated_tokens"]})
    t0 = time.perf_counter()
    tokens = sum(int(r["tokens"]) for r in proc(ray.data.from_items(rows)).iter_rows())
    return {"tokens": tokens, "seconds": round(time.perf_counter() - t0, 1),
            "settings": {k: v for k, v in settings.items()}}


if __name__ == "__main__":
    main()
