"""Running a recipe: the stages in order with resume (`pipeline`), rollout streamed across shards
(`continuous`), map stages on a Ray cluster (`ray_executor`), and a run's text report (`report`)."""
