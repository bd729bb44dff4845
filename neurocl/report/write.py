"""The entry point: :func:`write_report` writes ``report.html`` and ``report.md`` in a run folder."""

from __future__ import annotations

from pathlib import Path


from neurocl.errors import ConfigError
from neurocl.io import write_text
from neurocl.report.figures import _Figures, _remove_stale_figures
from neurocl.report.render import _render_html, _render_md
from neurocl.report.runfiles import _RunFiles
from neurocl.rundir import RunDir
from neurocl.report.sections import (
    _baseline_section, _embedding_section, _floor_section, _maps_section, _probe_section, _run_section, _seeds_section,
    _separation_section, _training_section,
)


def write_report(run_dir) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` in ``run_dir`` from the stage outputs found there.

    Parameters
    ----------
    run_dir : path
        A run directory (``neurocl run`` output), or any folder holding some of its files
        (e.g. a ``neurocl probe`` output folder with probes.tsv and separation.json).

    Returns
    -------
    (html_path, md_path)

    Raises
    ------
    ConfigError
        When the folder does not exist or holds none of the files a report is made from.
    """
    import matplotlib

    matplotlib.use("Agg")
    folder = RunDir(run_dir)
    if not folder.path.is_dir():
        raise ConfigError(f"report: no folder {folder.path}")
    run = _RunFiles(folder)
    if not run.any():
        raise ConfigError(
            f"report: {folder.path} holds none of embeddings.tsv, probes.tsv, separation.json, logs/metrics.csv, baselines/, maps/"
        )
    figures = _Figures(folder)
    sections = [
        section
        for section in (
            _run_section(run),
            _probe_section(run, figures),
            _floor_section(run),
            _separation_section(run),
            _seeds_section(run),
            _training_section(run, figures),
            _embedding_section(run, figures),
            _baseline_section(run, figures),
            _maps_section(run, figures),
        )
        if section is not None
    ]
    title = f"neurocl report: pipeline '{run.name}' on cohort '{run.cohort_name}'"
    html_path = write_text(folder.report_html, _render_html(title, sections))
    md_path = write_text(folder.report_md, _render_md(title, sections))
    _remove_stale_figures(figures)
    return html_path, md_path
