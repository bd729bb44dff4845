"""Linear probes solved in batches: ridge for every penalty and label vector from one SVD, logistic
regression for many label vectors at once (torch, float64)."""

from __future__ import annotations

import numpy as np
import torch


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale by the training rows' mean and SD only (constant features keep SD 1)."""
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return [(x - mean) / scale for x in (train, *others)]


def ridge_path_predictions(x_train, y_train, x_test, alphas) -> np.ndarray:
    r"""Ridge predictions for every penalty and every label vector at once.

    With standardised training features :math:`X = U S V^\top` and centred labels,
    the ridge solution is :math:`w_\alpha = V \,\mathrm{diag}(s / (s^2 + \alpha))\, U^\top (y - \bar y)`,
    so one SVD serves all alphas and all (permuted) label vectors.

    Parameters
    ----------
    x_train : (n, d) ; y_train : (P, n) ; x_test : (m, d) ; alphas : (A,)

    Returns
    -------
    (A, P, m) predictions.
    """
    x_train, x_test = standardise(x_train, x_test)
    u, s, vt = np.linalg.svd(x_train, full_matrices=False)
    y_mean = y_train.mean(axis=1, keepdims=True)
    projected_labels = u.T @ (y_train - y_mean).T  # (k, P)
    projected_test = x_test @ vt.T  # (m, k)
    shrink = s[None, :] / (s[None, :] ** 2 + np.asarray(alphas)[:, None])  # (A, k)
    return np.einsum("mk,ak,kp->apm", projected_test, shrink, projected_labels) + y_mean[None]


def fit_logistic(x, targets, c: float, init=None, max_iter: int = 50, tol: float = 1e-6, bound_iterations: int = 8):
    r"""L2-penalised binary logistic regressions for many label vectors at once.

    Minimises, for each label vector p,
    :math:`\sum_i \left[\log(1 + e^{f_i}) - t_{pi} f_i\right] + \lVert w \rVert^2 / (2C)`,
    :math:`f_i = w^\top x_i + b`, like sklearn's ``LogisticRegression(C=c)`` (lbfgs). The intercept
    carries a 1e-8 penalty only, so that a label vector with a single class keeps a finite solution.

    Parameters
    ----------
    x : Tensor (n, d)
        Standardised features (float64).
    targets : Tensor (P, n)
        0/1 labels of P problems (observed, permuted, one-vs-rest columns).
    c : float
        Inverse penalty (sklearn's ``C``).
    init : Tensor (P, d + 1) or None
        Warm start (the previous C of a path).
    max_iter, bound_iterations : int
        Newton steps at most, after at most ``bound_iterations`` bound-optimisation steps.
    tol : float
        Converged when every gradient entry is below ``tol * n``.

    Returns
    -------
    Tensor (P, d + 1): weights then intercept.
    """
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    penalty = torch.full((d + 1,), 1.0 / c, dtype=x.dtype)
    penalty[-1] = 1e-8
    weights = torch.zeros(targets.shape[0], d + 1, dtype=x.dtype) if init is None else init.clone()

    def objective(w, logits, rows):
        return (torch.nn.functional.softplus(logits) - targets[rows] * logits).sum(1) + 0.5 * (w**2 * penalty).sum(1)

    # Phase 1, bound optimisation (Böhning, 1992): pi (1 - pi) <= 1/4, so B = X^T X / 4 + diag(penalty)
    # majorises every problem's Hessian; steps B^-1 grad decrease every objective monotonically
    # without a line search, and B is factorised once for all problems. Cheap per step (no
    # per-problem Hessian), fast where predictions are uncertain (most permutations).
    bound_factor = torch.linalg.cholesky(design.T @ design / 4 + torch.diag(penalty))
    active = torch.arange(targets.shape[0])
    for _ in range(bound_iterations):
        grad = (torch.sigmoid(weights[active] @ design.T) - targets[active]) @ design + weights[active] * penalty
        unconverged = grad.abs().amax(dim=1) >= tol * n
        active, grad = active[unconverged], grad[unconverged]
        if len(active) == 0:
            return weights
        weights[active] -= torch.cholesky_solve(grad.T, bound_factor).T
    # Phase 2, damped Newton for the problems left (confident predictions, where the bound is loose).
    # Row-wise outer products, so that every problem's Hessian X^T diag(pi (1 - pi)) X is one GEMM.
    outer = (design[:, :, None] * design[:, None, :]).reshape(n, (d + 1) ** 2)
    logits = weights[active] @ design.T
    loss = objective(weights[active], logits, active)
    for _ in range(max_iter):
        prob = torch.sigmoid(logits)
        grad = (prob - targets[active]) @ design + weights[active] * penalty
        converged = grad.abs().amax(dim=1) < tol * n
        if converged.all():
            break
        keep = ~converged
        active, grad, prob, logits, loss = active[keep], grad[keep], prob[keep], logits[keep], loss[keep]
        hessian = ((prob * (1 - prob)) @ outer).reshape(-1, d + 1, d + 1) + torch.diag(penalty)
        step = torch.cholesky_solve(grad[..., None], torch.linalg.cholesky(hessian))[..., 0]
        weights[active], logits, loss = _backtrack(objective, weights[active], logits, loss, step, grad, design, active)
    return weights


def _backtrack(objective, w, logits, loss, step, grad, design, rows, max_halvings: int = 30):
    """Armijo backtracking per problem (Newton steps can overshoot when classes are nearly separable).

    Returns the new weights, their logits and objective values (reused by the next iteration).
    """
    decrease = (grad * step).sum(dim=1)
    step_logits = step @ design.T
    size = torch.ones(len(w), dtype=w.dtype)
    accepted = torch.zeros(len(w), dtype=torch.bool)
    for _ in range(max_halvings):
        candidate = objective(w - size[:, None] * step, logits - size[:, None] * step_logits, rows)
        accepted |= candidate <= loss - 1e-4 * size * decrease
        if accepted.all():
            break
        size = torch.where(accepted, size, size / 2)
    size = torch.where(accepted, size, torch.zeros_like(size))[:, None]
    new_logits = logits - size * step_logits
    return w - size * step, new_logits, objective(w - size * step, new_logits, rows)


def logistic_path_proba(x_train, codes_train, x_test, n_classes, cs) -> np.ndarray:
    """Class probabilities on x_test for every C (warm-started path) and label vector: (C, P, m, K).

    Two classes: one logistic regression. More: one-vs-rest, the K sigmoid outputs normalised to
    sum to 1 (sklearn's ``multi_class="ovr"``); all P x K binary problems are solved as one batch.

    With more dimensions than training rows (d > n, e.g. a 128-d space probed on 80 subjects),
    the problems are solved in the span of the training rows: with ``X = U S V^T`` (r = rank <= n
    columns of V), every penalised solution is ``w = V a`` (a component of w orthogonal to the rows
    leaves the logits unchanged and only adds to ``||w||^2``), and ``||V a|| = ||a||``, so fitting
    ``X V`` (n x r) gives the same weights and the same test predictions ``(x V) a`` at
    (r + 1)^2 instead of (d + 1)^2 Hessian entries per problem.
    """
    x_train, x_test = standardise(x_train, x_test)
    if x_train.shape[1] > x_train.shape[0]:
        _, singular, vt = np.linalg.svd(x_train, full_matrices=False)
        span = vt[singular > singular[0] * 1e-10]
        x_train, x_test = x_train @ span.T, x_test @ span.T
    x_train, x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
    codes_train = torch.from_numpy(codes_train)
    n_problems = codes_train.shape[0]
    if n_classes == 2:
        targets = codes_train.to(torch.float64)
    else:
        targets = torch.nn.functional.one_hot(codes_train, n_classes).permute(0, 2, 1).reshape(-1, codes_train.shape[1]).to(torch.float64)
    design_test = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype)], dim=1)
    weights, probabilities = None, []
    for c in cs:
        weights = fit_logistic(x_train, targets, c, init=weights)
        positive = torch.sigmoid(weights @ design_test.T)  # (P or P K, m)
        if n_classes == 2:
            proba = torch.stack([1 - positive, positive], dim=-1)
        else:
            proba = positive.reshape(n_problems, n_classes, -1).permute(0, 2, 1)
            proba = proba / proba.sum(-1, keepdim=True)
        probabilities.append(proba)
    return torch.stack(probabilities).numpy()
