"""The settings of a method: :class:`MethodConfig` (objective, dimensions, loss weights) and
:class:`OptimConfig` (optimiser and schedule)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# The method classes by name, filled by neurocl.methods.registry: MethodConfig's validator asks the
# chosen class to check its settings, and the classes themselves need MethodConfig (no import cycle).
METHODS: dict = {}

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
    mi_estimator: Literal["jem", "kernel_mi"] = Field(
        "jem", description="SepCLR: the independence term: the paper's k-JEM (minus the joint entropy, which also "
        "spreads each space) or kernel_mi (joint minus marginal entropies of the target rows: dependence only).",
    )
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
        # Each method checks its own settings (BaseMethod.check_settings); the classes are registered
        # by neurocl.methods.registry, which the package imports before anyone can validate a config.
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
