"""HF backend: samples from the training module itself with a small decoding loop, so its weights are always current.

The loop (prefill, then one token at a time with the KV cache) draws each token from the processed distribution of
`warp_dist.sampling` — the same function the trainer scores with — using Gumbel-max with one random stream per
request (`request_seed`), so a completion does not depend on the other prompts of its batch. Under ZeRO-3 every
forward is a collective inside the policy group: `sync` (any rank of the group still running?) keeps the group's
ranks stepping together until every rank's batch is done, so ranks that finish early never leave the others waiting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sampling import gumbel_choice, processed_logprobs
from .base import Generations, RolloutBackend, SamplingConfig


class HFBackend(RolloutBackend):
    name = "hf"

    def __init__(self, module_fn: Callable[[], torch.nn.Module], pad_id: int, eos_ids: set[int],
                 autocast_fn: Callable | None = None, sync: Callable[[bool], bool] | None = None):
        self.module_fn = module_fn  # returns the module to sample from (the policy's, partitioned or not)
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.autocast_fn = autocast_fn
        self.sync = sync
        self.version = 0

    def update_weights(self, weights, version: int) -> None:
        self.version = version  # samples straight from the training module: nothing to copy

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> Generations:
        import contextlib

        model = self.module_fn()
        ctx = self.autocast_fn() if self.autocast_fn is not None else contextlib.nullcontext()
        with ctx:
            comps, lps = sample(model, prompt_ids, sampling, seeds, self.pad_id, self.eos_ids, self.sync)
        return Generations([list(p) for p in prompt_ids], comps, lps)


def sample(model, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int], pad_id: int,
           eos_ids: set[int], sync: Callable[[bool], bool] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one completion per prompt. Returns (completion ids, their processed log-probs), each completion
    ending at (and including) its first EOS. Rows are independent: row b only uses the stream seeded by seeds[b]."""
    device = next(iter(model.parameters())).device
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    att = torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        att[b, P - len(p):] = 1
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eos = sorted(eos_ids)
    comps: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    last_pos = pos[:, -1:]
    for j in range(sampling.max_new_tokens):
        blocked = torch.full((B,), j < sampling.min_new_tokens, device=logits.device)
        if sampling.greedy:
            logp = processed_logprobs(logits, 1.0, 0, 1.0, blocked, eos)
            tok = logp.argmax(-1)
        else:
            logp = processed_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p, blocked, eos)
            noise = torch.zeros(B, logp.shape[-1])
            for b in range(B):
                if not done[b]:
                    noise[b] = torch.rand(logp.shape[-1], generator=gens[b])
            tok = gumbel_choice(logp, noise.to(logp.device))
        chosen = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).float().cpu()
        tok_cpu = tok.cpu()
        for b in range(B):
            if not done[b]:
                t = int(tok_cpu[b])
                comps[b].append(t)
                lps[b].append(float(chosen[b]))
                if t in eos_ids:
                    done[b] = True
        finished = bool(done.all()) or j == sampling.max_new_tokens - 1
        if sync is not None:
            finished = not sync(not finished)  # keep stepping while any rank of the group is still sampling
        if finished:
            break
        feed = torch.where(done, torch.full_like(tok_cpu, pad_id), tok_cpu).to(device)
        att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=feed.unsqueeze(-1), attention_mask=att, position_ids=last_pos, past_key_values=past,
                    use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    model.train(was_training)
    return comps, lps
