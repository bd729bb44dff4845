r"""Contrastive methods as Lightning modules over one small base (solo-learn style).

:class:`BaseMethod` owns what every method shares: the network, the optimiser and
its schedule, drawing augmented views of a batch of store indices on the store's
device, the non-finite guard and the logging of each loss term. A method adds only
its network and its loss call:

- :class:`SimCLR`: NT-Xent / InfoNCE over V views (:func:`neurocl.losses.info_nce`).
- :class:`YAware`: y-Aware InfoNCE with a kernel prior over chosen attributes
  (:func:`neurocl.losses.yaware_info_nce`).
- :class:`DecoupledUniformity`: uniformity of view centroids, optionally conditioned
  on an attribute kernel (:func:`neurocl.losses.decoupled_uniformity`).
- :class:`SepCLR`: a common and a salient space for a background / target contrast
  (:func:`neurocl.losses.sepclr_loss`).

The losses are pure functions of embedding tensors (tested without a Trainer); with
more than one process they gather the embeddings of every rank, so the loss that each
rank computes is that of the global batch.

Batches are :class:`EpochBatches`: store indices whose order is a function of
``(seed, epoch)`` only and whose views use generators seeded from
``(seed, epoch, position, rank)``, so a run resumed from a mid-epoch checkpoint draws
the very batches and views the uninterrupted run would have drawn.

With ``views.patches`` the views are K random patches per subject
(:class:`neurocl.patches.PatchSampler`): the loss then sees one sample per patch
(``same_location``) or the K patches of a subject as its views (``same_subject``), and a
patch's group and attributes are its subject's; embeddings average patch features on a
grid over the whole volume (:func:`neurocl.patches.sliding_window_features`) unless
``views.patches.embed`` is ``whole``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from neurocl import losses
from neurocl.errors import ConfigError, TrainingError
from neurocl.kernels import attribute_kernel

__all__ = [
    "METHODS",
    "BaseMethod",
    "DecoupledUniformity",
    "EpochBatches",
    "MethodConfig",
    "OptimConfig",
    "SepCLR",
    "SimCLR",
    "TrainingData",
    "YAware",
    "build_method",
    "method_from_checkpoint",
    "step_seed",
]

MethodName = Literal["sepclr", "simclr", "yaware", "decoupled_uniformity"]


class MethodConfig(BaseModel):
    """The contrastive objective, its dimensions and its loss weights."""

    model_config = ConfigDict(extra="forbid")

    name: MethodName = Field("sepclr", description="Objective: sepclr, simclr, yaware or decoupled_uniformity.")
    n_views: int = Field(2, ge=2, le=8, description="Augmented views per subject and step.")
    rep_dim: int | None = Field(
        None, gt=0, description="Single-space methods: representation size (None: the encoder's feature size)."
    )
    proj_dim: int = Field(128, gt=0, description="Single-space methods: projection head output size.")
    common_dim: int = Field(32, gt=0, description="SepCLR: size of the common space.")
    salient_dim: int = Field(32, gt=0, description="SepCLR: size of the salient space.")
    shared_trunk: bool = Field(False, description="SepCLR: one encoder for both spaces (True) or two encoders.")
    temperature: float = Field(0.1, gt=0, description="InfoNCE / y-Aware temperature.")
    attributes: list[str] = Field(
        default_factory=list,
        description="y-Aware / decoupled uniformity: attributes of the kernel prior; SepCLR: the known covariates "
        "(common kernel, covariate independence).",
    )
    sigma: float | list[float] = Field(
        1.0, description="Kernel bandwidth per continuous attribute, in the attribute's units (or SDs, see standardise)."
    )
    kernel_combine: Literal["product", "sum"] = Field("product", description="How per-attribute kernels combine.")
    standardise: bool = Field(
        False, description="Divide continuous attributes by their SD over the training subjects (sigma in SDs)."
    )
    lam: float = Field(0.01, gt=0, description="Decoupled uniformity: ridge λ of the kernel conditioning.")
    t: float = Field(2.0, gt=0, description="Decoupled uniformity: the uniformity scale t.")
    tau: float = Field(0.5, gt=0, description="SepCLR: kernel bandwidth τ.")
    beta_salient: float = Field(1.0, ge=0, description="SepCLR: weight of the salient term.")
    beta_null: float = Field(10.0, ge=0, description="SepCLR: weight of the null (background salient = 0) term.")
    lam_mi: float = Field(10.0, ge=0, description="SepCLR: weight of the common/salient independence term.")
    target_fraction: float = Field(
        0.5, gt=0, lt=1, description="SepCLR: fraction of target subjects in every batch (both groups always present)."
    )
    common_objective: Literal["sepclr", "yaware", "decoupled_uniformity"] = Field(
        "sepclr",
        description="SepCLR: the common term: SepCLR's alignment + uniformity, y-Aware InfoNCE or decoupled uniformity, "
        "the last two with the kernel of method.attributes.",
    )
    lam_cov: float = Field(
        0.0, ge=0, description="SepCLR: weight of the independence of the targets' salient space from method.attributes "
        "(normalised HSIC; missing values masked).",
    )
    null_weighting: Literal["plain", "reference"] = Field(
        "plain", description="SepCLR: null term mean ||s||^2 (plain) or the reference code's mean ||s||^2/(2 tau)."
    )
    view_weighting: Literal["balanced", "reference"] = Field(
        "balanced", description="SepCLR, more than 2 views: uniformity terms averaged (x2/V, balanced) or summed over "
        "views (reference). Same loss for 2 views.",
    )
    embed: Literal["loss_space", "representation"] = Field(
        "loss_space", description="SepCLR: the spaces probed and mapped: the ones the loss shapes (after the MLP) or the "
        "representation before it (what the SepCLR paper probes).",
    )

    @model_validator(mode="after")
    def _kernel_is_usable(self) -> "MethodConfig":
        METHODS[self.name].check_settings(self)
        sigmas = self.sigma if isinstance(self.sigma, list) else [self.sigma]
        if any(value <= 0 for value in sigmas):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if isinstance(self.sigma, list) and len(self.sigma) != len(self.attributes):
            raise ValueError(f"sigma lists {len(self.sigma)} values for {len(self.attributes)} attributes")
        return self

    @property
    def two_spaces(self) -> bool:
        return self.name == "sepclr"


class OptimConfig(BaseModel):
    """Optimiser and learning-rate schedule (stepped every optimiser step)."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimiser.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(5e-5, ge=0, description="Weight decay (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Decay after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from lr/100 (or less when training is short).")


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


class BaseMethod(L.LightningModule):
    """What every contrastive method shares; subclasses give ``build_net``, ``compute_loss`` and ``embed``.

    Parameters
    ----------
    method : MethodConfig or dict
        Objective, dimensions, loss weights.
    encoder : EncoderConfig or dict
        The MONAI encoder (:mod:`neurocl.nets`).
    optim : OptimConfig or dict
        Optimiser and schedule.
    seed : int
        Base seed of every view and batch order.
    data : TrainingData, optional
        Needed to train, not to embed.

    Notes
    -----
    The hyper-parameters are stored as plain JSON types so that checkpoints load
    with ``torch.load(weights_only=True)`` and the network can be rebuilt from them.
    """

    # The MethodConfig fields this method reads besides ``name`` and ``n_views``. Like solo-learn's
    # ``add_and_assert_specific_cfg``, each method owns the check of its own settings
    # (:meth:`check_settings`): one flat config serves every method, and a field another method
    # reads, set away from its default, is refused instead of being silently ignored.
    settings: tuple[str, ...] = ()

    @classmethod
    def check_settings(cls, config: "MethodConfig") -> None:
        """Refuse settings this method does not read (set to a non-default value); raises ValueError."""
        fields = MethodConfig.model_fields
        foreign = [name for name in fields if name not in ("name", "n_views", *cls.settings)
                   and getattr(config, name) != fields[name].get_default(call_default_factory=True)]
        if foreign:
            raise ValueError(
                f"{', '.join(foreign)}: not {'a setting' if len(foreign) == 1 else 'settings'} of method "
                f"{config.name!r}, which reads {', '.join(cls.settings)} (remove {'it' if len(foreign) == 1 else 'them'})"
            )

    def __init__(self, method, encoder, optim=None, seed: int = 0, data: TrainingData | None = None) -> None:
        super().__init__()
        from neurocl.nets import EncoderConfig

        self.method_config = MethodConfig.model_validate(method)
        self.encoder_config = EncoderConfig.model_validate(encoder)
        self.optim_config = OptimConfig.model_validate(optim or {})
        self.seed = seed
        self.save_hyperparameters(
            {
                "method": self.method_config.model_dump(mode="json"),
                "encoder": self.encoder_config.model_dump(mode="json"),
                "optim": self.optim_config.model_dump(mode="json"),
                "seed": seed,
            }
        )
        self.net = self.build_net()
        self.data = data
        # The training store's grid, mask and preprocessing; saved with every checkpoint so that
        # new subjects can be embedded on the same grid (see embed.embed_cohort).
        self.grid: dict | None = None
        # The patch recipe it was trained with (views.patches), saved with checkpoints: it decides
        # how whole volumes are embedded (embed_store).
        self.patches: Any = None
        self._patch_sampler: Any = None
        self._train_batches: EpochBatches | None = None

    # -- what a method defines -------------------------------------------------------
    def build_net(self) -> torch.nn.Module:
        raise NotImplementedError

    def compute_loss(self, views: Tensor, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch of views (V, B, C, *S) of the subjects at store ``indices``."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> dict[str, Tensor]:
        """Representations of volumes (B, C, *S), per space name (single-space: before the projection head)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------
    def encode_views(self, views: Tensor) -> dict[str, Tensor]:
        """Run every view through the network in one batch; outputs come back as (V, B, ...)."""
        n_views, batch = views.shape[:2]
        outputs = self.net(views.flatten(0, 1))
        return {name: value.unflatten(0, (n_views, batch)) for name, value in outputs.items()}

    def batch_attributes(self, indices: np.ndarray) -> Tensor:
        """Kernel attributes of the batch, gathered over ranks (the losses need the global batch's kernel)."""
        local = self.data.attributes[torch.as_tensor(indices)].to(self.device)
        return losses.gather(local) if _distributed() else local

    def attribute_prior(self, indices: np.ndarray) -> Tensor | None:
        """The (B_global, B_global) kernel prior of the batch, or None without attributes."""
        if not self.method_config.attributes:
            return None
        sigma = self.method_config.sigma
        return attribute_kernel(
            self.batch_attributes(indices),
            self.data.attribute_kinds,
            sigma=sigma,
            combine=self.method_config.kernel_combine,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.grid is not None:
            checkpoint["neurocl_grid"] = self.grid
        if self.patches is not None:
            checkpoint["neurocl_patches"] = self.patches.model_dump(mode="json")

    def on_fit_start(self) -> None:
        if self.data.store.spatial_dims != self.encoder_config.spatial_dims:
            raise ConfigError(
                f"encoder.spatial_dims is {self.encoder_config.spatial_dims} but the cohort's images are "
                f"{self.data.store.spatial_dims}D; set encoder: {{spatial_dims: {self.data.store.spatial_dims}}}"
            )
        self.data.store.to(self.device, memory_budget_gb=self.data.memory_budget_gb)
        # Pretrained weights start a fresh training only: a resumed one restores its own (already
        # loaded when this hook runs), and embedding never reaches here.
        if self.encoder_config.weights is not None and self.trainer.ckpt_path is None:
            self.load_pretrained()
        patches = getattr(getattr(self.data.sampler, "config", None), "patches", None)
        if patches is not None:
            from neurocl.patches import PatchSampler

            self.patches = patches
            self._patch_sampler = PatchSampler(patches, self.data.sampler, self.data.store)

    def load_pretrained(self) -> list:
        """Copy ``encoder.weights`` into the encoder(s); the report of each goes to stderr."""
        from neurocl.logs import progress_console
        from neurocl.weights import load_pretrained

        reports = load_pretrained(self.net, self.encoder_config.weights, strict=self.encoder_config.weights_strict)
        trainer = self._trainer  # None outside a fit (self.trainer raises then)
        if trainer is None or trainer.is_global_zero:
            console = progress_console()  # unwrapped in a log file
            console.print(f"encoder weights from {self.encoder_config.weights}:", highlight=False, markup=False)
            for report in reports:
                console.print(f"  {report.describe()}", highlight=False, markup=False)
        return reports

    def train_dataloader(self) -> EpochBatches:
        self._train_batches = self._batches(self.data.train_indices, self.data.batch_size, shuffle=True)
        return self._train_batches

    def val_dataloader(self) -> EpochBatches | list:
        # The largest batch (up to the training one) that the validation subjects fill without
        # repeats; none at all (no validation loss) when the split is too small or has one group.
        largest = min(self.data.batch_size, len(self.data.val_indices) // self.trainer.world_size)
        for batch_size in range(largest, 1, -1):
            try:
                return self._batches(self.data.val_indices, batch_size, shuffle=False)
            except ConfigError:
                continue
        return []

    def _batches(self, indices: np.ndarray, batch_size: int, shuffle: bool) -> EpochBatches:
        is_target = self.data.is_target.cpu().numpy() if self.method_config.two_spaces else None
        return EpochBatches(
            indices,
            batch_size,
            seed=self.seed,
            is_target=is_target,
            target_fraction=self.method_config.target_fraction,
            shuffle=shuffle,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )

    def _views(self, batch: dict, validation: bool) -> tuple[Tensor, np.ndarray]:
        """The views ``(V, B', C, *S)`` of a batch and the store index of each of their ``B'`` samples
        (the batch's subjects; with ``same_location`` patches, each subject once per patch)."""
        # Validation views are the same every epoch (epoch 0's), so validation losses compare
        # across epochs and do not depend on how many epochs this process has run (resume).
        epoch = 0 if validation else batch["epoch"]
        seed = step_seed(self.seed, epoch, batch["position"], self.global_rank, stream=int(validation))
        # Dropout and any other global-RNG use follows the step too, so resuming reproduces it.
        torch.manual_seed(seed)
        generator = torch.Generator(device=self.data.store.device).manual_seed(seed)
        if self._patch_sampler is not None:
            return self._patch_sampler(batch["indices"], n_views=self.method_config.n_views, generator=generator)
        volumes = self.data.store.batch(batch["indices"])
        return self.data.sampler(volumes, n_views=self.method_config.n_views, generator=generator), batch["indices"]

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        if batch["epoch"] != self.current_epoch:
            raise RuntimeError(f"batch of epoch {batch['epoch']} served in epoch {self.current_epoch}")
        total, terms = self.compute_loss(*self._views(batch, validation=False))
        self._check_finite(total, terms)
        self._log_terms("train", total, terms, len(batch["indices"]), on_step=True)
        self._train_batches.mark_done(batch["epoch"], batch["position"])
        return {"loss": total, "terms": {name: value.detach() for name, value in terms.items()}}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, terms = self.compute_loss(*self._views(batch, validation=True))
        self._log_terms("val", total, terms, len(batch["indices"]), on_step=False)

    def _log_terms(self, stage: str, total: Tensor, terms: dict[str, Tensor], batch_size: int, on_step: bool) -> None:
        # Every rank computes the loss of the global batch, so no cross-rank reduction is needed.
        values = {f"{stage}/loss": total.detach(), **{f"{stage}/{k}": v.detach() for k, v in terms.items()}}
        self.log_dict(values, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, prog_bar=False)
        self.log(f"{stage}_loss", total.detach(), on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                 prog_bar=True, logger=False)

    def _check_finite(self, total: Tensor, terms: dict[str, Tensor]) -> None:
        for name, value in {**terms, "loss": total}.items():
            if not torch.isfinite(value).all():
                raise TrainingError(
                    f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): "
                    f"term {name!r} = {value.item()}; lower training.lr, check the inputs for NaN, or use fp32"
                )

    def configure_optimizers(self):
        config = self.optim_config
        parameters = [p for p in self.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
        else:
            optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(parameters, lr=config.lr, weight_decay=config.weight_decay)
        # Not trainer.estimated_stepping_batches: it builds the train loader before a resumed run
        # restores the loader's state, so the resumed epoch would restart from its first batch.
        steps_per_epoch = len(self._batches(self.data.train_indices, self.data.batch_size, shuffle=True))
        total_steps = max(self.trainer.max_epochs * steps_per_epoch, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_factor(total_steps, min(config.warmup_steps, total_steps // 2), config.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def embed_store(self, store, indices: np.ndarray, batch_size: int = 16,
                    progress: bool = False) -> dict[str, np.ndarray]:
        """Representations of the store's volumes at ``indices``, per space: {name: (n, d)} in float64.

        A model trained on patches embeds each volume by the mean of its patches' features on a
        grid of step ``embed_stride`` patch sides (``views.patches.embed: sliding``) or by its
        encoder on the whole volume (``whole``; every neurocl encoder ends in global pooling).
        """
        from rich.progress import Progress

        from neurocl.logs import progress_console, transient_progress
        from neurocl.patches import sliding_window_features

        self.eval()
        store.to(self.device)
        sliding = self.patches is not None and self.patches.embed == "sliding"
        if sliding:
            size = self.patches.sizes(store.spatial_dims)
            stride = tuple(max(1, round(self.patches.embed_stride * side)) for side in size)
        chunks: dict[str, list[np.ndarray]] = {}
        with Progress(transient=True, disable=not transient_progress(progress), console=progress_console()) as bar:
            task = bar.add_task("embedding", total=len(indices))
            for batch_indices, volumes in store.batches(np.asarray(indices), batch_size):
                volumes = volumes.to(self.device)
                if sliding:
                    outputs = sliding_window_features(self.embed, volumes, size, stride, batch_size=batch_size)
                else:
                    outputs = self.embed(volumes)
                for name, value in outputs.items():
                    chunks.setdefault(name, []).append(value.float().cpu().numpy().astype(np.float64))
                bar.advance(task, len(batch_indices))
        return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _lr_factor(total_steps: int, warmup_steps: int, schedule: str):
    """Multiplier of the peak rate at each optimiser step: linear warm-up from 1%, then cosine or flat."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class SimCLR(BaseMethod):
    """SimCLR (Chen et al., ICML 2020): InfoNCE between views, ℓ(a, p) = −sim(a, p) + log Σ_{b≠a} exp sim(a, b)."""

    settings = ("rep_dim", "proj_dim", "temperature")

    def build_net(self) -> torch.nn.Module:
        from neurocl.nets import ContrastiveNet

        config = self.method_config
        return ContrastiveNet(self.encoder_config, rep_dim=config.rep_dim, proj_dim=config.proj_dim)

    def compute_loss(self, views: Tensor, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.encode_views(views)["proj"]
        loss = losses.info_nce(z, temperature=self.method_config.temperature, distributed=_distributed())
        return loss, {"info_nce": loss}

    def embed(self, x: Tensor) -> dict[str, Tensor]:
        return {"emb": self.net(x)["rep"]}


class YAware(SimCLR):
    """y-Aware InfoNCE (Dufumier et al., MICCAI 2021): positives weighted by the attribute kernel w_ij.

    ℓ(a) = −Σ_{b≠a} W(a,b)[sim(a,b) − log Σ_{b'≠a} exp sim(a,b')], W(a,b) = w_ij / Σ_{b'≠a} w_ij'.
    """

    settings = SimCLR.settings + ("attributes", "sigma", "kernel_combine", "standardise")

    @classmethod
    def check_settings(cls, config: "MethodConfig") -> None:
        super().check_settings(config)
        if not config.attributes:
            raise ValueError("method 'yaware' needs at least one attribute in method.attributes (e.g. [age])")

    def compute_loss(self, views: Tensor, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.encode_views(views)["proj"]
        loss = losses.yaware_info_nce(
            z, kernel=self.attribute_prior(indices), temperature=self.method_config.temperature,
            distributed=_distributed(),
        )
        return loss, {"yaware": loss}


class DecoupledUniformity(SimCLR):
    """Decoupled uniformity (Dufumier et al., ICML 2023): log mean_{i≠j} exp(−t‖μ_i − μ_j‖²) of view centroids μ.

    With attributes, μ ← αμ with α = (K + λI)⁻¹K, K the attribute kernel of the batch.
    """

    settings = ("rep_dim", "proj_dim", "attributes", "sigma", "kernel_combine", "standardise", "lam", "t")

    def compute_loss(self, views: Tensor, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.method_config
        z = self.encode_views(views)["proj"]
        loss = losses.decoupled_uniformity(
            z, kernel=self.attribute_prior(indices), lam=config.lam, t=config.t, distributed=_distributed()
        )
        return loss, {"uniformity": loss}


class SepCLR(BaseMethod):
    """SepCLR (Louiset et al., ICLR 2024): common + β_s·salient + β_n·null + λ·mi over a two-space network.

    With ``method.attributes`` the common term can use their kernel (``common_objective``) and
    ``lam_cov``·cov keeps them out of the targets' salient space (:func:`neurocl.losses.sepclr_loss`).
    """

    settings = ("common_dim", "salient_dim", "shared_trunk", "embed", "tau", "beta_salient", "beta_null", "lam_mi",
                "target_fraction", "attributes", "sigma", "kernel_combine", "standardise", "common_objective",
                "temperature", "lam", "t", "lam_cov", "null_weighting", "view_weighting")

    @classmethod
    def check_settings(cls, config: "MethodConfig") -> None:
        super().check_settings(config)
        if not config.attributes:
            if config.common_objective == "yaware":
                raise ValueError("method.common_objective 'yaware' needs at least one attribute in method.attributes")
            if config.lam_cov > 0:
                raise ValueError("method.lam_cov > 0 needs the covariates in method.attributes (e.g. [age, sex, site])")

    def build_net(self) -> torch.nn.Module:
        from neurocl.nets import SepCLRNet

        config = self.method_config
        return SepCLRNet(self.encoder_config, common_dim=config.common_dim, salient_dim=config.salient_dim,
                         shared_trunk=config.shared_trunk, embed=config.embed)

    def compute_loss(self, views: Tensor, indices: np.ndarray) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.method_config
        outputs = self.encode_views(views)
        rows = torch.as_tensor(indices)
        is_target = self.data.is_target[rows].to(self.device)
        # Local rows: the loss gathers them over ranks with the embeddings.
        attributes = self.data.attributes[rows].to(self.device) if config.attributes else None
        return losses.sepclr_loss(
            outputs["common"], outputs["salient"], is_target, tau=config.tau, beta_salient=config.beta_salient,
            beta_null=config.beta_null, lam_mi=config.lam_mi, attributes=attributes,
            attribute_kinds=self.data.attribute_kinds if config.attributes else None, sigma=config.sigma,
            kernel_combine=config.kernel_combine, common_objective=config.common_objective,
            temperature=config.temperature, lam=config.lam, t=config.t, lam_cov=config.lam_cov,
            null_weighting=config.null_weighting, view_weighting=config.view_weighting, distributed=_distributed(),
        )

    def embed(self, x: Tensor) -> dict[str, Tensor]:
        outputs = self.net(x)
        return {"common": outputs["common_rep"], "salient": outputs["salient_rep"]}


METHODS: dict[str, type[BaseMethod]] = {
    "sepclr": SepCLR,
    "simclr": SimCLR,
    "yaware": YAware,
    "decoupled_uniformity": DecoupledUniformity,
}


def build_method(method, encoder, optim=None, seed: int = 0, data: TrainingData | None = None) -> BaseMethod:
    """The Lightning module of ``method.name`` (configs as pydantic models or plain dicts)."""
    method = MethodConfig.model_validate(method)
    return METHODS[method.name](method, encoder, optim, seed=seed, data=data)


def method_from_checkpoint(checkpoint: dict) -> BaseMethod:
    """Rebuild a trained method (CPU, eval mode) from a loaded Lightning checkpoint dict."""
    hparams = checkpoint["hyper_parameters"]
    module = build_method(hparams["method"], hparams["encoder"], hparams["optim"], seed=hparams["seed"])
    module.load_state_dict(checkpoint["state_dict"])
    if checkpoint.get("neurocl_patches") is not None:
        from neurocl.patches import PatchConfig

        module.patches = PatchConfig.model_validate(checkpoint["neurocl_patches"])
    return module.eval()
