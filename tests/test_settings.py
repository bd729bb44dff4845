"""Tests for neurocl.settings: dotted --set overrides merged into a pipeline and validated by its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neurocl.errors import ConfigError
from neurocl.config import load_pipeline
from neurocl.settings import merge_settings, nearest_field, parse_settings

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


def test_values_are_read_as_yaml_and_nested_by_their_dots():
    assert parse_settings(["training.lr=1e-3", "training.seed=3", "maps.enabled=false", "baselines=[pca, cpca]",
                           "evaluation.probe.n_splits=3", "splits.seed=null"]) == {
        "training": {"lr": 1e-3, "seed": 3}, "maps": {"enabled": False}, "baselines": ["pca", "cpca"],
        "evaluation": {"probe": {"n_splits": 3}}, "splits": {"seed": None}}


@pytest.mark.parametrize("bad", ["training.lr", "=3", "training..lr=1", "a.b=[1,"])
def test_malformed_settings_are_refused_naming_the_setting(bad):
    with pytest.raises(ConfigError, match=r"--set"):
        parse_settings([bad])


def test_a_setting_replaces_one_field_and_keeps_the_rest_of_its_section():
    raw = {"training": {"lr": 0.003, "epochs": 40}, "name": "demo"}
    assert merge_settings(raw, {"training": {"lr": 0.1}}) == {"training": {"lr": 0.1, "epochs": 40}, "name": "demo"}
    with pytest.raises(ConfigError, match="name is 'demo' in the pipeline, not a section"):
        merge_settings(raw, {"name": {"x": 1}})


def test_pipeline_settings_are_validated_by_the_schema_with_the_field_named(tmp_path):
    config = load_pipeline(DEMO, settings=["training.lr=1e-3", "method.lam_mi=50", f"cohort={tmp_path / 'c.yaml'}"])
    assert config.training.lr == 1e-3 and config.method.lam_mi == 50 and config.training.epochs == 40
    assert config.cohort == tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match=r"with --set training.lr=-1: training.lr: Input should be greater than 0"):
        load_pipeline(DEMO, settings=["training.lr=-1"])
    with pytest.raises(ConfigError, match=r"method.lam_mmi: Extra inputs are not permitted"):
        load_pipeline(DEMO, settings=["method.lam_mmi=50"])


def test_setting_paths_are_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_pipeline(DEMO, settings=["cohort=cohorts/x.yaml"])
    assert config.cohort == tmp_path / "cohorts" / "x.yaml"
    assert yaml.safe_load(DEMO.read_text())["cohort"] == "../neurocl-demo/cohort/cohort.yaml"


def test_a_mistyped_field_names_the_nearest_one_and_lists_its_section(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_pipeline(DEMO, settings=["training.lr_rate=1e-3"])
    message = str(error.value)
    assert "training.lr_rate: Extra inputs are not permitted (got 0.001); did you mean training.lr? " in message
    assert "(training fields: optimizer, lr, weight_decay," in message and "epochs" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"method.lam_mmi: .*did you mean method.lam_mi\? \(method fields: name,"):
        load_pipeline(DEMO, settings=["method.lam_mmi=50"])
    with pytest.raises(ConfigError, match=r"evaluation.probe.n_split: .*did you mean evaluation.probe.n_splits\?"):
        load_pipeline(DEMO, settings=["evaluation.probe.n_split=3"])


def test_a_mistyped_section_names_the_nearest_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trainin: Extra inputs are not permitted .*; did you mean training\? "
                                          r"\(top-level fields: name, cohort, preprocess, .*training"):
        load_pipeline(DEMO, settings=["trainin.lr=1e-3"])


def test_a_typo_in_the_yaml_gets_the_same_hint(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("cohort: cohort.yaml\nmaps: {enabeld: true}\n")
    with pytest.raises(ConfigError, match=r"maps.enabeld: .*did you mean maps.enabled\?"):
        load_pipeline(path)


def test_an_unknown_field_far_from_every_other_lists_the_fields_without_a_guess():
    with pytest.raises(ConfigError) as error:
        load_pipeline(DEMO, settings=["training.learning_rate=1e-3"])
    assert "did you mean" not in str(error.value) and "(training fields: optimizer, lr," in str(error.value)


@pytest.mark.parametrize(("name", "expected"), [
    ("lr_rate", "lr"),  # the field plus a word
    ("warmup", "warmup_steps"),  # the field less a word
    ("batchsize", "batch_size"), ("Seed", "seed"),  # underscores and case
    ("epoch", "epochs"), ("lam_mmi", "lam_mi"),  # one letter off: difflib, before the word rule (lam_mmi is not lam)
    ("learning_rate", None), ("xyz", None),
])
def test_nearest_field(name, expected):
    fields = ["lr", "lam", "lam_mi", "warmup_steps", "batch_size", "seed", "seeds", "epochs", "strategy", "accelerator"]
    assert nearest_field(name, fields) == expected


def test_bench_separation_set_gets_the_hint(tmp_path):
    from typer.testing import CliRunner

    from neurocl.cli import app

    result = CliRunner().invoke(app, ["bench", "separation", "--quick", "--set", "training.lr_rate=1e-3",
                                      "--workdir", str(tmp_path)], terminal_width=300)
    assert result.exit_code != 0
    assert "did you mean training.lr?" in " ".join(result.output.split())
    assert not any(tmp_path.iterdir())  # refused before any cohort was built
