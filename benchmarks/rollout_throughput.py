"""Rollout stage throughput vs raw vllm.LLM.generate, in one run on one engine.

    python benchmarks/rollout_throughput.py [--model DIR] [--problems 400] [--rounds 3]

Both sides get the same prompts and the same per-request SamplingParams (n=8, seeds).
The stage's time is everything `rollout_table` does: chat templating, token counting,
generation, parsing the traces, building the table; plus writing its Parquet shard.
Prints tokens/s of each side per round, the stage's time outside generate, and the median
of the per-round ratios (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from factory import schema, store, tiny
from factory.engines import EngineConfig, Sampling
from factory.engines.inprocess import VLLMEngine
from factory.stages.rollout import RolloutConfig, request_seed, rollout_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: build the tiny addition teacher)")
    ap.add_argument("--problems", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(tiny.build_addition_teacher(tmp / "teacher"))
    engine = VLLMEngine(EngineConfig(model=model, max_model_len=256, cpu_kv_cache_space_gb=2))

    rows = [{"problem_id": f"p{i}", "question": p["question"], "answer": p["answer"], "domain": "numeric",
             "choices": None, "source": "bench", "split": "train"}
            for i, p in enumerate(tiny.addition_problems(args.problems, seed=1))]
    problems = schema.table(rows, schema.PROBLEMS)
    cfg = RolloutConfig(num_traces=8, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, question_template="{question}")
    prompts = [engine.apply_chat_template([{"role": "user", "content": r["question"]}]) for r in rows]
    sampling = [Sampling(n=8, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
                         seed=request_seed(cfg.seed, r["problem_id"])) for r in rows]

    def raw() -> float:
        params = [engine.sampling_params(s) for s in sampling]
        t0 = time.perf_counter()
        outs = engine.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return sum(len(c.token_ids) for o in outs for c in o.outputs) / seconds

    overheads, generate_only = [], []

    def stage() -> float:
        t0 = time.perf_counter()
        traces, rejected, stats = rollout_table(problems, cfg, engine)
        store.write_parquet(traces, tmp / "shard.parquet")
        seconds = time.perf_counter() - t0
        overheads.append(seconds - stats["generate_seconds"])
        generate_only.append(stats["generated_tokens"] / stats["generate_seconds"])
        return stats["generated_tokens"] / seconds

    raw(), stage()  # warm up both paths
    raws, stages = [], []
    for r in range(args.rounds):
        raws.append(raw())
        stages.append(stage())
        print(f"round {r + 1}: raw {raws[-1]:9.0f} tok/s   rollout stage {stages[-1]:9.0f} tok/s")
    # rounds alternate raw / stage, so a paired ratio per round cancels most machine drift
    ratio = statistics.median(s / r for s, r in zip(stages, raws))
    print(f"\n{args.problems} problems x 8 traces, max_tokens {args.max_tokens}, model {model}")
    print(f"median raw vllm.LLM.generate: {statistics.median(raws):.0f} tok/s")
    print(f"median rollout stage:         {statistics.median(stages):.0f} tok/s")
    print(f"rollout stage, generate only: {statistics.median(generate_only[1:]):.0f} tok/s")
    print(f"stage time outside generate:  {statistics.median(overheads[1:]):.3f} s per call (median)")
    print(f"ratio stage / raw:            {ratio:.3f}  (median of per-round ratios; target >= 0.95)")
    engine.close()


if __name__ == "__main__":
    main()
