"""Tests of ``neurocl bench separation-compare``: the paired difference and its standard error, pairing on
the (cohort, seed) both settings have, the separation targets' checks counted as ``target_checks`` counts them, errors
naming the file, and the command's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurocl.cli import app
from neurocl.errors import ConfigError
from neurocl.io import write_json
from neurocl.validation.separation import aggregate, summarise, target_checks
from neurocl.validation.separation_compare import (
    CHECK_KINDS,
    SD_CHECK_PREFIX,
    Setting,
    check_counts,
    compare_settings,
    comparison_markdown,
    load_setting,
    paired_difference,
    parse_setting,
)


def _row(attribute, role, values, chance=0.5):
    u = {rep: (value - chance) / (1 - chance) for rep, value in values.items()}
    return {"attribute": attribute, "role": role, "subset": "target", "kind": "categorical",
            "metric": "balanced_accuracy", "chance": chance, "values": values, "u": u, "n_test": 10}


def _run(cohort, seed, separation, pca=0.8, cpca=0.7, shared_pca=0.9):
    """A bench run record whose separation index is ``separation``: u_salient - u_common = separation
    for the specific attribute, u_common - u_salient = separation for the shared one."""
    level = 0.5 + separation / 2
    rows = [_row("subtype", "specific", {"common": 0.5, "salient": level, "pca": pca, "cpca": cpca}),
            _row("sex", "shared", {"common": level, "salient": 0.5, "pca": shared_pca, "cpca": shared_pca})]
    run = {"cohort": cohort, "seed": seed, "cohort_seed": 1000 + seed, "rows": rows, "summary": summarise(rows),
           "wall_s": 1.0, "cpu_s": 1.0}
    assert run["summary"]["separation"] == pytest.approx(separation)
    return run


def _write(path, runs):
    write_json(path, {"config": {}, "machine": {}, "wall_s": 1.0, "runs": runs, "table": aggregate(runs)})
    return path


REFERENCE = [_run("a", 0, 0.1), _run("a", 1, 0.2), _run("b", 0, 0.3), _run("c", 0, 0.9)]
CANDIDATE = [_run("a", 0, 0.3), _run("a", 1, 0.1), _run("b", 0, 0.6), _run("d", 5, -1.0)]


def test_the_paired_difference_is_the_mean_and_standard_error_over_the_pairs_both_settings_have():
    # Pairs (a,0), (a,1), (b,0): d = 0.2, -0.1, 0.3; (c,0) and (d,5) are in one setting only.
    paired = paired_difference(CANDIDATE, REFERENCE)
    d = [0.2, -0.1, 0.3]
    mean = sum(d) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    assert paired["pairs"] == [("a", 0), ("a", 1), ("b", 0)]
    assert paired["n"] == 3 and paired["better"] == 2
    assert paired["mean"] == pytest.approx(0.4 / 3) and paired["se"] == pytest.approx(se)
    assert paired_difference(CANDIDATE[:1], REFERENCE)["se"] is None  # one pair: no standard error


def test_rows_are_sorted_by_mean_separation_with_the_reference_first_in_the_arguments_marked():
    rows = compare_settings([Setting("shipped", [], REFERENCE), Setting("cand", [], CANDIDATE)])
    assert [row["label"] for row in rows] == ["shipped", "cand"]  # 1.5/4 = 0.375 > 0.0/4
    shipped, candidate = rows
    assert shipped["reference"] and not candidate["reference"]
    assert candidate["runs"] == 4 and candidate["separation"] == pytest.approx(0.0)
    assert shipped["separation"] == pytest.approx(0.375) and shipped["paired"]["mean"] == 0.0
    markdown = comparison_markdown(rows)
    assert "| shipped (reference) | 4 | +0.375 | reference |" in markdown
    assert "| cand | 4 | +0.000 | +0.133 ± 0.120 | 2 of 3 |" in markdown


def test_checks_are_counted_without_and_with_the_seed_to_seed_sd_checks():
    # One cohort, seeds 0 and 1: salient subtype 0.8 and 0.7 (mean 0.75 vs best(PCA 0.8, cPCA 0.7) + 0.1
    # = 0.9: gap 0.15), common subtype 0.5 (<= 0.6, met), salient sex 0.5 (met), common sex 0.75 vs
    # PCA 0.9 - 0.05 = 0.85 (gap 0.10). SDs: salient subtype and common sex 0.071 > 0.05 (missed), the
    # two constant ones 0 (met).
    runs = [_run("a", 0, 0.6), _run("a", 1, 0.4)]
    counts = check_counts(runs)
    assert (counts["met"], counts["total"]) == (2, 4)
    assert (counts["met_with_sd"], counts["total_with_sd"]) == (4, 8)
    assert counts["gaps"] == pytest.approx(dict(zip(CHECK_KINDS, [0.15, 0.0, 0.0, 0.10])))
    checks = [check for entry in aggregate(runs) for check in target_checks(entry)]
    assert counts["met_with_sd"] == sum(check["met"] for check in checks) and counts["total_with_sd"] == len(checks)
    # Every check target_checks makes is one of the kinds the table has a column for, or an SD check.
    assert all(check["check"] in CHECK_KINDS or check["check"].startswith(SD_CHECK_PREFIX) for check in checks)
    assert {check["check"] for check in checks} >= set(CHECK_KINDS)


def test_settings_pool_their_files_and_keep_only_the_seeds_asked_for(tmp_path):
    first = _write(tmp_path / "cand-0.json", [_run("a", 0, 0.3), _run("b", 0, 0.6)])
    second = _write(tmp_path / "cand-1.json", [_run("a", 1, 0.1)])
    setting = load_setting(f"cand={first},{second}")
    assert setting.label == "cand" and setting.files == [first, second] and len(setting.runs) == 3
    assert [run["seed"] for run in load_setting(f"cand={first},{second}", [1]).runs] == [1]
    with pytest.raises(ConfigError, match=r"setting cand .*cand-0.json.*no run of seeds 7 .*seeds 0, 1"):
        load_setting(f"cand={first},{second}", [7])
    with pytest.raises(ConfigError, match=r"cohort a seed 0 is in both .*cand-0.json and .*cand-0.json"):
        load_setting(f"cand={first},{first}")


def test_a_setting_without_pairs_in_common_with_the_reference_is_named_with_what_each_has(tmp_path):
    reference = _write(tmp_path / "old-10.json", [_run("a", 10, 0.1)])
    other = _write(tmp_path / "new-11.json", [_run("a", 11, 0.2), _run("b", 11, 0.2)])
    with pytest.raises(ConfigError) as error:
        compare_settings([load_setting(f"old={reference}"), load_setting(f"new={other}")])
    message = str(error.value)
    assert "new" in message and "new-11.json" in message and "old-10.json" in message
    assert "new has cohorts a, b; seeds 11" in message and "old has cohorts a; seeds 10" in message


def test_bad_arguments_and_files_are_errors_naming_them(tmp_path):
    for text in ("cand", "=a.json", "cand=", "cand=,"):
        with pytest.raises(ConfigError, match="expected LABEL=FILE"):
            parse_setting(text)
    assert parse_setting("x=a.json, b.json") == ("x", [Path("a.json"), Path("b.json")])
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=f"{missing}: no such file"):
        load_setting(f"x={missing}")
    broken = tmp_path / "broken.json"
    broken.write_text('{"runs": [')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 1"):
        load_setting(f"x={broken}")
    other_bench = tmp_path / "gmm.json"
    other_bench.write_text(json.dumps({"suite": "gmm", "results": []}))
    with pytest.raises(ConfigError, match=r"gmm.json: no list of 'runs' \(not a result of `neurocl bench separation"):
        load_setting(f"x={other_bench}")
    no_summary = tmp_path / "no-summary.json"
    run = _run("a", 0, 0.1)
    del run["summary"]["separation"]
    no_summary.write_text(json.dumps({"runs": [_run("a", 1, 0.1), run]}))
    with pytest.raises(ConfigError, match=r"no-summary.json: runs\[1\].summary: no field 'separation'"):
        load_setting(f"x={no_summary}")
    text_seed = tmp_path / "text-seed.json"
    text_seed.write_text(json.dumps({"runs": [_run("a", 0, 0.1) | {"seed": "0"}]}))
    with pytest.raises(ConfigError, match=r"text-seed.json: runs\[0\].seed: expected int"):
        load_setting(f"x={text_seed}")
    good = _write(tmp_path / "good.json", [_run("a", 0, 0.1)])
    with pytest.raises(ConfigError, match="label 'x' is given twice"):
        compare_settings([load_setting(f"x={good}"), load_setting(f"x={good}")])


def test_the_command_prints_every_setting_with_its_numbers_and_names_a_bad_file(tmp_path):
    old = [_write(tmp_path / f"old-{seed}.json", [run for run in REFERENCE if run["seed"] == seed]) for seed in (0, 1)]
    new = [_write(tmp_path / "cand-0.json", [CANDIDATE[0], CANDIDATE[2], CANDIDATE[3]]),
           _write(tmp_path / "cand-1.json", [CANDIDATE[1]])]
    args = ["bench", "separation-compare", "shipped=" + ",".join(map(str, old)), "cand=" + ",".join(map(str, new))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "shipped (reference)" in text and "cand" in text
    assert "+0.133 ± 0.120" in text and "2 of 3" in text and "+0.375" in text
    markdown = CliRunner().invoke(app, [*args, "--markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert "| cand | 4 | +0.000 | +0.133 ± 0.120 | 2 of 3 |" in markdown.output
    # --seeds 1: the one pair (a, 1): d = -0.1, no standard error.
    only_one = CliRunner().invoke(app, [*args, "--markdown", "--seeds", "1"])
    assert only_one.exit_code == 0, only_one.output
    assert "| cand | 1 | +0.100 | -0.100 | 0 of 1 |" in only_one.output
    failed = CliRunner().invoke(app, ["bench", "separation-compare", f"shipped={old[0]}", f"cand={tmp_path / 'no.json'}"])
    assert failed.exit_code == 1 and "no.json: no such file" in " ".join(failed.output.split())
