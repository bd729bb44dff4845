"""neurocl.io: the safe YAML loader, atomic writes (mode, failures) and preallocation."""

from __future__ import annotations

import errno
import os

import pytest

from neurocl import io
from neurocl.errors import ConfigError, OutputError


def _bomb(levels: int, fan_out: int = 9) -> str:
    lines = ['l0: &l0 ["lol"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * fan_out)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_load_yaml_reads_plain_data_and_small_aliases(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("base: &base {lr: 0.001, epochs: 3}\nrun: {<<: *base, epochs: 5}\nlist: [1, two, 3.5]\n")
    assert io.load_yaml(path, ConfigError, "pipeline") == {
        "base": {"lr": 0.001, "epochs": 3}, "run": {"lr": 0.001, "epochs": 5}, "list": [1, "two", 3.5]
    }


def test_load_yaml_refuses_expansion_beyond_the_bound_and_accepts_just_below(tmp_path):
    # 9^4 = 6,561 leaves (with every level expanded, under 10,000 nodes) load; 9^6 = 531,441 do not.
    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text(_bomb(5))
    large.write_text(_bomb(7))
    assert len(io.load_yaml(small, ConfigError, "pipeline")["l4"]) == 9
    with pytest.raises(ConfigError, match=r"large\.yaml: pipeline expands to more than 100,000 values"):
        io.load_yaml(large, ConfigError, "pipeline")


def test_load_yaml_refuses_python_objects_recursion_and_names_the_file(tmp_path):
    for text, message in [
        ("x: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("a: &a [1, *a]\n", "contains it"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        (": : :\n\t- [\n", "not valid YAML"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as caught:
            io.load_yaml(path, ConfigError, "pipeline")
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"missing\.yaml: pipeline not found"):
        io.load_yaml(tmp_path / "missing.yaml", ConfigError, "pipeline")


def test_atomic_write_onto_a_folder_names_the_destination(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match=r"out\.json: cannot write here"):
        io.write_json(tmp_path / "out.json", {"a": 1})
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]  # no temporary left


def test_preallocate_reserves_the_blocks_and_reports_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(b"")
    io.preallocate(path, 1 << 20)
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks * 512 >= 1 << 20

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "posix_fallocate", full)
    with pytest.raises(OutputError, match=r"big\.bin: disk full while writing"):
        io.preallocate(path, 2 << 20)


def test_current_umask_is_read_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert io.current_umask() == 0o027
        assert io.current_umask() == 0o027
    finally:
        os.umask(previous)
