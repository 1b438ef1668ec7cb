"""Run under `accelerate launch` (or plain python): evaluate the SFT weights and a perturbed copy, write metrics."""

import json
import sys

import torch

from warp_dist import dist as distmod
from warp_dist.config import load_config
from warp_dist.evaluation.evaluator import Evaluator
from warp_dist.training.session import Session

cfg = load_config(sys.argv[1], sys.argv[3:])
d = distmod.init(cfg.train.policies, 120)
w = Session(cfg, d, log=lambda *_: None)
sft_state = w.state_dict("sft")
sft = Evaluator(w).evaluate(sft_state, None)
g = torch.Generator().manual_seed(0)
moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sft_state.items()}
ev = Evaluator(w).evaluate(moved, sft)
if d.is_main:
    with open(sys.argv[2], "w") as fh:
        json.dump({"sft": sft.metrics, "moved": ev.metrics, "texts": ev.texts}, fh)
distmod.shutdown()
