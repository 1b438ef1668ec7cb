"""Where a run stands (`RunState`, the checkpoint's position.json) and the checkpointer that saves and restores it.

A checkpoint is written at every phase boundary (the SFT evaluated, each policy trained, each merge, each evaluation)
and every `checkpoint_every` optimizer steps: `state/ckpt-<seq>/` with position.json and each rank's RNG (and, mid-
policy, its share of the policy in training: weights, EMA, optimizer), written under a temp name and renamed when
complete (warp_dist.checkpoint). The fp32 blobs it needs (policies, theta_init, theta_slerp) are kept with it. A
resumed run starts from the newest complete checkpoint and skips what it says is done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint, faults
from ..guards import RunError
from ..weights import SafeFile, write_stream
from .merger import init_file
from .policy import InitStore
from .session import Session


@dataclass
class RunState:
    """The position of a run, the same on every rank (position.json of its last checkpoint)."""

    seq: int = 0  # checkpoints written so far
    phase: str = "start"  # what the last checkpoint followed
    iteration: int = 1  # the iteration in progress
    slots_done: int = 0  # this iteration's policy slots every rank has trained
    step: int = 0  # the step the policy in training has reached (a mid-policy checkpoint), else 0
    merged: int = 0  # the last merged iteration
    evaluated: int = 0  # the last iteration whose merge is evaluated (or needs none)
    policy_files: dict[str, str] = field(default_factory=dict)  # policy -> its blob in state/blobs, this iteration
    sft_eval: dict | None = None  # the SFT model's evaluation (EvalResult.to_json)
    final_eval: dict | None = None
    slerp_evals: dict[str, dict] = field(default_factory=dict)  # iteration -> its merge's evaluation
    slerp_distance_to_sft: float = 0.0  # |theta_slerp - sft| of the last merge
    train_time_s: float = 0.0  # this iteration's training time so far
    version: int = 0  # the policy weights' write version
    world_size: int = 1
    metrics_lines: int = 0  # metrics.jsonl lines written when the checkpoint was
    blobs: list[str] = field(default_factory=list)  # blob files the run still needs from here
    timers: dict[str, float] = field(default_factory=dict)  # phase timers ("elapsed": wall time of earlier attempts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def init_iteration(self) -> int:
        """The iteration whose theta_init the next RL phase starts from."""
        return self.iteration if self.merged < self.iteration else self.iteration + 1


def check_world_change(position: dict, old: int, new: int, zero3: bool) -> None:
    """Resume on another number of ranks: allowed from a phase-boundary checkpoint (the policies trained so far and
    theta_init are whole fp32 files, any rank can read them; a policy not yet trained is trained by whichever rank
    holds it now); refused in one line from a checkpoint of a policy in training (its weights, EMA and optimizer
    state are split over the old ranks and groups) and under ZeRO-3 (theta_init is kept as one partition per rank)."""
    ranks = f"{old} rank{'s' if old != 1 else ''}"
    if position.get("step", 0):
        raise RunError(f"resume: the newest checkpoint holds policies in training (step {position['step']}) written "
                       f"by {ranks}; their optimizer state cannot move to {new}: relaunch with --num_processes {old} "
                       "(another world size can resume from a checkpoint at a phase boundary)")
    if zero3:
        raise RunError(f"resume: under ZeRO-3 the checkpoint keeps theta_init as one partition per rank of {ranks}; "
                       f"relaunch with --num_processes {old}")


class Checkpointer:
    """Writes the checkpoints of a run and finds where a resumed run starts (collectives: every rank calls them)."""

    def __init__(self, s: Session):
        self.s = s
        self.state = RunState(world_size=s.dist.world_size)
        self.ckpt_dir: Path | None = None  # the newest complete checkpoint
        self.elapsed_s = 0.0  # wall time of earlier attempts of this run
        self.t0 = time.perf_counter()

    @property
    def done(self) -> bool:
        """A resume found the run finished (summary.json written, no checkpoint left)."""
        return self.state.phase == "done"

    def start(self) -> RunState:
        """A fresh state, or (resume=true) the newest complete checkpoint's, with this rank's RNG and theta_init as
        they were."""
        s, cfg, d = self.s, self.s.cfg, self.s.dist
        found = None
        if cfg.resume and d.is_main:
            if (Path(cfg.output_dir) / "summary.json").is_file() and not checkpoint.checkpoints(s.state_dir):
                found = {"done": True}
            else:
                checkpoint.clean_partial(s.state_dir)
                try:  # the newest checkpoint whose files match their checksums; damaged ones set aside
                    ckpt = checkpoint.newest_valid(s.state_dir, warn=s.log)
                    if ckpt is not None:
                        found = {**checkpoint.read_position(ckpt), "path": str(ckpt)}
                except RunError as exc:
                    found = {"error": str(exc)}
        found = d.broadcast_object(found)
        if found is not None and "error" in found:  # every rank stops with the same line
            raise RunError(found["error"])
        if found is None:
            if cfg.resume:
                s.log("resume: no complete checkpoint yet, starting from the beginning")
                if s.is_main:  # records of the killed attempt (before its first checkpoint) are redone
                    checkpoint.truncate_lines(Path(cfg.output_dir) / "metrics.jsonl", 0)
                    self.replay_trackers()
            return self.state
        if found.get("done"):
            self.state.phase = "done"
            return self.state
        n = found["world_size"]
        if n != d.world_size:
            check_world_change(found, n, d.world_size, s.weights.zero3)
        self.ckpt_dir = Path(found["path"])
        self.state = RunState.from_json(found)
        self.state.world_size = d.world_size
        if s.is_main:  # the metrics written after that checkpoint belong to work that is redone
            checkpoint.truncate_lines(Path(cfg.output_dir) / "metrics.jsonl", self.state.metrics_lines)
            self.replay_trackers()
        s.timers = {k: v for k, v in self.state.timers.items() if k != "elapsed"}
        self.elapsed_s = self.state.timers.get("elapsed", 0.0)
        init_it = self.state.init_iteration
        if 1 < init_it <= cfg.train.iterations:
            s.init.close()
            path, full = init_file(s, init_it)
            s.init = InitStore.from_file(s.weights, path, full=full)
        # on another world size a new rank takes rank 0's RNG: at a phase boundary nothing drawn from it reaches the
        # results (each policy re-seeds from its own seed; sampling seeds are per request)
        checkpoint.load_rng(self.ckpt_dir / f"rank{d.rank if d.rank < n else 0}" / "rng.pt")
        return self.state

    def elapsed(self) -> float:
        """Wall time of the run so far, earlier attempts included."""
        return self.elapsed_s + time.perf_counter() - self.t0

    def replay_trackers(self) -> None:
        """Resume: TensorBoard is rebuilt from metrics.jsonl as cut back (no duplicate points; see tracking.py)."""
        rec = self.s.records
        if rec.tracker is not None and rec.metrics.path is not None:
            p = rec.metrics.path
            rec.tracker.replay([json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else [])

    def histories(self, iteration: int) -> dict[int, list[dict]]:
        """Every policy's train records of this iteration (from the checkpointed metrics when resumed)."""
        s = self.s
        path = s.records.metrics.path
        recs = [json.loads(x) for x in Path(path).read_text().splitlines()] if s.is_main else []
        out: dict[int, list[dict]] = {}
        for r in recs:
            if r.get("kind") == "train" and r["iteration"] == iteration:
                out.setdefault(r["policy"], []).append(r)
        for h in out.values():
            h.sort(key=lambda r: (r["step"], r["rank"]))
        return s.dist.broadcast_object(out)

    def periodic(self, step: int) -> bool:
        """After an optimizer step: a mid-policy checkpoint every `checkpoint_every` steps; whether it wrote one."""
        every = self.s.cfg.checkpoint_every
        if every and step % every == 0 and step < self.s.cfg.train.steps:
            self.state.step = step
            self.save("training", rank_state=True)
            return True
        return False

    def save(self, phase: str, rank_state: bool = False) -> None:
        """Write a complete checkpoint (a collective: every rank calls it at the same point of the run)."""
        s, d, st = self.s, self.s.dist, self.state
        t0 = time.perf_counter()
        s.records.gather()
        seq = st.seq + 1
        if d.is_main:
            checkpoint.begin_checkpoint(s.state_dir, seq)
        d.barrier()
        rank_dir = checkpoint.checkpoint_tmp(s.state_dir, seq) / f"rank{d.rank}"
        checkpoint.save_rng(rank_dir / "rng.pt")
        if rank_state:
            self.save_rank_state(rank_dir)
        faults.point("checkpoint")
        d.barrier()
        st.seq, st.phase, st.version = seq, phase, s.weights.version
        st.timers = {**s.timers, "elapsed": self.elapsed()}
        if d.is_main:
            st.metrics_lines = checkpoint.count_lines(s.records.metrics.path)
            st.blobs = self.needed_blobs()
            final = checkpoint.finish_checkpoint(s.state_dir, seq, st.to_json(), s.cfg.keep_checkpoints)
        else:
            final = None
        self.ckpt_dir = Path(d.broadcast_object(str(final) if final else None))
        s.tick("checkpoint", time.perf_counter() - t0)

    def needed_blobs(self) -> list[str]:
        """Blob files the run still needs from this position (a checkpoint keeps them)."""
        st, s = self.state, self.s
        names = list(st.policy_files.values())
        init_it = st.init_iteration
        if 1 < init_it <= s.cfg.train.iterations:
            names.append(f"iter{init_it}_init.safetensors")
            if s.weights.zero3:
                names += [f"iter{init_it}_init.rank{r}.safetensors" for r in range(s.dist.world_size)]
        if st.merged >= 1:
            names.append(f"iter{st.merged}_slerp.safetensors")
        return names

    def save_rank_state(self, folder: Path) -> None:
        """This rank's share of the policy in training: weights, EMA, optimizer state (exact fp32)."""
        w, ref = self.s.weights, self.s.reference.w
        specs = [(n, (w.span(n)[1],), torch.float32) for n in w.names]
        write_stream(folder / "policy.safetensors", specs, ((n, w.local(n)) for n in w.names))
        write_stream(folder / "ema.safetensors", specs, ((n, ref.local(n)) for n in ref.names))
        checkpoint.torch_save_atomic(self.s.policy.optimizer.state_dict(), folder / "optimizer.pt")

    def restore_rank_state(self) -> int:
        """The policy in training as `save_rank_state` wrote it in the newest checkpoint; returns its last step."""
        folder = self.ckpt_dir / f"rank{self.s.dist.rank}"
        pol, ema = SafeFile(folder / "policy.safetensors"), SafeFile(folder / "ema.safetensors")
        try:
            opt = checkpoint.load_safe(folder / "optimizer.pt")
            self.s.policy.restore(lambda n, start, count: pol.get(n), opt)
            self.s.reference.load_(lambda n, start, count: ema.get(n), "ema")
        finally:
            pol.close()
            ema.close()
        return self.state.step
