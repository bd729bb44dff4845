"""The trainer of a pipeline's training section: devices, precision, atomic checkpoints."""

from __future__ import annotations

import pytest
import torch

from neurocl import train
from neurocl.config import TrainingConfig


def test_checkpoint_is_only_replaced_by_a_complete_one(tmp_path):
    path = tmp_path / "last.ckpt"
    checkpoint_io = train.AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(Exception):  # a lambda cannot be pickled: the write fails half-way
        checkpoint_io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_trainer_takes_devices_nodes_and_strategy_from_the_config(tmp_path):
    training = TrainingConfig(accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", epochs=1)
    trainer = train.make_trainer(training, tmp_path, progress=False)
    assert trainer.world_size == 2 and trainer.num_devices == 2
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy._get_process_group_backend() == "gloo"  # CPU processes talk over gloo


def test_auto_precision_is_bf16_on_a_gpu_that_supports_it(monkeypatch):
    training = TrainingConfig()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.precision(training) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert train.precision(training) == "bf16-mixed"
    assert train.precision(training.model_copy(update={"accelerator": "cpu"})) == "32-true"
