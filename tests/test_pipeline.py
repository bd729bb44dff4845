"""End-to-end tests of neurocl.pipeline and the `run` / `embed` commands on the tiny synthetic cohort.

One reference run is trained once per module; a second run of the same pipeline is killed
(SIGKILL, in a forked process) in the middle of an epoch and resumed, and must end in the
reference's exact state. Torch runs on one thread here: summation order, hence the last bits
of every result, depends on the thread count, and a forked child must not inherit a busy
OpenMP pool.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from neurocl import config, embed, pipeline, train
from neurocl.cli import app
from neurocl.errors import ConfigError, OutputError, TrainingError
from neurocl.io import read_tsv
from neurocl.methods import SepCLR

KILL_AT_STEP = 7  # steps are checkpointed every 2: the run dies after step 7, its last checkpoint is step 6
PIPELINE = """
name: tiny
cohort: {cohort}
views: {{p_crop: 0.5, p_flip: 0.5, p_noise: 0.5, p_blur: 0.0, p_cutout: 0.5}}
method: {{name: sepclr, common_dim: 4, salient_dim: 4, target_fraction: 0.5}}
encoder: {{name: small_cnn, width: 4}}
training: {{epochs: 2, batch_size: 4, lr: 0.003, warmup_steps: 2, accelerator: cpu, checkpoint_every_n_steps: 2}}
evaluation:
  attributes: [age, group]
  subsets: [all]
  probe: {{n_splits: 3, inner_splits: 2, n_permutations: 5, n_bootstrap: 10, n_jobs: 1}}
baselines: [cpca]
outputs: {{store: {store}, report: false}}
"""
TERMS = ["common", "salient", "null", "mi"]


# One torch thread: the bit-for-bit comparisons of these runs hold within one thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def pipeline_yaml(workspace, tiny_cohort) -> Path:
    path = workspace / "tiny.yaml"
    path.write_text(PIPELINE.format(cohort=tiny_cohort, store=workspace / "store"))
    return path


class _Snapshot(L.Callback):
    """Keeps the trained weights after step ``step`` (to compare with the killed run's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step, self.state = step, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.state = {name: value.clone() for name, value in module.state_dict().items()}


class _KillAt(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no last words: like a node failure


def _with_callback(monkeypatch, callback) -> None:
    original = train.run_callbacks
    monkeypatch.setattr(train, "run_callbacks", lambda *args, **kwargs: original(*args, **kwargs) + [callback])


@pytest.fixture(scope="module")
def reference(workspace, pipeline_yaml):
    """An uninterrupted run, and its weights after step 6."""
    snapshot = _Snapshot(KILL_AT_STEP - 1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _with_callback(monkeypatch, snapshot)
        run_dir = pipeline.run_pipeline(pipeline_yaml, workspace / "reference")
    return run_dir, snapshot.state


def _killed_child(pipeline_yaml: Path, run_dir: Path) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _with_callback(monkeypatch, _KillAt())
        CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(run_dir)])
    os._exit(3)  # not killed: the parent sees exit code 3


@pytest.fixture(scope="module")
def resumed(workspace, pipeline_yaml, reference):
    """The same pipeline killed mid-epoch (in a forked process), then `neurocl run --resume`."""
    run_dir = workspace / "resumed"
    child = multiprocessing.get_context("fork").Process(target=_killed_child, args=(pipeline_yaml, run_dir))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    killed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    result = CliRunner().invoke(app, ["run", str(pipeline_yaml), "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    return run_dir, killed


def _checkpoint(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


# ---------------------------------------------------------------- the run directory


def test_run_writes_every_stage_output(reference):
    run_dir, _ = reference
    for name in ("config.yaml", "splits.tsv", "checkpoints/last.ckpt", "logs/metrics.csv", "embeddings.tsv",
                 "probes.tsv", "separation.json", "logs/prepared.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "maps").exists()  # maps are off by default


def test_probes_and_separation_score_only_the_test_subjects_of_the_run(reference):
    """Held out by default: every figure of probes.tsv and separation.json is on the split's test subjects."""
    run_dir, _ = reference
    splits = read_tsv(run_dir / "splits.tsv")
    n_test = int((splits["split"] == "test").sum())
    for folder in (run_dir, run_dir / "baselines" / "cpca"):
        probes = read_tsv(folder / "probes.tsv")
        scored = probes[probes["metric"] != "none"]
        assert len(scored) and (probes["scope"] == "held_out").all()
        assert (scored["n"] == n_test).all() and (scored["n_fit"] == len(splits) - n_test).all()
        # The cohort's ground-truth factors that its participants table lacks are probed the same way.
        truth = read_tsv(folder / "truth_probes.tsv")
        assert "subtype" in set(truth["attribute"]) and not {"age", "sex", "site", "severity"} & set(truth["attribute"])
        assert (truth["scope"] == "held_out").all() and (truth.loc[truth["subset"].eq("all") & truth["metric"].ne("none"), "n"] == n_test).all()
    result = json.loads((run_dir / "separation.json").read_text())
    assert result["scope"] == "held_out" and result["n_test_subjects"] == n_test
    collapse = result["background_collapse"]
    assert collapse["scope"] == "held_out" and collapse["n_background"] + collapse["n_target"] == n_test


def test_voxel_baseline_gets_embeddings_and_probes_in_its_folder(reference):
    run_dir, _ = reference
    cpca = read_tsv(run_dir / "baselines" / "cpca" / "embeddings.tsv")
    assert list(cpca.columns[:3]) == ["participant_id", "split", "group"] and len(cpca) == 32
    assert cpca["split"].tolist() == read_tsv(run_dir / "embeddings.tsv")["split"].tolist()
    assert set(read_tsv(run_dir / "baselines" / "cpca" / "probes.tsv")["attribute"]) >= {"age", "group"}
    assert not list(run_dir.rglob(".*.tmp*"))  # no temporary file left behind


def test_config_yaml_is_the_resolved_pipeline(reference, pipeline_yaml, tiny_cohort):
    run_dir, _ = reference
    saved = config.PipelineConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved == config.load_pipeline(pipeline_yaml)
    assert saved.cohort == Path(tiny_cohort).resolve()
    assert saved.training.seed == 0 and saved.views.p_cutout == 0.5  # defaults and values written out


def test_embeddings_tsv_has_keys_split_group_then_each_space(reference, tiny_cohort):
    run_dir, _ = reference
    embeddings = read_tsv(run_dir / "embeddings.tsv")
    spaces = [f"common_{i}" for i in range(4)] + [f"salient_{i}" for i in range(4)]
    assert list(embeddings.columns) == ["participant_id", "split", "group", *spaces]
    participants = read_tsv(Path(tiny_cohort).parent / "participants.tsv")
    assert embeddings["participant_id"].tolist() == participants["participant_id"].tolist()
    expected_group = participants["diagnosis"].map({"control": "background", "patient": "target"})
    assert embeddings["group"].tolist() == expected_group.tolist()
    assert np.isfinite(embeddings[spaces].to_numpy()).all()
    # subjects differ in the common space; after one epoch the salient space may still be collapsed
    # to one point (its null term pulls it to the origin first), which is not an error
    assert embeddings[spaces[:4]].std().min() > 0


def test_splits_tsv_is_the_split_of_every_embedded_subject(reference):
    run_dir, _ = reference
    splits = read_tsv(run_dir / "splits.tsv")
    embeddings = read_tsv(run_dir / "embeddings.tsv")
    merged = embeddings.merge(splits, on="participant_id", suffixes=("", "_manifest"))
    assert len(merged) == len(embeddings) == 32
    assert (merged["split"] == merged["split_manifest"]).all()
    assert set(splits["split"]) == {"train", "val", "test"}


def test_metrics_csv_logs_each_loss_term_and_their_weighted_sum(reference):
    run_dir, _ = reference
    metrics = pd.read_csv(run_dir / "logs" / "metrics.csv")
    train_columns = ["train/loss"] + [f"train/{term}" for term in TERMS]
    val_columns = ["val/loss"] + [f"val/{term}" for term in TERMS]
    share_columns = [f"train/share_{term}" for term in TERMS]
    assert sorted(metrics.columns) == sorted(["step", "epoch", *train_columns, *share_columns, *val_columns])
    train = metrics.dropna(subset=["train/loss"])
    assert train["step"].tolist() == list(range(len(train))) and len(train) == _checkpoint(run_dir)["global_step"]
    # SepCLR's total: common + beta_salient * salient + beta_null * null + lam_mi * mi (defaults 1, 10, 10).
    weighted = train["train/common"] + train["train/salient"] + 10 * train["train/null"] + 10 * train["train/mi"]
    np.testing.assert_allclose(train["train/loss"], weighted, rtol=1e-5, atol=1e-5)
    # Each term's share of the gradient reaching the projections: shares of one step sum to 1.
    np.testing.assert_allclose(train[share_columns].sum(axis=1), 1.0, rtol=1e-5)
    assert metrics["val/loss"].notna().sum() == 2  # one validation per epoch


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_gives_the_same_weights_in_another_process(reference, resumed):
    _, state_at_step_6 = reference
    _, killed = resumed
    assert killed["global_step"] == KILL_AT_STEP - 1
    for name, value in state_at_step_6.items():
        assert torch.equal(killed["state_dict"][name], value), name


def test_killed_checkpoint_is_in_the_middle_of_an_epoch(reference, resumed):
    run_dir, _ = reference
    _, killed = resumed
    steps_per_epoch = _checkpoint(run_dir)["global_step"] // 2
    assert killed["global_step"] % steps_per_epoch != 0
    assert killed["epoch"] == 1


def test_killed_and_resumed_run_ends_in_the_uninterrupted_state(reference, resumed):
    run_dir, _ = reference
    resumed_dir, _ = resumed
    expected, final = _checkpoint(run_dir), _checkpoint(resumed_dir)
    assert final["global_step"] == expected["global_step"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    expected_moments = expected["optimizer_states"][0]["state"]
    for key, moments in final["optimizer_states"][0]["state"].items():
        assert torch.equal(moments["exp_avg"], expected_moments[key]["exp_avg"])


def test_resumed_run_writes_the_same_embeddings_and_metrics(reference, resumed):
    run_dir, _ = reference
    resumed_dir, _ = resumed
    pd.testing.assert_frame_equal(read_tsv(resumed_dir / "embeddings.tsv"), read_tsv(run_dir / "embeddings.tsv"))
    assert (resumed_dir / "logs" / "metrics.csv").read_text() == (run_dir / "logs" / "metrics.csv").read_text()


def test_resume_refuses_a_changed_pipeline(reference, pipeline_yaml, workspace):
    run_dir, _ = reference
    changed = workspace / "changed.yaml"
    changed.write_text(pipeline_yaml.read_text().replace("lr: 0.003", "lr: 0.01"))
    with pytest.raises(ConfigError, match="section\\(s\\) training"):
        pipeline.run_pipeline(changed, run_dir, resume=True)


def test_resume_of_a_finished_run_may_change_evaluation_and_outputs(reference, pipeline_yaml, workspace):
    run_dir, _ = reference
    copy = Path(shutil.copytree(run_dir, workspace / "re-evaluated"))
    changed = workspace / "re-evaluated.yaml"
    text = pipeline_yaml.read_text().replace("n_permutations: 5", "n_permutations: 6")
    changed.write_text(text.replace("report: false", "report: true"))
    pipeline.run_pipeline(changed, copy, resume=True)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert saved["evaluation"]["probe"]["n_permutations"] == 6 and saved["outputs"]["report"]
    if importlib.util.find_spec("neurocl.report") is not None:
        assert (copy / "report.html").is_file() and (copy / "report.md").is_file()
    assert _checkpoint(copy)["global_step"] == _checkpoint(run_dir)["global_step"]  # no further training
    pd.testing.assert_frame_equal(read_tsv(copy / "embeddings.tsv"), read_tsv(run_dir / "embeddings.tsv"))
    assert (copy / "logs" / "metrics.csv").read_text() == (run_dir / "logs" / "metrics.csv").read_text()


def test_run_refuses_a_non_empty_out_folder(reference, pipeline_yaml):
    run_dir, _ = reference
    with pytest.raises(ConfigError, match="holds a run already.*--resume"):
        pipeline.run_pipeline(pipeline_yaml, run_dir)


# ---------------------------------------------------------------- embed


def test_embed_command_reproduces_the_run_embeddings(reference, tiny_cohort, workspace):
    run_dir, _ = reference
    out = workspace / "embedded" / "new.tsv"
    result = CliRunner().invoke(
        app, ["embed", str(run_dir / "checkpoints" / "last.ckpt"), str(tiny_cohort), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    embedded, expected = read_tsv(out), read_tsv(run_dir / "embeddings.tsv")
    assert embedded["participant_id"].tolist() == expected["participant_id"].tolist()
    assert embedded["split"].isna().all()  # new subjects belong to no split of the run
    spaces = [column for column in expected.columns if column.startswith(("common_", "salient_"))]
    np.testing.assert_allclose(embedded[spaces].to_numpy(), expected[spaces].to_numpy(), rtol=1e-4, atol=1e-5)


def test_patch_trained_run_embeds_by_sliding_window_and_embed_reproduces_it(tiny_cohort, workspace):
    """views.patches end to end: training on patches, the run's embeddings (sliding-window means) and
    `neurocl embed` from the checkpoint, which must carry the patch recipe to embed the same way."""
    config = yaml.safe_load(PIPELINE.format(cohort=tiny_cohort, store=workspace / "store"))
    config["views"]["patches"] = {"size": 8, "per_subject": 2, "positives": "same_location", "embed_stride": 0.5}
    config["training"].update(epochs=1, checkpoint_every_n_steps=100)
    config["baselines"] = []
    path = workspace / "patches.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = pipeline.run_pipeline(path, workspace / "patches")
    checkpoint = _checkpoint(run_dir)
    assert checkpoint["neurocl_patches"]["size"] == 8 and checkpoint["neurocl_patches"]["embed"] == "sliding"
    out = workspace / "patches-embedded.tsv"
    result = CliRunner().invoke(app, ["embed", str(run_dir / "checkpoints" / "last.ckpt"), str(tiny_cohort), "--out", str(out)])
    assert result.exit_code == 0, result.output
    embedded, expected = read_tsv(out), read_tsv(run_dir / "embeddings.tsv")
    spaces = [column for column in expected.columns if column.startswith(("common_", "salient_"))]
    np.testing.assert_allclose(embedded[spaces].to_numpy(), expected[spaces].to_numpy(), rtol=1e-4, atol=1e-5)
    # embed: whole runs the encoder on the whole volume instead.
    from neurocl.cohort import Cohort
    from neurocl.store import VolumeStore

    model = embed.load_model(run_dir / "checkpoints" / "last.ckpt")
    store = VolumeStore.open(workspace / "store")
    rows = store.rows_for(Cohort.from_yaml(tiny_cohort))[:4]
    salient = expected[[c for c in spaces if c.startswith("salient_")]].to_numpy()[:4]
    np.testing.assert_allclose(model.embed_store(store, rows)["salient"], salient, rtol=1e-4, atol=1e-5)
    # The maps explain the same representation: the network's mean over the grid, differentiable.
    from neurocl.maps.stage import explained_network

    explained = explained_network(model, model.patches, store.spatial_dims).eval()
    volumes = store.batch(rows).requires_grad_(True)
    represented = explained(volumes)["salient_rep"]
    np.testing.assert_allclose(represented.detach().double().numpy(), salient, rtol=1e-4, atol=1e-5)
    assert torch.autograd.grad(represented.square().sum(), volumes)[0].abs().sum() > 0
    model.patches = model.patches.model_copy(update={"embed": "whole"})
    assert explained_network(model, model.patches, store.spatial_dims) is model.net
    with torch.no_grad():
        direct = model.embed(store.batch(rows))["salient"].double().numpy()
    np.testing.assert_allclose(model.embed_store(store, rows)["salient"], direct, rtol=1e-4, atol=1e-5)


def test_the_shipped_patch_template_runs_tiny_in_bf16(tiny_cohort, workspace):
    """pipelines/study_patches_1mm.yaml as a user runs it, made tiny (--set): its patch recipe (grid
    placement, sliding-window embedding), method, bf16-mixed precision, probes, baselines and maps,
    on a CPU with a small encoder and 8^3 patches of the 8 mm tiny cohort."""
    template = Path(__file__).parents[1] / "pipelines" / "study_patches_1mm.yaml"
    tiny = [f"cohort={tiny_cohort}", f"outputs.store={workspace / 'patch_template_store'}", "splits.stratify=[group]",
            "views.patches.size=8", "encoder.name=small_cnn", "encoder.width=4", "training.epochs=1",
            "training.batch_size=4", "training.warmup_steps=2", "training.accelerator=cpu", "training.devices=1",
            "training.strategy=auto", "training.sync_batchnorm=false", "evaluation.attributes=[age, group]",
            "evaluation.probe.n_splits=3", "evaluation.probe.n_permutations=5", "evaluation.probe.n_bootstrap=10"]
    run_dir = pipeline.run_pipeline(template, workspace / "patch_template", settings=tiny)
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["training"]["precision"] == "bf16-mixed"
    assert recorded["views"]["patches"]["placement"] == "grid" and recorded["encoder"]["name"] == "small_cnn"
    patches = _checkpoint(run_dir)["neurocl_patches"]
    assert patches["size"] == 8 and patches["embed"] == "sliding" and patches["placement"] == "grid"
    embeddings = read_tsv(run_dir / "embeddings.tsv")
    spaces = [column for column in embeddings.columns if column.startswith(("common_", "salient_"))]
    assert len(spaces) == 128 + 32 and np.isfinite(embeddings[spaces].to_numpy()).all()
    assert (run_dir / "probes.tsv").is_file() and (run_dir / "maps").is_dir()


def test_load_model_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        embed.load_model(bad)


# ---------------------------------------------------------------- faults


class _NaNAtStepOne(SepCLR):
    def compute_loss(self, views, indices):
        total, terms = super().compute_loss(views, indices)
        if self.global_step == 1:
            terms["null"] = terms["null"] * float("nan")
        return total + terms["null"] - terms["null"].detach(), terms


def test_non_finite_loss_stops_the_run_naming_step_and_term(reference, pipeline_yaml, workspace, monkeypatch):
    monkeypatch.setattr(train, "build_method", lambda method, *args, **kwargs: _NaNAtStepOne(method, *args, **kwargs))
    with pytest.raises(TrainingError, match=r"step 1 .*term 'null' = nan"):
        pipeline.run_pipeline(pipeline_yaml, workspace / "nan")
    assert not (workspace / "nan" / "embeddings.tsv").exists()


@pytest.mark.parametrize(
    ("section", "field"),
    [("method: {name: yaware, attributes: [IQ]}", "method.attributes"),
     ("evaluation: {attributes: [group, IQ]}", "evaluation.attributes"),
     ("baselines: [{name: yaware, attributes: [IQ]}]", "baselines.yaware.attributes")],
)
def test_attribute_missing_from_the_cohort_is_refused_before_any_work(section, field, tmp_path, tiny_cohort):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort}\n{section}\n")
    with pytest.raises(ConfigError, match=rf"{field}: \['IQ'\] not in the attributes of cohort .*'age'"):
        pipeline.run_pipeline(path, tmp_path / "run")
    assert not (tmp_path / "run" / "store").exists()


def test_a_batch_too_large_for_the_training_subjects_fails_before_anything_is_written(tmp_path, tiny_cohort):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort}\ntraining: {{batch_size: 30, accelerator: cpu}}\n")
    with pytest.raises(ConfigError, match="training.batch_size 30"):
        pipeline.run_pipeline(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_out_inside_the_cohort_folder_is_refused_before_anything_is_written(tmp_path, tiny_cohort_copy):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"cohort: {tiny_cohort_copy}\n")
    out = tiny_cohort_copy.parent / "runs" / "first"
    with pytest.raises(OutputError, match="inside the cohort root"):
        pipeline.run_pipeline(path, out)
    assert not (tiny_cohort_copy.parent / "runs").exists()


# ---------------------------------------------------------------- cluster: trackers, prepare, requeue


def test_tensorboard_records_the_loss_terms_of_metrics_csv(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = reference
    events = EventAccumulator(str(run_dir / "logs" / "trackers" / "tensorboard")).Reload()
    logged = [event.value for event in events.Scalars("train/loss")]
    metrics = pd.read_csv(run_dir / "logs" / "metrics.csv").dropna(subset=["train/loss"])
    np.testing.assert_allclose(logged, metrics["train/loss"], rtol=1e-6)


class _RequeueSignalAt(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning before preemption; unhandled off SLURM: the end


def _requeued_child(arguments: list[str]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _with_callback(monkeypatch, _RequeueSignalAt())
        CliRunner().invoke(app, arguments)
    os._exit(3)


def test_prepare_then_a_requeued_job_completes_with_the_same_command(reference, pipeline_yaml, workspace, tmp_path):
    run_dir = workspace / "requeued"
    config = yaml.safe_load(pipeline_yaml.read_text())
    config["outputs"]["store"] = None  # the run's own store: the one `neurocl prepare` builds
    own_store = tmp_path / "own_store.yaml"
    own_store.write_text(yaml.safe_dump(config))
    prepared = CliRunner().invoke(app, ["prepare", str(own_store), "--out", str(run_dir), "--workers", "1"])
    assert prepared.exit_code == 0, prepared.output
    assert "volumes: 32 x" in prepared.output and (run_dir / "store" / "store.json").is_file()
    volumes_file = json.loads((run_dir / "store" / "store.json").read_text())["volumes"]

    command = ["run", str(own_store), "--out", str(run_dir), "--auto-resume"]
    child = multiprocessing.get_context("fork").Process(target=_requeued_child, args=(command,))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGUSR1
    assert _checkpoint(run_dir)["global_step"] == KILL_AT_STEP - 1  # the last complete checkpoint before the signal
    result = CliRunner().invoke(app, command)  # the requeued job: the same command
    assert result.exit_code == 0, result.output
    assert "resuming the run" in result.output
    reference_dir, _ = reference
    expected, final = _checkpoint(reference_dir), _checkpoint(run_dir)
    assert final["global_step"] == expected["global_step"]
    for name, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    assert json.loads((run_dir / "logs" / "prepared.json").read_text())["volumes"] == volumes_file  # not rebuilt


class _SigintInFinalizer:
    """Delivers SIGINT while Python runs this object's finalizer: its KeyboardInterrupt is swallowed."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # bytecode for the eval loop to run the handler here, inside __del__
            pass


class _LoseACtrlC(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            _SigintInFinalizer()  # made and released at once: the finalizer runs now


def test_a_ctrl_c_lost_in_a_finalizer_still_stops_training(workspace, pipeline_yaml, monkeypatch):
    # Python drops a KeyboardInterrupt raised inside __del__ ("Exception ignored", via
    # sys.unraisablehook); the run's InterruptGuard recorded the signal and stops training at the
    # next batch all the same.
    lost = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: lost.append(unraisable.exc_type))
    _with_callback(monkeypatch, _LoseACtrlC())
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(pipeline_yaml, workspace / "lost-ctrl-c")
    assert KeyboardInterrupt in lost  # the first interrupt really was swallowed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    metrics = (workspace / "lost-ctrl-c" / "logs" / "metrics.tsv")
    steps = [line for line in metrics.read_text().splitlines()[1:] if line.strip()] if metrics.exists() else []
    assert len(steps) <= 4, f"training went on after the interrupt: {len(steps)} metric rows"


# ---------------------------------------------------------------- a messy cohort: include and on_invalid: exclude


def test_run_on_a_messy_cohort_leaves_out_its_bad_rows_and_writes_the_excluded_table(tmp_path, tiny_cohort_copy):
    folder = tiny_cohort_copy.parent
    tsv = folder / "participants.tsv"
    lines = tsv.read_text().splitlines()
    lines[3] = "\t".join([lines[3].split("\t")[0], "n/a", *lines[3].split("\t")[2:]])  # line 4: diagnosis n/a
    tsv.write_text("\n".join(lines) + "\n")
    missing = lines[5].split("\t")[0]  # line 6: its image is gone
    (folder / missing / "anat" / f"{missing}_desc-gm.nii.gz").unlink()
    tiny_cohort_copy.write_text(tiny_cohort_copy.read_text() + "on_invalid: exclude\ninclude: \"participant_id != 'sub-0032'\"\n")
    config = yaml.safe_load(PIPELINE.format(cohort=tiny_cohort_copy, store=tmp_path / "store"))
    config["training"].update(epochs=1)
    config["baselines"] = []
    path = tmp_path / "messy.yaml"
    path.write_text(yaml.safe_dump(config))

    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (f"left out 3 of 32 rows ({tmp_path / 'run' / 'excluded.tsv'}): 1 diagnosis missing, 1 image missing, "
            "1 not selected by include") in " ".join(result.output.split())
    excluded = read_tsv(tmp_path / "run" / "excluded.tsv")
    assert excluded[["participant_id", "row", "reason"]].values.tolist() == [
        [lines[3].split("\t")[0], 4, "diagnosis missing"], [missing, 6, "image missing"],
        ["sub-0032", 33, "not selected by include"]]
    embedded = set(read_tsv(tmp_path / "run" / "embeddings.tsv")["participant_id"])
    assert len(embedded) == 29 and not embedded & set(excluded["participant_id"])

    # The image is restored: the cohort has one row more than the run trained on, which resume refuses.
    shutil.copy(folder / "sub-0001" / "anat" / "sub-0001_desc-gm.nii.gz", folder / missing / "anat" / f"{missing}_desc-gm.nii.gz")
    with pytest.raises(ConfigError, match=rf"changed since this run started: 1 row was added \({missing}\)"):
        pipeline.run_pipeline(path, tmp_path / "run", resume=True)
