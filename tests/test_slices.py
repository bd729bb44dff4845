"""Tests for neurocl.slices (2D cohorts from a synthetic 3D one) and the 2D demo pipeline on them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neurocl import pipeline
from neurocl.cohort import Cohort
from neurocl.slices import slice_cohort, subtype_slab
from neurocl.synthdir import SynthDir

DEMO_2D = Path(__file__).resolve().parents[1] / "pipelines" / "demo_2d.yaml"


@pytest.fixture(scope="module")
def png_cohort(tiny_cohort, tmp_path_factory) -> Path:
    return slice_cohort(tiny_cohort.parent, tmp_path_factory.mktemp("slices") / "png", "png")


def test_the_slab_spans_every_region_from_its_lowest_to_its_highest_slice():
    first, second = np.zeros((4, 4, 9), bool), np.zeros((4, 4, 9), bool)
    first[1, 1, 2] = True
    second[0, 3, 5:7] = True
    assert subtype_slab([first, second]) == slice(2, 7)


def test_png_projections_keep_one_intensity_scale_and_every_subtype(png_cohort, tiny_cohort):
    cohort = Cohort.from_yaml(png_cohort)
    assert cohort.validate() == [] and cohort.spatial_dims == 2
    first, last = (int(z) for z in cohort.name.rsplit("slab", 1)[1].split("-"))
    source = Cohort.from_yaml(tiny_cohort)
    volumes = [np.asarray(nib.as_closest_canonical(nib.load(p)).get_fdata(dtype=np.float32)) for p in source.image_paths]
    projections = [v[:, :, first:last + 1].mean(axis=2) for v in volumes]
    peak = max(float(p.max()) for p in projections)
    for index in (0, 5):
        expected = np.clip(np.round(projections[index] * 255 / peak), 0, 255)
        # float32 sums in another order may land a value on the other side of .5: at most 1 grey level.
        assert np.abs(np.asarray(Image.open(cohort.image_paths[index]), dtype=float) - expected).max() <= 1
    written, source = SynthDir(png_cohort.parent), SynthDir(tiny_cohort.parent)
    assert len(written.subtype_masks()) == len(source.subtype_masks()) > 0
    for mask in written.subtype_masks():
        assert nib.load(mask).get_fdata().sum() > 0
    pd.testing.assert_frame_equal(pd.read_csv(written.ground_truth, sep="\t"), pd.read_csv(source.ground_truth, sep="\t"))


def test_2d_demo_pipeline_trains_embeds_and_probes_a_png_cohort(png_cohort, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from neurocl.cli import app

    settings = [f"cohort={png_cohort}", "training.epochs=2", "training.batch_size=8", "evaluation.probe.n_splits=2",
                "evaluation.probe.n_permutations=2", "evaluation.probe.n_bootstrap=2", "baselines=[pca]"]
    command = ["run", str(DEMO_2D), "--out", str(tmp_path / "run")] + [f"--set={s}" for s in settings]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    # Not a terminal: one progress line per epoch and per stage on stderr, no Lightning banner or tip.
    assert [line.split(",")[0] for line in result.stderr.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/2", "epoch 2/2"]
    assert sum("normalising" in line for line in result.stderr.splitlines()) == 1
    assert "Tip" not in result.output and "GPU available" not in result.output
    run_dir = tmp_path / "run"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["training"]["epochs"] == 2 and recorded["training"]["lr"] == 0.003  # the YAML's, kept
    assert recorded["evaluation"]["probe"]["n_splits"] == 2 and [b["name"] for b in recorded["baselines"]] == ["pca"]
    embeddings = pd.read_csv(run_dir / "embeddings.tsv", sep="\t")
    assert len(embeddings) == 32
    assert [c for c in embeddings.columns if c.startswith("salient_")] == [f"salient_{i}" for i in range(4)]
    assert np.isfinite(embeddings.filter(like="common_").to_numpy()).all()
    probes = pd.read_csv(run_dir / "probes.tsv", sep="\t")
    assert {"common", "salient"} <= set(probes["space"])
    assert (run_dir / "report.html").is_file()


def test_a_3d_encoder_on_2d_images_is_refused_with_the_fix(png_cohort, tmp_path):
    from neurocl.errors import ConfigError

    overrides = {"cohort": str(png_cohort), "encoder": {"name": "small_cnn", "spatial_dims": 3, "width": 4},
                 "training": {"epochs": 1, "batch_size": 8, "accelerator": "cpu", "precision": "32-true"}}
    with pytest.raises(ConfigError, match=r"images are 2D; set encoder: \{spatial_dims: 2\}"):
        pipeline.run_pipeline(DEMO_2D, tmp_path / "run", overrides=overrides)
