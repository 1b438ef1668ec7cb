"""Train a sentiment reward model on IMDB: reward.kind=classifier reward.name=<output_dir> in a WARP run.

    python launch/reward_model.py --config configs/stages/reward_model.yaml [dotted.key=value ...]

Writes output_dir: an HF sequence-classification folder (id2label 0 NEGATIVE, 1 POSITIVE) + config.yaml +
summary.json (held-out accuracy on whole reviews, review starts and single sentences; timings, the command). A folder
that already holds this config's result is left alone (one line, exit 0); another config's result is refused unless
overwrite=true. Bad input: one line, exit 2 (warp_dist/stages/cli.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_dist.stages.cli import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main("reward_model"))
