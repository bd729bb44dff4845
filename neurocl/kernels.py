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
