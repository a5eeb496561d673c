"""Reasoning-trace distillation data factory: problems in, graded traces, curriculum shards
and DPO pairs out. See README.md; each stage is one module (ingest, rollout, grade, curate)."""

__version__ = "0.1.0"
