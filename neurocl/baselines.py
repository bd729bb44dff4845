"""Linear baselines on masked voxels: PCA, contrastive PCA (cPCA) and their two-space pair (lin2).

They answer "does a deep contrastive model find anything that a linear decomposition of the
voxels does not?". All are compared with the main method on the same probes (the pipeline's
``baselines: [pca, cpca, lin2]``; trained single-space encoders, SimCLR and y-Aware, come from
:mod:`neurocl.pipeline`). :class:`LinearTwoSpace` (``lin2``) is the linear floor of a two-space
method: a common space (PCA of the background subjects) and a salient space (cPCA), written as
``common_*`` / ``salient_*`` columns like SepCLR's, so every figure of a salient or common space
has a linear one beside it.

All work on high-dimensional voxel data without forming a voxel-by-voxel matrix: every
covariance they need has rank at most the number of subjects n, so they work in the row space of
the (n, V) data matrix through its (n, n) Gram matrix, in O(n² V) time and O(n V) memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from rich.progress import track
from sklearn.model_selection import StratifiedKFold

from neurocl.errors import ConfigError
from neurocl.harmonise import HarmoniseConfig, harmonise_voxels
from neurocl.logs import progress_console, transient_progress

# The baselines that are linear decompositions of the voxels (the floor every figure is set against).
LINEAR_BASELINES = ("pca", "cpca", "lin2", "combat")

# Eigenvalues below this fraction of the largest are numerical zeros of the Gram matrix.
_RANK_TOLERANCE = 1e-10


def _row_space(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis of the row space of ``data`` (n, V) and its singular values, via the Gram matrix.

    Returns
    -------
    basis : (V, r) with orthonormal columns, r = rank ; singular : (r,) decreasing.
    """
    gram = data @ data.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    keep = eigenvalues > _RANK_TOLERANCE * max(eigenvalues[0], np.finfo(float).tiny)
    singular = np.sqrt(eigenvalues[keep])
    return (data.T @ eigenvectors[:, keep]) / singular, singular


def _as_matrix(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ConfigError(f"{name}: expected a 2-D (n_samples, n_features) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ConfigError(f"{name}: contains NaN or infinite values")
    return X


def _check_components(n_components: int, available: int, what: str) -> None:
    if n_components > available:
        raise ConfigError(f"n_components={n_components}: the {what} has rank {available}; ask for at most {available}")


class PCABaseline:
    """Principal component analysis through the Gram matrix (exact, for n_samples << n_features).

    Parameters
    ----------
    n_components : int
        Components kept.

    Attributes
    ----------
    mean_ : (V,) training mean
    components_ : (k, V) orthonormal principal axes, by decreasing variance
    explained_variance_ : (k,) variance of the training data along each axis (divisor n - 1)
    """

    def __init__(self, n_components: int = 16) -> None:
        if n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {n_components}")
        self.n_components = n_components

    def fit(self, X, y=None) -> "PCABaseline":
        """Fit on X (n, V); ``y`` is ignored (sklearn convention)."""
        X = _as_matrix(X)
        self.mean_ = X.mean(axis=0)
        basis, singular = _row_space(X - self.mean_)
        _check_components(self.n_components, len(singular), "centred data")
        self.components_ = basis[:, : self.n_components].T
        self.explained_variance_ = singular[: self.n_components] ** 2 / max(len(X) - 1, 1)
        return self

    def transform(self, X) -> np.ndarray:
        """(n, k) coordinates of X on the principal axes."""
        return (_as_matrix(X) - self.mean_) @ self.components_.T

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X, y).transform(X)


class ContrastivePCA:
    r"""Contrastive PCA (Abid et al., 2018, Nat. Commun. 9:2134, https://doi.org/10.1038/s41467-018-04608-8).

    The components are the top eigenvectors of :math:`C_T - \alpha C_B`, where :math:`C_T` and
    :math:`C_B` are the covariances of the target and background subjects (each centred on its own
    mean): directions with more variance in targets than ``alpha`` times their variance in
    background subjects. Variation shared by both groups (age, site, head size) cancels; variation
    specific to targets remains.

    No V x V matrix is formed. With :math:`A = [X_T / \sqrt{n_T};\ X_B / \sqrt{n_B}]` (centred rows),
    :math:`C_T - \alpha C_B = A^\top D_\alpha A`, :math:`D_\alpha = \mathrm{diag}(+1 \ldots, -\alpha \ldots)`.
    With the row space of A, :math:`A = U S W^\top` (from the n x n Gram matrix), the non-zero
    eigenvectors are :math:`W e` where e are the eigenvectors of the r x r matrix
    :math:`S U^\top D_\alpha U S`; so every alpha costs one small eigendecomposition.

    **Choosing alpha automatically** (``alpha=None``): each alpha of the grid ``alphas`` is scored by
    K-fold cross-validation over subjects (both groups split into ``n_splits`` folds): the k
    components fitted on the training folds are scored on the held-out subjects by the *held-out
    contrast ratio* :math:`(t - b) / (t + b)`, with :math:`t = \mathrm{tr}(V^\top \hat C_T V)` and
    :math:`b = \mathrm{tr}(V^\top \hat C_B V)` the held-out target and background variance they
    capture. Components that follow variance shared by both groups add as much to b as to t (too
    small an alpha lowers the ratio), components fitted to the training subjects' own noise capture
    as little in one held-out group as in the other (too large an alpha lowers it too), and
    components that follow target-only variation raise it. ``alpha_`` is the grid value with the
    best mean ratio (the smallest on ties); ``alpha_scores_`` keeps every score.

    Parameters
    ----------
    n_components : int
        Components kept.
    alpha : float or None
        Contrast strength (>= 0); None chooses it automatically (above).
    alphas : sequence of float
        Grid searched when ``alpha`` is None (default 0 and 13 log-spaced values from 0.1 to 100).
    n_splits : int
        Folds of the automatic choice.
    random_state : int
        Seeds the folds.

    Attributes
    ----------
    components_ : (k, V) orthonormal ; eigenvalues_ : (k,) contrastive variance along each
    mean_ : (V,) mean of all training subjects (used by ``transform``)
    alpha_ : float ; alpha_scores_ : DataFrame[alpha, held_out_contrast] (the mean ratio; automatic choice only)
    """

    def __init__(self, n_components: int = 16, alpha: float | None = None, alphas: Sequence[float] | None = None,
                 n_splits: int = 3, random_state: int = 0) -> None:
        if n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {n_components}")
        if alpha is not None and not alpha >= 0:
            raise ConfigError(f"alpha must be >= 0 or None (automatic), got {alpha}")
        if n_splits < 2:
            raise ConfigError(f"n_splits must be >= 2, got {n_splits}")
        self.n_components = n_components
        self.alpha = alpha
        self.alphas = list(alphas) if alphas is not None else [0.0, *np.logspace(-1, 2, 13).tolist()]
        if any(not a >= 0 for a in self.alphas):
            raise ConfigError(f"alphas must all be >= 0, got {self.alphas}")
        self.n_splits = n_splits
        self.random_state = random_state

    def fit(self, X, y) -> "ContrastivePCA":
        """Fit on X (n, V) with ``y`` (n,): True (or 1) for target subjects, False (0) for background ones."""
        X = _as_matrix(X)
        is_target = self._targets(y, len(X))
        if self.alpha is None:
            self.alpha_scores_ = self._score_alphas(X, is_target)
            best = self.alpha_scores_["held_out_contrast"].to_numpy()
            self.alpha_ = float(self.alpha_scores_["alpha"].iloc[int(np.flatnonzero(best >= best.max() - 1e-12)[0])])
        else:
            self.alpha_ = float(self.alpha)
        basis, small = _contrast_problem(X, is_target)
        _check_components(self.n_components, small[0].shape[0], "stacked target/background data")
        self.components_, self.eigenvalues_ = _contrastive_axes(basis, small, self.alpha_, self.n_components)
        self.mean_ = X.mean(axis=0)
        return self

    def transform(self, X) -> np.ndarray:
        """(n, k) coordinates on the contrastive axes (X centred on the training mean)."""
        return (_as_matrix(X) - self.mean_) @ self.components_.T

    def fit_transform(self, X, y) -> np.ndarray:
        return self.fit(X, y).transform(X)

    @staticmethod
    def _targets(y, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n,):
            raise ConfigError(f"y: expected shape ({n},) (True for target subjects), got {y.shape}")
        is_target = y.astype(bool)
        for name, count in (("target", is_target.sum()), ("background", (~is_target).sum())):
            if count < 2:
                raise ConfigError(f"y: contrastive PCA needs >= 2 {name} subjects, got {count}")
        return is_target

    def _score_alphas(self, X: np.ndarray, is_target: np.ndarray) -> pd.DataFrame:
        n_splits = min(self.n_splits, int(is_target.sum()) // 2, int((~is_target).sum()) // 2)
        if n_splits < 2:
            raise ConfigError("alpha=None: too few subjects per group (need >= 4 of each) to choose alpha; give alpha")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        scores = np.zeros(len(self.alphas))
        for train, test in folds.split(X, is_target):
            basis, small = _contrast_problem(X[train], is_target[train])
            k = min(self.n_components, small[0].shape[0])
            held_out = [_centred(X[test][is_target[test] == group]) for group in (True, False)]
            for index, alpha in enumerate(self.alphas):
                axes, _ = _contrastive_axes(basis, small, alpha, k)
                target_var, background_var = (np.sum((rows @ axes.T) ** 2) / max(len(rows) - 1, 1) for rows in held_out)
                total = target_var + background_var
                scores[index] += (target_var - background_var) / total / n_splits if total > 0 else 0.0
        return pd.DataFrame({"alpha": self.alphas, "held_out_contrast": scores})


class LinearTwoSpace:
    """The linear two-space baseline (``lin2``): a common space and a salient space from two linear decompositions.

    * common: the top ``common_dim`` principal axes of the **background** subjects alone
      (:class:`PCABaseline`): the variation every subject has (age, site, head size), learnt where
      no target-only variation can enter it;
    * salient: the top ``salient_dim`` contrastive axes (:class:`ContrastivePCA`, target covariance
      minus alpha x background covariance) of every fitting subject, alpha chosen by cross-validation
      over those subjects (``alpha=None``) or given.

    It is what a two-space method must beat: ``transform`` returns both spaces side by side, so the
    same probes, separation and clustering apply to it as to SepCLR's ``common_*`` / ``salient_*``.

    Parameters
    ----------
    common_dim, salient_dim : int
        Dimensions of each space.
    alpha, alphas, n_splits, random_state :
        Those of :class:`ContrastivePCA` (the salient space's).

    Attributes
    ----------
    common_ : fitted :class:`PCABaseline` (background subjects only)
    salient_ : fitted :class:`ContrastivePCA`
    alpha_ : float, the salient space's contrast strength
    """

    def __init__(self, common_dim: int = 16, salient_dim: int = 4, alpha: float | None = None,
                 alphas: Sequence[float] | None = None, n_splits: int = 3, random_state: int = 0) -> None:
        self.common_dim = common_dim
        self.salient_dim = salient_dim
        self.alpha = alpha
        self.alphas = alphas
        self.n_splits = n_splits
        self.random_state = random_state

    def fit(self, X, y) -> "LinearTwoSpace":
        """Fit on X (n, V) with ``y`` (n,): True (or 1) for target subjects, False (0) for background ones."""
        for name in ("common_dim", "salient_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        X = _as_matrix(X)
        is_target = ContrastivePCA._targets(y, len(X))
        self.common_ = PCABaseline(self.common_dim).fit(X[~is_target])
        self.salient_ = ContrastivePCA(self.salient_dim, alpha=self.alpha, alphas=self.alphas, n_splits=self.n_splits,
                                       random_state=self.random_state).fit(X, is_target)
        self.alpha_ = self.salient_.alpha_
        return self

    def transform(self, X) -> np.ndarray:
        """(n, common_dim + salient_dim): the common coordinates, then the salient ones."""
        return np.hstack([self.common_.transform(X), self.salient_.transform(X)])

    def fit_transform(self, X, y) -> np.ndarray:
        return self.fit(X, y).transform(X)


def _centred(rows: np.ndarray) -> np.ndarray:
    return rows - rows.mean(axis=0)


def _contrast_problem(X: np.ndarray, is_target: np.ndarray):
    """Row-space basis W (V, r) of the stacked, scaled, group-centred data, and the pieces of S U^T D U S.

    Returns
    -------
    basis : (V, r) ; (target_part, background_part) : two (r, r) matrices with
    S U^T D_alpha U S = target_part - alpha * background_part.
    """
    target, background = _centred(X[is_target]), _centred(X[~is_target])
    stacked = np.vstack([target / np.sqrt(len(target) - 1), background / np.sqrt(len(background) - 1)])
    basis, _ = _row_space(stacked)
    coordinates = stacked @ basis  # (n, r) = U S
    n_target = len(target)
    target_part = coordinates[:n_target].T @ coordinates[:n_target]
    background_part = coordinates[n_target:].T @ coordinates[n_target:]
    return basis, (target_part, background_part)


def _contrastive_axes(basis, small, alpha: float, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    target_part, background_part = small
    eigenvalues, eigenvectors = np.linalg.eigh(target_part - alpha * background_part)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    axes = (basis @ eigenvectors[:, order]).T
    # A sign convention, so that reruns and folds agree: the largest-magnitude loading is positive.
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    return axes * signs[:, None], eigenvalues[order]


def masked_voxels(store, rows: np.ndarray, progress: bool = False) -> np.ndarray:
    """(len(rows), n_mask_voxels) float64 matrix of the store's masked volumes, read in chunks."""

    mask = np.asarray(store.mask, dtype=bool)
    out = np.empty((len(rows), int(mask.sum())), dtype=np.float64)
    chunk = 64
    starts = range(0, len(rows), chunk)
    for start in track(starts, description="reading voxels", disable=not transient_progress(progress), transient=True,
                       console=progress_console()):
        block = np.asarray(store.volumes[rows[start:start + chunk]], dtype=np.float64)[:, 0]
        out[start:start + chunk] = block[:, mask]
    return out


def voxel_embeddings(store, cohort, method: str = "pca", n_components: int = 16, splits=None,
                     alpha: float | None = None, seed: int = 0, progress: bool = False,
                     site: str = "site", protect: Sequence[str] = (), common_dim: int = 16,
                     salient_dim: int = 4) -> pd.DataFrame:
    """PCA, cPCA or lin2 of the masked voxels of every cohort row, or PCA after ComBat, as an embeddings table.

    Parameters
    ----------
    store : VolumeStore
        The cohort's preprocessed volumes (the same as the main method's).
    cohort : Cohort
    method : "pca", "cpca", "lin2" or "combat"
        ``lin2``: :class:`LinearTwoSpace`, its common PCA fitted on the background subjects among
        those the decomposition is fitted on. ``combat``: the voxels are ComBat-harmonised over
        ``site`` (fitted on the background subjects among those PCA is fitted on, protecting
        ``protect``; :mod:`neurocl.harmonise`), then PCA: the classic harmonise-then-decompose
        pipeline the trained spaces are compared with.
    n_components : int
        Components of ``pca``, ``cpca`` and ``combat``.
    splits : Splits or None
        With a holdout manifest, the decomposition is fitted on the ``train`` subjects only and
        applied to everyone (cPCA uses the group labels, so fitting it on test subjects would leak
        them into a later probe of ``group``; alpha is chosen by cross-validation over the same
        train subjects). Without one (or with k-fold folds), on every subject with a group.
    alpha : float or None
        cPCA's (and lin2's salient) alpha (None: automatic, see :class:`ContrastivePCA`).
    common_dim, salient_dim : int
        ``lin2``: dimensions of its two spaces.

    Returns
    -------
    DataFrame
        embeddings.tsv format: ``participant_id``, [``session_id``], ``split``, ``group``, then
        ``emb_0 ... emb_{k-1}`` (single-space), or ``common_*`` and ``salient_*`` (``lin2``).
    """
    if method not in ("pca", "cpca", "lin2", "combat"):
        raise ConfigError(f"method must be 'pca', 'cpca', 'lin2' or 'combat', got {method!r}")
    voxels = masked_voxels(store, store.rows_for(cohort), progress=progress)
    group = cohort.table["group"]
    fit_rows = group.notna().to_numpy().copy()
    split = np.full(len(cohort), np.nan, dtype=object)
    if splits is not None and splits.column == "split":
        for name in ("train", "val", "test"):
            split[splits.rows(cohort, name)] = name
        fit_rows &= split == "train"
    is_target = group[fit_rows].eq("target").to_numpy()
    if method == "combat":
        background = fit_rows & group.eq("background").to_numpy()
        voxels = harmonise_voxels(voxels, cohort, background, HarmoniseConfig(site=site, protect=list(protect)))
    if method in ("pca", "combat"):
        estimator = PCABaseline(n_components).fit(voxels[fit_rows])
        columns = [f"emb_{i}" for i in range(n_components)]
    elif method == "cpca":
        estimator = ContrastivePCA(n_components, alpha=alpha, random_state=seed).fit(voxels[fit_rows], is_target)
        columns = [f"emb_{i}" for i in range(n_components)]
    else:
        estimator = LinearTwoSpace(common_dim, salient_dim, alpha=alpha, random_state=seed)
        estimator.fit(voxels[fit_rows], is_target)
        columns = [f"common_{i}" for i in range(common_dim)] + [f"salient_{i}" for i in range(salient_dim)]
    coordinates = estimator.transform(voxels)
    table = cohort.keys().reset_index(drop=True)
    table["split"] = split
    table["group"] = group.to_numpy()
    return pd.concat([table, pd.DataFrame(coordinates, columns=columns)], axis=1)
