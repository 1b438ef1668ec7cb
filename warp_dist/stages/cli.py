"""The entry point both stages share (launch/sft.py, launch/reward_model.py are thin wrappers around `main`), and
`both` (launch/stages.py): the two stages side by side, each on its share of the CPU cores.

Exit codes: 0 done (or skipped: output_dir already holds this config's result), 2 bad input (config, output_dir,
model, data, ranks; one line, no traceback unless debug=true), 1 a run that failed cleanly (e.g. a NaN loss).
Nothing here imports torch: a bad config or a cached result is answered in well under a second.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .config import load_stage_config

DESCRIPTIONS = {
    "sft": "Fine-tune a causal LM on IMDB review text (the SFT model WARP starts from)",
    "reward_model": "Train a sentiment classifier on IMDB (a reward for WARP: reward.kind=classifier)",
}
PRESETS = {"sft": "configs/sft.yaml", "reward_model": "configs/reward_model.yaml"}


def parse_args(stage: str, argv=None):
    ap = argparse.ArgumentParser(description=DESCRIPTIONS[stage], epilog="overrides: dotted.key=value")
    ap.add_argument("--config", required=True, help=f"YAML preset, e.g. {PRESETS[stage]}")
    ap.add_argument("--print-output-dir", action="store_true",
                    help="print the resolved output_dir (default runs/<preset>-<config hash>) and exit; no work")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.lr=5e-5 output_dir=runs/x")
    return ap.parse_args(argv)


def command_line(argv: list[str] | None) -> str:
    """The command that ran, for summary.json: `python <script> <args>`, with the launcher when there are ranks."""
    args = list(sys.argv if argv is None else [sys.argv[0], *argv])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = f"accelerate launch --num_processes {world}" if world > 1 else "python"
    return f"{head} {shlex.join(args)}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(stage: str, argv=None) -> int:
    """Run `stage` ("sft" | "reward_model") from the command line; returns the exit code."""
    t0 = time.time()
    args = parse_args(stage, argv)
    try:
        cfg = load_stage_config(stage, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_output_dir:  # for scripts (make demo): where this config's result is, or will be, cached
        print(cfg.output_dir)
        return 0
    from ..preflight import PreflightError  # torch-free, as are the next two
    from ..runner import print_error
    from .output import StageError

    try:
        if stage == "sft":
            from .sft import run
        else:
            from .reward_model import run
        run(cfg, command_line(argv), t0)
    except ConfigError as exc:
        print_error(exc, cfg.debug, prefix="config error")
        return 2
    except (StageError, PreflightError) as exc:  # decided on rank 0 and raised on every rank: print it once
        if os.environ.get("RANK", "0") == "0":
            print_error(exc, cfg.debug)
        return 2
    except Exception as exc:
        from ..guards import RunError

        if not isinstance(exc, RunError):  # a bug: the full traceback
            raise
        print_error(exc, cfg.debug)  # e.g. a NaN loss
        return 1
    return 0


# ------------------------------------------------------------------------------------------------- both stages
def both(argv=None) -> int:
    """Run the SFT and reward-model stages at the same time (neither reads the other's output), each with
    --threads CPU threads (default: half the cores this process may use, at least 1). Two one-thread processes keep
    two cores busier than one two-thread process does, so on a 2-core machine the pair finishes minutes sooner than
    one stage after the other. The first stage to fail stops the other; the exit code is the failed stage's."""
    ap = argparse.ArgumentParser(description="The SFT and reward-model stages side by side (both cached by config)")
    ap.add_argument("--sft-config", default=PRESETS["sft"])
    ap.add_argument("--rm-config", default=PRESETS["reward_model"])
    ap.add_argument("--sft-args", default="", help='SFT overrides in one string, e.g. "train.lr=5e-5"')
    ap.add_argument("--rm-args", default="", help="reward-model overrides in one string")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per stage (0: half the cores, at least 1)")
    args = ap.parse_args(argv)
    if args.threads < 0:
        print(f"--threads: >= 0 (0 = half the cores), got {args.threads}", file=sys.stderr)
        return 2
    n = args.threads or max(1, len(os.sched_getaffinity(0)) // 2)
    env = {**os.environ, "WARP_DIST_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
    here = Path(__file__).resolve().parents[2] / "launch"
    cmds = {"sft": [sys.executable, str(here / "sft.py"), "--config", args.sft_config, *shlex.split(args.sft_args)],
            "reward_model": [sys.executable, str(here / "reward_model.py"), "--config", args.rm_config,
                             *shlex.split(args.rm_args)]}
    log(f"stages: sft and reward_model side by side, {n} CPU thread{'s' * (n > 1)} each")
    return run_together(cmds, env)


def run_together(cmds: dict[str, list[str]], env: dict[str, str], poll_s: float = 0.2) -> int:
    """Start every command, wait for all; when one exits non-zero, stop the others (SIGTERM, then SIGKILL after
    10 s) and return its exit code. 0 when all succeed."""
    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in cmds.items()}
    try:
        while procs:
            for name, proc in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del procs[name]
                if rc != 0:
                    if procs:
                        print(f"stages: {name} failed (exit {rc}); stopping {', '.join(procs)}", file=sys.stderr,
                              flush=True)
                    return rc
            time.sleep(poll_s)
        return 0
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
