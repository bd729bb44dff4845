"""Contrastive learning inverts the data-generating process (Zimmermann et al., ICML 2021).

Zimmermann, Sharma, Schneider, Bethge & Brendel, "Contrastive Learning Inverts the Data
Generating Process", ICML 2021, https://arxiv.org/abs/2102.08850.

Setup. Latents z are uniform in the box [0, 1]ⁿ or on the sphere Sⁿ⁻¹; a positive z̃ is z plus
Laplace or Normal noise (truncated to the box, or renormalised onto the sphere); observations are
x = g(z) with g a random invertible leaky-ReLU MLP. An MLP encoder f is trained on pairs
(g(z), g(z̃)) with

* box: ``losses.lp_info_nce`` with p = 1 (their L1 InfoNCE; p ≠ 2 makes h = f∘g a permutation
  and sign flip of z, so each learned dimension matches one latent: high MCC);
* sphere: ``losses.info_nce`` on normalised outputs (h is then an orthogonal map of z: high
  linear R², while MCC is not expected to be 1).

Recovery is measured on held-out samples with :func:`~neurocl.validation.metrics.mcc` and
:func:`~neurocl.validation.metrics.linear_r2`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from neurocl import losses
from neurocl.validation._core import HiddenWidths, mlp_encoder, random_mlp, seeded, standardised, train, validated_config
from neurocl.validation.metrics import linear_r2, mcc


class IdentifiabilityConfig(BaseModel):
    """One identifiability experiment. :meth:`preset` gives the settings documented in docs/validation.md."""

    model_config = ConfigDict(extra="forbid")

    space: Literal["box", "sphere"] = "box"
    n_latents: int = Field(10, ge=2, le=64, description="Number of latents n (= observation dimension).")
    noise: Literal["laplace", "normal"] = Field("laplace", description="Conditional p(z̃ | z).")
    noise_scale: float = Field(0.1, gt=0, description="Laplace scale b or Normal σ of z̃ − z.")
    mixing_layers: int = Field(3, ge=1, le=10, description="Layers of the invertible mixing MLP g.")
    hidden: HiddenWidths = Field([256, 256, 256], description="Hidden widths of the encoder MLP f.")
    encoder_bias: bool = Field(True, description="Give the encoder's layers biases (the sphere presets do not).")
    p: float = Field(1.0, gt=0, description="Exponent of lp_info_nce (box only).")
    temperature: float = Field(1.0, gt=0, description="Loss temperature τ.")
    batch_size: int = Field(1024, ge=8, description="Pairs per step (the other pairs are the negatives).")
    steps: int = Field(3000, ge=1, description="Adam steps (cosine decay of the learning rate).")
    lr: float = Field(1e-3, gt=0, description="Initial Adam learning rate.")
    n_eval: int = Field(4096, ge=64, description="Held-out samples to fit the linear probe, and as many to score.")
    seed: int = 0

    @classmethod
    def preset(cls, space: Literal["box", "sphere"] = "box", quick: bool = False, **overrides) -> "IdentifiabilityConfig":
        """The documented full (minutes on 2 CPU cores) or ``quick`` (seconds) setting for ``space``."""
        settings = dict(PRESETS[(space, quick)])
        settings.update(overrides)
        return validated_config(cls, dict(settings, space=space))


PRESETS: dict[tuple[str, bool], dict] = {
    # Laplace b = 0.1, not 0.05: at b = 0.05 in 10 dimensions z and z̃ share about 13 nats, far
    # beyond the log(512) ≈ 6.2 nats a batch of 512 can resolve, so InfoNCE saturates (loss ≈ 0.07)
    # with a few latents still unrecovered; at 0.1 the loss stays informative until all are.
    ("box", False): dict(n_latents=10, noise="laplace", noise_scale=0.1, p=1.0, temperature=0.05,
                         hidden=[256, 256, 256], batch_size=512, steps=2000, lr=3e-3),
    ("box", True): dict(n_latents=4, noise="laplace", noise_scale=0.1, p=1.0, temperature=0.05,
                        hidden=[64, 64], batch_size=256, steps=300, lr=1e-2, n_eval=2048),
    ("sphere", False): dict(n_latents=10, noise="normal", noise_scale=0.1, temperature=0.05, encoder_bias=False,
                            hidden=[256, 256, 256], batch_size=512, steps=2000, lr=3e-3),
    ("sphere", True): dict(n_latents=4, noise="normal", noise_scale=0.1, temperature=0.05, encoder_bias=False,
                           hidden=[64, 64], batch_size=256, steps=400, lr=1e-2, n_eval=2048),
}


@dataclass
class IdentifiabilityResult:
    """Measured recovery on held-out samples.

    ``mixing_*`` score the raw observations x = g(z) and ``untrained_*`` the encoder at its random
    initialisation: what learning must beat.
    """

    config: IdentifiabilityConfig
    mcc: float
    mcc_per_latent: list[float]
    r2: float
    r2_per_latent: list[float]
    mixing_mcc: float
    mixing_r2: float
    untrained_mcc: float
    untrained_r2: float
    final_loss: float
    seconds: float
    cpu_seconds: float

    def to_dict(self) -> dict:
        record = asdict(self)
        record["config"] = self.config.model_dump()
        return record


def sample_latents(space: str, n_latents: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform latents (size, n) in the box [0, 1]ⁿ or on the unit sphere."""
    if space == "box":
        return torch.rand(size, n_latents, generator=generator)
    direction = torch.randn(size, n_latents, generator=generator)
    return direction / direction.norm(dim=1, keepdim=True)


def sample_positives(space: str, latents: torch.Tensor, noise: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Positives z̃ ~ p(z̃ | z): noise truncated to the box (exactly, by inverse CDF) or renormalised onto the sphere."""
    if space == "box":
        return _truncated_to_unit_box(latents, noise, scale, generator)
    if noise == "laplace":
        uniform = torch.rand(latents.shape, generator=generator) - 0.5
        perturbation = -scale * torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    else:
        perturbation = scale * torch.randn(latents.shape, generator=generator)
    shifted = latents + perturbation
    return shifted / shifted.norm(dim=1, keepdim=True)


def _truncated_to_unit_box(latents: torch.Tensor, noise: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    # Inverse-CDF sampling of the noise distribution restricted to [0, 1]: exact, with no rejection loop.
    # float64 keeps the CDF's tails (as small as exp(−1/b)) representable.
    centre = latents.double()
    if noise == "laplace":
        def cdf(x):
            return torch.where(x < centre, 0.5 * torch.exp((x - centre) / scale), 1 - 0.5 * torch.exp(-(x - centre) / scale))

        def inverse_cdf(u):
            return torch.where(u < 0.5, centre + scale * torch.log(2 * u), centre - scale * torch.log(2 * (1 - u)))
    else:
        def cdf(x):
            return torch.special.ndtr((x - centre) / scale)

        def inverse_cdf(u):
            return centre + scale * torch.special.ndtri(u)
    low, high = cdf(torch.zeros_like(centre)), cdf(torch.ones_like(centre))
    uniform = torch.rand(latents.shape, generator=generator, dtype=torch.float64)
    return inverse_cdf(low + uniform * (high - low)).clamp(0.0, 1.0).float()


def _standardised(mixing: torch.nn.Module, space: str, n_latents: int, seed: int) -> torch.nn.Sequential:
    # In the box, centring matters too: uniform latents in [0, 1] leave an offset in g(z) that
    # otherwise slows training several-fold. On the sphere it must not be done: there g
    # (bias-free leaky ReLU) is positively homogeneous, and keeping x = λ·g(z) homogeneous is what
    # lets a bias-free encoder map rays to rays (see IdentifiabilityConfig.encoder_bias).
    sample = sample_latents(space, n_latents, 8192, torch.Generator().manual_seed(seed + 2))
    return standardised(mixing, sample, centre=space == "box")


def run_identifiability(config: IdentifiabilityConfig, progress: bool = True) -> IdentifiabilityResult:
    """Train the encoder on the configured generative process and measure recovery on held-out samples."""
    start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    n = config.n_latents
    mixing = _standardised(random_mlp([n] * (config.mixing_layers + 1), rng), config.space, n, config.seed)
    with seeded(config.seed):
        encoder = mlp_encoder(n, config.hidden, n, bias=config.encoder_bias)

    def represent(latents: torch.Tensor) -> torch.Tensor:
        output = encoder(mixing(latents))
        # info_nce compares directions only, so the sphere's representation is the normalised output.
        return output / output.norm(dim=1, keepdim=True) if config.space == "sphere" else output

    def loss_at_step(step: int) -> torch.Tensor:
        latents = sample_latents(config.space, n, config.batch_size, generator)
        positives = sample_positives(config.space, latents, config.noise, config.noise_scale, generator)
        anchor, positive = encoder(mixing(latents)), encoder(mixing(positives))
        if config.space == "box":
            return losses.lp_info_nce(anchor, positive, p=config.p, temperature=config.temperature)
        return losses.info_nce(torch.stack([anchor, positive]), temperature=config.temperature)

    eval_generator = torch.Generator().manual_seed(config.seed + 1)
    fit_latents = sample_latents(config.space, n, config.n_eval, eval_generator)
    test_latents = sample_latents(config.space, n, config.n_eval, eval_generator)

    def scores(observe) -> tuple[float, np.ndarray, np.ndarray]:
        """MCC, per-latent MCC and per-latent R² of a representation of the held-out latents."""
        with torch.no_grad():
            fit, test = observe(fit_latents).numpy(), observe(test_latents).numpy()
        mcc_value, mcc_per_latent = mcc(test_latents.numpy(), test)
        return mcc_value, mcc_per_latent, linear_r2(fit, fit_latents.numpy(), test, test_latents.numpy())

    mixing_mcc, _, mixing_r2 = scores(mixing)
    untrained_mcc, _, untrained_r2 = scores(represent)
    history = train(list(encoder.parameters()), loss_at_step, config.steps, config.lr,
                    f"identifiability ({config.space}, n={n})", progress)
    mcc_value, mcc_per_latent, r2_per_latent = scores(represent)
    return IdentifiabilityResult(
        config=config,
        mcc=mcc_value,
        mcc_per_latent=mcc_per_latent.tolist(),
        r2=float(r2_per_latent.mean()),
        r2_per_latent=r2_per_latent.tolist(),
        mixing_mcc=mixing_mcc,
        mixing_r2=float(mixing_r2.mean()),
        untrained_mcc=untrained_mcc,
        untrained_r2=float(untrained_r2.mean()),
        final_loss=float(np.mean(history[-50:])),
        seconds=time.perf_counter() - start,
        # CPU time beside wall time: on a shared machine the wall clock measures the other jobs too.
        cpu_seconds=time.process_time() - cpu_start,
    )


def print_identifiability(results: list[IdentifiabilityResult], console) -> None:
    """Rich table of the measured recovery, one row per experiment, with what learning must beat."""
    table = Table(title="Identifiability (held-out samples): trained encoder vs untrained encoder vs observations x")
    for column in ("space", "p(z̃|z)", "loss", "n", "MCC", "R²", "untrained MCC", "untrained R²", "x MCC", "x R²",
                   "final loss", "seconds", "CPU s"):
        table.add_column(column, justify="left" if column in ("space", "p(z̃|z)", "loss") else "right")
    for result in results:
        config = result.config
        loss = f"lp_info_nce p={config.p:g}" if config.space == "box" else "info_nce"
        table.add_row(
            config.space, f"{config.noise} {config.noise_scale:g}", f"{loss} τ={config.temperature:g}",
            str(config.n_latents), f"{result.mcc:.3f}", f"{result.r2:.3f}", f"{result.untrained_mcc:.3f}",
            f"{result.untrained_r2:.3f}", f"{result.mixing_mcc:.3f}", f"{result.mixing_r2:.3f}",
            f"{result.final_loss:.4f}", f"{result.seconds:.0f}", f"{result.cpu_seconds:.0f}",
        )
    console.print(table)
