"""`executor: ray`: the teacher on replica actors, the map stages' shards through Ray Data.

    factory run RECIPE executor=ray [ray.address=auto] [ray.engine_replicas=R]

The driver runs the global stages (ingest, dedup, decontam, curate) as it does locally.

- rollout, rewrite, judge: the driver runs them as the local executor does (rollout streams
  every pending shard through one `Engine.stream`, `factory.run.continuous`), but the engine
  is an `EngineFleet` (`factory.engines.fleet`): `engine_replicas` actors, each holding its
  own engine (vLLM on `engine.tensor_parallel_size` GPUs when the cluster has them, or the
  simulated teacher) and keeping that engine's window of sequences in flight, fed as it takes
  work. So no replica drains at a shard boundary, a problem is durable when its K traces are
  in, shards are sealed as they fill, and a killed run (or a killed replica) resumes exactly
  as on one machine. With `engine.backend: server` the server is the fleet: the driver
  streams to it directly, as locally.
- grade: `cpu_actors` CPU actors through Ray Data, each with its pool of grading processes.
  The pool is what makes this work in an actor: math-verify's signal-based timeout raises
  outside a main thread, so grading runs in the pool's processes (their main thread) with
  math-verify's own timeouts off, and the pool enforces the limit by killing a worker.
- score: `engine_replicas` actors through Ray Data, on a GPU each when the cluster has them.

A Ray Data actor builds the same `Runner` as the local executor and calls
`Runner.process_shard` on one shard at a time: the output is the same numbered shard with the
same done marker, so a run can be resumed by either executor and the products are the ones the
local executor writes. The engine fleet is stopped before such a stage, so its CPUs and GPUs
are free for the stage's actors (a judge after grade starts it again).

Every node must see the run directory (a shared filesystem: NFS, a FUSE-mounted bucket) and
have the factory installed; relative paths in the recipe are made absolute on the driver.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ENGINE_STAGES = ("score",)  # map stages whose actors hold a model (rollout, rewrite, judge use the fleet)


@dataclass
class RayConfig:
    address: str | None = None
    """An existing cluster ("auto", "ray://head:10001"); unset: start a local Ray instance."""
    engine_replicas: int = 1
    """Actors holding an engine (rollout, rewrite, judge) or the PRM (score): one per GPU / TP group."""
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

    init_ray(recipe.ray)
    cfg = recipe.ray
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


def init_ray(cfg: RayConfig) -> None:
    """Connect to the cluster (or start a local instance) once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.address, num_cpus=None if cfg.address else cfg.num_cpus, log_to_driver=False,
                 include_dashboard=False)


def engine_fleet(recipe, engine_cfg, run_dir: str | Path, log: Callable[[str], None] = print):
    """An EngineFleet of `ray.engine_replicas` actors, each holding `make_engine(engine_cfg)`.
    Resources per replica: `engine.tensor_parallel_size` GPUs and a CPU where the cluster has
    GPUs; a CPU each on a CPU cluster (its engine decodes there); none for the simulated teacher."""
    import ray

    from factory.engines.fleet import EngineFleet

    init_ray(recipe.ray)
    replicas, have = recipe.ray.engine_replicas, ray.cluster_resources()
    if have.get("GPU", 0):
        options = {"num_gpus": engine_cfg.tensor_parallel_size, "num_cpus": 1}
    else:
        options = {"num_cpus": 0 if engine_cfg.backend == "sim" else 1}
    for resource, each in (("GPU", options.get("num_gpus", 0)), ("CPU", options["num_cpus"])):
        if replicas * each > have.get(resource, 0):
            raise ValueError(f"ray.engine_replicas={replicas} replicas need {replicas * each:g} {resource}s "
                             f"({each:g} each); the cluster has {have.get(resource, 0):g}")
    def fix(path):  # actors may run on other nodes: local paths made absolute here
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    e = dataclasses.replace(engine_cfg, model=fix(engine_cfg.model),
                            sim=dataclasses.replace(engine_cfg.sim, tokenizer=fix(engine_cfg.sim.tokenizer)))
    gpus = f", {options['num_gpus']} GPU each" if options.get("num_gpus") else ""
    log(f"starting {replicas} engine replica(s) of {e.model} on Ray ({e.backend}{gpus}) ...")
    return EngineFleet.of(e, str(Path(run_dir).resolve()), replicas, options, log=log)
