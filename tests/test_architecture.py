"""The shape of the code: no import cycle inside neurocl/, and one owner each of the run folder's and the
synthetic cohort folder's file names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from neurocl.rundir import MapsFolder, RunDir
from neurocl.synthdir import SynthDir

PACKAGE = Path(__file__).resolve().parents[1] / "neurocl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """neurocl modules imported by ``path`` at module level (function-level imports run later, so they cannot cycle)."""
    tree = ast.parse(path.read_text())
    found = set()
    nodes = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    nodes += [inner for node in tree.body if isinstance(node, ast.If) for inner in node.body  # not TYPE_CHECKING
              if isinstance(inner, (ast.Import, ast.ImportFrom)) and "TYPE_CHECKING" not in ast.unparse(node.test)]
    for node in nodes:
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        edges = _imports(path, modules)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        edges |= {parent for edge in edges for parent in _parents(edge) if parent in modules}
        graph[name] = edges - {name} - set(_parents(name))
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for edge in sorted(graph.get(node, ())):
            if state.get(edge) == 1:
                return stack[stack.index(edge):] + [edge]
            if edge not in state and (cycle := visit(edge)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_neurocl_import_graph_has_no_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _run_folder_names() -> set[str]:
    """Every file and folder name RunDir and MapsFolder spell (their paths' last parts)."""
    run, maps = RunDir("RUN"), MapsFolder("RUN/maps")
    names = {value.name for value in vars(run).values() if isinstance(value, Path) and value != run.path}
    names |= {value.name for value in vars(maps).values() if isinstance(value, Path)}
    return names | {"maps", "regions_"}


def test_run_folder_file_names_are_spelled_in_rundir_only():
    """A file name (``embeddings.tsv``) as a string of its own, or a folder name joined as a path (``/ "maps"``)."""
    names = _run_folder_names()
    assert {"config.yaml", "embeddings.tsv", "last.ckpt", "metrics.csv", "evaluation.json", "index.tsv"} <= names
    files = [name for name in names if "." in name]
    # "store" is also what a scratch store in a temporary folder is called (benchmarks, embed): not a run's.
    folders = [name for name in names if "." not in name and name != "store"]
    file_literal = re.compile(r"""["'](?:[^"'\n]*/)?(%s)["']""" % "|".join(map(re.escape, files)))
    folder_join = re.compile(r"""/\s*["'](%s)["']|["'](%s)["']\s*/""" % (("|".join(map(re.escape, folders)),) * 2))
    offenders = _literal_offenders("rundir.py", file_literal, folder_join)
    assert not offenders, "run-folder file names outside rundir.py:\n" + "\n".join(offenders)



def _literal_offenders(owner: str, file_literal: re.Pattern, folder_join: re.Pattern) -> list[str]:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == owner:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if file_literal.search(code) or folder_join.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    return offenders


def test_synthetic_cohort_truth_file_names_are_spelled_in_synthdir_only():
    """ground_truth.tsv, brain_mask.nii.gz, masks/regions.tsv and masks/subtype-K_mask.nii.gz: as a string of
    their own (or ending one, as in ``f"subtype-{k}_mask.nii.gz"``), or the masks folder joined as a path."""
    folder = SynthDir("COHORT")
    files = [folder.ground_truth.name, folder.brain_mask.name, folder.regions.name,
             folder.subtype_mask(1).name.split("1", 1)[1]]
    assert files == ["ground_truth.tsv", "brain_mask.nii.gz", "regions.tsv", "_mask.nii.gz"]
    file_literal = re.compile(r"""["'][^"'\n]*(%s)["']""" % "|".join(map(re.escape, files)))
    folder_join = re.compile(r"""/\s*["'](%s)["']|["'](%s)["']\s*/""" % ((folder.masks.name,) * 2))
    # The checker sees what it should and not prose about the files.
    assert file_literal.search('path / f"subtype-{k}_mask.nii.gz"') and folder_join.search('out / "masks" / x')
    assert not file_literal.search('help="ground_truth.tsv of a synthetic cohort."')
    offenders = _literal_offenders("synthdir.py", file_literal, folder_join)
    assert not offenders, "synthetic cohort file names outside synthdir.py:\n" + "\n".join(offenders)

# Imports inside functions, where deferring buys something. cli.py defers for a fast `--help`; these
# packages cost seconds to import and serve one path each, so the modules below import them where used.
DEFERRED_PACKAGES = {
    "monai": "seconds to import; only resampling (store) and the MONAI benchmarks use it",
    "torchio": "an optional benchmark dependency",
    "matplotlib": "figures only; the Agg backend is chosen before pyplot is imported",
    "nilearn": "seconds to import; plots, the template and atlas resampling only",
}
# Modules that still hold function-local imports of other packages, and how many: the count may only
# fall (move them to the top; an import cycle is fixed, not deferred). io and synth are imported by
# cli.py for `--help`, so they keep nibabel, torch, scipy and yaml out of its start-up.
STILL_LOCAL = {
    "neurocl.io": 6,
    "neurocl.synth": 10,
}


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import that is not at module level (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    module_level |= {id(inner) for node in tree.body if isinstance(node, ast.If) for inner in node.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in module_level:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, name.split(".")[0]) for name in names]
    return found


def test_imports_are_at_the_top_of_their_modules():
    counts, offenders = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "neurocl.cli":
            continue
        local = [(line, package) for line, package in _function_local_imports(path) if package not in DEFERRED_PACKAGES]
        if local:
            counts[name] = len(local)
            if len(local) > STILL_LOCAL.get(name, 0):
                offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: import {package}" for line, package in local]
    assert not offenders, ("imports inside functions (move them to the top of the module; see DEFERRED_PACKAGES "
                           "for the ones that may wait):\n" + "\n".join(offenders))
    assert all(counts.get(name, 0) <= limit for name, limit in STILL_LOCAL.items())


def test_the_local_import_finder_sees_imports_in_functions_and_methods(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nif True:\n    import sys\ndef f():\n    import json\nclass C:\n    def g(self):\n"
                      "        from numpy import linalg\n")
    assert _function_local_imports(module) == [(5, "json"), (8, "numpy")]
