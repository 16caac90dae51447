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


def _normal_interval(values: torch.Tensor) -> dict:
    """What ``mean_interval`` stored before commit 2515016."""
    mean, std, n = float(values.mean()), float(values.std()), values.numel()
    half = 1.96 * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half],
            "ci_method": "normal approximation, mean +- 1.96 sd / sqrt(n)"}


def test_a_stored_normal_mean_interval_is_restated_as_the_t_interval_of_its_values():
    from aeshield.stats import restate_mean_intervals

    values = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    other = values[:5] * 3
    record = {"results": {"VAE": {"auddc": _normal_interval(values), "per_pair": values.tolist()}},
              "paired": [_normal_interval(other)], "current": mean_interval(other), "pairs": 12}
    restated, count = restate_mean_intervals(record)
    assert count == 2
    for got, want in ((restated["results"]["VAE"]["auddc"], mean_interval(values)),
                      (restated["paired"][0], mean_interval(other))):
        assert got["ci_method"] == want["ci_method"] and got["n"] == want["n"]
        assert got["ci95"] == pytest.approx(want["ci95"], rel=1e-12)
    old = record["results"]["VAE"]["auddc"]["ci95"]
    new = restated["results"]["VAE"]["auddc"]["ci95"]
    assert new[0] < old[0] and new[1] > old[1]  # t(0.975, 11) = 2.20 > 1.96
    assert restated["current"] == record["current"] and restated["pairs"] == 12
    assert restated["results"]["VAE"]["per_pair"] == values.tolist()
    assert restate_mean_intervals(restated) == (restated, 0)


def test_a_reused_record_is_rewritten_with_the_current_mean_intervals_without_recomputing(tmp_path):
    import json

    from aeshield.experiments.record_cache import RecordCache

    values = torch.arange(1.0, 7.0, dtype=torch.float64)
    records = RecordCache(tmp_path, "h", {"target": "t"})
    records.get("auddc", {"a": 1}, lambda: {"auddc": _normal_interval(values)})
    calls = []
    again = records.get("auddc", {"a": 1}, lambda: calls.append(1) or {"auddc": mean_interval(values)})
    assert calls == []
    assert again["auddc"]["ci95"] == pytest.approx(mean_interval(values)["ci95"], rel=1e-12)
    assert json.loads((tmp_path / "auddc.json").read_text()) == again
