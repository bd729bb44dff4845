"""``neurocl demo``: the demo synthetic cohort, the demo pipeline, and the checks of its scientific targets.

The cohort is :data:`DEMO_COHORT`, the pipeline ``neurocl/pipelines/demo.yaml``; after the run,
:func:`demo_summary` measures what is decodable from which space, how well the maps and clusters
recover the true subtypes, and whether each target of :data:`DEMO_EXPECTED` is reached
(``docs/getting-started.md`` says what the demo reaches).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError
from rich.table import Table
from sklearn.metrics import adjusted_rand_score

from neurocl.baselines import LINEAR_BASELINES
from neurocl.cohort import Cohort
from neurocl.config import ProbeConfig
from neurocl.logs import progress_console, results_console
from neurocl.errors import ConfigError
from neurocl.io import write_json
from neurocl.outputs import OutputFolder, record_files
from neurocl.pipeline import run_pipeline
from neurocl.probe import PRIMARY_METRIC, embedding_spaces, probe_attribute
from neurocl.probe.verdicts import adjusted_p, few_targets_warning, multiple_testing_note, verdict
from neurocl.rundir import RunDir
from neurocl.synth import SynthConfig, make_synthetic_cohort
from neurocl.synthdir import SynthDir

console = progress_console()

__all__ = ["DEMO_COHORT", "DEMO_EXPECTED", "DEMO_PIPELINE", "demo_summary", "run_demo"]

DEMO_PIPELINE = Path(__file__).parent / "pipelines" / "demo.yaml"

# The demo cohort: 200 subjects at 4 mm, 2 subtypes, 3 sites. The subtype loss is set stronger and
# the individual deformation weaker than the generator's defaults so that a small CNN trained for a
# few minutes on 2 CPU cores finds the subtypes (docs/getting-started.md says what the demo reaches).
DEMO_COHORT = {"n_subjects": 200, "resolution": 4.0, "subtypes": 2, "sites": 3, "subtype_effect": 2.5,
               "deformation": 0.25, "seed": 0}
# What `neurocl demo` checks on its run: attribute -> (space it should be decodable from, space it should not).
DEMO_EXPECTED = {
    "subtype": ("salient", "common"),
    "severity": ("salient", "common"),
    "age": ("common", "salient"),
    "sex": ("common", "salient"),
    "site": ("common", "salient"),
}
DEMO_MAP_AUC = 0.8
DEMO_ARI = 0.5
# Which of the demo's figures are held out: the probes (and the subtype probe) are fitted on the
# encoder's train/val subjects and scored on its test subjects; the cluster ARI is checked on the
# test patients (the clusters are fitted on every patient, without labels, so only the encoder could
# have seen them); the maps' AUCs are in-sample (maps.split: all), labelled so.


def run_demo(out: str | os.PathLike = "neurocl-demo", resume: bool = False, seeds: list[int] | None = None) -> Path:
    """``neurocl demo``: the demo synthetic cohort into ``OUT/cohort``, the demo pipeline into ``OUT/run``.

    The cohort is :data:`DEMO_COHORT` (made once; a later call reuses it after checking it was
    made with the same options), the pipeline ``neurocl/pipelines/demo.yaml``. At the end the
    demo checks its scientific targets on the run (:func:`demo_summary`), prints them and writes
    ``OUT/demo_summary.json``.

    Parameters
    ----------
    out : path
        Folder for ``cohort/``, ``run/`` and ``demo_summary.json``.
    resume : bool
        Continue a killed demo from ``OUT/run/checkpoints/last.ckpt``.
    seeds : list of int, optional
        Training seeds (``training.seeds``): one model per seed, each figure's spread over seeds in
        ``OUT/run/report.md``; the printed checks are the first (primary) seed's. The demo's settings
        were chosen at seed 0, so seeds other than 0 give figures not used to choose them.

    Returns
    -------
    Path
        The run directory ``OUT/run``.
    """
    started = time.monotonic()
    out = Path(out)
    summary_path = out / "demo_summary.json"
    OutputFolder(out).check_replace([summary_path], overwrite=True)  # a file of that name neurocl did not write stays
    cohort_yaml = _demo_cohort(out / "cohort")
    settings = [f"training.seeds=[{','.join(map(str, seeds))}]", f"training.seed={seeds[0]}"] if seeds else []
    run_dir = run_pipeline(DEMO_PIPELINE, out / "run", resume=resume,
                           overrides={"cohort": str(cohort_yaml.absolute())}, settings=settings)
    summary = demo_summary(run_dir, cohort_yaml.parent)
    summary["wall_time_s"] = round(time.monotonic() - started, 1)
    summary["resumed"] = resume
    write_json(summary_path, summary)
    record_files([summary_path])
    _print_demo_summary(summary)
    return run_dir


def _demo_cohort(folder: Path) -> Path:
    """``folder/cohort.yaml`` of the demo cohort, generated unless a complete one made alike is there."""
    config = SynthConfig(**DEMO_COHORT)
    files = SynthDir(folder)
    cohort_yaml = files.cohort_yaml
    if cohort_yaml.is_file():
        description = files.description
        made_with = json.loads(description.read_text()).get("SynthConfig") if description.is_file() else None
        if _normalised(made_with) != config.model_dump():
            raise ConfigError(
                f"{folder} holds a synthetic cohort made with other options ({made_with}) than the demo's "
                f"({config.model_dump()}); give `neurocl demo` another --out"
            )
        console.print(f"[bold]synthetic cohort[/] reusing {folder}")
        return cohort_yaml
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} is an incomplete synthetic cohort (no cohort.yaml: its generation was interrupted); "
            "delete it and run `neurocl demo` again"
        )
    console.print(f"[bold]synthetic cohort[/] {config.n_subjects} subjects at {config.resolution:g} mm into {folder}")
    return make_synthetic_cohort(folder, config, progress=True)


def _normalised(made_with) -> dict | None:
    """A recorded SynthConfig with today's defaults filled in: a cohort made before a field was added (whose
    default reproduces the old generator) still matches; one with an unknown or invalid field does not (None)."""
    if not isinstance(made_with, dict):
        return None
    try:
        return SynthConfig(**made_with).model_dump()
    except (ValidationError, TypeError):
        return None


def demo_summary(run_dir: str | os.PathLike, cohort_dir: str | os.PathLike) -> dict:
    """The demo's targets measured on a finished run of a synthetic cohort.

    * ``probes``: for each attribute of :data:`DEMO_EXPECTED` and each space, the primary probe
      score (balanced accuracy or R^2), its 95% CI, permutation p-value and chance, from
      ``probes.tsv`` (subset ``target`` for severity, ``all`` for age, sex and site): held out
      (``scope`` says so). The subtype is not a cohort attribute (a real study does not know it): it
      is probed here, on target subjects, from ``ground_truth.tsv`` with the run's probe settings
      (held out: fitted on the train/val patients, scored on the test patients).
    * ``maps``: the mean AUC of the subtype maps against the true masks per attribution method
      and the adjusted Rand index of the clusters over every patient (in-sample), from
      ``maps/evaluation.json``; ``ari_test``: the ARI over the test patients only (held out).
    * ``targets``: each check, its ``outcome`` (reached, missed or inconclusive) and ``reached``.
      A probe's verdict (:mod:`neurocl.probe.verdicts`) is "decodable" when its 95% CI lies above
      chance and its p-value, adjusted across the table's tests (Benjamini-Hochberg), is below 0.05;
      "not decodable" when its CI lies below chance + 0.1; "inconclusive" otherwise, and so is the
      check.
    * ``warnings``: e.g. too few target subjects in the test split for held-out verdicts.
    """
    run, cohort_dir = RunDir(run_dir), SynthDir(cohort_dir)
    config = run.read_config()
    probes = run.read_table(run.probes)
    embeddings = run.read_table(run.embeddings)
    truth = cohort_dir.read_ground_truth()
    kinds = Cohort.from_yaml(cohort_dir.cohort_yaml).attribute_kinds
    results = {attribute: _attribute_records(attribute, probes, embeddings, truth, kinds, config.evaluation.probe)
               for attribute in DEMO_EXPECTED}
    n_tests = _judge([record for spaces in results.values() for record in spaces.values()])
    linear = _linear_floor(run, truth, kinds, config.evaluation.probe)
    targets = []
    # The maps are over every subject (maps.split: all): in-sample, and the checks say so.
    maps_scope = "held-out test subjects" if config.maps.split == "test" else f"in-sample, maps.split {config.maps.split}"
    for attribute, (wanted, unwanted) in DEMO_EXPECTED.items():
        for space, expected in ((wanted, True), (unwanted, False)):
            record = results[attribute].get(space)
            outcome = _outcome(record, expected)
            targets.append({"check": f"{attribute} {'decodable' if expected else 'not decodable'} from {space}",
                            "outcome": outcome, "reached": outcome == "reached"})
        # The floor: the space that should hold the attribute scores at least the best linear baseline's figure.
        floor, record = linear.get(attribute), results[attribute].get(wanted)
        if floor is not None:
            targets.append({"check": f"{attribute}: {wanted} >= best linear ({floor['model']}, "
                                     f"{_number(floor['value'], 2)}) on the same test subjects",
                            "reached": record is not None and record["value"] is not None
                            and record["value"] >= floor["value"]})
    maps = _demo_maps(run)
    for method, auc in maps.get("mean_auc_subtype_map", {}).items():
        targets.append({"check": f"{method} map AUC >= {DEMO_MAP_AUC} ({maps_scope})",
                        "reached": auc is not None and auc >= DEMO_MAP_AUC})
    # An untrained network's map already scores well above 0.5: the map must beat it, not just 0.5.
    for method, passes in maps.get("passes", {}).items():
        if passes is not None:
            targets.append({"check": f"{method} map AUC beats the untrained network's by >= 0.1 ({maps_scope})",
                            "reached": bool(passes)})
    if "ari" in maps:
        maps["ari_test"], maps["n_test_patients"] = _test_ari(run, embeddings, truth)
        ari = maps["ari_test"]
        targets.append({"check": f"cluster ARI >= {DEMO_ARI} on the {maps['n_test_patients']} held-out test patients",
                        "reached": ari is not None and ari >= DEMO_ARI})
    for target in targets:
        target.setdefault("outcome", "reached" if target["reached"] else "missed")
    scope = config.evaluation.probe.scope
    n_test = n_target = None
    if "split" in embeddings:
        tested = embeddings[embeddings["split"].eq("test")]
        n_test = int(tested["participant_id"].nunique())
        n_target = int(tested.loc[tested["group"].eq("target"), "participant_id"].nunique())
    warning = few_targets_warning(n_target) if scope == "held_out" else None
    return {"run": str(run.path), "scope": scope, "n_test_subjects": n_test, "n_test_targets": n_target,
            "probes": results, "n_tests": n_tests, "linear": linear, "maps": maps, "targets": targets,
            "warnings": [warning] if warning else [], "all_reached": all(target["reached"] for target in targets)}


def _judge(records: list[dict]) -> int:
    """Adjust the p-values of ``records`` across them (the printed table's tests) and give each its verdict;
    the number of tests."""
    adjusted = adjusted_p([np.nan if r["p_value"] is None else r["p_value"] for r in records])
    for record, p_adjusted in zip(records, adjusted):
        record["p_adjusted"] = None if np.isnan(p_adjusted) else float(p_adjusted)
        low, high = (np.nan if bound is None else bound for bound in record["ci"])
        record["verdict"] = verdict(np.nan if record["value"] is None else record["value"], low, high, p_adjusted,
                                    np.nan if record["chance"] is None else record["chance"], record["metric"])
        record["decodable"] = record["verdict"] == "decodable"
    return int(np.isfinite(adjusted).sum())


def _outcome(record: dict | None, expected: bool) -> str:
    """A check "decodable" (``expected``) or "not decodable" against the probe's verdict."""
    if record is None or record["verdict"] == "inconclusive":
        return "inconclusive" if record is not None else "missed"
    return "reached" if (record["verdict"] == "decodable") == expected else "missed"


def _attribute_records(attribute: str, probes: pd.DataFrame, embeddings: pd.DataFrame, truth: pd.DataFrame,
                       kinds: dict, probe_config: ProbeConfig) -> dict:
    """Space -> primary probe record of one demo attribute (the subtype probed from the truth, on target subjects)."""
    if attribute == "subtype":
        return _probe_subtype(embeddings, truth, probe_config)
    subset = "target" if attribute == "severity" else "all"
    rows = probes[(probes["attribute"] == attribute) & (probes["subset"] == subset)
                  & (probes["metric"] == PRIMARY_METRIC[kinds[attribute]])]
    return {row["space"]: _probe_record(row, subset) for _, row in rows.iterrows()}


def _linear_floor(run: RunDir, truth: pd.DataFrame, kinds: dict, probe_config: ProbeConfig) -> dict:
    """Attribute -> the best primary record among the run's linear baselines (every space of each), with its ``model``."""
    floor: dict = {}
    for name in run.baseline_names():
        folder = run.baseline(name)
        if name not in LINEAR_BASELINES or not folder.probes.is_file():
            continue
        probes, embeddings = folder.read_table(folder.probes), folder.read_table(folder.embeddings)
        for attribute in DEMO_EXPECTED:
            for space, record in _attribute_records(attribute, probes, embeddings, truth, kinds, probe_config).items():
                best = floor.get(attribute)
                if record["value"] is not None and (best is None or record["value"] > best["value"]):
                    floor[attribute] = {**record, "model": name if space == "emb" else f"{name} {space}"}
    return floor


def _test_ari(run: RunDir, embeddings: pd.DataFrame, truth: pd.DataFrame) -> tuple[float | None, int]:
    """Adjusted Rand index of the clusters (maps/clusters.tsv) against the true subtypes, on the test patients."""
    if not run.maps.clusters.is_file() or "split" not in embeddings:
        return None, 0
    clusters = run.read_table(run.maps.clusters)
    keys = embeddings[embeddings["split"].eq("test") & embeddings["group"].eq("target")][["participant_id"]]
    table = (keys.merge(clusters[["participant_id", "cluster"]], on="participant_id")
             .merge(truth[["participant_id", "subtype"]], on="participant_id").dropna(subset=["cluster"]))
    if len(table) < 2:
        return None, len(table)
    return float(adjusted_rand_score(table["subtype"], table["cluster"])), len(table)


def _probe_record(row, subset: str) -> dict:
    def number(value):
        return None if pd.isna(value) else float(value)

    return {"subset": subset, "metric": row["metric"], "value": number(row["value"]),
            "ci": [number(row["ci_low"]), number(row["ci_high"])], "p_value": number(row["p_value"]),
            "chance": number(row["chance"]), "n": number(row.get("n"))}


def _probe_subtype(embeddings: pd.DataFrame, truth: pd.DataFrame, probe_config: ProbeConfig) -> dict:
    """Subtype (1..K) of the target subjects probed from each space of ``embeddings`` (balanced accuracy)."""
    table = embeddings.merge(truth[["participant_id", "subtype"]], on="participant_id", how="inner")
    table = table[table["group"] == "target"]
    splits = table["split"].to_numpy(dtype=object) if "split" in table.columns else None
    records = {}
    for space, columns in embedding_spaces(embeddings).items():
        rows, _ = probe_attribute(table[columns].to_numpy(dtype=np.float64), table["subtype"].astype(int).to_numpy(),
                                  table["participant_id"].to_numpy(), "categorical", probe_config, splits=splits)
        primary = [row for row in rows if row["metric"] == "balanced_accuracy"]
        if primary:
            records[space] = _probe_record(pd.Series(primary[0]), "target")
    return records


def _demo_maps(run: RunDir) -> dict:
    path = run.maps.evaluation
    if not path.is_file():
        return {}
    evaluation = json.loads(path.read_text())
    summary = evaluation.get("summary", {})
    return {
        "ari": evaluation.get("ari"),
        "n_clusters": evaluation.get("n_clusters"),
        "mean_auc_subtype_map": {method: values.get("mean_auc_subtype_map") for method, values in summary.items()},
        "mean_auc_cluster_map": {method: values.get("mean_auc_cluster_map") for method, values in summary.items()},
        "mean_auc_subtype_map_untrained": {method: values.get("mean_auc_subtype_map_untrained")
                                           for method, values in summary.items()},
        "passes": {method: values.get("passes") for method, values in summary.items()},
    }


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _demo_cell(record: dict | None) -> str:
    """'value [CI] p=... adj. p=...: verdict' (the verdict and adjusted p of the run's own spaces only)."""
    if record is None:
        return "n/a"
    low, high = record["ci"]
    text = _number(record["value"], 2) + (f" [{_number(low, 2)}, {_number(high, 2)}]" if low is not None else "")
    text += f" p={_number(record['p_value'], 3)}"
    if "verdict" in record:
        text += f" adj. p={_number(record['p_adjusted'], 3)}: {record['verdict']}"
    return text


def _print_demo_summary(summary: dict) -> None:
    out = results_console()  # the demo's results go to stdout, its progress to stderr
    if summary.get("scope") == "held_out":
        scored_on = f"held-out test subjects (n={summary.get('n_test_subjects')})"
    else:
        scored_on = "in-sample: cross-validated over every subject"
    table = Table(title=f"neurocl demo: what is decodable from which space (linear probes, {scored_on})")
    linear = summary.get("linear") or {}
    for column in ("attribute", "subjects", "metric", "common", "salient", *(["best linear"] if linear else []), "chance"):
        table.add_column(column)
    for attribute, spaces in summary["probes"].items():
        if not spaces:
            continue
        first = next(iter(spaces.values()))
        cells = [_demo_cell(spaces.get(space)) for space in ("common", "salient")]
        if linear:
            floor = linear.get(attribute)
            cells.append("n/a" if floor is None else f"{_demo_cell(floor)} {floor['model']}")
        table.add_row(attribute, first["subset"], first["metric"], *cells, _number(first["chance"], 2))
    out.print(table)
    maps = summary["maps"]
    if maps:
        aucs = ", ".join(f"{method} {_number(auc, 2)}" for method, auc in maps["mean_auc_subtype_map"].items())
        out.print(f"maps (in-sample: every subject): AUC vs true subtype masks: {aucs}; clusters: {maps['n_clusters']}, "
                  f"ARI {_number(maps['ari'], 2)} (every patient), {_number(maps.get('ari_test'), 2)} "
                  f"({maps.get('n_test_patients', 0)} held-out test patients)")
    out.print(multiple_testing_note(summary.get("n_tests", 0)), highlight=False)
    colours = {"reached": "green", "missed": "red", "inconclusive": "yellow"}
    for target in summary["targets"]:
        outcome = target.get("outcome", "reached" if target["reached"] else "missed")
        out.print(f"  [{colours[outcome]}]{outcome:<12}[/]  {target['check']}")
    for warning in summary.get("warnings", []):
        out.print(f"[yellow]warning[/]: {warning}", highlight=False)
    out.print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min; summary: demo_summary.json beside the run")
