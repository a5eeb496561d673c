"""`executor: ray`: the map stages' shards on a Ray cluster, through Ray Data.

    factory run RECIPE executor=ray [ray.address=auto]

Nothing else changes: the driver runs the global stages (ingest, dedup, decontam, curate) as
it does locally, and for each map stage (rewrite, rollout, grade, score) hands the shards not
yet done to a Ray Data `map_batches` over actors. Each actor builds the same `Runner` as the
local executor, with its own engine, and calls `Runner.process_shard` on one shard at a time:
the output is the same numbered shard with the same done marker, so a run can be resumed by
either executor and the products are the ones the local executor writes.

- rollout / rewrite: `engine_replicas` actors, each holding one vLLM engine on
  `engine.tensor_parallel_size` GPUs (when the cluster has GPUs). The engine keeps vLLM's
  `n=K` requests: Ray Data's own LLM processor would make K rows of one sample each.
- grade: `cpu_actors` CPU actors, each with its pool of grading processes. The pool is what
  makes this work in an actor: math-verify's signal-based timeout raises outside a main
  thread, so grading runs in the pool's processes (their main thread) with math-verify's own
  timeouts off, and the pool enforces the limit by killing a worker.
- score: `engine_replicas` actors, on a GPU each when the cluster has them.

Every node must see the run directory (a shared filesystem: NFS, a FUSE-mounted bucket) and
have the factory installed; relative paths in the recipe are made absolute on the driver.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ENGINE_STAGES = ("rollout", "rewrite", "score")


@dataclass
class RayConfig:
    address: str | None = None
    """An existing cluster ("auto", "ray://head:10001"); unset: start a local Ray instance."""
    engine_replicas: int = 1
    """Actors holding a vLLM engine (rollout, rewrite) or the PRM (score): one per GPU / TP group."""
    cpu_actors: int = 2
    """Grading actors (each runs grade.workers processes)."""
    num_cpus: int | None = None
    """CPUs of a local instance (unset: all); ignored with an address."""


def absolute_paths(recipe):
    """The recipe with the local paths an actor reads made absolute (actors run elsewhere)."""
    def fix(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    r = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, output_dir=str(Path(recipe.run.output_dir).resolve()),
                                                            progress=False),
                            engine=dataclasses.replace(recipe.engine, model=fix(recipe.engine.model)))
    if r.rewrite is not None:
        r = dataclasses.replace(r, rewrite=dataclasses.replace(r.rewrite, model=fix(r.rewrite.model)))
    if r.score is not None:
        r = dataclasses.replace(r, score=dataclasses.replace(r.score, prm=dataclasses.replace(r.score.prm, model=fix(r.score.prm.model))))
    return r


class ShardWorker:
    """A Ray Data actor: one Runner (and so one engine) for the stage's lifetime."""

    def __init__(self, runner_cls: type, recipe, stage: str, upstream: str):
        # the Runner class comes from the driver (pickled by reference), so this module needs no
        # import of the pipeline, which imports it
        self.runner = runner_cls(recipe, log=lambda m: None)
        self.stage, self.upstream = stage, upstream

    def __call__(self, batch: dict) -> dict:
        stats = [json.dumps(self.runner.process_shard(self.stage, self.upstream, int(i))) for i in batch["shard"]]
        return {"shard": batch["shard"], "stats": stats}

    def __del__(self):
        self.runner.close()


def map_shards(runner_cls: type, recipe, stage: str, upstream: str, shards: list[int],
               log: Callable[[str], None] = print, on_shard: Callable[[dict], None] | None = None) -> None:
    """Run map stage `stage` over `shards` of `upstream` on Ray, each actor holding a
    `runner_cls(recipe)`; returns when all are written. `on_shard(stats)` is called on the
    driver as each shard's result arrives."""
    if not shards:
        return
    import ray

    cfg = recipe.ray
    if not ray.is_initialized():
        ray.init(address=cfg.address, num_cpus=None if cfg.address else cfg.num_cpus, log_to_driver=False,
                 include_dashboard=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    engine = stage in ENGINE_STAGES
    replicas = cfg.engine_replicas if engine else cfg.cpu_actors
    num_gpus = (recipe.engine.tensor_parallel_size if stage != "score" else 1) if engine and gpus else 0
    log(f"{stage}: {len(shards)} shards on Ray, {replicas} actor(s){f' x {num_gpus} GPU' if num_gpus else ''}")
    ds = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards))
    done = ds.map_batches(
        ShardWorker, fn_constructor_args=(runner_cls, absolute_paths(recipe), stage, upstream),
        batch_size=1, concurrency=max(1, min(replicas, len(shards))), num_gpus=num_gpus, num_cpus=1,
    )
    got = []
    for r in done.iter_rows():
        got.append(int(r["shard"]))
        if on_shard is not None:
            on_shard(json.loads(r["stats"]))
    got.sort()
    if got != sorted(shards):
        raise RuntimeError(f"{stage}: Ray returned shards {got}, expected {sorted(shards)}")
