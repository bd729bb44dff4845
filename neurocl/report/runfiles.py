"""What a run folder holds for the report, read once: its config, cohort, tables and JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from neurocl.cohort import Cohort
from neurocl.errors import ConfigError, NeuroclError
from neurocl.io import load_yaml, read_tsv
from neurocl.rundir import RunDir
from neurocl.seeds import seed_files
from neurocl.synthdir import SynthDir


def _cohort_name(spec_path) -> str:
    """The ``name`` of the run's cohort spec, or its file name when the spec is gone or unnamed."""
    if not spec_path:
        return "unknown"
    try:
        spec = load_yaml(Path(spec_path), ConfigError, "cohort spec")
    except ConfigError:
        spec = None  # only a display name is wanted here: the file name stands in
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name) if name else Path(spec_path).name


class _RunFiles:
    """The run directory's files, each read once (None when absent)."""

    def __init__(self, folder: RunDir) -> None:
        self.dir = folder.path
        self.folder = folder
        self.config = folder.read_config_dict()
        self.name = str(self.config.get("name", folder.path.name)) if self.config else folder.path.name
        self.cohort_name = _cohort_name((self.config or {}).get("cohort"))
        method = (self.config or {}).get("method")
        self.method = str(method.get("name", "run")) if isinstance(method, dict) else "run"
        self.embeddings = _read_table(folder.embeddings)
        self.probes = _read_table(folder.probes)
        self.truth_probes = _read_table(folder.truth_probes)
        self.splits = _read_table(folder.splits)
        self.separation = _read_json(folder.separation)
        self.metrics = _read_table(folder.metrics, sep=",")
        self.baselines = {
            name: _read_table(folder.baseline(name).probes)
            for name in folder.baseline_names()
            if folder.baseline(name).probes.is_file()
        }
        # Each baseline's ground-truth probes and separation.json (clustering), where it has them.
        self.baseline_truth_probes = {name: _read_table(folder.baseline(name).truth_probes) for name in self.baselines}
        self.baseline_separations = {name: _read_json(folder.baseline(name).separation) for name in self.baselines}
        maps = folder.maps
        self.maps_dir = maps.path
        self.maps_index = _read_table(maps.index)
        self.subtypes = _read_json(maps.subtypes)
        self.evaluation = _read_json(maps.evaluation)
        self.associations = _read_table(maps.associations)
        self.clusters = _read_table(maps.clusters)
        self.seed_consensus = _read_json(maps.seed_consensus)
        self.seed_probes, self.seed_separations = seed_files(folder, self.config)
        self.cohort_table, self.ground_truth, self.cohort_note = _cohort_tables(self.config, folder.path)

    def any(self) -> bool:
        return any(
            value is not None
            for value in (self.embeddings, self.probes, self.separation, self.metrics, self.maps_index, self.subtypes)
        ) or bool(self.baselines)


def _read_table(path: Path, sep: str = "\t") -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return read_tsv(path) if sep == "\t" else pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ConfigError(f"report: cannot read {path} ({error})") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"report: cannot read {path} ({error})") from None


def _cohort_tables(config: dict | None, run_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """The cohort named by config.yaml (attributes and raw group labels, for colouring) and its ground truth
    (the spec's ``ground_truth``, else a ground_truth.tsv beside it)."""
    if not config or not config.get("cohort"):
        return None, None, ""
    cohort_yaml = Path(config["cohort"])
    if not cohort_yaml.is_absolute() and not cohort_yaml.is_file():
        cohort_yaml = run_dir / cohort_yaml
    if not cohort_yaml.is_file():
        return None, None, f"cohort {cohort_yaml} not found: views coloured by group only"
    try:
        cohort = Cohort.from_yaml(cohort_yaml)
    except NeuroclError as error:
        return None, None, f"cohort {cohort_yaml} unreadable ({error}): views coloured by group only"
    keys = cohort.keys().astype(str)
    table = pd.concat([keys, cohort.table.drop(columns=list(keys.columns))], axis=1)
    # The raw group labels (e.g. control / patient), from the TSV line each cohort row came from.
    participants = Path(cohort.spec.participants)
    participants = participants if participants.is_absolute() else cohort_yaml.parent / participants
    raw = _read_table(participants) if participants.is_file() else None
    column = cohort.spec.group.column
    if raw is not None and column in raw.columns and "row" in table:
        lines = pd.to_numeric(table["row"], errors="coerce") - 2  # header = line 1
        valid = lines.between(0, len(raw) - 1)
        table["diagnosis"] = np.where(valid, raw[column].astype(str).reindex(lines.fillna(-1).astype(int)).to_numpy(), None)
    truth_path = cohort.ground_truth_path or SynthDir(cohort_yaml.parent).ground_truth
    return table, _read_table(truth_path) if truth_path.is_file() else None, ""


def _maps_file(run: _RunFiles, name) -> Path | None:
    if not isinstance(name, str) or not name:
        return None
    for base in (run.maps_dir, run.dir):
        candidate = (base / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(run.dir.resolve()):
            return candidate
    return None
