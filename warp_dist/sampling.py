"""Pure math of the sampling distribution: tensors in, tensors out (no I/O, no process groups).

A completion token is drawn from the *processed* distribution, not from softmax(logits): logits / temperature, EOS
blocked while fewer than `min_new_tokens` tokens were produced, then top-k, then top-p (nucleus), in that order — the
order both HF `generate` and vLLM apply. Every log-prob the trainer uses (the policy's, the anchor's, the SFT
reference's) must be taken under that same processing, or the REINFORCE gradient, the KL shaping and the reported KL
are computed for a distribution nobody sampled from.

The support (which tokens top-k / top-p keep) is a property of the distribution the sample was drawn from: it is
computed once from the sampling policy's logits (`support_mask`) and applied to every model scored on that sample
(`masked_logprobs`), so the anchor and the SFT model are renormalised over the same tokens. With top-k off and top-p = 1
(the default) the support is the whole vocabulary and this is plain softmax(logits / T) with EOS blocked where asked.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def eos_block_mask(num_positions: int, min_new_tokens: int, device=None) -> torch.Tensor:
    """[C] bool: True at completion positions j < min_new_tokens, where EOS may not be sampled."""
    return torch.arange(num_positions, device=device) < min_new_tokens


def block_eos(logits: torch.Tensor, blocked: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Set the EOS logits to -inf at the blocked positions. logits [..., V], blocked [...] bool -> new tensor."""
    if not eos_ids or not bool(blocked.any()):
        return logits
    out = logits.clone()
    ids = torch.as_tensor(sorted(eos_ids), device=logits.device)
    sel = out[..., ids]
    out[..., ids] = torch.where(blocked.unsqueeze(-1), torch.full_like(sel, NEG_INF), sel)
    return out


@torch.no_grad()
def support_mask(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """Tokens kept by top-k then top-p, from temperature-scaled logits [..., V]. -> bool [..., V], or None (all kept).

    top-k keeps every token whose logit ties the k-th largest; top-p keeps the smallest set of most likely tokens
    whose probability (after top-k) reaches top_p, always at least the most likely one (HF's and vLLM's rule).
    """
    V = scaled.shape[-1]
    use_k = 0 < top_k < V
    use_p = top_p < 1.0
    if not use_k and not use_p:
        return None
    x = scaled.float()
    keep = torch.ones_like(x, dtype=torch.bool)
    if use_k:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        keep &= x >= kth
    if use_p:
        masked = x.masked_fill(~keep, NEG_INF)
        sorted_logits, order = torch.sort(masked, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep &= ~drop
    return keep


def processed_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       eos_blocked: torch.Tensor | None = None, eos_ids: list[int] | tuple = (),
                       support: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs [..., V] of the processed sampling distribution (differentiable w.r.t. logits).

    logits [..., V]; eos_blocked [...] bool (positions where EOS is forbidden); `support` overrides the top-k/top-p
    support (pass the sampling policy's mask to score another model on the same support). Dropped tokens get -inf.
    """
    x = logits.float() / temperature
    if eos_blocked is not None:
        x = block_eos(x, eos_blocked, list(eos_ids))
    if support is None:
        support = support_mask(x, top_k, top_p)
    if support is not None:
        x = x.masked_fill(~support, NEG_INF)
    return torch.log_softmax(x, dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, eos_ids: list[int] | tuple = (),
                   support: torch.Tensor | None = None, return_support: bool = False):
    """Per-token log-probs of sampled completion tokens under the processed distribution (differentiable).

    logits [B, C, V] (position j predicts completion token j), targets [B, C], mask [B, C] (1 = real token).
    Computed as target logit - logsumexp over the support, so no [B, C, V] log-softmax is kept. The support is the
    top-k/top-p set of these logits unless `support` is given (pass the sampling policy's to score another model on
    the same tokens); the sampled token itself is always in it, so a sampler that broke a near-tie differently cannot
    produce -inf. Masked positions come back as 0. Returns [B, C] (and the support when `return_support`).
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    C = targets.shape[1]
    if min_new_tokens and eos_ids:
        x = block_eos(x, eos_block_mask(C, min_new_tokens, x.device).expand(targets.shape), list(eos_ids))
    if support is None and (top_k or top_p < 1.0):
        support = support_mask(x.detach(), top_k, top_p)
        if support is not None:
            support.scatter_(-1, targets.unsqueeze(-1), True)
    if support is not None:
        x = x.masked_fill(~support, NEG_INF)
    out = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    out = out.masked_fill(mask == 0, 0.0)
    return (out, support) if return_support else out


def gumbel_choice(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: argmax(logp + Gumbel noise). logp [B, V] (may hold -inf), noise [B, V] uniform(0,1)."""
    u = noise.clamp_(min=torch.finfo(noise.dtype).tiny, max=1.0 - torch.finfo(noise.dtype).eps)
    g = -torch.log(-torch.log(u))
    return torch.argmax(logp + g.to(logp.dtype), dim=-1)
