"""Tests for neurocl.losses: each loss against a plain loop over its formula (DESIGN.md "Losses")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurocl import losses
from neurocl.errors import ConfigError, TrainingError

SHAPES = [(2, 4, 3), (3, 5, 8), (4, 3, 2)]  # (V, B, D)


def random_views(shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).float()


# ---------------------------------------------------------------- plain references (python loops, float64)


def unit(vector):
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def dot(u, w):
    return sum(a * b for a, b in zip(u, w))


def sq_dist(u, w):
    return sum((a - b) ** 2 for a, b in zip(u, w))


def flat_anchors(z):
    """[(sample index, vector as list)] for a = (v, i) in row-major order, plus the normalised vectors."""
    n_views, batch, _ = z.shape
    anchors = [(i, z[v, i].double().tolist()) for v in range(n_views) for i in range(batch)]
    return anchors, [unit(vector) for _, vector in anchors]


def loop_log_prob(normalised, a, b, temperature):
    """sim(a, b) − log Σ_{b' ≠ a} exp sim(a, b')."""
    others = [dot(normalised[a], normalised[c]) / temperature for c in range(len(normalised)) if c != a]
    return dot(normalised[a], normalised[b]) / temperature - math.log(sum(math.exp(value) for value in others))


def loop_info_nce(z, temperature):
    anchors, normalised = flat_anchors(z)
    terms = [
        -loop_log_prob(normalised, a, p, temperature)
        for a in range(len(anchors))
        for p in range(len(anchors))
        if p != a and anchors[p][0] == anchors[a][0]
    ]
    return sum(terms) / len(terms)


def loop_yaware(z, weights, temperature):
    """weights: B x B nested list w_ij."""
    anchors, normalised = flat_anchors(z)
    per_anchor = []
    for a, (i, _) in enumerate(anchors):
        others = [b for b in range(len(anchors)) if b != a]
        total = sum(weights[i][anchors[b][0]] for b in others)
        per_anchor.append(
            -sum(weights[i][anchors[b][0]] / total * loop_log_prob(normalised, a, b, temperature) for b in others)
        )
    return sum(per_anchor) / len(per_anchor)


def loop_rbf(y, sigma):
    y = np.asarray(y, dtype=float).reshape(len(y), -1)
    return [
        [math.exp(-sum((y[i, k] - y[j, k]) ** 2 for k in range(y.shape[1])) / (2 * sigma**2)) for j in range(len(y))]
        for i in range(len(y))
    ]


def loop_uniform(points, t):
    pairs = [math.exp(-t * sq_dist(points[i], points[j])) for i in range(len(points)) for j in range(i + 1, len(points))]
    return math.log(sum(pairs) / len(pairs))


def loop_decoupled(z, t, prior=None, lam=0.0):
    n_views, batch, _ = z.shape
    normalised = [[unit(z[v, i].double().tolist()) for i in range(batch)] for v in range(n_views)]
    centroids = [[sum(normalised[v][i][k] for v in range(n_views)) / n_views for k in range(z.shape[2])] for i in range(batch)]
    if prior is not None:
        kernel = np.asarray(prior, dtype=float)
        alpha = np.linalg.inv(kernel + lam * np.eye(batch)) @ kernel
        centroids = (alpha @ np.asarray(centroids)).tolist()
    pairs = [math.exp(-t * sq_dist(centroids[i], centroids[j])) for i in range(batch) for j in range(batch) if i != j]
    return math.log(sum(pairs) / len(pairs))


def loop_lp_info_nce(h1, h2, p, temperature):
    h1, h2 = h1.double().tolist(), h2.double().tolist()
    total = 0.0
    for i in range(len(h1)):
        dists = [sum(abs(a - b) ** p for a, b in zip(h1[i], h2[j])) for j in range(len(h2))]
        total += dists[i] / temperature + math.log(sum(math.exp(-d / temperature) for d in dists))
    return total / len(h1)


def loop_sepclr(c, s, is_target, tau, view_weighting="balanced", null_weighting="plain"):
    n_views, batch, _ = c.shape
    view_weight = 2.0 / n_views if view_weighting == "balanced" else 1.0
    null_scale = 1.0 / (2 * tau) if null_weighting == "reference" else 1.0
    target = [bool(flag) for flag in is_target]
    c_hat = [[unit(c[v, i].double().tolist()) for i in range(batch)] for v in range(n_views)]
    s_raw = [[s[v, i].double().tolist() for i in range(batch)] for v in range(n_views)]
    s_tilde = [[s_raw[v][i] if target[i] else [0.0] * s.shape[2] for i in range(batch)] for v in range(n_views)]

    def kernel(u, w):
        return math.exp(-sq_dist(u, w) / (2 * tau))

    def align(x, y):
        return sum(sq_dist(a, b) for a, b in zip(x, y)) / len(x) / (2 * tau)

    def unif(x):
        pairs = [kernel(x[i], x[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
        return math.log(sum(pairs) / len(pairs))

    def jem(cs, ss):
        rows = [math.log(sum(kernel(cs[i], cs[j]) * kernel(ss[i], ss[j]) for j in range(len(cs))) / len(cs)) for i in range(len(cs))]
        return sum(rows) / len(rows)

    def targets_of(rows):
        return [row for row, flag in zip(rows, target) if flag]

    view_pairs = [(v, w) for v in range(n_views) for w in range(v + 1, n_views)]
    common = sum(align(c_hat[v], c_hat[w]) for v, w in view_pairs) / len(view_pairs) + view_weight * sum(
        unif(c_hat[v]) for v in range(n_views)
    )
    salient = sum(align(targets_of(s_raw[v]), targets_of(s_raw[w])) for v, w in view_pairs) / len(view_pairs) + (
        view_weight * sum(unif(s_tilde[v]) for v in range(n_views))
    )
    background = [i for i in range(batch) if not target[i]]
    null = null_scale * sum(
        sum(sum(value**2 for value in s_raw[v][i]) for i in background) / len(background) for v in range(n_views)
    ) / n_views
    mi = sum(jem(c_hat[v], s_tilde[v]) for v in range(n_views)) / n_views
    return {"common": common, "salient": salient, "null": null, "mi": mi}


def loop_attribute_kernel(rows, kinds, sigmas):
    """Product kernel over attributes; a missing value gives factor 1 (as neurocl.kernels)."""
    n = len(rows)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            for a, kind in enumerate(kinds):
                u, w = rows[i][a], rows[j][a]
                if math.isnan(u) or math.isnan(w):
                    continue
                out[i][j] *= float(u == w) if kind == "categorical" else math.exp(-((u - w) ** 2) / (2 * sigmas[a] ** 2))
    return out


def loop_hsic(l, k):
    """tr(L H K H) / (n − 1)² with H = I − 11ᵀ/n, summed index by index."""
    n = len(l)
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            for m in range(n):
                for q in range(n):
                    total += l[i][j] * h[j][m] * k[m][q] * h[q][i]
    return total / (n - 1) ** 2


def loop_nhsic(l, k):
    return loop_hsic(l, k) / math.sqrt(loop_hsic(l, l) * loop_hsic(k, k))


def loop_covariate_independence(s, y, kinds, sigmas, tau):
    """mean over views and usable covariates of nHSIC(L over present rows, K over present rows)."""
    y = y.double().tolist()
    values = []
    for a, kind in enumerate(kinds):
        rows = [i for i in range(len(y)) if not math.isnan(y[i][a])]
        present = [y[i][a] for i in rows]
        if len(rows) < 3 or len(set(present)) == 1:
            continue
        k = loop_attribute_kernel([[value] for value in present], [kind], [sigmas[a]])
        for v in range(s.shape[0]):
            points = [s[v, i].double().tolist() for i in rows]
            l = [[math.exp(-sq_dist(p, q) / (2 * tau)) for q in points] for p in points]
            values.append(loop_nhsic(l, k))
    return sum(values) / len(values)


# ---------------------------------------------------------------- agreement with the loops


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_equals_loop_over_anchor_positive_pairs(shape, temperature):
    z = random_views(shape, seed=sum(shape))
    assert losses.info_nce(z, temperature).item() == pytest.approx(loop_info_nce(z, temperature), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_yaware_info_nce_equals_loop_with_row_normalised_weights(shape):
    z = random_views(shape, seed=10 + sum(shape))
    y = random_views((shape[1], 2), seed=20 + sum(shape))
    expected = loop_yaware(z, loop_rbf(y, sigma=0.8), temperature=0.2)
    assert losses.yaware_info_nce(z, y, sigma=0.8, temperature=0.2).item() == pytest.approx(expected, rel=1e-5)


def test_yaware_normalises_weights_over_each_anchor_not_over_columns():
    z = random_views((2, 5, 3), seed=25)
    y = torch.tensor([0.0, 0.5, 1.0, 1.5, 6.0])  # a chain: neighbours with different kernel row sums
    weights = loop_rbf(y, sigma=1.0)
    anchors, normalised = flat_anchors(z)
    n = len(anchors)
    # The public reference code's normalisation: over the anchors a' of each column b.
    column_sums = [sum(weights[anchors[a][0]][anchors[b][0]] for a in range(n) if a != b) for b in range(n)]
    column_normalised = sum(
        -weights[anchors[a][0]][anchors[b][0]] / column_sums[b] * loop_log_prob(normalised, a, b, 0.1)
        for a in range(n)
        for b in range(n)
        if b != a
    ) / n
    loss = losses.yaware_info_nce(z, y, sigma=1.0).item()
    assert loss == pytest.approx(loop_yaware(z, weights, temperature=0.1), rel=1e-5)
    assert abs(loss - column_normalised) > 0.05  # 7.62 vs 7.72: the loop test separates the two


def test_yaware_info_nce_accepts_a_precomputed_kernel():
    z = random_views((2, 6, 4), seed=3)
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2, (6,), generator=generator)
    kernel = (codes[:, None] == codes[None, :]).float()
    expected = loop_yaware(z, kernel.tolist(), temperature=0.1)
    assert losses.yaware_info_nce(z, kernel=kernel).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("batch", "dim"), [(2, 1), (7, 3), (12, 16)])
@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_align_and_uniform_losses_equal_loops(batch, dim, alpha):
    x, y = random_views((batch, dim), seed=batch + dim), random_views((batch, dim), seed=1 + batch + dim)
    expected_align = sum(math.sqrt(sq_dist(a, b)) ** alpha for a, b in zip(x.tolist(), y.tolist())) / batch
    assert losses.align_loss(x, y, alpha=alpha).item() == pytest.approx(expected_align, rel=1e-5)
    assert losses.uniform_loss(x, t=1.5).item() == pytest.approx(loop_uniform(x.double().tolist(), 1.5), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_decoupled_uniformity_equals_loop_on_view_centroids(shape):
    z = random_views(shape, seed=30 + sum(shape))
    assert losses.decoupled_uniformity(z, t=2.0).item() == pytest.approx(loop_decoupled(z, t=2.0), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_decoupled_uniformity_with_prior_equals_loop_on_smoothed_centroids(shape):
    z = random_views(shape, seed=40 + sum(shape))
    y = random_views((shape[1],), seed=50 + sum(shape))
    expected = loop_decoupled(z, t=2.0, prior=loop_rbf(y, sigma=1.0), lam=0.1)
    assert losses.decoupled_uniformity(z, y=y, sigma=1.0, lam=0.1).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize(("batch", "dim"), [(3, 4), (6, 2), (5, 10)])
def test_lp_info_nce_equals_loop(p, batch, dim):
    h1, h2 = random_views((batch, dim), seed=p + batch), random_views((batch, dim), seed=9 + p + batch)
    expected = loop_lp_info_nce(h1, h2, p, temperature=0.7)
    assert losses.lp_info_nce(h1, h2, p=p, temperature=0.7).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("shape", "salient_dim", "tau"), [((2, 6, 3), 3, 0.5), ((3, 5, 4), 2, 0.5), ((4, 7, 8), 5, 1.3)]
)
def test_sepclr_terms_and_total_equal_loops(shape, salient_dim, tau):
    c = random_views(shape, seed=60 + sum(shape))
    s = random_views((*shape[:2], salient_dim), seed=70 + sum(shape), scale=0.7)
    is_target = torch.tensor([True, False, True, False, True, False, False][: shape[1]])
    total, terms = losses.sepclr_loss(c, s, is_target, tau=tau, beta_salient=2.0, beta_null=3.0, lam_mi=4.0)
    expected = loop_sepclr(c, s, is_target, tau=tau)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    expected_total = expected["common"] + 2.0 * expected["salient"] + 3.0 * expected["null"] + 4.0 * expected["mi"]
    assert total.item() == pytest.approx(expected_total, rel=1e-5)


def loop_kernel_mi(c, s, is_target, tau):
    """The kernel MI estimate of the target rows, view by view, with plain Python loops (j != i)."""
    c_hat = F.normalize(c.double(), dim=-1)
    rows = [i for i in range(c.shape[1]) if is_target[i]]
    values = []
    for v in range(c.shape[0]):
        per_row = []
        for i in rows:
            others = [j for j in rows if j != i]
            kc = [math.exp(-float((c_hat[v, i] - c_hat[v, j]).square().sum()) / (2 * tau)) for j in others]
            ks = [math.exp(-float((s[v, i] - s[v, j]).double().square().sum()) / (2 * tau)) for j in others]
            joint = sum(a * b for a, b in zip(kc, ks)) / len(others)
            per_row.append(math.log(joint / ((sum(kc) / len(others)) * (sum(ks) / len(others)))))
        values.append(sum(per_row) / len(per_row))
    return sum(values) / len(values)


def test_kernel_mi_equals_loop_and_other_terms_are_unchanged():
    c = random_views((3, 9, 4), seed=81)
    s = random_views((3, 9, 3), seed=82, scale=0.7)
    is_target = torch.tensor([True, False, True, True, False, True, False, True, False])
    _, jem_terms = losses.sepclr_loss(c, s, is_target, tau=0.7)
    total, terms = losses.sepclr_loss(c, s, is_target, tau=0.7, lam_mi=4.0, mi_estimator="kernel_mi")
    assert terms["mi"].item() == pytest.approx(loop_kernel_mi(c, s, is_target, 0.7), rel=1e-5, abs=1e-7)
    for name in ("common", "salient", "null"):
        assert terms[name].item() == pytest.approx(jem_terms[name].item(), rel=1e-6)
    expected_total = terms["common"] + terms["salient"] + 10.0 * terms["null"] + 4.0 * terms["mi"]
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)


def test_kernel_mi_is_near_zero_for_independent_spaces_and_positive_for_dependent_ones():
    generator = torch.Generator().manual_seed(5)
    c = torch.randn(2, 256, 8, generator=generator)
    is_target = torch.arange(256) % 2 == 0
    independent = torch.randn(2, 256, 4, generator=generator)
    dependent = F.normalize(c, dim=-1)[..., :4] * 2
    near_zero = losses.sepclr_loss(c, independent, is_target, mi_estimator="kernel_mi")[1]["mi"].item()
    positive = losses.sepclr_loss(c, dependent, is_target, mi_estimator="kernel_mi")[1]["mi"].item()
    assert abs(near_zero) < 0.05 and positive > 0.3, (near_zero, positive)


def test_gradient_shares_are_each_terms_gradient_norm_over_their_sum():
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(5, 2, requires_grad=True)
    terms = {"a": 3.0 * x.square().sum(), "b": (x.sum() + 2.0 * y.sum()), "c": y.square().sum() * 0}
    shares = losses.gradient_shares(terms, [x, y])
    norms = {"a": float((6.0 * x).norm()), "b": math.sqrt(15 * 1.0 + 10 * 4.0), "c": 0.0}
    total = sum(norms.values())
    for name in terms:
        assert shares[name].item() == pytest.approx(norms[name] / total, rel=1e-5)
    assert sum(share.item() for share in shares.values()) == pytest.approx(1.0)
    assert x.grad is None  # the shares leave the training gradient alone


COVARIATE_KINDS = ["continuous", "categorical", "continuous"]
COVARIATE_SIGMAS = [5.0, 1.0, 0.7]


def covariates(batch, seed):
    """age (years), sex (codes) and a third score, with missing values in two columns."""
    generator = torch.Generator().manual_seed(seed)
    age = 60 + 10 * torch.randn(batch, generator=generator, dtype=torch.float64)
    sex = torch.randint(0, 2, (batch,), generator=generator).double()
    score = torch.randn(batch, generator=generator, dtype=torch.float64)
    age[1] = float("nan")
    score[[0, 3]] = float("nan")
    return torch.stack([age, sex, score], dim=1)


@pytest.mark.parametrize(("shape", "tau"), [((2, 7, 3), 0.5), ((3, 8, 2), 1.3)])
def test_covariate_independence_equals_loop_and_masks_missing_rows(shape, tau):
    s = random_views(shape, seed=80 + sum(shape)).double()
    y = covariates(shape[1], seed=81)
    value = losses.covariate_independence(s, y, COVARIATE_KINDS, sigma=COVARIATE_SIGMAS, tau=tau)
    expected = loop_covariate_independence(s, y, COVARIATE_KINDS, COVARIATE_SIGMAS, tau)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # Reading a missing age as 0 (imputing) would change the value: the mask is what the loop does.
    imputed = torch.nan_to_num(y, nan=0.0)
    assert abs(losses.covariate_independence(s, imputed, COVARIATE_KINDS, COVARIATE_SIGMAS, tau).item() - expected) > 1e-3


def test_covariate_independence_is_high_when_the_embedding_encodes_the_covariate():
    generator = torch.Generator().manual_seed(3)
    age = 40 + 30 * torch.rand(32, generator=generator, dtype=torch.float64)
    encoded = torch.stack([(age - 55) / 10, 0.01 * torch.randn(32, generator=generator, dtype=torch.float64)], -1)
    unrelated = torch.randn(32, 2, generator=generator, dtype=torch.float64)
    dependent = losses.covariate_independence(encoded[None], age[:, None], ["continuous"], sigma=5.0).item()
    independent = losses.covariate_independence(unrelated[None], age[:, None], ["continuous"], sigma=5.0).item()
    assert dependent > 0.8 and independent < 0.3


def test_covariate_independence_is_zero_without_a_usable_covariate():
    s = random_views((2, 5, 3), seed=4).requires_grad_()
    constant = torch.tensor([[1.0], [1.0], [1.0], [float("nan")], [1.0]])
    value = losses.covariate_independence(s, constant, ["categorical"])
    assert value.item() == 0.0
    value.backward()  # still part of the graph
    assert torch.equal(s.grad, torch.zeros_like(s))


def _attribute_case(shape, salient_dim, seed):
    c = random_views(shape, seed=seed).double()
    s = random_views((*shape[:2], salient_dim), seed=seed + 1, scale=0.7).double()
    is_target = torch.tensor([True, False, True, True, False, True, False, True, False][: shape[1]])
    return c, s, is_target, covariates(shape[1], seed=seed + 2)


@pytest.mark.parametrize("common_objective", losses.COMMON_OBJECTIVES)
@pytest.mark.parametrize(("shape", "view_weighting"), [((2, 8, 4), "balanced"), ((3, 9, 3), "reference")])
def test_attribute_aware_sepclr_terms_equal_loops(common_objective, shape, view_weighting):
    c, s, is_target, y = _attribute_case(shape, 2, seed=90 + shape[0])
    tau, temperature, lam, t = 0.7, 0.2, 0.05, 2.0
    total, terms = losses.sepclr_loss(
        c, s, is_target, tau=tau, beta_salient=2.0, beta_null=3.0, lam_mi=4.0, attributes=y,
        attribute_kinds=COVARIATE_KINDS, sigma=COVARIATE_SIGMAS, common_objective=common_objective,
        temperature=temperature, lam=lam, t=t, lam_cov=5.0, null_weighting="reference", view_weighting=view_weighting,
    )
    expected = loop_sepclr(c, s, is_target, tau, view_weighting=view_weighting, null_weighting="reference")
    prior = loop_attribute_kernel(y.tolist(), COVARIATE_KINDS, COVARIATE_SIGMAS)
    if common_objective == "yaware":
        expected["common"] = loop_yaware(c, prior, temperature)
    elif common_objective == "decoupled_uniformity":
        expected["common"] = loop_decoupled(c, t, prior=prior, lam=lam)
    targets = [i for i in range(shape[1]) if is_target[i]]
    expected["cov"] = loop_covariate_independence(s[:, targets], y[targets], COVARIATE_KINDS, COVARIATE_SIGMAS, tau)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6, abs=1e-9), name
    weights = {"common": 1.0, "salient": 2.0, "null": 3.0, "mi": 4.0, "cov": 5.0}
    assert total.item() == pytest.approx(sum(weights[name] * value for name, value in expected.items()), rel=1e-6)


def test_sepclr_reference_null_weighting_is_plain_divided_by_2tau():
    c, s, is_target, _ = _attribute_case((2, 6, 3), 2, seed=7)
    plain = losses.sepclr_loss(c, s, is_target, tau=0.2)[1]["null"]
    reference = losses.sepclr_loss(c, s, is_target, tau=0.2, null_weighting="reference")[1]["null"]
    assert reference.item() == pytest.approx(plain.item() / 0.4, rel=1e-9)


def test_sepclr_view_weightings_agree_for_two_views_and_differ_for_more():
    for n_views, same in ((2, True), (4, False)):
        c, s, is_target, _ = _attribute_case((n_views, 6, 3), 2, seed=8)
        balanced = losses.sepclr_loss(c, s, is_target)[0].item()
        reference = losses.sepclr_loss(c, s, is_target, view_weighting="reference")[0].item()
        assert (balanced == pytest.approx(reference, rel=1e-12)) is same


@pytest.mark.parametrize("common_objective", losses.COMMON_OBJECTIVES)
def test_combined_attribute_aware_sepclr_passes_float64_gradcheck(common_objective):
    c, s, is_target, y = _attribute_case((3, 7, 3), 2, seed=12)
    c.requires_grad_()
    s.requires_grad_()

    def loss(c, s):
        return losses.sepclr_loss(
            c, s, is_target, tau=0.7, beta_null=2.0, lam_mi=3.0, attributes=y, attribute_kinds=COVARIATE_KINDS,
            sigma=COVARIATE_SIGMAS, common_objective=common_objective, temperature=0.3, lam=0.1, lam_cov=4.0,
            null_weighting="reference",
        )[0]

    assert loss(c, s).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (c, s), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_sepclr_options_are_validated_with_one_clear_error():
    c, s, is_target, y = _attribute_case((2, 6, 3), 2, seed=13)
    with pytest.raises(ConfigError, match="common_objective"):
        losses.sepclr_loss(c, s, is_target, common_objective="simclr")
    with pytest.raises(ConfigError, match="need attributes"):
        losses.sepclr_loss(c, s, is_target, lam_cov=1.0)
    with pytest.raises(ConfigError, match="need attributes"):
        losses.sepclr_loss(c, s, is_target, common_objective="yaware")
    with pytest.raises(ConfigError, match="null_weighting"):
        losses.sepclr_loss(c, s, is_target, null_weighting="paper")
    with pytest.raises(ValueError, match="rows for a batch"):
        losses.sepclr_loss(c, s, is_target, attributes=y[:4], attribute_kinds=COVARIATE_KINDS, lam_cov=1.0)


# ---------------------------------------------------------------- hand-computed cases


def test_info_nce_hand_computed_two_orthogonal_samples():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    z = torch.stack([torch.stack([e1, e2]), torch.stack([3 * e1, e2])])  # norms must not matter
    # Each anchor: its positive at similarity 1, two orthogonal negatives at 0.
    expected = -1.0 + math.log(math.e + 2.0)
    assert losses.info_nce(z, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_loss_hand_computed_two_points():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert losses.uniform_loss(x, t=2).item() == pytest.approx(-50.0)


def test_lp_info_nce_hand_computed_one_dimension():
    h = torch.tensor([[0.0], [1.0]])
    assert losses.lp_info_nce(h, h, p=1, temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_yaware_hand_computed_two_orthogonal_samples():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e2])])
    y = torch.tensor([0.0, 1.0])
    # Every anchor: its other view (similarity 1, weight 1) and two embeddings of the other
    # sample (similarity 0, weight w = exp(-1/2) each); weights normalised to 1, 2w / (1 + 2w).
    w = math.exp(-0.5)
    expected = math.log(math.e + 2.0) - 1.0 / (1.0 + 2.0 * w)
    assert losses.yaware_info_nce(z, y, sigma=1.0, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_decoupled_uniformity_hand_computed_two_samples():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    z = torch.stack([torch.stack([e1, e2]), torch.stack([2 * e1, e2])])
    # Centroids e1 and e2, squared distance 2: log exp(-2t).
    assert losses.decoupled_uniformity(z, t=2.0).item() == pytest.approx(-4.0, rel=1e-6)
    # K = [[1, k], [k, 1]]: α shrinks μ_0 − μ_1 by (1 − k) / (1 − k + λ) = 0.5 / 1.0.
    kernel = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert losses.decoupled_uniformity(z, kernel=kernel, lam=0.5, t=2.0).item() == pytest.approx(-1.0, rel=1e-6)


def test_sepclr_hand_computed_one_target_one_background():
    # 1-D spaces, 2τ = 1. Common: the two samples sit at opposite poles in both views.
    c = torch.tensor([[[2.0], [-1.0]], [[1.0], [-3.0]]])
    # Salient: target at 1 then 2, background at 0.5 in both views.
    s = torch.tensor([[[1.0], [0.5]], [[2.0], [0.5]]])
    is_target = torch.tensor([True, False])
    total, terms = losses.sepclr_loss(c, s, is_target, tau=0.5)
    assert terms["common"].item() == pytest.approx(0.0 + 2 * (-4.0), rel=1e-6)
    assert terms["salient"].item() == pytest.approx(1.0 + (-1.0) + (-4.0), rel=1e-6)
    assert terms["null"].item() == pytest.approx(0.25, rel=1e-6)
    expected_mi = (math.log((1 + math.exp(-4 - 1)) / 2) + math.log((1 + math.exp(-4 - 4)) / 2)) / 2
    assert terms["mi"].item() == pytest.approx(expected_mi, rel=1e-6)
    expected_total = -8.0 + 1.0 * (-4.0) + 10.0 * 0.25 + 10.0 * expected_mi
    assert total.item() == pytest.approx(expected_total, rel=1e-6)


def test_align_loss_is_zero_for_identical_views_with_finite_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    loss = losses.align_loss(x, x.detach().clone(), alpha=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- properties


def _all_losses(z, y, is_target):
    c, s = z, z.flip(-1) * 0.5
    return {
        "info_nce": losses.info_nce(z),
        "yaware": losses.yaware_info_nce(z, y, sigma=1.0),
        "decoupled": losses.decoupled_uniformity(z),
        "decoupled_prior": losses.decoupled_uniformity(z, y=y, sigma=1.0),
        "sepclr": losses.sepclr_loss(c, s, is_target)[0],
    }


def test_losses_are_invariant_to_permuting_the_batch():
    z = random_views((3, 8, 5), seed=5)
    y = random_views((8,), seed=6)
    is_target = torch.tensor([True, False] * 4)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    before = _all_losses(z, y, is_target)
    after = _all_losses(z[:, order], y[order], is_target[order])
    for name in before:
        assert after[name].item() == pytest.approx(before[name].item(), rel=1e-5), name
    h1, h2 = random_views((8, 3), seed=8), random_views((8, 3), seed=9)
    assert losses.lp_info_nce(h1[order], h2[order]).item() == pytest.approx(losses.lp_info_nce(h1, h2).item(), rel=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_losses_and_gradients_are_finite_at_temperature_001(autocast):
    # Near-duplicate embeddings make the largest logits ~1/τ = 100 apart from the rest.
    base = random_views((1, 16, 8), seed=11)
    z = (base + 1e-3 * random_views((2, 16, 8), seed=12)).requires_grad_(True)
    y = random_views((16,), seed=13)
    is_target = torch.arange(16) % 2 == 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        projected = z.bfloat16() if autocast else z
        values = [
            losses.info_nce(projected, temperature=0.01),
            losses.yaware_info_nce(projected, y, sigma=0.5, temperature=0.01),
            losses.decoupled_uniformity(projected, y=y, t=100.0),
            losses.sepclr_loss(projected, projected, is_target, tau=0.01)[0],
            losses.lp_info_nce(projected[0], projected[1], p=1, temperature=0.01),
            losses.uniform_loss(F.normalize(projected[0], dim=-1), t=100.0),
        ]
    for value in values:
        assert value.dtype == torch.float32 and torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, z)
        assert torch.isfinite(grad).all()


def test_yaware_with_tiny_sigma_and_distinct_attributes_equals_info_nce():
    z = random_views((3, 6, 4), seed=14)
    y = torch.arange(6, dtype=torch.float32) * 10.0
    assert losses.yaware_info_nce(z, y, sigma=0.01, temperature=0.2).item() == pytest.approx(
        losses.info_nce(z, temperature=0.2).item(), rel=1e-6
    )


def test_yaware_with_huge_sigma_weights_every_other_embedding_equally():
    z = random_views((2, 5, 4), seed=15)
    y = random_views((5,), seed=16)
    anchors, normalised = flat_anchors(z)
    n = len(anchors)
    expected = sum(-loop_log_prob(normalised, a, b, 0.3) for a in range(n) for b in range(n) if b != a) / (n * (n - 1))
    assert losses.yaware_info_nce(z, y, sigma=1e6, temperature=0.3).item() == pytest.approx(expected, rel=1e-5)


def test_yaware_ignores_a_missing_attribute_instead_of_reading_zero():
    z = random_views((2, 4, 3), seed=17)
    y = torch.tensor([[1.0, 0.0], [2.0, float("nan")], [0.5, 1.0], [3.0, 0.2]])
    expected = loop_yaware(z, [[w for w in row] for row in _nan_aware_weights(y, sigma=1.0)], temperature=0.1)
    assert losses.yaware_info_nce(z, y, sigma=1.0).item() == pytest.approx(expected, rel=1e-5)


def _nan_aware_weights(y, sigma):
    rows = y.tolist()
    return [
        [
            math.exp(-sum((a - b) ** 2 for a, b in zip(u, w) if not (math.isnan(a) or math.isnan(b))) / (2 * sigma**2))
            for w in rows
        ]
        for u in rows
    ]


def test_decoupled_uniformity_without_prior_equals_identity_kernel_with_zero_ridge():
    z = random_views((3, 7, 4), seed=18)
    assert losses.decoupled_uniformity(z, kernel=torch.eye(7), lam=0.0).item() == pytest.approx(
        losses.decoupled_uniformity(z).item(), rel=1e-6
    )


def test_decoupled_uniformity_passes_no_gradient_to_the_prior():
    z = random_views((2, 5, 3), seed=19).requires_grad_(True)
    kernel = torch.eye(5).add(0.3).requires_grad_(True)
    losses.decoupled_uniformity(z, kernel=kernel).backward()
    assert kernel.grad is None and torch.isfinite(z.grad).all()


def test_sepclr_null_term_is_zero_when_background_salient_is_zero():
    c = random_views((2, 6, 4), seed=20)
    s = random_views((2, 6, 4), seed=21)
    is_target = torch.tensor([True, True, True, False, False, False])
    s[:, ~is_target] = 0.0
    _, terms = losses.sepclr_loss(c, s, is_target)
    assert terms["null"].item() == 0.0
    s[:, 4] = 1.0
    assert losses.sepclr_loss(c, s, is_target)[1]["null"].item() == pytest.approx(4.0 / 3.0)


def test_sepclr_null_term_grows_with_the_salient_scale_at_a_fixed_collapse_ratio():
    """Why the docs read separation from the background/target norm ratio and not from the null
    curve: the null term is in absolute units, so it grows when every salient norm grows even
    though the background sits just as close to the origin relative to the targets."""
    c = random_views((2, 6, 4), seed=22)
    s = random_views((2, 6, 4), seed=23)
    is_target = torch.tensor([True, True, True, False, False, False])
    s[:, ~is_target] *= 0.2

    def ratio(salient):
        norms = salient.norm(dim=-1).mean(0)
        return (norms[~is_target].mean() / norms[is_target].mean()).item()

    null = losses.sepclr_loss(c, s, is_target)[1]["null"].item()
    scaled_null = losses.sepclr_loss(c, 3 * s, is_target)[1]["null"].item()
    assert scaled_null == pytest.approx(9 * null, rel=1e-5)
    assert ratio(3 * s) == pytest.approx(ratio(s), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sepclr_mi_term_rises_when_salient_copies_common(seed):
    c = random_views((2, 12, 4), seed=100 + seed)
    is_target = torch.arange(12) < 8
    c_hat = F.normalize(c, dim=-1)
    copy = c_hat.clone()
    # Same target embeddings handed to other targets: same marginal, no dependence on c.
    shuffled = c_hat.clone()
    shuffled[:, :8] = c_hat[:, torch.roll(torch.arange(8), 3)]
    mi_copy = losses.sepclr_loss(c, copy, is_target)[1]["mi"]
    mi_shuffled = losses.sepclr_loss(c, shuffled, is_target)[1]["mi"]
    assert mi_copy > mi_shuffled


def test_sepclr_rejects_a_batch_without_both_groups():
    c = random_views((2, 4, 3), seed=22)
    with pytest.raises(TrainingError, match="0 target and 4 background"):
        losses.sepclr_loss(c, c, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(TrainingError, match="4 target and 0 background"):
        losses.sepclr_loss(c, c, torch.ones(4, dtype=torch.bool))


def test_invalid_parameters_raise_config_error_naming_the_value():
    z = random_views((2, 4, 3), seed=23)
    with pytest.raises(ConfigError, match="temperature must be > 0, got -0.1"):
        losses.info_nce(z, temperature=-0.1)
    with pytest.raises(ConfigError, match="lam must be >= 0, got -1"):
        losses.decoupled_uniformity(z, y=torch.zeros(4), lam=-1)
    with pytest.raises(ValueError, match="at least 2 views"):
        losses.info_nce(z[:1])


def test_gather_without_process_group_returns_input():
    x = torch.randn(3, 2)
    assert losses.gather(x) is x


# ---------------------------------------------------------------- distributed (2 gloo processes)


def _ddp_worker(rank, world_size, init_file, inputs, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, y, is_target, weight = inputs
        batch = x.shape[1]
        local = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
        model = torch.nn.Linear(x.shape[-1], weight.shape[0], bias=False)
        with torch.no_grad():
            model.weight.copy_(weight)
        for name, loss_fn in _distributed_losses().items():
            model.zero_grad()
            loss = loss_fn(model(x[:, local]), y[local], is_target[local], True)
            loss.backward()
            grad = model.weight.grad.clone()
            dist.all_reduce(grad)  # what DDP does: average parameter gradients over ranks
            results[(name, rank)] = (loss.item(), (grad / world_size).tolist())
    finally:
        dist.destroy_process_group()


def _distributed_losses():
    return {
        "info_nce": lambda z, y, t, d: losses.info_nce(z, distributed=d),
        "yaware": lambda z, y, t, d: losses.yaware_info_nce(z, y, sigma=1.0, distributed=d),
        "decoupled": lambda z, y, t, d: losses.decoupled_uniformity(z, y=y, distributed=d),
        "sepclr": lambda z, y, t, d: losses.sepclr_loss(z[..., :3], z[..., 3:], t, distributed=d)[0],
        "sepclr_attributes": lambda z, y, t, d: losses.sepclr_loss(
            z[..., :3], z[..., 3:], t, attributes=torch.stack([y, (y > 0).float()], dim=1),
            attribute_kinds=["continuous", "categorical"], common_objective="yaware", lam_cov=2.0, distributed=d,
        )[0],
        "sepclr_decoupled": lambda z, y, t, d: losses.sepclr_loss(
            z[..., :3], z[..., 3:], t, attributes=y[:, None], attribute_kinds=["continuous"],
            common_objective="decoupled_uniformity", distributed=d,
        )[0],
        "covariate_independence": lambda z, y, t, d: losses.covariate_independence(
            z, y[:, None], ["continuous"], distributed=d
        ),
    }


def test_distributed_losses_and_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(24)
    x = torch.randn(2, 8, 5, generator=generator)
    y = torch.randn(8, generator=generator)
    is_target = torch.tensor([True, False, False, True, True, False, True, False])
    weight = torch.randn(6, 5, generator=generator)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, tmp_path / "rendezvous", (x, y, is_target, weight), results), nprocs=2)
        results = dict(results)
    model = torch.nn.Linear(5, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    for name, loss_fn in _distributed_losses().items():
        model.zero_grad()
        loss = loss_fn(model(x), y, is_target, False)
        loss.backward()
        for rank in range(2):
            value, grad = results[(name, rank)]
            assert value == pytest.approx(loss.item(), rel=1e-5), name
            np.testing.assert_allclose(grad, model.weight.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
