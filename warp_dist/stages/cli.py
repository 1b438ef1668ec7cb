"""The entry point both stages share (launch/sft.py, launch/reward_model.py are thin wrappers around `main`).

Exit codes: 0 done (or skipped: output_dir already holds this config's result), 2 bad input (config, output_dir,
model, data, ranks; one line, no traceback unless debug=true), 1 a run that failed cleanly (e.g. a NaN loss).
Nothing here imports torch: a bad config or a cached result is answered in well under a second.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from ..config import ConfigError
from .config import load_stage_config

DESCRIPTIONS = {
    "sft": "Fine-tune a causal LM on IMDB review text (the SFT model WARP starts from)",
    "reward_model": "Train a sentiment classifier on IMDB (a reward for WARP: reward.kind=classifier)",
}
PRESETS = {"sft": "configs/stages/sft.yaml", "reward_model": "configs/stages/reward_model.yaml"}


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
    from ..checks.preflight import PreflightError  # torch-free, as are the next two
    from ..runner import print_error
    from .output import StageError

    try:
        if stage == "sft":
            from .sft import run
        else:
            from .reward_model import run
        run(cfg, command_line(argv), t0)
        from ..dist import shutdown

        shutdown()
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


def sft_main(argv=None) -> int:
    """`warp-sft`: the SFT stage (launch/sft.py)."""
    _quiet_env()
    return main("sft", argv)


def reward_model_main(argv=None) -> int:
    """`warp-reward-model`: the reward-model stage (launch/reward_model.py)."""
    _quiet_env()
    return main("reward_model", argv)


def _quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
