"""Pure merging math for WARP: task vectors, SLERP, iterative SLERP for M > 2, LITI.

Everything is per tensor so a merger can stream a model one tensor at a time (the distributed merger does);
`merge_state_dicts` is the in-memory convenience over whole state dicts. Math runs in fp32 and the result
is cast back to the input dtype. Non-float tensors are returned unchanged.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # |sin(Omega)| below this (or a zero-norm vector) -> linear interpolation


def slerp(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation of two task vectors (any shape, same shape), fp32 math, d1's dtype out.

    slerp = sin((1-lam) W)/sin W * d1 + sin(lam W)/sin W * d2, W the angle between d1 and d2;
    falls back to (1-lam) d1 + lam d2 when either norm is 0 or sin W ~ 0 (colinear vectors).
    """
    a, b = d1.float().flatten(), d2.float().flatten()
    a64, b64 = a.double(), b.double()  # the angle in fp64: fp32 rounding would hide colinearity
    na, nb = a64.norm().item(), b64.norm().item()
    if na < 1e-12 or nb < 1e-12:
        out = (1 - lam) * a + lam * b
    else:
        cos = max(-1.0, min(1.0, torch.dot(a64, b64).item() / (na * nb)))
        omega = math.acos(cos)
        s = math.sin(omega)
        if s < EPS:
            out = (1 - lam) * a + lam * b
        else:
            out = (math.sin((1 - lam) * omega) / s) * a + (math.sin(lam * omega) / s) * b
    return out.view_as(d1).to(d1.dtype)


def slerp_many(deltas: list[torch.Tensor], lam: float = 0.5) -> torch.Tensor:
    """Merge M task vectors: M = 1 -> itself; M = 2 -> slerp(d1, d2, lam); M > 2 -> fold d_m in with 1/m."""
    if not deltas:
        raise ValueError("slerp_many needs at least one task vector")
    if len(deltas) == 1:
        return deltas[0].clone()
    if len(deltas) == 2:
        return slerp(deltas[0], deltas[1], lam)
    acc = deltas[0].float()
    for m, d in enumerate(deltas[1:], start=2):
        acc = slerp(acc, d.float(), 1.0 / m)
    return acc.to(deltas[0].dtype)


def liti(init: torch.Tensor, target: torch.Tensor, eta: float) -> torch.Tensor:
    """(1 - eta) * init + eta * target in fp32, init's dtype out."""
    return torch.lerp(init.float(), target.float(), eta).to(init.dtype)


CHUNK = 1 << 17  # elements per chunk of the fused merge: its temporaries (a few x 0.5-1 MB) stay in the CPU cache


def slerp_coefficients(gram, lam: float) -> list[float]:
    """Coefficients c of the merged task vector sum_i c_i d_i, from the M x M Gram matrix of the task vectors.

    The same SLERP as `slerp_many`, done on the coefficients instead of the tensors: M = 2 -> slerp(d1, d2, lam);
    M > 2 -> fold d_m in with lambda = 1/m, where the running vector acc = sum_i a_i d_i has |acc|^2 = a^T G a and
    <acc, d_m> = (G a)_m; linear interpolation when a norm is ~0 or sin(Omega) < EPS. Exact up to fp64 rounding.
    """
    g = [[float(x) for x in row] for row in (gram.tolist() if hasattr(gram, "tolist") else gram)]
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


def _destinations(x: torch.Tensor, out: torch.Tensor | None, nxt: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat tensors a merge of x writes theta_slerp and the next theta_init into: the caller's, else new ones."""
    return tuple(torch.empty_like(x) if t is None else t.reshape(-1) for t in (out, nxt))


def merge_pass(init: torch.Tensor, policies: list[torch.Tensor], lam: float, eta: float,
               sft: torch.Tensor | None = None, chunk: int = CHUNK, out: torch.Tensor | None = None,
               nxt: torch.Tensor | None = None, kernel: str = "eager"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tensor of the WARP merge at memory speed: returns (theta_slerp, next theta_init, gram).

    Two chunked sweeps over init and the M policies. Sweep 1 forms the task vectors d_i = p_i - init of a chunk
    (fp32) and accumulates the Gram matrix of the rows [d_1 .. d_M, init - sft] ([M + 1, M + 1]; with sft None the
    last row is 0 and costs nothing) with one fp64 matrix product per chunk (the chunk's rows widened to fp64, so
    products and sums are fp64: no fp64 copy of a tensor). Sweep 2 writes both outputs: theta_slerp = init +
    sum_i c_i d_i (c from `slerp_coefficients`; fp32, as lerp(init, p_1, c_1) + sum_{i>1} c_i d_i) and next =
    lerp(init, theta_slerp, eta), the same op every rank applies to its own slices. The SLERP coefficients need
    the whole tensor's Gram matrix, so the inputs are read twice (the second read of a tensor that fits in the
    CPU's last-level cache can come from there). The Gram matrix carries every diagnostic
    (task-vector norms and angles, |theta_slerp - sft|, how far theta_init moves) and the finiteness of every
    input: a NaN/inf in a policy or in init makes a diagonal entry non-finite. Temporaries: a few chunks.
    `out` / `nxt`: destinations (init's dtype and number of elements) to write into instead of new tensors, so a
    caller that merges tensor after tensor reuses its buffers (fresh memory costs a page fault per 4 KiB).
    `kernel="compiled"`: tensors of at least COMPILED_MIN elements go through `compiled_merge_pass` (the whole merge as one
    torch.compile graph: each sweep one fused loop, no temporaries; fp32 products summed in fp64), smaller ones
    stay eager. `kernel="native"`: the same math as "compiled" in a C++ function (`native.merge`) for every size
    (the same output bits whenever both round the SLERP coefficients alike: their Gram sums add the products in
    another order); more than `native.max_policies()` policies go through the compiled graph (from COMPILED_MIN
    elements), other tensors it does not take (dtypes other than fp32/bf16, mixed dtypes) stay eager.
    Outputs in init's dtype.
    """
    M = len(policies)
    if not init.is_floating_point():
        return init, init, torch.zeros(M + 1, M + 1, dtype=torch.float64)
    x = init.reshape(-1)
    ps = [p.reshape(-1) for p in policies]
    f = sft.reshape(-1) if sft is not None else None
    n = x.numel()
    for name, t in (("out", out), ("nxt", nxt)):
        if t is not None and (t.numel() != n or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"merge_pass {name}: needs a contiguous {x.dtype} tensor of {n} elements, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"merge_pass kernel={kernel!r}: allowed {', '.join(KERNELS)}")
    if kernel == "compiled" and n >= COMPILED_MIN:
        return compiled_merge_pass(x, ps, f, lam, eta, out, nxt, init)
    if kernel == "native":
        from . import native

        if native.supports(x, ps, f):
            out, nxt = _destinations(x, out, nxt)
            gram = native.merge(x, ps, f, lam, eta, out, nxt)
            return out.view_as(init), nxt.view_as(init), gram
        if M > native.max_policies() and n >= COMPILED_MIN:  # more policies than the kernel takes: the graph
            return compiled_merge_pass(x, ps, f, lam, eta, out, nxt, init)
    c = max(1, min(chunk, n))
    k = M + (1 if f is not None else 0)  # rows actually formed
    rows = torch.empty(k, c, dtype=torch.float32)
    base_buf = None if x.dtype == torch.float32 else torch.empty(c, dtype=torch.float32)

    def as_fp32(t: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
        """t[a:b] in fp32: a view when t is fp32, else converted into buf."""
        if t.dtype == torch.float32:
            return t[a:b]
        v = buf[: b - a]
        v.copy_(t[a:b])
        return v

    r64 = torch.empty(k, c, dtype=torch.float64)
    g = torch.zeros(k, k, dtype=torch.float64)
    for a in range(0, n, c):
        b = min(a + c, n)
        w = b - a
        base = as_fp32(x, a, b, base_buf)
        for i, p in enumerate(ps):
            torch.sub(as_fp32(p, a, b, rows[i]), base, out=rows[i, :w])
        if f is not None:
            torch.sub(base, as_fp32(f, a, b, rows[M]), out=rows[M, :w])
        r = r64[:, :w]
        r.copy_(rows[:, :w])
        g.addmm_(r, r.T)
    del r64
    gram = torch.zeros(M + 1, M + 1, dtype=torch.float64)
    gram[:k, :k] = g
    coef = slerp_coefficients(gram[:M, :M], lam)
    out, nxt = _destinations(x, out, nxt)
    same = x.dtype == torch.float32
    acc = None if same else torch.empty(c, dtype=torch.float32)
    tmp = rows[0]
    for a in range(0, n, c):
        b = min(a + c, n)
        w = b - a
        base = as_fp32(x, a, b, base_buf)
        o = out[a:b] if same else acc[:w]
        torch.lerp(base, as_fp32(ps[0], a, b, tmp), coef[0], out=o)  # init + c_1 d_1
        for i in range(1, M):
            t = tmp[:w]
            torch.sub(as_fp32(ps[i], a, b, tmp), base, out=t)
            o.add_(t, alpha=coef[i])
        if same:
            torch.lerp(base, o, eta, out=nxt[a:b])
        else:
            out[a:b].copy_(o)
            torch.lerp(base, o, eta, out=o)
            nxt[a:b].copy_(o)
    return out.view_as(init), nxt.view_as(init), gram


KERNELS = ("eager", "compiled", "native")
COMPILED_MIN = 1 << 16  # smaller tensors merge eagerly (fixed costs of a compiled call; 64 K: 0.27 vs 0.43 ms)
_COMPILED: dict[tuple, object] = {}


def slerp_coefficients_tensor(gram: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """`slerp_coefficients` in tensor ops (no Python branches, so it compiles into the merge's graph): the same
    fold, the same fallbacks to linear interpolation (torch.where); fp64 in, fp64 [M] out."""
    m = gram.shape[0]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    acc = eye[0]
    for j in range(1, m):
        t = lam if m == 2 else torch.full_like(lam, 1.0 / (j + 1))
        aa = (acc[:, None] * gram * acc[None, :]).sum()  # acc^T G acc, element-wise: no matmul call in the graph
        ab = (acc * gram[:, j]).sum()
        na, nb = aa.clamp(min=0).sqrt(), gram[j, j].clamp(min=0).sqrt()
        ok = (na >= 1e-12) & (nb >= 1e-12)
        cos = torch.where(ok, ab / torch.where(ok, na * nb, torch.ones_like(na)), torch.zeros_like(ab))
        omega = torch.acos(cos.clamp(-1.0, 1.0))
        s = torch.sin(omega)
        use = ok & (s >= EPS)
        safe = torch.where(use, s, torch.ones_like(s))
        w1 = torch.where(use, torch.sin((1 - t) * omega) / safe, 1 - t)
        w2 = torch.where(use, torch.sin(t * omega) / safe, t)
        acc = w1 * acc + w2 * eye[j]
    return acc


# Gram entries of the compiled merge: fp32 sums over blocks of this many products, then fp64 over the blocks. Summing
# every product in fp64 needed six fp64 accumulators of the CPU kernel's whole tile (32 lanes for bf16 inputs, so
# 24 of the 32 AVX-512 registers) and ran compute-bound: a bf16 Gram of 8 M elements took 12.0 ms against 1.8 ms
# blocked (fp32 5.3 -> 3.8 ms), for a relative difference of ~1e-7 on these sums.
GRAM_BLOCK = 256


def _fused_merge(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None, lam: torch.Tensor,
                 eta: torch.Tensor, out: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """The whole merge of one flat tensor as one graph: the Gram matrix of [p_i - x ..., x - f] (fp32 differences,
    as the eager sweep forms them; fp32 products summed in fp32 over blocks of GRAM_BLOCK elements and the block sums
    in fp64), the SLERP coefficients from it, then out = x + sum_i c_i (p_i - x) and
    nxt = lerp(x, out, eta) in fp32, stored in x's dtype. Returns the [M + 1, M + 1] Gram matrix (its last row and
    column 0 when f is None)."""
    b = x.float()
    rows = [p.float() - b for p in ps]
    if f is not None:
        rows.append(b - f.float())
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
    gram = torch.stack([torch.stack([entry[(min(i, j), max(i, j))] if max(i, j) < k else zero for j in range(m1)])
                        for i in range(m1)])
    coef = slerp_coefficients_tensor(gram[: len(ps), : len(ps)], lam).float()
    d = coef[0] * rows[0]
    for i in range(1, len(ps)):
        d = d + coef[i] * rows[i]
    o = b + d
    out.copy_(o)
    nxt.copy_(torch.lerp(b, o, eta))
    return gram


def compiled_merge(dtype: torch.dtype, num_policies: int, with_sft: bool):
    """`_fused_merge` under torch.compile, one compiled function per variant (dtype, M, sft or not) on a code object
    of its own, so dynamo's recompile limit (8 per code object) counts shapes of one variant only; dynamic shapes:
    any length, one compile. Needs a C++ compiler on CPU (inductor); the first call of a variant compiles (seconds;
    inductor caches the result on disk for later processes)."""
    key = (dtype, num_policies, with_sft)
    if key not in _COMPILED:
        name = f"_fused_merge_{str(dtype).split('.')[-1]}_m{num_policies}{'_sft' if with_sft else ''}"
        fn = type(_fused_merge)(_fused_merge.__code__.replace(co_name=name), _fused_merge.__globals__, name)
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def compiled_merge_pass(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None, lam: float, eta: float,
                        out: torch.Tensor | None, nxt: torch.Tensor | None, like: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge_pass` on flat tensors with the compiled graph: each sweep one fused loop that reads its inputs once."""
    M = len(ps)
    fn = compiled_merge(x.dtype, M, f is not None)
    out, nxt = _destinations(x, out, nxt)
    gram = fn(x, ps, f, _scalar(lam, torch.float64), _scalar(eta, torch.float32), out, nxt)
    return out.view_as(like), nxt.view_as(like), gram


_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(v: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor holding v, made once per (value, dtype): a run merges every tensor with the same lam and eta, and
    the compiled merge takes them as tensors (no recompile per value)."""
    key = (float(v), dtype)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 64:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(float(v), dtype=dtype)
    return t


def compiler_available() -> str:
    """'' when `kernel="compiled"` can run here (the merge runs on CPU: inductor needs a C++ compiler), else why not."""
    from . import native

    if native.compiler() is None:
        return f"torch.compile on CPU needs a C++ compiler ({' or '.join(native.compiler_names())}) on PATH; none was found"
    return ""


AUTO_EAGER_GBPS = 3.0  # what the eager merge moves per second on a 2-core CPU (benchmarks/merge.py), counted bytes
AUTO_MIN_EAGER_S = 30.0  # auto leaves eager when the run's eager merges would take at least this long


def kernel_for(setting: str, float_bytes: int, num_policies: int, iterations: int) -> str:
    """merge.kernel resolved. auto: eager unless the run's eager merges, (M + 3) x the model's float bytes per
    iteration at AUTO_EAGER_GBPS, would take >= AUTO_MIN_EAGER_S; then native when its kernel builds here (a C++
    compiler, ~1 s once per machine), else compiled when torch.compile can run (~5-25 s of compiling), else eager."""
    if setting != "auto":
        return setting
    eager_s = float_bytes * (num_policies + 3) * iterations / (AUTO_EAGER_GBPS * 1e9)
    if eager_s < AUTO_MIN_EAGER_S:
        return "eager"
    from . import native

    if not native.unavailable():
        return "native"
    return "compiled" if not compiler_available() else "eager"


def merge_tensor(init: torch.Tensor, policies: list[torch.Tensor], lam: float, eta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor of the WARP merge: returns (theta_slerp, next theta_init) (`merge_pass` without its Gram matrix).

    theta_slerp = init + slerp_many(policies - init); next init = liti(init, theta_slerp, eta).
    Non-float tensors come back unchanged (both outputs are `init`).
    """
    if not init.is_floating_point():
        return init, init
    merged, nxt, _ = merge_pass(init, policies, lam, eta)
    return merged, nxt


def merge_tensor_reference(init: torch.Tensor, policies: list[torch.Tensor], lam: float, eta: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge written plainly on whole tensors (task vectors, `slerp_many`, `liti`): what `merge_pass` must equal."""
    if not init.is_floating_point():
        return init, init
    base = init.float()
    delta = slerp_many([p.float() - base for p in policies], lam)
    merged = base + delta
    return merged.to(init.dtype), liti(base, merged, eta).to(init.dtype)


def gram_diagnostics(gram: torch.Tensor, coef: list[float], eta: float) -> dict:
    """What one tensor's `merge_pass` Gram matrix says: squared distances |theta_slerp - init|^2 = c^T G c,
    |next - init|^2 = eta^2 c^T G c and |theta_slerp - sft|^2 = |init - sft|^2 + 2 c . <init - sft, d> + c^T G c."""
    M = len(coef)
    cv = torch.tensor(coef, dtype=torch.float64)
    g = gram[:M, :M]
    moved = float(cv @ g @ cv)
    to_sft = float(gram[M, M] + 2 * (cv @ gram[M, :M]) + moved)
    return {"slerp_distance_to_init": moved, "init_moved": eta * eta * moved, "slerp_distance_to_sft": max(to_sft, 0.0)}


def storage_key(v: torch.Tensor) -> tuple:
    if v.numel() == 0:
        return (id(v),)
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))


def unique_names(state: dict[str, torch.Tensor]) -> list[str]:
    """State-dict keys with tied tensors (same storage) listed once, first name kept."""
    seen: set[tuple] = set()
    names = []
    for k, v in state.items():
        key = storage_key(v)
        if key not in seen:
            seen.add(key)
            names.append(k)
    return names


def clone_state(state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached copy of a state dict on `device` (float tensors cast to `dtype` when given) that keeps tied tensors
    tied (one copy per storage)."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        key = storage_key(v)
        if key not in copies:
            cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
            copies[key] = v.detach().to(device, cast, copy=True)
        out[k] = copies[key]
    return out


def interpolate_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], eta: float) -> dict[str, torch.Tensor]:
    """(1 - eta) * a + eta * b for every key of `a` (the LITI / eta front); ties shared, non-float from `a`."""
    out, done = {}, {}
    for k, v in a.items():
        key = storage_key(v)
        if key not in done:
            done[key] = liti(v, b[k], eta) if v.is_floating_point() else v
        out[k] = done[key]
    return out


def merge_state_dicts(init: dict[str, torch.Tensor], policies: list[dict[str, torch.Tensor]], lam: float,
                      eta: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whole-model merge: (theta_slerp, next theta_init) with every key of `init`; tied tensors merged once
    and shared again in the outputs."""
    slerped, nxt, done = {}, {}, {}
    for k, v in init.items():
        key = storage_key(v)
        if key not in done:
            done[key] = merge_tensor(v, [p[k] for p in policies], lam, eta)
        slerped[k], nxt[k] = done[key]
    return slerped, nxt


def accumulate_dots(dots: torch.Tensor, init: torch.Tensor, policies: list[torch.Tensor]) -> None:
    """In place: dots[i, j] += <p_i - init, p_j - init> for one tensor (fp64 accumulation)."""
    base = init.double().flatten()
    ds = [p.double().flatten() - base for p in policies]
    for i in range(len(ds)):
        for j in range(i, len(ds)):
            v = torch.dot(ds[i], ds[j])
            dots[i, j] += v
            if i != j:
                dots[j, i] += v


def stats_from_dots(dots: torch.Tensor) -> dict:
    """Task-vector norms, pairwise cosines and angles (degrees) from the M x M Gram matrix of task vectors."""
    m = dots.shape[0]
    norms = [math.sqrt(max(dots[i, i].item(), 0.0)) for i in range(m)]
    cos, ang = {}, {}
    for i in range(m):
        for j in range(i + 1, m):
            c = dots[i, j].item() / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else float("nan")
            cos[f"{i}-{j}"] = c
            ang[f"{i}-{j}"] = math.degrees(math.acos(max(-1.0, min(1.0, c)))) if c == c else float("nan")
    return {"task_vector_norm": norms, "cosine": cos, "angle_deg": ang}


def task_vector_stats(init: dict[str, torch.Tensor], policies: list[dict[str, torch.Tensor]]) -> dict:
    """Diagnostics over whole state dicts: global norm of each task vector, pairwise cosines and angles."""
    dots = torch.zeros(len(policies), len(policies), dtype=torch.float64)
    for k in unique_names(init):
        if init[k].is_floating_point():
            accumulate_dots(dots, init[k], [p[k] for p in policies])
    return stats_from_dots(dots)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Global L2 distance between two state dicts over their (untied) float tensors."""
    tot = 0.0
    for k in unique_names(a):
        if a[k].is_floating_point():
            tot += (a[k].double() - b[k].double()).pow(2).sum().item()
    return math.sqrt(tot)
