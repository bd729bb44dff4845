"""Patient subtypes: clustering in salient space with model selection and bootstrap stability,
and association of the clusters with clinical attributes."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, f_oneway, false_discovery_control, kruskal
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture

from neurocl.errors import ConfigError

# Below this mean bootstrap ARI the report cautions that the subtypes hinge on a few subjects
# (docs/maps.md quotes it; a test keeps the two equal).
STABILITY_CAUTION = 0.6


class SubtypeClustering:
    """Cluster subjects into subtypes, choosing the number of clusters over a range that may include "none".

    For every k ≥ 2 in ``k_range`` the subjects are clustered (k-means or a Gaussian mixture)
    and scored by the silhouette of the partition (Rousseeuw, 1987; higher is better) and the
    Bayesian information criterion of a Gaussian mixture with k components,
    BIC = −2 log L + p log n (Schwarz, 1978; lower is better). ``criterion`` picks k.

    k = 1 (no subtypes) is in the range when ``k_min`` is 1. The silhouette cannot score one
    cluster, so with that criterion k = 1 is decided first by :func:`one_cluster_test`, a gap
    test against one cluster (Tibshirani, Walther & Hastie, 2001): k ≥ 2 is considered only
    when some partition of the leading principal components shrinks the within-cluster
    dispersion more than partitions of reference data with the same covariance do, at level
    ``alpha``. The default reference is a Gaussian (one cluster of subjects); ``reference =
    "uniform"`` is the most clusterable unimodal shape, which keeps a flat continuum (a severity
    axis) at k = 1 but needs clusters twice as far apart to find them (measured rates in
    docs/maps.md). With ``criterion = "bic"`` the BIC ranks k = 1 with the others, and the gap
    test is reported beside it.

    Stability (Lange et al., 2004) is the mean adjusted Rand index between the full solution
    and solutions fitted on bootstrap resamples (and applied to all subjects): near 1 means the
    subtypes do not hinge on a few subjects. It is not defined for k = 1 (NaN).

    Parameters
    ----------
    k_range : tuple of int
        Inclusive (k_min, k_max).
    method : {"kmeans", "gmm"}
        Clustering algorithm.
    criterion : {"silhouette", "bic"}
        Selection rule for k.
    covariance_type : str
        Gaussian mixture covariance ("diag" suits few subjects in many dimensions).
    n_bootstrap : int
        Bootstrap resamples for stability (0: skip).
    n_reference : int
        Reference data sets of the one-cluster gap test (when k_min is 1).
    alpha : float
        Level of the one-cluster gap test (over all the k ≥ 2 tried at once).
    reference : {"gaussian", "uniform"}
        Shape of the gap test's reference data (:func:`one_cluster_test`).
    n_components : int
        Principal components the gap test looks at.
    n_init : int
        Restarts of each fit.
    random_state : int
        Seed: same data, same seed, same result.

    Attributes
    ----------
    labels_ : np.ndarray
        (n,) cluster of each subject, 0..k-1, numbered by decreasing size.
    n_clusters_ : int
    scores_ : pd.DataFrame
        k, silhouette, bic for every k tried (and gap, gap_z when k_min is 1).
    null_test_ : dict or None
        The one-cluster gap test (:func:`one_cluster_test`) when k_min is 1, else None.
    stability_ : float
        Mean bootstrap ARI (NaN without bootstrap, and for k = 1).
    stability_ci_ : tuple of float
        2.5 and 97.5 percentiles of the bootstrap ARI.
    estimator_ : fitted sklearn estimator at the chosen k.
    """

    def __init__(
        self,
        k_range: tuple[int, int] = (2, 6),
        method: str = "kmeans",
        criterion: str = "silhouette",
        covariance_type: str = "diag",
        n_bootstrap: int = 100,
        n_init: int = 10,
        random_state: int = 0,
        n_reference: int = 50,
        alpha: float = 0.05,
        reference: str = "gaussian",
        n_components: int = 2,
    ):
        self.k_range = k_range
        self.method = method
        self.criterion = criterion
        self.covariance_type = covariance_type
        self.n_bootstrap = n_bootstrap
        self.n_init = n_init
        self.random_state = random_state
        self.n_reference = n_reference
        self.alpha = alpha
        self.reference = reference
        self.n_components = n_components

    def _check_params(self, n_samples: int) -> tuple[int, int]:
        if self.method not in ("kmeans", "gmm"):
            raise ConfigError(f"method = {self.method!r}: must be 'kmeans' or 'gmm'")
        if self.criterion not in ("silhouette", "bic"):
            raise ConfigError(f"criterion = {self.criterion!r}: must be 'silhouette' or 'bic'")
        k_min, k_max = (int(k) for k in self.k_range)
        if not 1 <= k_min <= k_max or k_max >= n_samples or (k_min == 1 and k_max < 2 and self.criterion == "silhouette"):
            raise ConfigError(
                f"k_range = {tuple(self.k_range)}: need 1 <= k_min <= k_max < number of subjects ({n_samples}), "
                "and k_max >= 2 with the silhouette"
            )
        if not 0 < self.alpha < 1 or self.n_reference < 1:
            raise ConfigError(f"alpha = {self.alpha}, n_reference = {self.n_reference}: need 0 < alpha < 1 and n_reference >= 1")
        return k_min, k_max

    def _estimator(self, k: int, seed: int):
        if self.method == "kmeans":
            return KMeans(n_clusters=k, n_init=self.n_init, random_state=seed)
        return GaussianMixture(k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=seed)

    def fit(self, X, y=None) -> "SubtypeClustering":
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ConfigError(f"X: need a finite (subjects, features) array, got shape {X.shape}")
        k_min, k_max = self._check_params(len(X))
        rows, fits = [], {}
        for k in range(k_min, k_max + 1):
            estimator = self._estimator(k, self.random_state).fit(X)
            labels = estimator.predict(X)
            silhouette = silhouette_score(X, labels) if 1 < len(np.unique(labels)) < len(X) else np.nan
            mixture = estimator if self.method == "gmm" else GaussianMixture(
                k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=self.random_state
            ).fit(X)
            rows.append({"k": k, "silhouette": silhouette, "bic": mixture.bic(X)})
            fits[k] = estimator
        self.scores_ = pd.DataFrame(rows)
        self.null_test_ = None
        if k_min == 1:
            self.null_test_ = one_cluster_test(X, k_max, self.n_reference, self.alpha, self.n_init, self.random_state,
                                               self.reference, self.n_components)
            self.scores_["gap"] = self.null_test_["gap"]
            self.scores_["gap_z"] = [np.nan] + self.null_test_["z"]
        if self.criterion == "bic":
            best = self.scores_["bic"].idxmin()
        elif self.null_test_ is not None and not self.null_test_["reject"]:
            best = 0  # k = 1: no partition beats unimodal data
        else:
            best = self.scores_["silhouette"].fillna(-np.inf).idxmax()
        self.n_clusters_ = int(self.scores_["k"].iloc[best])
        self.estimator_ = fits[self.n_clusters_]
        raw = self.estimator_.predict(X)
        # Number clusters by decreasing size so cluster 1 in the outputs is the largest subtype.
        sizes = np.bincount(raw, minlength=self.n_clusters_)
        self._relabel = np.empty(self.n_clusters_, dtype=int)
        self._relabel[np.argsort(-sizes, kind="stable")] = np.arange(self.n_clusters_)
        self.labels_ = self._relabel[raw]

        rng = np.random.default_rng(self.random_state)
        aris = []
        # One cluster has nothing to agree on: ARI would be 1 by construction, so stability stays NaN.
        for b in range(self.n_bootstrap if self.n_clusters_ > 1 else 0):
            sample = rng.choice(len(X), size=len(X), replace=True)
            resampled = self._estimator(self.n_clusters_, self.random_state + 1 + b).fit(X[sample])
            aris.append(adjusted_rand_score(self.labels_, resampled.predict(X)))
        self.bootstrap_ari_ = np.asarray(aris)
        self.stability_ = float(np.mean(aris)) if aris else float("nan")
        self.stability_ci_ = tuple(np.percentile(aris, [2.5, 97.5]).tolist()) if aris else (np.nan, np.nan)
        return self

    def predict(self, X) -> np.ndarray:
        """Cluster (0..k-1, same numbering as ``labels_``) of new subjects."""
        return self._relabel[self.estimator_.predict(np.asarray(X, dtype=np.float64))]

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_


def _log_dispersions(X: np.ndarray, k_max: int, n_init: int, seed: int) -> np.ndarray:
    """log W_k for k = 1..k_max, W_k the k-means within-cluster sum of squares."""
    centred = X - X.mean(0)
    dispersions = [np.sum(centred**2)]
    for k in range(2, k_max + 1):
        dispersions.append(KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X).inertia_)
    return np.log(np.maximum(dispersions, np.finfo(float).tiny))


def _principal_scores(X: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n_components`` principal-component scores of X, and all its singular values and axes."""
    centred = X - X.mean(0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:n_components].T, singular, axes


REFERENCES = ("gaussian", "uniform")


def one_cluster_test(X, k_max: int, n_reference: int = 50, alpha: float = 0.05, n_init: int = 10,
                     random_state: int = 0, reference: str = "uniform", n_components: int = 2) -> dict:
    """Gap test of "one cluster" against k = 2..k_max (after Tibshirani, Walther & Hastie, 2001).

    The data are first projected on their first ``n_components`` principal axes (default 2):
    clusters separate subjects along the directions of largest variance, and the remaining axes
    only add k-means' noise to both the data and the references (measured in docs/maps.md: at
    20 subjects in 16 dimensions the full space found no two clusters even 6 SDs apart). With W_k the k-means within-cluster sum of squares of the projected
    data, the drop D_k = log W_1 − log W_k says how much k clusters explain. The reference data
    sets have the data's variance along each of its principal axes (all of them, then projected
    the same way):

    * ``gaussian``: a Gaussian with the data's covariance, the null of SigClust (Liu, Hayes, Nobel
      & Marron, 2008), the shape of one cluster of subjects;
    * ``uniform``: uniform in a box of sides √12·σ, the unimodal shape that k-means splits most
      easily (Tibshirani et al. use the axes' ranges instead, which inflates the low-variance
      axes of a tight continuum). A flat continuum (a severity axis) stays k = 1, but clusters
      need about 6 within-cluster SDs between centres to be found at 20 subjects
      (docs/maps.md).

    The gap is Gap(k) = E_ref[log W_k] − log W_k. To test all k at once, each drop is
    standardised by the reference's mean and sd of D_k, z_k = (D_k − m_k) / s_k, and the
    statistic is T = max_k z_k; its p-value is the share of reference sets whose own T* is at
    least T, (1 + #{T* ≥ T}) / (1 + B), which corrects for trying several k.

    Parameters
    ----------
    X : array-like
        (n, d) subjects in the clustered space.
    k_max : int
        Largest k tested (>= 2).
    n_reference : int
        Reference data sets B (the smallest p-value is 1 / (1 + B)).
    alpha : float
        Level of the test.
    n_init, random_state : int
        k-means restarts and seed (reference draws included).
    reference : {"gaussian", "uniform"}
        Shape of the reference data.
    n_components : int
        Principal axes the test looks at (at most the data's rank).

    Returns
    -------
    dict
        gap (k = 1..k_max), gap_sd (the reference's sd of log W_k · sqrt(1 + 1/B)), z (k = 2..k_max),
        p_value, reject (p_value ≤ alpha), alpha, n_reference, reference, n_components.
    """
    X = np.asarray(X, dtype=np.float64)
    if k_max < 2 or k_max >= len(X):
        raise ConfigError(f"one_cluster_test: k_max = {k_max} must be in [2, {len(X) - 1}]")
    if reference not in REFERENCES:
        raise ConfigError(f"one_cluster_test: reference = {reference!r} must be one of {list(REFERENCES)}")
    if n_components < 1:
        raise ConfigError(f"one_cluster_test: n_components = {n_components} must be >= 1")
    rng = np.random.default_rng(random_state)
    components = min(n_components, *X.shape)
    scores, singular, axes = _principal_scores(X, components)
    sd = singular / np.sqrt(len(X))

    def draw() -> np.ndarray:
        if reference == "gaussian":
            return rng.standard_normal((len(X), len(sd))) * sd @ axes
        return rng.uniform(-0.5, 0.5, size=(len(X), len(sd))) * np.sqrt(12.0) * sd @ axes

    observed = _log_dispersions(scores, k_max, n_init, random_state)
    reference_dispersions = np.array([
        _log_dispersions(_principal_scores(draw(), components)[0], k_max, n_init, random_state)
        for _ in range(n_reference)
    ])
    drops = observed[0] - observed[1:]
    reference_drops = reference_dispersions[:, :1] - reference_dispersions[:, 1:]
    mean, spread = reference_drops.mean(0), np.maximum(reference_drops.std(0), np.finfo(float).eps)
    z = (drops - mean) / spread
    reference_max = ((reference_drops - mean) / spread).max(1)
    p_value = float((1 + (reference_max >= z.max()).sum()) / (1 + n_reference))
    described = {"gaussian": "Gaussian with the data's covariance",
                 "uniform": "uniform in a box along the data's principal axes, with the data's variance on each"}
    return {
        "gap": (reference_dispersions.mean(0) - observed).tolist(),
        "gap_sd": (reference_dispersions.std(0) * np.sqrt(1 + 1 / n_reference)).tolist(),
        "z": z.tolist(),
        "p_value": p_value,
        "reject": bool(p_value <= alpha),
        "alpha": alpha,
        "n_reference": n_reference,
        "reference": described[reference],
        "n_components": int(components),
    }


def seed_consensus(labelings) -> dict:
    """Agreement of the subtypes found by models trained with different seeds, on the same subjects.

    For each seed's partition the co-clustering matrix C_s[i, j] = 1 when subjects i and j share a
    cluster; the consensus matrix is their mean over seeds (Monti et al., 2003). Reported: the
    mean pairwise adjusted Rand index between seeds, and the share of subject pairs whose
    co-clustering is unanimous (consensus 0 or 1), the pairs every seed agrees on.

    Parameters
    ----------
    labelings : sequence of array-like
        One (n,) partition per seed, subjects in the same order.

    Returns
    -------
    dict
        n_seeds, n_clusters (per seed), mean_pairwise_ari, pairwise_ari, unanimous_pair_fraction.
    """

    labelings = [np.asarray(labels) for labels in labelings]
    if len(labelings) < 2 or len({len(labels) for labels in labelings}) != 1:
        raise ConfigError(f"seed_consensus: need >= 2 partitions of the same subjects, got sizes {[len(x) for x in labelings]}")
    pairwise = [float(adjusted_rand_score(a, b)) for a, b in combinations(labelings, 2)]
    consensus = np.mean([labels[:, None] == labels[None, :] for labels in labelings], axis=0)
    upper = np.triu_indices(len(labelings[0]), k=1)
    unanimous = np.isin(consensus[upper], (0.0, 1.0)).mean()
    return {
        "n_seeds": len(labelings),
        "n_clusters": [int(len(np.unique(labels))) for labels in labelings],
        "mean_pairwise_ari": float(np.mean(pairwise)),
        "pairwise_ari": pairwise,
        "unanimous_pair_fraction": float(unanimous),
    }


def fdr_bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN entries stay NaN and are not counted)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    finite = np.isfinite(p_values)
    if finite.any():
        adjusted[finite] = false_discovery_control(p_values[finite], method="bh")
    return adjusted


def _categorical_association(clusters: np.ndarray, values: pd.Series) -> dict:
    """Chi-square test of independence, effect size Cramér's V = sqrt(χ² / (n (min(r, c) − 1)))."""
    table = pd.crosstab(clusters, values.to_numpy())
    n = int(table.to_numpy().sum())
    if min(table.shape) < 2:
        return {"test": "chi2", "statistic": np.nan, "dof": np.nan, "p_value": np.nan, "effect_size": np.nan,
                "effect_measure": "cramers_v", "n": n}
    result = chi2_contingency(table.to_numpy(), correction=False)
    cramers_v = np.sqrt(result.statistic / (n * (min(table.shape) - 1)))
    return {"test": "chi2", "statistic": result.statistic, "dof": result.dof, "p_value": result.pvalue,
            "effect_size": cramers_v, "effect_measure": "cramers_v", "n": n}


def _continuous_association(clusters: np.ndarray, values: pd.Series, test: str) -> dict:
    """Kruskal-Wallis H with η²_H = (H − k + 1)/(n − k), or one-way ANOVA with η² = SS_between / SS_total."""
    values = values.to_numpy(dtype=np.float64)
    groups = [values[clusters == c] for c in np.unique(clusters)]
    n, k = len(values), len(groups)
    measure = "eta_squared_h" if test == "kruskal" else "eta_squared"
    name = "kruskal_wallis" if test == "kruskal" else "anova"
    if k < 2 or n <= k or np.ptp(values) == 0:
        return {"test": name, "statistic": np.nan, "dof": np.nan, "p_value": np.nan, "effect_size": np.nan,
                "effect_measure": measure, "n": n}
    if test == "kruskal":
        result = kruskal(*groups)
        effect = (result.statistic - k + 1) / (n - k)
    else:
        result = f_oneway(*groups)
        between = sum(len(g) * (g.mean() - values.mean()) ** 2 for g in groups)
        effect = between / ((values - values.mean()) ** 2).sum()
    return {"test": name, "statistic": result.statistic, "dof": k - 1, "p_value": result.pvalue,
            "effect_size": effect, "effect_measure": measure, "n": n}


def cluster_associations(
    clusters, attributes: pd.DataFrame, kinds: dict[str, str], continuous_test: str = "kruskal"
) -> pd.DataFrame:
    """Test each clinical attribute for differences between clusters, with FDR-corrected p-values.

    Categorical attributes: chi-square test of independence on the cluster x category table,
    effect size Cramér's V. Continuous attributes: Kruskal-Wallis H test (effect size
    η²_H = (H − k + 1)/(n − k), Tomczak & Tomczak 2014) or one-way ANOVA (η² = SS_between/SS_total).
    Subjects with a missing value are left out of that attribute's test only. p-values are
    corrected over all attributes with Benjamini-Hochberg (``p_fdr``).

    Parameters
    ----------
    clusters : array-like
        (n,) cluster of each subject.
    attributes : pd.DataFrame
        (n, A) attribute values, rows aligned with ``clusters``.
    kinds : dict
        Attribute -> "categorical" | "continuous".
    continuous_test : {"kruskal", "anova"}

    Returns
    -------
    pd.DataFrame
        attribute, kind, test, statistic, dof, p_value, p_fdr, effect_size, effect_measure, n.
    """
    if continuous_test not in ("kruskal", "anova"):
        raise ConfigError(f"continuous_test = {continuous_test!r}: must be 'kruskal' or 'anova'")
    clusters = np.asarray(clusters)
    if len(clusters) != len(attributes):
        raise ConfigError(f"clusters has {len(clusters)} subjects but attributes has {len(attributes)} rows")
    rows = []
    for name, kind in kinds.items():
        if kind not in ("categorical", "continuous"):
            raise ConfigError(f"attribute {name!r}: kind {kind!r} must be 'categorical' or 'continuous'")
        if name not in attributes.columns:
            raise ConfigError(f"attribute {name!r}: not a column of the attributes table {list(attributes.columns)}")
        present = attributes[name].notna().to_numpy()
        values = attributes[name][present]
        if kind == "categorical":
            result = _categorical_association(clusters[present], values)
        else:
            result = _continuous_association(clusters[present], values, continuous_test)
        rows.append({"attribute": name, "kind": kind, **result})
    columns = ["attribute", "kind", "test", "statistic", "dof", "p_value", "p_fdr", "effect_size", "effect_measure", "n"]
    table = pd.DataFrame(rows, columns=[c for c in columns if c != "p_fdr"])
    table.insert(columns.index("p_fdr"), "p_fdr", fdr_bh(table["p_value"]) if len(table) else [])
    return table
