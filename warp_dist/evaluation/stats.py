"""Statistics of evaluation results: confidence intervals, paired bootstrap differences, diversity. Pure math.

Numbers and lists (or 1-D tensors) in, numbers out; no I/O, no process groups.

- `mean_ci(values)`: the mean with its Student-t interval, mean +- t(1 - a/2, n - 1) * s / sqrt(n) (s: the unbiased
  standard deviation). It says where the mean over *this kind* of prompt set would fall if the prompts were drawn
  again; it is not an interval for a single completion's score.
- `paired_bootstrap(a, b)`: mean(a - b) and its percentile-bootstrap interval for two models scored on the same
  prompts with the same sampling seeds. Prompts are resampled with replacement and *both* models' values of a
  resampled prompt come along together (the per-prompt difference is resampled), so what the prompts share (an easy
  prompt is easy for both models) cancels. Fixed seed: the same inputs always give the same interval.
- `distinct_n(seqs, n)`: unique n-grams / total n-grams over a set of token sequences (n-grams never cross
  sequences); 1.0 = no n-gram repeats anywhere, small = repetitive or collapsed generations.
- `nearest(values, target)`: the index of the value closest to target (front point at matched KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


# ------------------------------------------------------------------------------------------------ distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz), |error| < 1e-15."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (df > 0; df = inf gives the normal quantile), by bisection on t_cdf."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1)")
    if df <= 0:
        raise ValueError(f"df={df} must be > 0")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------------ intervals
def _as_tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")


def mean_ci(values: Sequence[float] | torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean. n = 0: all NaN; n = 1: the interval is NaN."""
    _check_level(level)
    x = _as_tensor(values)
    n = x.numel()
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = x.mean().item()
    if n == 1:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, n - 1) * x.std(unbiased=True).item() / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """[resamples, n] prompt indices drawn with replacement from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(n, (resamples, n), generator=g)


def paired_bootstrap(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = 0.95) -> dict:
    """mean(a - b) with its paired percentile-bootstrap interval; a[i], b[i] are two models' values on prompt i.

    Returns {"diff", "low", "high", "excludes_zero", "n", "resamples", "level"}. Each resample draws n prompt indices
    with replacement and takes the mean of a[idx] - b[idx]; low / high are the (1 -+ level) / 2 quantiles of those
    means (linear interpolation). A constant difference c gives low = high = c; identical inputs give 0.
    """
    _check_level(level)
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    x, y = _as_tensor(a), _as_tensor(b)
    if x.numel() != y.numel():
        raise ValueError(f"paired values need the same prompts: {x.numel()} vs {y.numel()} values")
    n = x.numel()
    if n == 0:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "excludes_zero": False, "n": 0,
                "resamples": resamples, "level": level}
    d = x - y
    means = d[bootstrap_indices(n, resamples, seed)].mean(dim=1)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return {"diff": d.mean().item(), "low": low, "high": high, "excludes_zero": bool(low > 0.0 or high < 0.0),
            "n": n, "resamples": resamples, "level": level}


PAIRED_METRICS = ("reward", "kl", "judge")  # the per-prompt values an evaluation keeps (EvalResult.per_prompt)


def paired_differences(a: dict, b: dict, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """{metric: paired_bootstrap(a[metric], b[metric])} for every metric of PAIRED_METRICS that both per-prompt dicts
    (`EvalResult.per_prompt()`: lists in prompt order, None for no judge) carry over the same, non-zero number of
    prompts: model a - model b on the same prompts and sampling seeds; then any other per-prompt value both carry
    (a verifiable reward's `accuracy`, a sum's `reward_<name>` terms)."""
    out = {}
    extra = [m for m in a if m not in PAIRED_METRICS and m in b]
    for metric in (*PAIRED_METRICS, *extra):
        va, vb = a.get(metric), b.get(metric)
        if va is None or vb is None or len(va) != len(vb) or not va:
            continue
        out[metric] = paired_bootstrap(va, vb, resamples, seed)
    return out


def with_interval(m: dict, key: str, spec: str = "+.3f") -> str:
    """'mean [low, high]' of metric `key` of a metrics dict (`<key>_mean`, `<key>_ci_low`, `<key>_ci_high`): the mean
    alone when its interval is missing (an older file) or not finite (one prompt); '-' when there is no mean (no
    judge)."""
    mean = m.get(f"{key}_mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return format(mean, spec)
    return f"{format(mean, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


# ------------------------------------------------------------------------------------------------ diversity, misc
def distinct_n(seqs: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences (NaN when no sequence has n items)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    seen: set[tuple] = set()
    total = 0
    for s in seqs:
        s = tuple(s)
        for i in range(len(s) - n + 1):
            seen.add(s[i:i + n])
            total += 1
    return len(seen) / total if total else math.nan


def nearest(values: Sequence[float], target: float) -> int:
    """Index of the value closest to `target` (the first one on a tie)."""
    if not values:
        raise ValueError("nearest: no values")
    return min(range(len(values)), key=lambda i: abs(values[i] - target))
