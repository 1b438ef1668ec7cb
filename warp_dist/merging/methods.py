"""Merge methods (`merge.method`): how the M task vectors d_i = theta_i - theta_init of one tensor combine into
sum_i c_i d_i, with the coefficients c computed from the tensor's Gram matrix G_ij = <d_i, d_j> (fp64).

Every merge kernel (eager, compiled, native; merging.core.merge_pass) computes the Gram matrix, asks the method for c,
then writes theta_init + sum_i c_i d_i: a method is that one function, registered in METHODS.

- slerp (WARP, arXiv 2406.16768 section 3): spherical interpolation; M = 2 -> slerp(d1, d2, lam), M > 2 -> the m-th
  vector folded in with lambda = 1/m.
- lerp (the paper's linear-interpolation ablation, section 5): weight averaging, (1 - lam) d1 + lam d2 for M = 2 and
  the mean (1/M each) for M > 2, which is the same fold with straight lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

EPS = 1e-6  # |sin(Omega)| below this (or a zero-norm vector) -> linear interpolation

Gram = Sequence[Sequence[float]]  # [M][M] fp64 values (a nested list or a tensor's .tolist())
Coefficients = Callable[[Gram, float], list[float]]


def _rows(gram) -> list[list[float]]:
    return [[float(x) for x in row] for row in (gram.tolist() if hasattr(gram, "tolist") else gram)]


def slerp_coefficients(gram, lam: float) -> list[float]:
    """Coefficients c of the merged task vector sum_i c_i d_i, from the M x M Gram matrix of the task vectors.

    The same SLERP as `core.slerp_many`, done on the coefficients instead of the tensors: M = 2 -> slerp(d1, d2, lam);
    M > 2 -> fold d_m in with lambda = 1/m, where the running vector acc = sum_i a_i d_i has |acc|^2 = a^T G a and
    <acc, d_m> = (G a)_m; linear interpolation when a norm is ~0 or sin(Omega) < EPS. Exact up to fp64 rounding.
    """
    g = _rows(gram)
    m = len(g)
    if m == 0:
        raise ValueError("slerp_coefficients needs at least one task vector")
    acc = [1.0] + [0.0] * (m - 1)
    for j in range(1, m):
        t = lam if m == 2 else 1.0 / (j + 1)
        aa = sum(acc[i] * acc[k] * g[i][k] for i in range(m) for k in range(m))
        ab = sum(acc[i] * g[i][j] for i in range(m))
        na, nb = math.sqrt(max(aa, 0.0)), math.sqrt(max(g[j][j], 0.0))
        w1, w2 = 1 - t, t
        if na >= 1e-12 and nb >= 1e-12:
            omega = math.acos(max(-1.0, min(1.0, ab / (na * nb))))
            s = math.sin(omega)
            if s >= EPS:
                w1, w2 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
        acc = [w1 * a for a in acc]
        acc[j] += w2
    return acc


def lerp_coefficients(gram, lam: float) -> list[float]:
    """Linear interpolation: [1 - lam, lam] for M = 2, 1/M each otherwise (the Gram matrix only gives M)."""
    m = len(_rows(gram))
    if m == 0:
        raise ValueError("lerp_coefficients needs at least one task vector")
    return [1.0 - lam, lam] if m == 2 else [1.0 / m] * m


METHODS: dict[str, Coefficients] = {"slerp": slerp_coefficients, "lerp": lerp_coefficients}


def coefficients(method: str, gram, lam: float) -> list[float]:
    """The coefficients `method` gives for this Gram matrix (ValueError naming the methods there are)."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"merge.method={method!r}: allowed {' | '.join(METHODS)}") from None
    return fn(gram, lam)
