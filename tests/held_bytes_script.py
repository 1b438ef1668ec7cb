"""Run under `accelerate launch` (or plain python): one RL step, then the bytes each rank holds, by component."""

import json
import sys

from warp_dist import dist as distmod
from warp_dist.config import load_config
from warp_dist.training.rl_step import policy_seed, rl_step
from warp_dist.training.session import Session

cfg = load_config(sys.argv[1], sys.argv[3:])
d = distmod.init(cfg.train.policies, 120, need_process_group=bool(cfg.train.deepspeed))
w = Session(cfg, d, log=lambda *_: None)
m = d.topo.policies_of(d.rank)[0]
w.policy.begin(w.init)
w.reference.load_(w.init.part, "ema")
w.push_weights()
rl_step(w, 1, m, 1, policy_seed(cfg.train.seed, 1, m), list(range(len(w.train_prompts))))
held = d.all_gather_object(w.held_bytes())
if d.is_main:
    with open(sys.argv[2], "w") as fh:
        json.dump(held, fh)
w.close()
distmod.shutdown()
