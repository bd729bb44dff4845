"""One "node" of the multi-node test: a few SGD steps of every method under DDP, started by torchrun.

Run as ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R ... multinode_worker.py OUT``; each
rank trains on its half of a fixed global batch and rank 0 writes the loss trajectory to OUT.
Kept in tests/ (not a test module: pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from neurocl.methods import METHODS as METHOD_CLASSES
from neurocl.methods import TrainingData, build_method

# GroupNorm, no BatchNorm anywhere (no batch statistic): then a rank's half batch computes what the
# whole batch computes for those rows, in training mode.
ENCODER = {"name": "small_cnn", "width": 4, "norm": "group", "head_batchnorm": False}
BATCH = 8  # global batch
SHAPE = (1, 12, 12, 12)
METHODS = ("sepclr", "yaware", "simclr", "decoupled_uniformity")
STEPS = 3
LR = 0.01


def make_module(name: str, encoder: dict = ENCODER):
    """The same freshly initialised module on every rank (and in the single-process reference), in training mode.

    Also the module of tests/test_distributed.py (which switches it to eval mode for its BatchNorm)."""
    torch.manual_seed(0)
    method = {"name": name, "common_dim": 4, "salient_dim": 4, "proj_dim": 8, "attributes": ["age"], "sigma": 5.0}
    method = {key: value for key, value in method.items() if key == "name" or key in METHOD_CLASSES[name].settings}
    module = build_method(method, encoder, seed=0)
    generator = torch.Generator().manual_seed(1)
    module.data = TrainingData(
        store=None, sampler=None, train_indices=np.arange(BATCH), val_indices=np.arange(0),
        is_target=torch.tensor([True, False] * (BATCH // 2)),
        attributes=torch.rand(BATCH, 1, generator=generator) * 40 + 20, attribute_kinds=["continuous"],
        batch_size=BATCH,
    )
    return module.train()


def global_views() -> torch.Tensor:
    """The global batch's two views, the same at every step so that the loss must fall: (2, BATCH, *SHAPE)."""
    generator = torch.Generator().manual_seed(100)
    # Subjects differ by a global intensity and a linear gradient (white noise alone gives nearly
    # identical pooled features, and the single-space losses would sit at log(2B - 1)).
    grid = torch.linspace(-1, 1, SHAPE[-1])
    offset = torch.randn(1, BATCH, 1, 1, 1, 1, generator=generator) * 2
    slope = torch.randn(1, BATCH, 1, 1, 1, 1, generator=generator) * 2
    noise = torch.randn(2, BATCH, *SHAPE, generator=generator) * 0.3
    return offset + slope * grid + noise


def trajectory(name: str, local: np.ndarray, wrap=lambda net: net) -> list[float]:
    """Loss at each of STEPS SGD steps on the rows ``local`` of the global batch."""
    module = make_module(name)
    module.net = wrap(module.net)
    optimiser = torch.optim.SGD(module.net.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        optimiser.zero_grad()
        loss, _ = module.compute_loss(global_views()[:, local], local)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = np.arange(rank * BATCH // world, (rank + 1) * BATCH // world)
        results = {name: trajectory(name, local, DistributedDataParallel) for name in METHODS}
        results["node_rank"] = int(os.environ.get("GROUP_RANK", -1))
        results["world_size"] = world
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
