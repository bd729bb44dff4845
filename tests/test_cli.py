"""Tests for neurocl.cli: version, help of flags, validate of a pipeline."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from neurocl import __version__
from neurocl.cli import app

DEMO_2D = Path(__file__).resolve().parents[1] / "pipelines" / "demo_2d.yaml"


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"neurocl {__version__}"


def test_help_shows_flags_without_a_type_and_options_with_theirs():
    for command in (["run", "--help"], ["--help"], ["validate", "--help"]):
        output = CliRunner().invoke(app, command, terminal_width=200).output
        assert "<bool>" not in output, command
    run_help = CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output
    assert "--resume" in run_help and "<path>" in run_help and "SECTION.FIELD=VALUE" in run_help


def test_validate_checks_a_pipeline_its_settings_and_its_cohort(tiny_cohort):
    ok = CliRunner().invoke(app, ["validate", str(DEMO_2D), "--no-images", "--set", f"cohort={tiny_cohort}"])
    assert ok.exit_code == 0, ok.output
    assert "pipeline OK" in ok.output and "cohort OK: 32 images" in ok.output
    bad = CliRunner().invoke(app, ["validate", str(DEMO_2D), "--no-images", "--set", f"cohort={tiny_cohort}",
                                   "--set", "method.attributes=[IQ]"])
    assert bad.exit_code == 1 and "method.attributes: ['IQ'] not in the attributes" in bad.output
    misplaced = CliRunner().invoke(app, ["validate", str(tiny_cohort), "--set", "training.lr=1"])
    assert misplaced.exit_code == 1 and "--set applies to a pipeline YAML" in misplaced.output
