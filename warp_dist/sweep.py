"""Run one preset for several KL coefficients (the plain-REINFORCE baselines of the report), one folder per beta.

    python -m warp_dist.sweep --config configs/baseline_reinforce.yaml --betas 0.01,0.1,0.3 --out runs/baselines [k=v ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--betas", default="0.01,0.1,0.3", help="comma-separated train.beta values")
    ap.add_argument("--out", required=True, help="folder that receives beta_<value>/ run folders")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
        cfgs = [load_config(args.config, [*args.overrides, f"train.beta={b}", f"output_dir={Path(args.out) / f'beta_{b:g}'}"])
                for b in betas]
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from .runner import run

    folders = []
    for cfg in cfgs:
        run(cfg)
        folders.append(Path(cfg.output_dir))
    return folders


if __name__ == "__main__":
    main()
