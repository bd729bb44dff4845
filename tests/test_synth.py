"""Tests of the synthetic cohort generator: determinism, file contract, and that planted effects are real.

Every statistic is recomputed here with plain numpy/pandas from the files on disk.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.errors import ConfigError
from neurocl.io import read_tsv
from neurocl.synth import SynthConfig, draw_latents, make_synthetic_cohort
from neurocl.synthdir import SynthDir

SMALL = dict(n_subjects=8, subtypes=2, sites=2, resolution=10.0)


def _images(cohort_dir: Path, participant_ids) -> np.ndarray:
    return np.stack(
        [np.asarray(nib.load(cohort_dir / p / "anat" / f"{p}_desc-gm.nii.gz").dataobj) for p in participant_ids]
    )


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _all_files(cohort_dir: Path) -> list[Path]:
    return sorted(path.relative_to(cohort_dir) for path in cohort_dir.rglob("*") if path.is_file())


def test_same_seed_gives_identical_files_and_arrays_whatever_the_worker_count(tmp_path):
    config = SynthConfig(**dict(SMALL, n_subjects=16), seed=3)
    first = make_synthetic_cohort(tmp_path / "a", config, workers=1).parent
    second = make_synthetic_cohort(tmp_path / "b", config, workers=2).parent
    assert _all_files(first) == _all_files(second)
    for name in ("participants.tsv", "ground_truth.tsv", "cohort.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    ids = read_tsv(first / "participants.tsv").participant_id
    np.testing.assert_array_equal(_images(first, ids), _images(second, ids))
    for mask in (first / "masks").glob("*.nii.gz"):
        np.testing.assert_array_equal(_mask(mask), _mask(second / "masks" / mask.name))


def test_different_seed_gives_different_subjects(tmp_path):
    first = make_synthetic_cohort(tmp_path / "a", SynthConfig(**SMALL, seed=3)).parent
    second = make_synthetic_cohort(tmp_path / "b", SynthConfig(**SMALL, seed=4)).parent
    ages = [read_tsv(folder / "ground_truth.tsv").age.to_numpy() for folder in (first, second)]
    assert not np.allclose(ages[0], ages[1])
    ids = read_tsv(first / "participants.tsv").participant_id
    assert not np.array_equal(_images(first, ids), _images(second, ids))


def test_participants_and_ground_truth_have_documented_columns_and_ranges(tiny_cohort):
    folder = tiny_cohort.parent
    participants = read_tsv(folder / "participants.tsv")
    truth = read_tsv(folder / "ground_truth.tsv")
    assert list(participants.columns) == ["participant_id", "diagnosis", "age", "sex", "site", "severity"]
    assert {"participant_id", "group", "diagnosis", "age", "sex", "site", "subtype", "severity", "head_scale",
            "site_scale", "site_smoothing", "site_noise", "deformation_amplitude"} <= set(truth.columns)
    assert len(participants) == len(truth) == 32
    assert participants.participant_id.str.fullmatch(r"sub-\d{4}").all()
    assert participants.participant_id.is_unique
    assert (participants.participant_id == truth.participant_id).all()
    assert set(participants.diagnosis) == {"control", "patient"}
    assert (participants.diagnosis == "patient").sum() == 16
    assert set(participants.sex) <= {"F", "M"} and set(participants.site) == {"site-1", "site-2"}
    assert participants.age.between(20, 80).all()
    patients = truth.diagnosis == "patient"
    assert (truth.group == np.where(patients, "target", "background")).all()
    assert participants.severity[~patients].isna().all()
    np.testing.assert_allclose(participants.severity[patients], truth.severity[patients].round(1))
    assert truth.severity[patients].between(2, 10).all() and (truth.severity[~patients] == 0).all()
    assert (truth.subtype[~patients] == 0).all()
    assert sorted(truth.subtype[patients].value_counts().to_list()) == [8, 8]


def test_images_are_3d_float32_probabilities_on_one_grid(tiny_cohort):
    folder = tiny_cohort.parent
    reference = nib.load(folder / "brain_mask.nii.gz")
    for participant_id in read_tsv(folder / "participants.tsv").participant_id[:6]:
        image = nib.load(folder / participant_id / "anat" / f"{participant_id}_desc-gm.nii.gz")
        data = np.asarray(image.dataobj)
        assert data.dtype == np.float32 and data.ndim == 3 and data.shape == reference.shape
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.5
        np.testing.assert_allclose(image.affine, reference.affine)
        np.testing.assert_allclose(image.header.get_zooms(), (8.0, 8.0, 8.0))


def test_masks_are_binary_on_the_image_grid_and_distinct(tiny_cohort):
    folder = tiny_cohort.parent
    brain = nib.load(folder / "brain_mask.nii.gz")
    masks = []
    for k in (1, 2):
        image = nib.load(folder / "masks" / f"subtype-{k}_mask.nii.gz")
        data = np.asarray(image.dataobj)
        assert image.shape == brain.shape
        np.testing.assert_allclose(image.affine, brain.affine)
        assert set(np.unique(data)) == {0, 1}
        assert data.sum() >= 5
        assert np.all(np.asarray(brain.dataobj)[data == 1] == 1)
        masks.append(data.astype(bool))
    assert not (masks[0] & masks[1]).any()
    # Different hemispheres: the centres of mass lie on opposite sides of x = 0 (MNI mm).
    centres_x = [(brain.affine @ np.append(np.argwhere(mask).mean(0), 1.0))[0] for mask in masks]
    assert centres_x[0] < 0 < centres_x[1]


def test_each_subtype_loses_gm_inside_its_own_mask(tiny_cohort):
    folder = tiny_cohort.parent
    truth = read_tsv(folder / "ground_truth.tsv")
    images = _images(folder, truth.participant_id)
    controls = truth.subtype.to_numpy() == 0
    age = truth.age.to_numpy()
    for k in (1, 2):
        mask = _mask(folder / "masks" / f"subtype-{k}_mask.nii.gz").astype(bool)
        regional = images[:, mask].mean(axis=1)
        # Age-matched comparison: residuals from the controls' linear age trend.
        slope, intercept = np.polyfit(age[controls], regional[controls], 1)
        residual = regional - (slope * age + intercept)
        spread = residual[controls].std()
        own = truth.subtype.to_numpy() == k
        other = (truth.subtype.to_numpy() > 0) & ~own
        assert residual[own].mean() < residual[controls].mean() - 0.75 * spread
        assert residual[own].mean() < residual[other].mean() - 0.75 * spread


def test_global_gm_decreases_with_age(tiny_cohort):
    folder = tiny_cohort.parent
    truth = read_tsv(folder / "ground_truth.tsv")
    brain = _mask(folder / "brain_mask.nii.gz").astype(bool)
    mean_gm = _images(folder, truth.participant_id)[:, brain].mean(axis=1)
    assert np.corrcoef(mean_gm, truth.age)[0, 1] < -0.4


def test_larger_head_scale_gives_more_total_gm(tiny_cohort):
    folder = tiny_cohort.parent
    truth = read_tsv(folder / "ground_truth.tsv")
    total_gm = _images(folder, truth.participant_id).sum(axis=(1, 2, 3))
    slope, intercept = np.polyfit(truth.age, total_gm, 1)
    assert np.corrcoef(total_gm - (slope * truth.age + intercept), truth.head_scale)[0, 1] > 0.3
    assert truth.head_scale[truth.sex == "M"].mean() > truth.head_scale[truth.sex == "F"].mean()


def test_site_intensity_scale_shows_in_the_images(tiny_cohort):
    folder = tiny_cohort.parent
    truth = read_tsv(folder / "ground_truth.tsv")
    brain = _mask(folder / "brain_mask.nii.gz").astype(bool)
    mean_gm = pd.Series(_images(folder, truth.participant_id)[:, brain].mean(axis=1))
    by_site = mean_gm.groupby(truth.site).mean()
    scale = truth.groupby("site").site_scale.first()
    assert (by_site.idxmax(), by_site.idxmin()) == (scale.idxmax(), scale.idxmin())


def _patient_share_range(latents: pd.DataFrame) -> float:
    share = (latents.diagnosis == "patient").groupby(latents.site).mean()
    return share.max() - share.min()


def test_confound_one_makes_site_determine_diagnosis():
    latents = draw_latents(SynthConfig(n_subjects=400, sites=4, confound=1.0, seed=2))
    table = pd.crosstab(latents.site, latents.diagnosis)
    assert ((table == 0).sum(axis=1) == 1).all()  # every site holds one group only
    assert _patient_share_range(latents) == 1.0


def test_confound_zero_leaves_site_independent_of_diagnosis():
    latents = draw_latents(SynthConfig(n_subjects=400, sites=4, confound=0.0, seed=2))
    assert _patient_share_range(latents) < 0.2


def test_cohort_yaml_matches_the_documented_spec(tiny_cohort):
    spec = yaml.safe_load(tiny_cohort.read_text())
    assert spec["participants"] == "participants.tsv" and spec["root"] == "."
    assert spec["images"] == "{participant_id}/anat/{participant_id}_desc-gm.nii.gz"
    assert spec["group"] == {"column": "diagnosis", "background": ["control"], "target": ["patient"]}
    assert spec["attributes"] == {"age": "continuous", "sex": "categorical", "site": "categorical", "severity": "continuous"}


def test_templates_are_nilearns_packaged_mni152():
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template

    from neurocl.synth import _templates_1mm

    gm, brain, affine = _templates_1mm()
    reference = load_mni152_gm_template(resolution=1)
    np.testing.assert_array_equal(gm, reference.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(brain, load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32))
    np.testing.assert_allclose(affine, reference.affine)


def test_any_resolution_sets_the_voxel_size(tmp_path):
    spec = make_synthetic_cohort(tmp_path / "c", SynthConfig(n_subjects=4, subtypes=1, sites=1, resolution=12.5))
    image = nib.load(spec.parent / "sub-0001" / "anat" / "sub-0001_desc-gm.nii.gz")
    np.testing.assert_allclose(image.header.get_zooms(), (12.5, 12.5, 12.5))
    extent_mm = np.array(image.shape) * 12.5
    assert np.all(extent_mm > [150, 185, 160]) and np.all(extent_mm < [200, 235, 210])


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        make_synthetic_cohort(tmp_path, SynthConfig(**SMALL))
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_impossible_options_name_the_field_and_value():
    with pytest.raises(ConfigError, match=r"patient_fraction=1\.5"):
        SynthConfig.from_options(patient_fraction=1.5)
    with pytest.raises(ConfigError, match=r"confound=0\.5 needs at least 2 sites"):
        SynthConfig.from_options(confound=0.5, sites=1)


def test_cli_synth_writes_a_cohort_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    out = tmp_path / "synthetic"
    options = ["--n-subjects", "6", "--sites", "2", "--resolution", "10", "--seed", "5"]
    result = runner.invoke(app, ["synth", str(out), *options])
    assert result.exit_code == 0, result.output
    assert len(read_tsv(out / "participants.tsv")) == 6
    assert (out / "cohort.yaml").is_file() and (out / "masks" / "subtype-2_mask.nii.gz").is_file()
    again = runner.invoke(app, ["synth", str(out), *options])
    assert again.exit_code == 1
    assert "not empty" in again.output


def test_cli_synth_reports_a_bad_option_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--patient-fraction", "1.5"])
    assert result.exit_code == 1
    assert "patient_fraction=1.5" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


# --- the stress options (docs/synthetic.md "Stress options") -----------------------------------------------------

STILL = dict(site_effect=0.0, sex_effect=0.0, head_size_noise=0.0)  # no smoothing, scale 1, one head size


def _world_distance(affine: np.ndarray, shape, centre) -> np.ndarray:
    index = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    return np.sqrt(((world - np.asarray(centre)[:, None]) ** 2).sum(0)).reshape(shape)


def test_a_subject_space_lesion_sits_at_the_same_voxels_whatever_the_warp(tmp_path):
    """Same seed with and without the loss: the ratio is 1 - loss at the region's core, in every patient."""
    common = dict(n_subjects=8, subtypes=1, sites=1, resolution=6.0, deformation=4.0, seed=2, **STILL)
    ratios = {}
    for space in ("subject", "template"):
        lesioned = make_synthetic_cohort(tmp_path / space, SynthConfig(**common, lesion_space=space)).parent
        intact = make_synthetic_cohort(tmp_path / f"{space}0", SynthConfig(**common, lesion_space=space, subtype_effect=0.0)).parent
        truth = read_tsv(lesioned / "ground_truth.tsv")
        patients = truth[truth.subtype == 1]
        image = nib.load(lesioned / "brain_mask.nii.gz")
        core = _world_distance(image.affine, image.shape, (-26.0, -18.0, -16.0)) <= 7.0
        a, b = _images(lesioned, patients.participant_id), _images(intact, patients.participant_id)
        # Noise is the same draw in both cohorts, so compare the noiseless part: voxels well inside tissue.
        ok = (b > 0.3) & core
        ratio = np.where(ok, (a + 1e-6) / (b + 1e-6), np.nan)
        ratios[space] = (ratio, patients.subtype_gm_loss.to_numpy())
    ratio, loss = ratios["subject"]
    for r, expected in zip(ratio, loss):
        values = r[np.isfinite(r)]
        assert values.size >= 1
        # The noise (SD 0.01 on tissue > 0.3) moves the ratio by a few percent at most.
        np.testing.assert_allclose(np.median(values), 1.0 - expected, atol=0.05)
    # Planted in template space, the core drifts with a 4x deformation: the same voxels lose less on average.
    spread_template = np.nanmean(np.abs(ratios["template"][0] - (1.0 - ratios["template"][1])[:, None, None, None]))
    spread_subject = np.nanmean(np.abs(ratio - (1.0 - loss)[:, None, None, None]))
    assert spread_subject < spread_template


def test_an_age_gradient_takes_more_gm_at_the_front_than_at_the_back(tmp_path):
    options = dict(n_subjects=12, subtypes=1, sites=1, resolution=8.0, deformation=0.0, seed=4, **STILL)
    slopes = {}
    for pattern in ("gradient", "global"):
        folder = make_synthetic_cohort(tmp_path / pattern, SynthConfig(**options, age_pattern=pattern)).parent
        truth = read_tsv(folder / "ground_truth.tsv")
        controls = truth[truth.subtype == 0]
        images = _images(folder, controls.participant_id)
        image = nib.load(folder / "brain_mask.nii.gz")
        y_mm = (image.affine @ np.vstack([np.indices(image.shape).reshape(3, -1), np.ones(np.prod(image.shape))]))[1]
        y_mm = y_mm.reshape(image.shape)
        brain = np.asarray(image.dataobj).astype(bool)
        front, back = brain & (y_mm > 30), brain & (y_mm < -60)
        ratio = images[:, front].mean(1) / images[:, back].mean(1)
        slopes[pattern] = np.polyfit(controls.age, ratio, 1)[0]
    # 2x the mean loss at the front pole, none at the back: the front/back ratio falls ~0.4 % a year or more.
    assert slopes["gradient"] < -0.003
    assert abs(slopes["global"]) < abs(slopes["gradient"]) / 3



def test_the_files_written_are_the_ones_synthdir_names(tmp_path):
    """The generator and the readers agree on the layout: every file the generator writes is a SynthDir path."""
    folder = SynthDir(make_synthetic_cohort(tmp_path / "c", SynthConfig(**SMALL, seed=1)).parent)
    ids = read_tsv(folder.participants).participant_id
    expected = {folder.cohort_yaml, folder.participants, folder.ground_truth, folder.brain_mask, folder.regions,
                folder.description, folder.subtype_mask(1), folder.subtype_mask(2), *map(folder.image, ids)}
    assert {path for path in folder.path.rglob("*") if path.is_file()} == expected
    assert folder.subtype_masks() == [folder.subtype_mask(1), folder.subtype_mask(2)]
    spec = yaml.safe_load(folder.cohort_yaml.read_text())
    assert spec["participants"] == folder.PARTICIPANTS and spec["images"] == folder.IMAGES
    # The on-disk names themselves (the format other tools read): spelled here on purpose.
    assert folder.ground_truth == folder.path / "ground_truth.tsv" and folder.has_ground_truth()
    assert folder.subtype_mask(2) == folder.path / "masks" / "subtype-2_mask.nii.gz"
    truth = folder.read_ground_truth()
    assert list(truth.participant_id) == list(ids) and "subtype" in truth.columns

def test_head_size_noise_zero_ties_head_size_to_sex_alone():
    latents = draw_latents(SynthConfig(n_subjects=50, sex_effect=4.0, head_size_noise=0.0, seed=1))
    expected = np.exp(np.where(latents.sex == "M", 0.1, -0.1))
    np.testing.assert_allclose(latents.head_scale, expected)
    loose = draw_latents(SynthConfig(n_subjects=50, sex_effect=4.0, head_size_noise=2.0, seed=1))
    assert loose.head_scale.groupby(loose.sex).std().min() > 0.02


def test_no_subtypes_gives_one_pattern_and_a_severity_continuum(tmp_path):
    latents = draw_latents(SynthConfig(n_subjects=400, subtypes=0, seed=3))
    patients = latents[latents.diagnosis == "patient"]
    assert set(patients.subtype) == {1} and set(latents.subtype[latents.diagnosis == "control"]) == {0}
    # U(0, 10): the mild end reaches the controls (the default Beta draw never goes below 2).
    assert patients.severity.min() < 0.5 and patients.severity.max() > 9.5
    assert abs(patients.severity.mean() - 5.0) < 0.6
    folder = make_synthetic_cohort(tmp_path / "c", SynthConfig(n_subjects=6, subtypes=0, sites=1, resolution=10.0)).parent
    assert sorted(path.name for path in (folder / "masks").iterdir()) == ["regions.tsv", "subtype-1_mask.nii.gz"]


def test_several_small_regions_per_subtype_are_listed_and_masked(tmp_path):
    config = SynthConfig(n_subjects=6, subtypes=2, lesion_regions=3, lesion_size=0.75, sites=1, resolution=4.0)
    folder = make_synthetic_cohort(tmp_path / "c", config).parent
    regions = read_tsv(folder / "masks" / "regions.tsv")
    assert regions.subtype.tolist() == [1, 1, 1, 2, 2, 2] and regions.region.is_unique
    from scipy import ndimage

    full = make_synthetic_cohort(tmp_path / "full", SynthConfig(n_subjects=6, subtypes=2, sites=1, resolution=4.0)).parent
    one_region = _mask(full / "masks" / "subtype-1_mask.nii.gz").sum()
    for k in (1, 2):
        mask = _mask(folder / "masks" / f"subtype-{k}_mask.nii.gz").astype(bool)
        assert ndimage.label(mask)[1] >= 3  # separate blobs (GM thresholding can split one)
        image = nib.load(folder / "masks" / f"subtype-{k}_mask.nii.gz")
        centres = regions[regions.subtype == k][["x_mm", "y_mm", "z_mm"]].to_numpy()
        nearest = np.min([_world_distance(image.affine, image.shape, centre) for centre in centres], axis=0)
        assert nearest[mask].max() <= 0.75 * 16.0  # w >= 0.5 lies within the scaled taper
        for centre in centres:
            assert (_world_distance(image.affine, image.shape, centre)[mask] <= 0.75 * 12.0).any()
        assert mask.sum() == regions.n_voxels[regions.subtype == k].sum()
        # Radii x 0.75: each blob holds about 0.75^3 of a full one's voxels.
        assert regions.n_voxels[regions.subtype == k].max() < 0.7 * one_region
    with pytest.raises(ConfigError, match=r"lesion_regions=3 needs 9 distinct regions"):
        SynthConfig.from_options(subtypes=3, lesion_regions=3)


def test_cli_synth_takes_every_default_from_synthconfig(tmp_path, monkeypatch):
    import neurocl.synth

    seen = {}

    def capture(out_dir, config, progress, workers):
        seen["config"] = config
        return Path(out_dir) / "cohort.yaml"

    monkeypatch.setattr(neurocl.synth, "make_synthetic_cohort", capture)
    options = ["--lesion-space", "subject", "--age-pattern", "gradient", "--subtypes", "0", "--head-size-noise", "0"]
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), *options])
    assert result.exit_code == 0, result.output
    expected = SynthConfig(lesion_space="subject", age_pattern="gradient", subtypes=0, head_size_noise=0.0)
    assert seen["config"] == expected
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "y"), "--lesion-space", "native"])
    assert bad.exit_code == 1 and "lesion_space='native'" in bad.output


def _centre(subject, r: int) -> np.ndarray:
    return np.array([getattr(subject, f"lesion{r}_{axis}_mm") for axis in "xyz"])


def _deficits(tmp_path, **options):
    """Truth, the images' affine and each patient's deficit: the same cohort without the loss minus with it.

    The same seed draws the same subjects, centres and noise in both, so the difference is the planted effect.
    """
    common = dict(n_subjects=8, sites=1, resolution=6.0, deformation=0.0, age_effect=0.0, seed=5, **STILL, **options)
    lesioned = make_synthetic_cohort(tmp_path / "lesioned", SynthConfig(**common)).parent
    intact = make_synthetic_cohort(tmp_path / "intact", SynthConfig(**{**common, "subtype_effect": 0.0})).parent
    truth = read_tsv(lesioned / "ground_truth.tsv")
    patients = truth[truth.subtype > 0]
    deficit = _images(intact, patients.participant_id) - _images(lesioned, patients.participant_id)
    return patients, nib.load(lesioned / "brain_mask.nii.gz"), deficit


def test_a_jittered_lesion_moves_between_subjects_and_its_deficit_follows_the_recorded_centre(tmp_path):
    patients, image, deficit = _deficits(tmp_path, subtypes=1, subtype_effect=2.5, lesion_jitter=20.0)
    nominal = np.array([-26.0, -18.0, -16.0])  # the left medial temporal lobe, subtype 1's region
    centres = np.stack([_centre(subject, 1) for subject in patients.itertuples()])
    assert np.abs(centres - nominal).max() <= 20.0 and np.linalg.norm(centres - nominal, axis=1).max() > 10.0
    assert len({tuple(c) for c in centres.round(3)}) == len(centres)
    world = (image.affine[:3, :3] @ np.indices(image.shape).reshape(3, -1) + image.affine[:3, 3:4])
    for centre, loss in zip(centres, deficit):
        weight = np.clip(loss.reshape(-1), 0.0, None)
        centroid = (world * weight).sum(1) / weight.sum()
        # The deficit's centre of mass sits on the recorded centre (GM is uneven: within 8 mm), not the nominal one.
        assert np.linalg.norm(centroid - centre) < 8.0
        assert np.linalg.norm(centroid - centre) < np.linalg.norm(centroid - nominal)


def test_foci_give_subtype_k_k_sites_at_a_kth_of_the_loss_and_every_subtype_the_same_mean_loss_per_site():
    config = SynthConfig(n_subjects=3000, subtypes=2, lesion_pattern="foci", lesion_pool=4, seed=1)
    truth = draw_latents(config)
    effects = truth[[f"lesion{r}_effect" for r in range(1, 5)]].to_numpy()
    for k in (1, 2):
        rows = truth.subtype.to_numpy() == k
        hit = effects[rows] > 0
        assert (hit.sum(1) == k).all()
        np.testing.assert_allclose(effects[rows][hit].reshape(-1, k).sum(1), truth.subtype_gm_loss[rows])
        # Each site's expected share of the patient's loss is 1/4 whatever the subtype: equal mean images.
        share = effects[rows] / truth.subtype_gm_loss[rows].to_numpy()[:, None]
        np.testing.assert_allclose(share.mean(0), 0.25, atol=0.03)
    assert (effects[truth.subtype.to_numpy() == 0] == 0).all()


def test_foci_plant_their_loss_at_the_recorded_sites_only(tmp_path):
    patients, image, deficit = _deficits(tmp_path, subtypes=2, subtype_effect=2.5, lesion_pattern="foci",
                                         lesion_pool=4)
    for subject, loss in zip(patients.itertuples(), deficit):
        at = [loss[_world_distance(image.affine, image.shape, _centre(subject, r)) <= 8.0].mean() for r in range(1, 5)]
        hit = [getattr(subject, f"lesion{r}_effect") > 0 for r in range(1, 5)]
        assert sum(hit) == subject.subtype
        assert min(a for a, h in zip(at, hit) if h) > 0.02 > max([a for a, h in zip(at, hit) if not h] or [0.0])


def test_shrinking_atrophy_takes_gm_volume_with_its_magnitude_and_keeps_the_gm_values(tmp_path):
    common = dict(n_subjects=12, subtypes=1, sites=1, resolution=4.0, deformation=0.0, age_effect=0.0, seed=3,
                  **STILL)
    shrunk = make_synthetic_cohort(tmp_path / "shrunk", SynthConfig(**common, atrophy="shrink", subtype_effect=2.5))
    intact = make_synthetic_cohort(tmp_path / "intact", SynthConfig(**common, atrophy="shrink", subtype_effect=0.0))
    truth = read_tsv(shrunk.parent / "ground_truth.tsv")
    patients = truth[truth.subtype == 1]
    assert (patients.subtype_gm_loss == 0).all()
    np.testing.assert_allclose(patients.lesion1_effect, patients.subtype_shrinkage)
    np.testing.assert_allclose(patients.subtype_shrinkage, 2.5 * 0.4 * patients.severity / 10.0)
    image = nib.load(shrunk.parent / "brain_mask.nii.gz")
    distance = _world_distance(image.affine, image.shape, (-26.0, -18.0, -16.0))
    core, near = distance <= 8.0, distance <= 12.0
    after, before = _images(shrunk.parent, patients.participant_id), _images(intact.parent, patients.participant_id)
    volume_ratio = after[:, core].sum(1) / before[:, core].sum(1)
    # The GM within 8 mm of the centre falls with the recorded magnitude (rank correlation): the structure shrinks.
    ranks = pd.Series(volume_ratio).rank().to_numpy(), patients.subtype_shrinkage.rank().to_numpy()
    assert np.corrcoef(*ranks)[0, 1] < -0.8 and volume_ratio.max() < 0.9
    # A warp moves tissue, it does not dim it: the region's highest GM values stay (an intensity loss scales them).
    np.testing.assert_allclose(np.percentile(after[:, near], 99, axis=1), np.percentile(before[:, near], 99, axis=1),
                               rtol=0.08)


def test_an_age_course_makes_subtype_1_lose_with_age_and_subtype_2_the_same_mean_loss_at_every_age():
    truth = draw_latents(SynthConfig(n_subjects=4000, lesion_course="age", seed=2))
    depth = 0.4 * truth.severity / 10.0
    one, two = truth.subtype == 1, truth.subtype == 2
    np.testing.assert_allclose(truth.subtype_gm_loss[one], depth[one] * (truth.age[one] - 20.0) / 30.0)
    np.testing.assert_allclose(truth.subtype_gm_loss[two], depth[two])
    # Both subtypes lose at the same site (pattern 1's region) and, on average, the same amount.
    assert list(truth.filter(like="_effect").columns) == ["lesion1_effect"]
    np.testing.assert_allclose(truth.lesion1_effect, truth.subtype_gm_loss)
    assert abs(truth.subtype_gm_loss[one].mean() - truth.subtype_gm_loss[two].mean()) < 0.01


def test_lesion_options_that_cannot_work_together_are_refused_by_name():
    for options, field in ((dict(lesion_pattern="foci", subtypes=3, lesion_pool=2), "foci"),
                           (dict(lesion_pattern="foci", subtypes=0), "foci"),
                           (dict(lesion_course="age", subtypes=3), "lesion_course=age"),
                           (dict(atrophy="shrink", lesion_space="subject"), "atrophy=shrink"),
                           (dict(lesion_jitter=50.0), "lesion_jitter=50.0")):
        with pytest.raises(ConfigError, match=field):
            SynthConfig.from_options(**options)


def test_a_cohort_without_the_lesion_options_keeps_its_ground_truth_columns():
    truth = draw_latents(SynthConfig(n_subjects=10, seed=0))
    assert not [column for column in truth.columns if column.startswith("lesion") or "shrinkage" in column]
