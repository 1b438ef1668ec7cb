"""Evaluate a finished run folder and build its report (warp_dist.evaluation.runs; `warp-eval` is the same).

    python launch/eval.py --run runs/demo [--eta-grid 0,0.1,...,1] [--iterations] [--baselines runs/demo/baselines/*]
    accelerate launch --num_processes 2 launch/eval.py --run runs/demo [dotted.key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from warp_dist.evaluation.runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
