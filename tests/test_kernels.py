"""Tests for neurocl.kernels: RBF in attribute units, exact match, combinations, missing values."""

from __future__ import annotations

import math

import pytest
import torch

from neurocl import kernels
from neurocl.errors import ConfigError

NAN = float("nan")


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    # torch.allclose: torch.testing.assert_close spends seconds on lazy imports at its first call.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def loop_kernel(rows, kinds, sigmas, combine):
    """Plain double loop over pairs; a missing value gives factor 1 for its attribute."""
    n = len(rows)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            factors = []
            for a, kind in enumerate(kinds):
                u, w = rows[i][a], rows[j][a]
                if math.isnan(u) or math.isnan(w):
                    factors.append(1.0)
                elif kind == "categorical":
                    factors.append(1.0 if u == w else 0.0)
                else:
                    factors.append(math.exp(-((u - w) ** 2) / (2 * sigmas[a] ** 2)))
            out[i][j] = math.prod(factors) if combine == "product" else sum(factors) / len(factors)
    return torch.tensor(out)


def test_rbf_sigma_is_a_standard_deviation_in_the_attribute_units():
    age = torch.tensor([30.0, 35.0, 40.0])
    kernel = kernels.rbf(age, sigma=5.0)
    # 5 years apart with sigma = 5 years: exp(-1/2); 10 years: exp(-2).
    near, far = math.exp(-0.5), math.exp(-2.0)
    expected = torch.tensor([[1.0, near, far], [near, 1.0, near], [far, near, 1.0]])
    assert_close(kernel, expected)


def test_rbf_with_one_sigma_per_column_equals_loop():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(6, 3, generator=generator) * torch.tensor([10.0, 1.0, 0.1])
    sigmas = [8.0, 0.5, 0.2]
    expected = loop_kernel(y.tolist(), ["continuous"] * 3, sigmas, "product")
    assert_close(kernels.rbf(y, sigmas), expected)


def test_rbf_missing_value_carries_no_information():
    y = torch.tensor([[60.0, 1.0], [NAN, 2.0], [20.0, NAN], [NAN, NAN]])
    kernel = kernels.rbf(y, sigma=[10.0, 1.0])
    # Subject 1 (age unknown) is compared by the second attribute only, never as age 0.
    assert kernel[0, 1].item() == pytest.approx(math.exp(-0.5))
    assert kernel[1, 2].item() == 1.0 and kernel[0, 2].item() == pytest.approx(math.exp(-8.0))
    assert torch.all(kernel[3] == 1.0) and torch.all(kernel[:, 3] == 1.0)
    zero_filled = kernels.rbf(torch.nan_to_num(y), sigma=[10.0, 1.0])
    assert not torch.allclose(kernel, zero_filled)


def test_categorical_kernel_is_exact_match_and_neutral_when_missing():
    codes = torch.tensor([0.0, 1.0, 0.0, NAN, 2.0])
    expected = torch.tensor(
        [
            [1, 0, 1, 1, 0],
            [0, 1, 0, 1, 0],
            [1, 0, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.float32,
    )
    assert_close(kernels.categorical(codes), expected)
    integer_codes = kernels.categorical(torch.tensor([3, 3, 1]))
    assert_close(integer_codes, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_attribute_kernel_over_mixed_attributes_equals_loop(combine):
    rows = [
        [70.0, 0.0, 1.0, 2.5],
        [65.0, 1.0, 1.0, NAN],
        [NAN, 0.0, 0.0, 1.0],
        [40.0, 1.0, NAN, 3.0],
        [71.0, 0.0, 1.0, 2.0],
    ]
    kinds = ["continuous", "categorical", "categorical", "continuous"]
    sigmas = [5.0, 1.0, 1.0, 0.7]
    kernel = kernels.attribute_kernel(torch.tensor(rows), kinds, sigma=sigmas, combine=combine)
    assert_close(kernel, loop_kernel(rows, kinds, sigmas, combine))
    assert torch.equal(kernel, kernel.T) and torch.all(kernel.diagonal() == 1.0)


def test_attribute_kernel_product_of_one_attribute_each_matches_the_single_kernels():
    y = torch.tensor([[30.0, 0.0], [50.0, 1.0], [35.0, 0.0]])
    kernel = kernels.attribute_kernel(y, ["continuous", "categorical"], sigma=10.0)
    assert_close(kernel, kernels.rbf(y[:, 0], 10.0) * kernels.categorical(y[:, 1]))


def test_standardise_makes_sigma_a_number_of_standard_deviations():
    generator = torch.Generator().manual_seed(1)
    age = torch.randn(8, generator=generator) * 12.0 + 50.0
    age[3] = NAN
    kernel = kernels.attribute_kernel(age[:, None], ["continuous"], sigma=1.0, standardise=True)
    present = age[~torch.isnan(age)]
    std = math.sqrt(sum((v - present.mean().item()) ** 2 for v in present.tolist()) / (len(present) - 1))
    expected = loop_kernel([[v / std] for v in age.tolist()], ["continuous"], [1.0], "product")
    assert_close(kernel, expected)
    # The same data in other units (months) gives the same kernel.
    months = kernels.attribute_kernel(age[:, None] * 12.0, ["continuous"], sigma=1.0, standardise=True)
    assert_close(months, kernel)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: kernels.rbf(torch.zeros(3), sigma=0.0), ConfigError, r"sigma must be > 0, got \[0.0\]"),
        (lambda: kernels.rbf(torch.zeros(3, 2), sigma=[1.0, 2.0, 3.0]), ValueError, "3 values for 2 attribute"),
        (lambda: kernels.categorical(torch.zeros(3, 2)), ValueError, r"shape \(B,\), got \(3, 2\)"),
        (lambda: kernels.attribute_kernel(torch.zeros(3, 2), ["continuous"]), ValueError, "1 entries for 2"),
        (lambda: kernels.attribute_kernel(torch.zeros(3, 1), ["ordinal"]), ConfigError, "got 'ordinal'"),
        (lambda: kernels.attribute_kernel(torch.zeros(3, 1), ["continuous"], combine="max"), ConfigError, "'max'"),
        (
            lambda: kernels.attribute_kernel(torch.tensor([[1.0], [1.0], [NAN]]), ["continuous"], standardise=True),
            ConfigError,
            "cannot standardise attribute column 0",
        ),
    ],
)
def test_invalid_kernel_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- normalised HSIC and per-covariate kernels


def loop_centred_alignment(l, k):
    """tr(LHKH)/sqrt(tr(LHLH) tr(KHKH)) with H = I − 11ᵀ/n, entry by entry."""
    n = len(l)
    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]

    def trace(a, b):
        return sum(a[i][j] * h[j][m] * b[m][q] * h[q][i] for i in range(n) for j in range(n) for m in range(n) for q in range(n))

    return trace(l, k) / math.sqrt(trace(l, l) * trace(k, k))


def test_normalised_hsic_equals_loop_and_is_one_for_a_rescaled_kernel():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=generator, dtype=torch.float64), torch.randn(6, generator=generator, dtype=torch.float64)
    l, k = kernels.rbf(x, 1.0), kernels.rbf(y, 0.5)
    assert kernels.normalised_hsic(l, k).item() == pytest.approx(loop_centred_alignment(l.tolist(), k.tolist()), rel=1e-9)
    assert kernels.normalised_hsic(l, 3.0 * l).item() == pytest.approx(1.0, rel=1e-9)


def test_normalised_hsic_of_a_constant_kernel_is_zero_not_nan():
    k = kernels.rbf(torch.arange(5.0), 1.0)
    assert kernels.normalised_hsic(torch.ones(5, 5), k).item() == 0.0


def test_covariate_kernels_drop_missing_rows_and_uninformative_covariates():
    y = torch.tensor([[50.0, 1.0, 2.0], [NAN, 0.0, 2.0], [70.0, 1.0, 2.0], [60.0, NAN, NAN], [55.0, 0.0, 2.0]])
    found = kernels.covariate_kernels(y, ["continuous", "categorical", "continuous"], sigma=[10.0, 1.0, 1.0])
    assert [column for column, _, _ in found] == [0, 1]  # column 2 is constant where present
    _, present, age_kernel = found[0]
    assert present.tolist() == [True, False, True, True, True]
    assert_close(age_kernel, kernels.rbf(torch.tensor([50.0, 70.0, 60.0, 55.0]), 10.0))
    _, present, sex_kernel = found[1]
    assert present.tolist() == [True, True, True, False, True]
    assert_close(sex_kernel, kernels.categorical(torch.tensor([1.0, 0.0, 1.0, 0.0])))
    with pytest.raises(ConfigError, match="sigma"):
        kernels.covariate_kernels(y, ["continuous", "categorical", "continuous"], sigma=[0.0, 1.0, 1.0])
