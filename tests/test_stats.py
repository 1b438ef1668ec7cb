"""warp_dist.evaluation.stats against closed forms and known cases: t quantiles, the interval of a mean, the paired bootstrap,
distinct-n."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from warp_dist.evaluation import stats


@pytest.mark.parametrize("df,ref", [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836), (10, 2.228138852),
                                    (30, 2.042272456), (120, 1.979930405)])
def test_t_quantile_matches_tables(df, ref):
    assert stats.t_quantile(0.975, df) == pytest.approx(ref, abs=1e-8)
    assert stats.t_quantile(0.025, df) == pytest.approx(-ref, abs=1e-8)
    assert stats.t_cdf(ref, df) == pytest.approx(0.975, abs=1e-10)


def test_t_quantile_tends_to_the_normal():
    z = NormalDist().inv_cdf(0.975)
    assert stats.t_quantile(0.975, math.inf) == z
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(z, abs=1e-5)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)


def test_mean_ci_small_sample_closed_form():
    mean, lo, hi = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert mean == 2.5 and lo == pytest.approx(2.5 - half, abs=1e-8) and hi == pytest.approx(2.5 + half, abs=1e-8)
    assert stats.mean_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)  # no spread: zero width
    m1 = stats.mean_ci([0.7])
    assert m1[0] == 0.7 and math.isnan(m1[1]) and math.isnan(m1[2])
    assert all(math.isnan(v) for v in stats.mean_ci([]))


def test_mean_ci_large_sample_is_the_normal_interval():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2.0 + 0.3
    mean, lo, hi = stats.mean_ci(x)
    half = NormalDist().inv_cdf(0.975) * x.std().item() / math.sqrt(x.numel())
    assert mean == pytest.approx(x.mean().item())
    assert (hi - lo) / 2 == pytest.approx(half, rel=1e-4)
    assert lo < 0.3 < hi


def test_paired_bootstrap_constant_difference_is_a_zero_width_interval_at_it():
    a = torch.arange(50, dtype=torch.float64) * 0.5
    r = stats.paired_bootstrap(a, a - 3.0)  # exact in binary: every prompt differs by 3
    assert r["diff"] == r["low"] == r["high"] == 3.0 and r["excludes_zero"]
    z = stats.paired_bootstrap(a.tolist(), a.tolist())
    assert z["diff"] == z["low"] == z["high"] == 0.0 and not z["excludes_zero"]
    assert r["n"] == 50 and r["resamples"] == 2000 and r["level"] == 0.95


def test_paired_bootstrap_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    r1, r2 = stats.paired_bootstrap(a, b, seed=7), stats.paired_bootstrap(a.tolist(), b.tolist(), seed=7)
    assert r1 == r2
    assert stats.paired_bootstrap(a, b, seed=8) != r1
    assert r1["low"] < r1["diff"] < r1["high"]


def test_paired_bootstrap_resamples_prompts_together():
    """A large per-prompt component shared by both models cancels: the interval is that of the differences alone."""
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(400, generator=g, dtype=torch.float64) * 10.0
    noise = torch.randn(400, generator=g, dtype=torch.float64) * 0.1
    r = stats.paired_bootstrap(shared + 0.05 + noise, shared)
    d = 0.05 + noise
    half = NormalDist().inv_cdf(0.975) * d.std().item() / math.sqrt(400)
    assert (r["high"] - r["low"]) / 2 == pytest.approx(half, rel=0.15)  # ~0.01, not ~1 (unpaired)
    assert r["excludes_zero"] and r["diff"] == pytest.approx(d.mean().item())


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(5)
    trials, covered = 200, 0
    for t in range(trials):
        a = torch.randn(40, generator=g, dtype=torch.float64) + 0.3
        b = torch.randn(40, generator=g, dtype=torch.float64)
        r = stats.paired_bootstrap(a, b, resamples=500, seed=t)
        covered += r["low"] <= 0.3 <= r["high"]
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        stats.paired_bootstrap([1.0], [1.0], level=1.5)


def test_distinct_n_hand_computed():
    seqs = [[1, 2, 3], [1, 2]]
    assert stats.distinct_n(seqs, 1) == 3 / 5  # unigrams 1 2 3 1 2: 3 unique of 5
    assert stats.distinct_n(seqs, 2) == 2 / 3  # bigrams (1,2) (2,3) (1,2): 2 unique of 3
    assert stats.distinct_n([[5, 5, 5, 5]], 1) == 1 / 4 and stats.distinct_n([[5, 5, 5, 5]], 2) == 1 / 3
    assert stats.distinct_n([[1, 2], [3, 4]], 2) == 1.0
    assert math.isnan(stats.distinct_n([[1], [2]], 2))  # n-grams never cross completions
    assert math.isnan(stats.distinct_n([], 1))
    assert stats.distinct_n(["ab", "ba"], 1) == 2 / 4  # any sequences of hashables


def test_nearest():
    assert stats.nearest([0.0, 0.5, 2.0], 1.5) == 2
    assert stats.nearest([0.0, 1.0, 2.0], 1.5) == 1  # a tie: the first
    with pytest.raises(ValueError):
        stats.nearest([], 1.0)
