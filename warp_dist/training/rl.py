"""Pure RL math for WARP's inner loop: tensors in, tensors out (no I/O, no process groups).

Variant: REINFORCE on whole sequences with a KL-shaped reward against an EMA anchor, as in WARP
(arXiv 2406.16768, Sec. 3.1): r~ = r - beta * sum_t (log pi - log pi_ema), detached; the baseline is the
batch mean or leave-one-out mean of r~.
"""

from __future__ import annotations

import torch


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over the masked (completion) positions. [B, L-1] x [B, L-1] -> [B]."""
    return (token_logp * mask).sum(-1)


def kl_shaped_reward(reward: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """r - beta * sum_t (log pi - log pi_ref) over completion tokens, detached. Shapes [B], [B, L-1] x3 -> [B]."""
    kl = ((logp - logp_ref) * mask).sum(-1)
    return (reward - beta * kl).detach()


def baseline(shaped: torch.Tensor, kind: str, num_completions: int = 1) -> torch.Tensor:
    """Per-sample baseline for [N] rewards.

    num_completions k = 1: over the whole batch, 'mean' (batch mean) or 'loo' (mean of the other N-1).
    k > 1: the N = P * k samples are prompt-major (prompt i's k completions are contiguous) and the baseline is per
    prompt: 'loo' is RLOO (mean of the prompt's other k-1 completions), 'mean' the prompt's mean.
    Pass the whole policy-group batch (gathered over the group's ranks) so the estimator does not depend on how many
    ranks share the batch.
    """
    if kind not in ("mean", "loo"):
        raise ValueError(f"unknown baseline {kind!r}: allowed mean | loo")
    k = num_completions
    if k < 1 or shaped.numel() % k:
        raise ValueError(f"{shaped.numel()} rewards cannot be split into groups of num_completions={k}")
    groups = shaped.reshape(-1, shaped.numel() if k == 1 else k)
    n = groups.shape[1]
    if kind == "mean":
        return groups.mean(-1, keepdim=True).expand_as(groups).reshape(shaped.shape)
    if n < 2:
        raise ValueError("leave-one-out baseline needs at least 2 samples per group")
    return ((groups.sum(-1, keepdim=True) - groups) / (n - 1)).reshape(shaped.shape)


def reinforce_loss(seq_logp: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """-mean_b(A_b * log pi(y_b|x_b)); advantage is treated as a constant. [B], [B] -> scalar."""
    return -(advantage.detach() * seq_logp).mean()


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], mu: float) -> None:
    """In place: ema <- (1 - mu) * ema + mu * theta, tensor by tensor (float tensors only)."""
    for e, p in zip(ema, params, strict=True):
        if e.is_floating_point():
            e.lerp_(p.to(e.dtype), mu)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(pi || ref) per sample from samples of pi: sum_t (log pi - log ref). -> [B]."""
    return ((logp - logp_ref) * mask).sum(-1)
