"""Train with WARP: the entry point behind `launch/warp.py` (what `accelerate launch` runs) and `warp-train`.

    accelerate launch launch/warp.py --config configs/warp/<preset>.yaml [dotted.key=value ...]
    python launch/warp.py --config configs/warp/tiny.yaml train.steps=3
    warp-train --config configs/warp/tiny.yaml      # one process, installed as a console script

Reads and validates the config, runs the pre-launch checks (warp_dist.checks.preflight) and the memory plan
(warp_dist.checks.plan: refuses a run whose ranks cannot fit the device's memory) before anything expensive starts,
then runs the WARP loop and prints a SFT-vs-WARP table. Bad input ends it with one line and exit code 2
(`config error: ...` / `error: ...`; debug=true adds the traceback).
Run folder: config.yaml, metrics.jsonl, final/, summary.json (+ iter_<i>/ when asked); a folder that already holds
a run is refused unless resume=true or overwrite=true.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="WARP alignment of a causal LM", epilog="overrides: dotted.key=value")
    ap.add_argument("--config", required=True, help="YAML preset, e.g. configs/warp/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=5 merge.eta=0.3")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """0 on success; 2 for bad input (config, topology, preflight, run folder); 1 for a run that failed cleanly;
    75 (preempt.EXIT_PREEMPTED) for a run stopped by a signal after writing a checkpoint (resume=true continues)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .checks import plan, preflight  # none of these imports torch: bad input is reported at once
    from .preempt import EXIT_PREEMPTED, Preempted
    from .runner import RunDirError, print_error, run
    from .topology import TopologyError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        preflight.check(cfg, world)  # before any weights load
        plan.check(cfg, world)  # the memory plan (config.json only): refuses a run that cannot fit
        run(cfg)
        from .dist import shutdown

        shutdown()
    except (ConfigError, TopologyError) as exc:
        print_error(exc, cfg.debug, prefix="config error")
        return 2
    except Preempted as exc:  # every rank stopped at the same boundary after one checkpoint
        if os.environ.get("RANK", "0") == "0":
            print(f"[stop] {exc}", flush=True)
        from .dist import shutdown

        shutdown()
        return EXIT_PREEMPTED
    except RunDirError as exc:  # decided on rank 0 and raised on every rank: print it once
        if os.environ.get("RANK", "0") == "0":
            print_error(exc, cfg.debug)
        return 2
    except (preflight.PreflightError, plan.PlanError) as exc:
        print_error(exc, cfg.debug)
        return 2
    except Exception as exc:
        from .guards import RunError

        if not isinstance(exc, RunError):  # a bug: the full traceback
            raise
        print_error(exc, cfg.debug)  # e.g. a non-finite reward, a failing reward callable (ranks: fail_rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
