"""What the validation experiments share: random mixing networks, MLP encoders, the training loop."""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Callable, Iterator, Sequence

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from neurocl.errors import ConfigError, TrainingError
from neurocl.logs import progress_console


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside the block (network initialisation uses it), then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _positive_widths(widths: list[int]) -> list[int]:
    if not widths or any(width < 1 for width in widths):
        raise ValueError(f"hidden widths must be a non-empty list of positive integers; got {widths}")
    return widths


#: Hidden widths of an encoder MLP, as a config field: a non-empty list of positive integers.
HiddenWidths = Annotated[list[int], AfterValidator(_positive_widths)]


def validated_config(config_class: type[BaseModel], settings: dict) -> BaseModel:
    """``config_class(**settings)``, with a validation failure reported as a :class:`ConfigError` naming the fields."""
    try:
        return config_class(**settings)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'config'}: {item['msg']}" for item in error.errors())
        raise ConfigError(f"{config_class.__name__}: {problems}") from None


def random_mlp(
    sizes: Sequence[int],
    rng: np.random.Generator,
    negative_slope: float = 0.2,
    pool_size: int = 25_000,
) -> nn.Sequential:
    """A frozen random MLP with leaky-ReLU activations and the best-conditioned weight matrices of a large pool.

    Follows the mixing of Hyvärinen & Morioka (2016) as used by Zimmermann et al. (2021, their
    cl-ica code): each weight matrix is uniform in [−1, 1] with unit-norm columns, and of
    ``pool_size`` such draws the one with the smallest condition number is kept (cl-ica draws
    25 000 and keeps the best). Conditioning decides how hard the inversion is: at 10 × 10 the
    best of 25 000 has a condition number near 4, while a draw merely below the pool's lower
    quartile sits near 16, and three such layers compound into a mixing that a few thousand
    CPU steps do not invert. With square layers (and leaky ReLU, which is bijective) the network
    is invertible; with widening layers it is injective. No bias, no activation after the last layer.

    Parameters
    ----------
    sizes : widths ``[in, hidden..., out]`` (at least two).
    rng : the generator every weight is drawn from.
    pool_size : draws per layer, of which the best-conditioned is kept.
    """
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = best_conditioned_matrix(width_out, width_in, rng, pool_size)
        linear = nn.Linear(width_in, width_out, bias=False)
        linear.weight.data = torch.as_tensor(weight, dtype=torch.float32)
        layers.append(linear)
        if index < len(sizes) - 2:
            layers.append(nn.LeakyReLU(negative_slope))
    network = nn.Sequential(*layers)
    network.requires_grad_(False)
    return network


def best_conditioned_matrix(rows: int, cols: int, rng: np.random.Generator, pool_size: int) -> np.ndarray:
    """Of ``pool_size`` uniform [−1, 1] matrices with unit-norm columns, the one with the smallest condition number."""
    best, best_condition = None, np.inf
    # Chunks bound the memory of the batched SVDs (a 25 000 × 64 × 64 pool would be 800 MB at once).
    chunk = max(1, 2_000_000 // (rows * cols))
    for start in range(0, pool_size, chunk):
        draws = rng.uniform(-1.0, 1.0, size=(min(chunk, pool_size - start), rows, cols))
        draws /= np.linalg.norm(draws, axis=1, keepdims=True)
        conditions = np.linalg.cond(draws)
        index = int(np.argmin(conditions))
        if conditions[index] < best_condition:
            best, best_condition = draws[index], conditions[index]
    return best


def standardised(mixing: nn.Module, sample: torch.Tensor, centre: bool = True) -> nn.Sequential:
    """``mixing`` followed by the affine map giving each output unit variance (and zero mean if ``centre``).

    The statistics come from ``mixing(sample)``. An invertible per-dimension scaling keeps the
    observations an invertible function of the latents while giving the encoders inputs of unit
    scale; the result is frozen like ``mixing``.
    """
    with torch.no_grad():
        outputs = mixing(sample)
    mean, std = outputs.mean(0), outputs.std(0)
    scale = nn.Linear(len(std), len(std), bias=centre)
    scale.weight.data = torch.diag(1.0 / std)
    if centre:
        scale.bias.data = -mean / std
    network = nn.Sequential(mixing, scale)
    network.requires_grad_(False)
    return network


def mlp_encoder(
    in_dim: int, hidden: Sequence[int], out_dim: int, negative_slope: float = 0.2, bias: bool = True
) -> nn.Sequential:
    """Trainable MLP ``in_dim -> hidden... -> out_dim`` with leaky-ReLU between layers (none at the output).

    Without ``bias`` the MLP is positively homogeneous, f(λx) = λ f(x) for λ > 0.
    """
    widths = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out, bias=bias))
        if index < len(widths) - 2:
            layers.append(nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


def train(
    parameters: Sequence[nn.Parameter],
    loss_at_step: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    description: str,
    progress: bool = True,
) -> list[float]:
    """Adam with a cosine learning-rate decay (to 1 % of ``lr``) over ``steps`` calls of ``loss_at_step``.

    The decay lets the last steps settle into the optimum, which is what the recovery metrics
    measure. Returns the loss of every step; a non-finite loss stops training with a
    :class:`TrainingError` naming the step.
    """
    optimiser = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    )
    history: list[float] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, disable=not progress, transient=False, console=progress_console()) as bar:
        task = bar.add_task(description, total=steps, loss=float("nan"))
        for step in range(steps):
            loss = loss_at_step(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"{description}: loss is {value} at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            history.append(value)
            bar.update(task, advance=1, loss=value)
    return history
