"""The methods by name (:data:`METHODS`), and a method built from its settings or a checkpoint."""

from __future__ import annotations


from neurocl.methods import config
from neurocl.methods.base import BaseMethod
from neurocl.methods.batches import TrainingData
from neurocl.methods.config import MethodConfig
from neurocl.methods.objectives import DecoupledUniformity, SepCLR, SimCLR, YAware
from neurocl.patches import PatchConfig


METHODS: dict[str, type[BaseMethod]] = {
    "sepclr": SepCLR,
    "simclr": SimCLR,
    "yaware": YAware,
    "decoupled_uniformity": DecoupledUniformity,
}


def build_method(method, encoder, optim=None, seed: int = 0, data: TrainingData | None = None) -> BaseMethod:
    """The Lightning module of ``method.name`` (configs as pydantic models or plain dicts)."""
    method = MethodConfig.model_validate(method)
    return METHODS[method.name](method, encoder, optim, seed=seed, data=data)


def method_from_checkpoint(checkpoint: dict) -> BaseMethod:
    """Rebuild a trained method (CPU, eval mode) from a loaded Lightning checkpoint dict."""
    hparams = checkpoint["hyper_parameters"]
    module = build_method(hparams["method"], hparams["encoder"], hparams["optim"], seed=hparams["seed"])
    module.load_state_dict(checkpoint["state_dict"])
    if checkpoint.get("neurocl_patches") is not None:
        module.patches = PatchConfig.model_validate(checkpoint["neurocl_patches"])
    return module.eval()


config.METHODS.update(METHODS)
