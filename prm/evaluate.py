"""Measuring a PRM on step-labelled traces, and picking a filter threshold.

In:  labels.parquet (Monte-Carlo or gold step labels; schema prm.label.LABELS) and a PRM.
Out: a JSON report and a printed summary.

ProcessBench form: each trace's label is the index of its first wrong step, or -1 when every
step is right. The PRM's prediction is the first step whose score is under `step_threshold`
(or -1). Accuracy is measured separately on erroneous traces (prediction == label) and on
correct ones (prediction == -1); the score is their harmonic mean (F1), so a PRM that calls
everything correct, or everything wrong, scores 0.

`calibrate` chooses the threshold for the score stage's filter: on labelled traces, a trace is
good when it has no wrong step; for the chosen aggregate it scans the observed scores and keeps
the threshold with the best F1 at telling good traces from bad.

    factory prm eval recipes/toy_addition_prm.yaml
    factory prm calibrate recipes/toy_addition_prm.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

from prm.scorer import OK, PRMScorer, aggregates


@dataclass
class PRMEvalConfig:
    labels: str = ""
    """labels.parquet to evaluate on."""
    split: str | None = "test"
    """Which rows (the held-out ones by default); None: all."""
    step_threshold: float = 0.5
    """A step scoring under this is predicted wrong."""
    output: str | None = None
    """Where to write the JSON report (default: next to the labels)."""


@dataclass
class CalibrateConfig:
    aggregate: str = "prm_mean"
    """The aggregate to threshold (the score stage's filter_aggregate)."""
    split: str | None = "train"
    """Labelled rows to calibrate on; None: all."""


def predicted_first_error(scores: list[float], threshold: float) -> int:
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def processbench(labels: list[int], predictions: list[int]) -> dict:
    """Accuracy on erroneous and on correct traces, and their harmonic mean (F1)."""
    err = [(lab, p) for lab, p in zip(labels, predictions) if lab != -1]
    cor = [(lab, p) for lab, p in zip(labels, predictions) if lab == -1]
    acc_err = sum(lab == p for lab, p in err) / len(err) if err else 0.0
    acc_cor = sum(p == -1 for _, p in cor) / len(cor) if cor else 0.0
    f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor else 0.0
    return {"f1": f1, "acc_erroneous": acc_err, "acc_correct": acc_cor, "erroneous": len(err), "correct": len(cor)}


def score_rows(rows: list[dict], scorer: PRMScorer) -> tuple[list[dict], list[list[float]]]:
    """The rows the PRM could score, and their step scores."""
    results = scorer.score([(r["question"], r["steps"]) for r in rows])
    kept = [(r, res.scores) for r, res in zip(rows, results) if res.status == OK]
    return [r for r, _ in kept], [s for _, s in kept]


def evaluate_prm(rows: list[dict], scorer: PRMScorer, cfg: PRMEvalConfig) -> dict:
    scored, scores = score_rows(rows, scorer)
    if not scored:
        raise ValueError("no labelled traces could be scored (check the split and the PRM's context)")
    labels = [r["first_error"] for r in scored]
    preds = [predicted_first_error(s, cfg.step_threshold) for s in scores]
    out = processbench(labels, preds)
    out.update(traces=len(rows), scored=len(scored), step_threshold=cfg.step_threshold)
    flat = [(s, h) for sc, r in zip(scores, scored) for s, h, p in zip(sc, r["step_hard"], r["propagated"]) if not p]
    if flat:  # step-level view over the steps that were really labelled (not propagated)
        right = [s for s, h in flat if h == 1]
        wrong = [s for s, h in flat if h == 0]
        out["step_mean_score"] = {"right": sum(right) / len(right) if right else None,
                                  "wrong": sum(wrong) / len(wrong) if wrong else None}
    return out


def calibrate(rows: list[dict], scorer: PRMScorer, cfg: CalibrateConfig) -> dict:
    scored, scores = score_rows(rows, scorer)
    values = [aggregates(s)[cfg.aggregate] for s in scores]
    good = [r["first_error"] == -1 for r in scored]
    if not any(good) or all(good):
        raise ValueError(f"calibration needs both good and bad traces; got {sum(good)} good of {len(good)}")
    best = None
    for th in sorted(set(values)):
        keep = [v >= th for v in values]
        tp = sum(k and g for k, g in zip(keep, good))
        precision = tp / max(1, sum(keep))
        recall = tp / sum(good)
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        if best is None or f1 > best["f1"]:
            best = {"threshold": th, "f1": f1, "precision": precision, "recall": recall, "kept": sum(keep)}
    return {"aggregate": cfg.aggregate, "traces": len(scored), "good": sum(good), **best}
