"""The run folder: every path of it, and a finished run loaded back as objects.

:class:`RunDir` is the one place a run folder's file names are spelled (a test checks that no
other module spells them); every stage asks it for its paths. Layout (``docs/pipelines.md``)::

    RUN/config.yaml        the resolved pipeline          RUN/splits.tsv       the split manifest
    RUN/excluded.tsv       rows the cohort spec's include / on_invalid: exclude left out, and why
    RUN/store/             the preprocessed cohort (unless outputs.store points elsewhere)
    RUN/checkpoints/       last.ckpt, best.ckpt           RUN/logs/            metrics.csv, prepared.json
    RUN/embeddings.tsv     + its cohort sidecar           RUN/probes.tsv  RUN/separation.json
    RUN/truth_probes.tsv   the cohort's ground-truth factors probed (when its spec names a ground_truth)
    RUN/baselines/<name>/  a run folder of its own         RUN/maps/            see :class:`MapsFolder`
    RUN/seeds/seed-<s>/    each further training seed's model (``training.seeds``): checkpoints/, logs/,
                           embeddings.tsv, probes.tsv, separation.json; RUN itself is the primary seed's
    RUN/report.html  RUN/report.md  RUN/report_files/

``logs/prepared.json`` records the inputs the run trained on: the store folder, its volume file
and the fingerprints of the store's content and of the cohort. :func:`load_run` compares them with
what is there now and refuses a run whose shared store was since rebuilt for other volumes (two
runs sharing ``outputs.store``), or whose cohort changed, instead of analysing the wrong images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from neurocl.cohort import Cohort
from neurocl.config import PipelineConfig, config_yaml, validated
from neurocl.embed import cohort_fingerprint, load_model
from neurocl.errors import ConfigError, NeuroclError
from neurocl.io import load_yaml, read_tsv, write_json, write_text
from neurocl.logs import progress_console
from neurocl.outputs import OutputFolder, check_outside_inputs
from neurocl.store import VolumeStore

__all__ = ["MapsFolder", "Run", "RunDir", "load_run", "store_fingerprint"]

console = progress_console()

# What a resumed run must share with the run it continues: everything the trained weights depend
# on. The other sections (evaluation, baselines, maps, outputs, name) only shape later stages,
# which a resumed run recomputes, so they may change.
_TRAINING_SECTIONS = ("cohort", "preprocess", "harmonise", "splits", "views", "method", "encoder", "training")
_FREE_TRAINING_FIELDS = ("checkpoint_every_n_steps", "memory_budget_gb")


class MapsFolder:
    """``RUN/maps/``: what the maps stage writes (``docs/maps.md``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.index = self.path / "index.tsv"
        self.subtypes = self.path / "subtypes.json"
        # Co-clustering consensus of the subtypes found in each training seed's salient space (training.seeds).
        self.seed_consensus = self.path / "seed_consensus.json"
        self.evaluation = self.path / "evaluation.json"
        self.clusters = self.path / "clusters.tsv"
        self.associations = self.path / "associations.tsv"
        self.significance = self.path / "significance.tsv"
        # The null network trained with permuted group labels: a run folder of its own (checkpoints, logs),
        # beside the permutation it was trained with.
        self.permuted_labels_network = self.path / "null_permuted_labels"
        self.permuted_groups = self.permuted_labels_network / "permuted_groups.tsv"

    @staticmethod
    def map_names(name: str) -> dict[str, str]:
        """File names (relative to the folder) of one map: ``nifti``, ``png``, ``regions`` (index.tsv's columns)."""
        return {"nifti": f"{name}.nii.gz", "png": f"{name}.png", "regions": f"regions_{name}.tsv"}

    @staticmethod
    def significance_name(method: str, null: str) -> str:
        """File name (relative to the folder) of the −log10 p map of ``method`` against null network ``null``."""
        return f"significance_{method}_vs_{null}.nii.gz"


class RunDir:
    """Every path of a run folder (nothing is created or read here but by the methods that say so).

    A trained baseline's folder ``RUN/baselines/<name>/`` is a run folder of its own
    (:meth:`baseline`): checkpoints, logs, embeddings and probes, under the same names. So is each
    further training seed's ``RUN/seeds/seed-<s>/`` (:meth:`seed_run`); the run folder itself holds
    the primary seed's model, so every command that reads one model reads that one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.splits = self.path / "splits.tsv"
        # The rows of participants.tsv the cohort left out (include, on_invalid: exclude) and why.
        self.excluded = self.path / "excluded.tsv"
        self.default_store = self.path / "store"
        self.harmonised_store = self.path / "store-harmonised"
        self.checkpoints = self.path / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.ckpt"
        self.best_checkpoint = self.checkpoints / "best.ckpt"
        self.logs = self.path / "logs"
        self.metrics = self.logs / "metrics.csv"
        self.prepared = self.logs / "prepared.json"
        self.trackers = self.logs / "trackers"  # Lightning loggers' folders (tensorboard/, csv/, mlruns/, wandb/)
        self.embeddings = self.path / "embeddings.tsv"
        self.probes = self.path / "probes.tsv"
        # The cohort's ground-truth factors probed like attributes (probes.tsv format), when it has one.
        self.truth_probes = self.path / "truth_probes.tsv"
        self.separation = self.path / "separation.json"
        self.separation_table = self.path / "separation.tsv"
        self.report_html = self.path / "report.html"
        self.report_md = self.path / "report.md"
        self.report_figures = self.path / "report_files"
        self.baselines = self.path / "baselines"
        self.seeds = self.path / "seeds"
        self.maps = MapsFolder(self.path / "maps")
        self.own = OutputFolder(self.path)  # .neurocl/: the marker that this is a run folder, its lock

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def baseline(self, name: str) -> "RunDir":
        """The run folder of baseline ``name``."""
        return RunDir(self.baselines / name)

    def baseline_names(self) -> list[str]:
        """Baselines with a folder here, sorted."""
        return sorted(folder.name for folder in self.baselines.glob("*") if folder.is_dir())

    def seed_run(self, seed: int) -> "RunDir":
        """The run folder of training seed ``seed`` other than the primary one: ``seeds/seed-<seed>/``."""
        return RunDir(self.seeds / f"seed-{seed}")

    def seed_runs(self, seeds: list[int]) -> dict[int, "RunDir"]:
        """Each of ``seeds`` (the primary first, as ``training.run_seeds()`` lists them) and its run folder."""
        return {seed: self if i == 0 else self.seed_run(seed) for i, seed in enumerate(seeds)}

    def checkpoint(self, name: str = "last") -> Path:
        """``checkpoints/<name>.ckpt`` (``last`` or ``best``; a file name ending in .ckpt is taken as is)."""
        return self.checkpoints / (name if name.endswith(".ckpt") else f"{name}.ckpt")

    def store_folder(self, config: PipelineConfig, harmonised: bool = True) -> Path:
        """The store the run trains on: ``RUN/store-harmonised`` when the pipeline harmonises (unless
        ``harmonised`` is false: the store it is computed from), else ``outputs.store`` or ``RUN/store``."""
        if harmonised and config.harmonise is not None:
            return self.harmonised_store
        return config.outputs.store or self.default_store

    # ------------------------------------------------------------ config

    def read_config(self) -> PipelineConfig:
        """The resolved pipeline of this run (config.yaml)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path} is not a run directory (config.yaml missing)")
        return validated(PipelineConfig, load_yaml(self.config, ConfigError, "run configuration"), str(self.config))

    def read_config_dict(self) -> dict | None:
        """config.yaml as a plain mapping (None when absent or not a mapping): for readers that tolerate old runs."""
        if not self.config.is_file():
            return None
        loaded = load_yaml(self.config, ConfigError, "run configuration")
        return loaded if isinstance(loaded, dict) else None

    def trained(self) -> bool:
        """Whether any training of this run (the method's or a baseline's) wrote a checkpoint."""
        runs = [self] + [self.baseline(name) for name in self.baseline_names()]
        runs += [RunDir(folder) for folder in self.seeds.glob("seed-*") if folder.is_dir()]
        return any(any(run.checkpoints.glob("*.ckpt")) for run in runs)

    def _untrained_leftovers(self) -> list[Path] | None:
        """What a run that failed before training left here (config.yaml, splits.tsv, logs/, the store), or
        None when the folder is not a neurocl run (no marker) or holds anything else (another run's
        results, files of the user)."""
        own = {self.config, self.splits, self.excluded, self.logs, self.default_store, self.harmonised_store,
               self.checkpoints}
        if not self.own.is_run() or self.trained() or any(path not in own for path in self.own.contents()):
            return None
        return [path for path in (self.config, self.splits, self.excluded, self.prepared) if path.exists()]

    def check_out(self, config: PipelineConfig, resume: bool, inputs: dict[str, Path | None] | None = None) -> None:
        """Refuse an unusable ``--out`` before anything is written: an input of the run or inside one
        (:func:`neurocl.outputs.check_outside_inputs`), not empty for a new run (unless it holds a
        neurocl run that never trained), or ``--resume`` of another training or of a folder neurocl did not make."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file; give a folder")
        check_outside_inputs([self.path], inputs or {}, folder=True)
        if not self.own.contents():
            if resume:
                raise ConfigError(f"--resume: {self.path} holds no run; start it without --resume")
            return
        if self._untrained_leftovers() is not None:
            return  # a run that failed before training: the same command starts it again (see prepare)
        if not self.own.is_run():
            raise ConfigError(f"--out {self.path} exists, is not empty and is not a neurocl run folder (it holds "
                              "files neurocl did not write); choose a new or empty folder")
        if not resume:
            raise ConfigError(f"--out {self.path} holds a run already; choose a new folder or pass --resume")
        if not self.config.is_file():
            raise ConfigError(f"--resume: {self.path} holds no run (config.yaml missing); start it without --resume")
        before = _training_part(load_yaml(self.config, ConfigError, "run configuration"))
        now = _training_part(config.model_dump(mode="json"))
        changed = [section for section in _TRAINING_SECTIONS if before[section] != now[section]]
        if changed:
            seeds = [(part.get("training") or {}).get("seeds") for part in (before, now)]
            hint = ""
            if seeds[0] != seeds[1]:
                hint = (f" (training.seeds: the run was started with {seeds[0] or 'one seed'}, this command gives "
                        f"{seeds[1] or 'one seed'}; pass the same --seeds)")
            raise ConfigError(
                f"--resume: the pipeline differs from the run's {self.config} in section(s) {', '.join(changed)}, "
                f"which the trained weights depend on{hint}; resume with the same pipeline or start a new run"
            )

    def prepare(self, config: PipelineConfig, resume: bool, inputs: dict[str, Path | None] | None = None) -> None:
        """Mark the folder as a run and save config.yaml, after :meth:`check_out` and every other check passed.

        A run that never trained starts afresh: the split manifest and inputs record of the failed
        attempt are removed (its store is kept: an up-to-date store is reused, not rebuilt).
        """
        self.check_out(config, resume, inputs)
        leftovers = self._untrained_leftovers()
        if leftovers:
            console.print(f"[yellow]note:[/] {self.path} holds a run that never trained; starting it again "
                          f"(replacing {', '.join(str(path.relative_to(self.path)) for path in leftovers)})")
            for path in leftovers:
                if path != self.config:
                    path.unlink()
        self.own.mark_run()
        write_text(self.config, config_yaml(config))

    # ------------------------------------------------------------ inputs record

    def record_inputs(self, store: VolumeStore, cohort: Cohort) -> None:
        """logs/prepared.json: the store and cohort this run trains on (see the module docstring).

        Besides the fingerprints, each subject's row digest and image hash, so that a resume on a
        cohort that changed since can say which subjects differ (:meth:`check_resume`).
        """
        write_json(self.prepared, {
            "store": str(store.cache_dir),
            "volumes": store.record["volumes"],
            "store_fingerprint": store_fingerprint(store),
            "cohort": str(cohort.source),
            "cohort_fingerprint": cohort_fingerprint(cohort),
            "cohort_rows": _row_digests(cohort),
            "images": _image_digests(store),
        })

    def check_resume(self, cohort: Cohort, store: VolumeStore | None = None) -> None:
        """Refuse to resume training on a cohort (rows, then images) or store other than the recorded ones.

        Called before the store is opened (``store`` None: the participants table) and again once it
        is (the images' content and the preprocessing). A run recorded by an older neurocl, without
        row digests, is checked by its fingerprints only.
        """
        record = self.read_inputs()
        if record is None:
            return
        advice = "resuming would train on a mix of both; start a new --out (or restore the inputs)"
        if store is None:
            rows = record.get("cohort_rows")
            if rows is not None:
                difference = _differences(rows, _row_digests(cohort))
                if difference:
                    table = cohort.participants_path or cohort.source
                    raise ConfigError(f"{table} changed since this run started: {difference}; {advice}")
            elif record.get("cohort_fingerprint") not in (None, cohort_fingerprint(cohort)):
                raise ConfigError(f"{cohort.source} changed since this run started (other rows, groups or "
                                  f"attributes); {advice}")
            return
        images = record.get("images")
        if images is not None:
            difference = _differences(images, _image_digests(store), what="image")
            if difference:
                raise ConfigError(f"the images of {cohort.source} changed since this run started: {difference}; {advice}")
        if record.get("store_fingerprint") not in (None, store_fingerprint(store)):
            raise ConfigError(f"{self.path}: the store {store.cache_dir} holds other volumes than the ones this run "
                              f"started on (other preprocessing); {advice}")

    def read_inputs(self) -> dict | None:
        """logs/prepared.json, or None when the run has none (yet, or from an older neurocl)."""
        if not self.prepared.is_file():
            return None
        try:
            return json.loads(self.prepared.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def check_inputs(self, store: VolumeStore, cohort: Cohort) -> None:
        """Refuse a store or cohort other than the ones the run trained on (both named in the message)."""
        record = self.read_inputs()
        if record is None:
            return
        expected = record.get("store_fingerprint")
        if expected is not None and expected != store_fingerprint(store):
            raise NeuroclError(
                f"{self.path}: the store {store.cache_dir} now holds other volumes than the ones this run was trained "
                f"on (another run sharing outputs.store rebuilt it for another cohort or preprocessing); give each "
                f"cohort its own outputs.store and rebuild this run's store with `neurocl run PIPELINE --out "
                f"{self.path} --resume`"
            )
        expected = record.get("cohort_fingerprint")
        if expected is not None and expected != cohort_fingerprint(cohort):
            raise NeuroclError(
                f"{self.path}: the cohort {cohort.source} changed since this run was trained (other rows, groups or "
                "attributes); its embeddings describe the cohort as it was. Rerun the pipeline on the new cohort"
            )

    # ------------------------------------------------------------ tables

    def read_table(self, path: Path) -> pd.DataFrame:
        if not path.is_file():
            raise NeuroclError(f"{self.path}: no {path.relative_to(self.path)} yet; finish the run first "
                               "(neurocl run ... --resume)")
        return read_tsv(path)


def _training_part(config: dict) -> dict:
    part = {section: config.get(section) for section in _TRAINING_SECTIONS}
    if isinstance(part["training"], dict):
        part["training"] = {k: v for k, v in part["training"].items() if k not in _FREE_TRAINING_FIELDS}
    return part


def _subject(record: dict) -> str:
    return "/".join(str(record[key]) for key in ("participant_id", "session_id") if key in record)


def _row_digests(cohort: Cohort) -> dict[str, str]:
    """Subject -> sha256 (16 hex digits) of its key, group and attributes as text."""
    columns = [*cohort.key_columns, "group", *cohort.attribute_kinds]
    return {_subject(row): hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for row in cohort.table[columns].astype(str).to_dict("records")}


def _image_digests(store: VolumeStore) -> dict[str, str]:
    """Subject -> sha256 of its image file, as the store read it."""
    manifest = store.manifest
    return {_subject(row): str(row["sha256"]) for row in manifest.to_dict("records")} if "sha256" in manifest else {}


def _differences(before: dict[str, str], now: dict[str, str], what: str = "row") -> str:
    """'2 rows differ (sub-0003, sub-0007), 1 added (sub-0201)' ('' when the same)."""
    parts = []
    for label, subjects in (("differ", [s for s in before if s in now and before[s] != now[s]]),
                            ("added", [s for s in now if s not in before]),
                            ("removed", [s for s in before if s not in now])):
        if subjects:
            shown = ", ".join(subjects[:5]) + (f", ... ({len(subjects) - 5} more)" if len(subjects) > 5 else "")
            verb = label if label == "differ" else f"{'was' if len(subjects) == 1 else 'were'} {label}"
            noun = what if len(subjects) == 1 else f"{what}s"
            parts.append(f"{len(subjects)} {noun} {'differs' if label == 'differ' and len(subjects) == 1 else verb} ({shown})")
    return ", ".join(parts)


def store_fingerprint(store: VolumeStore) -> str:
    """sha256 of what a store holds: each row's subject key, image content hash and preprocessing parameters.

    Two builds of the same images with the same preprocessing agree (whatever the volume file's
    name); a rebuild for another cohort, other images or other settings does not.
    """
    manifest = store.manifest
    columns = [column for column in ("index", "participant_id", "session_id", "sha256", "params") if column in manifest]
    text = manifest[columns].astype(str).to_csv(sep="\t", index=False)
    text += json.dumps(store.config.model_dump(mode="json"), sort_keys=True) + repr(store.spatial_shape)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Run:
    """A finished run as objects: what ``neurocl maps`` and notebooks work from."""

    run_dir: Path
    config: PipelineConfig
    cohort: Any
    store: Any
    model: Any
    embeddings: pd.DataFrame

    @property
    def folder(self) -> RunDir:
        return RunDir(self.run_dir)


def load_run(run_dir: str | os.PathLike, checkpoint: str = "last.ckpt") -> Run:
    """Open a run directory: resolved config, cohort, store, trained model (CPU, eval) and embeddings.

    Raises
    ------
    NeuroclError
        When the run is unfinished, or its store or cohort are no longer the ones it was trained on.
    """
    folder = RunDir(run_dir)
    config = folder.read_config()
    embeddings = folder.read_table(folder.embeddings)
    cohort = Cohort.from_yaml(config.cohort)
    store = VolumeStore.open(folder.store_folder(config))
    folder.check_inputs(store, cohort)
    return Run(
        run_dir=folder.path,
        config=config,
        cohort=cohort,
        store=store,
        model=load_model(folder.checkpoint(checkpoint)),
        embeddings=embeddings,
    )
