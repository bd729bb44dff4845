"""Voxel attribution maps of a representation space: gradient x input and batched occlusion.

Both work on a model and a batch of volumes (no run directory needed); :mod:`neurocl.maps.stage`
averages them over subjects.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from rich.progress import track

from neurocl.errors import ConfigError
from neurocl.logs import progress_console
from neurocl.patches import aggregate_patches, extract_patches


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Use the model in eval mode (BatchNorm running statistics, no dropout), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _representation(model: torch.nn.Module, x: torch.Tensor, space: str) -> torch.Tensor:
    key = f"{space}_rep"
    outputs = model(x)
    if key not in outputs:
        raise ConfigError(f"space {space!r}: the model returns {sorted(outputs)}, not {key!r}")
    return outputs[key]


def _reference_like(x: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    """The reference volume broadcast to ``x``'s batch: zeros when no baseline is given."""
    if baseline is None:
        return torch.zeros_like(x)
    baseline = baseline.to(device=x.device, dtype=x.dtype)
    if baseline.shape != x.shape[1:]:
        raise ConfigError(f"baseline shape {tuple(baseline.shape)} differs from the volumes' {tuple(x.shape[1:])}")
    return baseline.expand_as(x)


def gradient_x_input(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    space: str = "salient",
    center: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient x input attribution of the distance of each subject's representation to a centre.

    For a subject x with representation r(x) (``model(x)[f"{space}_rep"]``, the space that is probed),

        f(x) = ‖r(x) − c‖₂,        A(x) = (x − x₀) ⊙ ∂f/∂x,

    with c the centre (e.g. the mean background representation: how far the subject is from
    "typical control" in salient space) and x₀ the reference volume. With x₀ = 0 this is the
    gradient x input of Shrikumar et al. (2016, https://arxiv.org/abs/1605.01713); with x₀ the
    mean control volume, A is the first-order Taylor share of each voxel in f(x) − f(x₀)
    (Ancona et al., 2018, https://arxiv.org/abs/1711.06104): positive where the subject's
    departure from the controls moves it away from the centre.

    Parameters
    ----------
    model : torch.nn.Module
        Returns a dict holding ``f"{space}_rep"`` of shape (B, D); used in eval mode.
    volumes : torch.Tensor
        (B, C, *S) volumes on the model's device.
    space : str
        "salient" or "common".
    center : torch.Tensor, optional
        (D,) centre c; zeros when None.
    baseline : torch.Tensor, optional
        (C, *S) reference volume x₀; zeros when None.

    Returns
    -------
    torch.Tensor
        (B, C, *S) signed attribution, detached.
    """
    x = volumes.detach().clone().requires_grad_(True)
    with _eval_mode(model), torch.enable_grad():
        rep = _representation(model, x, space)
        if center is not None:
            rep = rep - center.to(device=rep.device, dtype=rep.dtype)
        # Each subject's distance depends on its own input only (eval mode), so the gradient of
        # the sum holds every subject's own gradient.
        distance = torch.linalg.vector_norm(rep, dim=1)
        (gradient,) = torch.autograd.grad(distance.sum(), x)
    return ((volumes - _reference_like(volumes, baseline)) * gradient).detach()


def _cube_masks(starts: torch.Tensor, size: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """(L, *S) boolean masks of the cubes with corners ``starts`` (L, D) and side ``size``, built by broadcasting."""
    mask = None
    for dim, (extent, side) in enumerate(zip(spatial_shape, size)):
        axis = torch.arange(extent, device=starts.device)
        begin = starts[:, dim : dim + 1]
        inside = (axis >= begin) & (axis < begin + side)
        view = [starts.shape[0]] + [1] * len(spatial_shape)
        view[dim + 1] = extent
        inside = inside.reshape(view)
        mask = inside if mask is None else mask & inside
    return mask


def occlusion(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    patch: int | Sequence[int],
    stride: int | Sequence[int],
    space: str = "salient",
    baseline: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Occlusion sensitivity of each subject's representation (Zeiler & Fergus, 2014).

    The grid patches of the data path (:func:`neurocl.patches.extract_patches`, side ``patch``,
    step ``stride``, the last patch of each axis flush with the border) are replaced one at a
    time by the reference volume x₀; the effect of patch P on subject x is how far its
    representation moves,

        e(P) = ‖r(x with P ← x₀) − r(x)‖₂,

    and each voxel gets the mean effect of the patches that cover it
    (:func:`neurocl.patches.aggregate_patches`). The occluded copies of all subjects go through
    the network together, ``batch_size`` at a time. A patch where a subject's volume already
    equals x₀ (e.g. outside a masked brain with x₀ = 0) leaves the input unchanged: its effect
    is exactly 0 and it is not run.

    Parameters
    ----------
    model : torch.nn.Module
        Returns a dict holding ``f"{space}_rep"`` (B, D); used in eval mode.
    volumes : torch.Tensor
        (N, C, *S) volumes on the model's device.
    patch, stride : int or sequence of int
        Patch side and step in voxels (one value, or one per spatial axis).
    space : str
        "salient" or "common".
    baseline : torch.Tensor, optional
        (C, *S) reference volume x₀ that fills the occluded patch; zeros when None.
    batch_size : int
        Occluded copies per forward pass.
    progress : bool
        Show a progress bar over the forward passes.

    Returns
    -------
    torch.Tensor
        (N, 1, *S) non-negative effect map.
    """


    if len(volumes) == 0:
        raise ConfigError("occlusion: no volumes given")
    spatial_shape = tuple(volumes.shape[2:])
    size = _as_sizes(patch, len(spatial_shape))
    reference = _reference_like(volumes[:1], baseline)[0]
    # The (subject, patch) pairs that change the input at all: patches of the "differs from x₀"
    # volume holding a non-zero voxel. One subject at a time keeps memory at one volume's patches.
    touched = []
    for volume in volumes:
        differs = (volume != reference).any(0)[None, None].float()
        patches_differ, starts = extract_patches(differs, size, stride)
        touched.append(patches_differ[0].flatten(1).any(1))
    pairs = torch.stack(touched).nonzero()  # (M, 2): subject, patch
    effects = torch.zeros(volumes.shape[0], starts.shape[0], device=volumes.device)
    with _eval_mode(model), torch.no_grad():
        own = torch.cat(
            [_representation(model, volumes[first : first + batch_size], space) for first in range(0, len(volumes), batch_size)]
        )
        batches = range(0, len(pairs), batch_size)
        for first in track(batches, "occlusion", total=len(batches), disable=not progress, console=progress_console()):
            subject, which = pairs[first : first + batch_size].unbind(1)
            cubes = _cube_masks(starts[which], size, spatial_shape)[:, None]
            occluded = torch.where(cubes, reference[None], volumes[subject])
            moved = _representation(model, occluded, space) - own[subject]
            effects[subject, which] = torch.linalg.vector_norm(moved, dim=1).float()
    return aggregate_patches(effects, starts, size, spatial_shape)


def _as_sizes(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)
