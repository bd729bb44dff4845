"""Encoder weights in and out: start an encoder from a local file, export a trained one.

``encoder.weights: PATH`` in a pipeline starts training from a file on disk (never a download):

* a neurocl training checkpoint (``checkpoints/last.ckpt``): its ``net.encoder.*`` (single-space
  methods) or ``net.common_encoder.*`` / ``net.salient_encoder.*`` (SepCLR) tensors;
* a file written by ``neurocl export`` (the same keys without ``net.``);
* a MONAI / plain torch state dict of the backbone itself (``conv1.weight``, ``features.0...``),
  bare or under a ``state_dict`` or ``model`` key, with or without DataParallel's ``module.``.

Each encoder of the network takes the tensors under the prefix that matches most of its keys
(a single-space file starts both SepCLR encoders; a SepCLR file starts a single-space encoder from
its common encoder). Shapes must agree exactly (any difference is an error naming the key); keys
the encoder has and the file lacks are an error unless ``weights_strict: false``; keys the file
has under the chosen prefix and the encoder lacks (a classifier's last layer) are reported.

``neurocl export`` also writes each encoder alone, for use outside neurocl: beside the record
(``OUT.json``), one plain state dict per encoder (``OUT.common.pt``, ``OUT.salient.pt``, or
``OUT.encoder.pt`` for single-space methods), and in the record a ``monai`` block saying how to
build the network that loads it. MONAI-backed encoders with BatchNorm load into the MONAI class
itself::

    e = record["monai"]["common"]
    getattr(monai.networks.nets, e["class"])(**e["kwargs"]).load_state_dict(torch.load(e["weights"]))

and give neurocl's pooled features. DenseNet121 and SEResNet50 keep their last linear layer as
an identity (weight I, bias 0), because MONAI cannot build them without it. Encoders that are
neurocl's own (``small_cnn``, or a MONAI network whose BatchNorm neurocl replaced by
``norm: group|instance``) have ``"class": null`` and a ``neurocl`` entry: the network comes from
``neurocl.nets.make_encoder(e["neurocl"]["config"])[0]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from neurocl import __version__
from neurocl.errors import ConfigError
from neurocl.io import atomic_path, torch_load_failure, write_json
from neurocl.nets import EncoderConfig
from neurocl.outputs import claim_files, record_files

# Prefixes a file may hold each encoder's tensors under, in order of preference.
_PREFIXES = {
    "encoder": ("net.encoder.", "encoder.", "net.common_encoder.", "common_encoder."),
    "common_encoder": ("net.common_encoder.", "common_encoder.", "net.encoder.", "encoder."),
    "salient_encoder": ("net.salient_encoder.", "salient_encoder.", "net.common_encoder.", "common_encoder.",
                        "net.encoder.", "encoder."),
}
# Buffers that older files may lack and that carry no learned information.
_HARMLESS_MISSING = ("num_batches_tracked",)
EXPORT_FORMAT = "neurocl-encoder"
EXPORT_VERSION = 1
# The record's name for each encoder of the network, and the file suffix of its plain state dict.
_SPACES = {"encoder": "encoder", "common_encoder": "common", "salient_encoder": "salient"}
# MONAI classifiers neurocl cuts before their last linear layer: that layer, and the feature size.
# A plain MONAI network cannot be built without it, so the export sets it to the identity.
_IDENTITY_HEADS = {"DenseNet121": ("class_layers.out", 1024), "SEResNet50": ("last_linear", 2048)}


class LoadReport(NamedTuple):
    """What one encoder took from a weights file."""

    encoder: str
    prefix: str
    loaded: int
    missing: list[str]
    unexpected: list[str]

    def describe(self) -> str:
        where = f"keys under '{self.prefix}'" if self.prefix else "top-level keys"
        text = f"{self.encoder}: {self.loaded} tensors loaded from the file's {where}"
        if self.missing:
            text += f"; missing (kept at initialisation): {_preview(self.missing)}"
        if self.unexpected:
            text += f"; unexpected (ignored): {_preview(self.unexpected)}"
        return text


def _preview(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or state-dict file, loaded safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder.weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for damaged or unsafe files
        raise ConfigError(f"encoder.weights: {path} cannot be read as a torch file ({torch_load_failure(error)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(f"encoder.weights: {path} holds no state dict (a mapping of names to tensors)")
    tensors = {str(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if all(key.startswith("module.") for key in tensors):  # saved from DataParallel/DDP
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


def _interpretations(tensors: dict[str, torch.Tensor], name: str, own_keys: set[str]):
    """(prefix, tensors renamed to the encoder's keys) for every way the file may hold ``name``."""
    # A MONAI backbone's own keys sit under "network." in neurocl's pooled wrapper.
    inner = {key.split(".", 1)[0] + "." for key in own_keys if "." in key}
    wrappers = [""] + sorted(prefix for prefix in inner if prefix == "network.")
    for prefix in (*_PREFIXES[name], ""):
        selected = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        for wrapper in wrappers:
            yield prefix, {wrapper + key: value for key, value in selected.items()}


def load_encoder_weights(encoder: nn.Module, tensors: dict[str, torch.Tensor], name: str, source: str,
                         strict: bool = True) -> LoadReport:
    """Copy the matching tensors of a loaded file into ``encoder`` (named ``name`` in the network).

    Raises
    ------
    ConfigError
        No key matches, a shape differs, or (``strict``) the file lacks some of the encoder's keys.
    """
    own = encoder.state_dict()
    own_keys = set(own)
    prefix, renamed = max(_interpretations(tensors, name, own_keys), key=lambda option: len(own_keys & set(option[1])))
    matched = own_keys & set(renamed)
    if not matched:
        raise ConfigError(
            f"encoder.weights: no tensor of {source} matches the {name} "
            f"(file keys: {_preview(sorted(tensors))}; encoder keys: {_preview(sorted(own_keys))})"
        )
    mismatched = [f"{key}: file {tuple(renamed[key].shape)} vs encoder {tuple(own[key].shape)}"
                  for key in own if key in matched and renamed[key].shape != own[key].shape]  # network order
    if mismatched:
        raise ConfigError(
            f"encoder.weights: {source} does not fit the {name} ({len(mismatched)} shape(s) differ; is it the "
            f"same network, spatial_dims, in_channels and width?): {_preview(mismatched, 4)}"
        )
    missing = [key for key in own if key not in matched]
    unexpected = sorted(set(renamed) - own_keys)
    serious = [key for key in missing if not key.endswith(_HARMLESS_MISSING)]
    if strict and serious:
        raise ConfigError(
            f"encoder.weights: {source} lacks {len(serious)} tensor(s) of the {name}: {_preview(serious)} "
            "(set encoder.weights_strict: false to keep them at their initialisation)"
        )
    encoder.load_state_dict({key: renamed[key] for key in matched}, strict=False)
    return LoadReport(name, prefix, len(matched), missing, unexpected)


def encoders_of(net: nn.Module) -> dict[str, nn.Module]:
    """The network's encoders by attribute name (a shared-trunk SepCLR network has one)."""
    names = ("encoder", "common_encoder", "salient_encoder")
    return {name: getattr(net, name) for name in names if isinstance(getattr(net, name, None), nn.Module)}


def load_pretrained(net: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[LoadReport]:
    """Start every encoder of ``net`` from the file at ``path``; one report per encoder."""
    tensors = read_state_dict(path)
    return [load_encoder_weights(encoder, tensors, name, str(path), strict) for name, encoder in encoders_of(net).items()]


def export_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The encoders' tensors as a plain state dict (``encoder.*`` or ``common_encoder.*``/``salient_encoder.*``)."""
    return {f"{name}.{key}": value.detach().cpu().clone()
            for name, encoder in encoders_of(net).items() for key, value in encoder.state_dict().items()}


def export_record(module, checkpoint: str | os.PathLike) -> dict:
    """The JSON written beside an export: what the encoders are and where they came from."""
    encoder = module.encoder_config.model_dump(mode="json")
    encoder.pop("weights", None)
    encoder.pop("weights_strict", None)
    grid = getattr(module, "grid", None) or {}
    mask = grid.get("mask")
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "neurocl": __version__,
        "method": module.method_config.name,
        "encoders": list(encoders_of(module.net)),
        "encoder": encoder,
        "spatial_shape": list(mask.shape) if mask is not None else None,
        "checkpoint": str(Path(checkpoint).resolve()),
        "use": "pipeline YAML: encoder: {name: ..., weights: THIS_FILE} with the same encoder settings",
    }


def monai_equivalent(config: EncoderConfig | dict) -> tuple[str, dict] | str:
    """The ``monai.networks.nets`` name and keyword arguments of the network that loads ``config``'s
    encoder as a plain state dict, or why there is none (the encoder is neurocl's own)."""
    config = EncoderConfig.model_validate(config)
    if config.name == "small_cnn":
        return "small_cnn is neurocl's own network (neurocl.nets.SmallCNN), not a MONAI one"
    if config.norm != "batch":
        return (f"norm '{config.norm}': neurocl replaced the BatchNorm layers of MONAI's {config.name}, "
                "which MONAI's own class cannot do")
    dims, channels = config.spatial_dims, config.in_channels
    if config.name.startswith("resnet"):
        return config.name, {"spatial_dims": dims, "n_input_channels": channels,
                             "conv1_t_stride": config.first_conv_stride, "feed_forward": False}
    if config.name == "densenet121":
        return "DenseNet121", {"spatial_dims": dims, "in_channels": channels, "out_channels": _IDENTITY_HEADS["DenseNet121"][1]}
    return "SEResNet50", {"spatial_dims": dims, "in_channels": channels, "num_classes": _IDENTITY_HEADS["SEResNet50"][1]}


def standalone_encoders(net: nn.Module, config: EncoderConfig | dict, stem: str) -> dict[str, tuple[dict, dict]]:
    """Each encoder of ``net`` on its own: ``{space: (record entry, plain state dict)}``.

    ``space`` is ``encoder`` (single-space methods) or ``common``/``salient``; the entry's
    ``weights`` is the file name ``STEM.SPACE.pt`` the state dict is to be written under.
    """
    config = EncoderConfig.model_validate(config)
    equivalent = monai_equivalent(config)
    section = config.model_dump(mode="json", exclude={"weights", "weights_strict"})
    result = {}
    for name, encoder in encoders_of(net).items():
        space = _SPACES[name]
        state = {key: value.detach().cpu().clone() for key, value in encoder.state_dict().items()}
        entry = {"class": None, "kwargs": None, "weights": f"{stem}.{space}.pt",
                 "out_features": getattr(encoder, "out_features", None)}
        if isinstance(equivalent, str):
            own = "neurocl.nets.SmallCNN" if config.name == "small_cnn" else \
                f"monai.networks.nets {config.name} with {config.norm} normalisation, built by neurocl.nets.make_encoder"
            entry["neurocl"] = {"class": own, "config": section,
                                "load": "neurocl.nets.make_encoder(e['neurocl']['config'])[0]"
                                        ".load_state_dict(torch.load(e['weights']))"}
            entry["why"] = equivalent
        else:
            entry["class"], entry["kwargs"] = equivalent
            state = {key.removeprefix("network."): value for key, value in state.items()}
            if entry["class"] in _IDENTITY_HEADS:
                layer, features = _IDENTITY_HEADS[entry["class"]]
                state[f"{layer}.weight"] = torch.eye(features)
                state[f"{layer}.bias"] = torch.zeros(features)
                entry["note"] = f"{layer} is the identity (weight I, bias 0): the output is the pooled features"
        result[space] = (entry, state)
    return result


def write_export(module, checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                 inputs: dict | None = None) -> tuple[Path, Path]:
    """Write ``module``'s encoders to ``out`` (a plain state dict), ``out`` with ``.json`` (its record)
    and each encoder alone beside them (``OUT.common.pt``...; :func:`standalone_encoders`).

    Every file is written atomically; the state dicts load with ``torch.load(weights_only=True)``.
    Existing files are replaced only with ``overwrite``, and only when neurocl wrote them
    (:func:`neurocl.outputs.claim_files`); nothing is written into ``inputs``.
    """
    out = Path(out)
    if out.suffix == ".json":
        raise ConfigError(f"--out {out}: the weights file needs its own name (the record is written beside it as .json)")
    record = out.with_suffix(".json")
    standalone = standalone_encoders(module.net, module.encoder_config, out.stem)
    alone = [out.with_name(entry["weights"]) for entry, _ in standalone.values()]
    claim_files([out, record, *alone], overwrite, {"checkpoint": checkpoint, **(inputs or {})})
    with atomic_path(out) as tmp:
        torch.save(export_state(module.net), tmp)
    for path, (_, state) in zip(alone, standalone.values()):
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    write_json(record, {**export_record(module, checkpoint), "monai": {space: entry for space, (entry, _) in standalone.items()}})
    record_files([out, record, *alone])
    return out, record
