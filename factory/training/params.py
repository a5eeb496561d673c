"""Which of a model's parameters a trainer moves: `model.train_only` (SFT, DPO and GRPO).

Regular expressions over parameter names select what trains; everything else is frozen before
the trainer builds its optimizer (transformers' Trainer optimizes only parameters that require
grad). What trained goes into the report.
"""

from __future__ import annotations

import re


def check_train_only(cfg) -> None:
    """Reject a `cfg.train_only` (a ModelConfig's) that cannot work, before any weight is loaded."""
    if cfg.train_only and cfg.lora.enabled:
        raise ValueError("model.train_only and model.lora.enabled exclude each other: LoRA trains its adapters only")
    for pat in cfg.train_only:
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"model.train_only: {pat!r} is not a regular expression ({e})") from None


def restrict_training(model, cfg) -> dict:
    """Freeze every parameter whose name matches none of `cfg.train_only` (no-op when it is empty);
    returns the counts for the report. A pattern list that matches nothing is an error."""
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    if not cfg.train_only:
        return {"patterns": [], "trainable": total, "total": total}
    check_train_only(cfg)
    keep = [n for n, _ in params if any(re.search(pat, n) for pat in cfg.train_only)]
    if not keep:
        raise ValueError(f"model.train_only={cfg.train_only} matches no parameter of {cfg.path}; its names are like "
                         + ", ".join(n for n, _ in params[:4]))
    kept = set(keep)
    for n, p in params:
        p.requires_grad_(n in kept)
    return {"patterns": list(cfg.train_only), "trainable": sum(p.numel() for n, p in params if n in kept),
            "total": total, "parameters": keep}
