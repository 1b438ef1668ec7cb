"""Merge phase: the M policies' task vectors merged (`merge.method`: SLERP, or LERP), then LITI.

Rank 0 merges tensor by tensor as the policies stream in (`dist.stream_merge`): it writes theta_slerp and the next
theta_init as fp32 safetensors (state/blobs) and accumulates the diagnostics from each tensor's Gram matrix; every rank
takes theta_slerp into its policy module, and a ZeRO-3 rank writes its own slices of the next theta_init.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import dist as distmod
from .. import faults, merging
from ..guards import RunError, check_finite, where
from ..weights import SafeFile, StreamWriter, source_part
from .policy import InitStore
from .session import Session


class NoProgressError(RunError):
    """Training left the weights where they started: the failure mode WARP runs must never hide."""


def init_file(s: Session, iteration: int) -> tuple[Path, bool]:
    """(file, whole tensors?) of this rank's theta_init of `iteration` (> 1). A rank whose slices are whole tensors
    (not ZeRO-3; rank 0 alone in its group) reads rank 0's file of whole tensors; only ZeRO-3 ranks compute and write
    their own slices (under DDP every rank of a group had computed and written the same whole file)."""
    blobs = s.state_dir / "blobs"
    if not s.weights.zero3 or (s.dist.is_main and s.dist.group_size == 1):
        return blobs / f"iter{iteration}_init.safetensors", True
    return blobs / f"iter{iteration}_init.rank{s.dist.rank}.safetensors", False


def merge(s: Session, iteration: int, policy_paths: dict[int, Path]) -> dict:
    """Merge + LITI of this iteration's policies, tensor by tensor (see dist.stream_merge).

    After it: every rank's theta_init (`s.init`) is the next theta_init, its policy module holds theta_slerp, and
    rank 0 has written both as fp32 safetensors (state/blobs); returns the merge diagnostics (every rank).
    """
    cfg, d, w = s.cfg, s.dist, s.weights
    files = {m: SafeFile(p) for m, p in policy_paths.items() if d.topo.leader_of_policy(m) == d.rank}
    sources = {m: (lambda name, f=f: f.get(name)) for m, f in files.items()}
    blobs = s.state_dir / "blobs"
    stats = MergeDiagnostics(d.topo.num_policies, cfg.merge.method) if d.is_main else None
    full_init = blobs / f"iter{iteration + 1}_init.safetensors"
    own_init, own_is_full = init_file(s, iteration + 1)
    writers = []
    if d.is_main:
        specs = [(n, w.shapes[n], torch.float32) for n in w.names]
        writers = [StreamWriter(blobs / f"iter{iteration}_slerp.safetensors", specs), StreamWriter(full_init, specs)]
    mine = None if own_is_full else StreamWriter(own_init, s.init.parts_specs())
    at = where(iteration, phase="merge")

    def on_main(name, init, slerp, nxt, policies, gram):
        if not bool(torch.isfinite(gram).all()):  # a NaN/inf in a policy or in theta_init: name it
            for m, t in enumerate(policies):
                check_finite(t, f"policy {m} tensor {name}", at)
            check_finite(init, f"theta_init tensor {name}", at)
        check_finite(torch.tensor(merging.coefficients(cfg.merge.method, gram[:-1, :-1], cfg.merge.lam)),
                     f"merge coefficients of {name}", at)
        stats.add(init.numel(), gram, cfg.merge.lam, cfg.merge.eta)
        writers[0].add(name, slerp)
        writers[1].add(name, nxt)

    first = iteration == 1  # theta_init is the SFT model: |theta_slerp - sft| needs no second read
    numels = [int(torch.Size(w.shapes[n]).numel()) for n in w.names]
    model_bytes = 4 * sum(numels)  # merged in fp32
    kernel = merging.kernel_for(cfg.merge.kernel, model_bytes, d.topo.num_policies, cfg.train.iterations)
    largest = max(numels)
    reused: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def merge_fn(name, init_full, policies):
        sft = None if first else s.sft.full(name)
        dt, n = init_full.dtype, init_full.numel()
        if dt.is_floating_point and dt not in reused:  # output buffers for every tensor: no fresh pages each time
            reused[dt] = (torch.empty(largest, dtype=dt), torch.empty(largest, dtype=dt))
        out, nxt = (reused[dt][0][:n], reused[dt][1][:n]) if dt.is_floating_point else (None, None)
        # safe to reuse: on_main writes both to files and on_slerp copies theta_slerp out before the next tensor
        return merging.merge_pass(init_full, policies, cfg.merge.lam, cfg.merge.eta, sft=sft, kernel=kernel,
                                  out=out, nxt=nxt, method=cfg.merge.method)

    half = w.names[len(w.names) // 2]

    def on_slerp(name, full):
        if name == half:
            faults.point("merge")
        start, count = w.span(name)
        part = source_part(lambda _: full)(name, start, count)
        if mine is not None:  # the next theta_init (LITI) of this rank's slice, as rank 0 computes it
            mine.add(name, torch.lerp(s.init.own(name), part, cfg.merge.eta))
        w.local(name).copy_(part)  # the policy module now holds theta_slerp (for evaluation and saving)

    every = writers + ([mine] if mine is not None else [])
    try:
        distmod.stream_merge(d, w.names, w.shapes, s.init.own, sources, merge_fn, on_slerp,
                             on_main if d.is_main else None)
        for wr in every:
            wr.close()
        w.written("the merge (theta_slerp)")
    except BaseException:
        for wr in every:
            wr.abort()
        raise
    finally:
        for f in files.values():
            f.close()
    s.init.close()
    d.barrier()  # rank 0's file of the next theta_init is complete before another rank opens it
    s.init = InitStore.from_file(w, own_init, full=own_is_full)
    distmod.trim_allocator()
    diag = d.broadcast_object(stats.summary() if d.is_main else None)
    return {**diag, "merge_kernel": kernel} if isinstance(diag, dict) else diag


class MergeDiagnostics:
    """Accumulated on rank 0 during the merge, tensor by tensor, from each tensor's `merging.merge_pass` Gram matrix
    (no extra pass over the weights): the task vectors' whole-model Gram matrix (norms and angles), the per-tensor
    angles between the task vectors the merge combined (size-weighted min / median / max), and how far theta_init and
    the merged weights moved."""

    def __init__(self, num_policies: int, method: str = "slerp"):
        self.M, self.method = num_policies, method
        self.dots = torch.zeros(num_policies, num_policies, dtype=torch.float64)
        self.tensor_angles: dict[str, list[tuple[float, int]]] = {}
        self.sq = {"init_moved": 0.0, "slerp_distance_to_init": 0.0, "slerp_distance_to_sft": 0.0}

    def add(self, numel: int, gram: torch.Tensor, lam: float, eta: float) -> None:
        """One tensor: `gram` is merge_pass's [M + 1, M + 1] Gram matrix of [task vectors..., init - sft]."""
        M = self.M
        g = gram[:M, :M]
        self.dots += g
        for k, v in merging.gram_diagnostics(gram, merging.coefficients(self.method, g, lam), eta).items():
            self.sq[k] += v
        for i in range(M):
            for j in range(i + 1, M):
                denom = math.sqrt(max(g[i, i].item(), 0.0) * max(g[j, j].item(), 0.0))
                if denom > 0:
                    ang = math.degrees(math.acos(max(-1.0, min(1.0, g[i, j].item() / denom))))
                    self.tensor_angles.setdefault(f"{i}-{j}", []).append((ang, numel))

    def summary(self) -> dict:
        out = merging.stats_from_dots(self.dots)
        out["tensor_angle_deg"] = {k: weighted_quantiles(v) for k, v in self.tensor_angles.items()}
        out.update({k: math.sqrt(v) for k, v in self.sq.items()})
        return out


def weighted_quantiles(values: list[tuple[float, int]]) -> dict:
    """min / size-weighted median / max of (value, weight) pairs."""
    vs = sorted(values)
    total = sum(w for _, w in vs)
    acc, median = 0, vs[-1][0]
    for v, w in vs:
        acc += w
        if acc >= total / 2:
            median = v
            break
    return {"min": vs[0][0], "median": median, "max": vs[-1][0]}


def trends(histories: dict[int, list[dict]]) -> dict:
    """Each policy's first and last step reward and last KL to its anchor, from its train records."""
    order = sorted(histories)
    return {"policy_reward_first_last": [[histories[m][0]["reward_mean"], histories[m][-1]["reward_mean"]]
                                         for m in order],
            "policy_kl_to_ema_last": [histories[m][-1]["kl_to_ema"] for m in order]}


def check_progress(diag: dict) -> None:
    for m, norm in enumerate(diag["task_vector_norm"]):
        if norm == 0.0 or not math.isfinite(norm):
            raise NoProgressError(f"policy {m}'s task vector has norm {norm}: its training did not change the "
                                  "weights (check train.lr, the reward's variance, and the gradients)")


def fmt_diag(it: int, d: dict) -> str:
    norms = ", ".join(f"{x:.4g}" for x in d["task_vector_norm"])
    ang = ", ".join(f"{k}: {v:.1f} deg (cos {d['cosine'][k]:.3f})" for k, v in d["angle_deg"].items()) or "-"
    per = d.get("tensor_angle_deg", {})
    per_txt = ", ".join(f"{k}: min {v['min']:.1f} / median {v['median']:.1f} / max {v['max']:.1f}"
                        for k, v in per.items())
    rw = "; ".join(f"p{m} {a:+.3f}->{b:+.3f}" for m, (a, b) in enumerate(d["policy_reward_first_last"]))
    return (f"iter {it} merge: |task vectors| [{norms}] whole-model angles [{ang}]"
            + (f" per-tensor angles [{per_txt}]" if per_txt else "")
            + f" init moved {d['init_moved']:.4g} |slerp - sft| {d['slerp_distance_to_sft']:.4g} reward {rw}")
