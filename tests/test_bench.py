"""The data-path benchmark measures what it says (no timing assertions: benchmarks print numbers)."""

from __future__ import annotations

import numpy as np
import torch

from neurocl import bench
from neurocl.bench import DataBenchConfig


def test_baseline_warm_up_takes_one_batch_per_worker(monkeypatch):
    # Workers start together: the batches that are ready when the first one arrives must not be
    # counted in the measured window. A loader that yields exactly what was asked for shows which
    # batches were measured.
    config = DataBenchConfig(shape=(8, 8, 8), batch_size=2, n_views=2, n_batches=4, workers=2)
    requested = {}

    def loader(library, recipe, volumes, indices, config):
        requested["items"] = len(indices)
        return [torch.zeros(config.batch_size, config.n_views, 1, *config.shape)
                for _ in range(len(indices) // config.batch_size)]

    monkeypatch.setattr(bench, "_baseline_loader", loader)
    measured = bench._measure_baseline("monai", "light", np.zeros((4, 1, 8, 8, 8), np.float32), config)
    assert requested["items"] == config.batch_size * (config.n_batches + 2)
    assert measured.views == config.n_batches * config.batch_size * config.n_views


def test_monai_baseline_makes_the_asked_views_in_worker_processes():
    config = DataBenchConfig(shape=(12, 12, 12), batch_size=2, n_views=2, n_batches=2, n_subjects=4, workers=2)
    volumes = np.random.default_rng(0).standard_normal((4, 1, 12, 12, 12)).astype(np.float32)
    measured = bench._measure_baseline("monai", "full", volumes, config)
    assert measured.views == 8 and measured.seconds > 0 and measured.note == "2 workers"


def test_data_benchmark_without_torchio_measures_the_rest_and_says_how_to_add_it(monkeypatch):
    import io
    import sys

    from rich.console import Console

    # None in sys.modules makes `import torchio` raise ImportError, as on a plain `pip install -e .`.
    monkeypatch.setitem(sys.modules, "torchio", None)
    config = DataBenchConfig(shape=(8, 8, 8), batch_size=2, n_views=2, n_batches=1, n_subjects=4, workers=1,
                             recipes=("light",))
    result = bench.run_data_benchmark(config, progress=False)
    assert [m.library for m in result["measurements"]] == ["neurocl", "monai"]
    assert result["missing"] == ["torchio"]
    assert set(result["ratios"]["light"]) == {"neurocl/monai"}
    out = io.StringIO()
    bench.print_data_benchmark(result, Console(file=out, width=200))
    assert 'torchio: not installed, not measured; add it with pip install -e ".[bench]"' in out.getvalue()
