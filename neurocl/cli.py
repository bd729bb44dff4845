"""The ``neurocl`` command line.

Every command is a thin shell over a library function: it parses options, calls
the function and turns :class:`neurocl.errors.NeuroclError` into one clear
message and a non-zero exit (``--debug`` shows the traceback). Heavy imports
(torch, MONAI) happen inside commands so that ``neurocl --help`` is instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from neurocl.allocator import keep_freed_memory
from neurocl.logs import progress_console, quiet_libraries, results_console

app = typer.Typer(
    name="neurocl",
    help="Contrastive analysis of brain MRI cohorts: what is specific to patients, apart from what all subjects share.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks and validation experiments that print measured numbers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = progress_console()
_state = {"debug": False}


def _typeless_flags() -> None:
    """Show on/off flags (--resume, --debug, --help) without a ``<bool>`` type in help.

    Typer 0.29 prints every option's type, flags included, where ``<bool>`` reads as if the flag
    took a value; its ``display_type_rich`` is the one place that decides, so flags return none.
    """
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_neurocl", False):
        return  # older Typer releases print no type for flags in the first place

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._neurocl = True
    TyperOption.display_type_rich = display_type_rich


_typeless_flags()


def _print_version(value: bool) -> None:
    if value:
        from neurocl import __version__

        typer.echo(f"neurocl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print neurocl's version and exit."),
) -> None:
    """neurocl: contrastive analysis of brain MRI cohorts."""
    _state["debug"] = debug
    quiet_libraries()
    keep_freed_memory()


def user_errors(func: Callable) -> Callable:
    """Report user-fixable errors as one line and exit 1 (tracebacks only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from neurocl.errors import NeuroclError

        try:
            return func(*args, **kwargs)
        except NeuroclError as error:
            if _state["debug"]:
                raise
            _error_line(str(error))
            raise typer.Exit(1)
        except KeyboardInterrupt as interrupt:
            # A command that can be continued passes its --resume command line as the argument.
            hint = f"; continue with: {interrupt.args[0]}" if interrupt.args else ""
            console.print(f"[yellow]interrupted[/]{escape_markup(hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        except OSError as error:
            # An operating-system refusal the library did not anticipate (permissions, a file where
            # a folder should be, a full disk, ...): still one line naming the path, not a traceback.
            if _state["debug"] or error.filename is None:
                raise
            path = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
            _error_line(f"{path}: {error.strerror or error}")
            raise typer.Exit(1)

    return wrapper


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _resumable(command: str, call: Callable, *args, **kwargs):
    """Run ``call``; an interrupt carries the command line that continues it (``command``)."""
    try:
        return call(*args, **kwargs)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(command) from None


def _error_line(message: str) -> None:
    """Print an error as written: no wrapping at the terminal width, no rich markup in paths."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _synth_help(field: str) -> str:
    """An option's help from SynthConfig, the single source of its meaning and default."""
    from neurocl.synth import SynthConfig

    info = SynthConfig.model_fields[field]
    return f"{info.description[0].upper()}{info.description[1:]} (default: {info.default})."


@app.command()
@user_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Output folder (created; must be empty or absent)."),
    n_subjects: Optional[int] = typer.Option(None, help=_synth_help("n_subjects"), show_default=False),
    patient_fraction: Optional[float] = typer.Option(None, help=_synth_help("patient_fraction"), show_default=False),
    subtypes: Optional[int] = typer.Option(None, help=_synth_help("subtypes"), show_default=False),
    lesion_regions: Optional[int] = typer.Option(None, help=_synth_help("lesion_regions"), show_default=False),
    lesion_size: Optional[float] = typer.Option(None, help=_synth_help("lesion_size"), show_default=False),
    lesion_space: Optional[str] = typer.Option(None, help=_synth_help("lesion_space"), show_default=False),
    sites: Optional[int] = typer.Option(None, help=_synth_help("sites"), show_default=False),
    resolution: Optional[float] = typer.Option(None, help=_synth_help("resolution"), show_default=False),
    confound: Optional[float] = typer.Option(None, help=_synth_help("confound"), show_default=False),
    age_effect: Optional[float] = typer.Option(None, help=_synth_help("age_effect"), show_default=False),
    age_pattern: Optional[str] = typer.Option(None, help=_synth_help("age_pattern"), show_default=False),
    sex_effect: Optional[float] = typer.Option(None, help=_synth_help("sex_effect"), show_default=False),
    head_size_noise: Optional[float] = typer.Option(None, help=_synth_help("head_size_noise"), show_default=False),
    site_effect: Optional[float] = typer.Option(None, help=_synth_help("site_effect"), show_default=False),
    subtype_effect: Optional[float] = typer.Option(None, help=_synth_help("subtype_effect"), show_default=False),
    deformation: Optional[float] = typer.Option(None, help=_synth_help("deformation"), show_default=False),
    seed: Optional[int] = typer.Option(None, help=_synth_help("seed"), show_default=False),
    workers: Optional[int] = typer.Option(
        None, help="Worker processes (default: one per CPU core); the cohort does not depend on it."
    ),
    dims: int = typer.Option(3, help="3: volumes; 2: axial slab projections through the subtype regions (a 2D cohort)."),
    image_format: str = typer.Option("png", help="With --dims 2: png or nifti (2D NIfTI)."),
) -> None:
    """Generate a synthetic cohort with known ground truth, offline (docs/synthetic.md).

    Example: neurocl synth synthetic --n-subjects 200 --subtypes 2 --seed 0

    Example (2D, PNG slices): neurocl synth synthetic-2d --dims 2 --image-format png
    """
    from neurocl.errors import ConfigError
    from neurocl.synth import SynthConfig, make_synthetic_cohort

    if dims not in (2, 3) or image_format not in ("png", "nifti"):
        raise ConfigError(f"--dims {dims} --image-format {image_format}: dims is 2 or 3, image-format png or nifti")
    given = dict(locals())
    # Only the options the user gave: SynthConfig holds every default.
    options = {name: given[name] for name in SynthConfig.model_fields if given.get(name) is not None}
    config = SynthConfig.from_options(**options)
    if dims == 2:
        import tempfile

        from neurocl.slices import slice_cohort
        from neurocl.synth import _check_out_dir

        _check_out_dir(out_dir)
        with tempfile.TemporaryDirectory(prefix="neurocl-synth-3d-") as scratch:
            volumes = make_synthetic_cohort(Path(scratch) / "cohort", config, progress=True, workers=workers)
            spec_path = slice_cohort(volumes.parent, out_dir, image_format)
    else:
        spec_path = make_synthetic_cohort(out_dir, config, progress=True, workers=workers)
    console.print(f"wrote synthetic cohort: [bold]{spec_path}[/]")


@app.command()
@user_errors
def validate(
    cohort: Path = typer.Argument(..., help="Cohort spec YAML, or a pipeline YAML (checks it and its cohort)."),
    images: bool = typer.Option(True, help="Also open and check every image (slower)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="SECTION.FIELD=VALUE",
                                             help="With a pipeline: override one field, as for run."),
) -> None:
    """Check a cohort and report every problem at once (row, participant_id, problem).

    Given a pipeline YAML, checks it against the schema (with any --set), that the attributes it
    names exist in its cohort, then the cohort; nothing is built or written. Also lists the rows
    the spec leaves out (include, on_invalid: exclude), or those on_invalid: exclude would.

    Example: neurocl validate cohorts/demo.yaml

    Example: neurocl validate pipelines/demo.yaml --set training.lr=1e-3
    """
    from neurocl.cohort import Cohort, print_problems
    from neurocl.cohort.problems import print_excluded
    from neurocl.errors import NeuroclError
    from neurocl.io import load_yaml

    try:
        raw = load_yaml(cohort, NeuroclError, "spec") if cohort.is_file() else None
    except NeuroclError:
        raw = None  # Cohort.from_yaml reports the YAML error with the file's name
    if isinstance(raw, dict) and "cohort" in raw and "participants" not in raw:
        from neurocl.config import check_attribute_names, load_pipeline

        config = load_pipeline(cohort, settings=set_ or ())
        loaded = Cohort.from_yaml(config.cohort)
        check_attribute_names(config, loaded)
        results_console().print(f"pipeline OK: {cohort} ({config.method.name}, {config.encoder.name}); cohort {config.cohort}",
                        highlight=False, markup=False)
    elif set_:
        from neurocl.errors import ConfigError

        raise ConfigError(f"--set applies to a pipeline YAML; {cohort} is a cohort spec")
    else:
        loaded = Cohort.from_yaml(cohort)
    problems = loaded.validate(check_images=images, progress=True)
    if loaded.excluded is not None:
        print_excluded(loaded.excluded, loaded.n_read, console=results_console())
    print_problems(problems, console=results_console(), cohort=loaded)
    preview = loaded.exclusion_preview(problems) if loaded.spec.on_invalid == "error" else None
    if preview:
        results_console().print(preview, highlight=False, markup=False)
    if problems:
        raise typer.Exit(1)


@app.command()
@user_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (see pipelines/ and docs/pipelines.md)."),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last complete checkpoint."),
    auto_resume: bool = typer.Option(
        False, "--auto-resume", help="Resume when --out holds a trained checkpoint, else start: the same command for "
        "the first start and every requeue of a cluster job (pipelines/slurm/)."
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="SECTION.FIELD=VALUE", help="Override one field, SECTION.FIELD=VALUE (repeatable); validated like the YAML, "
        "recorded in RUN/config.yaml."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", metavar="S1,S2,...", help="Train one model per seed (comma-separated; the first is the run's "
        "primary seed, the others go to RUN/seeds/seed-<s>/): sets training.seeds and training.seed."
    ),
) -> None:
    """Validate, preprocess, train, embed, probe and report, as the pipeline says.

    Example: neurocl run pipelines/demo.yaml --out runs/demo

    Example: neurocl run pipelines/demo.yaml --out runs/lr --set training.lr=1e-3 --set method.lam_mi=50

    Example (a cluster job, requeued any number of times): neurocl run my.yaml --out runs/x --auto-resume

    Example (one model per seed, the report's figures as mean ± sd): neurocl run my.yaml --out runs/x --seeds 0,1,2
    """
    from neurocl.errors import ConfigError
    from neurocl.pipeline import run_pipeline

    if resume and auto_resume:
        raise ConfigError("--resume and --auto-resume: give one (--auto-resume decides by itself)")
    settings = list(set_ or ())
    seed_list = _seed_list(seeds)
    if seed_list is not None:
        # Both fields: --seeds replaces whatever seed the YAML gives (the first seed is the primary one).
        settings += [f"training.seeds=[{','.join(map(str, seed_list))}]", f"training.seed={seed_list[0]}"]
    again = " ".join(["neurocl run", str(pipeline), "--out", str(out), *[f"--set {s}" for s in set_ or ()],
                      *([f"--seeds {seeds}"] if seeds else []), "--resume"])
    _resumable(again, run_pipeline, pipeline, out, resume="auto" if auto_resume else resume, settings=settings)


@app.command()
@user_errors
def prepare(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML (the same one the training job runs)."),
    out: Path = typer.Option(..., "--out", help="Run directory (the store goes to outputs.store or RUN/store)."),
    workers: Optional[int] = typer.Option(None, help="Preprocessing worker processes (default: one per core, at most 16)."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="SECTION.FIELD=VALUE", help="Override one field, as for neurocl run."
    ),
) -> None:
    """Validate the cohort and build + verify the run's preprocessed store, nothing else (e.g. on a CPU node).

    The training job (`neurocl run` with the same pipeline and --out) then only opens it.

    Example: neurocl prepare pipelines/my_study.yaml --out runs/my_study --workers 16
    """
    from neurocl.pipeline import prepare_store

    prepare_store(pipeline, out, settings=set_ or (), workers=workers)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("neurocl-demo"), "--out", help="Folder for the synthetic cohort and the run."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed demo run."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", metavar="S1,S2,...", help="Train one model per seed (each adds the demo's training time); "
        "report.md gives each figure's mean ± sd over seeds, the printed checks are the first seed's."
    ),
) -> None:
    """Synthetic cohort at 4 mm + small CNN + SepCLR, end to end: about 2 min on 2 free CPU cores.

    Measured 0.8–17.7 min on 2-core machines, the upper end with the cores shared with other jobs.

    Example: neurocl demo --out neurocl-demo

    Example (figures over seeds the demo's settings were not chosen on): neurocl demo --out demo-seeds --seeds 1,2,3
    """
    from neurocl.demo import run_demo

    seed_list = _seed_list(seeds)
    again = f"neurocl demo --out {out}" + (f" --seeds {seeds}" if seeds else "") + " --resume"
    _resumable(again, run_demo, out, resume=resume, seeds=seed_list)


@app.command()
@user_errors
def embed(
    checkpoint: Path = typer.Argument(..., help="Trained model checkpoint (RUN/checkpoints/*.ckpt)."),
    cohort: Path = typer.Argument(..., help="Cohort spec YAML of the subjects to embed."),
    out: Path = typer.Option(..., "--out", help="Output embeddings.tsv."),
    device: str = typer.Option("auto", help="auto (a CUDA GPU when there is one), cpu or cuda[:N]."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Subjects per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out (and its .json sidecar) if it exists."),
) -> None:
    """Embed new subjects with a trained model.

    Example: neurocl embed runs/demo/checkpoints/last.ckpt cohorts/new.yaml --out new_embeddings.tsv
    """
    from neurocl.embed import embed_cohort

    console.print(f"wrote embeddings: [bold]{embed_cohort(checkpoint, cohort, out, device, batch_size, overwrite=overwrite)}[/]")


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder (its checkpoints/last.ckpt) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", help="The encoder state dict to write (e.g. encoder.pt); OUT.json and each encoder alone beside it."),
    checkpoint: str = typer.Option("last", help="Which checkpoint of a run folder: last or best."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out (and its .json) if neurocl wrote them."),
) -> None:
    """Write a trained run's encoder(s) as a plain state dict, with a JSON of their configuration.

    Others start from it with `encoder: {name: ..., weights: encoder.pt}` in a pipeline. Each encoder
    is also written alone (OUT.common.pt, OUT.salient.pt or OUT.encoder.pt); the JSON's `monai` block
    names the monai.networks.nets class and kwargs that load it (docs/pipelines.md).

    Example: neurocl export runs/demo --out demo_encoder.pt
    """
    from neurocl.embed import load_model
    from neurocl.errors import ConfigError
    from neurocl.rundir import RunDir
    from neurocl.weights import write_export

    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint {checkpoint!r}: use last or best")
    path = RunDir(run_dir).checkpoint(checkpoint) if run_dir.is_dir() else run_dir
    weights, record = write_export(load_model(path), path, out, overwrite=overwrite,
                                   inputs={"run folder" if run_dir.is_dir() else "checkpoint": run_dir})
    console.print(f"wrote encoder weights: [bold]{weights}[/] and their record: [bold]{record}[/]", highlight=False)


@app.command()
@user_errors
def probe(
    embeddings: Path = typer.Argument(..., help="embeddings.tsv (participant_id, \\[session_id], columns per space)."),
    cohort: Path = typer.Option(..., "--cohort", help="Cohort spec YAML with the clinical attributes."),
    out: Path = typer.Option(..., "--out", help="Output folder for probes.tsv and separation.json."),
    attributes: Optional[str] = typer.Option(None, help="Comma-separated attributes to probe (default: all in the spec)."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="ground_truth.tsv of a synthetic cohort."),
    # Defaults are ProbeConfig's (the pipeline's probe section), the one source; importing it here
    # would load torch and Lightning for every --help, so the help names where they are.
    scope: Optional[str] = typer.Option(
        None, "--scope",
        help="held_out (default): fit on the embeddings' train/val rows, score their test rows (needs a 'split' "
             "column); in_sample_cv: cross-validate over every row (in-sample for the encoder).", show_default=False),
    leave_site_out: Optional[str] = typer.Option(None, help="Column to hold out one value at a time (e.g. site)."),
    n_permutations: Optional[int] = typer.Option(
        None, help="Permutations for p-values (in_sample_cv: at most, fewer once p is clearly above or below 0.05) "
        "(default: probe.n_permutations, docs/pipelines.md).", show_default=False),
    n_bootstrap: Optional[int] = typer.Option(
        None, help="Bootstrap resamples for 95% CIs (default: probe.n_bootstrap).", show_default=False),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: probe.seed).", show_default=False),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", help="Parallel threads (-1: one per CPU core); results do not depend on it "
        "(default: probe.n_jobs).", show_default=False),
    other_cohort: bool = typer.Option(
        False, "--other-cohort",
        help="Probe embeddings made from another cohort than --cohort (refused by default: their sidecar says which).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace probes.tsv / separation.* already in --out."),
) -> None:
    """Linear probes of clinical attributes from each embedding space, with CV, CIs and p-values.

    Example: neurocl probe runs/demo/embeddings.tsv --cohort synthetic/cohort.yaml --out probes/
    """
    from neurocl.probe import probe_command

    probe_command(
        embeddings,
        cohort,
        out,
        attributes=attributes.split(",") if attributes else None,
        ground_truth=ground_truth,
        scope=scope,
        leave_site_out=leave_site_out,
        n_permutations=n_permutations,
        n_bootstrap=n_bootstrap,
        seed=seed,
        n_jobs=jobs,
        other_cohort=other_cohort,
        overwrite=overwrite,
    )


@app.command()
@user_errors
def maps(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    atlas: Optional[Path] = typer.Option(None, help="Atlas labels NIfTI (with a names TSV beside it: index, name)."),
    atlas_names: Optional[Path] = typer.Option(None, help="Atlas names TSV (index, name)."),
    ground_truth: Optional[Path] = typer.Option(
        None,
        "--ground-truth",
        help="Synthetic cohort folder (ground_truth.tsv, masks/) to score maps and subtypes against "
        "(default: the cohort YAML's folder when it holds ground_truth.tsv).",
    ),
) -> None:
    """Salient-space brain maps, ranked regions and patient subtypes, written to RUN_DIR/maps/.

    Example: neurocl maps runs/demo --atlas atlas.nii.gz --atlas-names atlas.tsv
    """
    from neurocl.maps import run_maps

    out = run_maps(run_dir, atlas=atlas, atlas_names=atlas_names, ground_truth=ground_truth)
    console.print(f"wrote maps, regions and subtypes: [bold]{out}[/]")


@bench_app.command("data")
@user_errors
def bench_data(
    shape: str = typer.Option("121,145,121", help="Volume shape 'D,H,W' (or 'H,W'), or 'mni2mm' for 91,109,91."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Subjects per batch."),
    views: int = typer.Option(2, help="Views per subject."),
    batches: int = typer.Option(5, help="Measured batches per library (after one warm-up batch)."),
    subjects: int = typer.Option(64, help="Synthetic subjects that batches are drawn from."),
    device: str = typer.Option("cpu", help="cpu or cuda (neurocl runs there; baselines copy their batches there)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers of MONAI/TorchIO (default: every core)."),
    recipe: str = typer.Option("both", help="full (y-Aware: crop+resize, flip, blur, noise, cutout), light "
                               "(crop, flip, noise, cutout: no interpolation) or both."),
    libraries: str = typer.Option("neurocl,monai,torchio", help="Comma-separated subset of neurocl,monai,torchio."),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb", help="neurocl GPU residency budget (0: staging)."),
    model: Optional[str] = typer.Option(None, help="densenet121: also time a training step and the data share."),
    quick: bool = typer.Option(False, help="Small run: 64^3, batch 8, 2 batches, 16 subjects."),
) -> None:
    """Views per second of neurocl's batched views against MONAI and TorchIO pipelines (same recipe).

    Example: neurocl bench data --shape mni2mm --device cuda --model densenet121

    Without TorchIO (a plain `pip install -e .`) neurocl and MONAI are measured and the output says
    how to add it (the "bench" extra of pyproject.toml, or: pip install torchio).
    """
    from neurocl.bench import MNI_2MM, DataBenchConfig, print_data_benchmark, run_data_benchmark

    spatial = MNI_2MM if shape == "mni2mm" else _shape("--shape", shape, " such as 121,145,121, or mni2mm")
    settings = dict(shape=spatial, batch_size=batch_size, n_views=views, n_batches=batches, n_subjects=subjects)
    if quick:
        settings.update(shape=(64,) * len(spatial), batch_size=8, n_batches=2, n_subjects=16)
    config = DataBenchConfig(
        **settings, device=device, workers=workers, memory_budget_gb=budget_gb, model=model,
        recipes=("full", "light") if recipe == "both" else (recipe,),
        libraries=tuple(name.strip() for name in libraries.split(",") if name.strip()),
    )
    print_data_benchmark(run_data_benchmark(config), results_console())


@bench_app.command("epoch")
@user_errors
def bench_epoch(
    method: str = typer.Option("sepclr", help="Method trained (half of the subjects are targets)."),
    encoder: str = typer.Option("densenet121", help="Encoder (densenet121, small_cnn, resnet18, ...)."),
    shape: str = typer.Option("121,145,121", help="Volume shape 'D,H,W'."),
    subjects: int = typer.Option(256, help="Training subjects: an epoch is subjects // batch-size steps."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Subjects per step (two views each)."),
    epochs: int = typer.Option(2, help="Epochs timed (the first is reported as warm-up)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed on a GPU), 32-true or bf16-mixed."),
) -> None:
    """Wall time of real training epochs (Lightning fit of the method) on a synthetic store.

    Example: neurocl bench epoch --device cuda --subjects 1024 --batch-size 32
    """
    from neurocl.bench_epoch import EpochBenchConfig, print_epoch_benchmark, run_epoch_benchmark

    spatial = _shape("--shape", shape, " such as 121,145,121")
    config = EpochBenchConfig(method=method, encoder=encoder, shape=spatial, n_subjects=subjects,
                              batch_size=batch_size, epochs=epochs, device=device, precision=precision)
    print_epoch_benchmark(run_epoch_benchmark(config), results_console())


@bench_app.command("patches")
@user_errors
def bench_patches(
    shapes: str = typer.Option("121,145,121;182,218,182", help="Volume shapes 'D,H,W', separated by ';'."),
    sizes: str = typer.Option("64,96", help="Patch sides in voxels, comma-separated."),
    per_subject: int = typer.Option(8, "--per-subject", "-k", help="Patches per volume (TorchIO samples_per_volume)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Subjects per batch (a batch holds b * k patches)."),
    batches: int = typer.Option(8, help="Measured batches per library and setting (after the warm-up)."),
    subjects: int = typer.Option(16, help="Synthetic subjects that batches are drawn from."),
    device: str = typer.Option("cpu", help="cpu or cuda (neurocl runs there; baselines copy their patches there)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes of TorchIO/MONAI, threads of neurocl on "
                                          "the CPU (default: every core)."),
    libraries: str = typer.Option("neurocl,torchio,monai", help="Comma-separated subset of neurocl,torchio,monai."),
    model: Optional[bool] = typer.Option(None, "--model/--no-model", help="Also measure DenseNet121 bf16 steps "
                                         "(GPU memory on patches vs whole volumes); default: on with cuda."),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb", help="neurocl GPU residency budget (0: staging)."),
    out: Optional[Path] = typer.Option(None, help="Also write the measurements to this JSON file."),
    quick: bool = typer.Option(False, help="Small run (< 1 min on 2 cores): 48x56x48 volumes, 16^3 and 24^3 patches."),
) -> None:
    """Patches per second of neurocl's batched patch gather against TorchIO's Queue and MONAI's
    RandSpatialCropSamplesd (same patch size, same patches per volume).

    Example: neurocl bench patches --device cuda --out patches-gpu.json
    """
    from neurocl.bench_patches import PatchBenchConfig, print_patch_benchmark, result_dict, run_patch_benchmark

    shape_list = tuple(_shape("--shapes", part, " such as 121,145,121;182,218,182") for part in shapes.split(";")
                       if part.strip())
    size_list = _shape("--sizes", sizes, " such as 64,96", skip_blank=True)
    settings = dict(shapes=shape_list, sizes=size_list, per_subject=per_subject, batch_size=batch_size,
                    n_batches=batches, n_subjects=subjects)
    if quick:
        settings.update(shapes=((48, 56, 48),), sizes=(16, 24), per_subject=4, batch_size=2, n_batches=4, n_subjects=6)
    config = PatchBenchConfig(
        **settings, device=device, workers=workers, memory_budget_gb=budget_gb,
        model=device == "cuda" if model is None else model,
        libraries=tuple(name.strip() for name in libraries.split(",") if name.strip()),
    )
    result = run_patch_benchmark(config)
    print_patch_benchmark(result, results_console())
    if out is not None:
        from neurocl.io import write_json

        write_json(out, result_dict(result))
        console.print(f"wrote [bold]{out}[/]")


def _validation_overrides(steps: Optional[int], seed: int) -> dict:
    return {"seed": seed} if steps is None else {"seed": seed, "steps": steps}


def _write_validation_json(out: Optional[Path], suite: str, results: list) -> None:
    if out is not None:
        from neurocl.io import write_json

        write_json(out, {"suite": suite, "results": [result.to_dict() for result in results]})
        console.print(f"wrote [bold]{out}[/]")


@bench_app.command("identifiability")
@user_errors
def bench_identifiability(
    quick: bool = typer.Option(False, "--quick", help="n = 4 latents, small encoder, a few hundred steps (seconds)."),
    space: str = typer.Option("both", help="box (lp_info_nce, Laplace), sphere (info_nce, Normal) or both."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's training steps."),
    seed: int = typer.Option(0, help="Random seed (mixing network, encoder, samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
) -> None:
    """Contrastive learning inverts the data-generating process (Zimmermann et al., 2021): MCC and R².

    Example: neurocl bench identifiability --out identifiability.json
    """
    from neurocl.errors import ConfigError
    from neurocl.validation.identifiability import IdentifiabilityConfig, print_identifiability, run_identifiability

    if space not in ("box", "sphere", "both"):
        raise ConfigError(f"--space {space!r}: expected box, sphere or both")
    spaces = ("box", "sphere") if space == "both" else (space,)
    configs = [IdentifiabilityConfig.preset(name, quick=quick, **_validation_overrides(steps, seed)) for name in spaces]
    results = [run_identifiability(config) for config in configs]
    print_identifiability(results, results_console())
    _write_validation_json(out, "identifiability", results)


@bench_app.command("gmm")
@user_errors
def bench_gmm(
    quick: bool = typer.Option(False, "--quick", help="d = 10, K = 3, a few hundred steps (seconds)."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's training steps."),
    seed: int = typer.Option(0, help="Random seed (mixture, encoder, samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON here."),
) -> None:
    """InfoNCE finds the Fisher subspace of a Gaussian mixture where PCA does not (Bansal et al., 2024).

    Example: neurocl bench gmm --out gmm.json
    """
    from neurocl.validation.gmm import GMMConfig, print_gmm, run_gmm

    result = run_gmm(GMMConfig.preset(quick=quick, **_validation_overrides(steps, seed)))
    print_gmm(result, results_console())
    _write_validation_json(out, "gmm", [result])


@bench_app.command("vector")
@user_errors
def bench_vector(
    quick: bool = typer.Option(False, "--quick", help="Smaller encoders and fewer steps (about a minute)."),
    steps: Optional[int] = typer.Option(None, help="Override the preset's training steps."),
    seed: int = typer.Option(0, help="Random seed (mixing network, encoders, samples)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON here."),
) -> None:
    """SepCLR separates known common and salient latents of vector data (Louiset et al., 2024), beside cPCA.

    Example: neurocl bench vector --out vector.json
    """
    from neurocl.validation.vector import VectorConfig, print_vector, run_vector

    result = run_vector(VectorConfig.preset(quick=quick, **_validation_overrides(steps, seed)))
    print_vector(result, results_console())
    _write_validation_json(out, "vector", [result])


@bench_app.command("subtypes")
@user_errors
def bench_subtypes(
    n: str = typer.Option("20,40,60", help="Subjects per data set (comma-separated)."),
    dims: str = typer.Option("8,16,32", help="Embedding dimensions (comma-separated)."),
    replicates: int = typer.Option(40, min=1, help="Data sets per scenario."),
    reference: str = typer.Option("gaussian", help="The gap test's reference: gaussian or uniform."),
    components: int = typer.Option(2, min=1, help="Principal components the gap test looks at."),
    seed: int = typer.Option(0, help="Random seed of the data sets."),
) -> None:
    """False-positive rate and power of the subtypes stage's one-cluster test on Gaussian clusters.

    Example: neurocl bench subtypes --n 20 --dims 16 --replicates 20
    """
    from neurocl.validation.subtypes import print_subtype_rates, subtype_test_rates

    rates = subtype_test_rates(_shape("--n", n, " such as 20,40"), _shape("--dims", dims, " such as 8,16"),
                               replicates=replicates, reference=reference, n_components=components, seed=seed)
    print_subtype_rates(rates, results_console(), f"one-cluster test ({reference} reference, {components} components)")


def _shape(option: str, text: str, example: str, skip_blank: bool = False) -> tuple[int, ...]:
    """Comma-separated integers (a volume shape, patch sizes) of a bench option; anything else is one error naming it."""
    from neurocl.errors import ConfigError

    try:
        return tuple(int(n) for n in text.split(",") if n.strip() or not skip_blank)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers{example}") from None


def _seed_list(text: Optional[str]) -> Optional[list[int]]:
    """``--seeds 0,1,2`` of `run` and `demo`: at least one integer, or None when the option is not given."""
    from neurocl.errors import ConfigError

    seeds = _int_list("--seeds", text)
    if seeds is not None and not seeds:
        raise ConfigError(f"--seeds {text!r}: give at least one seed, such as 0,1,2")
    return seeds


def _int_list(option: str, text: Optional[str]) -> Optional[list[int]]:
    from neurocl.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers such as 0,1,2") from None


@bench_app.command("separation")
@user_errors
def bench_separation(
    quick: bool = typer.Option(False, "--quick", help="96-subject cohorts at 8 mm, 32 epochs (64 steps), seed 0 (minutes)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated training seeds (default 0,1,2; --quick: 0)."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Pipeline YAML (default: the shipped demo)."),
    cohorts: Optional[str] = typer.Option(None, help="Comma-separated panel cohorts (default: all)."),
    epochs: Optional[int] = typer.Option(None, help="Override the pipeline's training.epochs."),
    n_subjects: Optional[int] = typer.Option(None, "--n-subjects", help="Subjects per cohort (default 160; --quick 96)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep cohorts and runs here (default: a temporary folder)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write every run and the table as JSON here."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="SECTION.FIELD=VALUE", help="Override one field of the pipeline, as for neurocl run (repeatable)."
    ),
    baselines: Optional[str] = typer.Option(
        None, "--baselines", help="Comma-separated baselines to run (default pca,cpca,lin2,simclr; without simclr a run trains one network)."
    ),
) -> None:
    """Separation across a panel of cohorts x seeds, on held-out subjects, beside PCA, cPCA, lin2 and SimCLR.

    Example: neurocl bench separation --quick --out separation.json

    Example (one setting of a search): neurocl bench separation --quick --seeds 10 --set method.lam_cov=10
    """
    from neurocl.validation.separation import SeparationBenchConfig, print_separation, run_separation_bench

    config = SeparationBenchConfig.preset(
        quick, seeds=_int_list("--seeds", seeds), pipeline=pipeline, epochs=epochs, n_subjects=n_subjects,
        workdir=workdir, cohorts=[name.strip() for name in cohorts.split(",") if name.strip()] if cohorts else None,
        settings=list(set_) if set_ else None,
        baselines=[name.strip() for name in baselines.split(",") if name.strip()] if baselines else None,
    )
    results = run_separation_bench(config, log=lambda line: console.print(f"[bold]{line}[/]"))
    print_separation(results, results_console())
    if out is not None:
        from neurocl.io import write_json

        write_json(out, results)
        console.print(f"wrote [bold]{out}[/]")


@bench_app.command("oracles")
@user_errors
def bench_oracles(
    cohorts: Optional[str] = typer.Option(None, help="Comma-separated synthetic panel cohorts (default: those built "
                                          "against linear methods, and reference)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds; cohort seed = 1000 + seed (default 0,1,2)."),
    n_subjects: Optional[int] = typer.Option(None, "--n-subjects", help="Subjects per cohort (default 160)."),
    resolution: Optional[float] = typer.Option(None, help="Voxel size in mm (default 8)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the cohorts here (default: a temporary folder)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write every run and the table as JSON here."),
) -> None:
    """Each panel cohort's oracle feature beside PCA and cPCA of its voxels, on held-out subjects (no training).

    Example: neurocl bench oracles --cohorts focal-jitter,age-interaction --seeds 0,1,2
    """
    from neurocl.validation.oracles import OracleBenchConfig, print_oracles, run_oracle_bench

    config = OracleBenchConfig.checked(
        cohorts=[name.strip() for name in cohorts.split(",") if name.strip()] if cohorts else None,
        seeds=_seed_list(seeds), n_subjects=n_subjects, resolution=resolution, workdir=workdir,
    )
    results = run_oracle_bench(config, log=lambda line: console.print(f"[bold]{line}[/]"))
    print_oracles(results, results_console())
    if out is not None:
        from neurocl.io import write_json

        write_json(out, results)
        console.print(f"wrote [bold]{out}[/]")


@bench_app.command("separation-compare")
@user_errors
def bench_separation_compare(
    settings: list[str] = typer.Argument(
        ..., metavar="LABEL=FILE[,FILE...]",
        help="A setting: a label and its bench separation --out files (runs pooled). The first is the reference.",
    ),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds: compare only their runs (default: all)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown (for docs)."),
) -> None:
    """Settings of a search side by side: separation paired with the first setting on (cohort, seed), and the target checks.

    Example: neurocl bench separation-compare shipped=old-10.json,old-11.json lam30=cov30-10.json,cov30-11.json
    """
    from neurocl.validation.separation_compare import comparison_markdown, compare_settings, load_setting, print_comparison

    wanted = _seed_list(seeds)
    rows = compare_settings([load_setting(text, wanted) for text in settings])
    if markdown:
        typer.echo(comparison_markdown(rows), nl=False)
    else:
        print_comparison(rows, results_console())


def _run() -> None:  # pragma: no cover - entry point for ``python -m neurocl``
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
