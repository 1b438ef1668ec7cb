"""The rollout interface every backend implements, and the padded batch the trainer consumes."""

from __future__ import annotations

import hashlib
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
    eos_ids: tuple[int, ...] = ()  # tokens that end a completion (blocked before min_new_tokens)

    @classmethod
    def from_rollout(cls, cfg, eos_ids=(), greedy: bool = False) -> SamplingConfig:
        return cls(cfg.max_new_tokens, cfg.min_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, greedy,
                   tuple(sorted(eos_ids)))


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
    version = 0  # the policy weights' write version this backend samples from (set by update_weights)
    tensor_parallel = 1  # ranks one engine spans (the ranks of a policy group sample the group's batch when > 1)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int,
                 version: int | None = None, indices: list[int] | None = None,
                 num_completions: int = 1, where: str = "", last_write: str = "") -> Generations:
        """`num_completions` (k) completions per prompt, prompt-major (prompt b's k completions are contiguous).

        Prompt b is sampled from `request_seed(seed, indices[b])` (default b), so its completions depend on the
        prompt, seed, index and k only — not on the batch it shares or the rank count. `version`: the policy weights'
        write version (`policy.Weights.version`); sampling from any other is refused, naming `where` the sample was
        asked for and `last_write`, the write that was not pushed.
        """
        if version is not None and version != self.version:
            what = f" (last written by {last_write})" if last_write else ""
            raise StaleWeightsError(f"{where + ': ' if where else ''}the {self.name} backend holds policy weights "
                                    f"v{self.version}, the policy is at v{version}{what}: push the weights "
                                    "(update_weights) before sampling")
        idx = list(range(len(prompt_ids))) if indices is None else list(indices)
        if len(idx) != len(prompt_ids):
            raise ValueError(f"{len(idx)} indices for {len(prompt_ids)} prompts")
        if num_completions == 1:
            return self._generate(prompt_ids, sampling, [request_seed(seed, i) for i in idx])
        return self._generate_n(prompt_ids, sampling, [request_seed(seed, i) for i in idx], num_completions)

    def _generate(self, prompt_ids, sampling, seeds: list[int]) -> Generations:
        raise NotImplementedError

    def _generate_n(self, prompt_ids, sampling, seeds: list[int], k: int) -> Generations:
        """k completions per prompt; default: the prompt k times, completion c of prompt b seeded from (seeds[b], c)."""
        reps = [p for p in prompt_ids for _ in range(k)]
        return self._generate(reps, sampling, [request_seed(s, c) for s in seeds for c in range(k)])

    def update_weights(self, weights, version: int) -> None:
        """Make the backend sample from the policy's current weights, labelled `version`.

        `weights()` yields (state-dict name, full tensor) one at a time (a backend that samples from the training
        module itself, like HF, does not call it: under ZeRO-3 each item is a collective gather).
        """
        raise NotImplementedError

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer steps (vLLM sleep mode on CUDA); default no-op."""

    def held_bytes(self) -> int:
        """Bytes the engine holds beyond the training module (its own weights and KV cache); 0 when it samples from
        the training module itself."""
        return 0

    def push_method(self) -> str:
        """How `update_weights` moves the weights, for the run's start line ("" = nothing is copied)."""
        return ""

    def close(self) -> None:
        pass


def truncate_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def request_seed(seed: int, index: int) -> int:
    """A 31-bit seed for request `index` of a batch sampled with `seed` (stable across runs, batch sizes, ranks)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class Batch:
    """Prompts left-padded to P, completions right-padded to C: one layout for sampling, training and scoring.

    ids/att/pos [B, P + C]; targets [B, C] = the completion tokens; mask [B, C] float (1 = a real completion token).
    The logits of the last C + 1 positions, minus the final one, predict `targets` (so only completion positions
    are projected through the LM head).
    """

    ids: torch.Tensor
    att: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    prompt_len: int

    @property
    def keep(self) -> int:
        return self.targets.shape[1] + 1

    @property
    def positions(self) -> torch.Tensor:
        """The C positions whose logits predict the completion tokens (prompt_len - 1 ... prompt_len + C - 2)."""
        return torch.arange(self.prompt_len - 1, self.prompt_len + self.targets.shape[1] - 1, device=self.ids.device)


def build_batch(gens: Generations, pad_id: int, device: torch.device | str = "cpu") -> Batch:
    P = max(len(p) for p in gens.prompt_ids)
    C = max(len(c) for c in gens.completion_ids)
    B = len(gens.prompt_ids)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + C), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(gens.prompt_ids, gens.completion_ids, strict=True)):
        ids[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        att[b, P - len(p): P + len(c)] = 1
        if c:
            ids[b, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[b, : len(c)] = 1.0
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), att.to(device), pos.to(device), ids[:, P:].to(device), mask.to(device), P)
