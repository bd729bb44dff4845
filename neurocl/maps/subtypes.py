"""Patient subtypes: clustering in salient space with model selection and bootstrap stability,
and association of the clusters with clinical attributes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurocl.errors import ConfigError

# Below this mean bootstrap ARI the report cautions that the subtypes hinge on a few subjects
# (docs/maps.md quotes it; a test keeps the two equal).
STABILITY_CAUTION = 0.6


class SubtypeClustering:
    """Cluster subjects into subtypes, choosing the number of clusters over a range.

    For every k in ``k_range`` the subjects are clustered (k-means or a Gaussian mixture) and
    scored by the silhouette of the partition (Rousseeuw, 1987; higher is better, needs k ≥ 2)
    and the Bayesian information criterion of a Gaussian mixture with k components,
    BIC = −2 log L + p log n (Schwarz, 1978; lower is better, allows k = 1: no subtypes).
    ``criterion`` picks k. Stability (Lange et al., 2004) is the mean adjusted Rand index
    between the full solution and solutions fitted on bootstrap resamples (and applied to
    all subjects): near 1 means the subtypes do not hinge on a few subjects.

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
        k, silhouette, bic for every k tried.
    stability_ : float
        Mean bootstrap ARI (NaN without bootstrap).
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
    ):
        self.k_range = k_range
        self.method = method
        self.criterion = criterion
        self.covariance_type = covariance_type
        self.n_bootstrap = n_bootstrap
        self.n_init = n_init
        self.random_state = random_state

    def _check_params(self, n_samples: int) -> tuple[int, int]:
        if self.method not in ("kmeans", "gmm"):
            raise ConfigError(f"method = {self.method!r}: must be 'kmeans' or 'gmm'")
        if self.criterion not in ("silhouette", "bic"):
            raise ConfigError(f"criterion = {self.criterion!r}: must be 'silhouette' or 'bic'")
        k_min, k_max = (int(k) for k in self.k_range)
        lowest = 2 if self.criterion == "silhouette" else 1
        if not lowest <= k_min <= k_max or k_max >= n_samples:
            raise ConfigError(
                f"k_range = {tuple(self.k_range)}: need {lowest} <= k_min <= k_max < number of subjects ({n_samples})"
            )
        return k_min, k_max

    def _estimator(self, k: int, seed: int):
        from sklearn.cluster import KMeans
        from sklearn.mixture import GaussianMixture

        if self.method == "kmeans":
            return KMeans(n_clusters=k, n_init=self.n_init, random_state=seed)
        return GaussianMixture(k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=seed)

    def fit(self, X, y=None) -> "SubtypeClustering":
        from sklearn.metrics import adjusted_rand_score, silhouette_score
        from sklearn.mixture import GaussianMixture

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
        if self.criterion == "silhouette":
            best = self.scores_["silhouette"].fillna(-np.inf).idxmax()
        else:
            best = self.scores_["bic"].idxmin()
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
        for b in range(self.n_bootstrap):
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


def fdr_bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN entries stay NaN and are not counted)."""
    from scipy.stats import false_discovery_control

    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    finite = np.isfinite(p_values)
    if finite.any():
        adjusted[finite] = false_discovery_control(p_values[finite], method="bh")
    return adjusted


def _categorical_association(clusters: np.ndarray, values: pd.Series) -> dict:
    """Chi-square test of independence, effect size Cramér's V = sqrt(χ² / (n (min(r, c) − 1)))."""
    from scipy.stats import chi2_contingency

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
    from scipy.stats import f_oneway, kruskal

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
