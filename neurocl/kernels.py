"""Similarity kernels on subject attributes, used as priors by the contrastive losses.

A kernel ``K`` (B, B) says how alike two subjects are in their attributes (age,
sex, site, ...): y-Aware InfoNCE uses it to weight positives and decoupled
uniformity to smooth view centroids (see ``docs/methods.md``).

Attributes arrive as a float tensor with NaN for a missing value and categorical
attributes as integer codes. A missing value carries no information: the
attribute's factor for any pair involving it is 1 (its term in a sum kernel is
1 too), so a subject with unknown age is neither pulled towards nor pushed from
anyone because of age. It is never read as 0, which would pretend the subject is
a newborn.

:func:`normalised_hsic` measures how much two kernels agree (the covariate-independence
term of SepCLR uses it between a salient embedding and a covariate's kernel), and
:func:`covariate_kernels` gives one kernel per covariate over the rows where it is present.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from neurocl.errors import ConfigError

KINDS = ("continuous", "categorical")


def rbf(y: Tensor, sigma: float | Sequence[float]) -> Tensor:
    r"""Gaussian (RBF) kernel on continuous attributes.

    .. math:: k(y_i, y_j) = \exp\Big(-\sum_a \frac{(y_{ia} - y_{ja})^2}{2\sigma_a^2}\Big)

    Parameters
    ----------
    y : Tensor, (B,) or (B, A)
        Attribute values, NaN where missing. An attribute missing in either
        subject of a pair adds nothing to that pair's distance (factor 1).
    sigma : float or sequence of A floats
        Bandwidth in the attribute's own units (a standard deviation, not a
        variance): ``sigma=5`` for age in years means subjects 5 years apart
        get weight exp(-1/2) = 0.61. One value per column, or one for all.

    Returns
    -------
    Tensor, (B, B)
        Symmetric, ones on the diagonal, in the dtype of ``y`` (float32 for integer input).
    """
    y = _as_columns(y)
    scale = _sigmas(sigma, y.shape[1], y)
    diff = (y[:, None, :] - y[None, :, :]) / scale
    # NaN - anything is NaN: those terms are dropped, so a missing value is neutral.
    sq_dist = torch.nan_to_num(diff.square(), nan=0.0).sum(dim=-1)
    return torch.exp(-0.5 * sq_dist)


def categorical(y: Tensor) -> Tensor:
    r"""Exact-match kernel on a categorical attribute given as integer codes.

    .. math:: k(y_i, y_j) = [y_i = y_j], \quad 1 \text{ if either value is missing (NaN)}

    Parameters
    ----------
    y : Tensor, (B,)
        Category codes (any numeric dtype), NaN where missing.

    Returns
    -------
    Tensor, (B, B)
        Float kernel of zeros and ones.
    """
    if y.dim() != 1:
        raise ValueError(f"categorical kernel expects codes of shape (B,), got {tuple(y.shape)}")
    y = y if y.is_floating_point() else y.float()
    missing = torch.isnan(y)
    same = (y[:, None] == y[None, :]) | missing[:, None] | missing[None, :]
    return same.to(y.dtype)


def attribute_kernel(
    y: Tensor,
    kinds: Sequence[str],
    sigma: float | Sequence[float] = 1.0,
    combine: Literal["product", "sum"] = "product",
    standardise: bool = False,
) -> Tensor:
    r"""Kernel over several attributes: an RBF per continuous column, exact match per categorical one.

    .. math::
        K^{\mathrm{product}}_{ij} = \prod_a k_a(y_{ia}, y_{ja}), \qquad
        K^{\mathrm{sum}}_{ij} = \frac{1}{A}\sum_a k_a(y_{ia}, y_{ja})

    The product is high only for subjects alike in every attribute; the
    (normalised) sum is high for subjects alike in most attributes. Both keep
    a unit diagonal, so either can be passed as ``kernel=`` to the losses.

    Parameters
    ----------
    y : Tensor, (B, A)
        Attribute matrix, categorical columns as integer codes, NaN where missing
        (``Cohort.attribute_matrix`` gives exactly this).
    kinds : sequence of A str
        ``"continuous"`` or ``"categorical"`` for each column.
    sigma : float or sequence of A floats
        RBF bandwidth per column in the column's units (entries for categorical
        columns are ignored). With ``standardise=True`` it is in standard deviations.
    combine : {"product", "sum"}
        How the per-attribute kernels combine; ``"sum"`` is divided by A.
    standardise : bool
        Divide each continuous column by its standard deviation over the rows of
        ``y`` (NaN ignored) first. The scale then depends on the rows given: pass
        the whole cohort, or keep ``False`` and give ``sigma`` in the attribute's units.

    Returns
    -------
    Tensor, (B, B)
    """
    y = _as_columns(y)
    n_attributes = y.shape[1]
    if len(kinds) != n_attributes:
        raise ValueError(f"kinds has {len(kinds)} entries for {n_attributes} attribute columns")
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"attribute kind must be one of {KINDS}, got {kind!r}")
    if combine not in ("product", "sum"):
        raise ConfigError(f"combine must be 'product' or 'sum', got {combine!r}")
    sigmas = _sigmas(sigma, n_attributes, y)
    per_attribute = []
    for column, kind in enumerate(kinds):
        values = y[:, column]
        if kind == "categorical":
            per_attribute.append(categorical(values))
            continue
        if standardise:
            values = values / _nan_std(values, column)
        per_attribute.append(rbf(values, sigmas[column].item()))
    stacked = torch.stack(per_attribute)
    return stacked.prod(dim=0) if combine == "product" else stacked.mean(dim=0)


def _centred(gram: Tensor) -> Tensor:
    """H G H with H = I − 11ᵀ/n: subtract row and column means, add back the grand mean."""
    return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()


def normalised_hsic(l: Tensor, k: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Normalised Hilbert-Schmidt independence criterion of two kernel matrices (centred kernel alignment).

    .. math::
        \mathrm{HSIC}(L, K) = \frac{\operatorname{tr}(L H K H)}{(n-1)^2}, \quad H = I - \tfrac{1}{n}\mathbf{1}\mathbf{1}^\top,
        \qquad
        \mathrm{nHSIC}(L, K) = \frac{\mathrm{HSIC}(L, K)}{\sqrt{\mathrm{HSIC}(L, L)\,\mathrm{HSIC}(K, K)}}

    In [0, 1] for positive semi-definite kernels; 0 when the two are independent in the
    sample, 1 when one is a rescaling of the other. The (n−1)² cancels. ``eps`` bounds
    the denominator away from 0: a constant kernel (a collapsed embedding) gives 0,
    not NaN. Gretton et al., ALT 2005; Kornblith et al., ICML 2019 (CKA).

    Parameters
    ----------
    l, k : Tensor, (n, n)
        Symmetric kernel matrices over the same n samples, n >= 2.
    eps : float
        Floor of HSIC(L, L)·HSIC(K, K).

    Returns
    -------
    Tensor
        Scalar.
    """
    if l.dim() != 2 or l.shape != k.shape or l.shape[0] != l.shape[1]:
        raise ValueError(f"l and k must be square and of the same shape, got {tuple(l.shape)} and {tuple(k.shape)}")
    if len(l) < 2:
        raise ValueError("normalised_hsic needs at least 2 samples")
    k = k.to(l.dtype)
    l_centred, k_centred = _centred(l), _centred(k)
    # tr(L H K H) = Σ_ij (HLH)_ij K_ij = Σ_ij (HLH)_ij (HKH)_ij (H is idempotent, kernels symmetric).
    cross = (l_centred * k_centred).sum()
    norms = (l_centred * l_centred).sum() * (k_centred * k_centred).sum()
    return cross / norms.clamp_min(eps).sqrt()


def covariate_kernels(
    y: Tensor, kinds: Sequence[str], sigma: float | Sequence[float] = 1.0
) -> list[tuple[int, Tensor, Tensor]]:
    """One kernel per covariate over the rows where it is present (nothing is imputed).

    A covariate observed in fewer than 3 rows, or constant over them, carries no information
    about dependence in this batch and is left out (it would make HSIC(K, K) = 0).

    Parameters
    ----------
    y : Tensor, (B,) or (B, A)
        Covariates, categorical ones as codes, NaN where missing.
    kinds : sequence of A str
        "continuous" or "categorical" per column.
    sigma : float or sequence of A floats
        RBF bandwidth per continuous column, in its units (categorical entries ignored).

    Returns
    -------
    list of (column, present, kernel)
        ``present`` (B,) bool marks the rows used; ``kernel`` (n, n) over them, detached.
    """
    y = y[:, None] if y.dim() == 1 else y
    if len(kinds) != y.shape[1]:
        raise ValueError(f"kinds has {len(kinds)} entries for {y.shape[1]} covariate columns")
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    sigmas = sigmas.expand(y.shape[1]) if sigmas.numel() == 1 else sigmas
    if sigmas.numel() != y.shape[1]:
        raise ValueError(f"sigma has {sigmas.numel()} values for {y.shape[1]} covariate columns")
    y = y if y.is_floating_point() else y.float()
    out = []
    for column, kind in enumerate(kinds):
        values = y[:, column]
        present = ~torch.isnan(values)
        values = values[present]
        if len(values) < 3 or bool((values == values[0]).all()):
            continue
        if kind == "categorical":
            kernel = categorical(values)
        elif kind == "continuous":
            kernel = rbf(values, _sigmas(float(sigmas[column]), 1, values).item())
        else:
            raise ConfigError(f"covariate kind must be 'continuous' or 'categorical', got {kind!r}")
        out.append((column, present, kernel.detach()))
    return out


def _as_columns(y: Tensor) -> Tensor:
    """(B,) or (B, A) attributes as a floating (B, A) tensor."""
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2:
        raise ValueError(f"attributes must have shape (B,) or (B, A), got {tuple(y.shape)}")
    return y if y.is_floating_point() else y.float()


def _sigmas(sigma: float | Sequence[float], n_attributes: int, like: Tensor) -> Tensor:
    """Bandwidths as a (A,) tensor, validated positive."""
    values = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1)
    if values.numel() == 1:
        values = values.expand(n_attributes)
    if values.numel() != n_attributes:
        raise ValueError(f"sigma has {values.numel()} values for {n_attributes} attribute columns")
    if not bool(torch.all(values > 0)):
        raise ConfigError(f"kernel bandwidth sigma must be > 0, got {values.tolist()}")
    return values


def _nan_std(values: Tensor, column: int) -> Tensor:
    """Standard deviation over the present values of one column; it must be positive."""
    present = values[~torch.isnan(values)]
    std = present.std() if present.numel() > 1 else values.new_tensor(float("nan"))
    if not bool(std > 0):
        raise ConfigError(
            f"cannot standardise attribute column {column}: its standard deviation over "
            f"{present.numel()} present values is {std.item()}"
        )
    return std
