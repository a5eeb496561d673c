"""Every recipe in recipes/ loads onto its dataclasses; overrides and errors behave.

A recipe's first line is the command that runs it, and that command says which dataclass the
recipe maps onto (`factory run` / `make demo`: the pipeline; `factory train sft|dpo`; `factory eval`).
"""

import re
from pathlib import Path

import pytest

from factory.training import evaluate, grpo, rounds, train
from factory.demo import DemoRecipe
from prm.cli import PRMRecipe
from factory.config import ConfigError
from factory.run.recipe import Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
PIPELINE = RECIPES[[p.name for p in RECIPES].index("toy_addition.yaml")]


def load_any(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: recipes start with the command that runs them"
    if m := re.search(r"factory(?:\.cli)? train (sft|dpo) ", first):
        return train.load_recipe(m.group(1), path)
    if re.search(r"factory(?:\.cli)? train grpo ", first):
        return grpo.load_recipe(path)
    if "factory loop " in first:
        return rounds.load_recipe(path)
    if "factory demo " in first:
        from factory.demo import load_recipe as load_demo

        return load_demo(path)
    if "factory prm " in first:
        from prm.cli import load_recipe as load_prm

        return load_prm(path)
    if "factory eval " in first:
        return evaluate.load_recipe(path)
    assert "factory run " in first or "make " in first, f"{path.name}: no factory command on line 1: {first}"
    return load_recipe(path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_any(path)
    assert isinstance(recipe, (Recipe, train.SFTRecipe, train.DPORecipe, grpo.GRPORecipe, rounds.RoundsRecipe, evaluate.EvalRecipe, PRMRecipe, DemoRecipe))


def test_overrides_and_types(tmp_path):
    recipe = load_recipe(PIPELINE, ["rollout.temperature=0.3", "curate.difficulty_buckets=[0.5]",
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
        load_recipe(PIPELINE, [override])


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rollout: [unclosed")
    with pytest.raises(ConfigError, match="r.yaml"):
        load_recipe(p)


def test_nested_stage_lists_are_typed():
    sft = train.load_recipe("sft", None, ["data.order.strategy=staged",
                                          "data.order.stages=[{min_difficulty: 0.5, epochs: 2}]"])
    assert sft.data.order.stages[0].min_difficulty == 0.5 and sft.data.order.stages[0].epochs == 2
    with pytest.raises(ConfigError, match=r"data\.order\.stages\[0\]\.epochs: expected int"):
        train.load_recipe("sft", None, ["data.order.stages=[{epochs: two}]"])


def test_exponent_floats_without_a_dot():
    """YAML 1.1 reads 2e-5 as a string; learning rates are written that way."""
    assert train.load_recipe("sft", None, ["train.learning_rate=2e-5"]).train.learning_rate == 2e-5
    with pytest.raises(ConfigError, match="train.learning_rate: expected float"):
        train.load_recipe("sft", None, ["train.learning_rate=fast"])


def test_r1_distill_dry_run_checks_the_prms_context(tmp_path, capsys):
    """Qwen2.5-Math-PRM-7B is not on this machine: the dry run checks score.prm.max_length
    against its published context (4096) and says where the figure came from."""
    from factory import cli
    from factory.run.recipe import dry_run

    path = RECIPES[[p.name for p in RECIPES].index("r1_distill.yaml")]
    report = dry_run(load_recipe(path))
    prm = report["prm_context"]
    assert report["stages"] == ["ingest", "rollout", "grade", "topup", "score", "curate"]
    with pytest.raises(ValueError, match="topup"):  # the top-up's settings are checked too
        dry_run(load_recipe(path, ["topup.max_pass_rate=0.0"]))
    assert prm["checked"] and prm["context"] == 4096 and prm["max_length"] <= 4096
    assert cli.main(["run", str(path), "--dry-run"]) == 0
    with pytest.raises(ValueError, match=r"score\.prm\.max_length=32768, but Qwen/Qwen2\.5-Math-PRM-7B reads at most "
                                         r"4096 tokens"):
        dry_run(load_recipe(path, ["score.prm.max_length=32768"]))
    assert cli.main(["run", str(path), "score.prm.max_length=32768", "--dry-run"]) == 2
    assert "score.prm.max_length=32768" in capsys.readouterr().err


def test_dry_run_reads_a_local_prms_context_and_says_when_it_cannot(tmp_path, capsys):
    from factory import cli
    from factory.run.recipe import dry_run
    from prm import tiny

    tiny.qwen_prm(tmp_path / "prm", max_positions=1024)
    recipe = load_recipe(PIPELINE, [f"score.prm.model={tmp_path / 'prm'}", "score.prm.trust_remote_code=true"])
    prm = dry_run(recipe)["prm_context"]
    assert prm["checked"] and prm["context"] == 1024 and str(tmp_path / "prm") in prm["source"]
    with pytest.raises(ValueError, match=r"score\.prm\.max_length=2048, but .* reads at most 1024 tokens"):
        dry_run(load_recipe(PIPELINE, [f"score.prm.model={tmp_path / 'prm'}", "score.prm.max_length=2048"]))
    # a model that is nowhere here and not on record: reported unchecked, not passed
    unknown = load_recipe(PIPELINE, ["score.prm.model=someone/some-prm", "score.prm.max_length=999999"])
    prm = dry_run(unknown)["prm_context"]
    assert not prm["checked"] and "not on this machine" in prm["source"]
    assert cli.main(["run", str(PIPELINE), "score.prm.model=someone/some-prm", "--dry-run"]) == 0
    assert "not checked" in capsys.readouterr().err
