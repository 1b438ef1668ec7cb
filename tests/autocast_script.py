"""One process: the dtype the policy computes in through DeepSpeed's engine forward, with DeepSpeed's autocast test made
to see CPU autocast the way it sees CUDA autocast on a GPU (argv: config, out JSON, overrides...).

DeepSpeed 0.19's engine forward asks `torch.is_autocast_enabled()` without a device, which answers for CUDA only, and
switches an outer autocast off when its own config declares none. On this CPU the patched call answers for the CPU,
so the engine makes the decision it makes on a GPU. Writes {"dtypes": [...output dtypes of the linear layers...],
"max_logprob_gap": policy (engine forward) vs reference (same weights, plain forward)}.
"""

import json
import sys

import torch

_is_autocast_enabled = torch.is_autocast_enabled


def _sees_cpu(device_type=None):
    return _is_autocast_enabled(device_type or "cpu")


torch.is_autocast_enabled = _sees_cpu  # before DeepSpeed is imported: its module reads `torch.is_autocast_enabled`

from warp_dist import dist as distmod  # noqa: E402
from warp_dist.config import load_config  # noqa: E402
from warp_dist.rollout.base import Generations, build_batch  # noqa: E402
from warp_dist.training.session import Session  # noqa: E402

cfg = load_config(sys.argv[1], sys.argv[3:])
d = distmod.init(cfg.train.policies, 120, need_process_group=True)
w = Session(cfg, d, log=lambda *_: None)
w.policy.begin(w.init)
w.reference.load_(w.init.part, "ema")
dtypes = []
hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.append(str(out.dtype)))
         for m in w.policy.module.modules() if type(m).__name__ in ("Linear", "Conv1D")]
prompts = w.train_prompts.ids[:4]
gens = Generations(prompts, [list(p[::-1]) for p in prompts])  # any tokens: both models score the same ones
batch = build_batch(gens, w.pad, w.device)
logp, support = w.logprobs(w.policy.loss_logits, batch)
for h in hooks:
    h.remove()
with torch.no_grad():
    logp_ref, _ = w.logprobs(w.reference.logits, batch, support)
gap = float(((logp.detach() - logp_ref) * batch.mask).abs().max())
with open(sys.argv[2], "w") as fh:
    json.dump({"dtypes": sorted(set(dtypes)), "max_logprob_gap": gap, "engine": w.policy.kind}, fh)
w.close()
distmod.shutdown()
