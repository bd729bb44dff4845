"""Shared fixtures: a tiny synthetic cohort generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocl.synth import SynthConfig, make_synthetic_cohort

TINY_COHORT_CONFIG = SynthConfig(n_subjects=32, subtypes=2, sites=2, resolution=8.0, seed=0)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the cohort.yaml of a 32-subject synthetic cohort at 8 mm (2 subtypes, 2 sites, seed 0).

    Shared by the whole session: treat it as read-only (use ``tiny_cohort_copy`` to break files).
    """
    return make_synthetic_cohort(tmp_path_factory.mktemp("tiny_cohort") / "cohort", TINY_COHORT_CONFIG)


@pytest.fixture
def tiny_cohort_copy(tiny_cohort: Path, tmp_path: Path) -> Path:
    """Path to the cohort.yaml of a fresh, writable copy of ``tiny_cohort`` under ``tmp_path``."""
    copy = shutil.copytree(tiny_cohort.parent, tmp_path / "tiny_cohort")
    return Path(copy) / tiny_cohort.name


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ``tiny_cohort`` preprocessed once (default PreprocessConfig) into a VolumeStore; read-only."""
    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    return VolumeStore.build(Cohort.from_yaml(tiny_cohort), tmp_path_factory.mktemp("tiny_store"), workers=1, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_otsu(values: np.ndarray) -> float:
    """Otsu's threshold the plain way (an independent reference for the store's and harmonise's tests):
    the cut between sorted unique values that maximises w0 w1 (mu0 - mu1)^2, trying every one."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    best, best_cut = -1.0, values[0]
    for cut in np.unique(values)[:-1]:
        low, high = values[values <= cut], values[values > cut]
        score = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if score > best:
            best, best_cut = score, cut
    return float(best_cut)
