"""Tests for neurocl.settings: dotted --set overrides merged into a pipeline and validated by its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neurocl.errors import ConfigError
from neurocl.config import load_pipeline
from neurocl.settings import merge_settings, parse_settings

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
