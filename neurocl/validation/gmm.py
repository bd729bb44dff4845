"""InfoNCE finds the Fisher subspace of a Gaussian mixture where PCA does not (Bansal et al., 2024).

Bansal, Kavis & Sanghavi, "Understanding Self-Supervised Learning via Gaussian Mixture Models"
(later versions: "Understanding Contrastive Learning via Gaussian Mixture Models"), arXiv:2411.03517,
https://arxiv.org/abs/2411.03517.

Setup. K components in d dimensions with means μ_k and one shared, non-isotropic covariance Σ;
a positive of x is an independent draw from x's component. A linear encoder z = Wx
(W: (K − 1) × d) is trained with ``losses.info_nce``. The learned subspace (the row space of W)
is compared with the Fisher subspace span{Σ⁻¹(μ_k − μ̄)} through principal angles, beside the
top K − 1 principal directions (PCA) and supervised LDA fitted on labelled samples.

Σ is built so that PCA fails: its eigenvalues fall geometrically from ``max_variance`` to
``min_variance`` along a random orthonormal basis, while the means lie in a random (K − 1)-dim
subspace with spread ``separation``. The top principal directions are then noise directions, and
since Σ is not isotropic the Fisher subspace also differs from the span of the means.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.table import Table
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from neurocl import losses
from neurocl.validation._core import seeded, train, validated_config
from neurocl.validation.metrics import fisher_eigenvalues, fisher_subspace, pca_subspace, principal_angles_deg


class GMMConfig(BaseModel):
    """One Gaussian-mixture experiment. :meth:`preset` gives the settings documented in docs/validation.md."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(20, ge=2, le=1000, description="Observation dimension d.")
    n_components: int = Field(4, ge=2, description="Mixture components K (equal weights).")
    separation: float = Field(3.0, gt=0, description="RMS norm of the component means about their centre.")
    max_variance: float = Field(25.0, gt=0, description="Largest eigenvalue of the shared covariance Σ.")
    min_variance: float = Field(0.25, gt=0, description="Smallest eigenvalue of Σ.")
    temperature: float = Field(0.5, gt=0, description="InfoNCE temperature τ.")
    batch_size: int = Field(512, ge=8, description="Positive pairs per step.")
    steps: int = Field(1500, ge=1, description="Adam steps (cosine decay of the learning rate).")
    lr: float = Field(1e-2, gt=0, description="Initial Adam learning rate.")
    n_samples: int = Field(20000, ge=10, description="Samples for the PCA and LDA baselines.")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "GMMConfig":
        if self.n_components - 1 > self.dim:
            raise ValueError(f"n_components - 1 ({self.n_components - 1}) must not exceed dim ({self.dim})")
        if self.min_variance > self.max_variance:
            raise ValueError(f"min_variance ({self.min_variance}) must not exceed max_variance ({self.max_variance})")
        return self

    @classmethod
    def preset(cls, quick: bool = False, **overrides) -> "GMMConfig":
        """The documented full (about a minute on 2 CPU cores) or ``quick`` (seconds) setting."""
        settings = dict(PRESETS[quick])
        settings.update(overrides)
        return validated_config(cls, settings)


PRESETS: dict[bool, dict] = {
    False: dict(dim=20, n_components=4, batch_size=512, steps=1500, n_samples=20000),
    True: dict(dim=10, n_components=3, batch_size=256, steps=300, n_samples=5000),
}


@dataclass
class GaussianMixture:
    """Equal-weight mixture of K Gaussians N(μ_k, Σ) in d dimensions."""

    means: np.ndarray  # (K, d)
    covariance: np.ndarray  # (d, d)

    @classmethod
    def random(cls, config: GMMConfig, rng: np.random.Generator) -> "GaussianMixture":
        """Means in a random (K − 1)-dim subspace; Σ with geometric eigenvalues on a random basis."""
        basis, _ = np.linalg.qr(rng.standard_normal((config.dim, config.dim)))
        variances = np.geomspace(config.max_variance, config.min_variance, config.dim)
        covariance = (basis * variances) @ basis.T
        mean_basis, _ = np.linalg.qr(rng.standard_normal((config.dim, config.n_components - 1)))
        coefficients = rng.standard_normal((config.n_components, config.n_components - 1))
        means = coefficients @ mean_basis.T
        means -= means.mean(0)
        means *= config.separation / np.sqrt((means**2).sum(1).mean())
        return cls(means=means, covariance=covariance)

    @property
    def weights(self) -> np.ndarray:
        return np.full(len(self.means), 1.0 / len(self.means))

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw from each label's component: (N, d) for labels (N,)."""
        cholesky = torch.as_tensor(np.linalg.cholesky(self.covariance), dtype=torch.float32)
        means = torch.as_tensor(self.means, dtype=torch.float32)
        noise = torch.randn(len(labels), len(cholesky), generator=generator)
        return means[labels] + noise @ cholesky.T


@dataclass
class GMMResult:
    """Principal angles (degrees, largest first) of each method's subspace to the Fisher subspace."""

    config: GMMConfig
    angles: dict[str, list[float]]
    fisher_eigenvalues: list[float]  # S_B v = λ S_W v, largest first: how separable the mixture is along each
    final_loss: float
    seconds: float

    def mean_angle(self, method: str) -> float:
        return float(np.mean(self.angles[method]))

    def to_dict(self) -> dict:
        record = asdict(self)
        record["config"] = self.config.model_dump()
        record["mean_angle"] = {method: self.mean_angle(method) for method in self.angles}
        return record


def run_gmm(config: GMMConfig, progress: bool = True) -> GMMResult:
    """Train a linear InfoNCE encoder on the mixture; compare its subspace, PCA's and LDA's with Fisher's."""

    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    mixture = GaussianMixture.random(config, rng)
    fisher = fisher_subspace(mixture.means, mixture.weights, mixture.covariance)
    with seeded(config.seed):
        encoder = torch.nn.Linear(config.dim, config.n_components - 1, bias=False)

    def loss_at_step(step: int) -> torch.Tensor:
        labels = torch.randint(config.n_components, (config.batch_size,), generator=generator)
        views = torch.stack([encoder(mixture.sample(labels, generator)) for _ in range(2)])
        return losses.info_nce(views, temperature=config.temperature)

    history = train(list(encoder.parameters()), loss_at_step, config.steps, config.lr,
                    f"gmm (d={config.dim}, K={config.n_components})", progress)

    labels = torch.randint(config.n_components, (config.n_samples,), generator=generator)
    samples = mixture.sample(labels, generator).numpy()
    lda = LinearDiscriminantAnalysis(solver="eigen").fit(samples, labels.numpy())
    subspaces = {
        "InfoNCE": encoder.weight.detach().numpy().T,
        "PCA": pca_subspace(samples, config.n_components - 1),
        "LDA (labels)": lda.scalings_[:, : config.n_components - 1],
    }
    return GMMResult(
        config=config,
        angles={name: principal_angles_deg(basis, fisher).tolist() for name, basis in subspaces.items()},
        fisher_eigenvalues=fisher_eigenvalues(mixture.means, mixture.weights, mixture.covariance).tolist(),
        final_loss=float(np.mean(history[-50:])),
        seconds=time.perf_counter() - start,
    )


def print_gmm(result: GMMResult, console) -> None:
    """Rich table of each method's principal angles to the Fisher subspace."""
    config = result.config
    table = Table(title=f"Gaussian mixture (d={config.dim}, K={config.n_components}): "
                        f"principal angles to the Fisher subspace, degrees")
    for column in ("subspace", "mean angle", "largest angle", "all angles"):
        table.add_column(column, justify="left" if column in ("subspace", "all angles") else "right")
    for method, angles in result.angles.items():
        table.add_row(method, f"{result.mean_angle(method):.1f}", f"{max(angles):.1f}",
                      ", ".join(f"{angle:.1f}" for angle in angles))
    console.print(table)
    console.print("Fisher eigenvalues (separability along each Fisher direction): "
                  + ", ".join(f"{value:.3g}" for value in result.fisher_eigenvalues))
    console.print(f"InfoNCE final loss {result.final_loss:.4f}, {result.seconds:.0f} s. "
                  "LDA is fitted with the labels (a supervised reference); InfoNCE and PCA see no labels.")
