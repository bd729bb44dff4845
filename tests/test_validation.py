"""Validation suites (issue #8): metrics against plain reference computations, reduced experiments
against recovery thresholds that an untrained or broken implementation fails, and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.errors import ConfigError
from neurocl.validation._core import random_mlp
from neurocl.validation.gmm import GMMConfig, run_gmm
from neurocl.validation.identifiability import IdentifiabilityConfig, run_identifiability, sample_positives
from neurocl.validation.metrics import fisher_eigenvalues, fisher_subspace, linear_r2, mcc, pca_subspace, principal_angles_deg
from neurocl.validation.vector import VectorConfig, run_vector

# ---------------------------------------------------------------- metrics


def test_mcc_matches_brute_force_over_permutations():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(500, 3))
    representation = latents[:, [2, 0, 1]] @ np.diag([1.0, -2.0, 0.5]) + rng.normal(size=(500, 3))
    reference = max(
        np.mean([abs(np.corrcoef(latents[:, k], representation[:, order[k]])[0, 1]) for k in range(3)])
        for order in itertools.permutations(range(3))
    )
    value, per_latent = mcc(latents, representation)
    assert value == pytest.approx(reference, abs=1e-12)
    assert per_latent.shape == (3,)


def test_mcc_is_one_for_permuted_scaled_and_flipped_latents():
    latents = np.random.default_rng(1).uniform(size=(200, 4))
    assert mcc(latents, -3.0 * latents[:, [3, 1, 0, 2]] + 7.0)[0] == pytest.approx(1.0)


def test_mcc_rejects_fewer_dimensions_than_latents():
    with pytest.raises(ConfigError, match="at least as many"):
        mcc(np.zeros((10, 3)) + np.arange(3), np.random.default_rng(0).normal(size=(10, 2)))


def test_linear_r2_is_one_for_a_linear_map_and_near_zero_for_noise():
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(2000, 2))
    mixing = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    assert linear_r2(latents[:1000] @ mixing, latents[:1000], latents[1000:] @ mixing, latents[1000:]) == \
        pytest.approx([1.0, 1.0])
    noise = rng.normal(size=(2000, 3))
    assert np.abs(linear_r2(noise[:1000], latents[:1000], noise[1000:], latents[1000:])).max() < 0.02


def test_principal_angles_of_two_lines_are_their_angle():
    angle = np.radians(30.0)
    line_a = np.array([[1.0], [0.0], [0.0]])
    line_b = np.array([[np.cos(angle)], [np.sin(angle)], [0.0]])
    assert principal_angles_deg(line_a, 5.0 * line_b) == pytest.approx([30.0])


def test_fisher_subspace_of_two_components_is_the_whitened_mean_difference():
    covariance = np.array([[4.0, 1.0], [1.0, 1.0]])
    means = np.array([[1.0, 0.0], [-1.0, 0.0]])
    expected = np.linalg.solve(covariance, means[0] - means[1])
    fisher = fisher_subspace(means, np.array([0.5, 0.5]), covariance)
    assert principal_angles_deg(fisher, expected[:, None]) == pytest.approx([0.0], abs=1e-6)
    # S_B = ΔΔᵀ/4 for two equal components, so λ = Δᵀ Σ⁻¹ Δ / 4.
    difference = means[0] - means[1]
    assert fisher_eigenvalues(means, np.array([0.5, 0.5]), covariance) == \
        pytest.approx([difference @ np.linalg.solve(covariance, difference) / 4])


def test_pca_subspace_is_the_axis_of_largest_variance():
    samples = np.random.default_rng(3).normal(size=(5000, 3)) * np.array([0.5, 5.0, 1.0])
    assert principal_angles_deg(pca_subspace(samples, 1), np.array([[0.0], [1.0], [0.0]]))[0] < 2.0


# ---------------------------------------------------------------- generative process


def test_random_mlp_is_invertible_layer_by_layer():
    network = random_mlp([5, 5, 5, 5], np.random.default_rng(0), negative_slope=0.2, pool_size=50)
    latents = torch.rand(100, 5, dtype=torch.float64)
    observed = network.double()(latents)
    recovered = observed
    linears = [layer for layer in network if isinstance(layer, torch.nn.Linear)]
    for index, linear in enumerate(reversed(linears)):
        recovered = torch.linalg.solve(linear.weight, recovered.T).T
        if index < len(linears) - 1:  # undo the leaky ReLU that precedes this layer
            recovered = torch.where(recovered >= 0, recovered, recovered / 0.2)
    assert torch.allclose(recovered, latents, atol=1e-8)


def test_box_positives_stay_in_the_box_with_the_laplace_scale():
    generator = torch.Generator().manual_seed(0)
    latents = torch.full((20000, 2), 0.5)
    positives = sample_positives("box", latents, "laplace", 0.05, generator)
    assert positives.min() >= 0 and positives.max() <= 1
    # Far from the walls truncation is negligible: E|z̃ − z| equals the Laplace scale b.
    assert (positives - latents).abs().mean().item() == pytest.approx(0.05, rel=0.05)
    edge = sample_positives("box", torch.zeros(1000, 2), "normal", 0.1, generator)
    assert edge.min() >= 0 and edge.max() <= 1


def test_sphere_positives_are_unit_vectors_near_their_anchor():
    generator = torch.Generator().manual_seed(0)
    latents = torch.nn.functional.normalize(torch.randn(1000, 4, generator=generator), dim=1)
    positives = sample_positives("sphere", latents, "normal", 0.1, generator)
    assert torch.allclose(positives.norm(dim=1), torch.ones(1000), atol=1e-5)
    assert (positives * latents).sum(1).mean() > 0.95


# ---------------------------------------------------------------- reduced experiments (trained once each)


@pytest.fixture(scope="module")
def box_result():
    config = IdentifiabilityConfig.preset("box", quick=True, steps=250, batch_size=128, n_eval=1024)
    return run_identifiability(config, progress=False)


@pytest.fixture(scope="module")
def sphere_result():
    config = IdentifiabilityConfig.preset("sphere", quick=True, steps=250, batch_size=128, n_eval=1024)
    return run_identifiability(config, progress=False)


def test_box_encoder_recovers_each_latent_where_untrained_does_not(box_result):
    assert box_result.mcc > 0.9, box_result
    assert box_result.untrained_mcc < box_result.mcc - 0.15
    assert box_result.mixing_mcc < box_result.mcc - 0.15
    assert box_result.r2 > 0.9


def test_sphere_encoder_recovers_latents_linearly(sphere_result):
    assert sphere_result.r2 > 0.85, sphere_result
    assert sphere_result.untrained_r2 < sphere_result.r2 - 0.15
    assert sphere_result.mixing_r2 < sphere_result.r2 - 0.15


def test_identifiability_is_reproducible_from_its_seed(box_result):
    again = run_identifiability(box_result.config.model_copy(update={"steps": 20}), progress=False)
    twice = run_identifiability(box_result.config.model_copy(update={"steps": 20}), progress=False)
    assert again.mcc == twice.mcc and again.final_loss == twice.final_loss


@pytest.fixture(scope="module")
def gmm_result():
    return run_gmm(GMMConfig.preset(quick=True, steps=200, lr=3e-2, n_samples=4000), progress=False)


def test_infonce_subspace_is_near_fisher_where_pca_is_not(gmm_result):
    infonce, pca = gmm_result.mean_angle("InfoNCE"), gmm_result.mean_angle("PCA")
    assert infonce < 30.0, gmm_result.angles
    assert pca > 60.0 and pca > infonce + 30.0
    assert gmm_result.mean_angle("LDA (labels)") < 10.0


@pytest.fixture(scope="module")
def vector_result():
    return run_vector(VectorConfig.preset(quick=True, steps=300, n_eval=1024, n_baseline=300), progress=False)


def test_sepclr_common_space_recovers_common_and_not_salient_latents(vector_result):
    assert vector_result.mean_r2("SepCLR common", "common") > 0.6, vector_result.r2
    assert vector_result.mean_r2("SepCLR common", "salient") < 0.35


def test_sepclr_salient_space_holds_salient_latents_and_maps_background_to_null(vector_result):
    salient = vector_result.mean_r2("SepCLR salient", "salient")
    assert salient > vector_result.mean_r2("SepCLR common", "salient") + 0.1, vector_result.r2
    assert vector_result.background_salient_norm < 0.1 * vector_result.target_salient_norm
    assert set(vector_result.r2) == {"SepCLR common", "SepCLR salient", "cPCA", "observations"}
    assert all(len(values) == 5 for values in vector_result.r2.values())


# ---------------------------------------------------------------- configuration and CLI


def test_presets_report_bad_settings_as_config_errors():
    with pytest.raises(ConfigError, match="n_components - 1"):
        GMMConfig.preset(quick=True, dim=2, n_components=5)
    with pytest.raises(ConfigError, match="steps"):
        IdentifiabilityConfig.preset("box", steps=0)
    with pytest.raises(ConfigError, match="obs_dim"):
        VectorConfig.preset(quick=True, obs_dim=3)


def test_bench_gmm_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results" / "gmm.json"
    result = CliRunner().invoke(app, ["bench", "gmm", "--quick", "--steps", "30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Fisher" in result.output and "PCA" in result.output
    record = json.loads(out.read_text())
    assert record["suite"] == "gmm"
    assert set(record["results"][0]["mean_angle"]) == {"InfoNCE", "PCA", "LDA (labels)"}
    assert len(record["results"][0]["fisher_eigenvalues"]) == 2


def test_bench_identifiability_rejects_an_unknown_space():
    result = CliRunner().invoke(app, ["bench", "identifiability", "--space", "cube"])
    assert result.exit_code == 1
    assert "--space 'cube'" in result.output
