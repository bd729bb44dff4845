"""What a method trains on: :class:`TrainingData`, and :class:`EpochBatches` (store indices in an
order fixed by ``(seed, epoch)``, resumable mid-epoch) with :func:`step_seed`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch.distributed as dist
from torch import Tensor

from neurocl.errors import ConfigError


@dataclass
class TrainingData:
    """What a method needs to train, all indexed by store index.

    Attributes
    ----------
    store : VolumeStore
        The preprocessed cohort (moved to the module's device when training starts).
    sampler : ViewSampler
        Batched augmentations on the store's device.
    train_indices, val_indices : np.ndarray
        Store indices of the training and validation subjects.
    is_target : Tensor, (N,) bool
        Group of every store index.
    attributes : Tensor, (N, A) float
        The kernel attributes of every store index (NaN missing; categorical as codes).
    attribute_kinds : list of str
        "continuous" or "categorical" for each attribute column.
    batch_size : int
        Subjects per batch and process.
    memory_budget_gb : float, optional
        GPU memory the whole store may take (None: half of the free memory); see ``VolumeStore.to``.
    """

    store: Any
    sampler: Any
    train_indices: np.ndarray
    val_indices: np.ndarray
    is_target: Tensor
    attributes: Tensor
    attribute_kinds: list[str]
    batch_size: int
    memory_budget_gb: float | None = None


def step_seed(seed: int, epoch: int, position: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for one step, a pure function of where the step is in the run.

    ``stream`` separates independent uses of the same position (0: training views,
    1: validation views).
    """
    state = np.random.SeedSequence([seed, stream, epoch, position, rank]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class EpochBatches:
    """Batches of store indices, one epoch per ``iter()``, in an order fixed by ``(seed, epoch)``.

    Each global batch of ``batch_size * world_size`` subjects is cut into one local
    batch per rank, so ranks see distinct subjects. With ``is_target`` given, every
    local batch holds ``round(target_fraction * batch_size)`` target subjects (at
    least one) and background subjects for the rest: each epoch covers the larger
    group once and cycles the smaller one. Otherwise the subjects are shuffled and
    the last incomplete batch is dropped (contrastive losses and BatchNorm want full
    batches).

    The loader is resumable (Lightning's ``state_dict`` / ``load_state_dict``
    interface): :meth:`mark_done` records the last batch a step finished, and a loaded
    state makes the next ``iter()`` continue from the batch after it.

    Parameters
    ----------
    indices : array of int
        Store indices to draw from.
    batch_size : int
        Subjects per local batch.
    seed : int
        Base seed of the batch order.
    is_target : array of bool, optional
        Group of every store index (indexable by ``indices``); turns on group-balanced batches.
    target_fraction : float
        Fraction of target subjects per batch when balanced.
    shuffle : bool
        Reshuffle every epoch (training) or keep the epoch-0 order forever (validation).
    rank, world_size : int
        This process and the number of processes.
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        seed: int = 0,
        is_target: np.ndarray | None = None,
        target_fraction: float = 0.5,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.balanced = is_target is not None
        if self.balanced:
            groups = np.asarray(is_target, dtype=bool)[self.indices]
            self.target, self.background = self.indices[groups], self.indices[~groups]
            self.n_target = min(max(round(target_fraction * self.batch_size), 1), self.batch_size - 1)
            if self.batch_size < 2 or not len(self.target) or not len(self.background):
                raise ConfigError(
                    f"a group-balanced batch needs batch_size >= 2 and both groups; got batch_size {self.batch_size}, "
                    f"{len(self.target)} target and {len(self.background)} background subjects"
                )
            # A subject twice in one global batch would be its own negative.
            for name, members, per_batch in (("target", self.target, self.n_target),
                                             ("background", self.background, self.batch_size - self.n_target)):
                if per_batch * world_size > len(members):
                    raise ConfigError(
                        f"training.batch_size {self.batch_size} x {world_size} process(es) takes {per_batch * world_size}"
                        f" {name} subjects per step but there are {len(members)}; lower training.batch_size"
                        " (or change method.target_fraction)"
                    )
        elif self.batch_size * world_size > len(self.indices):
            raise ConfigError(
                f"training.batch_size {self.batch_size} x {world_size} process(es) exceeds the {len(self.indices)} "
                "subjects to draw from; lower training.batch_size"
            )
        self._next_epoch = 0
        self._done = (0, 0)
        self._resume_from: tuple[int, int] | None = None

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        if not self.balanced:
            return len(self.indices) // global_batch
        n_background = self.batch_size - self.n_target
        return max(
            len(self.target) // (self.n_target * self.world_size),
            len(self.background) // (n_background * self.world_size),
            1,
        )

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The local batches of ``epoch`` for this rank (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch if self.shuffle else 0])
        n_batches = len(self)
        if not self.balanced:
            order = rng.permutation(self.indices).reshape(-1)[: n_batches * self.batch_size * self.world_size]
            return [chunk[self.rank] for chunk in order.reshape(n_batches, self.world_size, self.batch_size)]
        n_background = self.batch_size - self.n_target
        targets = _cycled(rng, self.target, n_batches * self.n_target * self.world_size)
        backgrounds = _cycled(rng, self.background, n_batches * n_background * self.world_size)
        targets = targets.reshape(n_batches, self.world_size, self.n_target)
        backgrounds = backgrounds.reshape(n_batches, self.world_size, n_background)
        return [np.concatenate([targets[b, self.rank], backgrounds[b, self.rank]]) for b in range(n_batches)]

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self._next_epoch, 0
        if self._resume_from is not None:
            epoch, start = self._resume_from
            if start >= len(self):
                epoch, start = epoch + 1, 0
            self._resume_from = None
        self._next_epoch = epoch + 1
        for position, batch in enumerate(self.epoch(epoch)[start:], start=start):
            yield {"epoch": epoch, "position": position, "indices": batch}

    def mark_done(self, epoch: int, position: int) -> None:
        """Record that the step on batch ``position`` of ``epoch`` has finished."""
        self._done = (epoch, position + 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._done[0], "batches_done": self._done[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._done = (state["epoch"], state["batches_done"])
        self._resume_from = self._done


def _cycled(rng: np.random.Generator, values: np.ndarray, length: int) -> np.ndarray:
    """``length`` draws from ``values``: fresh permutations back to back (each value once per pass)."""
    passes = math.ceil(length / len(values))
    return np.concatenate([rng.permutation(values) for _ in range(passes)])[:length]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
