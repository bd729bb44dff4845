"""Tests for neurocl.logs: results whole in files, one progress line per epoch, quiet libraries."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import torch
from rich.table import Table

from neurocl.logs import quiet_libraries, results_console
from neurocl.train import EpochLines


def test_results_in_a_file_keep_every_number_and_label_whole(capsys):
    table = Table(title="a table wider than any terminal")
    numbers = [f"0.{index}23456789{index}" for index in range(14)]
    for index in range(14):
        table.add_column(f"a_rather_long_column_label_{index}")
    table.add_row(*numbers)
    results_console().print(table)
    out = capsys.readouterr().out
    assert "…" not in out and all(number in out for number in numbers)
    assert all(f"a_rather_long_column_label_{index}" in out for index in range(14))


def test_epoch_progress_is_one_line_per_epoch_on_stderr(capsys):
    callback = EpochLines()
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=2, max_epochs=40, global_step=12,
                              callback_metrics={"train_loss": torch.tensor(-7.5), "val_loss": torch.tensor(-6.25),
                                                "train/common": torch.tensor(1.0)})
    callback.on_train_epoch_start(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 3/40, step 12: train_loss -7.5, val_loss -6.25 (")


def test_library_deprecations_and_lightning_banners_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("old API", DeprecationWarning)
        warnings.warn("will change", FutureWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in caught] == ["a real problem"]
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
