"""Fine-tune a causal LM on IMDB reviews: the SFT model WARP starts from (model.name=<output_dir> in a WARP run).

    python launch/sft.py --config configs/stages/sft.yaml [dotted.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/sft.py --config configs/stages/sft.yaml   # data-parallel

Writes output_dir: an HF causal-LM folder + config.yaml + summary.json (eval loss before / after on held-out
reviews, timings, the command). A folder that already holds this config's result is left alone (one line, exit 0);
another config's result is refused unless overwrite=true. Bad input: one line, exit 2 (warp_dist/stages/cli.py).
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
    sys.exit(main("sft"))
