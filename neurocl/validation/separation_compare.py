"""``neurocl bench separation-compare``: the settings of a search side by side, paired on cohort and seed.

A settings search runs ``neurocl bench separation --out FILE`` once per setting (and seed) over the
same cohorts. Two settings' runs on the same cohort and seed share the cohort (cohort seed
``1000 + seed``), the split and the training seed, so their separation indices pair. Over the ``n``
(cohort, seed) pairs that a setting and the reference (the first setting) both have::

    d_i    = separation_setting(c_i, s_i) - separation_reference(c_i, s_i)
    paired = mean(d) ± SE,   SE = SD(d, ddof=1) / sqrt(n),   better in #{d_i > 0} of n

Pairing removes the cohort-to-cohort spread of the index, far larger than a setting's effect. Beside
it, the method's separation targets (:func:`~neurocl.validation.separation.target_checks`) on the setting's
runs aggregated per cohort (:func:`~neurocl.validation.separation.aggregate`), counted without the
"SD over seeds" checks (what a setting moves) and with them, and the mean gap (how far on the wrong
side of its bound, 0 when met) per kind of check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from rich.table import Table

from neurocl.errors import ConfigError
from neurocl.validation.separation import CHECK_KINDS, SD_CHECK_PREFIX, aggregate, target_checks

# Short column names (the caption and docs/benchmarks-separation.md give each bound).
CHECK_HEADERS = ("gap: specific salient", "gap: specific common", "gap: shared salient", "gap: shared common")
NOT_A_RESULT = "not a result of `neurocl bench separation --out`"


@dataclass
class Setting:
    """One setting of a search: its label, the bench results files it was read from and their runs."""

    label: str
    files: list[Path]
    runs: list[dict]


def parse_setting(text: str) -> tuple[str, list[Path]]:
    """``LABEL=FILE[,FILE...]`` -> (label, files); ConfigError naming the argument otherwise."""
    label, equals, files = text.partition("=")
    paths = [Path(name.strip()) for name in files.split(",") if name.strip()]
    if not equals or not label.strip() or not paths:
        raise ConfigError(f"setting {text!r}: expected LABEL=FILE[,FILE...], such as "
                          f"shipped=old-10.json,old-11.json (a label, '=', bench --out files separated by commas)")
    return label.strip(), paths


def _check_run(path: Path, index: int, run) -> None:
    """A run record of the bench, as far as the comparison reads it; ConfigError naming file, run and field."""
    where = f"{path}: runs[{index}]"
    if not isinstance(run, dict):
        raise ConfigError(f"{where}: expected an object, got {type(run).__name__} ({NOT_A_RESULT})")
    for field, kind in (("cohort", str), ("seed", int), ("rows", list), ("summary", dict)):
        if field not in run:
            raise ConfigError(f"{where}: no field {field!r} ({NOT_A_RESULT})")
        if not isinstance(run[field], kind) or isinstance(run[field], bool):
            raise ConfigError(f"{where}.{field}: expected {kind.__name__}, got {run[field]!r:.60}")
    if "separation" not in run["summary"]:
        raise ConfigError(f"{where}.summary: no field 'separation' ({NOT_A_RESULT})")
    separation = run["summary"]["separation"]
    if separation is not None and (isinstance(separation, bool) or not isinstance(separation, (int, float))):
        raise ConfigError(f"{where}.summary.separation: expected a number or null, got {separation!r:.60}")
    for number, row in enumerate(run["rows"]):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}.rows[{number}]: expected an object, got {type(row).__name__}")
        missing = [key for key in ("attribute", "role", "subset", "chance", "values") if key not in row]
        if missing or not isinstance(row["values"], dict):
            raise ConfigError(f"{where}.rows[{number}]: no field {(missing or ['values'])[0]!r} ({NOT_A_RESULT})")


def read_bench_runs(path: Path) -> list[dict]:
    """The ``runs`` of one ``bench separation --out`` file, checked; ConfigError naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    try:
        result = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        raise ConfigError(f"{path}: no list of 'runs' ({NOT_A_RESULT})")
    if not result["runs"]:
        raise ConfigError(f"{path}: no runs in it")
    for index, run in enumerate(result["runs"]):
        _check_run(path, index, run)
    return result["runs"]


def _describe(runs: Iterable[dict]) -> str:
    runs = list(runs)
    cohorts = ", ".join(dict.fromkeys(run["cohort"] for run in runs))
    seeds = ", ".join(str(seed) for seed in sorted({run["seed"] for run in runs}))
    return f"cohorts {cohorts or 'none'}; seeds {seeds or 'none'}"


def load_setting(text: str, seeds: Iterable[int] | None = None) -> Setting:
    """One ``LABEL=FILE[,FILE...]`` argument: its files' runs pooled, only of ``seeds`` when given.

    A (cohort, seed) given twice, or runs of one cohort with different attributes (results of
    different bench versions), would be averaged wrongly: both are errors naming the files.
    """
    label, files = parse_setting(text)
    runs, origin, layout = [], {}, {}
    for path in files:
        for run in read_bench_runs(path):
            key = run["cohort"], run["seed"]
            if key in origin:
                raise ConfigError(f"setting {label}: cohort {key[0]} seed {key[1]} is in both {origin[key]} and {path}")
            rows = [(row["attribute"], row["role"], row["subset"]) for row in run["rows"]]
            first = layout.setdefault(run["cohort"], (rows, path, run["seed"]))
            if rows != first[0]:
                raise ConfigError(f"setting {label}: cohort {run['cohort']} scores other attributes in {path} "
                                  f"(seed {run['seed']}) than in {first[1]} (seed {first[2]}): results of different "
                                  f"bench versions cannot be pooled")
            origin[key] = path
            runs.append(run)
    if seeds is not None:
        wanted = set(seeds)
        kept = [run for run in runs if run["seed"] in wanted]
        if not kept:
            raise ConfigError(f"setting {label} ({', '.join(map(str, files))}): no run of seeds "
                              f"{', '.join(map(str, sorted(wanted)))} (it has {_describe(runs)})")
        runs = kept
    return Setting(label, files, runs)


def _separations(runs: Iterable[dict]) -> dict[tuple[str, int], float]:
    """(cohort, seed) -> separation index, leaving out runs without one (no common and salient space)."""
    out = {}
    for run in runs:
        value = run["summary"].get("separation")
        if value is not None and math.isfinite(value):
            out[run["cohort"], run["seed"]] = float(value)
    return out


def paired_difference(runs: list[dict], reference: list[dict]) -> dict:
    """Separation of ``runs`` minus that of ``reference`` over the (cohort, seed) pairs both have.

    Returns ``n``, ``mean``, ``se`` (SD with ddof=1 over sqrt(n); None for n < 2), ``better`` (pairs
    with d > 0) and ``pairs`` (the sorted keys); ``n`` 0 and ``mean`` None without a pair.
    """
    mine, theirs = _separations(runs), _separations(reference)
    pairs = sorted(set(mine) & set(theirs))
    d = np.array([mine[key] - theirs[key] for key in pairs])
    return {"n": len(pairs), "pairs": pairs, "mean": float(d.mean()) if len(d) else None,
            "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None, "better": int((d > 0).sum())}


def check_counts(runs: list[dict]) -> dict:
    """The separation targets' checks on ``aggregate(runs)``: met/total without and with the SD checks, mean gap per kind."""
    checks = [check for entry in aggregate(runs) for check in target_checks(entry)]
    means = [check for check in checks if not check["check"].startswith(SD_CHECK_PREFIX)]
    gaps = {kind: [check["gap"] for check in means if check["check"] == kind] for kind in CHECK_KINDS}
    return {"met": sum(check["met"] for check in means), "total": len(means),
            "met_with_sd": sum(check["met"] for check in checks), "total_with_sd": len(checks),
            "gaps": {kind: float(np.mean(values)) if values else None for kind, values in gaps.items()}}


def compare_settings(settings: list[Setting]) -> list[dict]:
    """One row per setting, the first the reference, sorted by mean separation (highest first).

    Each row: label, reference (bool), files, runs (count), separation (mean over its runs),
    ``paired`` (:func:`paired_difference` against the reference) and ``checks`` (:func:`check_counts`).
    A setting without a (cohort, seed) in common with the reference is an error naming both.
    """
    if not settings:
        raise ConfigError("give at least one setting: LABEL=FILE[,FILE...]")
    labels = [setting.label for setting in settings]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"setting label {repeated[0]!r} is given twice: each setting needs its own label")
    reference = settings[0]
    rows = []
    for setting in settings:
        paired = paired_difference(setting.runs, reference.runs)
        if paired["n"] == 0:
            raise ConfigError(
                f"setting {setting.label} ({', '.join(map(str, setting.files))}) has no (cohort, seed) with a "
                f"separation index in common with the reference {reference.label} "
                f"({', '.join(map(str, reference.files))}): {setting.label} has {_describe(setting.runs)}; "
                f"{reference.label} has {_describe(reference.runs)}")
        values = list(_separations(setting.runs).values())
        rows.append({"label": setting.label, "reference": setting is reference, "files": setting.files,
                     "runs": len(setting.runs), "separation": float(np.mean(values)) if values else None,
                     "paired": paired, "checks": check_counts(setting.runs)})
    return sorted(rows, key=lambda row: -math.inf if row["separation"] is None else row["separation"], reverse=True)


HEADERS = ("setting", "runs", "separation", "Δ vs reference (paired ± SE)", "better in", "checks met, no SD",
           "checks met, with SD", *CHECK_HEADERS)


def _cells(row: dict) -> list[str]:
    def number(value, sign="+"):
        return "n/a" if value is None else f"{value:{sign}.3f}"

    paired, checks = row["paired"], row["checks"]
    if row["reference"]:
        delta, better = "reference", f"{paired['n']} pairs"
    else:
        delta = number(paired["mean"]) + ("" if paired["se"] is None else f" ± {paired['se']:.3f}")
        better = f"{paired['better']} of {paired['n']}"
    label = row["label"] + (" (reference)" if row["reference"] else "")
    return [label, str(row["runs"]), number(row["separation"]), delta, better,
            f"{checks['met']} of {checks['total']}", f"{checks['met_with_sd']} of {checks['total_with_sd']}",
            *[number(checks["gaps"][kind], "") for kind in CHECK_KINDS]]


def comparison_markdown(rows: list[dict]) -> str:
    """The comparison as one Markdown table (for docs)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_comparison(rows: list[dict], console) -> None:
    """The comparison as a rich table; the caption says how the columns are computed."""
    table = Table(title="separation bench: settings compared, paired on (cohort, seed) with the reference",
                  title_justify="left",
                  caption="separation: mean over the setting's runs. Δ: mean ± SE (SD/√n) over the (cohort, seed) "
                          "pairs it shares with the reference; better in: pairs with Δ > 0. Checks: the separation targets "
                          "on each cohort's mean over seeds, without and with the seed-to-seed SD checks. Gap: mean "
                          "distance to the bound (0 when met) of: specific salient ≥ best(PCA, cPCA) + 0.10, specific "
                          "common ≤ chance + 0.10, shared salient ≤ chance + 0.10, shared common ≥ PCA − 0.05.",
                  caption_justify="left")
    for index, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*_cells(row), style="bold" if row["reference"] else None)
    console.print(table)
