"""The maps stage of a run: maps, regions, subtypes and their evaluation, written to ``RUN/maps/``."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import track

from neurocl.cohort import Splits
from neurocl.config import MapsConfig
from neurocl.embed import join_embeddings, load_model
from neurocl.errors import ConfigError
from neurocl.io import save_nifti, write_json, write_tsv
from neurocl.logs import progress_console
from neurocl.maps.attribution import _eval_mode, _representation, gradient_x_input, occlusion
from neurocl.maps.evaluation import evaluate_subtypes, find_ground_truth, load_brain_mask, load_ground_truth
from neurocl.maps.regions import (
    _as_image,
    coarse_parcellation,
    display_map,
    plot_map,
    rank_regions,
    read_atlas_names,
    region_at,
)
from neurocl.maps.significance import paired_sign_flip_test, relevance_shares
from neurocl.maps.subtypes import SubtypeClustering, cluster_associations, seed_consensus
from neurocl.methods import MethodConfig, build_method
from neurocl.patches import SlidingWindow
from neurocl.rundir import MapsFolder, RunDir, load_run
from neurocl.synthdir import SynthDir
from neurocl.train import train


class _GroupMeans:
    """Running sums of per-subject maps for overlapping groups (all targets, each cluster, each true subtype)."""

    def __init__(self, spatial_shape: tuple[int, ...]):
        self.spatial_shape = spatial_shape
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, maps: torch.Tensor, memberships: Sequence[Sequence[str]]) -> None:
        """Add (B, C, *S) maps (channels summed: each channel's share adds up) to each subject's groups."""
        values = maps.detach().double().sum(1).cpu().numpy()
        for value, groups in zip(values, memberships):
            for group in groups:
                self.sums.setdefault(group, np.zeros(self.spatial_shape))
                self.sums[group] += value
                self.counts[group] = self.counts.get(group, 0) + 1

    def means(self) -> dict[str, np.ndarray]:
        return {group: total / self.counts[group] for group, total in self.sums.items()}


def _salient_columns(embeddings: pd.DataFrame) -> list[str]:
    columns = [column for column in embeddings.columns if column.startswith("salient_")]
    if not columns:
        raise ConfigError(
            "embeddings.tsv has no salient_* columns: maps and subtypes need a two-space method (e.g. SepCLR); "
            f"columns are {list(embeddings.columns)[:8]}"
        )
    return columns


def _embedding_rows(embeddings: pd.DataFrame, cohort, config: MapsConfig) -> pd.DataFrame:
    """The analysed rows of embeddings.tsv with their cohort row and group (:func:`neurocl.embed.join_embeddings`)."""
    if config.split != "all" and "split" not in embeddings.columns:
        raise ConfigError(f"maps.split = {config.split!r} but embeddings.tsv has no split column")
    rows = join_embeddings(embeddings, cohort, source="embeddings", strict=True)
    if config.split != "all":
        rows = rows[rows["split"].astype(str) == config.split]
    return rows.reset_index(drop=True)


def _json_ready(value):
    """``value`` with NaN and infinite floats as None, so the JSON files are strict JSON."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _group_volume_mean(store, indices: np.ndarray, batch_size: int) -> torch.Tensor:
    total = None
    for _, volumes in store.batches(indices, batch_size):
        part = volumes.double().sum(0)
        total = part if total is None else total + part
    return (total / len(indices)).float()


def _group_representation_mean(model, store, indices: np.ndarray, batch_size: int, space: str) -> torch.Tensor:
    reps = []
    with _eval_mode(model), torch.no_grad():
        for _, volumes in store.batches(indices, batch_size):
            reps.append(_representation(model, volumes, space).double())
    return torch.cat(reps).mean(0).float()


def _occlusion_subset(clusters: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Positions of the subjects occluded: at most ``limit`` per cluster, drawn with ``seed``."""
    if limit is None:
        return np.arange(len(clusters))
    rng = np.random.default_rng(seed)
    chosen = [
        np.sort(rng.choice(members, size=min(limit, len(members)), replace=False))
        for members in (np.flatnonzero(clusters == c) for c in np.unique(clusters))
    ]
    return np.sort(np.concatenate(chosen))


def _clustering(config: MapsConfig, n_bootstrap: int) -> SubtypeClustering:
    return SubtypeClustering(
        k_range=(config.k_min, config.k_max),
        method=config.cluster_method,
        criterion=config.criterion,
        n_bootstrap=n_bootstrap,
        random_state=config.seed,
        n_reference=config.n_reference,
        alpha=config.alpha,
    )


def _subtypes(targets: pd.DataFrame, salient: list[str], keys: list[str], cohort, config: MapsConfig, folder: MapsFolder):
    """Cluster the targets in salient space; write clusters.tsv and associations.tsv; return clusters (1..k) and summary."""
    clustering = _clustering(config, config.n_bootstrap).fit(targets[salient].to_numpy())
    clusters = clustering.labels_ + 1
    write_tsv(folder.clusters, targets[keys].assign(cluster=clusters))
    kinds = cohort.attribute_kinds
    attributes = cohort.table.loc[targets["cohort_row"].to_numpy(), list(kinds)].reset_index(drop=True)
    write_tsv(
        folder.associations,
        cluster_associations(clusters, attributes, kinds, continuous_test=config.continuous_test),
    )
    summary = {
        "space": "salient",
        "method": config.cluster_method,
        "criterion": config.criterion,
        "n_subjects": len(targets),
        "n_clusters": clustering.n_clusters_,
        "cluster_sizes": {str(c): int((clusters == c).sum()) for c in range(1, clustering.n_clusters_ + 1)},
        "scores": clustering.scores_.to_dict(orient="records"),
        "stability": clustering.stability_,
        "stability_ci": list(clustering.stability_ci_),
        "n_bootstrap": config.n_bootstrap,
        "one_cluster_test": clustering.null_test_,
    }
    return clusters, summary


def _true_subtypes(targets: pd.DataFrame, truth_table: pd.DataFrame, source: Path) -> np.ndarray:
    subtype = targets[["participant_id"]].merge(
        truth_table[["participant_id", "subtype"]].drop_duplicates("participant_id"), on="participant_id", how="left"
    )["subtype"]
    if subtype.isna().any():
        missing = targets["participant_id"][subtype.isna().to_numpy()].iloc[0]
        raise ConfigError(f"{source}: no subtype for {int(subtype.isna().sum())} target(s), first {missing}")
    return subtype.astype(int).to_numpy()


def _attribution_maps(model, store, subjects: np.ndarray, memberships: list[list[str]], clusters: np.ndarray,
                      baseline, center, config: MapsConfig, progress: bool, label: str = "",
                      shares: list | None = None) -> tuple[dict, dict]:
    """Per-subject attribution maps averaged over each group: {method: {group: (*S) mean map}}, and the
    number of subjects behind each mean: {method: {group: n}}. With ``shares`` (a list), each subject's
    gradient x input relevance shares inside the brain mask are appended to it (for the significance test)."""
    group_maps, counts = {}, {}
    brain = torch.as_tensor(np.asarray(store.mask, dtype=bool))
    if "gradient_x_input" in config.methods:
        means = _GroupMeans(store.spatial_shape)
        starts = range(0, len(subjects), config.batch_size)
        batches = store.batches(subjects, config.batch_size)
        for first, (_, volumes) in track(zip(starts, batches), f"gradient x input{label}", total=len(starts),
                                         disable=not progress, console=progress_console()):
            attribution = gradient_x_input(model, volumes, center=center, baseline=baseline)
            means.add(attribution, memberships[first : first + len(volumes)])
            if shares is not None:
                inside = attribution.sum(1)[:, brain.to(attribution.device)].double().cpu().numpy()
                shares.append(relevance_shares(inside).astype(np.float32))
        group_maps["gradient_x_input"], counts["gradient_x_input"] = means.means(), means.counts
    if "occlusion" in config.methods:
        means = _GroupMeans(store.spatial_shape)
        voxel = np.linalg.norm(np.asarray(store.affine)[:3, :3], axis=0)
        patch = [max(1, round(config.occlusion_patch_mm / size)) for size in voxel]
        stride = [max(1, round(config.occlusion_stride_mm / size)) for size in voxel]
        chosen = _occlusion_subset(clusters, config.occlusion_max_subjects, config.seed)
        volumes = store.batch(subjects[chosen])
        effect = occlusion(model, volumes, patch, stride, baseline=baseline, batch_size=config.batch_size,
                           progress=progress and not label)
        means.add(effect, [memberships[position] for position in chosen])
        group_maps["occlusion"], counts["occlusion"] = means.means(), means.counts
    return group_maps, counts


def _write_maps(group_maps: dict, counts: dict, groups: list[str], store, atlas: tuple, config: MapsConfig,
                folder: MapsFolder, progress: bool) -> pd.DataFrame:
    """NIfTI (masked to the brain, on the store grid), region table and PNG of each map; returns index.tsv's rows."""
    brain = np.asarray(store.mask, dtype=bool)
    atlas_img, names = atlas
    rows = []
    jobs = [(method, group) for method in group_maps for group in groups]
    for method, group in track(jobs, "writing maps", disable=not progress, console=progress_console()):
        name = f"{method}_{group}"
        files = folder.map_names(name)
        image = store.to_nifti((group_maps[method][group] * brain).astype(np.float32))
        save_nifti(image, folder.path / files["nifti"])
        regions = rank_regions(image, atlas_img, names, brain_mask=brain)
        write_tsv(folder.path / files["regions"], regions)
        n_subjects = counts[method][group]
        peak = display_map(image)["clusters"]
        peak_mm = peak[0]["peak_mm"] if peak else None
        peak_region = None if peak_mm is None else region_at(atlas_img, names, peak_mm)
        if config.plots:
            title = f"{method.replace('_', ' ')}, {group} (n={n_subjects})"
            if peak_region is not None:
                title += f": peak in {peak_region}"
            plot_map(image, folder.path / files["png"], title)
        rows.append(
            {
                "map": name,
                "method": method,
                "group": group,
                "n_subjects": n_subjects,
                "nifti": files["nifti"],
                "png": files["png"] if config.plots else None,
                "regions": files["regions"],
                "top_region": regions["name"].iloc[0] if len(regions) else None,
                "peak_mm": None if peak_mm is None else ", ".join(f"{v:+.0f}" for v in peak_mm),
                "peak_region": peak_region,
            }
        )
    return pd.DataFrame(rows)


def analyse_salient(
    model: torch.nn.Module,
    store,
    cohort,
    embeddings: pd.DataFrame,
    out_dir: str | Path,
    config: MapsConfig | None = None,
    ground_truth: str | Path | None = None,
    progress: bool = False,
    null_models: dict[str, torch.nn.Module] | None = None,
) -> dict:
    """Maps, regions, subtypes and (with ground truth) their evaluation, written to ``out_dir``.

    Target subjects are clustered in salient space (embeddings.tsv); each target's attribution
    maps are computed with the reference volume x₀ (``config.baseline``) and, for gradient x
    input, the centre c = mean salient representation of the background subjects; maps are
    averaged over all targets and over each cluster (and, with ground truth, each true subtype,
    for evaluation only).

    Parameters
    ----------
    model : torch.nn.Module
        Trained two-space network (``forward(x)`` returns ``salient_rep``), on the store's device.
    store : VolumeStore
        The run's preprocessed volumes.
    cohort : Cohort
        The run's cohort (groups and clinical attributes).
    embeddings : pd.DataFrame
        embeddings.tsv (``participant_id``, [``session_id``], ``group``, ``salient_*``, ...).
    out_dir : path
        The maps folder (created).
    config : MapsConfig, optional
    ground_truth : path, optional
        Synthetic cohort folder holding ``ground_truth.tsv`` and ``masks/``.
    progress : bool
        Show progress bars.
    null_models : dict, optional
        Name -> network of the same kind that learned nothing (e.g. ``"untrained"``: the same
        architecture at its initialisation). Each gets the same maps of the same subjects, with its
        own centre; evaluation.json scores them beside the trained network, and
        ``config.significance`` tests the trained maps against them voxel by voxel.

    Returns
    -------
    dict
        The content of subtypes.json, plus ``evaluation`` (evaluation.json) when ground truth is given.
    """
    config = config or MapsConfig()
    folder = MapsFolder(out_dir)
    atlas = _atlas(config, store)  # a bad atlas fails before any work
    rows = _embedding_rows(embeddings, cohort, config)
    keys = cohort.key_columns
    salient = _salient_columns(embeddings)
    store_index = store.rows_for(cohort)[rows["cohort_row"].to_numpy()]
    is_target = (rows["group"] == "target").to_numpy()
    if is_target.sum() <= config.k_max or (~is_target).sum() == 0:
        raise ConfigError(
            f"maps need more target subjects than k_max ({config.k_max}) and at least one background subject; "
            f"the analysed rows hold {int(is_target.sum())} target and {int((~is_target).sum())} background"
        )
    targets = rows[is_target].reset_index(drop=True)
    clusters, summary = _subtypes(targets, salient, keys, cohort, config, folder)

    truth = true_masks = None
    if ground_truth is not None:
        truth_table, true_masks = load_ground_truth(ground_truth, store)
        truth = _true_subtypes(targets, truth_table, SynthDir(ground_truth).ground_truth)
    memberships = [
        ["all", f"cluster-{c}"] + ([] if truth is None else [f"true-subtype-{truth[i]}"])
        for i, c in enumerate(clusters)
    ]
    background = store_index[~is_target]
    control_mean = _group_volume_mean(store, background, config.batch_size)
    baseline = control_mean if config.baseline == "background_mean" else None
    subjects = store_index[is_target]
    testing = config.significance != "none" and bool(null_models) and "gradient_x_input" in config.methods
    shares: dict[str, list] = {name: [] for name in ["trained", *(null_models or {})]} if testing else {}
    center = _group_representation_mean(model, store, background, config.batch_size, "salient")
    group_maps, counts = _attribution_maps(
        model, store, subjects, memberships, clusters, baseline, center, config, progress, shares=shares.get("trained")
    )
    null_maps = {}
    for name, null_model in (null_models or {}).items():
        null_center = _group_representation_mean(null_model, store, background, config.batch_size, "salient")
        null_maps[name], _ = _attribution_maps(null_model, store, subjects, memberships, clusters, baseline,
                                               null_center, config, progress, f" ({name} network)", shares.get(name))
    groups = ["all"] + [f"cluster-{c}" for c in range(1, summary["n_clusters"] + 1)]
    _remove_previous_maps(folder)
    write_tsv(folder.index, _write_maps(group_maps, counts, groups, store, atlas, config, folder, progress))
    if testing:
        write_tsv(folder.significance, _significance_maps(shares, store, config, folder))
    summary["null_references"] = sorted(null_maps)
    # Who the clusters and maps are computed on: held out only on the test split (the encoder never
    # trained on those subjects); otherwise in-sample, said so in the files and the report.
    scope = {"split": config.split, "scope": "held_out" if config.split == "test" else "in_sample"}
    summary.update(scope)
    write_json(folder.subtypes, _json_ready(summary))
    if truth is not None:
        evaluation = _evaluate(store, subjects, memberships, clusters, truth, true_masks, group_maps,
                               control_mean, ground_truth, config.batch_size, null_maps)
        evaluation = {**scope, **evaluation}
        write_json(folder.evaluation, evaluation)
        summary = {**summary, "evaluation": evaluation}
    else:
        _remove_listed(folder.path, [folder.evaluation.name])  # a previous run's, which no longer applies
    return summary


#: Significance is tested at this level when counting voxels (the NIfTI holds every voxel's p).
SIGNIFICANCE_LEVEL = 0.05


def _significance_maps(shares: dict[str, list], store, config: MapsConfig, folder: MapsFolder) -> pd.DataFrame:
    """−log10 p NIfTI of "the trained network puts more relevance here than the null network", one per null."""
    brain = np.asarray(store.mask, dtype=bool)
    trained = np.concatenate(shares["trained"])
    rows = []
    for name, parts in shares.items():
        if name == "trained":
            continue
        result = paired_sign_flip_test(trained, np.concatenate(parts), config.n_permutations, config.significance,
                                       seed=config.seed)
        volume = np.zeros(store.spatial_shape, dtype=np.float32)
        volume[brain] = -np.log10(result["p"])
        file = folder.significance_name("gradient_x_input", name)
        save_nifti(store.to_nifti(volume), folder.path / file)
        rows.append({
            "method": "gradient_x_input", "null": name, "group": "all", "statistic": "paired t of relevance shares",
            "correction": config.significance, "n_permutations": config.n_permutations,
            "n_subjects": result["n_subjects"], "n_brain_voxels": int(brain.sum()),
            "n_significant_voxels": int((result["p"] <= SIGNIFICANCE_LEVEL).sum()), "alpha": SIGNIFICANCE_LEVEL,
            "nifti": file,
        })
    return pd.DataFrame(rows)


def _evaluate(store, subjects: np.ndarray, memberships: list[list[str]], clusters: np.ndarray, truth: np.ndarray,
              true_masks: dict, group_maps: dict, control_mean: torch.Tensor, ground_truth, batch_size: int,
              null_maps: dict | None = None) -> dict:
    """evaluation.json: scores against the synthetic cohort's truth, with model-free reference maps."""
    # Reference maps: each group's mean volume minus the mean control volume, and the latter itself.
    volume_means = _GroupMeans(store.spatial_shape)
    for first, (_, volumes) in zip(range(0, len(subjects), batch_size), store.batches(subjects, batch_size)):
        volume_means.add(volumes.mean(1, keepdim=True), memberships[first : first + len(volumes)])
    control = control_mean.double().mean(0).cpu().numpy()
    differences = {group: mean - control for group, mean in volume_means.means().items()}
    # The store's automatic mask can reach far beyond the head (voxels > 0 in the cohort mean);
    # scoring inside the cohort's true brain mask keeps empty background from inflating AUCs.
    true_brain = load_brain_mask(ground_truth, store)
    domain = np.asarray(store.mask, dtype=bool)
    if true_brain is not None:
        domain = domain & true_brain
    evaluation = evaluate_subtypes(clusters, truth, true_masks, group_maps, domain, differences, control, null_maps)
    truth_files = SynthDir(ground_truth)
    evaluation["ground_truth"] = str(truth_files.ground_truth)
    evaluation["evaluation_mask"] = "store mask" + ("" if true_brain is None else f" ∩ {truth_files.brain_mask.name}")
    return _json_ready(evaluation)


def _remove_listed(out_dir: Path, names) -> None:
    """Delete the named files of ``out_dir``; plain file names only, so nothing outside it is touched."""
    for name in names:
        if isinstance(name, str) and "/" not in name and (out_dir / name).is_file():
            (out_dir / name).unlink()


def _remove_previous_maps(folder: MapsFolder) -> None:
    """Delete the map files a previous index.tsv or significance.tsv lists (e.g. a cluster that no longer
    exists), and significance.tsv itself, nothing else."""
    for table in (folder.index, folder.significance):
        if table.is_file():
            previous = pd.read_csv(table, sep="\t", keep_default_na=False)
            _remove_listed(folder.path, [name for column in ("nifti", "png", "regions") if column in previous
                                         for name in previous[column]])
    _remove_listed(folder.path, [folder.significance.name])


def _atlas(config: MapsConfig, store):
    """The atlas image and names used for region tables: the user's, or a coarse parcellation of the brain mask."""
    if config.atlas is not None:
        if not Path(config.atlas).is_file():
            raise ConfigError(f"atlas {config.atlas}: no such file")
        names_path = config.atlas_names or _names_beside(config.atlas)
        return _as_image(config.atlas), read_atlas_names(names_path)
    brain = np.asarray(store.mask, dtype=bool)
    labels, names = coarse_parcellation(brain, store.affine, n_regions=min(config.n_regions, int(brain.sum())), seed=config.seed)
    return store.to_nifti(labels), names


def _names_beside(atlas: Path) -> Path:
    """The names TSV beside an atlas: same name with ``.tsv`` for ``.nii``/``.nii.gz``."""
    atlas = Path(atlas)
    stem = atlas.name.removesuffix(".gz").removesuffix(".nii")
    path = atlas.with_name(stem + ".tsv")
    if not path.is_file():
        raise ConfigError(f"atlas {atlas}: no atlas names given and no {path.name} beside it (columns index, name)")
    return path


def run_maps(
    run_dir: str | Path,
    atlas: str | Path | None = None,
    atlas_names: str | Path | None = None,
    config: MapsConfig | None = None,
    ground_truth: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """``neurocl maps RUN``: attribution maps, regions, subtypes (and their evaluation) in ``RUN/maps/``.

    Parameters
    ----------
    run_dir : path
        A finished run (:func:`neurocl.rundir.load_run` reads its config, cohort, store, model and embeddings).
    atlas, atlas_names : path, optional
        Atlas labels NIfTI and names TSV (index, name); override the run's ``maps`` section.
    config : MapsConfig, optional
        Default: the run's ``maps`` section (:class:`MapsConfig` defaults when its config has none).
    ground_truth : path, optional
        Synthetic cohort folder; default: the cohort YAML's folder when it holds ``ground_truth.tsv``.
    progress : bool
        Show progress bars.

    Returns
    -------
    Path
        The maps folder.
    """
    run = load_run(run_dir)
    config = config or run.config.maps
    if atlas is not None or atlas_names is not None:
        config = MapsConfig.model_validate(
            {**config.model_dump(), "atlas": atlas or config.atlas, "atlas_names": atlas_names or config.atlas_names}
        )
    if ground_truth is None:
        ground_truth = find_ground_truth(run.cohort)
    out_dir = run.folder.maps.path
    # load_run gives the trained method (a Lightning module); its ``net`` returns the representations.
    # Occlusion runs thousands of forward passes per subject: on the GPU the model is on, with the store there too.
    patches = getattr(run.model, "patches", None)
    network = explained_network(run.model, patches, run.store.spatial_dims)
    run.store.to(next(network.parameters()).device)
    null_models = {}
    if "untrained" in config.null_references:
        untrained = untrained_method(run.model)
        null_models["untrained"] = explained_network(untrained, patches, run.store.spatial_dims).to(run.store.device)
    if "permuted_labels" in config.null_references:
        permuted = permuted_label_method(run, progress)
        null_models["permuted_labels"] = explained_network(permuted, patches, run.store.spatial_dims).to(run.store.device)
    analyse_salient(network, run.store, run.cohort, run.embeddings, out_dir, config, ground_truth, progress, null_models)
    subtypes_over_seeds(run, config)
    return out_dir


def explained_network(method, patches, spatial_dims: int) -> torch.nn.Module:
    """The network whose representation the maps explain: the one the run's embeddings come from.

    A method's ``net`` on the whole volume, or, for a model trained on patches that embeds by the
    sliding window (``views.patches.embed: sliding``), the mean of ``net`` over the same grid
    (:class:`neurocl.patches.SlidingWindow`), so maps, centres and embeddings agree.
    """
    network = getattr(method, "net", method)
    if patches is None or patches.embed != "sliding":
        return network
    return SlidingWindow(network, patches.sizes(spatial_dims), patches.grid_strides(spatial_dims))


def subtypes_over_seeds(run, config: MapsConfig) -> dict | None:
    """Subtypes found by each training seed's model (``training.seeds``), compared: ``maps/seed_consensus.json``.

    Each seed's target subjects are clustered in that seed's salient space exactly as the primary
    model's are (same k range, criterion and clustering seed; each seed picks its own k), and
    :func:`neurocl.maps.subtypes.seed_consensus` scores their co-clustering agreement. Returns the
    written summary, or None (and no file) for a single-seed run.
    """
    folder = run.folder
    seeds = run.config.training.run_seeds()
    if len(seeds) < 2:
        folder.maps.seed_consensus.unlink(missing_ok=True)
        return None
    labelings, subjects, n_clusters = [], None, {}
    for seed, seed_folder in folder.seed_runs(seeds).items():
        embeddings = seed_folder.read_table(seed_folder.embeddings)
        rows = _embedding_rows(embeddings, run.cohort, config)
        targets = rows[(rows["group"] == "target").to_numpy()].sort_values("cohort_row").reset_index(drop=True)
        if subjects is None:
            subjects = targets["cohort_row"].to_numpy()
        elif not np.array_equal(subjects, targets["cohort_row"].to_numpy()):
            raise ConfigError(f"{seed_folder.embeddings}: other target subjects than the primary seed's "
                              f"{folder.embeddings}; rerun the pipeline (neurocl run ... --resume)")
        clustering = _clustering(config, 0).fit(targets[_salient_columns(embeddings)].to_numpy())
        labelings.append(clustering.labels_)
        n_clusters[str(seed)] = clustering.n_clusters_
    summary = {"seeds": seeds, "space": "salient", "split": config.split, "n_subjects": int(len(subjects)),
               **seed_consensus(labelings), "n_clusters": n_clusters}
    write_json(folder.maps.seed_consensus, _json_ready(summary))
    return summary


def permuted_label_method(run, progress: bool = True):
    """The run's method trained again with the background/target labels permuted among the labelled subjects.

    Same configuration, seed, store and splits; only which subjects are called "target" is
    shuffled (group sizes kept), drawn from the training seed. Whatever this network's maps find
    is what training finds without the group contrast, e.g. anatomy or the (x − x₀) factor.
    It is trained into ``RUN/maps/null_permuted_labels/`` (a run folder of its own); a finished one
    made from the same permutation is reused.
    """
    cohort = copy.copy(run.cohort)
    cohort.table = run.cohort.table.copy()
    labelled = cohort.table["group"].notna().to_numpy()
    rng = np.random.default_rng(run.config.training.seed)
    cohort.table.loc[labelled, "group"] = rng.permutation(cohort.table.loc[labelled, "group"].to_numpy())
    maps = run.folder.maps
    network = RunDir(maps.permuted_labels_network)
    permutation = cohort.table[cohort.key_columns + ["group"]].astype(str)
    if (network.last_checkpoint.is_file() and maps.permuted_groups.is_file()
            and pd.read_csv(maps.permuted_groups, sep="\t", dtype=str).equals(permutation)):
        return load_model(network.last_checkpoint)
    if network.path.exists():
        shutil.rmtree(network.path)  # an unfinished or other permutation's network: ours alone, under maps/
    network.path.mkdir(parents=True)
    write_tsv(maps.permuted_groups, permutation)
    splits = Splits.load(run.folder.splits, cohort)
    method = MethodConfig.model_validate(run.model.hparams["method"])
    if progress:
        Console(stderr=True).print("[bold]maps[/] training the permuted-label null network")
    return train(run.config, method, network, cohort, run.store, splits, resume=False)


def untrained_method(module):
    """The method ``module`` was trained from, at its initialisation: same architecture, same seed, no training.

    Training seeds every generator with the run's seed (``seed_everything``) and then builds the
    method, so building it again from the checkpoint's hyper-parameters after the same seeding
    gives the weights training started from. The global generators are restored after.
    """

    hparams = module.hparams
    seed = int(hparams["seed"])
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            fresh = build_method(hparams["method"], hparams["encoder"], hparams["optim"], seed=seed)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return fresh.eval()
