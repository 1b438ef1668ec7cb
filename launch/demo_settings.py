"""The compute dtype and steps per iteration `make demo` trains WARP and the baselines with, as overrides.

    python launch/demo_settings.py --dtype auto --steps auto   # prints e.g. "model.dtype=bfloat16 train.steps=13"

--dtype auto: bfloat16 where this machine has bf16 compute (a CPU whose /proc/cpuinfo lists avx512_bf16 or amx_bf16,
or a CUDA GPU with bf16), else float32 (warp_dist.config.resolve_dtype). --steps auto: the steps per iteration at
which that dtype reaches the demo's quality: 10 in float32; 13 in bfloat16, which after 10 steps had moved ~20 % less
far (lower reward gain and KL) and after 13 matched fp32's 10 in reward gain within the seeds' spread, in ~0.8x the
wall time (docs/performance.md, "The demo's dtype and steps"). Bad values end with one line naming the Makefile variable and what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = {"float32": 10, "bfloat16": 13}


def settings(dtype: str, steps: str) -> tuple[str, int]:
    """(resolved dtype, steps) for DEMO_DTYPE=`dtype`, DEMO_STEPS=`steps`; ValueError naming the variable if bad."""
    from warp_dist.config import resolve_dtype

    if dtype not in ("auto", *STEPS):
        raise ValueError(f"DEMO_DTYPE: {dtype!r} is not one of auto, {', '.join(STEPS)}")
    resolved = resolve_dtype(dtype)
    if steps == "auto":
        return resolved, STEPS[resolved]
    if not (steps.isascii() and steps.isdigit()) or int(steps) < 1:
        raise ValueError(f"DEMO_STEPS: {steps!r} is not auto or a whole number >= 1")
    return resolved, int(steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the dtype and steps make demo runs with, as dotted overrides")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (default %(default)s)")
    ap.add_argument("--steps", default="auto", help="auto | a whole number >= 1 (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        dtype, steps = settings(args.dtype, args.steps)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model.dtype={dtype} train.steps={steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
