"""Sharded evaluation of weights on the held-out prompts: reward, the judge, KL(pi || pi_sft) from samples of pi.

Batch k of the prompts goes to rank k % W (with a tensor-parallel rollout engine to group k % M, whose ranks all run
it); every prompt is sampled with its own seed (eval.seed, index), so the numbers do not depend on W. The reference
module holds the SFT weights for the KL. `warp_dist.evaluation.metrics.summarize` puts the ranks' records back in
prompt order.
"""

from __future__ import annotations

import time

import torch

from .. import dist as distmod
from .. import faults
from ..data import decode_pairs
from ..rollout.base import build_batch
from ..training import rl
from ..training.session import Session
from ..weights import Source, source_part
from . import evalcache
from .metrics import EvalResult, summarize


class Evaluator:
    """Evaluates what a session's policy module holds, or other weights loaded into it."""

    def __init__(self, s: Session):
        self.s = s

    def evaluate(self, state: Source | dict | None, sft: EvalResult | None) -> EvalResult:
        """Evaluate `state` (None = what the policy module holds now; a tensor source or a state dict otherwise)
        against the SFT model's result `sft` (None: this is the SFT model)."""
        s, d, ec = self.s, self.s.dist, self.s.cfg.eval
        t0 = time.perf_counter()
        if state is not None:
            src = state if callable(state) else (lambda n, sd=state: sd[n].float())
            s.weights.load_(source_part(src), "the weights under evaluation")
        s.reference.load_(s.sft.part, "sft")
        s.push_weights()
        nb = -(-len(s.eval_prompts) // ec.batch_size)
        # batch k goes to rank k % W; with a tensor-parallel engine to group k % M, whose ranks all run it
        units, unit = (d.topo.num_policies, d.topo.group_of(d.rank)) if s.group_sampling else (d.world_size, d.rank)
        mine = [k for k in range(nb) if k % units == unit]
        rounds = -(-nb // units)  # every rank runs the same number of batches (ZeRO-3 forwards are collective)
        records, times = [], {"generate": 0.0, "score": 0.0, "kl": 0.0, "tokens": 0}
        for i in range(rounds):
            real = i < len(mine)
            k = mine[i] if real else 0
            got, t = self.batch(k, kl=sft is not None)
            faults.point("eval")
            if real and (d.is_leader or not s.group_sampling):
                records += got
                for key in times:
                    times[key] += t[key]
        gathered = d.all_gather_object((records, times))
        res = summarize([r for recs, _ in gathered for r in recs], [t for _, t in gathered],
                        sft.completions if sft is not None else None, judge=s.judge_name)
        if sft is None:
            res.metrics["identical_fraction"] = 1.0  # the SFT model against itself, by definition
        res.metrics["time_eval_s"] = time.perf_counter() - t0
        s.tick("eval", time.perf_counter() - t0)
        distmod.trim_allocator()
        return res

    @torch.no_grad()
    def batch(self, k: int, kl: bool = True) -> tuple[list[dict], dict]:
        """Evaluation batch k: its records (index, completion, text, reward, kl, judge, length) and timings.
        kl=False (the SFT model against itself): every KL is 0 by definition and no forward is run for it."""
        s, ec = self.s, self.s.cfg.eval
        lo = k * ec.batch_size
        ids = s.eval_prompts.ids[lo: lo + ec.batch_size]
        t0 = time.perf_counter()
        gens = s.sample(ids, ec.seed, list(range(lo, lo + len(ids))), f"evaluation batch {k}")
        t1 = time.perf_counter()
        ptexts, ctexts = decode_pairs(s.tokenizer, gens.prompt_ids, gens.completion_ids)
        rows, convs = s.eval_prompts.reward_inputs(list(range(lo, lo + len(ids))))
        r = s.reward(ptexts, ctexts, where=f"evaluation batch {k}", rows=rows, conversations=convs).tolist()
        parts = {name: v.tolist() for name, v in s.reward.last_parts.items()}  # a sum's terms, an accuracy
        # the judge scores the same texts, per prompt (the same on any number of ranks)
        jd = (s.judge(ptexts, ctexts, where=f"evaluation batch {k}").tolist() if s.judge is not None
              else [None] * len(ctexts))
        t2 = time.perf_counter()
        kls: list[float] = [] if kl else [0.0] * len(ids)
        chunk = 8  # rows scored at a time: bounds the [rows, C, V] logits
        # ZeRO-3 forwards are collectives inside the policy group: every rank runs as many as a full batch needs,
        # a rank with a short last batch on a stand-in row (its result dropped), or the group waits until the timeout
        n_rows = ec.batch_size if (s.weights.zero3 and s.dist.group_size > 1) else len(ids)
        for a in range(0, n_rows if kl else 0, chunk):
            real = a < len(ids)
            take = slice(a, a + chunk) if real else slice(0, 1)
            sub = type(gens)(gens.prompt_ids[take], gens.completion_ids[take])
            b = build_batch(sub, s.pad, s.device)
            lp, support = s.logprobs(s.policy_logits, b)
            lp_sft, _ = s.logprobs(s.reference.logits, b, support)
            if real:
                kls += rl.kl_estimate(lp, lp_sft, b.mask).tolist()
        t3 = time.perf_counter()
        records = [{"index": lo + j, "completion": c, "text": ctexts[j], "reward": r[j], "kl": kls[j], "judge": jd[j],
                    "length": len(c), "parts": {name: v[j] for name, v in parts.items()}}
                   for j, c in enumerate(gens.completion_ids)]
        return records, {"generate": t1 - t0, "score": t2 - t1, "kl": t3 - t2, "tokens": gens.num_tokens}


def reused_sft_eval(s: Session) -> tuple[str, EvalResult] | None:
    """eval.reuse_from: (the file, the SFT evaluation) of another run made with this SFT model's weights and these
    settings (the rule launch/eval.py reuses by); rank 0 looks, every rank gets its answer. None: evaluate here."""
    cfg = s.cfg
    runs = [r.strip() for r in cfg.eval.reuse_from.split(",") if r.strip()]
    if not runs:
        return None
    found = None
    if s.is_main:
        setting = evalcache.settings(cfg, bool(cfg.train.deepspeed))
        digest = evalcache.folder_digest(s.model_path)
        for run in runs:
            store = evalcache.Store(run)
            res = store.get("sft", setting, digest, digest)
            if res is not None:
                found = (str(store.path), res.to_json())
                break
        if found is None:
            s.log(f"eval.reuse_from: no evaluation of this SFT model with these settings in {', '.join(runs)}; "
                  "evaluating it here")
    found = s.dist.broadcast_object(found)
    if found is None:
        return None
    s.log(f"SFT evaluation taken from {found[0]} (same SFT weights and settings)")
    return found[0], EvalResult.from_json(found[1])
