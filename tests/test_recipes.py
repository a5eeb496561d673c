"""Every recipe in recipes/ loads onto its dataclasses; overrides and errors behave."""

from pathlib import Path

import pytest

from factory.config import ConfigError
from factory.pipeline import Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("factory run" in first or "make " in first), "recipes start with their command"


def test_overrides_and_types(tmp_path):
    recipe = load_recipe(RECIPES[0], ["rollout.temperature=0.3", "curate.difficulty_buckets=[0.5]",
                                      "engine.model=/x", "run.output_dir=out"])
    assert recipe.rollout.temperature == 0.3 and recipe.curate.difficulty_buckets == [0.5]
    assert recipe.engine.model == "/x" and recipe.run.output_dir == "out"


@pytest.mark.parametrize("override,message", [
    ("rollout.temprature=0.3", "unknown key rollout.temprature"),
    ("rollout.num_traces=many", "rollout.num_traces: expected int"),
    ("nosection.x=1", "unknown key nosection"),
    ("rollout.seed", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_recipe(RECIPES[0], [override])


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rollout: [unclosed")
    with pytest.raises(ConfigError, match="r.yaml"):
        load_recipe(p)
