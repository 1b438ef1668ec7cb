"""Run under `accelerate launch` with G ranks and train.policies=1: one vLLM engine tensor parallel over the group.

Takes two RL steps (each ends with a push of the gathered weights into every rank's shard), then samples the
evaluation prompts from the group's engine on every rank; then group g samples g + 1 more batches (groups issue
different numbers of generate calls: independent engines must not wait for each other), and the policy is evaluated
(batches sharded over the groups). argv: config, out JSON,
overrides... Rank 0 writes {"tokens": per rank, "logprobs": per rank, "groups": per rank, "prompts", "seed",
"weights": a safetensors path of rank 0's policy weights, "train": the step records per rank}.
"""

import json
import sys
from pathlib import Path

from warp_dist import dist as distmod
from warp_dist.config import load_config
from warp_dist.evaluation.evaluator import Evaluator
from warp_dist.training.rl_step import policy_seed, rl_step
from warp_dist.training.session import Session

cfg = load_config(sys.argv[1], sys.argv[3:])
d = distmod.init(cfg.train.policies, 120, need_process_group=True)
w = Session(cfg, d, log=lambda *_: None)
assert w.group_sampling, "expected one engine over the group"
m = d.topo.policies_of(d.rank)[0]
w.policy.begin(w.init)
w.reference.load_(w.init.part, "ema")
w.push_weights()
order = list(range(len(w.train_prompts)))
records = [rl_step(w, 1, m, step, policy_seed(cfg.train.seed, 1, m), order) for step in (1, 2)]
prompts = w.eval_prompts.ids[:8]
gens = w.sample(prompts, 4321, list(range(len(prompts))), "test")
full = w.state_dict()  # gathered from the ZeRO-3 partitions (a collective)
group = d.topo.group_of(d.rank)
for extra in range(group + 1):
    w.sample(w.eval_prompts.ids[8 * extra: 8 * extra + 4 + group], 99 + extra, list(range(4 + group)), "extra")
ev = Evaluator(w).evaluate(None, None)  # sharded by group: every rank of a group runs the group's batches
every = d.all_gather_object({"tokens": gens.completion_ids, "logprobs": gens.sampler_logprobs, "train": records,
                             "group": group, "seed": w.backend.seed, "eval_prompts": ev.metrics["num_prompts"]})
if d.is_main:
    from safetensors.torch import save_file

    out = Path(sys.argv[2])
    save_file({k: v.contiguous() for k, v in full.items()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps({"tokens": [e["tokens"] for e in every], "logprobs": [e["logprobs"] for e in every],
                               "train": [e["train"] for e in every], "groups": [e["group"] for e in every],
                               "engine_seeds": [e["seed"] for e in every],
                               "eval_prompts": [e["eval_prompts"] for e in every],
                               "prompts": prompts, "seed": 4321,
                               "weights": str(out.with_suffix(".safetensors"))}))
w.close()
distmod.shutdown()
