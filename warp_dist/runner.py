"""Glue between the launcher and the trainer: the run folder, logging, error printing, the SFT-vs-WARP table.

One run per folder: `prepare_run_dir` (rank 0) refuses an output_dir that already holds a run unless
resume=true (same run-defining config) or overwrite=true (the old run is removed first), then writes config.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, WarpConfig, config_from_dict, flat

# torch-free at import time (checkpoint, guards and dist import torch where used), so that launch/warp.py reports
# bad input in well under a second.


class RunDirError(ValueError):
    """output_dir cannot be used as asked (holds a run, holds none to resume, a different config...); one line."""


# What a run writes at the top of output_dir (launch/eval.py adds report/, `make demo` baselines/); a folder holding
# any of these holds a run. Atomic writes leave `.<name>.<suffix>` temp names (checkpoint.py) while they work.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "evals.json")
RUN_DIRS = ("final", "checkpoints", "state", "tb", "report", "baselines")
_NAMES = "|".join([*(re.escape(n) for n in RUN_FILES + RUN_DIRS), r"iter_\d+"])
_RUN_NAME = re.compile(f"(?:{_NAMES})")
_TEMP_NAME = re.compile(rf"\.(?:{_NAMES})\..+")

# Fields that may differ between a run's stored config.yaml and the config that resumes it: none of them changes
# what the run computes. Every other field defines the run (model, data, reward, rollout, train, merge, eval, ...).
RESUME_MAY_CHANGE = ("output_dir", "preset", "progress", "log_every", "dist_timeout_s", "phase_timeout_s", "debug",
                     "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "model.cache_dir", "log_with",
                     "stop_signals")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def print_error(exc: BaseException, debug: bool = False, prefix: str = "error") -> None:
    """`<prefix>: <message>` on stderr (one line); with debug the traceback comes first, the line stays last."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    msg = " ".join(str(exc).split("\n")) or type(exc).__name__
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def fail_rank(exc: BaseException, rank: int, debug: bool = False) -> None:
    """End this rank at once (the launcher then stops the others). A RunError is one line unless debug."""
    from .guards import RunError

    if isinstance(exc, RunError) and not debug:
        sys.stderr.write(f"[rank {rank}] FAILED: {exc}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    from .dist import fail_fast

    fail_fast(exc, rank)


def quiet_libraries() -> None:
    """No per-shard progress bars or accelerator-detection chatter from the libraries underneath."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # `datasets` (hub data only) reads it on import


# ------------------------------------------------------------------------------------------------- run folder
def is_run_entry(name: str) -> bool:
    """True for a top-level name a run writes (config.yaml, final, iter_3, ...) or a temp name of one."""
    return bool(_RUN_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name))


def run_entries(folder: str | Path) -> list[Path]:
    """The run's entries at the top of `folder`, sorted by name ([] when the folder does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_run_entry(p.name))


def stored_config_difference(stored: WarpConfig, new: WarpConfig) -> tuple[str, Any, Any] | None:
    """The first run-defining field (not in RESUME_MAY_CHANGE) whose values differ: (key, stored, new), or None."""
    a, b = flat(stored.to_dict()), flat(new.to_dict())
    for key, value in b.items():
        if key not in RESUME_MAY_CHANGE and a.get(key) != value:
            return key, a.get(key), value
    return None


def check_run_dir(cfg: WarpConfig) -> str:
    """Read-only: may a run start in cfg.output_dir as asked? Returns "new" | "overwrite" | "resume".

    Raises RunDirError (one line, nothing touched) when the folder holds a run and neither resume nor overwrite is
    set, when resume=true finds no run or a run with a different run-defining config, or when overwrite=true would
    have to delete something that is not part of a run.
    """
    out = Path(cfg.output_dir)
    where = f"output_dir={cfg.output_dir!r}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{where} exists and is not a folder")
    entries = run_entries(out)
    if cfg.resume:
        stored_path = out / "config.yaml"
        if not stored_path.is_file():
            if entries:
                raise RunDirError(f"resume=true: {where} holds a run without config.yaml (killed before it started?): "
                                  "nothing to check it against; use overwrite=true to start it again")
            raise RunDirError(f"resume=true: {where} holds no run to resume; leave out resume=true to start one")
        try:
            stored = config_from_dict(yaml.safe_load(stored_path.read_text()) or {})
        except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunDirError(f"resume=true: {stored_path} cannot be read as a warp_dist config ({first})") from None
        diff = stored_config_difference(stored, cfg)
        if diff is not None:
            key, old, new = diff
            raise RunDirError(f"resume=true: the run in {where} has {key}={old!r}, this launch {key}={new!r}; a run "
                              f"resumes with its own config (only {', '.join(RESUME_MAY_CHANGE)} may change)")
        return "resume"
    if not entries:
        return "new"
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not cfg.overwrite:
        raise RunDirError(f"{where} already holds a run ({shown}): add resume=true to continue it, overwrite=true "
                          "to replace it, or choose another output_dir")
    foreign = sorted(p.name for p in out.iterdir() if not is_run_entry(p.name))
    if foreign:
        raise RunDirError(f"overwrite=true: {where} also holds {foreign[0]!r}, which is not part of a warp_dist run; "
                          "nothing was removed: move it away or choose another output_dir")
    return "overwrite"


def remove_run(folder: str | Path) -> list[str]:
    """Delete the run entries of `folder` (config.yaml last, so a killed removal still reads as a run)."""
    entries = run_entries(folder)
    entries.sort(key=lambda p: p.name == "config.yaml")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return [p.name for p in entries]


@dataclass
class RunDir:
    path: Path
    mode: str  # new | overwrite | resume
    removed: list[str] = field(default_factory=list)  # names of the old run's entries (overwrite)


def prepare_run_dir(cfg: WarpConfig) -> RunDir:
    """Rank 0, before anything is written: check_run_dir, remove the old run (overwrite), write config.yaml.

    config.yaml is written atomically; on resume it is rewritten with this launch's values of RESUME_MAY_CHANGE.
    """
    from . import checkpoint

    mode = check_run_dir(cfg)
    out = Path(cfg.output_dir)
    removed = remove_run(out) if mode == "overwrite" else []
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_yaml(out / "config.yaml", cfg.to_dict())
    return RunDir(out, mode, removed)


def share_run_dir(cfg: WarpConfig, d) -> RunDir:
    """Rank 0 prepares the folder; every rank gets its decision, or raises the same RunDirError; then every rank
    checks that it sees the folder rank 0 wrote (`check_shared_folder`)."""
    result: RunDir | str | None = None
    if d.is_main:
        try:
            result = prepare_run_dir(cfg)
        except RunDirError as exc:
            result = str(exc)
    result = d.broadcast_object(result)
    if isinstance(result, str):
        raise RunDirError(result)
    check_shared_folder(result.path, d)
    return result


SHARED_CHECK = ".shared-check"


def check_shared_folder(folder: Path, d) -> None:
    """Every rank must see output_dir as rank 0 wrote it: the ranks write their checkpoint parts and theta_init slices
    there, and read state/sft.safetensors and the merge's files, so a run over several nodes needs a filesystem they
    all share. Rank 0 writes a token file, every rank reads it; RunDirError on every rank (one line naming the ranks
    and hosts that did not see it) otherwise. One process: nothing to check."""
    import secrets
    import socket

    from . import checkpoint

    if not d.active:
        return
    path = Path(folder) / SHARED_CHECK
    token = None
    if d.is_main:
        token = secrets.token_hex(16)
        checkpoint.write_json(path, {"token": token})
    token = d.broadcast_object(token)
    try:
        seen = json.loads(path.read_text()).get("token") == token
    except (OSError, ValueError):
        seen = False
    views = d.all_gather_object((seen, socket.gethostname(), str(Path(folder).resolve())))
    if d.is_main:
        path.unlink(missing_ok=True)
    blind = [(r, host, where) for r, (ok, host, where) in enumerate(views) if not ok]
    if blind:
        who = ", ".join(f"rank {r} on {host} ({where})" for r, host, where in blind[:4]) + (" ..." if len(blind) > 4
                                                                                             else "")
        raise RunDirError(f"output_dir={folder}: {who} does not see the file rank 0 wrote there; every rank reads and "
                          "writes the run folder (checkpoint parts, theta_init, the SFT copy), so on several nodes "
                          "output_dir must be an absolute path on a filesystem they all share (NFS, Lustre, ...)")


def run(cfg: WarpConfig) -> dict:
    """Run WARP on this rank. Any exception ends this process at once with a non-zero code (see fail_rank).

    RunDirError is raised on every rank alike (the launcher prints it on rank 0 and exits 2).
    """
    from . import dist as distmod
    from .preempt import Preempted

    d = distmod.init(cfg.train.policies, cfg.dist_timeout_s, cpu=cfg.cpu,  # topology errors before any work
                     need_process_group=bool(cfg.train.deepspeed), phase_timeout_s=cfg.phase_timeout_s)
    try:
        rd = share_run_dir(cfg, d)
        quiet_libraries()
        from .training.loop import Warp

        if d.is_main and rd.mode != "new":
            log(f"{rd.mode}: {rd.path}" + (f" (removed the old run: {', '.join(rd.removed)})" if rd.removed else ""))
        t0 = time.perf_counter()
        summary = Warp(cfg, d, log=log, metrics_path=rd.path / "metrics.jsonl").run()
        if d.is_main:
            log(f"done in {time.perf_counter() - t0:.0f}s -> {rd.path}")
            print(result_table(summary), flush=True)
        return summary
    except (RunDirError, Preempted):  # raised on every rank alike
        raise
    except Exception as exc:  # noqa: BLE001 - a failing rank must end the whole job, never hang it
        if d.active:
            fail_rank(exc, d.rank, cfg.debug)
        raise


def result_table(summary: dict) -> str:
    """The SFT-vs-WARP table printed at the end of a run: means with their 95 % intervals, the judge, diversity, and
    the paired bootstrap difference WARP - SFT."""
    from .evaluation.stats import with_interval  # torch: only once a run has ended

    s, f = summary["sft"], summary["final"]
    judge = s.get("judge", "none")

    def line(name: str, m: dict) -> str:
        d2 = m.get("distinct_2")
        return (f"| {name} | {with_interval(m, 'reward')} ± {m['reward_std']:.3f} | "
                f"{with_interval(m, 'kl', '.3f')} | {with_interval(m, 'judge')} | {m['identical_fraction']:.2f} | "
                f"{m['length_mean']:.1f} | {'-' if d2 is None else format(d2, '.3f')} |")

    rows = [
        f"| model | reward [95% CI] ± std | KL to SFT [95% CI] | judge ({judge}) | identical to SFT | mean length "
        "| distinct-2 |",
        "|---|---|---|---|---|---|---|",
        line("SFT", s),
        line("WARP", f),
    ]
    lines = ["", *rows]
    diff = summary.get("final_vs_sft", {})
    if diff:
        parts = [f"{k} {v['diff']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" + (" (excludes 0)" if v["excludes_zero"]
                                                                                 else "")
                 for k, v in diff.items()]
        lines.append("WARP - SFT, paired bootstrap 95% CI over prompts: " + "; ".join(parts))
    lines.append("")
    for i, smp in enumerate(summary.get("samples", []), 1):
        lines += [f"[{i}] prompt: {smp['prompt']!r}",
                  f"    SFT  ({smp['sft_reward']:+.3f}): {smp['sft']!r}",
                  f"    WARP ({smp['warp_reward']:+.3f}): {smp['warp']!r}"]
    return "\n".join(lines)
