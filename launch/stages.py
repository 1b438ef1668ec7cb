"""The SFT and reward-model stages side by side, each on half the CPU cores (what `make demo` runs first).

    python launch/stages.py [--sft-args "key=value ..."] [--rm-args "key=value ..."] [--threads N]

Each stage is the same as launch/sft.py / launch/reward_model.py with the default presets (cached by config: a
second run skips both in seconds). The first stage to fail stops the other; its exit code is returned.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_dist.stages.cli import both  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(both())
