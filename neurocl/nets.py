"""Encoders, projection heads and the two-space SepCLR network, over MONAI networks.

:func:`make_encoder` turns an :class:`EncoderConfig` into a module mapping ``(B, C, *S)`` to pooled
features ``(B, F)``, for 2D (``spatial_dims=2``) or 3D inputs:

=============  =======  ===========================================================================
name           F        network
=============  =======  ===========================================================================
small_cnn      8·width  four strided MONAI ``Convolution`` blocks + global average pooling (CPU scale)
densenet121    1024     ``monai.networks.nets.DenseNet121`` without its classification layer
resnet10/18    512      ``monai.networks.nets.resnet10/18`` (``feed_forward=False``)
resnet34       512      ``monai.networks.nets.resnet34``
resnet50       2048     ``monai.networks.nets.resnet50``
seresnet50     2048     ``monai.networks.nets.SEResNet50`` without its last linear layer
=============  =======  ===========================================================================

MONAI's ResNets default to a full-resolution first convolution (stride 1); on 3D volumes every
later layer then runs on 8x more voxels, which makes them 5-8x slower than the stride-2 stem of
the 2D ImageNet ResNets they mimic. ``first_conv_stride`` defaults to 2 for that reason.

Single-space representations handed to probes are taken **before** the projection head (DESIGN.md):
:class:`ContrastiveNet` gives ``rep`` and ``proj``. :class:`SepCLRNet` gives ``common_rep``/``salient_rep``
and ``common``/``salient``, which are the same tensors: SepCLR's constraints define its spaces, so
the space probed is the one the loss shapes (see :class:`SepCLRNet`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from monai.networks import nets as monai_nets
from monai.networks.blocks import Convolution
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

EncoderName = Literal["small_cnn", "densenet121", "resnet10", "resnet18", "resnet34", "resnet50", "seresnet50"]


class EncoderConfig(BaseModel):
    """Which backbone, for which inputs (the pipeline's ``encoder`` section)."""

    model_config = ConfigDict(extra="forbid")

    name: EncoderName = Field("small_cnn", description="Backbone: small_cnn, densenet121, resnet10/18/34/50, seresnet50.")
    spatial_dims: Literal[2, 3] = Field(3, description="2 for slices/images, 3 for volumes.")
    in_channels: int = Field(1, ge=1, description="Input channels (1 for a grey-matter map).")
    first_conv_stride: int = Field(
        2, ge=1, le=4, description="Stride of the first convolution of ResNets and small_cnn (MONAI's ResNet default is 1)."
    )
    width: int = Field(16, ge=1, le=512, description="small_cnn: channels of the first stage (doubled at each stage).")
    norm: Literal["batch", "instance", "group", "none"] = Field(
        "batch",
        description="Normalisation layers of the encoder ('none': small_cnn only; 'group' has 8 groups). 'group' "
        "or 'none' make the encoder's output independent of the per-rank batch split under DDP without "
        "SyncBatchNorm (the projection heads' BatchNorm is set by head_batchnorm).",
    )
    head_hidden_dim: int | None = Field(
        None, gt=0, description="Hidden size of the projection heads (None: the head's input size)."
    )
    head_batchnorm: bool = Field(True, description="BatchNorm in the projection heads' hidden layer.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the projection heads.")
    weights: Path | None = Field(
        None,
        description="Start the encoder(s) from this local file: a neurocl checkpoint, a `neurocl export` file or a "
        "MONAI/torch state dict of the backbone (see neurocl/weights.py). Shapes must match exactly.",
    )
    weights_strict: bool = Field(
        True, description="With weights: an encoder tensor absent from the file is an error (false: keep its initialisation)."
    )

    @model_validator(mode="after")
    def _options_exist_for_the_network(self) -> "EncoderConfig":
        # An option the chosen network cannot honour is an error, not silently ignored.
        if self.name in ("densenet121", "seresnet50") and self.first_conv_stride != 2:
            raise ValueError(
                f"first_conv_stride={self.first_conv_stride} is not available for {self.name}, whose stem is fixed "
                "at stride 2; it applies to small_cnn and resnet10/18/34/50"
            )
        if self.name != "small_cnn" and self.norm == "none":
            raise ValueError(f"norm='none' is only available for small_cnn, not {self.name}")
        return self


def _norm(kind: str, channels: int):
    if kind == "none":
        return None
    if kind == "group":
        return ("group", {"num_groups": min(8, channels)})
    return kind


def _replace_batchnorm(module: nn.Module, kind: str) -> nn.Module:
    """Swap every BatchNorm of a MONAI network, in place, for GroupNorm (8 groups) or affine InstanceNorm.

    Done after construction because MONAI's ResNet applies its ``norm`` argument to the stem only
    and SEResNet50 has no such argument. Every layer of these networks has a multiple of 8 channels.
    """
    if kind == "batch":
        return module
    instance = {nn.BatchNorm2d: nn.InstanceNorm2d, nn.BatchNorm3d: nn.InstanceNorm3d}
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm3d)):
            channels = child.num_features
            new = nn.GroupNorm(8, channels) if kind == "group" else instance[type(child)](channels, affine=True)
            setattr(module, name, new)
        else:
            _replace_batchnorm(child, kind)
    return module


class _ConvWithFastBackward(torch.autograd.Function):
    """N-d convolution whose backward is made of forward convolutions.

    On CPU, PyTorch's native 3D convolution backward (``aten::convolution_backward``) is the
    slowest part of a step for the few-channel layers of brain encoders, and degrades badly when
    other processes compete for the cores. Measured on a 2-core AMD EPYC machine, one SepCLR step of the
    demo's small CNN (width 8, 64 volumes of 37x45x38): 1.9 s native vs 1.55 s here on 1 thread,
    1.1 s vs 1.0 s on 2 idle threads; at 41x50x43 under load average 8-12, 23-41 s vs 12.6 s.
    Both gradients are convolutions themselves,
    which go through the fast oneDNN forward kernels:

    - grad_input = conv_transpose(grad_output, W), with the output padding that restores x's size;
    - grad_W[o, i, k] = Σ_n Σ_v grad_output[n, o, v] · x_pad[n, i, s·v + k], i.e. a convolution of
      x (batch and channels swapped) with grad_output as the kernel, dilated by the stride s,
      cropped to the kernel size.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.stride, ctx.padding = stride, padding
        return _CONV[x.dim() - 2](x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        dtype = x.dtype
        if dtype != torch.float64:  # half-precision forward (CPU autocast): float32 backward, cast back below
            x, weight, grad_output = x.float(), weight.float(), grad_output.float()
        stride, padding = ctx.stride, ctx.padding
        dims = x.dim() - 2
        grad_x = grad_w = grad_b = None
        kernel = weight.shape[2:]
        if ctx.needs_input_grad[0]:
            output_padding = tuple(
                x.shape[2 + d] - ((grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + kernel[d])
                for d in range(dims)
            )
            grad_x = _CONV_T[dims](grad_output, weight, stride=stride, padding=padding, output_padding=output_padding)
        if ctx.needs_input_grad[1]:
            full = _CONV[dims](x.transpose(0, 1), grad_output.transpose(0, 1), padding=padding, dilation=stride)
            grad_w = full[(slice(None), slice(None), *(slice(0, k) for k in kernel))].transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum(dim=(0, *range(2, 2 + dims)))
        grad_x, grad_w, grad_b = (None if g is None else g.to(dtype) for g in (grad_x, grad_w, grad_b))
        return grad_x, grad_w, grad_b, None, None


_CONV = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
_CONV_T = {2: torch.nn.functional.conv_transpose2d, 3: torch.nn.functional.conv_transpose3d}


class FastBackwardConv3d(nn.Conv3d):
    """``nn.Conv3d`` with :class:`_ConvWithFastBackward` when training on CPU (same parameters, same state dict).

    Under CPU autocast too: torch 2.13's native bf16 weight gradient of a 3D convolution is
    uninitialised memory wherever the kernel overlaps only padding (inputs of 1-2 voxels along an
    axis, e.g. the last stage of an encoder on small patches; garbage or NaN, differing from run to
    run, tested in tests/test_nets.py). The forward stays in the autocast dtype, as autocast would
    run it; the backward's convolutions run in float32 on the saved bf16 tensors, so the gradient is
    exact for them.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda or not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        padding = self.padding if isinstance(self.padding, tuple) else None
        if not torch.is_autocast_enabled("cpu"):
            return _ConvWithFastBackward.apply(x, self.weight, self.bias, self.stride, padding)
        dtype = torch.get_autocast_dtype("cpu")
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _ConvWithFastBackward.apply(x.to(dtype), self.weight.to(dtype), bias, self.stride, padding)


def use_fast_cpu_backward(module: nn.Module) -> nn.Module:
    """Give every plain 3D convolution of ``module`` the fast CPU backward, in place.

    Only zero-padded, undilated, ungrouped convolutions with numeric padding are switched; the
    class swap keeps parameter names, so checkpoints are unchanged. GPUs use cuDNN as before.
    """
    for child in module.modules():
        if (
            type(child) is nn.Conv3d
            and child.groups == 1
            and child.padding_mode == "zeros"
            and isinstance(child.padding, tuple)
            and all(d == 1 for d in child.dilation)
        ):
            child.__class__ = FastBackwardConv3d
    return module


class SmallCNN(nn.Module):
    """Four strided conv blocks (width, 2w, 4w, 8w channels) and global average pooling.

    About 0.22 M parameters at width 8: fast enough to train on 4 mm volumes on a laptop CPU, and
    deep enough (receptive field of the whole 4 mm brain) to see regional patterns.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, width: int = 16, first_stride: int = 2,
                 norm: str = "batch") -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width]
        layers = []
        previous = in_channels
        for stage, out in enumerate(channels):
            layers.append(
                Convolution(spatial_dims, previous, out, strides=first_stride if stage == 0 else 2, kernel_size=3,
                            act="relu", norm=_norm(norm, out), adn_ordering="NA")
            )
            layers.append(
                Convolution(spatial_dims, out, out, strides=1, kernel_size=3, act="relu", norm=_norm(norm, out),
                            adn_ordering="NA")
            )
            previous = out
        self.features = nn.Sequential(*layers)
        self.out_features = channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(2).mean(dim=2)


class _Pooled(nn.Module):
    """A MONAI classifier cut before its last layer, returning (B, F)."""

    def __init__(self, network: nn.Module, out_features: int) -> None:
        super().__init__()
        self.network = network
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x).flatten(1)


def make_encoder(config: EncoderConfig | dict) -> tuple[nn.Module, int]:
    """The backbone of ``config`` and its feature size ``F``: a module mapping (B, C, *S) to (B, F).

    Its 3D convolutions get :func:`use_fast_cpu_backward` (no effect on GPU or on results).
    """
    config = EncoderConfig.model_validate(config)
    encoder, features = _backbone(config)
    return use_fast_cpu_backward(encoder), features


def _backbone(config: EncoderConfig) -> tuple[nn.Module, int]:
    dims, channels = config.spatial_dims, config.in_channels
    if config.name == "small_cnn":
        encoder = SmallCNN(dims, channels, config.width, config.first_conv_stride, config.norm)
        return encoder, encoder.out_features
    if config.name.startswith("resnet"):
        factory = getattr(monai_nets, config.name)
        network = factory(spatial_dims=dims, n_input_channels=channels, conv1_t_stride=config.first_conv_stride,
                          feed_forward=False)
        features = 2048 if config.name == "resnet50" else 512
        return _Pooled(_replace_batchnorm(network, config.norm), features), features
    if config.name == "densenet121":
        network = monai_nets.DenseNet121(spatial_dims=dims, in_channels=channels, out_channels=1)
        network.class_layers.out = nn.Identity()
        return _Pooled(_replace_batchnorm(network, config.norm), 1024), 1024
    network = monai_nets.SEResNet50(spatial_dims=dims, in_channels=channels, num_classes=1)
    network.last_linear = nn.Identity()
    return _Pooled(_replace_batchnorm(network, config.norm), 2048), 2048


class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, the SimCLR projection head g(·)."""

    def __init__(self, in_dim: int, hidden_dim: int | None, out_dim: int, batchnorm: bool = True) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=not batchnorm),
            nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _Branch(nn.Module):
    """Features -> representation (linear map to ``rep_dim``, or identity) -> projection head."""

    def __init__(self, features: int, rep_dim: int | None, proj_dim: int, config: EncoderConfig) -> None:
        super().__init__()
        self.to_rep = nn.Linear(features, rep_dim) if rep_dim else nn.Identity()
        self.rep_dim = rep_dim or features
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.head = ProjectionHead(self.rep_dim, config.head_hidden_dim, proj_dim, config.head_batchnorm)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        rep = self.to_rep(features)
        return rep, self.head(self.dropout(rep))


class ContrastiveNet(nn.Module):
    """One encoder, one representation, one projection head (SimCLR, y-Aware, decoupled uniformity).

    ``forward(x)`` returns ``{"rep": (B, R), "proj": (B, P)}`` with R = ``rep_dim`` or the encoder's F.
    """

    def __init__(self, encoder_config: EncoderConfig | dict, rep_dim: int | None = None, proj_dim: int = 128) -> None:
        super().__init__()
        config = EncoderConfig.model_validate(encoder_config)
        self.encoder, features = make_encoder(config)
        self.branch = _Branch(features, rep_dim, proj_dim, config)
        self.rep_dim = self.branch.rep_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        rep, proj = self.branch(self.encoder(x))
        return {"rep": rep, "proj": proj}


class SepCLRNet(nn.Module):
    """Common and salient encoders (or one shared trunk), each ending in its own MLP.

    ``forward(x)`` returns ``common_rep`` (B, common_dim) and ``salient_rep`` (B, salient_dim), the
    spaces that are probed and mapped, and ``common``/``salient``, what the SepCLR loss sees: by
    default (``embed="loss_space"``) the same tensors; with ``embed="representation"`` the
    ``*_rep`` outputs are the linear representation before the MLP, as the SepCLR paper probes
    (kept as an option for comparison with it). Unlike SimCLR's projection head, which is discarded because it throws away
    information useful downstream, SepCLR's constraints (background salient = 0, common and
    salient independent) define the spaces, so the probed space must be the constrained one. In a
    prototype on the demo cohort (100 steps), probing the features before the MLP instead left age decodable from salient
    (R² 0.37 vs -0.02 after it), background salient norms unshrunk (0.93 vs 0.30 of the targets')
    and patient clusters unrelated to subtypes (ARI about 0 vs 0.51).

    Each space is features -> Linear -> MLP (:class:`ProjectionHead`). Two encoders (the default,
    as in Louiset et al., 2024) keep the salient pathway from borrowing capacity tuned to common
    variation; a shared trunk halves the cost.
    """

    def __init__(self, encoder_config: EncoderConfig | dict, common_dim: int = 32, salient_dim: int = 32,
                 shared_trunk: bool = False, embed: str = "loss_space") -> None:
        super().__init__()
        config = EncoderConfig.model_validate(encoder_config)
        if embed not in ("loss_space", "representation"):
            raise ValueError(f"embed must be 'loss_space' or 'representation', got {embed!r}")
        self.shared_trunk = shared_trunk
        self.embed_output = 0 if embed == "representation" else 1
        self.common_encoder, features = make_encoder(config)
        self.salient_encoder = None if shared_trunk else make_encoder(config)[0]
        self.common_branch = _Branch(features, common_dim, common_dim, config)
        self.salient_branch = _Branch(features, salient_dim, salient_dim, config)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        common_features = self.common_encoder(x)
        salient_features = common_features if self.shared_trunk else self.salient_encoder(x)
        common = self.common_branch(common_features)
        salient = self.salient_branch(salient_features)
        return {"common_rep": common[self.embed_output], "salient_rep": salient[self.embed_output],
                "common": common[1], "salient": salient[1]}

    def space(self, x: Tensor, space: str) -> Tensor:
        """One space's embedding of ``x`` (``space``: "common" or "salient").

        Runs only the encoder of that space (attribution maps need one space at a time).
        """
        if space not in ("common", "salient"):
            raise ValueError(f"space must be 'common' or 'salient', got {space!r}")
        if space == "common" or self.shared_trunk:
            features = self.common_encoder(x)
        else:
            features = self.salient_encoder(x)
        branch = self.common_branch if space == "common" else self.salient_branch
        return branch(features)[self.embed_output]


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "ContrastiveNet",
    "EncoderConfig",
    "ProjectionHead",
    "SepCLRNet",
    "SmallCNN",
    "count_parameters",
    "make_encoder",
    "use_fast_cpu_backward",
]


def _smoke() -> None:  # pragma: no cover - handy when editing: python -m neurocl.nets
    for name in ("small_cnn", "resnet10", "densenet121", "seresnet50"):
        for dims, shape in ((3, (2, 1, 32, 32, 32)), (2, (2, 1, 64, 64))):
            net = SepCLRNet({"name": name, "spatial_dims": dims}, 8, 4)
            out = net(torch.randn(shape))
            print(name, dims, {k: tuple(v.shape) for k, v in out.items()}, count_parameters(net))


if __name__ == "__main__":  # pragma: no cover
    _smoke()
