"""Voxelwise significance of a trained network's map against a null network's map of the same subjects.

A map can look right without any learning: gradient x input of a randomly initialised network
already follows anatomy and the subject's departure from the reference (the (x − x₀) factor).
The question a map must answer is therefore not "is this voxel's relevance non-zero" but "does
the trained network put more of its relevance here than a network that learned nothing does".
"""

from __future__ import annotations

import numpy as np

from neurocl.errors import ConfigError
from neurocl.maps.subtypes import fdr_bh


def relevance_shares(maps: np.ndarray) -> np.ndarray:
    """Each subject's |map| divided by its total over the voxels given: where its relevance goes.

    Two networks' gradients have unrelated scales, so their raw maps cannot be compared voxel by
    voxel; shares can (each row sums to 1). A subject whose map is 0 everywhere keeps zeros.

    Parameters
    ----------
    maps : np.ndarray
        (n_subjects, n_voxels) signed or unsigned attributions.
    """
    magnitude = np.abs(np.asarray(maps, dtype=np.float64))
    totals = magnitude.sum(1, keepdims=True)
    return np.divide(magnitude, totals, out=np.zeros_like(magnitude), where=totals > 0)


def paired_sign_flip_test(
    trained: np.ndarray,
    null: np.ndarray,
    n_permutations: int = 1000,
    correction: str = "fwe",
    seed: int = 0,
    chunk: int = 64,
) -> dict:
    """One-sided paired permutation test, voxel by voxel, that ``trained`` exceeds ``null``.

    For subject i and voxel v, d_i(v) = trained_i(v) − null_i(v); the statistic is the one-sample
    t of d over subjects, t(v) = mean_i d_i(v) / (sd_i d_i(v) / √n). Under the null hypothesis
    that the two maps are exchangeable within each subject, the sign of each subject's d_i is
    arbitrary: flipping signs at random (the same flips for every voxel, which keeps the spatial
    correlation of the maps) gives the null distribution (Nichols & Holmes, 2002).

    * ``"fwe"``: family-wise error over all voxels from the maximum statistic,
      p(v) = (1 + #{max_u t*(u) ≥ t(v)}) / (1 + P);
    * ``"fdr"``: uncorrected p(v) from the flips of all voxels pooled,
      p(v) = (1 + #{(u, flip): t*(u) ≥ t(v)}) / (1 + P·V), then Benjamini-Hochberg. The t
      statistic has the same null distribution at every voxel, so pooling is valid, and it is
      what makes FDR usable: a voxel's own P flips cannot give a p-value below 1 / (1 + P),
      which Benjamini-Hochberg over V voxels would rarely accept.

    Parameters
    ----------
    trained, null : np.ndarray
        (n_subjects, n_voxels), the same subjects in the same order (e.g. :func:`relevance_shares`).
    n_permutations : int
        Random sign flips P (the smallest p-value is 1 / (1 + P)).
    correction : {"fwe", "fdr"}
    seed : int
        Seed of the flips.
    chunk : int
        Flips evaluated together (memory: chunk × n_voxels floats).

    Returns
    -------
    dict
        t (n_voxels,), p (n_voxels,) corrected p-values, correction, n_permutations, n_subjects.
    """
    trained, null = np.asarray(trained, dtype=np.float64), np.asarray(null, dtype=np.float64)
    if trained.shape != null.shape or trained.ndim != 2:
        raise ConfigError(f"paired_sign_flip_test: need two (subjects, voxels) arrays of one shape, got {trained.shape} and {null.shape}")
    if correction not in ("fwe", "fdr"):
        raise ConfigError(f"correction = {correction!r}: must be 'fwe' or 'fdr'")
    n = len(trained)
    if n < 3 or n_permutations < 1:
        raise ConfigError(f"paired_sign_flip_test: need at least 3 subjects and 1 permutation (got {n}, {n_permutations})")
    difference = trained - null
    sum_squares = (difference**2).sum(0)

    def t_statistics(signs: np.ndarray) -> np.ndarray:
        # Flipping signs leaves Σd² unchanged, so each flip costs one matrix product.
        means = signs @ difference / n
        variance = np.maximum((sum_squares - n * means**2) / (n - 1), 0.0)
        return np.divide(means, np.sqrt(variance / n), out=np.zeros_like(means), where=variance > 0)

    observed = t_statistics(np.ones((1, n)))[0]
    rng = np.random.default_rng(seed)
    exceed = np.zeros(observed.shape)
    maxima = []
    for first in range(0, n_permutations, chunk):
        signs = rng.choice([-1.0, 1.0], size=(min(chunk, n_permutations - first), n))
        flipped = t_statistics(signs)
        if correction == "fwe":
            maxima.append(flipped.max(1))
        else:
            pooled = np.sort(flipped, axis=None)
            exceed += len(pooled) - np.searchsorted(pooled, observed, side="left")
    if correction == "fwe":
        maxima = np.sort(np.concatenate(maxima))
        exceed = len(maxima) - np.searchsorted(maxima, observed, side="left")
        p = (1 + exceed) / (1 + n_permutations)
    else:
        p = fdr_bh((1 + exceed) / (1 + n_permutations * difference.shape[1]))
    return {"t": observed, "p": p, "correction": correction, "n_permutations": n_permutations, "n_subjects": n}
