"""Intervals against published worked examples and closed forms."""

import math

import pytest
import torch

from aeshield.stats import mean_interval, paired_difference_interval, t_quantile, wilson_interval


def _paired_flags(both: int, only_first: int, only_second: int, neither: int):
    first = [1] * both + [1] * only_first + [0] * only_second + [0] * neither
    second = [1] * both + [0] * only_first + [1] * only_second + [0] * neither
    return torch.tensor(first, dtype=torch.bool), torch.tensor(second, dtype=torch.bool)


def test_newcombe_method_10_matches_published_example():
    # Fagerland, Lydersen & Laake (2017), "Statistical Analysis of Contingency Tables", ch. 8:
    # complete response before and after consolidation therapy (Cavo et al., 2012), table
    # [[59, 6], [16, 80]]: Newcombe square-and-add, estimate -0.0621, 95% CI -0.1186 to -0.0046.
    result = paired_difference_interval(*_paired_flags(59, 6, 16, 80))
    assert round(result["difference"], 4) == -0.0621
    assert [round(v, 4) for v in result["ci95"]] == [-0.1186, -0.0046]
    assert result["discordant"] == [6, 16]


def test_newcombe_uses_the_shrunk_correlation():
    # AD - BC = 59*80 - 6*16 > N/2, so phi is computed from AD - BC - N/2: the unshrunk phi
    # would give a narrower interval than the published one.
    a, b = _paired_flags(59, 6, 16, 80)
    lo, hi = paired_difference_interval(a, b)["ci95"]
    n, assoc = 161, 59 * 80 - 6 * 16
    margins = 65 * 96 * 75 * 86
    p1, p2 = 65 / n, 75 / n
    l1, _ = wilson_interval(65, n)
    _, u2 = wilson_interval(75, n)
    unshrunk_lo = (p1 - p2) - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2
                                        - 2 * assoc / math.sqrt(margins) * (p1 - l1) * (u2 - p2))
    assert lo < unshrunk_lo


@pytest.mark.parametrize("df,expected", [
    (1, math.tan(math.pi * 0.475)),                   # Cauchy: closed form
    (2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # t_2: (2p - 1) / sqrt(2p(1 - p))
    (10, 2.2281388519649385),
])
def test_t_quantile(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_tends_to_normal():
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959963984540054, rel=1e-4)


def test_mean_interval_is_student_t():
    m = mean_interval([1.0, 2.0, 3.0])
    half = t_quantile(0.975, 2) * 1.0 / math.sqrt(3)
    assert m["ci95"] == pytest.approx([2 - half, 2 + half])
    assert "Student t" in m["ci_method"]
    assert math.isnan(mean_interval([5.0])["ci95"][0])
