"""Rollout on Ray's engine replicas vs each replica's all-at-once LLM.generate, heavy-tailed lengths.

    python benchmarks/rollout_ray.py [--model DIR] [--replicas 2] [--problems 200] [--shard 10] [--rounds 2]

The requests are `rollout_continuous.py`'s: every request ignores EOS and gets its own budget,
drawn lognormal (median `--median`, sigma `--sigma`, capped at `--cap`) from its seed. Each of
`--replicas` Ray actors (one CPU each) holds one in-process vLLM engine (float32 by default)
with those forced lengths, and per round:

- all at once: every replica runs one `LLM.generate` over its share of the requests (the
  problems dealt round-robin), all replicas at the same time: the ceiling per replica;
- fleet:       the pipeline's continuous rollout (`factory.run.continuous`, shards of `--shard`
               problems, partial files and all) through an `EngineFleet` of the same actors,
               each replica streaming what it takes from its inbox.

Prints each replica's tokens/s on both sides (fleet: its tokens over the time from the first
request it took to the last it finished) and their ratio, then a JSON line.
"""

from __future__ import annotations

import argparse
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


def generate_share(requests: list[tuple[list[int], Sampling]], engine) -> dict:
    """In a replica: one LLM.generate over its share (the engine's forced lengths applied)."""
    params = [engine.sampling_params(s) for _, s in requests]
    t0 = time.perf_counter()
    outs = engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(c.token_ids) for o in outs for c in o.outputs), "seconds": seconds}


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
    args = ap.parse_args()
    import ray
    import ray.cloudpickle

    tmp = Path(tempfile.mkdtemp(prefix="rollout-ray-"))
    model = args.model or str(tiny.build_addition_teacher(tmp / "teacher"))
    config = EngineConfig(model=model, max_model_len=args.cap + 64, cpu_kv_cache_space_gb=1, dtype=args.dtype)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(rollout_continuous)  # the actors cannot import benchmarks/
    t0 = time.perf_counter()
    fleet = EngineFleet(functools.partial(ForcedLengths, config, args.median, args.sigma, args.cap), HFTokenizer(model),
                        args.replicas, {"num_cpus": 1})
    start = time.perf_counter() - t0
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

    def streamed() -> list[float]:
        fleet.stats(reset=True)
        out = store.StageDir(tmp / "run", "rollout")
        shutil.rmtree(out.path, ignore_errors=True)
        rollout_shards(out, ingest, list(range(n_shards)), cfg, fleet)
        # per replica: its tokens over the span from the first request it took to its last answer
        return [s["tokens"] / (s["last_done"] - s["first_taken"]) for s in fleet.stats()]

    all_at_once()  # warm up both paths
    streamed()
    base, fleet_rates = [], []
    for k in range(args.rounds):
        base.append(all_at_once())
        fleet_rates.append(streamed())
        print(f"round {k + 1}: " + "   ".join(f"replica {j}: all at once {base[-1][j]:7.0f} tok/s, fleet {fleet_rates[-1][j]:7.0f} "
                                              f"({fleet_rates[-1][j] / base[-1][j]:.3f}x)" for j in range(args.replicas)),
              flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    draw = types.SimpleNamespace(median=args.median, sigma=args.sigma, cap=args.cap)  # the engines' draw
    lengths = sorted(ForcedLengths.budget(draw, p.sampling.seed) for p in fits)
    ratios = [statistics.median(f[j] / b[j] for f, b in zip(fleet_rates, base)) for j in range(args.replicas)]
    print(f"\n{cpu}; {args.replicas} replicas x 1 CPU, dtype {args.dtype}, engine start {start:.0f} s")
    print(f"{args.problems} problems x 8 in {n_shards} shards of {args.shard}; forced lengths median "
          f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]} tokens")
    for j, r in enumerate(ratios):
        print(f"replica {j}: fleet / all at once over its share = {r:.3f} (median of per-round ratios)")
    print(json.dumps({"cpu": cpu, "replicas": args.replicas, "problems": args.problems, "shard": args.shard,
                      "dtype": args.dtype, "all_at_once_tok_s": base, "fleet_tok_s": fleet_rates,
                      "ratio_per_replica": [round(r, 3) for r in ratios], "engine_start_s": round(start, 1)}))
    fleet.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
