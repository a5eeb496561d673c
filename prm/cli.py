"""`factory prm score | label | train | eval | calibrate RECIPE [section.key=value ...]`.

One recipe (PRMRecipe) holds the whole PRM loop; each command reads the sections it needs:

    label      engine, rollout, grade, split, label    -> label.output/labels.parquet
    train      prm, train                              -> train.output_dir (a PRM)
    eval       prm, split, eval                        -> ProcessBench F1 on held-out labels
    calibrate  prm, calibrate                          -> the filter threshold for `score`
    score      prm, split, score                       -> a run's graded traces with PRM columns
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from factory import config as config_mod
from factory import schema, store
from factory.engines import EngineConfig
from factory.stages.grade import GradeConfig
from factory.run.recipe import RunConfig
from factory.stages.rollout import RolloutConfig
from prm.evaluate import CalibrateConfig, PRMEvalConfig, calibrate, evaluate_prm
from prm.label import LabelConfig, label_traces
from prm.score import ScoreConfig, score_table
from prm.scorer import PRMConfig, PRMScorer
from prm.steps import SplitConfig
from prm.train import PRMTrainConfig, read_labels, train_prm


@dataclass
class ScoreFileConfig:
    run_dir: str = ""
    """A `factory run` whose graded traces are scored."""
    output: str = "runs/scored.parquet"


@dataclass
class PRMRecipe:
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grade: GradeConfig = field(default_factory=GradeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    train: PRMTrainConfig = field(default_factory=PRMTrainConfig)
    eval: PRMEvalConfig = field(default_factory=PRMEvalConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    score: ScoreFileConfig = field(default_factory=ScoreFileConfig)


def load_recipe(path, overrides=()) -> PRMRecipe:
    return config_mod.load(PRMRecipe, path, overrides)


def labels_path(r: PRMRecipe) -> str:
    return str(Path(r.label.output) / "labels.parquet")


def _add(total: dict, part: dict) -> dict:
    """Stats of one shard added into the run's (numbers summed, dicts of numbers key by key)."""
    for k, v in part.items():
        total[k] = _add(total.get(k, {}), v) if isinstance(v, dict) else total.get(k, 0) + v
    return total


def score_file(graded: store.StageDir, cfg: ScoreConfig, scorer: PRMScorer, output: Path) -> tuple[int, dict]:
    """A run's graded traces with the PRM columns, into one Parquet file: scored and written a
    grade shard at a time (memory: one shard, whatever the run's size), into a temp file that
    replaces `output` once whole. Returns (rows, the shards' stats summed)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    rows, stats, writer = 0, {}, None
    try:
        for _, shard in graded.iter_shards():
            table, s = score_table(shard, cfg, scorer)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))  # the grade shards share one schema (schema.extend)
            rows += table.num_rows
            _add(stats, s)
        if writer is None:  # no shards: an empty file with the PRM's columns
            pq.write_table(pa.schema(schema.SCORE_COLUMNS).empty_table(), tmp)
        else:
            writer.close()
            writer = None
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows, stats


def run_command(cmd: str, r: PRMRecipe, engine=None, log=print) -> dict:
    """Run one `factory prm` command; returns its report (also written as JSON)."""
    if cmd == "label":
        graded = store.StageDir(Path(r.label.run_dir), "grade")
        if not graded.complete:
            raise FileNotFoundError(f"{r.label.run_dir}: no finished grade stage; run `factory run` first")
        if engine is None:
            from factory.engines.inprocess import VLLMEngine

            engine = VLLMEngine(r.engine)
        labels = label_traces(graded.read(), r.label, r.split, r.rollout, r.grade, engine, r.run.progress)
        store.write_parquet(labels, Path(labels_path(r)))
        rows = labels.to_pylist()
        ok = [x for x in rows if x["status"] == "ok"]
        report = {"traces": len(rows), "status": {s: sum(x["status"] == s for x in rows) for s in {x["status"] for x in rows}},
                  "steps": sum(len(x["steps"]) for x in ok), "erroneous": sum(x["first_error"] != -1 for x in ok),
                  "test": sum(x["split"] == "test" for x in ok)}
        store.write_json(report, Path(r.label.output) / "label_report.json")
        log(f"prm label: {json.dumps(report)} -> {labels_path(r)}")
        if report["status"].get("request_failed"):
            log(f"prm label: {report['status']['request_failed']} traces not labelled: a continuation request failed "
                "for good at the server; run the same command again to send only those")
        return report
    if cmd == "train":
        cfg = r.train if r.train.labels else PRMTrainConfig(**{**r.train.__dict__, "labels": labels_path(r)})
        return train_prm(cfg, r.prm, log)
    scorer = PRMScorer(r.prm)
    if cmd == "eval":
        path = r.eval.labels or labels_path(r)
        report = evaluate_prm(read_labels(path, r.eval.split), scorer, r.eval)
        report.update(prm=r.prm.model, labels=path, split=r.eval.split)
        store.write_json(report, Path(r.eval.output or Path(path).with_name(f"prm_eval_{Path(r.prm.model).name}.json")))
        log(f"prm eval ({r.prm.model} on {report['scored']} {r.eval.split or 'all'} traces): ProcessBench F1 "
            f"{report['f1']:.3f} (accuracy {report['acc_erroneous']:.3f} on {report['erroneous']} erroneous, "
            f"{report['acc_correct']:.3f} on {report['correct']} correct)")
        return report
    if cmd == "calibrate":
        path = r.eval.labels or labels_path(r)
        report = calibrate(read_labels(path, r.calibrate.split), scorer, r.calibrate)
        log(f"prm calibrate: score.threshold={report['threshold']:.4f} on {report['aggregate']} "
            f"(F1 {report['f1']:.3f}, precision {report['precision']:.3f}, recall {report['recall']:.3f}, "
            f"keeps {report['kept']} of {report['traces']})")
        return report
    if cmd == "score":
        graded = store.StageDir(Path(r.score.run_dir), "grade")
        if not graded.complete:
            raise FileNotFoundError(f"{r.score.run_dir}: no finished grade stage; run `factory run` first")
        rows, stats = score_file(graded, ScoreConfig(prm=r.prm, split=r.split), scorer, Path(r.score.output))
        log(f"prm score: {rows} traces {stats['prm_status']} -> {r.score.output}")
        return stats
    raise ValueError(f"unknown prm command {cmd!r}")
