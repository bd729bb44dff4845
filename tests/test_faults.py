"""Fault injection: hostile inputs, full disks, concurrent builds and signals get a clear answer.

Each test builds one fault of the kind an adversarial tester tried (issue 15): forged headers,
YAML alias bombs, empty and looping files, a full filesystem (a real 1 MiB tmpfs in a private
mount namespace where the platform allows it, otherwise ENOSPC simulated at the system call),
two processes building one store, and SIGINT / SIGKILL in the middle of a run. It asserts the
exit code, that the error is one line naming the file and the problem, and that inputs are
left byte-for-byte as they were. docs/reliability.md maps every guarantee to its test here.

Commands run in a real subprocess (``python -m neurocl``) where the exit status, a signal or a
memory limit is the point; the package they import is the one these tests import.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import neurocl
from neurocl.cohort import Cohort
from neurocl.errors import OutputError, StoreError
from neurocl.store import LOCK_NAME, VolumeStore

PACKAGE_ROOT = str(Path(neurocl.__file__).resolve().parents[1])
BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" if previous else f'{name}: &{name} ["lol"]\n'
    for previous, name in zip([None, *"abcdefgh"], "abcdefghi")
)
BAD_CELL_LIMIT = 2 << 30  # address space for subprocesses that must not allocate gigabytes


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("NEUROCL_DEBUG", None)
    return env


def neurocl_cli(*args, memory_limit: int | None = None, timeout: float = 300, wrap: list[str] | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """``python -m neurocl ARGS`` in a subprocess (optionally under an address-space limit)."""

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    command = [*(wrap or []), sys.executable, "-m", "neurocl", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout,
                          preexec_fn=limit, **kwargs)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines a command printed; a traceback is never expected alongside them."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def one_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """Assert exit ``code`` and exactly one error line that contains every fragment."""
    lines = error_lines(result)
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (symlinks by target), to prove inputs untouched."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            digest[key] = "-> " + os.readlink(path)
        elif path.is_file():
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _cohort_spec(folder: Path, participants: str = "participants.tsv") -> Path:
    spec = folder / "cohort.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: hostile
        participants: {participants}
        images: "{{participant_id}}.nii.gz"
        group: {{column: dx, background: HC, target: PT}}
        """))
    return spec


def _first_image(cohort_yaml: Path) -> tuple[Cohort, Path]:
    cohort = Cohort.from_yaml(cohort_yaml)
    return cohort, Path(cohort.table["image"].iloc[0])


# ------------------------------------------------------------------ hostile images


def forged_nifti(path: Path, shape=(1000, 1000, 1000)) -> Path:
    """A NIfTI-1 file whose header claims ``shape`` float32 voxels but which holds ~1 KB."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    content = header.binaryblock + b"\x00" * 4 + b"\x00" * 700
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def small_cohort(folder: Path, suffix: str = ".nii.gz", n: int = 4) -> Path:
    """A cohort of ``n`` random 8^3 images (half HC, half PT) with its spec; returns the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["participant_id\tdx"]
    for index in range(n):
        pid = f"sub-{index:02d}"
        lines.append(f"{pid}\t{'HC' if index % 2 == 0 else 'PT'}")
        nib.save(nib.Nifti1Image(rng.random((8, 8, 8), dtype=np.float32) + 1, np.eye(4)), folder / f"{pid}{suffix}")
    (folder / "participants.tsv").write_text("\n".join(lines) + "\n")
    spec = _cohort_spec(folder)
    spec.write_text(spec.read_text().replace(".nii.gz", suffix))
    return spec


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_forged_header_is_reported_without_allocating_its_claimed_size(tmp_path, suffix):
    spec = small_cohort(tmp_path / "cohort", suffix)
    forged = forged_nifti(tmp_path / "cohort" / f"sub-03{suffix}")
    assert forged.stat().st_size < 1200
    before = tree_digest(tmp_path / "cohort")
    # 2 GiB of address space: reading the 4 GB the header claims would be a MemoryError.
    result = neurocl_cli("validate", spec, memory_limit=BAD_CELL_LIMIT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stdout + result.stderr
    problems = Cohort.from_yaml(spec).validate()
    assert len(problems) == 1 and problems[0].participant_id == "sub-03"
    assert "claims (1000, 1000, 1000) float32 voxels (4,000,000," in problems[0].problem
    assert tree_digest(tmp_path / "cohort") == before


def test_header_disagreeing_with_the_reference_grid_is_reported_before_its_voxels_are_read(
    tiny_cohort_copy, monkeypatch
):
    from neurocl.cohort import problems as cohort_module  # where the voxels are read

    cohort, first = _first_image(tiny_cohort_copy)
    big = Path(cohort.table["image"].iloc[5])
    # A real (consistent) gzip image of 256^3 zeros: 64 MiB of voxels in a ~70 KB file.
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 256), np.float32), np.eye(4)), big)
    read = []
    original = cohort_module.read_voxels
    monkeypatch.setattr(cohort_module, "read_voxels", lambda path, kind: read.append(Path(path)) or original(path, kind))
    problems = Cohort.from_yaml(tiny_cohort_copy).validate()
    assert [p.problem for p in problems if p.participant_id == cohort.table["participant_id"].iloc[5]] == [
        f"shape (256, 256, 256) differs from the reference grid {nib.load(first).shape} "
        f"(line 2, {cohort.table['participant_id'].iloc[0]})"
    ]
    assert big not in read and first in read


def test_all_zero_image_is_reported_by_validate(tiny_cohort_copy):
    cohort, first = _first_image(tiny_cohort_copy)
    image = nib.load(first)
    zero = Path(cohort.table["image"].iloc[2])
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), zero)
    result = neurocl_cli("validate", tiny_cohort_copy)
    assert result.returncode == 1
    assert "image is all zeros" in result.stdout
    problems = Cohort.from_yaml(tiny_cohort_copy).validate()
    assert [(p.row, p.problem) for p in problems] == [(4, "image is all zeros")]


# ------------------------------------------------------------------ hostile tables and specs


def test_empty_participants_table_is_one_line_naming_it(tmp_path):
    spec = _cohort_spec(tmp_path)
    (tmp_path / "participants.tsv").write_bytes(b"")
    result = neurocl_cli("validate", spec)
    one_error(result, str(tmp_path / "participants.tsv"), "participants table is empty")


def test_participants_symlink_loop_is_one_line_naming_it(tmp_path):
    spec = _cohort_spec(tmp_path)
    (tmp_path / "participants.tsv").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "participants.tsv")
    result = neurocl_cli("validate", spec)
    one_error(result, "participants.tsv", "symbolic link loop")


@pytest.mark.parametrize("bomb", ["billion_laughs", "self_reference"])
def test_cohort_spec_alias_bomb_is_refused_in_one_line(tmp_path, bomb):
    text = BILLION_LAUGHS if bomb == "billion_laughs" else "participants: &p [*p]\n"
    spec = tmp_path / "cohort.yaml"
    spec.write_text(text)
    started = time.perf_counter()
    result = neurocl_cli("validate", spec, memory_limit=BAD_CELL_LIMIT, timeout=60)
    assert time.perf_counter() - started < 30
    one_error(result, str(spec), "refused" if bomb == "billion_laughs" else "contains it")


# ------------------------------------------------------------------ outputs: umask, full disk


def test_written_files_follow_the_umask_not_0600(tmp_path):
    from neurocl.io import write_text

    previous = os.umask(0o027)
    try:
        assert (write_text(tmp_path / "shared.txt", "x").stat().st_mode & 0o777) == 0o640
        os.umask(0o022)
        assert (write_text(tmp_path / "public.txt", "x").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(previous)


def test_store_files_are_readable_by_the_group_under_umask_022(tmp_path):
    previous = os.umask(0o022)
    try:
        store = VolumeStore.from_array(np.zeros((3, 1, 4, 4, 4), np.float32), tmp_path / "store")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in store.cache_dir.iterdir() if path.name != LOCK_NAME}
    assert set(modes.values()) == {0o644}, modes


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def in_small_tmpfs(folder: Path, size: str = "1m") -> list[str]:
    """Command prefix: run inside a private mount namespace where ``folder`` is a ``size`` tmpfs."""
    folder.mkdir(parents=True, exist_ok=True)
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs "{folder}" && exec "$@"', "sh"]


FULL_DISK_SCRIPT = """
import sys
import typer
from neurocl.cli import user_errors
from neurocl.cohort import Cohort
from neurocl.store import VolumeStore

@user_errors
def build():
    VolumeStore.build(Cohort.from_yaml(sys.argv[1]), sys.argv[2], workers=1, progress=False)

try:
    build()
except typer.Exit as exit:
    raise SystemExit(exit.exit_code)
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces (a private tmpfs)")
def test_store_build_on_a_full_disk_is_a_clear_error_not_sigbus(tiny_cohort, tmp_path):
    full = tmp_path / "full"
    before = tree_digest(tiny_cohort.parent)
    # 32 images of the tiny cohort need ~2.5 MB of stage-1 and stored arrays: a 1 MiB tmpfs is full.
    script = tmp_path / "build.py"
    script.write_text(FULL_DISK_SCRIPT)
    command = [*in_small_tmpfs(full), sys.executable, str(script), str(tiny_cohort), str(full / "store")]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode != -signal.SIGBUS and result.returncode != 128 + signal.SIGBUS
    one_error(result, str(full / "store"), "not enough free disk space")
    assert tree_digest(tiny_cohort.parent) == before


def test_store_preallocation_failure_is_one_error_and_leaves_no_array(tiny_cohort, tmp_path, monkeypatch):
    """ENOSPC simulated at fallocate (a disk that fills up after the free-space check)."""
    from neurocl import io

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "posix_fallocate", no_space)
    with pytest.raises(StoreError, match=r"disk full while reserving") as caught:
        VolumeStore.build(Cohort.from_yaml(tiny_cohort), tmp_path / "store", workers=1, progress=False)
    assert str(tmp_path / "store") in str(caught.value)
    assert [path.name for path in (tmp_path / "store").iterdir()] == [LOCK_NAME]


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces (a private tmpfs)")
def test_checkpoint_on_a_full_disk_is_one_line_naming_it_and_nothing_half_written(tmp_path):
    full = tmp_path / "full"
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, typer
        from neurocl.cli import user_errors
        from neurocl.io import torch_save

        @user_errors
        def save():
            torch_save({{"weights": torch.zeros(1 << 19)}}, {str(full / 'last.ckpt')!r})  # 2 MiB into 1 MiB

        try:
            save()
        except typer.Exit as exit:
            raise SystemExit(exit.exit_code)
        """))
    command = [*in_small_tmpfs(full), sys.executable, str(script)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    one_error(result, str(full / "last.ckpt"), "disk full")


def test_atomic_write_on_enospc_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    from neurocl import io

    def full(path, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.Path, "write_text", full)
    with pytest.raises(OutputError, match=r"probes\.tsv: disk full"):
        io.write_text(tmp_path / "probes.tsv", "a\tb\n")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ one store, two processes


BUILD_SCRIPT = """
import sys
from neurocl.cohort import Cohort
from neurocl.store import VolumeStore
store = VolumeStore.build(Cohort.from_yaml(sys.argv[1]), sys.argv[2], workers=1, progress=True)
print("built", store.record["volumes"], flush=True)
"""


def test_a_build_waits_for_the_lock_held_on_its_store(tiny_cohort, tmp_path):
    from filelock import FileLock

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    log = tmp_path / "build.log"
    lock = FileLock(str(store_dir / LOCK_NAME))
    lock.acquire()
    try:
        with open(log, "w") as stderr:
            process = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(tiny_cohort), str(store_dir)],
                                       stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env())
        deadline = time.time() + 300
        while "waiting for another process building the store" not in log.read_text():
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # still waiting: nothing is built while the lock is held
        assert process.poll() is None and not (store_dir / "store.json").exists()
    finally:
        lock.release()
    process.communicate(timeout=300)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert (store_dir / "store.json").exists()


def test_two_concurrent_builds_on_one_store_both_succeed_and_leave_no_orphans(tiny_cohort, tmp_path):
    store_dir = tmp_path / "store"
    processes = [
        subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(tiny_cohort), str(store_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    results = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in results]
    volumes = {out.split()[-1] for out, _ in results}
    assert len(volumes) == 1  # the second build reused the first one's, it did not build beside it
    record = json.loads((store_dir / "store.json").read_text())
    committed = {value for value in record.values() if isinstance(value, str) and value.endswith((".npy", ".tsv"))}
    # Nothing but the committed build, its record and the lock: no orphan temporaries.
    assert sorted(path.name for path in store_dir.iterdir()) == sorted({LOCK_NAME, "store.json", *committed})


def test_store_in_a_read_only_folder_is_one_line_naming_it(tiny_cohort, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: the same refusal comes from a file standing where the folder goes
        blocker = tmp_path / "store"
        blocker.write_text("not a folder")
        with pytest.raises(StoreError, match=r"store: cannot hold the store: a file"):
            VolumeStore.build(Cohort.from_yaml(tiny_cohort), blocker, workers=1, progress=False)
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    with pytest.raises(StoreError, match=r"cannot write the store here"):
        VolumeStore.build(Cohort.from_yaml(tiny_cohort), folder / "store", workers=1, progress=False)


# ------------------------------------------------------------------ the command line itself


def test_probe_help_keeps_the_bracketed_session_id():
    result = neurocl_cli("probe", "--help")
    assert result.returncode == 0
    assert "[session_id]" in result.stdout


def test_every_literal_bracket_in_the_help_texts_survives_rich_markup():
    import typer.main
    from typer.testing import CliRunner

    from neurocl.cli import app

    group = typer.main.get_command(app)
    runner = CliRunner()

    def commands(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, [*path, name])

    for path, command in commands(group, []):
        for param in command.params:
            text = getattr(param, "help", None) or ""
            if "[" not in text:
                continue
            bracketed = text[text.index("["): text.index("]", text.index("[")) + 1].replace("\\", "")
            output = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300"}).output
            assert bracketed in output, (path, param.name, bracketed)


def test_os_error_reaching_the_cli_is_one_line_naming_the_path(tmp_path):
    # A file where the output folder's parent should be: the OS refuses, the CLI says where.
    (tmp_path / "a-file").write_text("")
    result = neurocl_cli("synth", tmp_path / "a-file" / "cohort", "--n-subjects", "4")
    one_error(result, str(tmp_path / "a-file"), "Not a directory")


# ------------------------------------------------------------------ a trained run, and faults around it

RUN_PIPELINE = """
name: faults
cohort: {cohort}
views: {{p_crop: 0.5, p_flip: 0.5, p_noise: 0.5, p_blur: 0.0, p_cutout: 0.5}}
method: {{name: sepclr, common_dim: 4, salient_dim: 4, target_fraction: 0.5}}
encoder: {{name: small_cnn, width: 4}}
training: {{epochs: {epochs}, batch_size: {batch_size}, lr: 0.003, warmup_steps: 2, accelerator: cpu, checkpoint_every_n_steps: 2}}
evaluation:
  attributes: [age]
  subsets: [all]
  probe: {{n_splits: 3, inner_splits: 2, n_permutations: 5, n_bootstrap: 10, n_jobs: 1}}
baselines: []
outputs: {{store: {store}, report: false}}
"""
PROBE_OPTIONS = ["--attributes", "age", "--n-permutations", "5", "--n-bootstrap", "10", "--jobs", "1"]


def _pipeline(folder: Path, cohort: Path, epochs: int = 1, store: Path | None = None, batch_size: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pipeline-{epochs}.yaml"
    path.write_text(RUN_PIPELINE.format(cohort=cohort, epochs=epochs, store=store or folder / "store",
                                        batch_size=batch_size))
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline YAML, run folder) of one finished one-epoch run on the tiny cohort (a real subprocess)."""
    folder = tmp_path_factory.mktemp("faults_run")
    pipeline = _pipeline(folder, tiny_cohort)
    result = neurocl_cli("run", pipeline, "--out", folder / "run", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return pipeline, folder / "run"


def _embeddings_copy(run: Path, folder: Path) -> Path:
    """A writable copy of the run's embeddings.tsv (and its sidecar) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in run.glob("embeddings.*"):
        shutil.copy(path, folder / path.name)
    return folder / "embeddings.tsv"


def _edit_cells(path: Path, edits: dict[tuple[int, str], str]) -> None:
    """Replace cells of a TSV by (line number, column name)."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    for (line, column), value in edits.items():
        cells = lines[line - 1].split("\t")
        cells[header.index(column)] = value
        lines[line - 1] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_probe_names_the_column_and_lines_of_nan_or_text_cells(trained_run, tiny_cohort, tmp_path):
    _, run = trained_run
    embeddings = _embeddings_copy(run, tmp_path / "in")
    _edit_cells(embeddings, {(3, "salient_1"): "nan", (5, "salient_1"): "abc", (4, "common_2"): "inf"})
    before = embeddings.read_bytes()
    result = neurocl_cli("probe", embeddings, "--cohort", tiny_cohort, "--out", tmp_path / "out", *PROBE_OPTIONS)
    line = one_error(result, str(embeddings), "salient_1", "lines 3, 5", "common_2", "line 4")
    assert "nan" in line and "'abc'" in line
    assert embeddings.read_bytes() == before and not (tmp_path / "out").exists()


def test_empty_embeddings_table_is_one_line_naming_it(tiny_cohort, tmp_path):
    embeddings = tmp_path / "embeddings.tsv"
    embeddings.write_bytes(b"")
    result = neurocl_cli("probe", embeddings, "--cohort", tiny_cohort, "--out", tmp_path / "out", *PROBE_OPTIONS)
    one_error(result, str(embeddings), "empty")


def test_cohort_rows_missing_from_the_embeddings_are_counted_and_named_on_the_console(trained_run, tiny_cohort, tmp_path):
    _, run = trained_run
    embeddings = _embeddings_copy(run, tmp_path / "in")
    lines = embeddings.read_text().splitlines()
    dropped = [line.split("\t")[0] for line in lines[1:4]]
    embeddings.write_text("\n".join([lines[0], *lines[4:]]) + "\n")
    result = neurocl_cli("probe", embeddings, "--cohort", tiny_cohort, "--out", tmp_path / "out", *PROBE_OPTIONS,
                         "--other-cohort")
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert "3 cohort rows have no embedding" in said and all(pid in said for pid in dropped), said[-2000:]


def test_embed_and_probe_refuse_to_replace_existing_outputs_without_overwrite(trained_run, tiny_cohort, tmp_path):
    _, run = trained_run
    before = tree_digest(run)
    checkpoint = run / "checkpoints" / "last.ckpt"
    result = neurocl_cli("embed", checkpoint, tiny_cohort, "--out", run / "embeddings.tsv")
    one_error(result, str(run / "embeddings.tsv"), "already exist", "--overwrite")
    result = neurocl_cli("probe", run / "embeddings.tsv", "--cohort", tiny_cohort, "--out", run, *PROBE_OPTIONS)
    one_error(result, str(run), "--overwrite")
    assert tree_digest(run) == before
    # With --overwrite, a copy of the run is replaced as asked.
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    result = neurocl_cli("embed", copy / "checkpoints" / "last.ckpt", tiny_cohort, "--out", copy / "embeddings.tsv",
                         "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]


def _run_copy(trained_run, tmp_path) -> tuple[Path, Path]:
    pipeline, run = trained_run
    return pipeline, Path(shutil.copytree(run, tmp_path / "run"))


def test_resume_on_a_truncated_checkpoint_is_one_line_naming_it(trained_run, tmp_path):
    pipeline, run = _run_copy(trained_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = neurocl_cli("run", pipeline, "--out", run, "--resume", timeout=600)
    one_error(result, str(last), "--resume")


def test_resume_on_a_hostile_checkpoint_runs_nothing_and_is_one_line(trained_run, tmp_path):
    import pickle

    pipeline, run = _run_copy(trained_run, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    result = neurocl_cli("run", pipeline, "--out", run, "--resume", timeout=600)
    one_error(result, str(last))
    assert not marker.exists()


def test_embed_with_a_checkpoint_whose_settings_do_not_match_its_weights_is_one_line(trained_run, tiny_cohort, tmp_path):
    import torch

    _, run = trained_run
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hyper = state["hyper_parameters"]
    # Wider encoder settings than the weights were trained with.
    for section in hyper.values():
        if isinstance(section, dict) and "width" in section:
            section["width"] = section["width"] * 2
    forged = tmp_path / "forged.ckpt"
    torch.save(state, forged)
    result = neurocl_cli("embed", forged, tiny_cohort, "--out", tmp_path / "embeddings.tsv")
    one_error(result, str(forged), "do not match")
    assert not (tmp_path / "embeddings.tsv").exists()


def _read_only(folder: Path) -> list[str] | None:
    """Command prefix making ``folder`` read-only for the command (a private read-only bind mount)."""
    if not _can_mount_tmpfs():
        return None
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"', "sh"]


def test_run_into_a_read_only_folder_or_onto_a_file_is_one_line_naming_it(tiny_cohort, tmp_path):
    pipeline = _pipeline(tmp_path / "p", tiny_cohort)
    (tmp_path / "a-file").write_text("keep me")
    result = neurocl_cli("run", pipeline, "--out", tmp_path / "a-file")
    one_error(result, str(tmp_path / "a-file"))
    assert (tmp_path / "a-file").read_text() == "keep me"
    folder = tmp_path / "ro"
    folder.mkdir()
    wrap = _read_only(folder)
    if wrap is None:
        pytest.skip("needs unprivileged user and mount namespaces (a read-only bind mount)")
    result = neurocl_cli("run", pipeline, "--out", folder / "run", wrap=wrap)
    one_error(result, str(folder), "Read-only")


def test_sigint_stops_the_run_with_130_the_message_and_the_resume_hint(tiny_cohort, tmp_path):
    pipeline = _pipeline(tmp_path, tiny_cohort, epochs=100)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "neurocl", "run", str(pipeline), "--out", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "interrupted" in last and f"--out {run} --resume" in last, last


def test_sigkill_mid_run_then_resume_finishes(tiny_cohort, tmp_path):
    pipeline = _pipeline(tmp_path, tiny_cohort, epochs=3)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "neurocl", "run", str(pipeline), "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 600
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    import torch

    torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # whole, never half-written
    result = neurocl_cli("run", pipeline, "--out", run, "--resume", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "embeddings.tsv").is_file() and (run / "probes.tsv").is_file()


def test_a_single_target_subject_is_warned_and_the_embeddings_checkpoint_named(tiny_cohort, tmp_path):
    cohort_dir = Path(shutil.copytree(tiny_cohort.parent, tmp_path / "cohort"))
    table = (cohort_dir / "participants.tsv").read_text().splitlines()
    header = table[0].split("\t")
    dx = header.index(next(name for name in header if name in ("diagnosis", "dx", "group")))
    targets = [i for i, line in enumerate(table[1:], start=1) if line.split("\t")[dx] not in ("control", "HC", "CN")]
    kept = [table[0]] + [line for i, line in enumerate(table[1:], start=1) if i not in targets[1:]]
    (cohort_dir / "participants.tsv").write_text("\n".join(kept) + "\n")
    # The ground truth keeps the subjects the cohort keeps (a truth row of no subject is refused).
    ids = {line.split("\t")[0] for line in kept[1:]}
    truth = (cohort_dir / "ground_truth.tsv").read_text().splitlines()
    (cohort_dir / "ground_truth.tsv").write_text("\n".join([truth[0]] + [line for line in truth[1:]
                                                                          if line.split("\t")[0] in ids]) + "\n")
    # Batches of 2 take one target subject per step (target_fraction 0.5): training can run.
    pipeline = _pipeline(tmp_path, cohort_dir / tiny_cohort.name, store=tmp_path / "store", batch_size=2)
    result = neurocl_cli("run", pipeline, "--out", tmp_path / "run",
                         "--set", "evaluation.probe.scope=in_sample_cv", timeout=900)  # 3 test subjects
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())
    assert "warning:" in said and "1 target subject" in said, said[-3000:]
    assert "embeddings come from" in said and "last.ckpt" in said, said[-3000:]


# ---- outputs are neurocl's own: never an input, never a file neurocl did not write, one process at a time


@pytest.fixture(scope="module")
def own_run(tiny_cohort, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(pipeline, run folder, cohort.yaml) of a finished one-epoch run on a copy of the tiny cohort that tests may edit
    (on copies of the run: each test copies both, since the run records the cohort's path)."""
    folder = tmp_path_factory.mktemp("own_run")
    cohort = Path(shutil.copytree(tiny_cohort.parent, folder / "cohort")) / tiny_cohort.name
    pipeline = _pipeline(folder, cohort)
    result = neurocl_cli("run", pipeline, "--out", folder / "run", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return pipeline, folder / "run", cohort


def test_embed_and_probe_never_write_into_the_cohort_even_with_overwrite(trained_run, tiny_cohort_copy, tmp_path):
    _, run = trained_run
    cohort_dir = tiny_cohort_copy.parent
    before = tree_digest(cohort_dir)
    checkpoint = run / "checkpoints" / "last.ckpt"
    result = neurocl_cli("embed", checkpoint, tiny_cohort_copy, "--out", cohort_dir / "participants.tsv", "--overwrite")
    one_error(result, str(cohort_dir / "participants.tsv"), "participants table", "never writes over its inputs")
    result = neurocl_cli("embed", checkpoint, tiny_cohort_copy, "--out", cohort_dir / "new.tsv")
    one_error(result, "new.tsv", "lies inside the cohort root")
    embeddings = _embeddings_copy(run, tmp_path / "in")
    result = neurocl_cli("probe", embeddings, "--cohort", tiny_cohort_copy, "--out", cohort_dir / "probes",
                         *PROBE_OPTIONS, "--other-cohort")
    one_error(result, "probes", "lies inside the cohort root")
    assert tree_digest(cohort_dir) == before
    assert neurocl_cli("validate", tiny_cohort_copy).returncode == 0


def test_run_never_takes_a_users_folder_for_a_run(tiny_cohort, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    pipeline = study / "config.yaml"
    pipeline.write_text("# my study, hand-written\n" + RUN_PIPELINE.format(cohort=tiny_cohort, epochs=1, store=tmp_path / "s",
                                                                          batch_size=4))
    (study / "splits.tsv").write_text("participant_id\tsplit\nsub-0001\ttrain\n")
    before = tree_digest(study)
    one_error(neurocl_cli("run", pipeline, "--out", study), str(study), "holds the pipeline")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("mine: true\n")
    (other / "splits.tsv").write_text("participant_id\tsplit\n")
    before_other = tree_digest(other)
    for flag in ([], ["--resume"], ["--auto-resume"]):
        one_error(neurocl_cli("run", pipeline, "--out", other, *flag), str(other), "not a neurocl run folder")
    assert tree_digest(study) == before and tree_digest(other) == before_other


def _own_copy(own_run, tmp_path) -> tuple[Path, Path, Path]:
    """Copies of the run and its cohort, the run's records pointing at the copied cohort."""
    pipeline, run, cohort = own_run
    cohort_copy = Path(shutil.copytree(cohort.parent, tmp_path / "cohort")) / cohort.name
    run_copy = Path(shutil.copytree(run, tmp_path / "run"))
    pipeline_copy = tmp_path / pipeline.name
    moves = {str(cohort): str(cohort_copy), str(run.parent / "store"): str(tmp_path / "store")}
    for path in (pipeline_copy, run_copy / "config.yaml", run_copy / "logs" / "prepared.json"):
        text = (pipeline if path == pipeline_copy else path).read_text()
        for old, new in moves.items():
            text = text.replace(old, new)
        path.write_text(text)
    return pipeline_copy, run_copy, cohort_copy


def test_resume_after_the_cohort_changed_is_refused_naming_the_rows(own_run, tmp_path):
    pipeline, run, cohort = _own_copy(own_run, tmp_path)
    table = cohort.parent / "participants.tsv"
    lines = table.read_text().splitlines()
    header = lines[0].split("\t")
    dx = header.index("diagnosis")
    swapped = []
    for number in range(1, len(lines)):
        cells = lines[number].split("\t")
        if len(swapped) < 2 and (not swapped or cells[dx] != swapped[0][1]):
            swapped.append((cells[0], cells[dx]))
    pair = {swapped[0][0]: swapped[1][1], swapped[1][0]: swapped[0][1]}
    edited = [lines[0]] + ["\t".join(cells[:dx] + [pair.get(cells[0], cells[dx])] + cells[dx + 1:])
                           for cells in (line.split("\t") for line in lines[1:])]
    table.write_text("\n".join(edited) + "\n")
    before = tree_digest(run)
    for flag in ("--resume", "--auto-resume"):
        line = one_error(neurocl_cli("run", pipeline, "--out", run, flag, timeout=600),
                         str(table), "changed since this run started", "2 rows differ", "start a new --out")
        assert all(pid in line for pid in pair), line
    assert tree_digest(run) == before


def test_resume_after_an_image_changed_is_refused_naming_it(own_run, tmp_path):
    pipeline, run, cohort = _own_copy(own_run, tmp_path)
    loaded, image = _first_image(cohort)
    picture = nib.load(image)
    nib.save(nib.Nifti1Image(np.asarray(picture.dataobj) * 1.5, picture.affine), image)
    line = one_error(neurocl_cli("run", pipeline, "--out", run, "--resume", timeout=600),
                     "images", "changed since this run started", "1 image differs",
                     loaded.table["participant_id"].iloc[0])
    assert "start a new --out" in line


def test_export_replaces_only_its_own_files(own_run, tmp_path):
    _, run, _ = own_run
    mine = tmp_path / "encoder.pt"
    mine.write_bytes(b"my own weights")
    one_error(neurocl_cli("export", run, "--out", mine), str(mine), "already exists", "--overwrite")
    one_error(neurocl_cli("export", run, "--out", mine, "--overwrite"), str(mine), "not written by neurocl")
    assert mine.read_bytes() == b"my own weights"
    ours = tmp_path / "ours.pt"
    assert neurocl_cli("export", run, "--out", ours).returncode == 0
    one_error(neurocl_cli("export", run, "--out", ours), "already exist", "--overwrite")
    assert neurocl_cli("export", run, "--out", ours, "--overwrite").returncode == 0
    ours.write_bytes(ours.read_bytes() + b"edited by hand")
    one_error(neurocl_cli("export", run, "--out", ours, "--overwrite"), "not written by neurocl (or changed since")
    one_error(neurocl_cli("export", run, "--out", run / "checkpoints" / "last.ckpt", "--overwrite"), "checkpoint")


def test_a_second_command_on_a_held_run_folder_is_refused_naming_the_holder(own_run, tmp_path):
    from neurocl.outputs import OutputFolder

    pipeline, run, _ = _own_copy(own_run, tmp_path)
    before = tree_digest(run)
    with OutputFolder(run).hold():
        line = one_error(neurocl_cli("run", pipeline, "--out", run, "--resume"), str(run), "is in use by",
                         f"neurocl process {os.getpid()}")
        assert "wait for it" in line
    assert tree_digest(run) == before


def test_a_holder_record_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    from neurocl.outputs import OutputFolder

    folder = OutputFolder(tmp_path / "out")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder.own.mkdir(parents=True)
    folder.owner.write_text(json.dumps({"pid": dead.pid, "command": "neurocl run x.yaml --out out"}))
    with folder.hold():
        assert json.loads(folder.owner.read_text())["pid"] == os.getpid()
    said = " ".join(capsys.readouterr().err.split())
    assert f"taking over from neurocl process {dead.pid}" in said and "neurocl run x.yaml" in said
    assert not folder.owner.exists()  # a finished command leaves no holder behind


def test_probe_of_embeddings_without_their_sidecar_is_refused(trained_run, tiny_cohort, tmp_path):
    _, run = trained_run
    embeddings = _embeddings_copy(run, tmp_path / "in")
    embeddings.with_suffix(".json").unlink()
    one_error(neurocl_cli("probe", embeddings, "--cohort", tiny_cohort, "--out", tmp_path / "out", *PROBE_OPTIONS),
              str(embeddings), "no sidecar", "--other-cohort")
    assert not (tmp_path / "out").exists()


def test_embed_of_a_2d_cohort_with_a_3d_checkpoint_is_one_line(trained_run, tmp_path):
    _, run = trained_run
    folder = tmp_path / "flat"
    folder.mkdir()
    lines = ["participant_id\tdx"]
    for index in range(4):
        lines.append(f"sub-{index:02d}\t{'HC' if index % 2 == 0 else 'PT'}")
        nib.save(nib.Nifti1Image(np.random.default_rng(index).random((8, 8), dtype=np.float32) + 1, np.eye(4)),
                 folder / f"sub-{index:02d}.nii.gz")
    (folder / "participants.tsv").write_text("\n".join(lines) + "\n")
    spec = _cohort_spec(folder)
    one_error(neurocl_cli("embed", run / "checkpoints" / "last.ckpt", spec, "--out", tmp_path / "e.tsv"),
              "trained on 3D images", "2D images")


@pytest.mark.parametrize("damage", ["truncated", "hostile", "not_torch"])
def test_checkpoint_load_errors_are_a_short_line_without_torchs_advice(trained_run, tiny_cohort, tmp_path, damage):
    _, run = trained_run
    checkpoint = tmp_path / "last.ckpt"
    content = (run / "checkpoints" / "last.ckpt").read_bytes()
    if damage == "truncated":
        checkpoint.write_bytes(content[: len(content) // 2])
    elif damage == "hostile":
        import torch

        torch.save({"payload": os.system}, checkpoint)
    else:
        checkpoint.write_bytes(b"hello")
    line = one_error(neurocl_cli("embed", checkpoint, tiny_cohort, "--out", tmp_path / "e.tsv"), str(checkpoint))
    assert "weights_only" not in line and len(line) < 300, line
    assert ("Python object" in line) == (damage == "hostile"), line


# ---- strict readers: every command checks what it reads (duplicate keys and columns, voxel types, ids, scaling)


def _validate_problems(spec: Path) -> dict[int, str]:
    """``neurocl validate`` must fail without a traceback; its problems by participants.tsv line (one line each)."""
    result = neurocl_cli("validate", spec)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    problems = {problem.row: problem.problem for problem in Cohort.from_yaml(spec).validate()}
    for problem in problems.values():
        assert "\n" not in problem and " ".join(problem.split()[:3]) in " ".join(result.stdout.split()), problem
    return problems


DUPLICATE_GROUP = "group:\n  column: dx\n  background: [PT]\n  target: [HC]\n"


@pytest.mark.parametrize("where", ["cohort", "pipeline", "set"])
def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, where):
    spec = small_cohort(tmp_path / "cohort")
    if where == "cohort":  # the second group: block swaps patients and controls
        spec.write_text(spec.read_text() + DUPLICATE_GROUP)
        target, fragments = spec, ["duplicate key 'group'", "lines 4 and 5"]
    else:
        target = _pipeline(tmp_path / "p", spec)
        if where == "pipeline":  # a second training: block would drop the first one's settings
            target.write_text(target.read_text() + "training: {epochs: 3}\n")
            lines = target.read_text().splitlines()
            first = next(number for number, line in enumerate(lines, start=1) if line.startswith("training:"))
            fragments = ["duplicate key 'training'", f"lines {first} and {len(lines)}"]
        else:
            fragments = ["--set 'training.lr=0.1'", "training.lr is already set by --set 'training.lr=0.01'"]
    before = tree_digest(tmp_path)
    extra = ["--set", "training.lr=0.01", "--set", "training.lr=0.1"] if where == "set" else []
    one_error(neurocl_cli("validate", target, *extra), *fragments, *([str(target)] if where != "set" else []))
    assert tree_digest(tmp_path) == before


def test_a_flow_mapping_repeating_a_key_in_a_setting_is_refused():
    from neurocl.errors import ConfigError
    from neurocl.settings import parse_settings

    with pytest.raises(ConfigError, match=r"--set 'training.x=\{a: 1, a: 2\}': duplicate key 'a' \(line 1, columns 2 and 8\)"):
        parse_settings(["training.x={a: 1, a: 2}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from neurocl.errors import ConfigError
    from neurocl.io import load_yaml

    path = tmp_path / "spec.yaml"
    path.write_text("base: &base {lr: 0.1, epochs: 3}\nrun: {<<: *base, epochs: 5}\n")
    assert load_yaml(path, ConfigError, "pipeline")["run"] == {"lr": 0.1, "epochs": 5}


def test_a_participants_column_named_twice_is_refused_naming_the_file_and_the_columns(tmp_path):
    spec = small_cohort(tmp_path / "cohort")
    table = tmp_path / "cohort" / "participants.tsv"
    # A second dx column with the groups swapped: the first one would be used without a word.
    lines = table.read_text().splitlines()
    swapped = {"dx": "dx", "HC": "PT", "PT": "HC"}
    table.write_text("\n".join(f"{line}\t{swapped[line.split(chr(9))[1]]}" for line in lines) + "\n")
    before = tree_digest(tmp_path)
    one_error(neurocl_cli("validate", spec), str(table), "'dx' in columns 2, 3")
    assert tree_digest(tmp_path) == before


def _fake_embeddings(spec: Path, path: Path, split: str = "train", columns=("salient_0", "salient_1")) -> Path:
    """An embeddings table of the cohort's rows with random values (made outside neurocl: no sidecar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cohort = Cohort.from_yaml(spec)
    rng = np.random.default_rng(0)
    header = ["participant_id", "split", "group", *columns]
    rows = ["\t".join([pid, split, "target" if target else "background", *(f"{v:.3f}" for v in rng.normal(size=len(columns)))])
            for pid, target in zip(cohort.table["participant_id"], cohort.is_target)]
    path.write_text("\n".join(["\t".join(header), *rows]) + "\n")
    return path


def test_an_embeddings_column_named_twice_is_refused_naming_the_file_and_the_column(tmp_path):
    spec = small_cohort(tmp_path / "cohort")
    embeddings = _fake_embeddings(spec, tmp_path / "in" / "embeddings.tsv", columns=("salient_0", "salient_1", "salient_0"))
    before = tree_digest(tmp_path)
    result = neurocl_cli("probe", embeddings, "--cohort", spec, "--out", tmp_path / "out", *PROBE_OPTIONS[2:],
                         "--other-cohort")
    one_error(result, str(embeddings), "embeddings table", "'salient_0' in columns 4, 6")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_held_out_probes_without_train_or_val_rows_are_one_error_pointing_to_in_sample_cv(tmp_path):
    spec = small_cohort(tmp_path / "cohort", n=12)
    embeddings = _fake_embeddings(spec, tmp_path / "in" / "embeddings.tsv", split="test")
    before = tree_digest(tmp_path)
    result = neurocl_cli("probe", embeddings, "--cohort", spec, "--out", tmp_path / "out", *PROBE_OPTIONS[2:],
                         "--other-cohort")
    one_error(result, "no 'train' or 'val' rows", "--scope in_sample_cv")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def _array_cohort(folder: Path, odd: np.ndarray, suffix: str = ".npy") -> Path:
    """A 4-image cohort (.npy with a grid, or NIfTI) whose sub-01 (line 3) holds ``odd``."""
    spec = small_cohort(folder, suffix=".nii")
    rng = np.random.default_rng(1)
    for index in range(4):
        (folder / f"sub-{index:02d}.nii").unlink()
        data = odd if index == 1 else rng.random((8, 8, 8), dtype=np.float32) + 1
        if suffix == ".npy":
            np.save(folder / f"sub-{index:02d}.npy", data, allow_pickle=True)
        else:
            nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"sub-{index:02d}{suffix}")
    text = spec.read_text().replace(".nii", suffix)
    spec.write_text(text + ("grid: {voxel_size: 1}\n" if suffix == ".npy" else ""))
    return spec


REAL = np.random.default_rng(2).random((8, 8, 8), dtype=np.float32) + 1
ODD_VOXELS = {
    "complex64": (REAL + 1j * REAL).astype(np.complex64),
    "object": REAL.astype(object),
    "<U32": REAL.astype(str),
    "datetime64[s]": np.zeros((8, 8, 8), "datetime64[s]"),
    "[('r', 'u1'), ('g', 'u1')]": np.zeros((8, 8, 8), [("r", "u1"), ("g", "u1")]),
}


@pytest.mark.parametrize("suffix, dtype", [*((".npy", name) for name in ODD_VOXELS), (".nii.gz", "complex64"),
                                           (".nii.gz", "[('R', 'u1'), ('G', 'u1'), ('B', 'u1')]")])
def test_voxels_that_are_not_real_numbers_are_refused_by_name(tmp_path, suffix, dtype):
    from neurocl.errors import CohortError
    from neurocl.images import read_voxels

    rgb = np.zeros((8, 8, 8), [("R", "u1"), ("G", "u1"), ("B", "u1")])
    odd = rgb if "'R'" in dtype else ODD_VOXELS[dtype]
    spec = _array_cohort(tmp_path / "cohort", odd, suffix)
    before = tree_digest(tmp_path)
    problems = _validate_problems(spec)
    assert list(problems) == [3], problems
    assert problems[3].startswith(f"sub-01{suffix} holds {dtype} voxels ("), problems[3]
    # The store reads voxels through the same reader: refused there too, never cast.
    with pytest.raises(CohortError, match=r"sub-01.* holds .* voxels"):
        read_voxels(tmp_path / "cohort" / f"sub-01{suffix}", "array" if suffix == ".npy" else "nifti")
    assert tree_digest(tmp_path) == before


def _scaled_int16(path: Path, slope: float, inter: float) -> Path:
    """An int16 NIfTI whose header's scl_slope / scl_inter are written as given (nibabel would reset them)."""
    nib.save(nib.Nifti1Image((REAL * 1000).astype(np.int16), np.eye(4)), path)
    with open(path, "r+b") as handle:
        handle.seek(112)  # scl_slope, scl_inter: two float32 at bytes 112-119 of a NIfTI-1 header
        handle.write(np.array([slope, inter], "<f4").tobytes())
    return path


def test_a_nifti_scaling_that_is_not_a_number_is_reported_by_validate(tmp_path):
    spec = small_cohort(tmp_path / "cohort", suffix=".nii", n=6)
    folder = tmp_path / "cohort"
    _scaled_int16(folder / "sub-01.nii", np.inf, 0.0)
    _scaled_int16(folder / "sub-02.nii", np.nan, 5.0)
    _scaled_int16(folder / "sub-03.nii", np.nan, np.nan)  # nibabel's own "no scaling": accepted
    _scaled_int16(folder / "sub-04.nii", 0.001, 0.0)  # a real scaling: accepted
    before = tree_digest(tmp_path)
    problems = _validate_problems(spec)
    assert problems == {
        3: "header of sub-01.nii has scl_slope = inf: not a finite scaling, so the voxels would be read unscaled; "
           "fix the header's scl_slope",
        4: "header of sub-02.nii has scl_slope = nan beside scl_inter = 5: the scaling would be ignored and the voxels "
           "read unscaled; fix the header's scl_slope",
    }
    assert tree_digest(tmp_path) == before


def test_an_image_that_is_a_folder_a_symlink_loop_or_a_broken_link_is_said_as_such(tmp_path):
    spec = small_cohort(tmp_path / "cohort", n=6)
    folder = tmp_path / "cohort"
    (folder / "sub-01.nii.gz").unlink()
    (folder / "sub-01.nii.gz").mkdir()
    (folder / "sub-02.nii.gz").unlink()
    (folder / "sub-02.nii.gz").symlink_to(folder / "loop.nii.gz")
    (folder / "loop.nii.gz").symlink_to(folder / "sub-02.nii.gz")
    (folder / "sub-03.nii.gz").unlink()
    (folder / "sub-03.nii.gz").symlink_to(folder / "moved.nii.gz")
    before = tree_digest(tmp_path)
    problems = _validate_problems(spec)
    assert problems == {
        3: f"image is a folder, not a file: {folder / 'sub-01.nii.gz'}",
        4: f"image is a symbolic link loop: {folder / 'sub-02.nii.gz'}",
        5: f"image is a broken symbolic link: {folder / 'sub-03.nii.gz'} -> {folder / 'moved.nii.gz'} (no such file)",
    }
    assert tree_digest(tmp_path) == before


def test_an_id_that_climbs_out_of_the_cohort_is_reported_and_its_image_never_opened(tmp_path, monkeypatch):
    from neurocl.cohort import table as table_module

    spec = small_cohort(tmp_path / "cohort")
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(tmp_path / "cohort" / "sub-00.nii.gz", outside)
    participants = tmp_path / "cohort" / "participants.tsv"
    participants.write_text(participants.read_text().replace("sub-01\t", "../outside\t").replace("sub-02\t", "sub 02\t"))
    before = tree_digest(tmp_path)
    problems = _validate_problems(spec)
    assert problems == {
        3: "participant_id '../outside' has characters a BIDS label cannot hold ('./'): ids name image files, "
           "so only letters, digits, '-' and '_' are allowed",
        4: "participant_id 'sub 02' has characters a BIDS label cannot hold (' '): ids name image files, "
           "so only letters, digits, '-' and '_' are allowed",
    }
    opened = []
    original = table_module._read_grid
    monkeypatch.setattr(table_module, "_read_grid", lambda path, spec: opened.append(Path(path)) or original(path, spec))
    Cohort.from_yaml(spec).validate()
    assert outside not in [path.resolve() for path in opened] and len(opened) == 2
    assert tree_digest(tmp_path) == before


def test_an_images_template_that_leaves_the_root_is_a_problem_of_every_row(tmp_path):
    spec = small_cohort(tmp_path / "cohort")
    spec.write_text(spec.read_text().replace('images: "', 'images: "../elsewhere/'))
    result = neurocl_cli("validate", spec, "--no-images")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    problems = Cohort.from_yaml(spec).validate(check_images=False)
    root = (tmp_path / "cohort").resolve()
    assert [(p.row, p.problem) for p in problems] == [
        (line, f"image path {tmp_path.resolve() / 'elsewhere' / f'sub-{line - 2:02d}.nii.gz'} is outside the cohort's "
               f"root {root} (from the images template): set root to a folder that holds every image")
        for line in range(2, 6)
    ]


def test_the_maps_stage_shows_its_progress_on_stderr_and_keeps_stdout_for_results(tiny_cohort, tiny_store, tmp_path,
                                                                                  capsys):
    import torch

    from neurocl.config import MapsConfig
    from neurocl.io import read_tsv
    from neurocl.maps import analyse_salient

    class MeanModel(torch.nn.Module):
        """A differentiable two-space network: the mean of its input, and its mean square."""

        def forward(self, x):
            voxels = x.flatten(1)
            mean = voxels.mean(1, keepdim=True)
            return {"salient_rep": torch.cat([mean, (voxels ** 2).mean(1, keepdim=True)], 1), "common_rep": mean}

    embeddings = read_tsv(_fake_embeddings(tiny_cohort, tmp_path / "embeddings.tsv"))
    config = MapsConfig(methods=["gradient_x_input"], k_min=2, k_max=2, n_bootstrap=0, n_regions=4, plots=False)
    analyse_salient(MeanModel(), tiny_store, Cohort.from_yaml(tiny_cohort), embeddings, tmp_path / "maps", config,
                    progress=True)
    captured = capsys.readouterr()
    for bar in ("gradient x input", "writing maps"):
        assert bar not in captured.out and bar in captured.err, (bar, captured.out[-2000:])


def test_every_progress_bar_is_drawn_on_the_progress_console():
    """rich's ``track`` and ``Progress`` draw on stdout unless told otherwise: each call in neurocl names its console."""
    import ast

    unbound = []
    for source in Path(PACKAGE_ROOT, "neurocl").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("track", "Progress"):
                if not any(keyword.arg == "console" for keyword in node.keywords):
                    unbound.append(f"{source.relative_to(PACKAGE_ROOT)}:{node.lineno}")
    assert unbound == []
