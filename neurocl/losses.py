r"""Contrastive objectives as pure functions of embedding tensors.

Shapes: ``z`` is (V, B, D), the embeddings of V views of B samples; anchor
``a = (v, i)`` is view v of sample i. ``ẑ = z / ‖z‖``. The equations, parameters and
papers are collected in ``docs/methods.md``.

Numerics. Every loss runs in float32 with autocast switched off inside it (a bf16
Gram matrix at temperature 0.01 is too coarse to rank negatives), normalises once,
builds similarities with one matmul, masks with boolean masks and reduces with
``logsumexp``.

Distributed training. ``info_nce``, ``yaware_info_nce``, ``decoupled_uniformity`` and
``sepclr_loss`` take ``distributed=True``: they all-gather the embeddings (and
attributes / group labels) of every rank with :func:`gather` and compute the loss over
**all anchors of the global batch** on every rank, so the value each rank reports equals
the single-process loss on the concatenated batch. :func:`gather` keeps the gradient of
the local part and sums the gradients that every rank computes for it; with DDP's
averaging of parameter gradients over R ranks, the update equals that of one process on
the whole batch (R copies of the full loss, each contributing 1/R). This also holds for
the losses that are not means over anchors (the log-mean uniformity terms), which a
local-anchor split could not reproduce. A precomputed ``kernel`` must then cover the
global batch, e.g. ``attribute_kernel(gather(y), ...)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from neurocl.errors import ConfigError, TrainingError
from neurocl.kernels import attribute_kernel, covariate_kernels, normalised_hsic, rbf

__all__ = [
    "COMMON_OBJECTIVES",
    "align_loss",
    "covariate_independence",
    "decoupled_uniformity",
    "gather",
    "info_nce",
    "lp_info_nce",
    "sepclr_loss",
    "uniform_loss",
    "yaware_info_nce",
]


def _float32(loss: Callable) -> Callable:
    """Run ``loss`` in at least float32 with autocast off.

    Half-precision tensor arguments are upcast to float32; float64 ones stay float64 (so a
    float64 gradient check tests the formula, not float32 rounding); others are left alone.
    """

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        def upcast(value):
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                return value.float()
            return value

        args = [upcast(value) for value in args]
        kwargs = {key: upcast(value) for key, value in kwargs.items()}
        device_type = next(
            (value.device.type for value in (*args, *kwargs.values()) if isinstance(value, Tensor)), "cpu"
        )
        with torch.autocast(device_type=device_type, enabled=False):
            return loss(*args, **kwargs)

    return wrapper


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        # Each rank differentiates its own copy of the loss with respect to every
        # rank's embeddings; the local embeddings' total gradient is the sum over ranks.
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate ``x`` from all ranks along ``dim``, in rank order, keeping the local gradient.

    Without an initialised process group (or with one rank) ``x`` is returned as is.
    Every rank must pass a tensor of the same shape. The local slice keeps its
    autograd graph; in backward, the gradients that all ranks computed for it are
    summed (see the module docstring for why this makes DDP equal one process).
    Boolean and integer tensors are gathered without gradient.

    Parameters
    ----------
    x : Tensor
        Local tensor, e.g. embeddings (V, B_local, D) with ``dim=1`` or labels (B_local,).
    dim : int
        Dimension to concatenate along (the batch dimension).

    Returns
    -------
    Tensor
        Shape of ``x`` with ``dim`` multiplied by the world size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        parts = _GatherWithGradient.apply(x)
    else:
        # gloo has no all_gather for bool; uint8 carries it exactly.
        wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
        parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, wire)
        parts = [part.to(x.dtype) for part in parts]
    return torch.cat(parts, dim=dim)


def _check_views(z: Tensor, name: str = "z") -> None:
    if z.dim() != 3:
        raise ValueError(f"{name} must have shape (V, B, D), got {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 views to form positive pairs, got V={z.shape[0]}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances (B, B) via one matmul, exact zeros on the diagonal."""
    sq_norms = x.square().sum(dim=-1)
    gram = x @ x.T
    sq = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    return sq.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)


def _log_mean_exp(values: Tensor, dim: int | None = None) -> Tensor:
    """log mean exp, stably: logsumexp minus log of the count."""
    if dim is None:
        return torch.logsumexp(values.reshape(-1), dim=0) - math.log(values.numel())
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def _view_log_softmax(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probabilities log p(b | a) over b ≠ a for the V·B flattened anchors.

    Returns the (VB, VB) matrix sim(a, b) − log Σ_{b'≠a} exp sim(a, b') (0 on the
    diagonal, which callers mask) and the boolean self mask.
    """
    n_views, batch, dim = z.shape
    z_hat = F.normalize(z, dim=-1).reshape(n_views * batch, dim)  # row a = v * B + i
    sim = z_hat @ z_hat.T / temperature
    self_mask = torch.eye(n_views * batch, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return log_prob.masked_fill(self_mask, 0.0), self_mask


@_float32
def info_nce(z: Tensor, temperature: float = 0.1, distributed: bool = False) -> Tensor:
    r"""InfoNCE / NT-Xent over any number of views (Chen et al., SimCLR, ICML 2020).

    With sim(a, b) = ẑ_a·ẑ_b / τ, for every anchor a = (v, i) and positive p = (v', i), v' ≠ v:

    .. math::
        \ell(a, p) = -\mathrm{sim}(a, p) + \log \sum_{b \neq a} \exp \mathrm{sim}(a, b),
        \qquad \mathcal{L} = \operatorname{mean}_{(a, p)} \ell(a, p)

    V = 2 is SimCLR's NT-Xent (https://arxiv.org/abs/2002.05709).

    Parameters
    ----------
    z : Tensor, (V, B, D)
        Projections of V >= 2 views of B samples (need not be normalised).
    temperature : float
        τ > 0.
    distributed : bool
        Gather z from all ranks first (see the module docstring).

    Returns
    -------
    Tensor
        Scalar loss.
    """
    _check_views(z)
    _check_positive("temperature", temperature)
    if distributed:
        z = gather(z, dim=1)
    n_views, batch, _ = z.shape
    log_prob, self_mask = _view_log_softmax(z, temperature)
    sample = torch.arange(batch, device=z.device).repeat(n_views)
    positive_mask = (sample[:, None] == sample[None, :]) & ~self_mask
    return -log_prob[positive_mask].mean()


@_float32
def yaware_info_nce(
    z: Tensor,
    y: Tensor | None = None,
    sigma: float = 1.0,
    temperature: float = 0.1,
    kernel: Tensor | None = None,
    distributed: bool = False,
) -> Tensor:
    r"""y-Aware InfoNCE: positives weighted by attribute similarity (Dufumier et al., MICCAI 2021).

    With w_ij = exp(−‖y_i − y_j‖² / (2σ²)) (or a given kernel), for anchor a = (v, i) and
    every b = (v', j) ≠ a:

    .. math::
        W(a, b) = \frac{w_{ij}}{\sum_{b' \neq a} w_{ij'}}, \qquad
        \ell(a) = -\sum_{b \neq a} W(a, b)\Big[\mathrm{sim}(a, b)
                  - \log \sum_{b' \neq a} \exp \mathrm{sim}(a, b')\Big],
        \qquad \mathcal{L} = \operatorname{mean}_a \ell(a)

    Each anchor's weights sum to 1 over its own row (the public reference code
    normalises along the other axis). With a tiny σ and distinct attributes only the
    other views of the same sample keep weight and the loss equals :func:`info_nce`;
    with a huge σ every other embedding gets weight 1/(VB − 1).
    Paper: https://arxiv.org/abs/2106.08808

    Parameters
    ----------
    z : Tensor, (V, B, D)
        Projections of V >= 2 views of B samples.
    y : Tensor, (B,) or (B, A), optional
        Continuous attributes (NaN: missing, no information). Give ``y`` or ``kernel``.
    sigma : float or sequence of A floats
        RBF bandwidth in the attributes' units.
    temperature : float
        τ > 0.
    kernel : Tensor, (B, B), optional
        Precomputed non-negative weights w_ij with a positive diagonal (e.g.
        :func:`neurocl.kernels.attribute_kernel`); replaces ``y``/``sigma``. Under
        ``distributed=True`` it must cover the global batch.
    distributed : bool
        Gather z (and y) from all ranks first.

    Returns
    -------
    Tensor
        Scalar loss.
    """
    _check_views(z)
    _check_positive("temperature", temperature)
    if distributed:
        z = gather(z, dim=1)
        y = gather(y) if y is not None else None
    n_views, batch, _ = z.shape
    weights = _prior_kernel(y, sigma, kernel, batch).repeat(n_views, n_views)
    log_prob, self_mask = _view_log_softmax(z, temperature)
    weights = weights.masked_fill(self_mask, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return -(weights * log_prob).sum(dim=1).mean()


def _prior_kernel(y: Tensor | None, sigma, kernel: Tensor | None, batch: int) -> Tensor:
    """The (B, B) prior from exactly one of ``y`` (RBF with ``sigma``) or ``kernel``."""
    if (y is None) == (kernel is None):
        raise ValueError("give exactly one of y (attributes) or kernel (a precomputed (B, B) matrix)")
    if kernel is None:
        kernel = rbf(y, sigma)
    if kernel.shape != (batch, batch):
        raise ValueError(f"kernel must have shape ({batch}, {batch}) for a batch of {batch}, got {tuple(kernel.shape)}")
    return kernel


@_float32
def align_loss(x: Tensor, y: Tensor, alpha: float = 2) -> Tensor:
    r"""Alignment of positive pairs (Wang & Isola, ICML 2020).

    .. math:: \mathcal{L}_{\mathrm{align}} = \operatorname{mean}_i \lVert x_i - y_i \rVert_2^{\alpha}

    Paper: https://arxiv.org/abs/2005.10242 (applied to normalised embeddings there).

    Parameters
    ----------
    x, y : Tensor, (B, D)
        Embeddings of two views of the same B samples, row i of each a positive pair.
    alpha : float
        Exponent α > 0.
    """
    _check_positive("alpha", alpha)
    return torch.linalg.vector_norm(x - y, dim=-1).pow(alpha).mean()


@_float32
def uniform_loss(x: Tensor, t: float = 2) -> Tensor:
    r"""Uniformity on the hypersphere (Wang & Isola, ICML 2020).

    .. math:: \mathcal{L}_{\mathrm{uniform}} = \log \operatorname{mean}_{i<j} \exp(-t \lVert x_i - x_j \rVert_2^2)

    Paper: https://arxiv.org/abs/2005.10242

    Parameters
    ----------
    x : Tensor, (B, D)
        Embeddings (normalise them first for the paper's setting), B >= 2.
    t : float
        Scale t > 0 of the Gaussian potential.
    """
    _check_positive("t", t)
    return _log_mean_exp(-t * _upper_pairs(_sq_dists(x)))


def _upper_pairs(square: Tensor) -> Tensor:
    """Entries i < j of a (B, B) matrix as a vector."""
    rows, cols = torch.triu_indices(len(square), len(square), offset=1, device=square.device)
    if rows.numel() == 0:
        raise ValueError("at least 2 samples are needed to form pairs")
    return square[rows, cols]


@_float32
def decoupled_uniformity(
    z: Tensor,
    y: Tensor | None = None,
    sigma: float = 1.0,
    lam: float = 0.01,
    t: float = 2.0,
    kernel: Tensor | None = None,
    distributed: bool = False,
) -> Tensor:
    r"""Decoupled uniformity of view centroids, optionally with a kernel prior (Dufumier et al., ICML 2023).

    .. math::
        \mu_i = \operatorname{mean}_v \hat z_{v,i}, \qquad
        \mathcal{L} = \log \operatorname{mean}_{i \neq j} \exp(-t \lVert \mu_i - \mu_j \rVert^2)

    With a prior K (K_ij = exp(−‖y_i − y_j‖²/(2σ²)), or ``kernel``) the centroids are
    first smoothed over similar samples, μ ← αμ with α = (K + λI)⁻¹K, computed in
    float64 and held constant (no gradient through α). With K = I and λ = 0, α = I.
    Paper: "Integrating Prior Knowledge in Contrastive Learning with Kernel",
    https://arxiv.org/abs/2206.01646

    Parameters
    ----------
    z : Tensor, (V, B, D)
        Projections of V >= 2 views of B >= 2 samples.
    y : Tensor, (B,) or (B, A), optional
        Attributes for the RBF prior; with neither ``y`` nor ``kernel`` there is no prior.
    sigma : float
        RBF bandwidth in the attributes' units.
    lam : float
        Ridge λ >= 0 of the centroid estimator.
    t : float
        Scale t > 0 of the Gaussian potential.
    kernel : Tensor, (B, B), optional
        Precomputed prior replacing ``y``/``sigma`` (global batch under ``distributed``).
    distributed : bool
        Gather z (and y) from all ranks first.
    """
    _check_views(z)
    _check_positive("t", t)
    if not lam >= 0:
        raise ConfigError(f"lam must be >= 0, got {lam}")
    if distributed:
        z = gather(z, dim=1)
        y = gather(y) if y is not None else None
    batch = z.shape[1]
    centroids = F.normalize(z, dim=-1).mean(dim=0)
    if y is not None or kernel is not None:
        prior = _prior_kernel(y, sigma, kernel, batch).detach().double()
        identity = torch.eye(batch, dtype=prior.dtype, device=prior.device)
        alpha = torch.linalg.solve(prior + lam * identity, prior)
        centroids = alpha.to(centroids.dtype) @ centroids
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=z.device)
    return _log_mean_exp(-t * _sq_dists(centroids)[off_diagonal])


@_float32
def lp_info_nce(h1: Tensor, h2: Tensor, p: float = 1, temperature: float = 1.0) -> Tensor:
    r"""InfoNCE with a p-norm distance, as in identifiability studies (Zimmermann et al., ICML 2021).

    .. math::
        d_{ij} = \lVert h^1_i - h^2_j \rVert_p^p, \qquad
        \mathcal{L} = \operatorname{mean}_i \Big[\frac{d_{ii}}{\tau} + \log \sum_j \exp(-d_{ij}/\tau)\Big]

    Paper: "Contrastive Learning Inverts the Data Generating Process", https://arxiv.org/abs/2102.08850

    Parameters
    ----------
    h1, h2 : Tensor, (B, D)
        Representations of the two elements of B positive pairs (row i with row i).
    p : float
        Norm order p > 0 (p = 1: Laplace conditional, p = 2: Gaussian).
    temperature : float
        τ > 0.
    """
    _check_positive("p", p)
    _check_positive("temperature", temperature)
    if h1.shape != h2.shape or h1.dim() != 2:
        raise ValueError(f"h1 and h2 must both be (B, D), got {tuple(h1.shape)} and {tuple(h2.shape)}")
    dist_p = (h1[:, None, :] - h2[None, :, :]).abs().pow(p).sum(dim=-1)
    return (dist_p.diagonal() / temperature + torch.logsumexp(-dist_p / temperature, dim=1)).mean()


@_float32
def covariate_independence(
    s: Tensor,
    y: Tensor,
    kinds,
    sigma: float | list[float] = 1.0,
    tau: float = 0.5,
    distributed: bool = False,
) -> Tensor:
    r"""Dependence between embeddings and known covariates, by normalised HSIC (neurocl's own term).

    For each view v and covariate a, over the rows R_a where a is present:
    L_ij = exp(−‖s_{v,i} − s_{v,j}‖²/(2τ)), K^a_ij the covariate's kernel (RBF with σ_a,
    exact match for a categorical one), and

    .. math::
        \mathcal{L}_{\mathrm{cov}} = \operatorname{mean}_v \operatorname{mean}_a
            \mathrm{nHSIC}\big(L^v[R_a, R_a],\, K^a[R_a, R_a]\big)

    (:func:`normalised_hsic`). A row with a missing covariate drops out of that
    covariate's term only: it is never imputed. A covariate observed in fewer than 3
    rows or constant over them is left out of the mean (no dependence is measurable);
    with none left the term is 0. K carries no gradient.

    SepCLR applies it to the salient embeddings of target rows, so that age, sex or site
    cannot be read from the salient space among patients.

    Parameters
    ----------
    s : Tensor, (V, B, D)
        Embeddings of V >= 1 views of B samples.
    y : Tensor, (B,) or (B, A)
        Covariates, categorical ones as codes, NaN where missing.
    kinds : sequence of A str
        "continuous" or "categorical" per column.
    sigma : float or sequence of A floats
        RBF bandwidth per continuous covariate, in its units (ignored for categorical ones).
    tau : float
        Bandwidth of the embedding kernel L (SepCLR's τ).
    distributed : bool
        Gather s and y from all ranks first.

    Returns
    -------
    Tensor
        Scalar in [0, 1].
    """
    if s.dim() != 3:
        raise ValueError(f"s must have shape (V, B, D), got {tuple(s.shape)}")
    _check_positive("tau", tau)
    if distributed:
        s, y = gather(s, dim=1), gather(y)
    if len(y) != s.shape[1]:
        raise ValueError(f"y has {len(y)} rows for a batch of {s.shape[1]}")
    values = []
    for _, present, kernel in covariate_kernels(y, kinds, sigma):
        for view in s:
            rows = view[present]
            values.append(normalised_hsic(torch.exp(-_sq_dists(rows) / (2 * tau)), kernel))
    if not values:
        return s.sum() * 0.0  # keeps the graph (and the device) for a batch with no usable covariate
    return torch.stack(values).mean()


COMMON_OBJECTIVES = ("sepclr", "yaware", "decoupled_uniformity")
MI_ESTIMATORS = ("jem", "kernel_mi")


def gradient_shares(weighted_terms: dict[str, Tensor], inputs: Sequence[Tensor]) -> dict[str, Tensor]:
    r"""Each weighted loss term's share of the gradient that reaches ``inputs`` (the projections).

    share_k = ‖∂(w_k L_k)/∂x‖ / Σ_j ‖∂(w_j L_j)/∂x‖, with x every tensor of ``inputs`` together:
    which term moves the embeddings, whatever the terms' values (a term of large value and flat
    gradient moves nothing). The gradients are taken w.r.t. the network's outputs, not its
    weights, so this costs a backward pass through the loss only; the graph is kept for training.

    Parameters
    ----------
    weighted_terms : dict of str to Tensor
        Scalar terms, each already multiplied by its weight.
    inputs : sequence of Tensor
        Tensors the terms were computed from (e.g. the common and salient projections).

    Returns
    -------
    dict of str to Tensor
        Detached scalar share per term (summing to 1 unless every gradient is 0).
    """
    norms = {}
    for name, term in weighted_terms.items():
        grads = torch.autograd.grad(term, list(inputs), retain_graph=True, allow_unused=True)
        norms[name] = torch.sqrt(sum((g.detach().float().square().sum() for g in grads if g is not None),
                                     torch.zeros((), device=term.device)))
    total = sum(norms.values()) if norms else None
    return {name: (norm / total if total > 0 else torch.zeros_like(norm)) for name, norm in norms.items()}


@_float32
def sepclr_loss(
    c: Tensor,
    s: Tensor,
    is_target: Tensor,
    tau: float = 0.5,
    beta_salient: float = 1.0,
    beta_null: float = 10.0,
    lam_mi: float = 10.0,
    attributes: Tensor | None = None,
    attribute_kinds=None,
    sigma: float | list[float] = 1.0,
    kernel_combine: str = "product",
    common_objective: str = "sepclr",
    temperature: float = 0.1,
    lam: float = 0.01,
    t: float = 2.0,
    lam_cov: float = 0.0,
    null_weighting: str = "plain",
    view_weighting: str = "balanced",
    mi_estimator: str = "jem",
    distributed: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""SepCLR: common and salient spaces of a background / target contrast (Louiset et al., ICLR 2024),
    optionally attribute-aware (neurocl's own extension).

    ĉ = c/‖c‖ (common space on the sphere); s stays Euclidean; s̃ equals s on target
    rows and 0 on background rows. With k(a, b) = exp(−‖a − b‖²/(2τ)),
    align(X, Y) = mean_i ‖X_i − Y_i‖²/(2τ), unif(X) = log mean_{i<j} k(X_i, X_j) and
    JEM(C, S) = mean_i log mean_j k(C_i, C_j)·k(S_i, S_j) (j includes i):

    .. math::
        \mathcal{L}_{\mathrm{common}} &= \operatorname{mean}_{v<v'} \mathrm{align}(\hat c^v, \hat c^{v'})
            + \omega_V \sum_v \mathrm{unif}(\hat c^v) \\
        \mathcal{L}_{\mathrm{salient}} &= \operatorname{mean}_{v<v'} \mathrm{align}(s^v_T, s^{v'}_T)
            + \omega_V \sum_v \mathrm{unif}(\tilde s^v) \\
        \mathcal{L}_{\mathrm{null}} &= \nu \operatorname{mean}_v \operatorname{mean}_{i \in \mathrm{background}} \lVert s_{v,i} \rVert^2 \\
        \mathcal{L}_{\mathrm{mi}} &= \operatorname{mean}_v \mathrm{JEM}(\hat c^v, \tilde s^v) \\
        \mathcal{L}_{\mathrm{cov}} &= \mathrm{covariate\_independence}(s_T, y_T) \\
        \mathcal{L} &= \mathcal{L}_{\mathrm{common}} + \beta_{\mathrm{salient}} \mathcal{L}_{\mathrm{salient}}
            + \beta_{\mathrm{null}} \mathcal{L}_{\mathrm{null}} + \lambda_{\mathrm{mi}} \mathcal{L}_{\mathrm{mi}}
            + \lambda_{\mathrm{cov}} \mathcal{L}_{\mathrm{cov}}

    T: target rows. The MI term is the kernel joint-entropy estimate (k-JEM) of the
    common/salient dependence: it falls when the two spaces stop sharing structure.

    JEM alone is minus the joint entropy of (ĉ, s̃): lowering it also spreads each space on
    its own, a second uniformity term on the common space of every subject (background rows have
    s̃ = 0, so their joint kernel is the common one). With ``mi_estimator="kernel_mi"`` the term
    is the plug-in kernel estimate of the mutual information of the target rows, the joint minus
    the marginal entropies (H(C) + H(S) − H(C, S)):

    .. math::
        \mathcal{L}_{\mathrm{mi}} = \operatorname{mean}_v \operatorname{mean}_{i \in T} \log
            \frac{\operatorname{mean}_{j \in T, j \ne i} k(\hat c_i, \hat c_j) k(s_i, s_j)}
                 {\operatorname{mean}_{j \in T, j \ne i} k(\hat c_i, \hat c_j) \cdot
                  \operatorname{mean}_{j \in T, j \ne i} k(s_i, s_j)}

    (j ≠ i, so that each row's own k = 1 does not bias it upwards at small n): about 0 when neighbours in one space are not neighbours in the other,
    whatever the spread of either, so it penalises dependence and nothing else.

    Options (``docs/methods.md`` gives the reasons):

    - ``common_objective``: ``"sepclr"`` is the common term above; ``"yaware"`` replaces it
      by :func:`yaware_info_nce` of c with the attribute kernel K (temperature
      ``temperature``); ``"decoupled_uniformity"`` by :func:`decoupled_uniformity` of c with
      α = (K + λI)⁻¹K (``lam``, ``t``). Both normalise c, so they act on ĉ.
    - ``lam_cov`` > 0 adds :func:`covariate_independence` of the target rows' salient
      embeddings and their attributes (missing values masked per attribute).
    - ``null_weighting``: ``"plain"`` ν = 1; ``"reference"`` ν = 1/(2τ), the SepCLR code's
      align(0, s). β_null(plain) = β_null(reference)/(2τ); at τ = 0.5 both agree.
    - ``view_weighting``: ``"balanced"`` ω_V = 2/V, ``"reference"`` ω_V = 1. With V = 2 both
      are the paper's loss; with V > 2 "reference" lets the uniformity terms grow with V
      against the (averaged) alignment, null and MI terms, "balanced" keeps the balance.

    Paper: "Separating common from salient patterns with Contrastive Representation
    Learning", https://arxiv.org/abs/2402.11928

    Parameters
    ----------
    c : Tensor, (V, B, Dc)
        Common-space projections of V >= 2 views of B samples.
    s : Tensor, (V, B, Ds)
        Salient-space projections of the same views.
    is_target : Tensor, (B,) bool
        True for target (patient) samples, False for background; the batch must hold both.
    tau : float
        Kernel bandwidth τ > 0.
    beta_salient, beta_null, lam_mi : float
        Weights of the salient, null and mutual-information terms.
    attributes : Tensor, (B, A), optional
        Covariates (NaN missing, categorical as codes) for the common kernel and the
        covariate term; required by ``common_objective="yaware"`` and ``lam_cov > 0``.
    attribute_kinds : sequence of A str
        "continuous" or "categorical" per attribute column.
    sigma, kernel_combine :
        As in :func:`neurocl.kernels.attribute_kernel` (σ in the attributes' units).
    common_objective : {"sepclr", "yaware", "decoupled_uniformity"}
    temperature : float
        y-Aware temperature.
    lam, t : float
        Decoupled uniformity's ridge λ and scale t.
    lam_cov : float
        Weight of the covariate-independence term.
    null_weighting : {"plain", "reference"}
    view_weighting : {"balanced", "reference"}
    mi_estimator : {"jem", "kernel_mi"}
        The MI term: the paper's k-JEM, or the kernel MI estimate of the target rows (above).
    distributed : bool
        Gather c, s, is_target and attributes from all ranks first.

    Returns
    -------
    total : Tensor
        Scalar loss.
    terms : dict of str to Tensor
        ``"common"``, ``"salient"``, ``"null"``, ``"mi"`` and, with ``lam_cov > 0``, ``"cov"``
        (unweighted scalars; ``"null"`` includes ν).

    Raises
    ------
    TrainingError
        If the (global) batch lacks target or background samples.
    """
    _check_views(c, "c")
    _check_views(s, "s")
    _check_positive("tau", tau)
    if common_objective not in COMMON_OBJECTIVES:
        raise ConfigError(f"common_objective must be one of {COMMON_OBJECTIVES}, got {common_objective!r}")
    if null_weighting not in ("plain", "reference"):
        raise ConfigError(f"null_weighting must be 'plain' or 'reference', got {null_weighting!r}")
    if view_weighting not in ("balanced", "reference"):
        raise ConfigError(f"view_weighting must be 'balanced' or 'reference', got {view_weighting!r}")
    if mi_estimator not in MI_ESTIMATORS:
        raise ConfigError(f"mi_estimator must be one of {MI_ESTIMATORS}, got {mi_estimator!r}")
    if not lam_cov >= 0:
        raise ConfigError(f"lam_cov must be >= 0, got {lam_cov}")
    needs_attributes = common_objective == "yaware" or lam_cov > 0
    if needs_attributes and (attributes is None or attribute_kinds is None):
        raise ConfigError("common_objective 'yaware' and lam_cov > 0 need attributes and attribute_kinds")
    if c.shape[:2] != s.shape[:2] or is_target.shape != (c.shape[1],):
        raise ValueError(
            f"c {tuple(c.shape)}, s {tuple(s.shape)} and is_target {tuple(is_target.shape)} must share V and B"
        )
    if attributes is not None and len(attributes) != c.shape[1]:
        raise ValueError(f"attributes has {len(attributes)} rows for a batch of {c.shape[1]}")
    if distributed:
        c, s = gather(c, dim=1), gather(s, dim=1)
        is_target = gather(is_target)
        attributes = gather(attributes) if attributes is not None else None
    is_target = is_target.to(device=c.device, dtype=torch.bool)
    n_target = int(is_target.sum())
    if n_target == 0 or n_target == len(is_target):
        raise TrainingError(
            f"sepclr_loss needs target and background samples in every batch; got {n_target} target and "
            f"{len(is_target) - n_target} background: use a larger batch or a group-balanced sampler"
        )
    n_views = c.shape[0]
    c_hat = F.normalize(c, dim=-1)
    s_tilde = s * is_target[None, :, None].to(s.dtype)
    view_pairs = [(v, w) for v in range(n_views) for w in range(v + 1, n_views)]
    view_weight = 2.0 / n_views if view_weighting == "balanced" else 1.0

    def align(x: Tensor, y: Tensor) -> Tensor:
        return (x - y).square().sum(dim=-1).mean() / (2 * tau)

    def unif(x: Tensor) -> Tensor:
        return _log_mean_exp(-_upper_pairs(_sq_dists(x)) / (2 * tau))

    def jem(common: Tensor, salient: Tensor) -> Tensor:
        joint = -(_sq_dists(common) + _sq_dists(salient)) / (2 * tau)
        return _log_mean_exp(joint, dim=1).mean()

    def off_diagonal_log_mean(log_kernel: Tensor) -> Tensor:
        # j != i: the diagonal's k = 1 in every space would bias the ratio upwards at small n.
        eye = torch.eye(len(log_kernel), dtype=torch.bool, device=log_kernel.device)
        return _log_mean_exp(log_kernel[~eye].view(len(log_kernel), -1), dim=1).mean()

    def mi(v: int) -> Tensor:
        if mi_estimator == "jem":
            return jem(c_hat[v], s_tilde[v])
        log_common = -_sq_dists(c_hat[v][is_target]) / (2 * tau)
        log_salient = -_sq_dists(s[v][is_target]) / (2 * tau)
        return (off_diagonal_log_mean(log_common + log_salient) - off_diagonal_log_mean(log_common)
                - off_diagonal_log_mean(log_salient))

    if common_objective == "sepclr":
        common = torch.stack([align(c_hat[v], c_hat[w]) for v, w in view_pairs]).mean() + view_weight * sum(
            unif(c_hat[v]) for v in range(n_views)
        )
    else:
        prior = None
        if attributes is not None:
            prior = attribute_kernel(attributes, attribute_kinds, sigma=sigma, combine=kernel_combine).to(c.dtype)
        if common_objective == "yaware":
            common = yaware_info_nce(c, kernel=prior, temperature=temperature)
        else:
            common = decoupled_uniformity(c, kernel=prior, lam=lam, t=t)
    s_target = s[:, is_target]
    null_scale = 1.0 / (2 * tau) if null_weighting == "reference" else 1.0
    terms = {
        "common": common,
        "salient": torch.stack([align(s_target[v], s_target[w]) for v, w in view_pairs]).mean()
        + view_weight * sum(unif(s_tilde[v]) for v in range(n_views)),
        "null": null_scale * s[:, ~is_target].square().sum(dim=-1).mean(),
        "mi": torch.stack([mi(v) for v in range(n_views)]).mean(),
    }
    total = terms["common"] + beta_salient * terms["salient"] + beta_null * terms["null"] + lam_mi * terms["mi"]
    if lam_cov > 0:
        terms["cov"] = covariate_independence(s_target, attributes[is_target], attribute_kinds, sigma=sigma, tau=tau)
        total = total + lam_cov * terms["cov"]
    return total, terms
