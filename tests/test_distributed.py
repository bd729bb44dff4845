"""DDP equals one process: 2 CPU processes (gloo) against one process on the whole batch."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from multinode_worker import BATCH, make_module  # noqa: E402  the same module in both DDP tests

ENCODER = {"name": "small_cnn", "width": 4}
SHAPE = (1, 12, 12, 12)
METHODS = ("sepclr", "yaware", "simclr", "decoupled_uniformity")  # DU: with an age kernel (attributes gathered)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _module(name: str):
    # Eval mode: BatchNorm uses its running statistics, identical on every rank (no SyncBatchNorm on CPU).
    return make_module(name, ENCODER).eval()


def _views() -> torch.Tensor:
    return torch.randn(2, BATCH, *SHAPE, generator=torch.Generator().manual_seed(2))


K = 3  # patches per subject (views.patches, same_location): the loss sees BATCH * K samples
PATCH = (1, 8, 8, 8)


def _patch_views() -> tuple[torch.Tensor, np.ndarray]:
    """Views of K patches per subject, subject-major as PatchSampler serves them, and their subjects."""
    views = torch.randn(2, BATCH * K, *PATCH, generator=torch.Generator().manual_seed(3))
    return views, np.repeat(np.arange(BATCH), K)


def _loss_and_gradients(module, views, indices) -> tuple[float, list[torch.Tensor]]:
    loss, _ = module.compute_loss(views, indices)
    loss.backward()
    net = module.net.module if isinstance(module.net, DistributedDataParallel) else module.net
    return float(loss.detach()), [p.grad.clone() for p in net.parameters() if p.grad is not None]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        local = np.arange(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        results = {}
        for name in METHODS:
            module = _module(name)
            module.net = DistributedDataParallel(module.net)
            results[name] = _loss_and_gradients(module, _views()[:, local], local)
            # Patch samples: each rank holds the K patches of its own subjects.
            module = _module(name)
            module.net = DistributedDataParallel(module.net)
            views, rows = _patch_views()
            mine = slice(rank * BATCH // 2 * K, (rank + 1) * BATCH // 2 * K)
            results[f"{name}/patches"] = _loss_and_gradients(module, views[:, mine], rows[mine])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", METHODS)
def test_ddp_loss_and_gradients_equal_one_process_on_the_whole_batch(name, ddp_results):
    single_loss, single_gradients = _loss_and_gradients(_module(name), _views(), np.arange(BATCH))
    for rank in range(2):
        loss, gradients = ddp_results[rank][name]
        assert loss == pytest.approx(single_loss, rel=1e-5)
        assert len(gradients) == len(single_gradients)
        for ddp_gradient, single_gradient in zip(gradients, single_gradients):
            torch.testing.assert_close(ddp_gradient, single_gradient, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_ddp_on_patch_samples_equals_one_process_on_every_patch(name, ddp_results):
    single_loss, single_gradients = _loss_and_gradients(_module(name), *_patch_views())
    for rank in range(2):
        loss, gradients = ddp_results[rank][f"{name}/patches"]
        assert loss == pytest.approx(single_loss, rel=1e-5)
        for ddp_gradient, single_gradient in zip(gradients, single_gradients):
            torch.testing.assert_close(ddp_gradient, single_gradient, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    # fork, not spawn: the workers inherit the imported modules instead of re-importing
    # torch, Lightning and MONAI (tens of seconds on a loaded machine).
    mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
