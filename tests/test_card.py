"""The dataset card: `datasets.load_dataset(RUN, config)` loads a run through it, its token
statistics are the kept traces', and `factory publish` uploads the products and the card
(to a local stand-in for the hub; never the network)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from factory.run import card
from factory.run.report import summary


def rows(run: Path, files: list[str]) -> list[dict]:
    return [r for f in files for r in pq.read_table(run / f).to_pylist()]


def test_load_dataset_reads_the_run_through_its_card(full_run, tmp_path):
    import datasets

    run, manifest = full_run
    curriculum = rows(run, [s["file"] for s in manifest["curriculum"]])
    pairs = rows(run, manifest["pairs"])
    assert curriculum and pairs
    got = datasets.load_dataset(str(run), "curriculum", split="train", cache_dir=str(tmp_path))
    assert [r["trace_id"] for r in got] == [r["trace_id"] for r in curriculum]  # easy -> hard, file order kept
    assert got[0]["completion"] == curriculum[0]["completion"]
    got_pairs = datasets.load_dataset(str(run), "pairs", split="train", cache_dir=str(tmp_path))
    assert [(r["chosen_trace_id"], r["rejected_trace_id"]) for r in got_pairs] == \
        [(r["chosen_trace_id"], r["rejected_trace_id"]) for r in pairs]
    assert datasets.load_dataset(str(run), "difficulty", split="train", cache_dir=str(tmp_path)).num_rows == \
        pq.ParquetFile(run / "difficulty.parquet").metadata.num_rows


def test_a_run_remade_in_the_same_directory_loads_its_new_rows(full_run, tmp_path):
    """datasets caches a local folder by its card's header; the card's sizes make a re-made
    run a new cache entry instead of the previous run's rows."""
    import datasets
    import pyarrow as pa

    run = tmp_path / "work" / "full"
    shutil.copytree(full_run[0], run)
    manifest = json.loads((run / "manifest.json").read_text())
    cache = str(tmp_path / "cache")
    before = datasets.load_dataset(str(run), "curriculum", split="train", cache_dir=cache)
    first = manifest["curriculum"][0]
    kept = pq.read_table(run / first["file"]).to_pylist()[1:]  # the re-made run kept one trace fewer
    pq.write_table(pa.Table.from_pylist(kept, schema=pq.read_schema(run / first["file"])), run / first["file"])
    first["rows"] = len(kept)
    card.write_card(run, manifest)
    after = datasets.load_dataset(str(run), "curriculum", split="train", cache_dir=cache)
    assert after.num_rows == before.num_rows - 1
    assert [r["trace_id"] for r in after] == [r["trace_id"] for r in rows(run, [s["file"] for s in manifest["curriculum"]])]


def test_card_token_statistics_match_a_recomputation(full_run):
    run, manifest = full_run
    text = (run / "README.md").read_text()
    head = yaml.safe_load(text.split("---")[1])
    assert [c["config_name"] for c in head["configs"]] == ["curriculum", "pairs", "difficulty"]
    tokens = sorted(r["num_tokens"] for r in rows(run, [s["file"] for s in manifest["curriculum"]]))
    n = len(tokens)
    p50, p95 = tokens[math.ceil(0.5 * n) - 1], tokens[math.ceil(0.95 * n) - 1]
    assert f"| {n:,} | {round(sum(tokens) / n, 1)} | {p50} | {p95} | {max(tokens)} |" in text
    # the filters' drop counts and the verdicts are the manifest's
    for name, s in manifest["stages"].items():
        assert f"| {name} | {s['in']:,} | {s['out']:,} |" in text
    for verdict, count in manifest["stages"]["grade"]["verdicts"].items():
        assert f"{verdict} {count:,}" in text
    # token accounting: generated tokens are the traces' own counts; every sample carries its prompt
    ro = manifest["stages"]["rollout"]
    traces = rows(run, [str(p.relative_to(run)) for p in sorted((run / "stages" / "rollout").glob("shard-*.parquet"))])
    assert ro["generated_tokens"] == sum(t["num_tokens"] for t in traces)
    assert manifest["tokens"]["prompt"] == ro["prompt_tokens"] > len(traces)


def test_cost_estimate_from_the_recipe_price(full_run):
    _, manifest = full_run
    from factory.engines.base import PriceConfig
    from factory.run.products import token_totals

    t = token_totals(manifest["stages"], PriceConfig(prompt_per_million=1.0, completion_per_million=4.0))
    assert t["cost"] == pytest.approx(t["prompt"] / 1e6 + 4 * t["completion"] / 1e6, abs=1e-4)
    assert "estimated cost" in summary({**manifest, "tokens": t}) and "estimated cost" not in summary(manifest)


class LocalHub:
    """Stands in for huggingface_hub.HfApi: a repo is a folder; uploads apply the same
    allow_patterns filter the hub client applies."""

    endpoint = "local"

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        assert repo_type == "dataset"
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type, allow_patterns, commit_message):
        from huggingface_hub.utils import filter_repo_objects

        src = Path(folder_path)
        files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
        for f in filter_repo_objects(files, allow_patterns=allow_patterns):
            (self.root / repo_id / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f, self.root / repo_id / f)


def test_publish_uploads_products_and_card_only(full_run, tmp_path):
    import datasets

    run, manifest = full_run
    url = card.publish(run, "me/toy", api=LocalHub(tmp_path))
    repo = tmp_path / "me" / "toy"
    assert url == "local://me/toy"
    assert (repo / "README.md").exists() and (repo / "difficulty.parquet").exists()
    assert not (repo / "stages").exists() and not (repo / "rejected").exists() and not (repo / "logs").exists()
    assert datasets.load_dataset(str(repo), "curriculum", split="train").num_rows == \
        sum(s["rows"] for s in manifest["curriculum"])


def test_publish_to_an_unreachable_hub_says_so(full_run):
    from huggingface_hub import HfApi

    run, _ = full_run
    with pytest.raises(ConnectionError, match="127.0.0.1:9.*did not answer"):
        card.publish(run, "me/toy", api=HfApi(endpoint="http://127.0.0.1:9", token="x"))
    with pytest.raises(FileNotFoundError, match="publish a finished run"):
        card.publish(run / "stages", "me/toy")
    assert json.loads((run / "manifest.json").read_text())  # untouched
