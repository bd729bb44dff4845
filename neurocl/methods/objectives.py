"""The four methods, each its network and its loss call: :class:`SimCLR`, :class:`YAware`,
:class:`DecoupledUniformity` and :class:`SepCLR`."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from neurocl import losses
from neurocl.methods.base import BaseMethod
from neurocl.methods.batches import _distributed
from neurocl.methods.config import MethodConfig
from neurocl.nets import ContrastiveNet, SepCLRNet


class SimCLR(BaseMethod):
    """SimCLR (Chen et al., ICML 2020): InfoNCE between views, ℓ(a, p) = −sim(a, p) + log Σ_{b≠a} exp sim(a, b)."""

    settings = ("rep_dim", "proj_dim", "temperature")

    def build_net(self) -> torch.nn.Module:
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
                "temperature", "lam", "t", "lam_cov", "null_weighting", "view_weighting", "mi_estimator")

    @classmethod
    def check_settings(cls, config: "MethodConfig") -> None:
        super().check_settings(config)
        if not config.attributes:
            if config.common_objective == "yaware":
                raise ValueError("method.common_objective 'yaware' needs at least one attribute in method.attributes")
            if config.lam_cov > 0:
                raise ValueError("method.lam_cov > 0 needs the covariates in method.attributes (e.g. [age, sex, site])")

    def build_net(self) -> torch.nn.Module:
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
        total, terms = losses.sepclr_loss(
            outputs["common"], outputs["salient"], is_target, tau=config.tau, beta_salient=config.beta_salient,
            beta_null=config.beta_null, lam_mi=config.lam_mi, attributes=attributes,
            attribute_kinds=self.data.attribute_kinds if config.attributes else None, sigma=config.sigma,
            kernel_combine=config.kernel_combine, common_objective=config.common_objective,
            temperature=config.temperature, lam=config.lam, t=config.t, lam_cov=config.lam_cov,
            null_weighting=config.null_weighting, view_weighting=config.view_weighting,
            mi_estimator=config.mi_estimator, distributed=_distributed(),
        )
        if torch.is_grad_enabled():
            # Which term moves the embeddings (train/share_<term>): a term's value says little.
            weights = {"common": 1.0, "salient": config.beta_salient, "null": config.beta_null, "mi": config.lam_mi,
                       "cov": config.lam_cov}
            shares = losses.gradient_shares({name: weights[name] * value for name, value in terms.items()},
                                            [outputs["common"], outputs["salient"]])
            self.diagnostics.update({f"share_{name}": share for name, share in shares.items()})
        return total, terms

    def embed(self, x: Tensor) -> dict[str, Tensor]:
        outputs = self.net(x)
        return {"common": outputs["common_rep"], "salient": outputs["salient_rep"]}
