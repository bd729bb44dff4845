"""The report renders every section from a run directory built from real stage outputs.

The run directory is made, not mocked: the tiny synthetic cohort is preprocessed into a real
VolumeStore; PCA and cPCA of its voxels initialise a linear two-space model (common = PCA axes,
salient = cPCA axes) that is trained for a few steps with the real SepCLR loss (logs/metrics.csv);
its outputs are the run's embeddings, probed with the real probes (probes.tsv, separation.json
with the cohort's ground truth); PCA and cPCA are probed as baselines; the maps stage's
``analyse_salient`` runs on the linear model (maps/).
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neurocl.baselines import ContrastivePCA, PCABaseline, masked_voxels
from neurocl.cohort import Cohort, make_splits
from neurocl.io import read_tsv, write_json, write_text, write_tsv
from neurocl.losses import sepclr_loss
from neurocl.maps import MapsConfig, analyse_salient
from neurocl.probe import ProbeConfig, probe_embeddings, separation
from neurocl.report import write_report
from neurocl.rundir import RunDir
from neurocl.synthdir import SynthDir

N_COMPONENTS = 3
PROBE_CONFIG = ProbeConfig(n_splits=3, inner_splits=2, n_permutations=9, n_bootstrap=50, n_jobs=1)
SECTIONS = ["Run", "Probes: which attribute lives in which space", "Separation", "Training curves",
            "Embedding views", "Baseline comparison", "Maps and subtypes"]


class LinearTwoSpace(torch.nn.Module):
    """Two linear projections of the masked voxels: common and salient representations."""

    def __init__(self, mask: np.ndarray, mean: np.ndarray, common_axes: np.ndarray, salient_axes: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mask", torch.from_numpy(mask))
        self.register_buffer("mean", torch.from_numpy(mean).float())
        self.common = torch.nn.Parameter(torch.from_numpy(common_axes.T.copy()).float())
        self.salient = torch.nn.Parameter(torch.from_numpy(salient_axes.T.copy()).float())

    def project(self, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        centred = voxels - self.mean
        return {"common_rep": centred @ self.common, "salient_rep": centred @ self.salient}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.project(x[:, 0][:, self.mask])


def _train(model: LinearTwoSpace, voxels: torch.Tensor, is_target: torch.Tensor, train, val, steps: int = 8) -> pd.DataFrame:
    """A few Adam steps of the SepCLR loss on two noisy views; the metrics.csv rows."""
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = []

    def terms(rows_index):
        views = voxels[rows_index][None] + 0.1 * torch.randn((2, len(rows_index), voxels.shape[1]), generator=generator)
        outputs = [model.project(view) for view in views]
        common = torch.stack([o["common_rep"] for o in outputs])
        salient = torch.stack([o["salient_rep"] for o in outputs])
        return sepclr_loss(common, salient, is_target[rows_index])

    for step in range(steps):
        total, parts = terms(train)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        rows.append({"step": step, "epoch": step // 4, "train/loss": total.item(), **{f"train/{k}": v.item() for k, v in parts.items()}})
        if step % 4 == 3:
            with torch.no_grad():
                total, parts = terms(val)
            rows.append({"step": step, "epoch": step // 4, "val/loss": total.item(), **{f"val/{k}": v.item() for k, v in parts.items()}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def run_dir(tiny_cohort, tiny_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("report_run")
    cohort, store = Cohort.from_yaml(tiny_cohort), tiny_store
    splits = make_splits(cohort, method="holdout", val_fraction=0.2, test_fraction=0.2, seed=0)
    splits.save(run / "splits.tsv")
    write_text(run / "config.yaml", yaml.safe_dump({"name": "report-test", "cohort": str(tiny_cohort),
                                                     "method": {"name": "sepclr"}, "encoder": {"name": "linear"}}))

    voxels = masked_voxels(store, store.rows_for(cohort))
    is_target = cohort.is_target.copy()
    train, val = splits.rows(cohort, "train"), splits.rows(cohort, "val")
    pca = PCABaseline(N_COMPONENTS).fit(voxels[train])
    cpca = ContrastivePCA(N_COMPONENTS, random_state=0).fit(voxels[train], is_target[train])
    model = LinearTwoSpace(store.mask, voxels[train].mean(0), pca.components_, cpca.components_)
    metrics = _train(model, torch.from_numpy(voxels).float(), torch.from_numpy(is_target), torch.from_numpy(train), torch.from_numpy(val))
    write_text(run / "logs" / "metrics.csv", metrics.to_csv(index=False))

    with torch.no_grad():
        outputs = model.project(torch.from_numpy(voxels).float())
    split = np.full(len(cohort), "test", dtype=object)
    split[train], split[val] = "train", "val"
    keys = cohort.keys().reset_index(drop=True).assign(split=split, group=cohort.table["group"].to_numpy())
    spaces = {f"{space}_{i}": outputs[f"{space}_rep"][:, i].numpy() for space in ("common", "salient") for i in range(N_COMPONENTS)}
    embeddings = pd.concat([keys, pd.DataFrame(spaces)], axis=1)
    write_tsv(run / "embeddings.tsv", embeddings)
    truth = SynthDir(tiny_cohort.parent).ground_truth
    probes = probe_embeddings(embeddings, cohort, attributes=["age", "sex", "severity", "group"], config=PROBE_CONFIG)
    write_tsv(run / "probes.tsv", probes)
    write_json(run / "separation.json", separation(embeddings, cohort, probes, ground_truth=truth, config=PROBE_CONFIG))

    for name, estimator in (("pca", pca), ("cpca", cpca)):
        coordinates = estimator.transform(voxels)
        table = pd.concat([keys, pd.DataFrame(coordinates, columns=[f"emb_{i}" for i in range(N_COMPONENTS)])], axis=1)
        write_tsv(run / "baselines" / name / "embeddings.tsv", table)
        write_tsv(run / "baselines" / name / "probes.tsv", probe_embeddings(table, cohort, attributes=["age", "group"], config=PROBE_CONFIG))

    # k_min 2: the report's cluster figures are under test here (on 16 patients the one-cluster test keeps k = 1).
    maps_config = MapsConfig(methods=["gradient_x_input"], k_min=2, k_max=3, n_bootstrap=5, n_regions=8)
    analyse_salient(model, store, cohort, embeddings, run / "maps", maps_config, ground_truth=tiny_cohort.parent)
    html_path, md_path = write_report(run)
    return run, html_path.read_text(), md_path.read_text()


def test_report_has_every_section_in_html_and_markdown(run_dir):
    _, html_text, md_text = run_dir
    for title in SECTIONS:
        assert f"<h2>{title}" in html_text
        assert f"## {title}" in md_text
    # Probes and separation say they were scored on the held-out test subjects, and how many.
    n_test = int((read_tsv(run_dir[0] / "embeddings.tsv")["split"] == "test").sum())
    for text in (html_text, md_text):
        assert f"## Probes: which attribute lives in which space (held-out test subjects (n={n_test}))" in md_text
        assert f"Separation (held-out test subjects (n={n_test}))" in text
        assert "Subtypes (in-sample: maps.split all" in text


def test_report_title_names_the_pipeline_and_the_cohort(run_dir, tiny_cohort):
    import yaml

    _, html_text, md_text = run_dir
    cohort_name = yaml.safe_load(tiny_cohort.read_text())["name"]
    title = f"neurocl report: pipeline 'report-test' on cohort '{cohort_name}'"
    assert f"<h1>{title}</h1>" in html_text.replace("&#x27;", "'")
    assert md_text.startswith(f"# {title}")


def test_report_html_is_self_contained_with_decodable_images(run_dir):
    _, html_text, _ = run_dir
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html_text)
    # probes x attributes, training curves, PCA + t-SNE views, baseline figures, map PNGs
    assert len(sources) >= 8
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:|#)', html_text)


def test_report_markdown_links_figures_that_exist(run_dir):
    run, _, md_text = run_dir
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text)
    assert any(link.startswith(f"{RunDir(run).report_figures.name}/") for link in links)
    assert any(link.startswith("maps/") for link in links)
    for link in links:
        assert (run / link).is_file(), link


def test_report_tables_quote_the_probe_numbers(run_dir):
    run, html_text, md_text = run_dir
    probes = read_tsv(run / "probes.tsv")
    row = probes[(probes["space"] == "salient") & (probes["attribute"] == "group") & (probes["metric"] == "roc_auc")].iloc[0]
    cell = f"{row['value']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] p={row['p_value']:.3f}"
    assert cell in md_text and cell in html_text
    baseline = read_tsv(run / "baselines" / "cpca" / "probes.tsv")
    age = baseline[(baseline["attribute"] == "age") & (baseline["subset"] == "all") & (baseline["metric"] == "r2")].iloc[0]
    assert f"{age['value']:.3f} [" in md_text


def test_report_colours_views_by_cohort_attributes_and_subtype(run_dir):
    _, _, md_text = run_dir
    caption = re.search(r"!\[PCA of each space, coloured by ([^\]]+)\]", md_text).group(1)
    assert caption.split(", ") == ["group", "diagnosis", "subtype", "age", "site"]


def test_report_of_a_probe_folder_has_only_its_sections_and_drops_stale_figures(run_dir, tmp_path):
    run, _, _ = run_dir
    for name in ("probes.tsv", "separation.json"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    stale = RunDir(tmp_path).report_figures / "from_an_earlier_report.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    _, md_path = write_report(tmp_path)
    md_text = md_path.read_text()
    assert "## Probes: which attribute lives in which space" in md_text and "## Separation" in md_text
    assert "## Training curves" not in md_text and "## Maps and subtypes" not in md_text
    assert not stale.exists() and (RunDir(tmp_path).report_figures / "probes.png").is_file()


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    from neurocl.errors import ConfigError

    with pytest.raises(ConfigError, match="holds none of"):
        write_report(tmp_path)


@pytest.mark.parametrize("method", ["PCA", "t-SNE"])
def test_collapsed_space_is_reported_not_blown_up_into_noise(method):
    from neurocl.report.figures import _projection

    rng = np.random.default_rng(0)
    collapsed = 0.7 + 1e-8 * rng.standard_normal((40, 4))
    assert _projection(collapsed, method) is None
    # Coincident subjects in a live space still project, and stay together.
    live = np.repeat(rng.standard_normal((10, 4)), 4, axis=0)
    coordinates = _projection(live, method)
    assert coordinates.shape == (40, 2) and np.isfinite(coordinates).all()
    assert np.allclose(coordinates[0], coordinates[1], atol=1e-3) and not np.allclose(coordinates[0], coordinates[4], atol=1e-3)


@pytest.mark.parametrize(("stability", "cautioned"), [(0.45, True), (0.59, True), (0.94, False)])
def test_report_cautions_about_subtypes_below_the_stability_line(tmp_path, stability, cautioned):
    write_json(tmp_path / "maps" / "subtypes.json", {"n_clusters": 2, "cluster_sizes": [30, 20],
                                                    "stability": stability, "stability_ci": [0.3, 1.0]})
    _, md_path = write_report(tmp_path)
    assert ("Caution: subtype stability" in md_path.read_text()) == cautioned


def test_the_maps_doc_quotes_the_stability_line_the_report_uses():
    from pathlib import Path

    from neurocl.maps.subtypes import STABILITY_CAUTION

    text = (Path(__file__).parents[1] / "docs" / "maps.md").read_text()
    assert f"below {STABILITY_CAUTION:g}, the report cautions" in " ".join(text.split())


def test_map_captions_name_the_peak_they_cut_through_and_the_top_region(run_dir):
    run, _, md_text = run_dir
    index = read_tsv(run / "maps" / "index.tsv")
    for row in index.itertuples():
        assert f"cut at the map's peak ({row.peak_mm}) mm, in {row.peak_region}" in md_text
        assert f"top region by mean relevance: {row.top_region}" in md_text


def test_in_sample_probes_are_labelled_in_sample(run_dir, tmp_path):
    """evaluation.probe.scope: in_sample_cv (and older runs without a scope column) are never shown as held out."""
    run, _, _ = run_dir
    probes = read_tsv(run / "probes.tsv")
    result = json.loads((run / "separation.json").read_text())
    result["background_collapse"]["scope"] = "in_sample_cv"
    for folder, table in (("labelled", probes.assign(scope="in_sample_cv")), ("older", probes.drop(columns="scope"))):
        write_tsv(tmp_path / folder / "probes.tsv", table)
        write_json(tmp_path / folder / "separation.json", {**result, "scope": "in_sample_cv"})
        _, md_path = write_report(tmp_path / folder)
        text = md_path.read_text()
        assert "## Probes: which attribute lives in which space (in-sample" in text
        assert "## Separation (in-sample" in text and "held-out test subjects" not in text


def _probe_rows(space_values: dict, attribute: str, metric: str = "balanced_accuracy", subset: str = "target", n: int = 12):
    """probes.tsv rows (held out) of one attribute: space -> primary value."""
    return pd.DataFrame([{"space": space, "attribute": attribute, "subset": subset, "scope": "held_out", "metric": metric,
                          "value": value, "ci_low": np.nan, "ci_high": np.nan, "p_value": 0.01, "n_permutations": 99,
                          "chance": 0.5, "n": n, "n_fit": 40, "note": ""} for space, value in space_values.items()])


def _clustering(spaces: dict) -> dict:
    return {"scope": "held_out", "ground_truth": {"r2": {}, "mcc": {}, "clustering": {"subtype": {
        "k": 2, "n": 12, "scope": "held_out", "spaces": {s: {"ari": a, "nmi": m} for s, (a, m) in spaces.items()}}}}}


def test_report_sets_every_headline_figure_beside_the_best_linear_one_with_ground_truth_and_ari(tmp_path):
    write_tsv(tmp_path / "probes.tsv", _probe_rows({"common": 0.52, "salient": 0.91}, "sex", subset="all"))
    write_tsv(tmp_path / "truth_probes.tsv", _probe_rows({"common": 0.55, "salient": 0.875}, "subtype"))
    write_json(tmp_path / "separation.json", _clustering({"common": (0.01, 0.02), "salient": (0.625, 0.5)}))
    lin2, pca = tmp_path / "baselines" / "lin2", tmp_path / "baselines" / "pca"
    write_tsv(lin2 / "probes.tsv", _probe_rows({"common": 0.97, "salient": 0.6}, "sex", subset="all"))
    write_tsv(lin2 / "truth_probes.tsv", _probe_rows({"common": 0.5, "salient": 0.75}, "subtype"))
    write_json(lin2 / "separation.json", _clustering({"common": (0.0, 0.01), "salient": (0.375, 0.25)}))
    write_tsv(pca / "probes.tsv", _probe_rows({"emb": 0.8}, "sex", subset="all"))
    write_tsv(pca / "truth_probes.tsv", _probe_rows({"emb": 0.8125}, "subtype"))
    write_json(pca / "separation.json", _clustering({"emb": (0.125, 0.2)}))
    text = write_report(tmp_path)[1].read_text()
    floor = text[text.index("## Against the linear floor"):]
    # Ground-truth rows, each figure beside the best linear one (and lin2's two spaces).
    assert "| sex | all | balanced_accuracy | 0.5 | 0.52 | 0.91 | 0.97 (lin2 common) | 0.97 | 0.6 | 12 |" in floor
    # Figures to 3 decimals, as the probe tables give them (0.8125 -> 0.812).
    assert "| subtype (truth) | target | balanced_accuracy | 0.5 | 0.55 | 0.875 | 0.812 (pca) | 0.5 | 0.75 | 12 |" in floor
    assert "| subtype | ARI | 2 | 12 | 0.01 | 0.625 | 0.375 (lin2 salient) | 0 | 0.375 |" in floor
    assert "| subtype | NMI | 2 | 12 | 0.02 | 0.5 | 0.25 (lin2 salient) | 0.01 | 0.25 |" in floor
    # The probe and separation sections show the ground truth too.
    assert "ground truth: subtype" in text and "Ground truth by clustering" in text


def _small_n_probes() -> pd.DataFrame:
    """probes.tsv of a run scored on 20 test patients: severity recorded for patients only ('all' = 'target')."""
    rows = []
    for subset in ("all", "target"):
        rows += [{"space": "salient", "attribute": "severity", "subset": subset, "scope": "held_out", "metric": "r2",
                  "value": 0.08, "ci_low": -0.62, "ci_high": 0.36, "p_value": 0.0495, "n_permutations": 199,
                  "chance": 0.0, "n": 20, "n_fit": 60, "note": ""},
                 {"space": "common", "attribute": "severity", "subset": subset, "scope": "held_out", "metric": "r2",
                  "value": -7.771e-05, "ci_low": -0.05, "ci_high": 0.04, "p_value": 0.6, "n_permutations": 99,
                  "chance": 0.0, "n": 20, "n_fit": 60, "note": ""}]
    for space, value, p in (("common", 0.62, 1 / 101), ("salient", 0.03, 0.7)):
        rows.append({"space": space, "attribute": "age", "subset": "all", "scope": "held_out", "metric": "r2",
                     "value": value, "ci_low": value - 0.2, "ci_high": value + 0.15, "p_value": p, "n_permutations": 100,
                     "chance": 0.0, "n": 40, "n_fit": 120, "note": ""})
    return pd.DataFrame(rows)


@pytest.fixture
def small_n_report(tmp_path):
    from neurocl.probe.separation import _decodability

    probes = _small_n_probes()
    write_tsv(tmp_path / "probes.tsv", probes)
    write_json(tmp_path / "separation.json", {
        "scope": "held_out", "n_test_subjects": 40, "attributes": _decodability(probes),
        "background_collapse": {"scope": "held_out", "n_background": 20, "n_target": 20, "norm_ratio": 0.3},
        "ground_truth": {"r2": {"all": {"salient": {"severity": 0.41}}}, "mcc": {}}})
    return write_report(tmp_path)[1].read_text()


def test_a_significant_score_whose_ci_spans_chance_is_reported_inconclusive(small_n_report):
    # R² 0.08 [-0.62, 0.36], p 0.0495: no longer "decodable"; its adjusted p is shown beside the raw one.
    # Four distinct tests (severity's 'all' rows repeat its 'target' rows): p 0.0495 is the 2nd smallest,
    # adjusted 0.0495 * 4 / 2; age's p 1/101 the smallest, 0.0099 * 4 / 1.
    cell = "0.080 [-0.62, 0.36] p=0.050 adj. p=0.099: inconclusive"
    assert cell in small_n_report
    assert "0.620 [0.42, 0.77] p=0.010 adj. p=0.040: decodable" in small_n_report
    separation = small_n_report[small_n_report.index("## Separation"):]
    assert f"| severity | target | r2 | 0 | {cell} | 0.000 [-0.05, 0.04] p=0.600 adj. p=0.700: not decodable | none |" \
        in separation
    assert "Benjamini-Hochberg adjusted across the table's 4 distinct tests" in small_n_report


def test_separation_figures_are_rounded_like_the_probe_tables(small_n_report):
    separation = small_n_report[small_n_report.index("## Separation"):]
    for raw in ("0.009901", "7.771e-05", "e-0"):
        assert raw not in separation


def test_an_all_subset_holding_only_the_target_subjects_is_shown_once(small_n_report):
    probes_part = small_n_report[:small_n_report.index("## Separation")]
    assert probes_part.count("| all | r2 | 0 | 0.080") == 0 and probes_part.count("| target | r2 | 0 | 0.080") == 1
    separation = small_n_report[small_n_report.index("## Separation"):]
    assert "| severity | all |" not in separation and "| severity | target |" in separation


def test_the_two_severity_figures_say_which_severity_they_are(small_n_report):
    assert "severity: probe of the participants table's 'severity' column" in small_n_report
    assert "R² of a ridge probe of each latent factor of ground_truth.tsv" in small_n_report
    assert "not the participants table's columns above" in small_n_report


def test_the_report_warns_when_the_test_split_holds_fewer_than_20_target_subjects(small_n_report, tmp_path):
    assert small_n_report.count("Warning: only 20 target") == 0  # 20 is enough
    probes = _small_n_probes()
    write_tsv(tmp_path / "few" / "probes.tsv", probes)
    write_json(tmp_path / "few" / "separation.json", {"scope": "held_out", "n_test_subjects": 30, "attributes": {},
                                                      "background_collapse": {"scope": "held_out", "n_target": 12}})
    text = " ".join(write_report(tmp_path / "few")[1].read_text().split())
    assert "Warning: only 12 target subjects in the test split (fewer than 20)" in text
    assert "in_sample_cv" in text and "cross-fit" in text
