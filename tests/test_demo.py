"""`neurocl demo`: its pipeline file, its cohort handling and the checks it prints (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from neurocl.errors import ConfigError
from neurocl.io import read_tsv, write_tsv
from neurocl.config import load_pipeline
from neurocl.demo import DEMO_COHORT, DEMO_PIPELINE, _demo_cohort, demo_summary
from neurocl.synth import SynthConfig
from neurocl.synthdir import SynthDir

REPO = Path(__file__).resolve().parents[1]


def test_demo_pipeline_is_valid_and_packaged_copy_is_identical(tmp_path):
    cohort = tmp_path / "cohort.yaml"
    config = load_pipeline(DEMO_PIPELINE, overrides={"cohort": str(cohort)})
    assert config.method.name == "sepclr"
    assert config.encoder.name == "small_cnn"
    assert config.training.accelerator == "cpu"
    assert config.maps.enabled
    assert config.cohort == cohort
    assert (REPO / "pipelines" / "demo.yaml").read_text() == DEMO_PIPELINE.read_text()


def test_demo_cohort_options_are_valid():
    config = SynthConfig(**DEMO_COHORT)
    assert config.resolution == 4.0 and config.n_subjects == 200


def _fake_cohort_folder(folder: Path, synth_options: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cohort.yaml").write_text("name: x\n")
    (folder / "dataset_description.json").write_text(json.dumps({"SynthConfig": synth_options}))


def test_demo_reuses_a_cohort_made_with_its_options(tmp_path):
    _fake_cohort_folder(tmp_path / "cohort", SynthConfig(**DEMO_COHORT).model_dump())
    assert _demo_cohort(tmp_path / "cohort") == tmp_path / "cohort" / "cohort.yaml"


def test_demo_reuses_a_cohort_made_before_new_synth_options_existed(tmp_path):
    """A dataset_description.json written before a SynthConfig field was added lacks it: its default fills it in."""
    recorded = SynthConfig(**DEMO_COHORT).model_dump()
    added_since = [name for name in SynthConfig.model_fields if name not in DEMO_COHORT]
    assert added_since
    for name in added_since:
        del recorded[name]
    _fake_cohort_folder(tmp_path / "cohort", recorded)
    assert _demo_cohort(tmp_path / "cohort") == tmp_path / "cohort" / "cohort.yaml"


def test_demo_refuses_a_cohort_recorded_with_an_unknown_option(tmp_path):
    _fake_cohort_folder(tmp_path / "cohort", {**SynthConfig(**DEMO_COHORT).model_dump(), "lesion_gain": 3.0})
    with pytest.raises(ConfigError, match="other options"):
        _demo_cohort(tmp_path / "cohort")


def test_demo_refuses_a_cohort_made_with_other_options(tmp_path):
    _fake_cohort_folder(tmp_path / "cohort", SynthConfig(n_subjects=32).model_dump())
    with pytest.raises(ConfigError, match="other options"):
        _demo_cohort(tmp_path / "cohort")


def test_demo_seeds_reach_the_pipeline_as_training_seeds(tmp_path, monkeypatch):
    """`neurocl demo --seeds 1,2` trains the demo pipeline with training.seeds [1, 2] (the run itself is not started here)."""
    import neurocl.demo as demo
    from typer.testing import CliRunner

    from neurocl.cli import app

    _fake_cohort_folder(tmp_path / "cohort", SynthConfig(**DEMO_COHORT).model_dump())
    seen = {}

    def stop(path, out, resume, overrides, settings):
        seen["config"] = load_pipeline(path, overrides, settings)
        raise ConfigError("stopped before training")

    monkeypatch.setattr(demo, "run_pipeline", stop)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--seeds", "1,2"])
    assert "stopped before training" in result.output
    assert seen["config"].training.seeds == [1, 2] and seen["config"].training.seed == 1


def test_demo_refuses_an_interrupted_cohort(tmp_path):
    (tmp_path / "cohort" / "sub-0001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="incomplete synthetic cohort"):
        _demo_cohort(tmp_path / "cohort")


def _probe_row(space, attribute, subset, metric, value, p_value, chance):
    return dict(space=space, attribute=attribute, subset=subset, scope="held_out", metric=metric, value=value,
                ci_low=value - 0.1, ci_high=value + 0.1, p_value=p_value, chance=chance, n=16, n_fit=16, note="")


@pytest.fixture
def fake_run(tiny_cohort, tmp_path):
    """A run directory whose salient space holds the true subtype and whose probes say the expected split."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_pipeline(DEMO_PIPELINE, overrides={"cohort": str(tiny_cohort)}).model_dump(mode="json")
    config["evaluation"]["probe"].update(n_permutations=200, n_bootstrap=20)  # held out: no refit per permutation
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    truth = SynthDir(tiny_cohort.parent).read_ground_truth()
    rng = np.random.default_rng(0)
    # Half the subjects are the run's test subjects (every other pair of the cohort table).
    split = np.where(np.arange(len(truth)) // 2 % 2 == 1, "test", "train")
    embeddings = truth[["participant_id"]].assign(split=split, group=truth["group"])
    for i in range(4):
        embeddings[f"common_{i}"] = rng.normal(size=len(truth))
        embeddings[f"salient_{i}"] = (truth["subtype"] == 1 + i % 2) * 3.0 + 0.1 * rng.normal(size=len(truth))
    write_tsv(run_dir / "embeddings.tsv", embeddings)
    rows = []
    for attribute, subset, metric, chance, good in [
        ("severity", "target", "r2", 0.0, "salient"),
        ("age", "all", "r2", 0.0, "common"),
        ("sex", "all", "balanced_accuracy", 0.5, "common"),
        ("site", "all", "balanced_accuracy", 0.5, "salient"),  # the wrong space: a missed target
    ]:
        for space in ("common", "salient"):
            high = space == good
            rows.append(_probe_row(space, attribute, subset, metric, chance + (0.4 if high else 0.01),
                                   0.01 if high else 0.6, chance))
    write_tsv(run_dir / "probes.tsv", pd.DataFrame(rows))
    (run_dir / "maps").mkdir()
    patients = truth[truth["group"] == "target"]
    write_tsv(run_dir / "maps" / "clusters.tsv", patients[["participant_id"]].assign(cluster=patients["subtype"]))
    (run_dir / "maps" / "evaluation.json").write_text(json.dumps({
        "ari": 0.7, "n_clusters": 2,
        "summary": {"gradient_x_input": {"mean_auc_subtype_map": 0.85, "mean_auc_cluster_map": 0.83}},
    }))
    return run_dir, tiny_cohort.parent


def test_demo_summary_checks_the_map_against_the_untrained_network(fake_run):
    run_dir, cohort_dir = fake_run
    evaluation_path = run_dir / "maps" / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text())
    evaluation["summary"]["gradient_x_input"].update(mean_auc_subtype_map_untrained=0.80, passes=False)
    evaluation_path.write_text(json.dumps(evaluation))
    reached = {target["check"]: target["reached"] for target in demo_summary(run_dir, cohort_dir)["targets"]}
    # AUC 0.85 clears the absolute line and still fails: an untrained network scores 0.80.
    assert reached["gradient_x_input map AUC >= 0.8 (in-sample, maps.split all)"]
    assert reached["gradient_x_input map AUC beats the untrained network's by >= 0.1 (in-sample, maps.split all)"] is False


def test_demo_summary_checks_each_target(fake_run):
    summary = demo_summary(*fake_run)
    outcome = {target["check"]: target["outcome"] for target in summary["targets"]}
    reached = {target["check"]: target["reached"] for target in summary["targets"]}
    # CI [0.30, 0.50] above chance, p 0.01: the 4th smallest of the table's 10 p-values, BH-adjusted 0.01 * 10 / 4.
    assert outcome["severity decodable from salient"] == "reached" and reached["age decodable from common"]
    assert summary["probes"]["severity"]["salient"]["p_adjusted"] == pytest.approx(0.025)
    # The subtype probe is perfect on the 8 test patients, but 8 labels allow p 0.03 at best, 5th of 10:
    # 0.03 * 10 / 5 = 0.06 adjusted: inconclusive, not reached. Its common space is exactly at chance (CI [0.5, 0.5]): not decodable.
    assert outcome["subtype decodable from salient"] == "inconclusive" and not reached["subtype decodable from salient"]
    assert outcome["subtype not decodable from common"] == "reached"
    # Scores of chance + 0.01 with CI [chance - 0.09, chance + 0.11]: the CI still reaches 0.1 above chance.
    assert outcome["severity not decodable from common"] == "inconclusive"
    assert outcome["sex not decodable from salient"] == "inconclusive"
    # The wrong space holds site: decodable where it should not be.
    assert outcome["site not decodable from salient"] == "missed" and not reached["site decodable from common"]
    n_test_patients = summary["maps"]["n_test_patients"]
    assert 4 <= n_test_patients < 16 and summary["maps"]["ari_test"] == 1.0
    assert reached["gradient_x_input map AUC >= 0.8 (in-sample, maps.split all)"]
    assert reached[f"cluster ARI >= 0.5 on the {n_test_patients} held-out test patients"]
    # The fake evaluation scored no null network: no relative check is claimed.
    assert not any("untrained" in check for check in reached)
    assert not summary["all_reached"]
    subtype = summary["probes"]["subtype"]
    assert subtype["salient"]["value"] > 0.9 and subtype["salient"]["metric"] == "balanced_accuracy"
    # The subtype probe scored the test patients only.
    assert subtype["salient"]["n"] == n_test_patients
    assert summary["scope"] == "held_out" and summary["n_test_subjects"] == 16
    assert summary["probes"]["severity"]["salient"]["subset"] == "target"
    assert summary["maps"]["ari"] == 0.7


def test_demo_summary_warns_when_the_test_split_holds_few_target_subjects(fake_run):
    summary = demo_summary(*fake_run)
    assert summary["n_test_targets"] == 8
    (warning,) = summary["warnings"]
    assert warning.startswith("only 8 target subjects in the test split") and "in_sample_cv" in warning
    assert "cross-fit" in warning


def test_demo_prints_verdicts_with_their_ci_and_adjusted_p_and_the_warning(fake_run, capsys):
    from neurocl.demo import _print_demo_summary

    summary = demo_summary(*fake_run)
    _print_demo_summary({**summary, "wall_time_s": 60.0})
    out = " ".join(capsys.readouterr().out.split())
    assert "0.40 [0.30, 0.50] p=0.010 adj. p=0.025: decodable" in out
    assert "*" not in out.replace("**", "")
    assert "Benjamini-Hochberg adjusted across the table's 10 distinct tests" in out
    assert "inconclusive subtype decodable from salient" in out
    assert "warning: only 8 target subjects in the test split" in out


# ---------------------------------------------------------------- what the docs say about the demo

_MINUTES = r"(\d+(?:\.\d+)?(?:–\d+(?:\.\d+)?)?) min"  # "2 min" or a range, "0.8–17.7 min"


def _demo_minutes(text: str) -> list[str]:
    import re

    return re.findall(_MINUTES, text)


def _time_paragraph() -> str:
    text = (REPO / "docs" / "getting-started.md").read_text()
    return text[text.index("**Time**"):].split("\n\n")[0]


def test_readme_and_demo_help_quote_the_typical_demo_time_first_then_the_measured_range():
    """The set-up line and ``neurocl demo --help`` lead with the typical time getting-started gives
    (2 free cores, not the fastest machine), then the range over every 2-core machine measured."""
    from neurocl.cli import demo

    measured = _demo_minutes(" ".join(_time_paragraph().split()))
    typical, ranges = measured[0], [m for m in measured if "–" in m]
    assert ranges and float(typical) > float(ranges[0].split("–")[0])  # the first figure is not the best
    readme = (REPO / "README.md").read_text()
    set_up = readme[readme.index("## Set-up"):readme.index("## What you get")]
    for where, text in (("README set-up", set_up), ("demo --help", demo.__doc__)):
        quoted = _demo_minutes(" ".join(text.split()))
        assert quoted and quoted[0] == typical, f"{where} quotes {quoted}, getting-started leads with {typical} min"
        assert ranges[0] in quoted, f"{where} lacks the measured range {ranges[0]} min"
        assert set(quoted) <= set(measured), where


def test_getting_started_lists_the_demo_embedding_columns():
    import re

    config = load_pipeline(DEMO_PIPELINE, overrides={"cohort": "cohort.yaml"})
    text = (REPO / "docs" / "getting-started.md").read_text()
    listed = re.search(r"embeddings\.tsv\s+participant_id, split, group, common_0\.\.(\d+), salient_0\.\.(\d+)", text)
    assert listed, "getting-started no longer lists embeddings.tsv's columns"
    assert (int(listed[1]), int(listed[2])) == (config.method.common_dim - 1, config.method.salient_dim - 1)


def test_demo_summary_sets_each_attribute_beside_the_best_linear_baseline(fake_run):
    run_dir, cohort_dir = fake_run
    embeddings = read_tsv(run_dir / "embeddings.tsv")
    lin2 = run_dir / "baselines" / "lin2"
    write_tsv(lin2 / "embeddings.tsv", embeddings)  # the same spaces: the same subtype probe
    rows = [_probe_row(space, "sex", "all", "balanced_accuracy", value, 0.01, 0.5)
            for space, value in (("common", 0.95), ("salient", 0.6))]
    write_tsv(lin2 / "probes.tsv", pd.DataFrame(rows))
    summary = demo_summary(run_dir, cohort_dir)
    assert summary["linear"]["sex"]["model"] == "lin2 common" and summary["linear"]["sex"]["value"] == 0.95
    assert summary["linear"]["subtype"]["value"] == summary["probes"]["subtype"]["salient"]["value"]
    reached = {target["check"]: target["reached"] for target in summary["targets"]}
    assert reached["sex: common >= best linear (lin2 common, 0.95) on the same test subjects"] is False  # 0.90 < 0.95
    assert any(check.startswith("subtype: salient >= best linear (lin2 salient") and hit for check, hit in reached.items())
