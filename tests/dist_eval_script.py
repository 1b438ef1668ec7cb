"""Run under `accelerate launch` (or plain python): evaluate the SFT weights and a perturbed copy, write metrics."""

import json
import sys

import torch

from warp_dist import dist as distmod
from warp_dist.config import load_config
from warp_dist.trainer import Warp

cfg = load_config(sys.argv[1], sys.argv[3:])
d = distmod.init(cfg.train.policies, 120)
w = Warp(cfg, d, log=lambda *_: None)
sft_state = w.state_dict("sft")
sft = w.evaluate_state(sft_state, None)
g = torch.Generator().manual_seed(0)
moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sft_state.items()}
ev = w.evaluate_state(moved, sft)
if d.is_main:
    with open(sys.argv[2], "w") as fh:
        json.dump({"sft": sft.metrics, "moved": ev.metrics, "texts": ev.texts}, fh)
distmod.shutdown()
