"""Tests for neurocl.weights: pretrained encoders in (checkpoint, export, MONAI state dict), trained ones out."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks import nets as monai_nets

from neurocl.errors import ConfigError, OutputError
from neurocl.methods import build_method
from neurocl.nets import ContrastiveNet, SepCLRNet, make_encoder
from neurocl.weights import export_state, load_pretrained, read_state_dict, write_export

SMALL = {"name": "small_cnn", "width": 4, "spatial_dims": 2}


def same(module_a: torch.nn.Module, module_b: torch.nn.Module) -> bool:
    a, b = module_a.state_dict(), module_b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_neurocl_checkpoint_starts_both_sepclr_encoders_from_their_own_tensors(tmp_path):
    torch.manual_seed(0)
    trained = build_method({"name": "sepclr", "common_dim": 4, "salient_dim": 2}, SMALL)
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {}}, tmp_path / "last.ckpt")
    torch.manual_seed(1)
    fresh = SepCLRNet(SMALL, 4, 2)
    assert not same(fresh.common_encoder, trained.net.common_encoder)
    reports = load_pretrained(fresh, tmp_path / "last.ckpt")
    assert same(fresh.common_encoder, trained.net.common_encoder)
    assert same(fresh.salient_encoder, trained.net.salient_encoder)
    assert [(r.encoder, r.prefix, r.missing, r.unexpected) for r in reports] == [
        ("common_encoder", "net.common_encoder.", [], []), ("salient_encoder", "net.salient_encoder.", [], [])]
    # The heads are not encoders: a pretrained start leaves them at their initialisation.
    assert not same(fresh.common_branch, trained.net.common_branch)


def test_an_export_round_trips_into_a_single_space_network(tmp_path):
    torch.manual_seed(0)
    source = ContrastiveNet(SMALL, rep_dim=8, proj_dim=4)
    torch.save(export_state(source), tmp_path / "encoder.pt")
    assert set(read_state_dict(tmp_path / "encoder.pt")) == {f"encoder.{k}" for k in source.encoder.state_dict()}
    torch.manual_seed(1)
    target = ContrastiveNet(SMALL, rep_dim=8, proj_dim=4)
    load_pretrained(target, tmp_path / "encoder.pt")
    x = torch.randn(3, 1, 16, 16)
    target.eval(), source.eval()
    torch.testing.assert_close(target.encoder(x), source.encoder(x))


def test_a_monai_classifier_state_dict_loads_and_its_head_is_reported_unexpected(tmp_path):
    classifier = monai_nets.resnet10(spatial_dims=2, n_input_channels=1, num_classes=3, conv1_t_stride=2)
    torch.save({"model": {f"module.{k}": v for k, v in classifier.state_dict().items()}}, tmp_path / "resnet.pt")
    net = ContrastiveNet({"name": "resnet10", "spatial_dims": 2}, rep_dim=8, proj_dim=4)
    (report,) = load_pretrained(net, tmp_path / "resnet.pt")
    assert report.prefix == "" and report.unexpected == ["network.fc.bias", "network.fc.weight"]
    assert report.missing == [] and report.loaded == len(net.encoder.state_dict())
    torch.testing.assert_close(net.encoder.network.conv1.weight, classifier.conv1.weight)
    assert "unexpected (ignored): network.fc.bias, network.fc.weight" in report.describe()


def test_a_shape_difference_is_an_error_naming_the_key_and_both_shapes(tmp_path):
    torch.save(export_state(ContrastiveNet({**SMALL, "width": 8})), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"features\.0\.conv\.weight: file \(8, 1, 3, 3\) vs encoder \(4, 1, 3, 3\)"):
        load_pretrained(ContrastiveNet(SMALL), tmp_path / "wide.pt")


def test_missing_tensors_are_an_error_unless_not_strict(tmp_path):
    state = export_state(ContrastiveNet(SMALL))
    dropped = sorted(key for key in state if key.startswith("encoder.features.7."))
    torch.save({key: value for key, value in state.items() if key not in dropped}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"lacks 6 tensor\(s\) of the encoder: features.7.conv.weight.*weights_strict: false"):
        load_pretrained(ContrastiveNet(SMALL), tmp_path / "partial.pt")
    (report,) = load_pretrained(ContrastiveNet(SMALL), tmp_path / "partial.pt", strict=False)
    assert sorted(report.missing) == [key.removeprefix("encoder.") for key in dropped]


def test_files_that_are_not_state_dicts_are_refused_by_name(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ConfigError, match="notes.pt cannot be read"):
        read_state_dict(tmp_path / "notes.pt")
    torch.save({"steps": 3}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="holds no state dict"):
        read_state_dict(tmp_path / "empty.pt")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no tensor of .*other.pt matches the encoder"):
        load_pretrained(ContrastiveNet(SMALL), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


def load_as_the_record_says(entry: dict) -> torch.nn.Module:
    """The documented snippet, run in the export's folder."""
    network = getattr(monai_nets, entry["class"])(**entry["kwargs"])
    network.load_state_dict(torch.load(entry["weights"]))
    return network.eval()


MONAI_ENCODERS = [("resnet10", 16), ("resnet18", 16), ("resnet34", 16), ("resnet50", 16), ("seresnet50", 16),
                  ("densenet121", 32)]  # DenseNet121's three transitions need 32 voxels a side


@pytest.mark.parametrize(("name", "size"), MONAI_ENCODERS)
def test_an_export_loads_into_the_plain_monai_class_and_gives_the_encoders_features(tmp_path, monkeypatch, name, size):
    torch.manual_seed(0)
    module = build_method({"name": "simclr"}, {"name": name, "spatial_dims": 3}).eval()
    _, record_path = write_export(module, tmp_path / "last.ckpt", tmp_path / "encoder.pt")
    record = json.loads(record_path.read_text())
    assert list(record["monai"]) == ["encoder"]
    monkeypatch.chdir(tmp_path)
    network = load_as_the_record_says(record["monai"]["encoder"])
    x = torch.randn(2, 1, size, size, size)
    with torch.no_grad():
        torch.testing.assert_close(network(x), module.net.encoder(x))


def test_a_sepclr_export_writes_one_monai_network_per_space_in_2d(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = build_method({"name": "sepclr", "common_dim": 4, "salient_dim": 2},
                          {"name": "resnet10", "spatial_dims": 2, "first_conv_stride": 1}).eval()
    write_export(module, tmp_path / "last.ckpt", tmp_path / "enc.pt")
    record = json.loads((tmp_path / "enc.json").read_text())
    assert {space: entry["weights"] for space, entry in record["monai"].items()} == {
        "common": "enc.common.pt", "salient": "enc.salient.pt"}
    assert record["monai"]["common"]["kwargs"] == {"spatial_dims": 2, "n_input_channels": 1, "conv1_t_stride": 1,
                                                   "feed_forward": False}
    monkeypatch.chdir(tmp_path)
    x = torch.randn(3, 1, 24, 24)
    with torch.no_grad():
        for space, encoder in (("common", module.net.common_encoder), ("salient", module.net.salient_encoder)):
            torch.testing.assert_close(load_as_the_record_says(record["monai"][space])(x), encoder(x))
        assert not torch.allclose(module.net.common_encoder(x), module.net.salient_encoder(x))


@pytest.mark.parametrize("encoder", [SMALL, {"name": "resnet10", "spatial_dims": 2, "norm": "group"}])
def test_encoders_monai_cannot_build_say_so_and_load_through_neurocl(tmp_path, monkeypatch, encoder):
    torch.manual_seed(0)
    module = build_method({"name": "simclr"}, encoder).eval()
    write_export(module, tmp_path / "last.ckpt", tmp_path / "encoder.pt")
    entry = json.loads((tmp_path / "encoder.json").read_text())["monai"]["encoder"]
    assert entry["class"] is None and entry["kwargs"] is None
    assert ("SmallCNN" in entry["neurocl"]["class"]) == (encoder["name"] == "small_cnn")
    monkeypatch.chdir(tmp_path)
    network = make_encoder(entry["neurocl"]["config"])[0]
    network.load_state_dict(torch.load(entry["weights"]))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), module.net.encoder(x))


def test_an_export_refuses_to_replace_a_foreign_file_under_an_encoders_name(tmp_path):
    module = build_method({"name": "simclr"}, SMALL)
    (tmp_path / "encoder.encoder.pt").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="encoder.encoder.pt"):
        write_export(module, tmp_path / "last.ckpt", tmp_path / "encoder.pt", overwrite=True)
    assert not (tmp_path / "encoder.pt").exists()
