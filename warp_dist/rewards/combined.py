"""`reward.kind=sum`: a weighted sum of several rewards (`reward.terms`), each term's unweighted scores kept for the
logs (`reward_<name>` in training records and evaluation metrics)."""

from __future__ import annotations

import torch

from .scorers import Reward


class SumReward(Reward):
    name = "sum"

    def __init__(self, terms: dict[str, tuple[float, Reward]], **kw):
        super().__init__(**kw)
        self.terms = terms

    def score(self, prompts, completions, rows=None, conversations=None):
        total = torch.zeros(len(completions), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name, (weight, reward) in self.terms.items():
            s = reward(prompts, completions, rows=rows, conversations=conversations)  # each term checked on its own
            parts[f"reward_{name}"] = s
            parts.update(reward.last_parts)
            total += weight * s
        self.last_parts = parts
        return total
