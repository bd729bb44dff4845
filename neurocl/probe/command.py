"""``neurocl probe``: the probes and separation of an embeddings table, written to a folder and shown as a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from neurocl.cohort import Cohort
from neurocl.config import ProbeConfig, validated
from neurocl.embed import check_cohort, read_embeddings, sidecar_path
from neurocl.outputs import claim_files, record_files
from neurocl.errors import CohortError
from neurocl.io import write_json, write_tsv
from neurocl.logs import progress_console, results_console
from neurocl.probe.probe import probe_embeddings
from neurocl.probe.separation import separation, separation_table
from neurocl.rundir import RunDir


console = progress_console()

def probe_command(
    embeddings_tsv,
    cohort_yaml,
    out_dir,
    attributes=None,
    ground_truth=None,
    scope: str | None = None,
    leave_site_out=None,
    n_permutations: int | None = None,
    n_bootstrap: int | None = None,
    seed: int | None = None,
    n_jobs: int | None = None,
    other_cohort: bool = False,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """``neurocl probe``: probes.tsv, separation.json and separation.tsv in ``out_dir``, and a rich table.

    ``n_permutations``, ``n_bootstrap``, ``seed``, ``n_jobs``: None takes :class:`~neurocl.config.ProbeConfig`'s default.

    Embeddings made by neurocl carry the fingerprint of their cohort (a sidecar); probing them
    against another cohort is refused unless ``other_cohort`` (:func:`neurocl.embed.check_cohort`).

    Returns
    -------
    (probes_path, separation_path)
    """
    embeddings_tsv, out_dir = Path(embeddings_tsv), Path(out_dir)
    out = RunDir(out_dir)
    outputs = [out.probes, out.separation, out.separation_table]
    if not embeddings_tsv.is_file():
        raise CohortError(f"embeddings: no file {embeddings_tsv}")
    if ground_truth is not None and not Path(ground_truth).is_file():
        raise CohortError(f"--ground-truth: no file {ground_truth}")
    # Only the options given: ProbeConfig holds every default.
    options = {name: value for name, value in dict(scope=scope, n_permutations=n_permutations, n_bootstrap=n_bootstrap,
               leave_site_out=leave_site_out, seed=seed, n_jobs=n_jobs).items() if value is not None}
    config = validated(ProbeConfig, options, "probe options")
    cohort = Cohort.from_yaml(cohort_yaml)
    # Before any work: never into the inputs, and a run's own probes (or another model's) are
    # replaced only when asked.
    claim_files(outputs, overwrite, {"embeddings table": embeddings_tsv, "embeddings sidecar": sidecar_path(embeddings_tsv),
                                     "ground truth": ground_truth, **cohort.input_paths()})
    check_cohort(embeddings_tsv, cohort, allow_other=other_cohort)
    embeddings = read_embeddings(embeddings_tsv)
    probes = probe_embeddings(embeddings, cohort, attributes=attributes, config=config, progress=True)
    result = separation(embeddings, cohort, probes, ground_truth=ground_truth, config=config)
    probes_path = write_tsv(out.probes, probes)
    separation_path = write_json(out.separation, result)
    write_tsv(out.separation_table, separation_table(result))
    record_files(outputs)
    results = results_console()
    results.print(probes_table(probes, result))
    results.print(f"wrote [bold]{probes_path}[/], [bold]{separation_path}[/]")
    return probes_path, separation_path


def probes_title(probes: pd.DataFrame, separation: dict | None = None) -> str:
    """What the probes' figures are computed on: held-out test subjects (n=...) or in-sample CV."""
    scopes = set(probes["scope"].dropna()) if "scope" in probes.columns else {"in_sample_cv"}
    if scopes == {"held_out"}:
        n = (separation or {}).get("n_test_subjects")
        return f"held-out test subjects (n={n})" if n is not None else "held-out test subjects"
    return "in-sample: cross-validated over every subject, the encoder's training subjects included"


def probes_table(probes: pd.DataFrame, separation: dict | None = None):
    """A rich Table of probes.tsv (value [95% CI], p, chance)."""
    table = Table(title=f"Linear probes: {probes_title(probes, separation)}", show_lines=False)
    for name in ("space", "attribute", "subset", "metric", "value [95% CI]", "p", "chance", "n"):
        table.add_column(name, justify="right" if name in ("p", "chance", "n") else "left")
    for _, row in probes.iterrows():
        if row["metric"] == "none":
            table.add_row(row["space"], row["attribute"], row["subset"], "[dim]skipped[/]", f"[dim]{row['note']}[/]", "", "", str(row["n"]))
            continue
        ci = f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if np.isfinite(row["ci_low"]) else ""
        p = f"{row['p_value']:.3f}" if np.isfinite(row["p_value"]) else "n/a"
        table.add_row(row["space"], row["attribute"], row["subset"], row["metric"], f"{row['value']:.3f}{ci}", p, f"{row['chance']:.2f}", str(row["n"]))
    return table
