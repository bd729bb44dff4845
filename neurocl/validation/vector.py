"""SepCLR separates common from salient latents of vector data (Louiset et al., ICLR 2024).

Louiset, Duchesnay, Grigis & Gori, "Separating common from salient patterns with Contrastive
Representation Learning", ICLR 2024, https://arxiv.org/abs/2402.11928. The paper validates
SepCLR on images; this suite is neurocl's vector-data counterpart, where every factor is known.

Setup. Every sample has common latents c, uniform on the sphere S^{k_c − 1} (the space where the
hyperspherical common space can recover them up to a rotation, Zimmermann et al., 2021), and
salient latents s: uniform in [0, 1]^{k_s} for target samples and exactly 0 for background
samples (like a severity that controls lack). Observations are x = g(c, s) with g a random
injective leaky-ReLU MLP into ``obs_dim`` dimensions. A positive pair perturbs the latents
(Normal noise on c renormalised onto the sphere; Normal noise on a target's s truncated to the
box; a background's s stays 0) and mixes both versions through g. Two MLP encoders, common and
salient, are trained with ``losses.sepclr_loss``.

Recovery is the linear R² of each latent from each space on held-out target samples (the only
ones where s varies): the common space should recover c and not s, the salient space s and not c.
Beside them stand contrastive PCA (Abid et al., 2018; ``neurocl.baselines.ContrastivePCA``) fitted
on the observations, and the observations themselves (everything, mixed nonlinearly).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.table import Table

from neurocl import losses
from neurocl.baselines import ContrastivePCA
from neurocl.validation._core import HiddenWidths, mlp_encoder, random_mlp, seeded, standardised, train, validated_config
from neurocl.validation.identifiability import sample_latents, sample_positives
from neurocl.validation.metrics import linear_r2


class VectorConfig(BaseModel):
    """One vector-data SepCLR experiment. :meth:`preset` gives the settings documented in docs/validation.md."""

    model_config = ConfigDict(extra="forbid")

    n_common: int = Field(3, ge=2, le=32, description="Common latents k_c (on the sphere S^{k_c − 1}).")
    n_salient: int = Field(2, ge=1, le=32, description="Salient latents k_s (target only; 0 in background).")
    obs_dim: int = Field(8, ge=2, le=1024, description="Observation dimension (>= k_c + k_s: g is injective).")
    mixing_layers: int = Field(2, ge=1, le=10, description="Layers of the mixing MLP g.")
    noise_scale: float = Field(0.1, gt=0, description="Normal σ of the latent perturbation that makes a positive.")
    hidden: HiddenWidths = Field([128, 128], description="Hidden widths of each encoder MLP.")
    common_dim: int | None = Field(None, ge=2, description="Common space width (default k_c).")
    salient_dim: int | None = Field(None, ge=1, description="Salient space width (default k_s).")
    tau: float = Field(0.05, gt=0, description="sepclr_loss kernel bandwidth τ (its own default, 0.5, recovers less here).")
    beta_salient: float = Field(1.0, ge=0, description="Weight of the salient term.")
    beta_null: float = Field(10.0, ge=0, description="Weight of the background-to-null term.")
    lam_mi: float = Field(10.0, ge=0, description="Weight of the common/salient mutual-information term.")
    batch_size: int = Field(256, ge=4, description="Samples per step, half background and half target.")
    steps: int = Field(2000, ge=1, description="Adam steps (cosine decay of the learning rate).")
    lr: float = Field(1e-2, gt=0, description="Initial Adam learning rate.")
    n_eval: int = Field(4096, ge=64, description="Held-out target samples to fit the probes, and as many to score.")
    n_baseline: int = Field(1000, ge=16, description="Samples per group that contrastive PCA is fitted on.")
    cpca_alpha: float | None = Field(None, ge=0, description="cPCA contrast α (None: the baseline's own choice).")
    seed: int = 0

    @model_validator(mode="after")
    def _injective_mixing(self) -> "VectorConfig":
        if self.obs_dim < self.n_latents:
            raise ValueError(f"obs_dim ({self.obs_dim}) must be >= n_common + n_salient ({self.n_latents})")
        return self

    @property
    def n_latents(self) -> int:
        return self.n_common + self.n_salient

    @classmethod
    def preset(cls, quick: bool = False, **overrides) -> "VectorConfig":
        """The documented full (minutes on 2 CPU cores) or ``quick`` (seconds) setting."""
        settings = dict(PRESETS[quick])
        settings.update(overrides)
        return validated_config(cls, settings)


PRESETS: dict[bool, dict] = {
    False: dict(n_common=3, n_salient=2, obs_dim=8, mixing_layers=2, noise_scale=0.1, hidden=[128, 128], tau=0.05,
                lam_mi=10.0, batch_size=256, steps=2000, lr=1e-2, n_eval=4096, n_baseline=1000),
    True: dict(n_common=3, n_salient=2, obs_dim=8, mixing_layers=2, noise_scale=0.1, hidden=[64, 64], tau=0.05,
               lam_mi=10.0, batch_size=256, steps=600, lr=1e-2, n_eval=2048, n_baseline=500),
}


@dataclass
class VectorResult:
    """R² of every latent (rows, in ``latents`` order) from every space (``r2[space]``)."""

    config: VectorConfig
    latents: list[str]
    r2: dict[str, list[float]]
    background_salient_norm: float
    target_salient_norm: float
    final_terms: dict[str, float]
    seconds: float

    def mean_r2(self, space: str, kind: str) -> float:
        """Mean R² of the ``kind`` ("common" or "salient") latents from ``space``."""
        values = [value for name, value in zip(self.latents, self.r2[space]) if name.startswith(kind)]
        return float(np.mean(values))

    def to_dict(self) -> dict:
        record = asdict(self)
        record["config"] = self.config.model_dump()
        record["mean_r2"] = {space: {kind: self.mean_r2(space, kind) for kind in ("common", "salient")}
                             for space in self.r2}
        return record


class _Generative:
    """Latents, positives and observations of the background / target process."""

    def __init__(self, config: VectorConfig, rng: np.random.Generator) -> None:
        self.config = config
        sizes = [config.n_latents] + [config.obs_dim] * config.mixing_layers
        sample = self.latents(torch.ones(8192, dtype=torch.bool), torch.Generator().manual_seed(config.seed + 2))
        self.mixing = standardised(random_mlp(sizes, rng), sample)

    def latents(self, is_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, k_c + k_s): common on the sphere for all, salient uniform for targets and 0 for background."""
        common = sample_latents("sphere", self.config.n_common, len(is_target), generator)
        salient = sample_latents("box", self.config.n_salient, len(is_target), generator)
        return torch.cat([common, salient * is_target[:, None]], dim=1)

    def positives(self, latents: torch.Tensor, is_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A perturbed copy of each latent vector; the salient part of background rows stays 0."""
        n_common, scale = self.config.n_common, self.config.noise_scale
        common = sample_positives("sphere", latents[:, :n_common], "normal", scale, generator)
        salient = sample_positives("box", latents[:, n_common:], "normal", scale, generator)
        return torch.cat([common, salient * is_target[:, None]], dim=1)

    def groups(self, size: int) -> torch.Tensor:
        """Half background, half target (every batch holds both groups, as sepclr_loss requires)."""
        return torch.arange(size) >= size // 2


def run_vector(config: VectorConfig, progress: bool = True) -> VectorResult:
    """Train SepCLR's two encoders on the generative process; score each space and cPCA by linear R²."""
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    process = _Generative(config, rng)
    with seeded(config.seed):
        common_encoder = mlp_encoder(config.obs_dim, config.hidden, config.common_dim or config.n_common)
        salient_encoder = mlp_encoder(config.obs_dim, config.hidden, config.salient_dim or config.n_salient)
    is_target = process.groups(config.batch_size)
    last_terms: list[dict[str, float]] = []

    def loss_at_step(step: int) -> torch.Tensor:
        latents = process.latents(is_target, generator)
        views = process.mixing(torch.stack([latents, process.positives(latents, is_target, generator)]))
        total, terms = losses.sepclr_loss(
            common_encoder(views), salient_encoder(views), is_target, tau=config.tau,
            beta_salient=config.beta_salient, beta_null=config.beta_null, lam_mi=config.lam_mi,
        )
        if step >= config.steps - 50:
            last_terms.append({name: float(value.detach()) for name, value in terms.items()})
        return total

    parameters = [*common_encoder.parameters(), *salient_encoder.parameters()]
    train(parameters, loss_at_step, config.steps, config.lr,
          f"SepCLR vector (k_c={config.n_common}, k_s={config.n_salient})", progress)

    eval_generator = torch.Generator().manual_seed(config.seed + 1)
    targets = torch.ones(config.n_eval, dtype=torch.bool)
    fit_latents, test_latents = (process.latents(targets, eval_generator) for _ in range(2))
    background = process.latents(torch.zeros(config.n_eval, dtype=torch.bool), eval_generator)
    with torch.no_grad():
        fit_obs, test_obs, background_obs = (process.mixing(z) for z in (fit_latents, test_latents, background))
        spaces = {
            "SepCLR common": (common_encoder(fit_obs), common_encoder(test_obs)),
            "SepCLR salient": (salient_encoder(fit_obs), salient_encoder(test_obs)),
            "observations": (fit_obs, test_obs),
        }
        background_norm = float(salient_encoder(background_obs).norm(dim=1).mean())
        target_norm = float(spaces["SepCLR salient"][1].norm(dim=1).mean())
    cpca = _fit_cpca(process, config, eval_generator)
    spaces["cPCA"] = (cpca.transform(fit_obs.numpy()), cpca.transform(test_obs.numpy()))
    r2 = {name: linear_r2(np.asarray(fit), fit_latents.numpy(), np.asarray(test), test_latents.numpy()).tolist()
          for name, (fit, test) in spaces.items()}
    return VectorResult(
        config=config,
        latents=[f"common_{k}" for k in range(config.n_common)] + [f"salient_{k}" for k in range(config.n_salient)],
        r2={name: r2[name] for name in ("SepCLR common", "SepCLR salient", "cPCA", "observations")},
        background_salient_norm=background_norm,
        target_salient_norm=target_norm,
        final_terms={name: float(np.mean([terms[name] for terms in last_terms])) for name in last_terms[0]},
        seconds=time.perf_counter() - start,
    )


def _fit_cpca(process: _Generative, config: VectorConfig, generator: torch.Generator):
    """Contrastive PCA with k_s components, fitted on fresh target and background observations."""
    with torch.no_grad():
        target = process.mixing(process.latents(torch.ones(config.n_baseline, dtype=torch.bool), generator)).numpy()
        background = process.mixing(process.latents(torch.zeros(config.n_baseline, dtype=torch.bool), generator)).numpy()
    is_target = np.r_[np.ones(len(target), bool), np.zeros(len(background), bool)]
    cpca = ContrastivePCA(n_components=config.n_salient, alpha=config.cpca_alpha, random_state=config.seed)
    return cpca.fit(np.concatenate([target, background]), is_target)


def print_vector(result: VectorResult, console) -> None:
    """Rich table of the R² of every latent from every space, then the separation summary."""
    table = Table(title="SepCLR on vector data: linear R² of each latent from each space (held-out targets)")
    table.add_column("latent")
    for space in result.r2:
        table.add_column(space, justify="right")
    for row, name in enumerate(result.latents):
        table.add_row(name, *(f"{result.r2[space][row]:.3f}" for space in result.r2))
    for kind in ("common", "salient"):
        table.add_row(f"mean {kind}", *(f"{result.mean_r2(space, kind):.3f}" for space in result.r2), style="bold")
    console.print(table)
    console.print(
        f"salient-space norm: background {result.background_salient_norm:.3f}, target {result.target_salient_norm:.3f}; "
        f"final terms " + ", ".join(f"{name} {value:.3f}" for name, value in result.final_terms.items())
        + f"; {result.seconds:.0f} s"
    )
