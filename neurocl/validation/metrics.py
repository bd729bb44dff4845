"""Recovery metrics: how well a learned representation recovers known latents or subspaces.

* :func:`mcc`: mean correlation coefficient after the best one-to-one matching of dimensions
  (Hyvärinen & Morioka, 2016; Zimmermann et al., 2021). 1 means recovery up to permutation,
  sign and scale of each latent.
* :func:`linear_r2`: R² of each true latent from a linear regression on the representation,
  fitted and scored on separate samples. 1 means recovery up to an invertible linear map.
* :func:`principal_angles_deg`, :func:`fisher_subspace`, :func:`pca_subspace`: the angles between
  two subspaces, and the two reference subspaces of a Gaussian mixture.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh, subspace_angles
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LinearRegression

from neurocl.errors import ConfigError


def _as_2d(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ConfigError(f"{name} must be (n_samples, n_dims); got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ConfigError(f"{name} holds non-finite values")
    return array


def correlation_matrix(latents, representation) -> np.ndarray:
    """Pearson correlation of every latent (rows) with every representation dimension (columns).

    Parameters
    ----------
    latents : array (N, K)
    representation : array (N, D)

    Returns
    -------
    array (K, D); a constant column correlates 0 with everything (instead of NaN).
    """
    latents = _as_2d("latents", latents)
    representation = _as_2d("representation", representation)
    if len(latents) != len(representation):
        raise ConfigError(f"latents have {len(latents)} samples but the representation has {len(representation)}")
    centred_latents = latents - latents.mean(0)
    centred_rep = representation - representation.mean(0)
    norms = np.outer(np.linalg.norm(centred_latents, axis=0), np.linalg.norm(centred_rep, axis=0))
    products = centred_latents.T @ centred_rep
    return np.divide(products, norms, out=np.zeros_like(products), where=norms > 0)


def mcc(latents, representation) -> tuple[float, np.ndarray]:
    """Mean absolute Pearson correlation after optimal matching of latents to dimensions.

    MCC = (1/K) Σ_k |ρ(z_k, h_π(k))|, with π the one-to-one assignment maximising the sum
    (Hungarian algorithm on the |ρ| matrix). Requires D ≥ K.

    Parameters
    ----------
    latents : array (N, K) true latents.
    representation : array (N, D) learned representation of the same samples.

    Returns
    -------
    (mcc, per_latent) : the mean, and the matched |ρ| of each latent (K,).
    """
    correlations = np.abs(correlation_matrix(latents, representation))
    if correlations.shape[1] < correlations.shape[0]:
        raise ConfigError(
            f"MCC needs at least as many representation dimensions as latents; "
            f"got {correlations.shape[1]} dimensions for {correlations.shape[0]} latents"
        )
    rows, cols = linear_sum_assignment(correlations, maximize=True)
    per_latent = np.empty(correlations.shape[0])
    per_latent[rows] = correlations[rows, cols]
    return float(per_latent.mean()), per_latent


def linear_r2(fit_representation, fit_latents, test_representation, test_latents) -> np.ndarray:
    """R² of each latent predicted linearly (with intercept) from the representation.

    The regression z ≈ W h + b is fitted by least squares on one set of samples and scored on
    another, R²_k = 1 − Σ(z_k − ẑ_k)² / Σ(z_k − mean z_k)² over the test samples, so that a
    high-dimensional representation cannot score by memorising.

    Parameters
    ----------
    fit_representation, test_representation : arrays (N_fit, D), (N_test, D)
    fit_latents, test_latents : arrays (N_fit, K), (N_test, K)

    Returns
    -------
    array (K,) of R² (can be negative when the prediction is worse than the mean).
    """
    fit_representation = _as_2d("fit_representation", fit_representation)
    test_representation = _as_2d("test_representation", test_representation)
    fit_latents = _as_2d("fit_latents", fit_latents)
    test_latents = _as_2d("test_latents", test_latents)
    prediction = LinearRegression().fit(fit_representation, fit_latents).predict(test_representation)
    residual = ((test_latents - prediction) ** 2).sum(0)
    total = ((test_latents - test_latents.mean(0)) ** 2).sum(0)
    if (total <= 0).any():
        raise ConfigError(f"latent(s) {np.flatnonzero(total <= 0).tolist()} are constant on the test samples")
    return 1.0 - residual / total


def principal_angles_deg(basis_a, basis_b) -> np.ndarray:
    """Principal angles (degrees, largest first) between the column spaces of two matrices.

    Parameters
    ----------
    basis_a : array (d, k_a); basis_b : array (d, k_b). Columns need not be orthonormal.
    """
    return np.degrees(subspace_angles(np.asarray(basis_a, float), np.asarray(basis_b, float)))


def fisher_subspace(means, weights, within_covariance) -> np.ndarray:
    """Fisher (LDA) subspace of a Gaussian mixture with a shared covariance.

    The top K − 1 generalised eigenvectors of S_B v = λ S_W v, with the between-class scatter
    S_B = Σ_k π_k (μ_k − μ̄)(μ_k − μ̄)ᵀ, μ̄ = Σ_k π_k μ_k, and S_W the shared within-class covariance.
    It equals span{S_W⁻¹(μ_k − μ̄)}: the directions that best separate the components relative to
    the noise, whatever the noise's scale along them.

    Parameters
    ----------
    means : array (K, d); weights : array (K,) summing to 1; within_covariance : array (d, d).

    Returns
    -------
    array (d, K − 1), columns ordered by decreasing λ.
    """
    return _fisher_eigenproblem(means, weights, within_covariance)[1]


def fisher_eigenvalues(means, weights, within_covariance) -> np.ndarray:
    """The K − 1 largest λ of S_B v = λ S_W v (see :func:`fisher_subspace`), decreasing.

    λ is the between-component variance along a Fisher direction relative to the noise along it:
    how separable the mixture is in that direction.
    """
    return _fisher_eigenproblem(means, weights, within_covariance)[0]


def _fisher_eigenproblem(means, weights, within_covariance) -> tuple[np.ndarray, np.ndarray]:
    means = np.asarray(means, float)
    weights = np.asarray(weights, float)
    centred = means - weights @ means
    between = (centred * weights[:, None]).T @ centred
    eigenvalues, eigenvectors = eigh(between, np.asarray(within_covariance, float))
    order = np.argsort(eigenvalues)[::-1][: len(means) - 1]
    return eigenvalues[order], eigenvectors[:, order]


def pca_subspace(samples, n_components: int) -> np.ndarray:
    """Top ``n_components`` principal directions of ``samples`` (N, d) as columns (d, n_components)."""
    samples = _as_2d("samples", samples)
    _, _, right = np.linalg.svd(samples - samples.mean(0), full_matrices=False)
    return right[:n_components].T
