"""A synthetic cohort's folder: every file name of it, in one place.

:class:`SynthDir` is the one place the synthetic-cohort format's file names are spelled (a test
checks that no other module spells the ground-truth ones); :mod:`neurocl.synth` writes the folder,
:mod:`neurocl.slices` and :mod:`neurocl.validation.natural` write folders of the same format, and
the pipeline, probes, maps, report, demo and benchmarks read the truth back. Layout
(``docs/synthetic.md``)::

    DIR/cohort.yaml                  the cohort spec (written last: its presence means complete; names ground_truth.tsv)
    DIR/participants.tsv             what a real cohort would have (observed attributes only)
    DIR/sub-XXXX/anat/sub-XXXX_desc-gm.nii.gz   each subject's grey-matter volume
    DIR/ground_truth.tsv             every latent factor, full precision (participant_id, group, ..., subtype)
    DIR/brain_mask.nii.gz            the template's brain
    DIR/masks/subtype-K_mask.nii.gz  where subtype K's loss is planted
    DIR/masks/regions.tsv            the regions of each subtype
    DIR/dataset_description.json     the options the folder was made with

A module of its own (not :mod:`neurocl.synth`) so that readers of the truth need not import the
generator, and the generator (imported by ``neurocl --help``) need not import the readers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from neurocl.io import read_tsv

__all__ = ["SynthDir"]


class SynthDir:
    """The paths of a synthetic cohort folder (:mod:`neurocl.synth`'s output)."""

    # Relative paths that cohort.yaml also names (its participants table, image template and ground truth).
    PARTICIPANTS = "participants.tsv"
    GROUND_TRUTH = "ground_truth.tsv"
    IMAGES = "{participant_id}/anat/{participant_id}_desc-gm.nii.gz"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.cohort_yaml = self.path / "cohort.yaml"
        self.participants = self.path / self.PARTICIPANTS
        self.ground_truth = self.path / self.GROUND_TRUTH
        self.brain_mask = self.path / "brain_mask.nii.gz"
        self.masks = self.path / "masks"
        self.regions = self.masks / "regions.tsv"
        self.description = self.path / "dataset_description.json"

    def image(self, participant_id: str) -> Path:
        """One subject's grey-matter volume."""
        return self.path / self.IMAGES.format(participant_id=participant_id)

    def subtype_mask(self, subtype: int) -> Path:
        """``masks/subtype-K_mask.nii.gz``: subtype K's true region."""
        return self.masks / f"subtype-{subtype}_mask.nii.gz"

    def subtype_masks(self) -> list[Path]:
        """Every subtype mask in the folder, sorted by file name."""
        return sorted(self.masks.glob(self.subtype_mask("*").name))

    def has_ground_truth(self) -> bool:
        return self.ground_truth.is_file()

    def read_ground_truth(self) -> pd.DataFrame:
        """``ground_truth.tsv`` as a table (clear error naming the file when it is missing or malformed)."""
        return read_tsv(self.ground_truth)
