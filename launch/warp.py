"""Train with WARP.

    accelerate launch launch/warp.py --config configs/<preset>.yaml [dotted.key=value ...]
    python launch/warp.py --config configs/tiny.yaml train.steps=3

Reads and validates the config before anything expensive starts, then runs the WARP loop and prints a
SFT-vs-WARP table. Run folder: config.yaml, metrics.jsonl, final/, summary.json (+ iter_<i>/ when asked).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_dist.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="WARP alignment of a causal LM", epilog="overrides: dotted.key=value")
    ap.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=5 merge.eta=0.3")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from warp_dist.runner import run
    from warp_dist.topology import TopologyError

    try:
        run(cfg)
    except TopologyError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
