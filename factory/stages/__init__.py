"""The pipeline's stages, one module each: a `<Stage>Config` dataclass and a function from a table
(or a shard of one) to tables, in run order ingest -> rewrite -> dedup -> decontam -> rollout ->
grade -> (prm.score) -> curate. `factory.schema` names every column they read and add."""
