"""`factory run`: the stages of a recipe, in order, resumable.

    ingest [-> rewrite] [-> dedup] [-> decontam] -> rollout -> grade [-> topup] [-> judge] [-> score] -> curate
                                                                  (RUN = run.output_dir)

Intermediate tables live in RUN/stages/<stage>/ as numbered shards (factory.store); the
products are RUN/curriculum/, RUN/pairs/, RUN/rejected/<stage>/, RUN/difficulty.parquet and
RUN/manifest.json. ingest, dedup and decontam are global (a duplicate can sit in any shard)
and cut their output into shards; rewrite, rollout, grade, judge and score map over shards, so a
killed run redoes at most the shards it was writing (topup, a map stage too, sends more samples
to the problems the teacher rarely solves: factory.stages.topup; its waves stream through one
engine call over every pending shard, `factory.run.topup_stream`). On the local executor rollout streams
every pending shard through one engine (`factory.run.continuous`: per-problem durability,
no idle teacher at shard ends); executor=ray does the same over engine replica actors and maps
grade and score shards over actors (`factory.run.ray_executor`). curate maps over the graded shards (a problem's traces are all
in one), then merges their sorted outputs into the products. The optional stages (rewrite,
dedup, decontam, topup, judge, score) run when the recipe has their section; the recipe's
dataclasses and `dry_run` are in `factory.run.recipe`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from factory import config as config_mod, console
from factory.stages import grade
from factory import schema, store
from factory.stages.curate import curate_table
from factory.stages.decontam import BenchmarkIndex, decontam_rows
from factory.stages.dedup import dedup_rows
from factory.engines import Engine, EngineConfig
from factory.stages.ingest import ingest_rows
from factory.run.card import write_card
from factory.run.products import build_manifest, failed_requests, link_rejected, merge_products, shard_counts
from factory.run.progress import Progress
from factory.run.report import summary
from factory.run.topup_stream import streamable, topup_shards
from factory.run.recipe import Recipe
from factory.stages.judge import judge_table
from factory.stages.rewrite import rewrite_table
from factory.stages.rollout import prompt_messages, rollout_table
from factory.stages.topup import topup_table


class ProblemShards:
    """A global stage's output (ingest, dedup, decontam) written as it is made: kept rows in
    shards of `size` (ingest.problems_per_shard), each with the rejected rows that came since
    the previous one; the stage's counts (rows in, drops, its own stats) go on the last shard,
    so the manifest's sums are the stage's. Memory: one shard of rows (and its rejects)."""

    def __init__(self, sd: store.StageDir, size: int, table_schema: pa.Schema):
        self.sd, self.size, self.schema = sd, max(1, size), table_schema
        self.rows, self.rejected, self.shards, self.kept, self.dropped = [], [], 0, 0, 0
        self.reasons: dict[str, int] = {}

    def add(self, row: dict | None, rejected: dict | None = None) -> None:
        if row is not None:
            if len(self.rows) == self.size:  # a full shard is written once a row follows it, so the last
                self._write({"rows_in": 0, "dropped": {}, "seconds": 0.0})  # is never an empty one
            self.rows.append(row)
            self.kept += 1
        if rejected is not None:
            self.rejected.append(rejected)
            self.dropped += 1
            self.reasons[rejected["drop_reason"]] = self.reasons.get(rejected["drop_reason"], 0) + 1

    def _write(self, stats: dict) -> None:
        out = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.sd.write_shard(self.shards, out, schema.table(self.rejected, schema.REJECTED), {**stats, "rows_out": out.num_rows})
        self.rows, self.rejected, self.shards = [], [], self.shards + 1

    def finish(self, stats: dict, t0: float) -> None:
        """Write the last shard (one, empty, if nothing was kept) with the stage's counts."""
        self._write({**stats, "rows_in": self.kept + self.dropped, "dropped": dict(self.reasons),
                     "seconds": time.perf_counter() - t0})
        self.sd.finish(self.shards, {})


class Runner:
    """Runs a recipe's stages into run.output_dir, reusing finished work."""

    def __init__(self, recipe: Recipe, engine: Engine | None = None, log: Callable[[str], None] = console.say,
                 scorer=None, rewriter: Engine | None = None, command: str = "run", judge: Engine | None = None):
        self.recipe = recipe
        self.run_dir = Path(recipe.run.output_dir)
        self._engine = engine
        self._scorer = scorer
        self._rewriter = rewriter
        self._judge = judge
        self._fleets: list = []  # engines this Runner started on Ray's replica actors (closed before a Ray Data stage)
        self._pool = None
        self.log = log
        self.stats: dict[str, dict] = {}
        # written by the driver only (a Ray actor's Runner never begins a stage)
        self.progress = Progress(self.run_dir, show=recipe.run.progress, command=command)

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # started only when a shard really needs generating
            from factory.engines import make_engine

            e = self.recipe.engine
            if self.on_ray(e):
                return self._start_engine(e, self.run_dir)
            self.log(f"starting vLLM with {e.model} ..." if e.backend == "vllm" else f"teacher server {e.server.base_url} ({e.model})")
            self._engine = make_engine(e, self.run_dir)
        return self._engine

    def on_ray(self, e: EngineConfig) -> bool:
        """Whether engine `e` runs on Ray's replica actors (executor=ray; a server is its own fleet)."""
        return getattr(self.recipe, "executor", "local") == "ray" and e.backend != "server"

    def _start_engine(self, e: EngineConfig, run_dir: Path, slot: str = "_engine") -> Engine:
        """Engine `e` as an EngineFleet on Ray, kept in `slot` until release_fleets."""
        from factory.run.ray_executor import engine_fleet

        fleet = engine_fleet(self.recipe, e, run_dir, self.log)
        setattr(self, slot, fleet)
        self._fleets.append((slot, fleet))
        return fleet

    def release_fleets(self) -> None:
        """Stop the engine fleets this Runner started (a later stage that needs one starts it again)."""
        for slot, fleet in self._fleets:
            fleet.close()
            if getattr(self, slot) is fleet:
                setattr(self, slot, None)
        self._fleets = []

    @property
    def started_engine(self) -> Engine | None:
        """The teacher engine if this run started (or was given) one, else None; for a caller
        that wants to reuse it after the run (the demo evaluates its students on it)."""
        return self._engine

    @property
    def judge(self) -> Engine:
        model = self.recipe.judge.model
        if model is None or model == self.recipe.engine.model:
            return self.engine
        if self._judge is None:
            from dataclasses import replace

            from factory.engines import make_engine

            self.log(f"starting the judge {model} ...")
            e = replace(self.recipe.engine, model=model)
            if self.on_ray(e):
                return self._start_engine(e, self.run_dir / "judge", "_judge")
            self._judge = make_engine(e, self.run_dir / "judge")
        return self._judge

    @property
    def rewriter(self) -> Engine:
        model = self.recipe.rewrite.model
        if model is None or model == self.recipe.engine.model:
            return self.engine
        if self._rewriter is None:
            from dataclasses import replace

            from factory.engines import make_engine

            self.log(f"starting the rewriter {model} ...")
            e = replace(self.recipe.engine, model=model)
            if self.on_ray(e):
                return self._start_engine(e, self.run_dir / "rewriter", "_rewriter")
            self._rewriter = make_engine(e, self.run_dir / "rewriter")
        return self._rewriter

    # -- stages ----------------------------------------------------------------------------

    def run_ingest(self) -> store.StageDir:
        cfg = self.recipe.ingest
        sd = store.StageDir(self.run_dir, "ingest")
        fp = store.fingerprint("ingest", config_mod.to_dict(cfg), store.input_signature(cfg.paths))
        if not (sd.open(fp, config_mod.to_dict(cfg)) and sd.complete):
            t0 = time.perf_counter()
            self.progress.begin("ingest", len(cfg.paths), unit="file")
            out, shown = ProblemShards(sd, self.recipe.ingest.problems_per_shard, schema.PROBLEMS), 0
            for row, bad, message in ingest_rows(cfg):
                out.add(row, bad)
                if message and shown < 20:
                    self.log(f"ingest: rejected {message}")
                shown += bool(message)
            if shown > 20:
                self.log(f"ingest: ... and {shown - 20} more rejected rows (see rejected/)")
            out.finish({}, t0)
            self.progress.advance(len(cfg.paths), problems=out.kept, rejected=out.dropped)
            self.progress.end()
        return sd

    def run_global(self, name: str, upstream: store.StageDir, cfg, rows: Callable[[store.Shards, dict], Iterator],
                   extra_fp=()) -> store.StageDir:
        """A global stage (dedup, decontam): `rows(upstream shards, stats)` yields every row in
        input order with whether it is kept, reading the shards as often as it needs; the output
        is re-sharded like ingest's, a shard at a time."""
        sd = store.StageDir(self.run_dir, name)
        fp = store.fingerprint(name, config_mod.to_dict(cfg), upstream.fingerprint, *extra_fp)
        if sd.open(fp, config_mod.to_dict(cfg)) and sd.complete:
            return sd
        t0 = time.perf_counter()
        self.progress.begin(name, 1, unit="table")
        out, stats = ProblemShards(sd, self.recipe.ingest.problems_per_shard, pq.read_schema(upstream.shard(0))), {}
        for keep, row in rows(store.Shards.of(upstream), stats):
            out.add(row if keep else None, None if keep else row)
        out.finish(stats, t0)
        self.progress.advance(1, problems=out.kept, rejected=out.dropped)
        self.progress.end()
        return sd

    def run_rewrite(self, upstream: store.StageDir) -> store.StageDir:
        from factory.stages.rewrite import check_config

        cfg, r = self.recipe.rewrite, self.recipe
        check_config(cfg)
        extra = (cfg.model or r.engine.model, r.engine.model, products_config(r.rollout), config_mod.to_dict(r.grade),
                 config_mod.to_dict(r.ingest))
        return self.run_map("rewrite", upstream, cfg, extra_fp=extra)

    def run_dedup(self, upstream: store.StageDir) -> store.StageDir:
        return self.run_global("dedup", upstream, self.recipe.dedup,
                               lambda shards, stats: dedup_rows(shards, self.recipe.dedup, stats))

    def run_decontam(self, upstream: store.StageDir) -> store.StageDir:
        cfg = self.recipe.decontam

        def rows(shards: store.Shards, stats: dict):
            return decontam_rows(shards, BenchmarkIndex(cfg.benchmarks, cfg.ngram), stats)

        # the benchmark files are inputs: editing one reruns the check
        files = store.input_signature([p for b in cfg.benchmarks for p in b.paths])
        return self.run_global("decontam", upstream, cfg, rows, extra_fp=(files,))

    def shard_fn(self, name: str, i: int) -> Callable[[pa.Table], tuple]:
        """The per-shard function of map stage `name` for its shard `i`: table -> (out, rejected, stats).
        Engines, the PRM and the grading pool are made on first use and kept for later shards."""
        r = self.recipe
        empty = schema.table([], schema.REJECTED)
        if name == "rollout":
            return lambda t: rollout_table(t, r.rollout, self.engine)
        if name == "rewrite":
            return lambda t: rewrite_table(t, r.rewrite, self.rewriter, self.engine, r.rollout, r.grade, r.ingest,
                                           self.grade_pool)
        if name == "grade":
            def fn(t: pa.Table):
                t, dropped, labels = grade.label_unlabeled(t, r.grade, self.grade_pool)
                graded = grade.grade_table(t, r.grade, self.grade_pool)
                verdicts = graded.column("verdict").to_pylist()
                return graded, schema.table(dropped, schema.REJECTED), \
                    {"verdicts": {v: verdicts.count(v) for v in set(verdicts)}, **labels}
            return fn
        if name == "topup":
            return lambda t: topup_table(t, r.topup, r.rollout, self.engine, r.grade, self.grade_pool)
        if name == "judge":
            def fn(t: pa.Table):
                judged, counts, failures = judge_table(t, r.judge, self.judge)
                return judged, empty, {"judge": counts, "failures": failures}
            return fn
        if name == "score":
            from prm.score import Memo, score_table

            def fn(t: pa.Table):
                if self._scorer is None:  # loaded only when a shard really needs scoring
                    from prm.scorer import PRMScorer

                    self.log(f"loading PRM {r.score.prm.model} ...")
                    self._scorer = PRMScorer(r.score.prm, key="score.prm")
                memo = Memo.of_shard(self.run_dir, i)
                scored, stats = score_table(t, r.score, self._scorer, memo)
                memo.save()  # before the shard's marker: a re-made shard reads what this one read
                return scored, empty, stats
            return fn
        raise ValueError(f"{name!r} is not a map stage")

    @property
    def grade_pool(self):
        if self._pool is None:
            self._pool = grade.make_pool(self.recipe.grade)
        return self._pool

    def close(self) -> None:
        """Stop the grading workers and the engine fleets (engines passed in stay up: their owner closes them)."""
        self.release_fleets()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def process_shard(self, name: str, upstream: str, i: int) -> dict:
        """Map stage `name` over shard `i` of stage `upstream`, written as its shard `i`.
        The unit of work of both executors (the Ray one calls it inside its actors)."""
        sd, up = store.StageDir(self.run_dir, name), store.StageDir(self.run_dir, upstream)
        t0 = time.perf_counter()
        source = up.seal(i)
        table = up.read_shard(i)
        out, rejected, stats = self.shard_fn(name, i)(table)
        stats = {**stats, "rows_in": table.num_rows, "rows_out": out.num_rows,
                 "dropped": store.count_reasons(rejected), "seconds": time.perf_counter() - t0}
        if "failures" not in stats and rejected.num_rows:  # by cause: a failed request's detail starts with it
            failed = [d.split(":", 1)[0] for r, d in zip(rejected.column("drop_reason").to_pylist(),
                                                         rejected.column("detail").to_pylist())
                      if r.endswith("request_failed") and d]
            stats["failures"] = {c: failed.count(c) for c in set(failed)}
        sd.write_shard(i, out, rejected, stats, source=source)
        return stats

    def pending_shards(self, name: str, sd: store.StageDir, upstream: store.StageDir, n: int) -> list[int]:
        """Shards of map stage `name` to (re)make: not done, made from an older seal of their
        upstream shard, or (rollout.retry_failed) holding requests that failed for good, which a
        re-run sends again. A rollout shard is re-opened from its sealed traces (only its failed
        samples are sent); other stages redo the shard, and the server's journal answers every
        request that had succeeded."""
        pending = []
        for i in range(n):
            stats = sd.stats(i)
            if stats is None or stats.get("source") != upstream.seal(i):
                pending.append(i)
            elif self.recipe.rollout.retry_failed and failed_requests(stats):
                if name == "rollout":  # streamed on both executors (Ray: through the replica fleet)
                    from factory.run.continuous import reopen

                    failed = reopen(sd, upstream, i, self.recipe.rollout, self.engine)
                    self.log(f"rollout: re-sending the {failed} failed samples of shard {i}")
                pending.append(i)
        return pending

    def run_map(self, name: str, upstream: store.StageDir, cfg, extra_fp=()) -> store.StageDir:
        sd = store.StageDir(self.run_dir, name)
        fp = store.fingerprint(name, products_config(cfg), upstream.fingerprint, *extra_fp)
        sd.open(fp, config_mod.to_dict(cfg))
        n = upstream.num_shards()
        pending = self.pending_shards(name, sd, upstream, n)
        if not pending and sd.complete:
            return sd
        sd.unfinish()
        summary = {}
        if getattr(self.recipe, "executor", "local") == "ray" and name in ("grade", "score"):
            from factory.run.ray_executor import map_shards

            if pending:
                self.release_fleets()  # their CPUs / GPUs go to the stage's actors
            self.progress.begin(name, n, n - len(pending))
            map_shards(type(self), self.recipe, name, upstream.name, pending, self.log,
                       on_shard=lambda stats: self.progress.advance(1, **shard_counts(stats)))
        elif name == "rollout":  # one stream over every pending shard: no idle teacher at shard ends
            from factory.run.continuous import rollout_shards

            # the live unit is the problem (a shard can take minutes); shards are counted beside it
            problems = sum(upstream.shard_rows(i) for i in pending)
            engine = self.engine if pending else None  # started before the live line, which it would break
            self.progress.begin(name, problems, unit="problem")
            rollout_shards(sd, upstream, pending, self.recipe.rollout, engine,
                           on_seal=lambda i, stats: self.progress.add(shards=1),
                           on_problem=lambda k, traces, tokens, **more: self.progress.advance(
                               k, traces=traces, tokens=tokens, **more))
            if pending and hasattr(engine, "replicas"):  # an EngineFleet: what each replica did this launch
                summary["replicas"] = engine.stats()
        elif name == "topup" and pending and streamable(self.recipe.rollout):  # every shard's waves in one stream
            r = self.recipe
            self.progress.begin(name, n, n - len(pending))
            topup_shards(sd, upstream, pending, r.topup, r.rollout, r.grade, self.engine, self.grade_pool,
                         on_shard=lambda stats: self.progress.advance(1, **shard_counts(stats)))
        else:
            self.progress.begin(name, n, n - len(pending))
            for i in pending:
                self.progress.advance(1, **shard_counts(self.process_shard(name, upstream.name, i)))
        self.progress.end()
        sd.finish(n, summary)
        return sd

    def run_rollout(self, upstream: store.StageDir) -> store.StageDir:
        e = self.recipe.engine
        return self.run_map("rollout", upstream, self.recipe.rollout, extra_fp=(e.model, e.dtype, e.max_model_len))

    def run_grade(self, upstream: store.StageDir) -> store.StageDir:
        return self.run_map("grade", upstream, self.recipe.grade)

    def run_topup(self, upstream: store.StageDir) -> store.StageDir:
        from factory.stages.topup import check

        r = self.recipe
        check(r.topup, r.rollout)
        extra = (r.engine.model, r.engine.dtype, r.engine.max_model_len, products_config(r.rollout),
                 config_mod.to_dict(r.grade))
        return self.run_map("topup", upstream, r.topup, extra_fp=extra)

    def run_judge(self, upstream: store.StageDir) -> store.StageDir:
        from factory.stages.judge import check

        check(self.recipe.judge)
        e = self.recipe.engine
        return self.run_map("judge", upstream, self.recipe.judge, extra_fp=(self.recipe.judge.model or e.model, e.model))

    def run_score(self, upstream: store.StageDir) -> store.StageDir:
        from prm.score import Memo, check, check_context

        check(self.recipe.score)
        check_context(self.recipe.score)
        Memo.claim(self.run_dir, self.recipe.score.prm)
        return self.run_map("score", upstream, self.recipe.score)

    def run_curate(self, upstream: store.StageDir) -> None:
        """Curate each graded shard on its own (a problem's K traces all live in one shard), then
        merge the shards' sorted outputs into the products: memory is one shard plus a row
        group per merged file, never the run."""
        cfg = self.recipe.curate
        sd = store.StageDir(self.run_dir, "curate")
        fp = store.fingerprint("curate", config_mod.to_dict(cfg), upstream.fingerprint,
                               products_config(self.recipe.rollout))
        sd.open(fp, config_mod.to_dict(cfg))
        n = upstream.num_shards()
        pending = [i for i in range(n) if sd.stale(i, upstream)]
        if not pending and sd.complete:
            return
        sd.unfinish()
        prompt = lambda q: prompt_messages(q, self.recipe.rollout)  # noqa: E731
        self.progress.begin("curate", n, n - len(pending))
        for i in pending:
            t0 = time.perf_counter()
            source = upstream.seal(i)
            graded = upstream.read_shard(i)
            curriculum, pairs, difficulty, rejected = curate_table(graded, cfg, prompt, self.recipe.rollout.num_traces)
            sd.write_shard(i, curriculum, rejected, {
                "rows_in": graded.num_rows, "rows_out": curriculum.num_rows, "pairs": pairs.num_rows,
                "dropped": store.count_reasons(rejected), "seconds": time.perf_counter() - t0},
                extra={"pairs": pairs, "difficulty": difficulty}, row_group_size=64, source=source)
            self.progress.advance(1, rows=curriculum.num_rows, pairs=pairs.num_rows)
        self.progress.end()
        t0 = time.perf_counter()
        shards, pair_files = merge_products(self.run_dir, sd, n, cfg.rows_per_shard)
        sd.finish(n, {"shards": shards, "pair_files": pair_files, "merge_seconds": time.perf_counter() - t0})

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> dict:
        try:
            manifest = self._run()
        except BaseException as e:
            self.progress.finish("failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        finally:
            self.close()
        failed = manifest["failed_requests"]["total"]
        self.progress.finish("finished" if not failed else "finished with failed requests",
                             summary=summary(manifest), failed_requests=manifest["failed_requests"])
        return manifest

    def _run(self) -> dict:
        t0 = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"run {self.run_dir}")
        problems = self.run_ingest()
        stages = {"ingest": problems}
        for name in ("rewrite", "dedup", "decontam"):
            if getattr(self.recipe, name) is not None:
                problems = stages[name] = getattr(self, f"run_{name}")(problems)
        traces = stages["rollout"] = self.run_rollout(problems)
        graded = stages["grade"] = self.run_grade(traces)
        if self.recipe.topup is not None:
            graded = stages["topup"] = self.run_topup(graded)
        if self.recipe.judge is not None:
            graded = stages["judge"] = self.run_judge(graded)
        if self.recipe.score is not None:
            graded = stages["score"] = self.run_score(graded)
        self.run_curate(graded)
        stages["curate"] = store.StageDir(self.run_dir, "curate")
        link_rejected(self.run_dir / "rejected", stages)
        manifest = build_manifest(self.recipe, stages, time.perf_counter() - t0)
        started = vars(self._engine) if self._engine is not None else {}  # no attribute lookups on the engine
        if "dtype" in started:  # the in-process engine's resolved dtype, and why
            manifest["engine"] = {"dtype": started["dtype"], "dtype_reason": started["dtype_reason"],
                                  "engine_process": started.get("engine_process")}
        store.write_json(manifest, self.run_dir / "manifest.json")
        write_card(self.run_dir, manifest)
        return manifest


# settings of how a run goes, not of what it makes: changing one must not wipe a stage's work
NOT_FINGERPRINTED = {"retry_failed"}


def products_config(cfg) -> dict:
    """A stage config as its fingerprint sees it."""
    return {k: v for k, v in config_mod.to_dict(cfg).items() if k not in NOT_FINGERPRINTED}


def run(recipe: Recipe, engine: Engine | None = None, log: Callable[[str], None] = console.say, scorer=None,
        rewriter: Engine | None = None, judge: Engine | None = None) -> dict:
    """Run `recipe`'s stages; pass `engine` (a PRM `scorer`, a `rewriter`, a `judge`) to reuse ones already loaded."""
    return Runner(recipe, engine, log, scorer, rewriter, judge=judge).run()
