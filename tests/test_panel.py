"""Tests of the separation panel's cohorts: each variant is built as documented, and the natural-image
cohort is made of scikit-learn's real images (recomputed here from sklearn directly)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from neurocl.cohort import Cohort
from neurocl.errors import ConfigError
from neurocl.io import read_tsv
from neurocl.demo import DEMO_COHORT
from neurocl.synthdir import SynthDir
from neurocl.validation.natural import NaturalConfig, make_natural_cohort
from neurocl.validation.panel import DEMO_GENERATOR, PANEL, PanelScale, build_cohort, panel_cohort

TINY = PanelScale(n_subjects=16, resolution=16.0, patch=32)


def test_the_panel_starts_from_the_demo_cohorts_generator_settings():
    assert DEMO_GENERATOR == {k: v for k, v in DEMO_COHORT.items() if k not in ("n_subjects", "resolution", "seed")}


def test_the_panel_has_at_least_five_cohorts_four_synthetic_stresses_and_one_of_real_images():
    names = [cohort.name for cohort in PANEL]
    assert len(set(names)) == len(names) >= 5
    stresses = [cohort for cohort in PANEL if not cohort.natural and cohort.options]
    assert len(stresses) >= 4
    assert any(cohort.natural for cohort in PANEL)
    for cohort in PANEL:
        assert cohort.shared and cohort.specific and not set(cohort.shared) & set(cohort.specific)
    with pytest.raises(ConfigError, match="no panel cohort 'nope'"):
        panel_cohort("nope")


@pytest.mark.parametrize("name", [cohort.name for cohort in PANEL if not cohort.natural])
def test_each_synthetic_variant_is_built_with_its_options_and_validates(tmp_path, name):
    cohort = panel_cohort(name)
    spec = build_cohort(cohort, tmp_path / name, TINY, seed=1001)
    made_with = json.loads((spec.parent / "dataset_description.json").read_text())["SynthConfig"]
    for option, value in {**DEMO_GENERATOR, **cohort.options, "seed": 1001, "n_subjects": 16}.items():
        assert made_with[option] == value
    assert Cohort.from_yaml(spec).validate(check_images=False) == []
    truth = SynthDir(spec.parent).read_ground_truth()
    assert set(cohort.shared) | set(cohort.specific) <= set(truth.columns)


def test_the_independent_cohort_uses_other_column_names_and_group_labels(tmp_path):
    spec = build_cohort(panel_cohort("independent"), tmp_path / "c", TINY, seed=3)
    participants = read_tsv(spec.parent / "participants.tsv")
    assert list(participants.columns) == ["participant_id", "dx", "AGE", "gender", "scanner", "score"]
    assert set(participants.dx) == {"HC", "PT"}
    loaded = Cohort.from_yaml(spec)
    assert sorted(loaded.attribute_kinds) == ["AGE", "gender", "scanner", "score"]
    assert loaded.is_target.sum() == (SynthDir(spec.parent).read_ground_truth().group == "target").sum()


def _sklearn_background(row, patch):
    """The photograph patch recomputed from scikit-learn's own arrays: grey, 2x2 mean, gamma."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images()
    photo = ["china", "flower"].index(row.photo)
    grey = images.images[photo].astype(np.float64).mean(axis=2) / 255.0
    crop = grey[row.top_px : row.top_px + patch, row.left_px : row.left_px + patch]
    half = patch // 2
    return crop.reshape(half, 2, half, 2).mean(axis=(1, 3)) ** row.gamma


def test_natural_images_are_sklearns_photographs_with_its_real_digits_blended_into_targets(tmp_path):
    from sklearn.datasets import load_digits

    config = NaturalConfig(n_subjects=24, patch=32, depth=3, seed=5)
    spec = make_natural_cohort(tmp_path / "n", config)
    truth = SynthDir(spec.parent).read_ground_truth()
    assert (truth.group == "target").sum() == 12 and set(truth.digit[truth.group == "target"]) == {0, 1}
    assert set(truth.photo) == {"china", "flower"}
    digits = load_digits()
    for row in truth.itertuples():
        volume = np.asarray(nib.load(spec.parent / "images" / f"{row.participant_id}.nii.gz").dataobj)
        assert volume.shape == (16, 16, 3) and np.all(volume == volume[:, :, :1])
        image, background = volume[:, :, 0], np.clip(_sklearn_background(row, 32), 0.02, 1.0)
        assert background.std() > 0.01  # flat (black) crops are redrawn: every image has texture
        if row.group == "background":
            np.testing.assert_allclose(image, background, atol=1e-5)
            continue
        assert digits.target[row.digit_sample] == row.digit
        # The blend only brightens, and only in the centre square (8 x 8 pixels, jitter <= 2).
        added = image - background
        assert added.min() > -1e-5
        outside = np.ones_like(added, dtype=bool)
        outside[2:14, 2:14] = False
        assert np.abs(added[outside]).max() < 1e-5
        # What was added follows the real digit's strokes.
        from scipy import ndimage

        stroke = ndimage.zoom(digits.images[row.digit_sample] / 16.0, 1.0, order=1)
        r, c = 4 + row.jitter_row, 4 + row.jitter_col
        centre = added[r : r + 8, c : c + 8]
        assert np.corrcoef(centre.ravel(), stroke.ravel())[0, 1] > 0.5
    loaded = Cohort.from_yaml(spec)
    assert loaded.validate(check_images=True) == []
    assert loaded.attribute_kinds == {"photo": "categorical", "crop_row": "continuous", "gamma": "continuous",
                                      "digit": "categorical", "strength": "continuous"}
    assert yaml.safe_load(spec.read_text())["group"] == {"column": "kind", "background": ["plain"], "target": ["digit"]}


def test_natural_cohort_is_reproducible_from_its_seed_and_refuses_bad_options(tmp_path):
    first = make_natural_cohort(tmp_path / "a", NaturalConfig(n_subjects=10, patch=32, seed=2)).parent
    second = make_natural_cohort(tmp_path / "b", NaturalConfig(n_subjects=10, patch=32, seed=2)).parent
    assert SynthDir(first).ground_truth.read_bytes() == SynthDir(second).ground_truth.read_bytes()
    image = "images/sub-0003.nii.gz"
    np.testing.assert_array_equal(nib.load(first / image).get_fdata(), nib.load(second / image).get_fdata())
    with pytest.raises(ValueError, match="patch must be even"):
        NaturalConfig(patch=33)
    with pytest.raises(ConfigError, match="not new or empty"):
        make_natural_cohort(first, NaturalConfig(n_subjects=10, patch=32))


def test_lesion_deficits_are_the_blob_weighted_mean_below_the_reference():
    from neurocl.validation.oracles import lesion_deficits

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = -40.0
    volumes = np.ones((2, 21, 21, 21))
    volumes[1, 5:16, 5:16, 5:16] = 0.7  # 0.3 below the reference in a 44 mm cube about the origin
    centres = np.array([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    # The blob reaches 16 mm (lesion_size 1): inside the cube, so the weighted mean deficit is exactly 0.3.
    np.testing.assert_allclose(lesion_deficits(volumes, affine, centres, np.ones((21, 21, 21)), 1.0)[:, 0],
                               [0.0, 0.3], atol=1e-6)


@pytest.mark.parametrize("name", ["focal-jitter", "age-interaction"])
def test_the_oracle_decodes_the_subtype_that_pca_and_cpca_miss(tmp_path, name):
    from neurocl.validation.oracles import OracleBenchConfig, run_one

    config = OracleBenchConfig.checked(cohorts=[name], seeds=[0], n_subjects=160, resolution=8.0)
    run = run_one(panel_cohort(name), 0, config, tmp_path)
    subtype = next(row for row in run["rows"] if row["attribute"] == "subtype")["values"]
    assert subtype["oracle"] >= 0.75
    assert max(subtype["pca"], subtype["cpca"]) <= 0.65
