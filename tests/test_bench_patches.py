"""The patch benchmark measures what it says (no timing assertions: benchmarks print numbers)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurocl import bench_patches
from neurocl.bench_patches import PatchBenchConfig, model_step, run_patch_benchmark
from neurocl.errors import ConfigError

TINY = dict(shapes=((16, 18, 16),), sizes=(8,), per_subject=3, batch_size=2, n_batches=2, n_subjects=3, workers=1)


def test_every_library_serves_the_asked_patches_in_batches_of_b_times_k():
    pytest.importorskip("torchio", reason="the bench extra (pip install -e \".[bench]\") installs TorchIO")
    result = run_patch_benchmark(PatchBenchConfig(**TINY), progress=False)
    measured = {m.library: m for m in result["measurements"]}
    assert set(measured) == {"neurocl", "torchio", "monai"}
    for m in measured.values():
        assert m.patches == 2 * 2 * 3 and m.size == 8 and m.shape == (16, 18, 16) and m.seconds > 0
    assert set(result["ratios"][((16, 18, 16), 8)]) == {"neurocl/torchio", "neurocl/monai"}
    json.dumps(bench_patches.result_dict(result))  # --out writes plain JSON types


def test_a_library_that_is_not_installed_is_reported_missing_and_the_rest_measured(monkeypatch):
    # None in sys.modules makes `import torchio` raise ImportError, as on a plain `pip install -e .`.
    monkeypatch.setitem(sys.modules, "torchio", None)
    result = run_patch_benchmark(PatchBenchConfig(**{**TINY, "n_batches": 1}), progress=False)
    assert result["missing"] == ["torchio"]
    assert {m.library for m in result["measurements"]} == {"neurocl", "monai"}
    assert set(result["ratios"][((16, 18, 16), 8)]) == {"neurocl/monai"}


@pytest.mark.parametrize("library", ["torchio", "monai"])
def test_baselines_cut_patches_of_the_asked_size_from_the_volumes(library):
    if library == "torchio":
        pytest.importorskip("torchio", reason="the bench extra (pip install -e \".[bench]\") installs TorchIO")
    config = PatchBenchConfig(**{**TINY, "n_batches": 1})
    volumes = np.arange(2 * 16 * 18 * 16, dtype=np.float32).reshape(2, 1, 16, 18, 16)
    make = bench_patches._torchio_loader if library == "torchio" else bench_patches._monai_loader
    batch = next(make(volumes, 8, config, n_warm=1))
    assert batch.shape == (6, 1, 8, 8, 8)
    for patch in batch.numpy():
        # A box of a volume of consecutive integers starts at its smallest value and steps by the strides.
        first = patch.min()
        subject, rest = divmod(int(first), 16 * 18 * 16)
        a, rest = divmod(rest, 18 * 16)
        b, c = divmod(rest, 16)
        np.testing.assert_array_equal(patch[0], volumes[subject, 0, a:a + 8, b:b + 8, c:c + 8])


def test_model_step_times_the_input_path_and_the_step_on_the_cpu():
    calls = []

    def inputs():
        calls.append(1)
        return torch.randn(4, 1, 8, 8, 8)

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Flatten())
    measured = model_step(inputs, torch.device("cpu"), n_steps=2, net=net)
    assert len(calls) == 3  # one untimed warm-up step, two timed ones
    assert measured.input_shape == (8, 8, 8) and measured.batch == 4 and not measured.out_of_memory
    assert measured.peak_gib is None  # GPU memory only
    assert 0 < measured.data_share < 1


def test_model_step_reports_out_of_memory_instead_of_failing():
    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    measured = model_step(lambda: torch.zeros(2, 1, 8, 8, 8), torch.device("cpu"), net=Exhausted())
    assert measured.out_of_memory and measured.peak_gib is None and measured.batch == 2


def test_patch_bench_config_refuses_what_it_cannot_measure():
    with pytest.raises(ConfigError, match="fit every shape"):
        PatchBenchConfig(shapes=((16, 18, 16),), sizes=(17,))
    with pytest.raises(ConfigError, match="unknown library"):
        PatchBenchConfig(libraries=("neurocl", "nobrainer"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device 'cuda'"):
            PatchBenchConfig(device="cuda")


def test_cli_runs_the_patch_bench_and_writes_json(tmp_path):
    from neurocl.cli import app

    out = tmp_path / "patches.json"
    result = CliRunner().invoke(app, ["bench", "patches", "--shapes", "16,18,16", "--sizes", "8,12", "--libraries",
                                      "neurocl", "--batches", "1", "--subjects", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert [(m["size"], m["patches"]) for m in written["measurements"]] == [(8, 32), (12, 32)]
    assert written["config"]["model"] is False  # the DenseNet121 steps are on by default with cuda only
