"""The rollout stage over many shards vs one all-at-once LLM.generate, with heavy-tailed lengths.

    python benchmarks/rollout_continuous.py [--model DIR] [--problems 400] [--shard 25] [--rounds 3]

Real traces of a tiny model are short and nearly equal, which hides what a reasoning teacher
does to a batch: a few traces run to the budget while most stop early. So every request here
ignores EOS and gets its own budget, drawn lognormal (median `--median` tokens, sigma
`--sigma`, capped at `--cap`) from its seed; the three sides get the same requests:

- all at once: one `LLM.generate` over every request (the ceiling: vLLM schedules all);
- per shard:   one engine call per shard (`rollout_table`, what the pipeline did before);
- continuous:  the pipeline's rollout (`factory.run.continuous`) streaming every shard through
               one engine, writing shards and partial files as it goes.

Prints tokens/s of each per round and the median per-round ratios to all-at-once. The CPU and
the dtype are printed with the figures (vLLM's CPU build emulates bf16 on CPUs without it).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from factory import schema, store, tiny
from factory.run.continuous import rollout_shards
from factory.engines import EngineConfig
from factory.engines.inprocess import VLLMEngine
from factory.stages.rollout import RolloutConfig, request_seed, rollout_table


class ForcedLengths(VLLMEngine):
    """The engine with each request's length forced: EOS ignored, budget drawn from its seed."""

    def __init__(self, config: EngineConfig, median: float, sigma: float, cap: int):
        super().__init__(config)
        self.median, self.sigma, self.cap = median, sigma, cap

    def budget(self, seed: int) -> int:
        z = random.Random(seed).gauss(0, 1)
        return max(1, min(self.cap, int(self.median * math.exp(self.sigma * z))))

    def sampling_params(self, s):
        p = super().sampling_params(s)
        p.ignore_eos, p.max_tokens = True, self.budget(s.seed)
        return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build the tiny addition teacher)")
    ap.add_argument("--problems", type=int, default=400)
    ap.add_argument("--shard", type=int, default=25, help="problems per shard")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--median", type=float, default=60)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--cap", type=int, default=400)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(tiny.build_addition_teacher(tmp / "teacher"))
    engine = ForcedLengths(EngineConfig(model=model, max_model_len=args.cap + 64, cpu_kv_cache_space_gb=2,
                                        dtype=args.dtype), args.median, args.sigma, args.cap)
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
    prompts = [engine.tokenize([engine.apply_chat_template([{"role": "user", "content": r["question"]}])])[0] for r in rows]
    from factory.engines import Sampling

    sampling = [Sampling(n=8, temperature=1.0, top_p=1.0, max_tokens=args.cap, seed=request_seed(cfg.seed, r["problem_id"]))
                for r in rows]

    def all_at_once() -> float:
        params = [engine.sampling_params(s) for s in sampling]
        t0 = time.perf_counter()
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs) / (time.perf_counter() - t0)

    def per_shard() -> float:
        t0, tokens = time.perf_counter(), 0
        for i in range(n_shards):
            traces, _, stats = rollout_table(ingest.read_shard(i), cfg, engine)
            store.write_parquet(traces, tmp / "per-shard" / f"{i}.parquet")
            tokens += stats["generated_tokens"]
        return tokens / (time.perf_counter() - t0)

    def continuous() -> float:
        out = store.StageDir(tmp / "run", "rollout")
        shutil.rmtree(out.path, ignore_errors=True)
        t0 = time.perf_counter()
        rollout_shards(out, ingest, list(range(n_shards)), cfg, engine)
        seconds = time.perf_counter() - t0
        return sum(s["generated_tokens"] for s in out.shard_stats()) / seconds

    sides = {"all at once": all_at_once, "per shard": per_shard, "continuous": continuous}
    for f in sides.values():  # warm up every path
        f()
    got = {k: [] for k in sides}
    for r in range(args.rounds):
        for k, f in sides.items():
            got[k].append(f())
        print(f"round {r + 1}: " + "   ".join(f"{k} {v[-1]:8.0f} tok/s" for k, v in got.items()))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lengths = sorted(engine.budget(s.seed) for s in sampling)
    print(f"\n{cpu}; engine dtype {engine.dtype} ({engine.dtype_reason})")
    print(f"{args.problems} problems x 8 in {n_shards} shards of {args.shard}; forced lengths median "
          f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]} tokens")
    for k in ("per shard", "continuous"):
        ratio = statistics.median(a / b for a, b in zip(got[k], got["all at once"]))
        print(f"{k:>12} / all at once: {ratio:.3f}  (median of per-round ratios)")
    engine.close()


if __name__ == "__main__":
    main()
