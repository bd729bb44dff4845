"""Calibration of the subtypes stage's "one cluster" test on embeddings with a known number of clusters.

Each scenario draws ``n`` subjects in ``d`` dimensions and runs :class:`neurocl.maps.SubtypeClustering`
with k over 1..k_max, as the maps stage does (k = 1 unless :func:`~neurocl.maps.one_cluster_test`
rejects it, then k by the silhouette):

* ``one Gaussian``: N(0, I), no subtypes;
* ``elongated Gaussian``: N(0, diag(s)) with SDs s falling linearly from 2 to 0.5, no subtypes;
* ``flat continuum``: one axis uniform with SD 3 (a severity scale), the others N(0, 1), no subtypes;
* ``K clusters``: K equal clusters of within-cluster covariance I whose centres are the vertices
  of a regular simplex in a random K-dimensional subspace, ``separation`` apart (in within-cluster
  SDs). Two clusters ``separation`` apart are told apart by the ideal linear rule with balanced
  accuracy Φ(separation / 2): 0.84 at 2, 0.93 at 3, 0.98 at 4.

Reported per scenario: ``rejected``, the share of replicates where the test rejects one cluster
(the false-positive rate where there are none, the power where there are), and ``correct``, the
share where the chosen k is the true one.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
from rich.table import Table

from neurocl.logs import progress_console
from neurocl.maps.subtypes import SubtypeClustering

NULL_SCENARIOS = ("one Gaussian", "elongated Gaussian", "flat continuum")


def draw_scenario(scenario: str, n: int, dim: int, separation: float, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) subjects of one scenario (module docstring)."""
    if scenario == "one Gaussian":
        return rng.standard_normal((n, dim))
    if scenario == "elongated Gaussian":
        return rng.standard_normal((n, dim)) * np.linspace(2.0, 0.5, dim)
    if scenario == "flat continuum":
        return np.column_stack([rng.uniform(-3.0, 3.0, n) * np.sqrt(3.0), rng.standard_normal((n, dim - 1))])
    k = int(scenario.split()[0])
    basis = np.linalg.qr(rng.standard_normal((dim, k)))[0]
    # Rows of I - 1/k are a regular simplex with edge sqrt(2); scaled to edge `separation`.
    centres = (np.eye(k) - 1.0 / k) @ basis.T * separation / np.sqrt(2.0)
    return centres[np.arange(n) % k] + rng.standard_normal((n, dim))


def subtype_test_rates(
    n_values: Sequence[int] = (20, 40, 60),
    dims: Sequence[int] = (8, 16, 32),
    separations: Sequence[float] = (2.0, 3.0, 4.0, 6.0),
    cluster_counts: Sequence[int] = (2, 3),
    replicates: int = 40,
    reference: str = "gaussian",
    n_components: int = 2,
    k_max: int = 6,
    n_reference: int = 50,
    n_init: int = 10,
    seed: int = 0,
    grid: str = "cross",
    progress: bool = True,
) -> pd.DataFrame:
    """Rejection and correct-k rates of every scenario over ``replicates`` draws.

    ``grid = "cross"`` measures every n at the middle dimension and every dimension at the
    smallest n (what docs/maps.md reports); ``"full"`` every (n, dim) pair.
    """
    if grid == "full":
        shapes = [(n, d) for n in n_values for d in dims]
    else:
        middle = dims[len(dims) // 2]
        shapes = [(n, middle) for n in n_values] + [(min(n_values), d) for d in dims if d != middle]
    scenarios = [(name, 1, 0.0) for name in NULL_SCENARIOS]
    scenarios += [(f"{k} clusters", k, s) for k in cluster_counts for s in separations]
    rows = []
    for n, dim in shapes:
        for name, true_k, separation in scenarios:
            started = time.perf_counter()
            chosen = []
            for replicate in range(replicates):
                rng = np.random.default_rng([seed, n, dim, true_k, int(separation * 10), replicate])
                X = draw_scenario(name, n, dim, separation, rng)
                clustering = SubtypeClustering(
                    k_range=(1, min(k_max, n - 1)), n_bootstrap=0, n_init=n_init, random_state=replicate,
                    n_reference=n_reference, reference=reference, n_components=n_components,
                ).fit(X)
                chosen.append(clustering.n_clusters_)
            chosen = np.asarray(chosen)
            rows.append({"scenario": name, "n": n, "dim": dim, "separation": separation if true_k > 1 else np.nan,
                         "true_k": true_k, "replicates": replicates, "rejected": float(np.mean(chosen > 1)),
                         "correct": float(np.mean(chosen == true_k)),
                         "seconds": time.perf_counter() - started})
            if progress:
                row = rows[-1]
                progress_console().print(f"{name} n={n} d={dim}{f' separation {separation:g}' if true_k > 1 else ''}: "
                                         f"rejected {row['rejected']:.2f}, correct k {row['correct']:.2f} "
                                         f"({row['seconds']:.0f} s)")
    return pd.DataFrame(rows)


def print_subtype_rates(rates: pd.DataFrame, console, title: str) -> None:
    table = Table(title=title)
    for column in ("scenario", "n", "dim", "separation", "rejected", "correct"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in rates.itertuples(index=False):
        separation = "" if np.isnan(row.separation) else f"{row.separation:g}"
        table.add_row(row.scenario, str(row.n), str(row.dim), separation, f"{row.rejected:.2f}", f"{row.correct:.2f}")
    console.print(table)


__all__ = ["NULL_SCENARIOS", "draw_scenario", "print_subtype_rates", "subtype_test_rates"]
