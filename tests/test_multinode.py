"""Multi-node DDP checked on one machine: 2 torchrun "nodes" x 1 process (gloo, localhost rendezvous).

Each node is its own ``torchrun --nnodes 2 --node-rank R`` invocation, as on a cluster; the loss
trajectory of every method (gathered negatives and attribute kernels included) must equal one
process trained on the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import multinode_worker as worker  # noqa: E402

WORKER = Path(worker.__file__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def node_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(WORKER), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank} failed:\n{log[-3000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_each_torchrun_node_ran_one_rank_of_a_two_process_world(node_results):
    assert [result["world_size"] for result in node_results] == [2, 2]
    assert sorted(result["node_rank"] for result in node_results) == [0, 1]


@pytest.mark.parametrize("name", worker.METHODS)
def test_two_nodes_follow_the_loss_trajectory_of_one_process(name, node_results):
    single = worker.trajectory(name, np.arange(worker.BATCH))
    assert np.ptp(single) > 1e-3  # the steps move the parameters: a real trajectory, not a constant
    for result in node_results:
        np.testing.assert_allclose(result[name], single, rtol=1e-4)
