"""Pipelines: one YAML in, trained encoders, per-subject embeddings, probes and a report out.

``run_pipeline(PIPELINE.yaml, RUN_DIR)`` chains the stages, each reading only the previous
stage's output:

validate cohort -> build (or reuse) the store -> splits (``splits.tsv``) -> train the method,
then any trained baseline, then the method at each further seed of ``training.seeds``
(``checkpoints/``, ``logs/metrics.csv``) -> embed every subject (``embeddings.tsv``) ->
probes (``probes.tsv``, ``separation.json``) -> baselines (``baselines/<name>/``) -> each further
seed's embeddings and probes (``seeds/seed-<s>/``) -> maps (optional, ``maps/``, with the subtypes'
consensus over seeds) -> report (``report.html``, ``report.md``).

This module is the list of stages and nothing else: the schema is :mod:`neurocl.config`, the run
folder :mod:`neurocl.rundir`, training :mod:`neurocl.train`, embedding :mod:`neurocl.embed`, the
probes :mod:`neurocl.probe`, the maps :mod:`neurocl.maps`, the report :mod:`neurocl.report`.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from neurocl import baselines, report
from neurocl.cohort import Cohort, Splits, exclusion_summary, make_splits
from neurocl.cohort.truth import read_ground_truth
from neurocl.config import PipelineConfig, check_attribute_names, load_pipeline
from neurocl.logs import progress_console
from neurocl.embed import embeddings_table, write_embeddings
from neurocl.errors import ConfigError
from neurocl.harmonise import harmonise_run_store
from neurocl.io import write_json, write_tsv
from neurocl.maps import run_maps
from neurocl.probe import probe_embeddings, probe_ground_truth, separation
from neurocl.probe.heldout import ADVICE, MIN_TEST_PARTICIPANTS
from neurocl.probe.verdicts import few_targets_warning
from neurocl.rundir import RunDir
from neurocl.store import VolumeStore
from neurocl.synthdir import SynthDir
from neurocl.train import check_batch_sizes, is_primary_process, seed_job, train, train_as_worker, training_jobs

console = progress_console()

__all__ = ["run_pipeline"]


def prepare_store(path: str | os.PathLike, out: str | os.PathLike, settings: Sequence[str] = (),
                  workers: int | None = None) -> VolumeStore:
    """``neurocl prepare PIPELINE --out RUN``: validate the cohort and build the run's store, nothing else.

    Meant for a CPU node ahead of the GPU job: the store goes where :func:`run_pipeline` looks
    for it (``outputs.store`` or ``RUN/store``), so the training job finds it up to date and
    only opens it (unchanged images are recognised by path, size and mtime, not re-read).
    Images are preprocessed in worker processes, at most two per worker in memory.
    """
    config = load_pipeline(path, settings=settings)
    run = RunDir(Path(out).absolute())
    started = time.perf_counter()
    console.print(f"[bold]cohort[/] {config.cohort}")
    cohort = Cohort.from_yaml(config.cohort)
    inputs = {"pipeline": Path(path), **cohort.input_paths()}
    if not run.own.is_run():
        run.check_out(config, resume=False, inputs=inputs)
    cohort.check(check_images=True)
    check_attribute_names(config, cohort)
    with run.own.hold():
        if not run.own.is_run():
            # The run folder of a run that has not trained yet: `neurocl run ... --auto-resume` (or
            # the same command without it) starts there and finds this store up to date.
            run.prepare(config, resume=False, inputs=inputs)
        store = VolumeStore.build(cohort, run.store_folder(config, harmonised=False), config.preprocess,
                                  workers=workers, progress=True)
        store.verify()
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    print(f"store: {store.cache_dir}\nvolumes: {len(store)} x {'x'.join(map(str, store.spatial_shape))} "
          f"({store.nbytes / 1e9:.2f} GB, {store.volumes.dtype})\nrebuilt: {len(store.rebuilt)}\n"
          f"wall time: {time.perf_counter() - started:.1f} s\npeak memory of one process: {peak:.0f} MiB")
    return store


def run_pipeline(path: str | os.PathLike, out: str | os.PathLike, resume: bool | Literal["auto"] = False,
                 overrides: dict | None = None, settings: Sequence[str] = ()) -> Path:
    """``neurocl run PIPELINE --out RUN``: every stage of a pipeline into the run directory.

    validate cohort -> store (reused when up to date) -> splits.tsv -> train (the method, then
    trained baselines) -> embeddings.tsv -> probes.tsv + separation.json -> baselines -> maps ->
    report. Under DDP the extra processes only train (:func:`neurocl.train.train_as_worker`).

    Parameters
    ----------
    path : path
        Pipeline YAML.
    out : path
        Run directory (new, or the killed run's own with ``resume``).
    resume : bool or "auto"
        ``"auto"``: continue when the run folder is one neurocl made (its config.yaml), each
        training from its checkpoint if any, else start (what a requeued cluster job needs: the
        same command every time). ``True``: continue
        every training from its ``checkpoints/last.ckpt`` (the last complete checkpoint); the
        stages after training are recomputed.
    overrides : dict, optional
        Top-level pipeline fields replacing the YAML's.
    settings : list of str
        ``neurocl run --set SECTION.FIELD=VALUE`` settings, validated with the YAML (the run's
        config.yaml records the result).

    Returns
    -------
    Path
        The run directory.
    """
    config = load_pipeline(path, overrides, settings)
    run = RunDir(Path(out).absolute())
    if resume == "auto":
        # A requeued job runs its first command again. A folder that neurocl made (its run marker:
        # prepared, or trained for a while) is continued, each training from its last checkpoint if
        # it has one (the pipeline must match the recorded one); anything else starts a new run.
        trained = run.path.is_dir() and any(run.path.glob("**/checkpoints/*.ckpt"))
        resume = run.own.is_run()
        console.print(f"--auto-resume: {'resuming the run in' if trained else 'starting a new run in'} {run.path}")
    if not is_primary_process():
        return train_as_worker(config, run, resume)
    # Every check first, then the first write: a failed check leaves --out as it was.
    inputs = {"pipeline": Path(path)}
    run.check_out(config, resume, inputs)
    console.print(f"[bold]cohort[/] {config.cohort}")
    cohort = Cohort.from_yaml(config.cohort)
    inputs.update(cohort.input_paths())
    run.check_out(config, resume, inputs)
    with run.own.hold():
        return _run_stages(config, run, cohort, resume, inputs)


def _run_stages(config: PipelineConfig, run: RunDir, cohort: Cohort, resume: bool, inputs: dict) -> Path:
    """Every stage after the checks of ``--out``, with the run folder held (:meth:`OutputFolder.hold`)."""
    cohort.check(check_images=True)
    if cohort.excluded is not None:
        console.print(f"[bold]cohort[/] {exclusion_summary(cohort.excluded, cohort.n_read, run.excluded)}",
                      highlight=False)
    check_attribute_names(config, cohort)
    ground_truth = _ground_truth(config, cohort)
    # Read (and refused when malformed) before any training, not after it.
    truth = None if ground_truth is None else read_ground_truth(ground_truth, cohort)
    resuming = resume and run.trained()
    if resuming:
        run.check_resume(cohort)
    splits = _splits(config, cohort, run)
    check_batch_sizes(config, cohort, splits)
    run.prepare(config, resume, inputs)
    if not run.splits.is_file():
        splits.save(run.splits)
    if cohort.excluded is not None:  # written with the split, after every check (a failed one writes nothing)
        write_tsv(run.excluded, cohort.excluded)

    store = VolumeStore.build(cohort, run.store_folder(config, harmonised=False), config.preprocess, progress=True)
    if config.harmonise is not None:
        console.print(f"[bold]harmonising[/] {config.harmonise.describe()}")
        store = harmonise_run_store(store, cohort, splits, config.harmonise, run.store_folder(config))
    if resuming:
        run.check_resume(cohort, store)
    run.record_inputs(store, cohort)

    modules = {}
    for name, method, folder, job_config in training_jobs(config, run):
        seed = f" (seed {job_config.training.seed})" if len(config.training.run_seeds()) > 1 else ""
        console.print(f"[bold]training[/] {name}: {method.name} with {config.encoder.name}{seed}")
        modules[name] = train(job_config, method, folder, cohort, store, splits, resume)

    console.print("[bold]embedding[/] every subject")
    embeddings = embeddings_table(modules["main"], store, cohort, splits, config.outputs.embed_batch_size, progress=True)
    write_embeddings(run.embeddings, embeddings, cohort)
    attributes = config.evaluation.attributes
    console.print("[bold]probing[/] " + ("every attribute" if attributes is None else ", ".join(attributes) or "nothing"))
    _probe(embeddings, cohort, config, run, ground_truth, truth)

    for entry in config.baselines:
        folder = run.baseline(entry.name)
        if entry.trained:
            console.print(f"[bold]baseline[/] {entry.name}: embedding every subject")
            table = embeddings_table(modules[f"baselines/{entry.name}"], store, cohort, splits,
                                     config.outputs.embed_batch_size, progress=True)
        else:
            console.print(f"[bold]baseline[/] {entry.name}")
            train_controls = np.intersect1d(splits.rows(cohort, "train"), np.flatnonzero(cohort.table["group"].eq("background")))
            common_dim, salient_dim = entry.lin2_dims(config.method, len(train_controls))
            # Fitted on the training subjects only, like the trained networks.
            table = baselines.voxel_embeddings(store, cohort, method=entry.name, n_components=entry.n_components,
                                               splits=splits, alpha=entry.alpha, seed=config.training.seed,
                                               progress=True, site=entry.site, protect=entry.protect,
                                               common_dim=common_dim, salient_dim=salient_dim)
        write_embeddings(folder.embeddings, table, cohort)
        _probe(table, cohort, config, folder, ground_truth, truth)

    for seed in config.training.run_seeds()[1:]:
        # Every further seed's model is embedded and probed like the primary one, on the same split,
        # so the report can give each figure's spread over seeds.
        console.print(f"[bold]seed {seed}[/]: embedding and probing every subject")
        folder = run.seed_run(seed)
        table = embeddings_table(modules[seed_job(seed)], store, cohort, splits, config.outputs.embed_batch_size,
                                 progress=True)
        write_embeddings(folder.embeddings, table, cohort)
        _probe(table, cohort, config, folder, ground_truth, truth)

    if config.maps.enabled:
        console.print("[bold]maps[/]")
        run_maps(run.path, config=config.maps, ground_truth=ground_truth.parent if ground_truth else None)

    if config.outputs.report:
        html, _ = report.write_report(run.path)
        console.print(f"report: [bold]{html}[/]")
    console.print(f"run finished: [bold]{run.path}[/]")
    return run.path


def _splits(config: PipelineConfig, cohort: Cohort, run: RunDir) -> Splits:
    """The run's split manifest: RUN/splits.tsv of a run that trained (resume), else drawn (or read); not saved here."""
    if run.splits.is_file() and run.trained():
        return Splits.load(run.splits, cohort)
    if config.splits.file is not None:
        splits = Splits.load(config.splits.file, cohort)
    else:
        options = config.splits
        splits = make_splits(
            cohort, "holdout", val_fraction=options.val_fraction, test_fraction=options.test_fraction,
            stratify=tuple(options.stratify), seed=config.training.seed if options.seed is None else options.seed,
        )
    if splits.column != "split":
        raise ConfigError(f"splits.file {config.splits.file}: training needs a holdout manifest (a 'split' column)")
    if config.evaluation.probe.scope == "held_out":
        # Refused before training, not after it: held-out probes cannot score fewer test participants than this.
        tested = splits.table.loc[splits.table["split"] == "test", "participant_id"].nunique()
        if tested < MIN_TEST_PARTICIPANTS:
            source = config.splits.file or f"splits.test_fraction {config.splits.test_fraction}"
            raise ConfigError(f"{source}: {tested} test participant(s) of {cohort.table['participant_id'].nunique()}; "
                              f"held-out probes need at least {MIN_TEST_PARTICIPANTS}: {ADVICE}")
        targets = set(cohort.table.loc[cohort.is_target, "participant_id"])
        warning = few_targets_warning(len(targets & set(splits.table.loc[splits.table["split"] == "test", "participant_id"])))
        if warning and is_primary_process():
            console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    return splits


def _probe(embeddings: pd.DataFrame, cohort: Cohort, config: PipelineConfig, run: RunDir, ground_truth,
           truth: pd.DataFrame | None) -> None:
    evaluation = config.evaluation
    probes = probe_embeddings(embeddings, cohort, attributes=evaluation.attributes, subsets=evaluation.subsets,
                              config=evaluation.probe, progress=True)
    write_tsv(run.probes, probes)
    if truth is not None:
        write_tsv(run.truth_probes, probe_ground_truth(embeddings, cohort, truth, subsets=evaluation.subsets,
                                                       config=evaluation.probe, progress=True))
    write_json(run.separation,
               separation(embeddings, cohort, probes, ground_truth=ground_truth, config=evaluation.probe))


def _ground_truth(config: PipelineConfig, cohort: Cohort) -> Path | None:
    """evaluation.ground_truth, else the cohort spec's ground_truth, else a ground_truth.tsv beside the cohort YAML."""
    if config.evaluation.ground_truth is not None:
        return config.evaluation.ground_truth
    if cohort.ground_truth_path is not None:
        return cohort.ground_truth_path
    beside = SynthDir(config.cohort.parent).ground_truth
    return beside if beside.is_file() else None
