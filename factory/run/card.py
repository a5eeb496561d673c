"""The run's dataset card (`RUN/README.md`) and `factory publish RUN REPO_ID`.

The card is a Hugging Face dataset card: its YAML header names the products as configs, so

    datasets.load_dataset("RUN", "curriculum")   # or "pairs", "difficulty"

loads a run directory (or the hub repo it was published to) without further arguments. The
body says how the data was made: teacher and sampling, graders, every filter with its drop
count, the pass-rate histogram, the kept traces' token statistics and the teacher's token
bill. Everything comes from the manifest and the products; memory is one int per kept trace
(their token counts, read as one column).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from factory.run.report import histogram

NETWORK_MODULES = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub"}
PRODUCT_FILES = ["README.md", "manifest.json", "difficulty.parquet", "curriculum/*.parquet", "pairs/*.parquet"]


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..1) of an ascending list: an observed value."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def token_stats(run_dir: Path, files: list[str]) -> dict:
    """mean / p50 / p95 / max completion tokens of the rows in `files` (their num_tokens column)."""
    values = sorted(v for f in files for v in pq.read_table(run_dir / f, columns=["num_tokens"])
                    .column("num_tokens").to_pylist())
    if not values:
        return {"traces": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {"traces": len(values), "mean": round(sum(values) / len(values), 1), "p50": percentile(values, 0.5),
            "p95": percentile(values, 0.95), "max": values[-1]}


def split_info(run_dir: Path, name: str, files: list[str]) -> dict:
    """A config's `dataset_info` entry: its row count and bytes, read from the Parquet footers.

    This is more than decoration: `datasets` keys its local cache on the card's header, not on
    the files, so without it a run re-made in the same directory would load the previous run's
    rows from ~/.cache/huggingface. The sizes change whenever the products do."""
    metas = [pq.ParquetFile(run_dir / f).metadata for f in files]
    num_bytes = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
    return {"config_name": name, "splits": [{"name": "train", "num_bytes": num_bytes,
                                             "num_examples": sum(m.num_rows for m in metas)}],
            "download_size": sum((run_dir / f).stat().st_size for f in files), "dataset_size": num_bytes}


def header(run_dir: Path, manifest: dict) -> dict:
    """The card's YAML metadata: one config per product that has rows, with its sizes."""
    rows = sum(s["rows"] for s in manifest["curriculum"])
    products = {"curriculum": ("curriculum/*.parquet", [s["file"] for s in manifest["curriculum"]])}
    if manifest["pairs"]:
        products["pairs"] = ("pairs/*.parquet", manifest["pairs"])
    products["difficulty"] = ("difficulty.parquet", ["difficulty.parquet"])
    configs = [{"config_name": name, **({"default": True} if name == "curriculum" else {}),
                "data_files": [{"split": "train", "path": pattern}]} for name, (pattern, _) in products.items()]
    infos = [split_info(run_dir, name, files) for name, (_, files) in products.items()]
    size = next(name for limit, name in [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"),
                                         (float("inf"), "n>1M")] if rows < limit)
    return {"configs": configs, "dataset_info": infos, "task_categories": ["text-generation"], "language": ["en"],
            "tags": ["reasoning", "distillation", "synthetic", "curriculum", "dpo"], "size_categories": [size]}


def topup_lines(cfg: dict | None, stage: dict | None, rollout: dict) -> list[str]:
    """The top-up's sampling and what it cost, beside the rollout's (nothing without a top-up)."""
    if not cfg or not stage:
        return []
    c, tokens = stage.get("topup", {}), stage.get("generated_tokens", 0)
    share = f" (+{100 * tokens / rollout['generated_tokens']:.1f}% over the rollout)" if rollout.get("generated_tokens") else ""
    return [f"- top-up (difficulty-aware sampling): problems with a first-K pass rate in ({cfg['min_pass_rate']}, "
            f"{cfg['max_pass_rate']}] sampled again in waves of {cfg['wave_size']} until {cfg['target_correct']} correct "
            f"traces or {cfg['max_samples']} samples; pass rates stay those of the first K",
            f"- top-up: {c.get('sampled', 0):,} of {c.get('in_band', 0):,} problems in the band sampled again, "
            f"{c.get('traces', 0):,} more traces ({c.get('correct', 0):,} correct), {c.get('reached_target', 0):,} "
            f"reached the target; generated {tokens:,} tokens{share}"]


def card(run_dir: Path, manifest: dict) -> str:
    cfg = manifest["config"]
    engine, rollout, grade, curate = cfg["engine"], cfg["rollout"], cfg["grade"], cfg["curate"]
    stages = manifest["stages"]
    stats = token_stats(run_dir, [s["file"] for s in manifest["curriculum"]])
    curriculum_rows = sum(s["rows"] for s in manifest["curriculum"])
    pair_rows = sum(pq.ParquetFile(run_dir / f).metadata.num_rows for f in manifest["pairs"])
    ro = stages.get("rollout", {})
    lines = [
        "---", yaml.safe_dump(header(run_dir, manifest), sort_keys=False).rstrip(), "---", "",
        f"# {run_dir.resolve().name}", "",
        "Reasoning traces sampled from a teacher model, graded against reference answers, ordered easy to hard "
        "by the teacher's pass rate, with correct/incorrect pairs of the same problem for DPO.", "",
        "| config | rows | what |", "|---|---|---|",
        f"| `curriculum` | {curriculum_rows:,} | SFT rows (`prompt`, `completion` as chat messages), easiest first "
        "(`difficulty` = 1 - pass rate) |",
        f"| `pairs` | {pair_rows:,} | DPO rows (`prompt`, `chosen`, `rejected`) |",
        f"| `difficulty` | {_problems(run_dir):,} | one row per problem: "
        "pass rate over its traces |", "",
        "```python", "from datasets import load_dataset",
        'sft = load_dataset("<this repo or directory>", "curriculum", split="train")', "```", "",
        "## Teacher and sampling", "",
        f"- teacher: `{engine['model']}` ({engine['backend']} backend"
        + (f", dtype {manifest['engine']['dtype']}" if "engine" in manifest else "") + ")",
        f"- {rollout['num_traces']} traces per problem, temperature {rollout['temperature']}, top_p {rollout['top_p']}, "
        f"max_tokens {rollout['max_tokens']}, prompt format `{rollout['prompt_format']}`, seed {rollout['seed']}",
        f"- generated {ro.get('generated_tokens', 0):,} tokens"
        + (f" at {ro['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in ro else ""),
        *topup_lines(cfg.get("topup"), stages.get("topup"), ro), "",
        "## Grading", "",
        "- final answer: the last `\\boxed{}`, else `<answer>...</answer>`, else \"the answer is ...\""
        + "".join(f", else `{p}`" for p in grade["answer_patterns"])
        + "; math compared with math-verify, numbers within a tolerance, choices and text after normalization",
        f"- curate requires the `<think>...</think>` format: {curate['require_format']}; "
        f"drops truncated traces: {curate['drop_truncated']}; pass-rate window "
        f"[{curate['min_pass_rate']}, {curate['max_pass_rate']}]",
        "- verdicts: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stages.get("grade", {}).get("verdicts", {}).items())),
        "", "## Filters", "",
        "| stage | in | out | dropped |", "|---|---|---|---|"]
    for name, s in stages.items():
        dropped = ", ".join(f"{k}: {v:,}" for k, v in sorted(s["dropped"].items())) or "-"
        lines.append(f"| {name} | {s['in']:,} | {s['out']:,} | {dropped} |")
    failed = manifest.get("failed_requests") or {}
    if failed.get("total"):
        lines += ["", f"**Incomplete: {failed['total']:,} requests failed for good** ("
                  + ", ".join(f"{k}: {v:,}" for k, v in sorted(failed["by_stage"].items())) + "; causes: "
                  + (", ".join(f"{k}: {v:,}" for k, v in sorted(failed["by_cause"].items())) or "-")
                  + "). Their samples are missing; `difficulty` rows carry `num_failed`. Re-running the "
                  "recipe sends only those requests again."]
    lines += ["", f"Curate keeps at most {curate['max_traces_per_problem']} correct traces per problem "
              f"(`selection: {curate['selection']}`), {curate['pairs_per_problem']} pair(s) per problem "
              f"(`pairing: {curate['pairing']}`). Every dropped row is in `rejected/<stage>/` with its reason.", "",
              "## Difficulty", "", "```", histogram(run_dir), "```", "",
              "## Kept traces (curriculum): completion tokens", "",
              "| traces | mean | p50 | p95 | max |", "|---|---|---|---|---|",
              f"| {stats['traces']:,} | {stats['mean']} | {stats['p50']} | {stats['p95']} | {stats['max']} |", ""]
    t = manifest.get("tokens", {})
    if t:
        lines += ["## Teacher tokens", "", f"- prompt: {t['prompt']:,}", f"- generated: {t['completion']:,}"]
        if "topup" in t:
            lines.append(f"- of which the top-up: {t['topup']['prompt']:,} prompt, {t['topup']['completion']:,} generated")
        if "cost" in t:
            lines.append(f"- estimated cost: {t['cost']:,.2f} {t['currency']} "
                         f"({engine['price']['prompt_per_million']} / {engine['price']['completion_per_million']} "
                         "per million prompt / generated tokens)")
        lines.append("")
    lines += ["## Provenance", "", f"Made by the reasoning-trace factory in {manifest['seconds']:,.0f} s with "
              + ", ".join(f"{k} {v}" for k, v in sorted(manifest["packages"].items()))
              + ". The full recipe, resolved:", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(line for line in lines if line is not None)


def _problems(run_dir: Path) -> int:
    return pq.ParquetFile(run_dir / "difficulty.parquet").metadata.num_rows


def write_card(run_dir: Path, manifest: dict) -> Path:
    path = run_dir / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(card(run_dir, manifest))
    tmp.replace(path)
    return path


def publish(run_dir: Path, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Upload a finished run's card and products (not its intermediate stages) to a hub dataset
    repo; returns the repo's URL. `api` is a huggingface_hub.HfApi (its endpoint follows
    HF_ENDPOINT); an unreachable hub is a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{run_dir}/manifest.json: not found; publish a finished run")
    if not (run_dir / "README.md").exists():
        write_card(run_dir, json.loads((run_dir / "manifest.json").read_text()))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, repo_type="dataset",
                          allow_patterns=PRODUCT_FILES, commit_message="factory publish")
    except Exception as e:  # noqa: BLE001 - the network layer's errors, named for the user
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in NETWORK_MODULES:
            raise
        raise ConnectionError(f"publish {run_dir} to {repo_id}: the hub at {getattr(api, 'endpoint', '?')} "
                              f"did not answer ({type(e).__name__}: {str(e)[:300]})") from None
    return str(url)
