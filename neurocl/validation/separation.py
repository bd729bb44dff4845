"""``neurocl bench separation``: does the salient space hold what only patients have, across a panel?

For every cohort of the panel (:mod:`neurocl.validation.panel`) and every seed, the bench builds
the cohort (cohort seed ``1000 + seed``: never the demo's own cohort), runs a pipeline on it
(default: the shipped demo settings) with four baselines trained or fitted on the same
subjects with the same budget (PCA, contrastive PCA, the linear two-space model lin2 whose common
and salient spaces are scored apart as ``lin2_common`` and ``lin2_salient``, a single-space SimCLR
network trained with the pipeline's own training section), and scores every attribute from every
representation **on held-out subjects**: a linear probe is fitted on the encoder's training (and validation)
subjects and scored on the ``test`` subjects of the run's split, which no network and no PCA saw.

Scores are balanced accuracy (categorical) and R^2 (continuous), also given as ``u``, the score
above chance scaled to [.., 1]: ``u = (score - chance) / (1 - chance)`` (chance 1/K or 0). Per
cohort and seed, with ``S`` the target-only (specific) attributes scored on target subjects and
``C`` the shared attributes scored on target subjects::

    specific_gap = mean_{a in S} (u_salient(a) - u_common(a))
    shared_gap   = mean_{a in C} (u_common(a)  - u_salient(a))
    separation   = (specific_gap + shared_gap) / 2

A method that puts everything in one space (salient = common) has separation 0; one that
separates perfectly approaches 1. A cohort counts as *separated* when ``separation >= 0.1`` and
every specific attribute is decodable from the salient space (``u >= 0.1``).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from neurocl import io
from neurocl.config import load_pipeline
from neurocl.errors import ConfigError
from neurocl.pipeline import run_pipeline
from neurocl.probe import embedding_spaces
from neurocl.probe.heldout import held_out_score
from neurocl.rundir import RunDir
from neurocl.synthdir import SynthDir
from neurocl.validation.panel import (PANEL, RENAMED_COLUMNS, PanelCohort, PanelScale, build_cohort, panel_cohort,
                                      run_panel)

DEMO_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"
COHORT_SEED_OFFSET = 1000
BASELINES = ("pca", "cpca", "lin2", "simclr")
# A two-space baseline's spaces are scored apart: lin2_common, lin2_salient.
TWO_SPACE_BASELINES = ("lin2",)
REPRESENTATIONS = ("common", "salient", *(representation for name in BASELINES for representation in (
    [f"{name}_common", f"{name}_salient"] if name in TWO_SPACE_BASELINES else [name])))
SEPARATED_MIN = 0.1  # separation index and salient u of every specific attribute

# Quick: small cohorts and a few optimiser steps, to check the whole panel runs (minutes);
# full: the pipeline's own training section on 160-subject cohorts.
QUICK_SCALE = PanelScale(n_subjects=96, resolution=8.0, patch=48)
FULL_SCALE = PanelScale(n_subjects=160, resolution=8.0, patch=64)
QUICK_EPOCHS = 32


class SeparationBenchConfig(BaseModel):
    """What the separation bench runs."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Path = Field(DEMO_PIPELINE, description="pipeline YAML applied to every cohort")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds; cohort seed = 1000 + seed")
    cohorts: list[str] = Field([cohort.name for cohort in PANEL], min_length=1, description="panel cohorts to run")
    n_subjects: int = Field(FULL_SCALE.n_subjects, ge=16)
    resolution: float = Field(FULL_SCALE.resolution, ge=4.0, le=16.0)
    patch: int = Field(FULL_SCALE.patch, ge=16)
    epochs: int | None = Field(None, gt=0, description="override the pipeline's training.epochs (None: keep)")
    settings: list[str] = Field([], description="SECTION.FIELD=VALUE overrides of the pipeline (neurocl run --set), "
                                "applied before the bench's own cohort, seed and epochs")
    baselines: list[str] = Field(list(BASELINES), description="baselines run beside the method (subset of pca, cpca, "
                                 "lin2, simclr; leaving out simclr halves the training time)")
    workdir: Path | None = Field(None, description="keep cohorts and runs here (default: a temporary folder)")

    @classmethod
    def preset(cls, quick: bool, **overrides) -> "SeparationBenchConfig":
        scale = QUICK_SCALE if quick else FULL_SCALE
        settings = {"n_subjects": scale.n_subjects, "resolution": scale.resolution, "patch": scale.patch}
        if quick:
            settings.update(seeds=[0], epochs=QUICK_EPOCHS)
        settings.update({key: value for key, value in overrides.items() if value is not None})
        try:
            config = cls(**settings)
        except Exception as error:  # pydantic's message names the field
            raise ConfigError(f"bench separation: {error}") from None
        for name in config.cohorts:
            panel_cohort(name)
        unknown = sorted(set(config.baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"bench separation --baselines: unknown {', '.join(unknown)} (known: {', '.join(BASELINES)})")
        if not config.pipeline.is_file():
            raise ConfigError(f"--pipeline {config.pipeline} does not exist")
        return config


def score_representations(representations: dict[str, pd.DataFrame], truth: pd.DataFrame, cohort: PanelCohort,
                          probe_config=None) -> tuple[list[dict], dict]:
    """Held-out scores of every attribute of ``cohort`` from every representation, and the cohort's summary.

    Parameters
    ----------
    representations : name -> table with ``participant_id``, ``split`` and that representation's
        feature columns (nothing else numeric is used: pass ``<prefix>_<i>`` columns only)
    truth : ``ground_truth.tsv`` (participant_id, group, one column per attribute)

    Returns
    -------
    rows : one per attribute x subset: attribute, role (shared/specific), subset, metric, chance
        and ``values`` / ``u`` per representation (None where it could not be scored)
    summary : specific_gap, shared_gap, separation (None without both common and salient),
        separated (bool), n_test
    """
    tasks = [(attribute, "specific", "target", kind) for attribute, kind in cohort.specific.items()]
    for attribute, kind in cohort.shared.items():
        tasks += [(attribute, "shared", "all", kind), (attribute, "shared", "target", kind)]
    rows = []
    for attribute, role, subset, kind in tasks:
        if attribute not in truth.columns:
            raise ConfigError(f"panel cohort {cohort.name}: ground truth has no column {attribute!r}")
        row = {"attribute": attribute, "role": role, "subset": subset, "kind": kind, "metric": None, "chance": None,
               "values": {}, "u": {}, "n_test": None}
        for name, table in representations.items():
            joined = table.merge(truth[["participant_id", "group", attribute]], on="participant_id", how="inner",
                                 suffixes=("_embedding", ""))
            # pandas 3 may hand back read-only views: combine into new arrays, never in place
            keep = joined[attribute].notna().to_numpy()
            if subset == "target":
                keep = keep & joined["group"].eq("target").to_numpy()
            if kind == "categorical":
                keep = keep & joined[attribute].astype(str).ne("-1").to_numpy()
            split = joined["split"].astype(str).to_numpy()
            columns = [c for c in table.columns if c not in ("participant_id", "session_id", "split", "group")]
            result = held_out_score(joined[columns].to_numpy(), joined[attribute].to_numpy(), kind,
                                    keep & np.isin(split, ["train", "val"]), keep & (split == "test"), probe_config)
            row["values"][name] = None if result is None else result["value"]
            row["u"][name] = None if result is None else result["u"]
            if result is not None:
                row["metric"], row["chance"], row["n_test"] = result["metric"], result["chance"], result["n_test"]
        rows.append(row)
    return rows, summarise(rows)


def summarise(rows: list[dict]) -> dict:
    """specific_gap, shared_gap, separation and the separated verdict from scored rows (module docstring)."""

    def gaps(role: str, sign: float) -> list[float]:
        out = []
        for row in rows:
            if row["role"] == role and row["subset"] == "target":
                common, salient = row["u"].get("common"), row["u"].get("salient")
                if common is not None and salient is not None:
                    out.append(sign * (salient - common))
        return out

    specific, shared = gaps("specific", 1.0), gaps("shared", -1.0)
    specific_gap = float(np.mean(specific)) if specific else None
    shared_gap = float(np.mean(shared)) if shared else None
    parts = [gap for gap in (specific_gap, shared_gap) if gap is not None]
    separation = float(np.mean(parts)) if parts else None
    salient_specific = [row["u"].get("salient") for row in rows if row["role"] == "specific"]
    separated = (separation is not None and separation >= SEPARATED_MIN and bool(salient_specific)
                 and all(u is not None and u >= SEPARATED_MIN for u in salient_specific))
    return {"specific_gap": specific_gap, "shared_gap": shared_gap, "separation": separation, "separated": separated}


# ----------------------------------------------------------------------------- running the panel


def covariates(cohort: PanelCohort) -> list[str]:
    """The cohort's shared attributes as its participants table names them (the covariates a user knows)."""
    return [RENAMED_COLUMNS.get(name, name) if cohort.rename else name for name in cohort.shared]


def _bench_pipeline(raw: dict, cohort_yaml: Path, seed: int, epochs: int | None,
                    baselines: Iterable[str] = BASELINES, cohort: PanelCohort | None = None) -> dict:
    """The pipeline as the bench runs it on one cohort: same settings, the bench's cohort, seed and baselines.

    A method given ``attributes`` (covariates: kernel priors, covariate independence) gets the
    cohort's own shared attributes instead, as that cohort's table names them: the panel's cohorts
    do not share column names (``AGE``/``gender``/``scanner``; ``photo``/``crop_row``/``gamma``).
    """
    raw = copy.deepcopy(raw)
    if cohort is not None and raw.get("method", {}).get("attributes"):
        raw["method"]["attributes"] = covariates(cohort)
    raw["cohort"] = str(cohort_yaml.absolute())
    raw.setdefault("training", {})["seed"] = seed
    if epochs is not None:
        raw["training"]["epochs"] = epochs
    raw.setdefault("splits", {}).pop("file", None)
    raw["splits"]["seed"] = seed
    # The bench scores held-out itself: the pipeline's own probes, maps and report are skipped.
    evaluation = raw.setdefault("evaluation", {})
    evaluation["attributes"] = []
    evaluation.setdefault("probe", {}).update({"n_permutations": 0, "n_bootstrap": 0})
    raw["baselines"] = list(baselines)
    raw["maps"] = {"enabled": False}
    raw.setdefault("outputs", {}).update({"report": False, "store": None})
    return raw


def _representations(run_dir: Path, baselines: Iterable[str] = BASELINES) -> dict[str, pd.DataFrame]:
    """Embedding tables of the run: common / salient (or main) and every baseline, keyed for scoring."""
    run = RunDir(run_dir)
    main = run.read_table(run.embeddings)
    keys = ["participant_id", "split"]
    out = {}
    for space, columns in embedding_spaces(main).items():
        out[space if space in ("common", "salient") else "main"] = main[keys + columns]
    for name in baselines:
        baseline = run.baseline(name)
        table = baseline.read_table(baseline.embeddings)
        spaces = embedding_spaces(table)
        if name in TWO_SPACE_BASELINES:
            out.update({f"{name}_{space}": table[keys + columns] for space, columns in spaces.items()})
        else:
            out[name] = table[keys + [c for columns in spaces.values() for c in columns]]
    return out


def run_one(cohort: PanelCohort, seed: int, config: SeparationBenchConfig, workdir: Path, raw_pipeline: dict,
            log=None) -> dict:
    """Build one cohort, run the pipeline on it, score held-out; the run's record (results.json's ``runs``)."""
    started, cpu_started = time.monotonic(), time.process_time()
    cohort_seed = COHORT_SEED_OFFSET + seed
    folder = workdir / f"{cohort.name}-seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    scale = PanelScale(config.n_subjects, config.resolution, config.patch)
    cohort_yaml = build_cohort(cohort, folder / "cohort", scale, cohort_seed)
    pipeline = _bench_pipeline(raw_pipeline, cohort_yaml, seed, config.epochs, config.baselines, cohort)
    pipeline_yaml = io.write_text(folder / "pipeline.yaml", yaml.safe_dump(pipeline, sort_keys=False))
    run_dir = run_pipeline(pipeline_yaml, folder / "run")
    truth = SynthDir(cohort_yaml.parent).read_ground_truth()
    rows, summary = score_representations(_representations(run_dir, config.baselines), truth, cohort)
    return {"cohort": cohort.name, "seed": seed, "cohort_seed": cohort_seed, "rows": rows, "summary": summary,
            "wall_s": round(time.monotonic() - started, 1), "cpu_s": round(time.process_time() - cpu_started, 1)}


def bench_settings(config: SeparationBenchConfig) -> dict:
    """The pipeline with the bench's ``--set`` overrides, validated (ConfigError naming the field), as a dict."""
    # Validated now, with every relative path resolved against the pipeline's folder (the bench
    # writes its copies elsewhere); the cohort is the bench's own.
    return load_pipeline(config.pipeline, {"cohort": str(config.pipeline)}, config.settings).model_dump(mode="json")


def run_separation_bench(config: SeparationBenchConfig, log=None) -> dict:
    """Every cohort x seed of ``config``; results.json's content (runs, aggregated table, machine)."""
    raw = bench_settings(config)
    started = time.monotonic()
    runs = run_panel(config.cohorts, config.seeds, config.workdir, "separation",
                     lambda cohort, seed, workdir: run_one(cohort, seed, config, workdir, raw), log)
    return {
        "config": config.model_dump(mode="json"),
        "machine": machine_description(),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": runs,
        "table": aggregate(runs),
    }


def machine_description() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def _mean_sd(values: Iterable) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and SD over seeds of every score and of the summary, per cohort (results.json's ``table``)."""
    table = []
    for name in dict.fromkeys(run["cohort"] for run in runs):
        mine = [run for run in runs if run["cohort"] == name]
        rows = []
        for index, first in enumerate(mine[0]["rows"]):
            cells = {rep: _mean_sd(run["rows"][index]["values"].get(rep) for run in mine)
                     for rep in first["values"]}
            rows.append({key: first[key] for key in ("attribute", "role", "subset", "kind", "metric", "chance")}
                        | {"values": cells})
        summary = {key: _mean_sd(run["summary"][key] for run in mine)
                   for key in ("specific_gap", "shared_gap", "separation")}
        summary["separated_seeds"] = sum(bool(run["summary"]["separated"]) for run in mine)
        table.append({"cohort": name, "seeds": [run["seed"] for run in mine], "rows": rows, "summary": summary})
    return table


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.2f}" + ("" if stats["sd"] is None else f" ± {stats['sd']:.2f}")


def print_separation(results: dict, console) -> None:
    """Per cohort: each attribute's held-out score from every representation, then the separation summary."""
    descriptions = {cohort.name: cohort.stress for cohort in PANEL}
    for entry in results["table"]:
        representations = list(entry["rows"][0]["values"]) if entry["rows"] else []
        table = Table(title=f"{entry['cohort']}: {descriptions.get(entry['cohort'], '')} "
                            f"(held-out test subjects, seeds {entry['seeds']})", title_justify="left")
        for column in ("attribute", "role", "subjects", "metric", "chance", *representations):
            table.add_column(column)
        for row in entry["rows"]:
            chance = "" if row["chance"] is None else f"{row['chance']:.2f}"
            table.add_row(row["attribute"], row["role"], row["subset"], row["metric"] or "n/a", chance,
                          *[_cell(row["values"][rep]) for rep in representations])
        console.print(table)
        summary = entry["summary"]
        console.print(f"  separation {_cell(summary['separation'])} (specific gap {_cell(summary['specific_gap'])}, "
                      f"shared gap {_cell(summary['shared_gap'])}); separated in {summary['separated_seeds']} of "
                      f"{len(entry['seeds'])} seeds")
        checks = target_checks(entry)
        missed = [c for c in checks if not c["met"]]
        console.print(f"  separation targets: {len(checks) - len(missed)} of {len(checks)} met"
                      + ("" if not missed else "; missed: " + "; ".join(
                          f"{c['attribute']} ({c['subset']}) {c['check']} by {c['gap']:.2f}" for c in missed)))
    console.print(f"bench separation: {len(results['runs'])} runs in {results['wall_s'] / 60:.1f} min")


def separation_markdown(results: dict) -> str:
    """The aggregated table as Markdown (one table for the panel: cohort, attribute, subjects, scores)."""
    lines = []
    representations = REPRESENTATIONS
    header = ["cohort", "attribute", "role", "subjects", "metric (chance)", *representations]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    for entry in results["table"]:
        for row in entry["rows"]:
            chance = "" if row["chance"] is None else f" ({row['chance']:.2f})"
            cells = [_cell(row["values"][rep]) if rep in row["values"] else "" for rep in representations]
            lines.append(f"| {entry['cohort']} | {row['attribute']} | {row['role']} | {row['subset']} | "
                         f"{row['metric'] or 'n/a'}{chance} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| cohort | seeds | separation | specific gap | shared gap | separated |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for entry in results["table"]:
        summary = entry["summary"]
        lines.append(f"| {entry['cohort']} | {','.join(map(str, entry['seeds']))} | {_cell(summary['separation'])} | "
                     f"{_cell(summary['specific_gap'])} | {_cell(summary['shared_gap'])} | "
                     f"{summary['separated_seeds']} of {len(entry['seeds'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the method's separation targets

SPECIFIC_MARGIN, LEAK_MARGIN, SHARED_SLACK, MAX_SD = 0.10, 0.10, 0.05, 0.05
# The names of the kinds of check (in the order the comparison table gives them), and the prefix
# of the seed-to-seed SD checks; neurocl.validation.separation_compare reads them from here.
SPECIFIC_IN_SALIENT = "specific: salient >= best linear (PCA, cPCA, lin2 salient) + 0.10"
SPECIFIC_IN_COMMON = "specific: common <= chance + 0.10"
SHARED_IN_SALIENT = "shared: salient <= chance + 0.10"
SHARED_IN_COMMON = "shared: common >= best linear (PCA, lin2 common) - 0.05"
# The linear representations each kind of space is held against.
SALIENT_FLOOR = ("pca", "cpca", "lin2_salient")
COMMON_FLOOR = ("pca", "lin2_common")
CHECK_KINDS = (SPECIFIC_IN_SALIENT, SPECIFIC_IN_COMMON, SHARED_IN_SALIENT, SHARED_IN_COMMON)
SD_CHECK_PREFIX = "SD over seeds"


def target_checks(entry: dict) -> list[dict]:
    """The separation targets of one cohort's aggregated entry (``aggregate``), on the mean over seeds.

    Each check: ``{"check", "attribute", "subset", "value", "bound", "met", "gap"}`` with ``gap`` how far
    the value is on the wrong side of its bound (0 when met). The checks, per attribute:

    - specific, salient >= max(PCA, cPCA, lin2 salient) + 0.10 and common <= chance + 0.10 (targets);
    - shared, salient <= chance + 0.10 (all subjects and targets; R^2 <= 0.10) and
      common >= max(PCA, lin2 common) - 0.05 (all subjects and targets);
    - every one of these scores with a seed-to-seed SD <= 0.05 (when there are >= 2 seeds).
    """
    checks = []

    def add(check, row, value, bound, above):
        if value is None or bound is None:
            return
        gap = max(0.0, bound - value) if above else max(0.0, value - bound)
        checks.append({"check": check, "attribute": row["attribute"], "subset": row["subset"], "value": value,
                       "bound": bound, "met": gap == 0.0, "gap": gap})

    for row in entry["rows"]:
        values = row["values"]
        mean = {rep: stats["mean"] for rep, stats in values.items()}
        if row["chance"] is None:
            continue
        if row["role"] == "specific":
            floor = _best(mean, SALIENT_FLOOR)
            add(SPECIFIC_IN_SALIENT, row, mean.get("salient"), None if floor is None else floor + SPECIFIC_MARGIN, True)
            add(SPECIFIC_IN_COMMON, row, mean.get("common"), row["chance"] + LEAK_MARGIN, False)
        else:
            add(SHARED_IN_SALIENT, row, mean.get("salient"), row["chance"] + LEAK_MARGIN, False)
            floor = _best(mean, COMMON_FLOOR)
            add(SHARED_IN_COMMON, row, mean.get("common"), None if floor is None else floor - SHARED_SLACK, True)
        for rep in ("common", "salient"):
            sd = values.get(rep, {}).get("sd")
            if sd is not None:
                add(f"{SD_CHECK_PREFIX} <= 0.05 ({rep})", row, sd, MAX_SD, False)
    return checks


def _best(mean: dict, representations) -> float | None:
    """The highest mean score among ``representations`` (None when none was scored)."""
    scored = [mean[rep] for rep in representations if mean.get(rep) is not None]
    return max(scored) if scored else None


def targets_markdown(results: dict) -> str:
    """Per cohort: how many target checks are met, and each missed one with its gap (mean over seeds)."""
    lines = ["| cohort | checks met | missed (value vs bound, gap) |", "| --- | --- | --- |"]
    for entry in results["table"]:
        checks = target_checks(entry)
        missed = [f"{c['attribute']} ({c['subset']}) {c['check']}: {c['value']:.2f} vs {c['bound']:.2f}, "
                  f"gap {c['gap']:.2f}" for c in checks if not c["met"]]
        met = sum(c["met"] for c in checks)
        lines.append(f"| {entry['cohort']} | {met} of {len(checks)} | {'; '.join(missed) or 'none'} |")
    return "\n".join(lines) + "\n"
