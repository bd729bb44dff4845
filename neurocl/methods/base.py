"""What every contrastive method shares: :class:`BaseMethod` (network, optimiser and schedule, views
of a batch on the store's device, the non-finite guard, the logging of each loss term)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from neurocl import losses
from neurocl.errors import ConfigError, TrainingError
from neurocl.kernels import attribute_kernel
from neurocl.logs import progress_console, transient_progress
from neurocl.methods.batches import EpochBatches, TrainingData, _distributed, step_seed
from neurocl.methods.config import MethodConfig, OptimConfig
from neurocl.nets import EncoderConfig
from neurocl.patches import PatchSampler, sliding_window_features
from neurocl.weights import load_pretrained


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

        self.method_config = MethodConfig.model_validate(method)
        self.encoder_config = EncoderConfig.model_validate(encoder)
        self.optim_config = OptimConfig.model_validate(optim or {})
        self.seed = seed
        # Per-step figures a method reports beside its loss terms (logged, never summed into the loss).
        self.diagnostics: dict[str, Tensor] = {}
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
            self.patches = patches
            self._patch_sampler = PatchSampler(patches, self.data.sampler, self.data.store)

    def load_pretrained(self) -> list:
        """Copy ``encoder.weights`` into the encoder(s); the report of each goes to stderr."""
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
        self.diagnostics = {}
        total, terms = self.compute_loss(*self._views(batch, validation=False))
        self._check_finite(total, terms)
        self._log_terms("train", total, {**terms, **self.diagnostics}, len(batch["indices"]), on_step=True)
        self._train_batches.mark_done(batch["epoch"], batch["position"])
        # The diagnostics (e.g. each term's gradient share) are logged beside the terms, not summed into the loss.
        return {"loss": total, "terms": {name: value.detach() for name, value in {**terms, **self.diagnostics}.items()}}

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

    def on_before_optimizer_step(self, optimizer) -> None:
        # A finite loss can still give non-finite gradients (a half-precision kernel's overflow, a
        # 0/0 in a backward): stepping on them writes NaN into the weights, which later stages would
        # only show as NaN embeddings or maps. One host sync per step, as for the loss. Not under
        # fp16 (16-mixed): its gradient scaler expects inf gradients now and then and skips those steps.
        if str(self.trainer.precision).startswith("16"):
            return
        gradients = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if gradients and not bool(torch.stack([g.isfinite().all() for _, g in gradients]).all()):
            bad = [name for name, g in gradients if not g.isfinite().all()]
            raise TrainingError(
                f"non-finite gradient at step {self.global_step} (epoch {self.current_epoch}) in {len(bad)} "
                f"parameter(s), first {bad[0]!r}; the loss was finite. Lower training.lr, or use precision: 32-true "
                "if it happens under bf16/fp16"
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
        self.eval()
        store.to(self.device)
        sliding = self.patches is not None and self.patches.embed == "sliding"
        if sliding:
            size = self.patches.sizes(store.spatial_dims)
            stride = self.patches.grid_strides(store.spatial_dims)
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
