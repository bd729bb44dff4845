"""Tests for neurocl.nets: encoder shapes in 2D and 3D, strides, heads and the two-space SepCLR network."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from neurocl.nets import ContrastiveNet, EncoderConfig, ProjectionHead, SepCLRNet, count_parameters, make_encoder

# The feature size F that the nets module documents for each encoder.
DOCUMENTED_FEATURES = {
    "small_cnn": 8 * 16,  # 8 · width, default width 16
    "resnet10": 512,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "densenet121": 1024,
    "seresnet50": 2048,
}
SPATIAL = {2: (64, 64), 3: (32, 32, 32)}
# Building a large MONAI network costs seconds (weight initialisation), so every name is checked
# in 2D and the 3D path on the small CNN, one ResNet (all share one factory) and the DenseNet.
CASES = [(name, 2) for name in DOCUMENTED_FEATURES] + [("small_cnn", 3), ("resnet10", 3), ("densenet121", 3)]


def inputs(spatial_dims, batch=2, channels=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *SPATIAL[spatial_dims], generator=generator)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    # torch.allclose: torch.testing.assert_close spends seconds on lazy imports at its first call.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def first_conv(module):
    return next(layer for layer in module.modules() if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)))


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_encoder_maps_batch_to_documented_feature_size(name, spatial_dims):
    torch.manual_seed(0)
    encoder, features = make_encoder({"name": name, "spatial_dims": spatial_dims})
    assert features == DOCUMENTED_FEATURES[name]
    assert isinstance(first_conv(encoder), torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d)
    encoder.eval()
    with torch.no_grad():
        out = encoder(inputs(spatial_dims))
    assert out.shape == (2, features)
    assert torch.isfinite(out).all()


def test_small_cnn_feature_size_follows_width_and_input_channels():
    encoder, features = make_encoder({"name": "small_cnn", "spatial_dims": 2, "width": 4, "in_channels": 3})
    assert features == 32
    assert first_conv(encoder).in_channels == 3
    assert encoder(inputs(2, channels=3)).shape == (2, 32)


@pytest.mark.parametrize("name", ["small_cnn", "resnet10"])
def test_first_conv_stride_sets_the_stride_and_the_first_feature_map(name):
    sizes = {}
    for stride in (1, 2):
        encoder, _ = make_encoder({"name": name, "spatial_dims": 2, "first_conv_stride": stride})
        conv = first_conv(encoder)
        assert conv.stride == (stride, stride)
        captured = []
        conv.register_forward_hook(lambda module, args, output: captured.append(output.shape[2:]))
        encoder.eval()
        with torch.no_grad():
            encoder(inputs(2, batch=1))
        sizes[stride] = tuple(captured[0])
    assert sizes[1] == (64, 64) and sizes[2] == (32, 32)


def test_monai_resnet_default_stride_is_overridden():
    # MONAI's own default is a stride-1 first convolution; neurocl's default is 2.
    assert EncoderConfig().first_conv_stride == 2
    encoder, _ = make_encoder({"name": "resnet10", "spatial_dims": 2})
    assert first_conv(encoder).stride == (2, 2)


def test_projection_head_is_linear_batchnorm_relu_linear():
    head = ProjectionHead(6, 5, 3)
    kinds = [type(layer) for layer in head.layers]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head.layers[0].in_features == 6 and head.layers[0].out_features == 5 and head.layers[3].out_features == 3
    assert head(torch.randn(4, 6)).shape == (4, 3)
    assert ProjectionHead(6, None, 3).layers[0].out_features == 6  # hidden size defaults to the input size
    assert isinstance(ProjectionHead(6, 5, 3, batchnorm=False).layers[1], torch.nn.Identity)


SMALL = {"name": "small_cnn", "spatial_dims": 2, "width": 4}  # F = 32


def test_contrastive_net_returns_representation_before_the_head():
    torch.manual_seed(1)
    net = ContrastiveNet(SMALL, rep_dim=16, proj_dim=8).eval()
    x = inputs(2, batch=3)
    with torch.no_grad():
        out = net(x)
        features = net.encoder(x)
        expected_rep = net.branch.to_rep(features)
        expected_proj = net.branch.head(expected_rep)
    assert out["rep"].shape == (3, 16) and out["proj"].shape == (3, 8)
    assert_close(out["rep"], expected_rep)
    assert_close(out["proj"], expected_proj)
    # Without rep_dim the representation is the encoder's pooled features themselves.
    plain = ContrastiveNet(SMALL, proj_dim=8).eval()
    assert plain.rep_dim == 32
    with torch.no_grad():
        assert_close(plain(x)["rep"], plain.encoder(x))


@pytest.fixture(scope="module")
def sepclr_pair():
    torch.manual_seed(2)
    separate = SepCLRNet(SMALL, common_dim=6, salient_dim=4)
    return separate, SepCLRNet(SMALL, common_dim=6, salient_dim=4, shared_trunk=True)


def test_sepclr_net_output_shapes_and_spaces_are_what_the_loss_sees(sepclr_pair):
    x = inputs(2, batch=3, seed=3)
    for net in sepclr_pair:
        net.eval()
        with torch.no_grad():
            out = net(x)
            salient_encoder = net.common_encoder if net.shared_trunk else net.salient_encoder
            common_rep = net.common_branch.head(net.common_branch.to_rep(net.common_encoder(x)))
            salient_rep = net.salient_branch.head(net.salient_branch.to_rep(salient_encoder(x)))
        assert {key: tuple(value.shape) for key, value in out.items()} == {
            "common_rep": (3, 6), "salient_rep": (3, 4), "common": (3, 6), "salient": (3, 4),
        }
        assert_close(out["common_rep"], common_rep)
        assert_close(out["salient_rep"], salient_rep)
        # SepCLR's constraints define its spaces: what is probed is exactly what the loss shapes
        assert out["common"] is out["common_rep"] and out["salient"] is out["salient_rep"]


def test_sepclr_space_equals_forward_outputs(sepclr_pair):
    x = inputs(2, batch=3, seed=4)
    for net in sepclr_pair:
        net.eval()
        with torch.no_grad():
            out = net(x)
            for space in ("common", "salient"):
                assert_close(net.space(x, space), out[f"{space}_rep"])
    with pytest.raises(ValueError, match="space must be 'common' or 'salient', got 'both'"):
        sepclr_pair[0].space(x, "both")


def test_shared_trunk_uses_one_encoder_and_default_uses_two_independent_ones(sepclr_pair):
    separate, shared = sepclr_pair
    assert shared.salient_encoder is None
    encoder_size = count_parameters(separate.common_encoder)
    assert count_parameters(separate) - count_parameters(shared) == encoder_size
    assert separate.salient_encoder is not separate.common_encoder
    common_ids = {id(p) for p in separate.common_encoder.parameters()}
    assert common_ids.isdisjoint(id(p) for p in separate.salient_encoder.parameters())
    # Independently initialised, so the two spaces start from different features.
    common_weight = first_conv(separate.common_encoder).weight
    assert not torch.equal(common_weight, first_conv(separate.salient_encoder).weight)


@pytest.mark.parametrize("space", ["common", "salient"])
def test_each_space_sends_gradient_to_its_own_encoder_only(space):
    torch.manual_seed(5)
    net = SepCLRNet(SMALL, common_dim=6, salient_dim=4)
    net(inputs(2, batch=4, seed=6))[space].square().sum().backward()
    own = net.common_encoder if space == "common" else net.salient_encoder
    other = net.salient_encoder if space == "common" else net.common_encoder
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in own.parameters())
    assert any(p.grad.abs().sum() > 0 for p in own.parameters())
    assert all(p.grad is None for p in other.parameters())


def test_shared_trunk_receives_gradient_from_both_spaces():
    torch.manual_seed(7)
    net = SepCLRNet(SMALL, common_dim=6, salient_dim=4, shared_trunk=True)
    x = inputs(2, batch=4, seed=8)
    for space in ("common", "salient"):
        net.zero_grad(set_to_none=True)
        net(x)[space].square().sum().backward()
        assert first_conv(net.common_encoder).weight.grad.abs().sum() > 0, space


def split_batch_difference(config, x):
    torch.manual_seed(9)
    encoder, _ = make_encoder(config)
    encoder.train()
    with torch.no_grad():
        whole = encoder(x)
        halves = torch.cat([encoder(x[:2]), encoder(x[2:])])
    return (whole - halves).abs().max().item()


@pytest.mark.parametrize("name", ["small_cnn", "resnet10"])
def test_group_norm_output_does_not_depend_on_how_the_batch_is_split(name):
    # Under DDP without SyncBatchNorm each rank normalises its own part of the batch.
    x = inputs(2, batch=4, seed=10)
    config = {"name": name, "spatial_dims": 2, "width": 4}
    assert split_batch_difference({**config, "norm": "group"}, x) < 1e-5
    assert split_batch_difference({**config, "norm": "batch"}, x) > 1e-3


@pytest.mark.parametrize(("name", "norm", "layer_type"), [
    ("resnet10", "instance", torch.nn.InstanceNorm2d), ("densenet121", "group", torch.nn.GroupNorm),
])
def test_norm_option_replaces_every_batchnorm_of_the_monai_networks(name, norm, layer_type):
    # MONAI's ResNet applies its own norm argument to the stem only; every layer must follow the config.
    encoder, _ = make_encoder({"name": name, "spatial_dims": 2, "norm": norm})
    layers = list(encoder.modules())
    assert any(isinstance(layer, layer_type) for layer in layers)
    assert not any(isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for layer in layers)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "resnet101"}, "name"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"first_conv_stride": 0}, "first_conv_stride"),
        ({"widht": 8}, "widht"),
        ({"name": "densenet121", "first_conv_stride": 1}, "first_conv_stride=1 is not available for densenet121"),
        ({"name": "seresnet50", "first_conv_stride": 3}, "first_conv_stride=3 is not available for seresnet50"),
        ({"norm": "layer"}, "norm"),
        ({"name": "resnet18", "norm": "none"}, "norm='none' is only available for small_cnn"),
    ],
)
def test_invalid_encoder_config_names_the_field(config, message):
    with pytest.raises(ValidationError, match=message):
        make_encoder(config)


@pytest.mark.parametrize("stride", [1, 2])
def test_fast_cpu_backward_gives_the_native_gradients(stride):
    """The oneDNN-forward backward of FastBackwardConv3d equals autograd's native conv3d backward."""
    from neurocl.nets import FastBackwardConv3d

    torch.manual_seed(0)
    native = torch.nn.Conv3d(3, 4, 3, stride=stride, padding=1).double()
    fast = torch.nn.Conv3d(3, 4, 3, stride=stride, padding=1).double()
    fast.load_state_dict(native.state_dict())
    fast.__class__ = FastBackwardConv3d
    x = torch.randn(2, 3, 9, 10, 7, dtype=torch.float64)
    grads = []
    for conv in (native, fast):
        inputs = x.clone().requires_grad_(True)
        output = conv(inputs)
        output.backward(torch.linspace(-1, 1, output.numel(), dtype=torch.float64).view_as(output))
        grads.append((inputs.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize(("shape", "stride"), [((1, 1, 1), 2), ((2, 2, 2), 1), ((2, 1, 3), 1), ((6, 7, 5), 2)])
def test_fast_cpu_backward_under_bf16_autocast_is_exact_where_the_native_one_reads_garbage(shape, stride):
    """torch 2.13's native bf16 CPU weight gradient of a conv whose kernel overlaps only padding somewhere
    (inputs of 1-2 voxels along an axis) is uninitialised memory. FastBackwardConv3d under autocast:
    bf16 forward, and a weight gradient equal to float32's on the same bf16-rounded tensors, every time,
    whatever freed memory holds."""
    from neurocl.nets import FastBackwardConv3d

    torch.manual_seed(0)
    conv = FastBackwardConv3d(16, 32, 3, stride=stride, padding=1)
    for _ in range(5):
        garbage = [torch.full((1 << 16,), float("nan")) for _ in range(20)]
        del garbage  # freed memory full of NaN, where an uninitialised buffer would read it
        x = torch.randn(8, 16, *shape).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = conv(x)
        assert output.dtype == torch.bfloat16
        upstream = torch.randn(output.shape)
        (weight_grad,) = torch.autograd.grad((output.float() * upstream).sum(), conv.weight)
        x16, w16 = x.detach().bfloat16().float(), conv.weight.detach().bfloat16().float().requires_grad_(True)
        reference = torch.nn.functional.conv3d(x16, w16, conv.bias.detach().bfloat16().float(), stride=stride, padding=1)
        (expected,) = torch.autograd.grad((reference * upstream.bfloat16().float()).sum(), w16)
        assert torch.isfinite(weight_grad).all()
        torch.testing.assert_close(weight_grad, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_encoders_use_the_fast_backward_without_changing_parameter_names():
    from neurocl.nets import FastBackwardConv3d, SmallCNN

    encoder, _ = make_encoder({"name": "small_cnn", "width": 4})
    assert any(isinstance(m, FastBackwardConv3d) for m in encoder.modules())
    assert list(encoder.state_dict()) == list(SmallCNN(3, 1, 4).state_dict())
