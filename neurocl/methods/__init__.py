r"""Contrastive methods as Lightning modules over one small base (solo-learn style).

:class:`BaseMethod` owns what every method shares: the network, the optimiser and
its schedule, drawing augmented views of a batch of store indices on the store's
device, the non-finite guard and the logging of each loss term. A method adds only
its network and its loss call:

- :class:`SimCLR`: NT-Xent / InfoNCE over V views (:func:`neurocl.losses.info_nce`).
- :class:`YAware`: y-Aware InfoNCE with a kernel prior over chosen attributes
  (:func:`neurocl.losses.yaware_info_nce`).
- :class:`DecoupledUniformity`: uniformity of view centroids, optionally conditioned
  on an attribute kernel (:func:`neurocl.losses.decoupled_uniformity`).
- :class:`SepCLR`: a common and a salient space for a background / target contrast
  (:func:`neurocl.losses.sepclr_loss`).

The losses are pure functions of embedding tensors (tested without a Trainer); with
more than one process they gather the embeddings of every rank, so the loss that each
rank computes is that of the global batch.

Batches are :class:`EpochBatches`: store indices whose order is a function of
``(seed, epoch)`` only and whose views use generators seeded from
``(seed, epoch, position, rank)``, so a run resumed from a mid-epoch checkpoint draws
the very batches and views the uninterrupted run would have drawn.

With ``views.patches`` the views are K random patches per subject
(:class:`neurocl.patches.PatchSampler`): the loss then sees one sample per patch
(``same_location``) or the K patches of a subject as its views (``same_subject``), and a
patch's group and attributes are its subject's; embeddings average patch features on a
grid over the whole volume (:func:`neurocl.patches.sliding_window_features`) unless
``views.patches.embed`` is ``whole``.

The package, one job a module: :mod:`~neurocl.methods.config` (:class:`MethodConfig`,
:class:`OptimConfig`), :mod:`~neurocl.methods.batches` (:class:`TrainingData`, :class:`EpochBatches`,
:func:`step_seed`), :mod:`~neurocl.methods.base` (:class:`BaseMethod`), :mod:`~neurocl.methods.objectives`
(the four methods) and :mod:`~neurocl.methods.registry` (:data:`METHODS`, :func:`build_method`,
:func:`method_from_checkpoint`).
"""

from neurocl.methods.base import BaseMethod
from neurocl.methods.batches import EpochBatches, TrainingData, step_seed
from neurocl.methods.config import MethodConfig, MethodName, OptimConfig
from neurocl.methods.objectives import DecoupledUniformity, SepCLR, SimCLR, YAware
from neurocl.methods.registry import METHODS, build_method, method_from_checkpoint

__all__ = [
    "METHODS",
    "MethodName",
    "BaseMethod",
    "DecoupledUniformity",
    "EpochBatches",
    "MethodConfig",
    "OptimConfig",
    "SepCLR",
    "SimCLR",
    "TrainingData",
    "YAware",
    "build_method",
    "method_from_checkpoint",
    "step_seed",
]
