"""merge.kernel=compiled: the merge of one flat tensor as two torch.compile graphs, each sweep one fused loop that
reads its inputs once and makes no temporaries: the Gram matrix, then (with the merge method's coefficients from it,
merging.methods) the outputs. Needs a C++ compiler on CPU (inductor); the first call of a variant compiles (seconds;
inductor caches the result on disk for later processes).
"""

from __future__ import annotations

import torch

from .methods import coefficients

# Gram entries: fp32 sums over blocks of this many products, then fp64 over the blocks. Summing every product in fp64
# needed six fp64 accumulators of the CPU kernel's whole tile (32 lanes for bf16 inputs, so 24 of the 32 AVX-512
# registers) and ran compute-bound: a bf16 Gram of 8 M elements took 12.0 ms against 1.8 ms blocked (fp32 5.3 ->
# 3.8 ms), for a relative difference of ~1e-7 on these sums.
GRAM_BLOCK = 256
COMPILED_MIN = 1 << 16  # smaller tensors merge eagerly (fixed costs of a compiled call; 64 K: 0.27 vs 0.43 ms)
_COMPILED: dict[tuple, object] = {}


def _rows(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x in fp32 and the rows [p_i - x ..., x - f] (fp32 differences, as the eager sweep forms them)."""
    b = x.float()
    rows = [p.float() - b for p in ps]
    if f is not None:
        rows.append(b - f.float())
    return b, rows


def _fused_gram(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None) -> torch.Tensor:
    """The [M + 1, M + 1] Gram matrix of the rows (fp32 products summed in fp32 over blocks of GRAM_BLOCK elements,
    the block sums in fp64; its last row and column 0 when f is None)."""
    _, rows = _rows(x, ps, f)
    k = len(rows)
    n = rows[0].shape[0]
    m = ((n - 2) // GRAM_BLOCK) * GRAM_BLOCK  # the blocked part; a tail of 2..GRAM_BLOCK + 1 elements (never 0 or 1)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    prods = [rows[i] * rows[j] for i, j in pairs]
    # the block sums of every entry side by side ([n // GRAM_BLOCK, pairs]), so one reduction sums them all in fp64
    blocks = torch.stack([p[:m].reshape(-1, GRAM_BLOCK).sum(1) for p in prods], dim=1)
    sums = blocks.double().sum(0) + torch.stack([p[m:].double().sum() for p in prods])
    entry = {pair: sums[q] for q, pair in enumerate(pairs)}
    zero = torch.zeros((), dtype=torch.float64)
    m1 = len(ps) + 1  # [M + 1, M + 1] as merge_pass returns it: row and column M are 0 without sft
    return torch.stack([torch.stack([entry[(min(i, j), max(i, j))] if max(i, j) < k else zero for j in range(m1)])
                        for i in range(m1)])


def _fused_apply(x: torch.Tensor, ps: list[torch.Tensor], coef: torch.Tensor, eta: torch.Tensor, out: torch.Tensor,
                 nxt: torch.Tensor) -> None:
    """out = x + sum_i coef_i (p_i - x) and nxt = lerp(x, out, eta) in fp32, stored in x's dtype."""
    b, rows = _rows(x, ps, None)
    d = coef[0] * rows[0]
    for i in range(1, len(ps)):
        d = d + coef[i] * rows[i]
    o = b + d
    out.copy_(o)
    nxt.copy_(torch.lerp(b, o, eta))


def _compiled(fn, key: tuple, name: str):
    """`fn` under torch.compile, one compiled function per variant on a code object of its own, so dynamo's recompile
    limit (8 per code object) counts shapes of one variant only; dynamic shapes: any length, one compile."""
    if key not in _COMPILED:
        own = type(fn)(fn.__code__.replace(co_name=name), fn.__globals__, name)
        _COMPILED[key] = torch.compile(own, dynamic=True)
    return _COMPILED[key]


def compiled_gram(dtype: torch.dtype, num_policies: int, with_sft: bool):
    tag = f"{str(dtype).split('.')[-1]}_m{num_policies}{'_sft' if with_sft else ''}"
    return _compiled(_fused_gram, ("gram", dtype, num_policies, with_sft), f"_fused_gram_{tag}")


def compiled_apply(dtype: torch.dtype, num_policies: int):
    tag = f"{str(dtype).split('.')[-1]}_m{num_policies}"
    return _compiled(_fused_apply, ("apply", dtype, num_policies), f"_fused_apply_{tag}")


def compiled_merge_pass(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None, lam: float, eta: float,
                        out: torch.Tensor | None = None, nxt: torch.Tensor | None = None,
                        like: torch.Tensor | None = None, method: str = "slerp"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_pass` on flat tensors with the compiled graphs: (merged, next theta_init, Gram), the outputs written
    into `out` / `nxt` when given and shaped like `like` (default: flat)."""
    M = len(ps)
    out = torch.empty_like(x) if out is None else out
    nxt = torch.empty_like(x) if nxt is None else nxt
    gram = compiled_gram(x.dtype, M, f is not None)(x, ps, f)
    coef = torch.tensor(coefficients(method, gram[:M, :M], lam), dtype=torch.float32)
    compiled_apply(x.dtype, M)(x, ps, coef, _scalar(eta, torch.float32), out, nxt)
    like = x if like is None else like
    return out.view_as(like), nxt.view_as(like), gram


_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(v: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor holding v, made once per (value, dtype): a run merges every tensor with the same eta, and the
    compiled merge takes it as a tensor (no recompile per value)."""
    key = (float(v), dtype)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 64:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(float(v), dtype=dtype)
    return t
