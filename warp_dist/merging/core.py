"""Pure merging math for WARP: task vectors, SLERP, iterative SLERP for M > 2, LITI.

Everything is per tensor so a merger can stream a model one tensor at a time (the distributed merger does);
`merge_state_dicts` is the in-memory convenience over whole state dicts. Math runs in fp32 and the result
is cast back to the input dtype. Non-float tensors are returned unchanged.
"""

from __future__ import annotations

import math

import torch

from .compiled import COMPILED_MIN, compiled_merge_pass
from .methods import EPS, METHODS, coefficients


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


def _destinations(x: torch.Tensor, out: torch.Tensor | None, nxt: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat tensors a merge of x writes theta_slerp and the next theta_init into: the caller's, else new ones."""
    return tuple(torch.empty_like(x) if t is None else t.reshape(-1) for t in (out, nxt))


def merge_pass(init: torch.Tensor, policies: list[torch.Tensor], lam: float, eta: float,
               sft: torch.Tensor | None = None, chunk: int = CHUNK, out: torch.Tensor | None = None,
               nxt: torch.Tensor | None = None, kernel: str = "eager", method: str = "slerp"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tensor of the WARP merge at memory speed: returns (theta_merged, next theta_init, gram).

    Two sweeps over init and the M policies. Sweep 1 forms the task vectors d_i = p_i - init (fp32) and the Gram
    matrix of the rows [d_1 .. d_M, init - sft] ([M + 1, M + 1], fp64 sums; with sft None the last row is 0 and costs
    nothing). The merge method (`merge.method`, merging.methods) turns its top-left M x M block into coefficients c.
    Sweep 2 writes both outputs: theta_merged = init + sum_i c_i d_i (fp32) and next = lerp(init, theta_merged, eta),
    the same op every rank applies to its own slices. The coefficients need the whole tensor's Gram matrix, so the
    inputs are read twice (the second read of a tensor that fits in the CPU's last-level cache can come from there).
    The Gram matrix carries every diagnostic (task-vector norms and angles, |theta_merged - sft|, how far theta_init
    moves) and the finiteness of every input: a NaN/inf in a policy or in init makes a diagonal entry non-finite.
    `out` / `nxt`: destinations (init's dtype and number of elements) to write into instead of new tensors, so a
    caller that merges tensor after tensor reuses its buffers (fresh memory costs a page fault per 4 KiB).
    `kernel`: "eager" (chunks of `chunk` elements: a fp64 matrix product per chunk for the Gram, temporaries of a
    few chunks); "compiled" (tensors of at least COMPILED_MIN elements through two torch.compile graphs, each sweep
    one fused loop; fp32 products summed in fp32 blocks, then fp64), smaller ones eager; "native" (the same math in
    C++, merging.native, for every size; the compiled graphs' output bits for the same coefficients), more than
    `native.max_policies()` policies through the compiled graphs, tensors it does not take (dtypes other than
    fp32/bf16, mixed dtypes) eager. Outputs in init's dtype.
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
    if method not in METHODS:
        raise ValueError(f"merge_pass method={method!r}: allowed {', '.join(METHODS)}")
    path = kernel
    if kernel == "native":
        from . import native

        if not native.supports(x, ps, f):  # more policies than the kernel takes: the compiled graphs, if it's large
            path = "compiled" if M > native.max_policies() else "eager"
    if path == "compiled" and n < COMPILED_MIN:
        path = "eager"
    out, nxt = _destinations(x, out, nxt)
    if path == "compiled":
        gram = compiled_merge_pass(x, ps, f, lam, eta, out, nxt, method=method)[2]
    elif path == "native":
        gram = native.gram(x, ps, f)
        native.apply(x, ps, coefficients(method, gram[:M, :M], lam), eta, out, nxt)
    else:
        sweeps = EagerSweeps(x, ps, f, chunk)
        gram = sweeps.gram()
        sweeps.apply(coefficients(method, gram[:M, :M], lam), eta, out, nxt)
    return out.view_as(init), nxt.view_as(init), gram


class EagerSweeps:
    """merge_pass's two sweeps in chunked torch ops (kernel="eager"), sharing their chunk buffers."""

    def __init__(self, x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None, chunk: int = CHUNK):
        self.x, self.ps, self.f = x, ps, f
        self.n = x.numel()
        self.c = max(1, min(chunk, self.n))
        self.k = len(ps) + (1 if f is not None else 0)  # rows actually formed
        self.rows = torch.empty(self.k, self.c, dtype=torch.float32)
        self.base_buf = None if x.dtype == torch.float32 else torch.empty(self.c, dtype=torch.float32)

    @staticmethod
    def as_fp32(t: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
        """t[a:b] in fp32: a view when t is fp32, else converted into buf."""
        if t.dtype == torch.float32:
            return t[a:b]
        v = buf[: b - a]
        v.copy_(t[a:b])
        return v

    def gram(self) -> torch.Tensor:
        """Sweep 1: [M + 1, M + 1] fp64 Gram matrix (the chunk's rows widened to fp64: fp64 products and sums)."""
        M, k, c, rows, f = len(self.ps), self.k, self.c, self.rows, self.f
        r64 = torch.empty(k, c, dtype=torch.float64)
        g = torch.zeros(k, k, dtype=torch.float64)
        for a in range(0, self.n, c):
            b = min(a + c, self.n)
            w = b - a
            base = self.as_fp32(self.x, a, b, self.base_buf)
            for i, p in enumerate(self.ps):
                torch.sub(self.as_fp32(p, a, b, rows[i]), base, out=rows[i, :w])
            if f is not None:
                torch.sub(base, self.as_fp32(f, a, b, rows[M]), out=rows[M, :w])
            r = r64[:, :w]
            r.copy_(rows[:, :w])
            g.addmm_(r, r.T)
        gram = torch.zeros(M + 1, M + 1, dtype=torch.float64)
        gram[:k, :k] = g
        return gram

    def apply(self, coef: list[float], eta: float, out: torch.Tensor, nxt: torch.Tensor) -> None:
        """Sweep 2: out = lerp(init, p_1, c_1) + sum_{i>1} c_i d_i and nxt = lerp(init, out, eta), in fp32."""
        x, ps, c = self.x, self.ps, self.c
        same = x.dtype == torch.float32
        acc = None if same else torch.empty(c, dtype=torch.float32)
        tmp = self.rows[0]
        for a in range(0, self.n, c):
            b = min(a + c, self.n)
            w = b - a
            base = self.as_fp32(x, a, b, self.base_buf)
            o = out[a:b] if same else acc[:w]
            torch.lerp(base, self.as_fp32(ps[0], a, b, tmp), coef[0], out=o)  # init + c_1 d_1
            for i in range(1, len(ps)):
                t = tmp[:w]
                torch.sub(self.as_fp32(ps[i], a, b, tmp), base, out=t)
                o.add_(t, alpha=coef[i])
            if same:
                torch.lerp(base, o, eta, out=nxt[a:b])
            else:
                out[a:b].copy_(o)
                torch.lerp(base, o, eta, out=o)
                nxt[a:b].copy_(o)


KERNELS = ("eager", "compiled", "native")


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
