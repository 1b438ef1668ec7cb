"""HF `generate` backend: samples straight from the training model object, so its weights are always current."""

from __future__ import annotations

import torch

from .base import Generations, RolloutBackend, SamplingConfig, truncate_at_eos


class HFBackend(RolloutBackend):
    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.version = 0

    def update_weights(self, model, version: int) -> None:
        if model is not self.model:
            self.model = model
        self.version = version

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int) -> Generations:
        model = self.model
        device = next(model.parameters()).device
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), P), self.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, p in enumerate(prompt_ids):  # left padding
            ids[b, P - len(p):] = torch.tensor(p)
            att[b, P - len(p):] = 1
        kw = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens or None,
                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids))
        if sampling.greedy:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            # top_k=0 and top_p=1.0 switch those filters off (None would fall back to generation_config's 50)
            kw.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)
        model.train(was_training)
        comp = out[:, P:].tolist()
        return Generations([list(p) for p in prompt_ids], [truncate_at_eos(c, self.eos_ids) for c in comp])
