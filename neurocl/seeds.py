"""A multi-seed run's figures side by side: each headline figure's spread over training seeds.

A run with ``training.seeds: [s0, s1, ...]`` holds one model per seed (the primary s0 in the run
folder itself, each other one in ``seeds/seed-<s>/``, :meth:`neurocl.rundir.RunDir.seed_runs`), all
trained and scored on the same split. For each figure this module gives the mean, the sample
standard deviation over seeds (ddof = 1; n − 1 in the denominator, so two seeds give the half-range
times √2) and every seed's own value, which the report prints as ``mean ± sd``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from neurocl.io import read_tsv
from neurocl.probe import PRIMARY_METRIC
from neurocl.rundir import RunDir

__all__ = ["collapse_spread", "decodable_counts", "probe_spread", "run_seeds", "seed_files"]

_PRIMARY = set(PRIMARY_METRIC.values())


def run_seeds(config: dict | None) -> list[int]:
    """The training seeds a run's config.yaml (as a mapping) lists, primary first; [] for a single-seed run."""
    training = (config or {}).get("training")
    seeds = training.get("seeds") if isinstance(training, dict) else None
    return [int(seed) for seed in seeds] if isinstance(seeds, list) and len(seeds) > 1 else []


def seed_files(folder: RunDir, config: dict | None) -> tuple[dict[int, pd.DataFrame], dict[int, dict]]:
    """Each seed's probes.tsv and separation.json (seeds whose files are missing are left out)."""
    probes, separations = {}, {}
    for seed, run in folder.seed_runs(run_seeds(config)).items():
        if run.probes.is_file():
            probes[seed] = read_tsv(run.probes)
        if run.separation.is_file():
            try:
                separations[seed] = json.loads(Path(run.separation).read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a damaged file: that seed is left out of the spread, the others still count
    return probes, separations


def _summary(values: dict[int, float]) -> dict:
    finite = np.array([v for v in values.values() if v is not None and np.isfinite(v)], dtype=np.float64)
    return {
        "mean": float(finite.mean()) if finite.size else np.nan,
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else np.nan,
        "n_seeds": int(finite.size),
        "per_seed": ", ".join(f"{seed}: {_number(value)}" for seed, value in values.items()),
    }


def _number(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def probe_spread(probes: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Primary probe score per attribute × subset × space over seeds: mean, sd, n_seeds and the per-seed values."""
    frames = [table.assign(seed=seed) for seed, table in probes.items()]
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    table = table[table["metric"].isin(_PRIMARY)]
    rows = []
    for (attribute, subset, space, metric), group in table.groupby(["attribute", "subset", "space", "metric"], sort=False):
        values = dict(zip(group["seed"].astype(int), group["value"].astype(float)))
        rows.append({"attribute": attribute, "subset": subset, "space": space, "metric": metric, **_summary(values)})
    return pd.DataFrame(rows)


def decodable_counts(separations: dict[int, dict]) -> pd.DataFrame:
    """For each attribute × subset of separation.json, in how many seeds it is decodable from each space."""
    counts: dict[tuple, dict[str, int]] = {}
    for result in separations.values():
        for attribute, subsets in (result.get("attributes") or {}).items():
            for subset, entry in subsets.items():
                spaces = counts.setdefault((attribute, subset), {space: 0 for space in entry.get("spaces", {})})
                for space in entry.get("decodable_from", []):
                    spaces[space] = spaces.get(space, 0) + 1
    n = len(separations)
    return pd.DataFrame([
        {"attribute": attribute, "subset": subset, **{f"decodable from {space}": f"{k}/{n}" for space, k in spaces.items()}}
        for (attribute, subset), spaces in counts.items()
    ])


def collapse_spread(separations: dict[int, dict]) -> pd.DataFrame:
    """Each numeric figure of separation.json's background_collapse over seeds (not the subject counts ``n_*``,
    the same for every seed)."""
    names: list[str] = []
    for result in separations.values():
        for name, value in (result.get("background_collapse") or {}).items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not name.startswith("n_") and name not in names:
                names.append(name)
    rows = []
    for name in names:
        values = {seed: _float((result.get("background_collapse") or {}).get(name)) for seed, result in separations.items()}
        rows.append({"figure": name, **_summary(values)})
    return pd.DataFrame(rows)


def _float(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan
