"""Training a classification-head PRM on step labels (TRL and OpenRLHF dropped their PRM
trainers, so this is ours, on transformers' Trainer).

In:  labels.parquet (prm.label, or gold labels in the same schema), rows with split=train.
Out: TRAIN.output_dir: a token-classification model (2 labels) and its tokenizer, in the
     Qwen2.5-Math-PRM format that `prm.scorer` reads (family=classification), and
     prm_train.json (config, label counts, loss history).

The input of a trace is exactly what the scorer will render: the chat (system, question,
steps joined by the separator). The label of step i sits on its separator token; every other
token has label -100, so the loss is only at separator positions. The base is a causal LM
(e.g. the student or the teacher); its transformer is reused and a 2-label head is added.
The separator is added to the tokenizer when it is not already one token.

With prm.family=likelihood the base is read, not fine-tuned: the features of `prm.likelihood`
are measured on every labelled step and a logistic head is fitted on them (learning_rate,
epochs and batch_size are then unused; weight_decay is the head's L2 penalty). The output is
the base LM, its tokenizer and likelihood_prm.json.

    factory prm train recipes/toy_addition_prm.yaml
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from factory import store
from prm import likelihood
from prm.scorer import PRMConfig, PRMScorer


@dataclass
class PRMTrainConfig:
    labels: str = ""
    """labels.parquet to train on (its split=train rows)."""
    base_model: str = ""
    """Model to start from: a causal LM directory (a 2-label head is added) or a token-classification PRM."""
    output_dir: str = "runs/prm"
    label: str = "hard"
    """hard: step is right if any continuation reached the answer | soft: right if at least `soft_threshold` did."""
    soft_threshold: float = 0.5
    learning_rate: float = 1e-4
    epochs: int = 3
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_steps: float = 0.05
    seed: int = 0
    max_length: int | None = None
    """Longer inputs are left out (counted in prm_train.json); None: the model's context."""
    extra: dict = field(default_factory=dict)
    """Other transformers TrainingArguments fields."""
    rendering: likelihood.Rendering = field(default_factory=likelihood.Rendering)
    """family=likelihood: how the LM reads a trace; the policy's format (its rollout's system
    prompt and question_template), since the features are the LM's surprise at the policy's steps."""


def step_labels(row: dict, cfg: PRMTrainConfig) -> list[int]:
    if cfg.label == "hard":
        return list(row["step_hard"])
    if cfg.label == "soft":
        return [int(s >= cfg.soft_threshold) for s in row["step_soft"]]
    raise ValueError(f"train.label={cfg.label!r}; use hard or soft")


def examples(rows: list[dict], scorer: PRMScorer, cfg: PRMTrainConfig, max_length: int) -> tuple[list[dict], dict]:
    """Token ids and labels (-100 except at separators) per trace; counts of what was left out."""
    out, skipped = [], {"too_long": 0, "separator_mismatch": 0}
    for r in rows:
        ids = scorer.encode(r["question"], r["steps"])
        at = [i for i, t in enumerate(ids) if t == scorer.tag_id]
        if len(ids) > max_length:
            skipped["too_long"] += 1
            continue
        if len(at) != len(r["steps"]):
            skipped["separator_mismatch"] += 1
            continue
        labels = [-100] * len(ids)
        for pos, lab in zip(at, step_labels(r, cfg)):
            labels[pos] = lab
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out, skipped


def load_base(base: str, separator: str):
    """Tokenizer (with the separator as one token) and a 2-label token-classification model."""
    from tokenizers import AddedToken
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if len(tok.encode(separator, add_special_tokens=False)) != 1:
        tok.add_tokens([AddedToken(separator, special=False, normalized=False)])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=2)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    return tok, model


def train_prm(cfg: PRMTrainConfig, prm: PRMConfig, log=print) -> dict:
    """Fine-tune `cfg.base_model` into a PRM; returns the report written next to it."""
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    t0 = time.perf_counter()
    if prm.family not in ("classification", "likelihood"):
        raise ValueError(f"prm.train makes classification-head or likelihood PRMs, not family={prm.family!r}")
    rows = [r for r in pq.read_table(cfg.labels).to_pylist() if r["split"] == "train" and r["status"] == "ok"]
    if not rows:
        raise ValueError(f"{cfg.labels}: no labelled rows with split=train and status=ok")
    if prm.family == "likelihood":
        return train_likelihood_prm(cfg, prm, rows, t0, log)
    tok, model = load_base(cfg.base_model, prm.step_separator)
    scorer = PRMScorer(prm, model=model, tokenizer=tok)
    max_length = cfg.max_length or scorer.max_length
    data, skipped = examples(rows, scorer, cfg, max_length)
    counts = [0, 0]
    for ex in data:
        for lab in ex["labels"]:
            if lab != -100:
                counts[lab] += 1
    log(f"prm train: {len(data)} traces, {sum(counts)} labelled steps ({counts[1]} right, {counts[0]} wrong); "
        f"left out {skipped}")
    torch.manual_seed(cfg.seed)
    args = TrainingArguments(
        output_dir=cfg.output_dir, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        seed=cfg.seed, logging_steps=10, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        **cfg.extra)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForTokenClassification(tok, label_pad_token_id=-100))
    result = trainer.train()
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    report = {"config": asdict(cfg), "prm": asdict(prm), "traces": len(data), "skipped": skipped,
              "step_labels": {"right": counts[1], "wrong": counts[0]}, "metrics": result.metrics,
              "log_history": trainer.state.log_history, "seconds": round(time.perf_counter() - t0, 1)}
    store.write_json(report, out / "prm_train.json")
    log(f"prm train: saved {out} (loss {result.metrics['train_loss']:.4f})")
    return report


def train_likelihood_prm(cfg: PRMTrainConfig, prm: PRMConfig, rows: list[dict], t0: float, log=print) -> dict:
    """Measure the base LM's surprise at each labelled step and fit the head (prm.likelihood)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = prm.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=prm.dtype).to(device).eval()
    max_length = cfg.max_length or model.config.max_position_embeddings
    measured = likelihood.trace_features(model, tok, cfg.rendering, [(r["question"], r["steps"]) for r in rows],
                                         prm.batch_size, max_length, device)
    feats, labels, too_long = [], [], 0
    for r, (f, _) in zip(rows, measured):
        if f is None:
            too_long += 1
            continue
        feats.append(f)
        labels += step_labels(r, cfg)
    if not feats:
        raise ValueError(f"{cfg.labels}: every labelled trace is longer than max_length={max_length}")
    y = torch.tensor(labels, dtype=torch.float32)
    head, loss = likelihood.fit_head(torch.cat(feats), y, cfg.rendering, cfg.weight_decay)
    out = Path(cfg.output_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    head.save(out)
    counts = {"right": int(y.sum()), "wrong": int(len(y) - y.sum())}
    report = {"config": asdict(cfg), "prm": asdict(prm),
              "traces": len(feats), "skipped": {"too_long": too_long}, "step_labels": counts,
              "metrics": {"train_loss": loss}, "head": dict(zip(likelihood.FEATURES, head.weights)),
              "seconds": round(time.perf_counter() - t0, 1)}
    store.write_json(report, out / "prm_train.json")
    log(f"prm train: likelihood head on {len(feats)} traces, {len(y)} labelled steps ({counts}); "
        f"left out {too_long} too long; saved {out} (loss {loss:.4f})")
    return report


def read_labels(path: str, split: str | None) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return [r for r in rows if r["status"] == "ok" and (split is None or r["split"] == split)]
