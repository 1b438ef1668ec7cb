"""Train with WARP: the script `accelerate launch` runs on every rank (warp_dist.cli; `warp-train` is the same).

    accelerate launch launch/warp.py --config configs/warp/<preset>.yaml [dotted.key=value ...]
    python launch/warp.py --config configs/warp/tiny.yaml train.steps=3

Reads and validates the config, runs the pre-launch checks and the memory plan before anything expensive starts, then
the WARP loop, and prints a SFT-vs-WARP table. Bad input ends it with one line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
