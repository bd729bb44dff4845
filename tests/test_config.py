"""The pipeline schema: every bad field named once, paths resolved by type, booleans refused where numbers are due."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from neurocl.config import _DOC_SECTIONS, PipelineConfig, docstring_entries, field_tables, load_pipeline, render_docs
from neurocl.demo import DEMO_PIPELINE
from neurocl.errors import ConfigError
from neurocl.pipeline import run_pipeline
from neurocl.rundir import RunDir


def test_pipeline_errors_name_the_file_and_every_bad_field(tmp_path, tiny_cohort):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"cohort: {tiny_cohort}\ntraining: {{epochs: 0, batch_size: many}}\nmethod: {{nme: sepclr}}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_pipeline(path)
    message = str(error.value)
    for field in ("training.epochs", "training.batch_size", "method.nme"):
        assert f"{path}: {field}:" in message
    assert "'many'" in message


def test_missing_cohort_field_is_named(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: nothing\n")
    with pytest.raises(ConfigError, match="empty.yaml: cohort: Field required"):
        load_pipeline(path)


SHIPPED = sorted((Path(__file__).parents[1] / "pipelines").glob("*.yaml")) + [DEMO_PIPELINE]


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_shipped_pipelines_are_valid(path):
    config = load_pipeline(path)
    assert config.cohort.is_absolute()


def test_study_template_trains_densenet_on_several_gpus_in_bf16():
    config = load_pipeline(Path(__file__).parents[1] / "pipelines" / "study_template.yaml")
    assert config.encoder.name == "densenet121"
    assert config.training.devices >= 2 and config.training.strategy == "ddp"
    assert config.training.precision == "bf16-mixed"


CPU_TEMPLATE = Path(__file__).parents[1] / "pipelines" / "study_template_cpu.yaml"


def test_cpu_study_template_trains_a_small_cnn_in_fp32_on_one_cpu_process_with_cheap_maps():
    config = load_pipeline(CPU_TEMPLATE)
    assert config.encoder.name == "small_cnn" and config.training.precision == "32-true"
    assert config.training.accelerator == "cpu" and config.training.devices == 1
    assert config.maps.methods == ["gradient_x_input"] and config.preprocess.voxel_size == 4.0


def test_cpu_study_template_runs_end_to_end_on_a_tiny_cohort(tiny_cohort, tmp_path, one_thread):
    """Every stage of the template as shipped, made tiny: the tiny cohort's own grid, one epoch, few permutations."""
    settings = ["preprocess.voxel_size=null", "training.epochs=1", "training.batch_size=8", "training.warmup_steps=1",
                "evaluation.attributes=[group,age,sex]", "evaluation.probe.n_permutations=19",
                "evaluation.probe.n_bootstrap=20", "maps.n_bootstrap=5", "splits.test_fraction=0.25",
                f"outputs.store={tmp_path / 'store'}"]
    run = RunDir(run_pipeline(CPU_TEMPLATE, tmp_path / "run", overrides={"cohort": str(tiny_cohort)}, settings=settings))
    for path in (run.embeddings, run.probes, run.separation, run.maps.evaluation, run.report_md):
        assert path.is_file(), path
    assert {"pca", "cpca", "lin2"} <= set(run.baseline_names())


@pytest.mark.parametrize("field", ["training: {epochs: true}", "training: {lr: false}", "maps: {k_max: true}",
                                   "evaluation: {probe: {n_permutations: true}}", "splits: {val_fraction: true}"])
def test_a_boolean_is_refused_where_a_number_is_due(field, tmp_path, tiny_cohort):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort}\n{field}\n")
    section, name = field.replace("{", " ").replace(":", " ").split()[:2]
    with pytest.raises(ConfigError, match=rf"{section}\.{name}.*: a boolean where .* is expected \(got (True|False)\)"):
        load_pipeline(path)


def test_a_boolean_field_still_takes_a_boolean(tmp_path, tiny_cohort):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort}\ntraining: {{deterministic: false}}\nmaps: {{enabled: true}}\n")
    config = load_pipeline(path)
    assert config.training.deterministic is False and config.maps.enabled is True


def test_every_path_field_is_resolved_against_the_pipeline_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "cohort": "../cohort.yaml", "maps": {"atlas": "atlas.nii.gz", "atlas_names": "/abs/names.tsv"},
        "outputs": {"store": "store"}, "evaluation": {"ground_truth": "gt.tsv"}, "preprocess": {"mask": "auto"},
    }))
    config = load_pipeline(path)
    assert config.cohort == (tmp_path / "cohort.yaml").resolve()
    assert config.maps.atlas == (tmp_path / "sub" / "atlas.nii.gz").resolve()
    assert config.maps.atlas_names == Path("/abs/names.tsv")
    assert config.outputs.store == (tmp_path / "sub" / "store").resolve()
    assert config.evaluation.ground_truth == (tmp_path / "sub" / "gt.tsv").resolve()
    assert config.preprocess.mask == "auto"  # a literal of a path field is not a path


def test_a_saved_config_validates_back_to_the_same_pipeline(tmp_path, tiny_cohort):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort}\nbaselines: [pca, {{name: yaware, sigma: 3.0}}]\n")
    config = load_pipeline(path)
    assert PipelineConfig.model_validate(config.model_dump(mode="json")) == config


def test_the_field_tables_of_docs_pipelines_md_match_the_schema():
    """docs/pipelines.md's tables are generated from the Field descriptions: regenerate them with
    ``python -m neurocl.config docs/pipelines.md`` after changing a field."""
    doc = Path(__file__).parents[1] / "docs" / "pipelines.md"
    text = doc.read_text()
    assert render_docs(text) == text, "docs/pipelines.md is stale: run python -m neurocl.config docs/pipelines.md"


def test_every_field_of_every_section_is_documented():
    tables = field_tables()
    for key, model, _ in _DOC_SECTIONS:
        for name, field in model.model_fields.items():
            if key != "top" or field.description is not None:
                assert f"| `{name}` |" in tables[key], f"{key}.{name}"


def test_docstring_entries_read_numpydoc_parameters():
    class Documented:
        """Something.

        Parameters
        ----------
        alpha : float
            The first
            line and the second.
        beta, gamma : int
            Shared text.

        Notes
        -----
        not_a_field : x
            ignored
        """

    assert docstring_entries(Documented) == {"alpha": "The first line and the second.", "beta": "Shared text.",
                                             "gamma": "Shared text."}
