"""Run one preset for several KL coefficients (the plain-REINFORCE baselines of the report), one folder per beta.

    python -m warp_dist.sweep --config configs/baseline_reinforce.yaml --betas 0.01,0.1,0.3 --out runs/baselines [k=v ...]
    accelerate launch -m warp_dist.sweep --config ... (every run uses all the ranks, one run after the other)

Each beta goes through the trainer's own path (`warp_dist.runner.run`) into <out>/beta_<beta>/ (a complete run
folder: config.yaml, metrics.jsonl, final/, summary.json), ready for `launch/eval.py --baselines <out>/beta_*`.
Every config is validated before the first run starts. --skip-existing keeps folders that already hold summary.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, WarpConfig, load_config


def beta_folder(out: str | Path, beta: float) -> Path:
    return Path(out) / f"beta_{beta:g}"


def plan_sweep(config: str | Path, betas: list[float], out: str | Path, overrides: list[str] | None = None
               ) -> list[WarpConfig]:
    """One validated config per beta (raises ConfigError before anything runs)."""
    if not betas:
        raise ConfigError("--betas: give at least one value")
    if len({f"{b:g}" for b in betas}) != len(betas):
        raise ConfigError(f"--betas {betas}: values repeat")
    return [load_config(config, [*(overrides or []), f"train.beta={b!r}", f"output_dir={beta_folder(out, b)}"])
            for b in betas]


def sweep(cfgs: list[WarpConfig], skip_existing: bool = False) -> list[Path]:
    from .runner import log, run

    folders = []
    for cfg in cfgs:
        folder = Path(cfg.output_dir)
        if skip_existing and (folder / "summary.json").is_file():
            log(f"sweep: {folder} is already done, skipped")
        else:
            log(f"sweep: train.beta={cfg.train.beta:g} -> {folder}")
            run(cfg)
        folders.append(folder)
    return folders


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="overrides: dotted.key=value")
    ap.add_argument("--config", required=True, help="preset, e.g. configs/baseline_reinforce.yaml")
    ap.add_argument("--betas", default="0.01,0.1,0.3", help="comma-separated train.beta values (default %(default)s)")
    ap.add_argument("--out", required=True, help="folder that receives beta_<value>/ run folders")
    ap.add_argument("--skip-existing", action="store_true", help="keep beta folders that already hold summary.json")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every run")
    args = ap.parse_args(argv)
    try:
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
        cfgs = plan_sweep(args.config, betas, args.out, args.overrides)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .topology import TopologyError

    try:
        folders = sweep(cfgs, args.skip_existing)
    except TopologyError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print("baselines: " + " ".join(str(f) for f in folders), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
