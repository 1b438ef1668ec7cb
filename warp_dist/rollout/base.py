"""The rollout interface every backend implements, and the padded batch the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class StaleWeightsError(RuntimeError):
    """A backend was asked to sample with weights older than the policy's current version."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 24
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    greedy: bool = False

    @classmethod
    def from_rollout(cls, cfg, greedy: bool = False) -> SamplingConfig:
        return cls(cfg.max_new_tokens, cfg.min_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, greedy)


@dataclass
class Generations:
    """Sampled completions. completion_ids[b] stops at (and includes) the first EOS, if one was sampled."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]] | None = None  # the backend's own log-probs of the sampled tokens

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutBackend:
    """Samples completions from the current policy weights.

    `version` is the policy version whose weights the backend holds; `generate(..., version=v)` raises
    StaleWeightsError if it holds another one, so sampling with stale weights cannot go unnoticed.
    """

    name = "base"
    version = 0

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int,
                 version: int | None = None) -> Generations:
        if version is not None and version != self.version:
            raise StaleWeightsError(f"{self.name} backend holds weights v{self.version}, policy is at v{version}: "
                                    "push the weights (update_weights) before sampling")
        return self._generate(prompt_ids, sampling, seed)

    def _generate(self, prompt_ids, sampling, seed) -> Generations:
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """Make the backend sample from `model`'s current weights, labelled `version`."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer steps (vLLM sleep mode on CUDA); default no-op."""

    def close(self) -> None:
        pass


def truncate_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def build_batch(gens: Generations, pad_id: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion batch.

    Returns input_ids [B, L], attention_mask [B, L] and completion_mask [B, L-1], where completion_mask[b, t]
    marks that input_ids[b, t+1] is a completion token (aligned with `rl.token_logprobs`).
    """
    seqs = [p + c for p, c in zip(gens.prompt_ids, gens.completion_ids, strict=True)]
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    cm = torch.zeros((B, L - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(gens.prompt_ids, gens.completion_ids, strict=True)):
        s = p + c
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[b, : len(s)] = 1
        cm[b, len(p) - 1: len(s) - 1] = 1.0
    return ids.to(device), att.to(device), cm.to(device)
