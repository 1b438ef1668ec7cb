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


CHUNK_BYTES = 8 << 20  # fp32 bytes of one chunk of rows in the fused log-prob (reused heap memory, not an mmap)


def _row_chunks(B: int, C: int, V: int):
    """(b, c0, c1) chunks of the [B, C, V] logits, each at most CHUNK_BYTES of fp32 (at least one row)."""
    rows = max(1, CHUNK_BYTES // (4 * V))
    for b in range(B):
        for c0 in range(0, C, rows):
            yield b, c0, min(C, c0 + rows)


def _processed_chunk(logits, b, c0, c1, temperature, blocked, eos, support) -> torch.Tensor:
    """fp32 processed logits of rows c0:c1 of sequence b: / temperature, EOS blocked, off-support -inf (a new tensor)."""
    x = logits[b, c0:c1].to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    if blocked is not None:
        rows = blocked[b, c0:c1].unsqueeze(-1)
        x[:, eos] = torch.where(rows, torch.full_like(x[:, eos], NEG_INF), x[:, eos])
    if support is not None:
        x.masked_fill_(~support[b, c0:c1], NEG_INF)
    return x


class _TargetLogprob(torch.autograd.Function):
    """log p(target) under the processed distribution, chunk by chunk: no [B, C, V] fp32 copy of the logits is made
    in the forward or the backward (the backward recomputes each chunk's softmax from the saved logits and logsumexp,
    and writes the gradient in the logits' own dtype). Same values and gradients as log_softmax + gather."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, blocked, eos, support):
        B, C, V = logits.shape
        out = torch.empty((B, C), dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b, c0, c1 in _row_chunks(B, C, V):
            x = _processed_chunk(logits, b, c0, c1, temperature, blocked, eos, support)
            lse[b, c0:c1] = torch.logsumexp(x, dim=-1)
            out[b, c0:c1] = x.gather(-1, targets[b, c0:c1].unsqueeze(-1)).squeeze(-1) - lse[b, c0:c1]
        ctx.save_for_backward(logits, targets, lse, blocked, eos, support)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, blocked, eos, support = ctx.saved_tensors
        B, C, V = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_out = grad_out.float()
        for b, c0, c1 in _row_chunks(B, C, V):
            x = _processed_chunk(logits, b, c0, c1, ctx.temperature, blocked, eos, support)
            g = grad_out[b, c0:c1].unsqueeze(-1)
            gx = x.sub_(lse[b, c0:c1].unsqueeze(-1)).exp_().mul_(-g)  # -g * softmax (0 off the support)
            gx.scatter_add_(-1, targets[b, c0:c1].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                gx.div_(ctx.temperature)
            grad[b, c0:c1] = gx
        return grad, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, eos_ids: list[int] | tuple = (),
                   support: torch.Tensor | None = None, return_support: bool = False):
    """Per-token log-probs of sampled completion tokens under the processed distribution (differentiable).

    logits [B, C, V] (position j predicts completion token j; any float dtype), targets [B, C], mask [B, C]
    (1 = real token). Computed in fp32 as target logit - logsumexp over the support, a chunk of rows at a time
    (`_TargetLogprob`: no [B, C, V] fp32 copy or log-softmax is kept, the gradient comes back in the logits' dtype).
    The support is the top-k/top-p set of these logits unless `support` is given (pass the sampling policy's to score
    another model on the same tokens); the sampled token itself is always in it, so a sampler that broke a near-tie
    differently cannot produce -inf. Masked positions come back as 0. Returns [B, C] (and the support when
    `return_support`).
    """
    C = targets.shape[1]
    blocked = eos = None
    if min_new_tokens and eos_ids:
        blocked = eos_block_mask(C, min_new_tokens, logits.device).expand(targets.shape).contiguous()
        eos = torch.as_tensor(sorted(set(eos_ids)), dtype=torch.long, device=logits.device)
    if support is None and (top_k or top_p < 1.0):
        with torch.no_grad():
            x = logits.detach().float() / temperature
            if blocked is not None:
                x = block_eos(x, blocked, list(eos_ids))
            support = support_mask(x, top_k, top_p)
            del x
        if support is not None:
            support.scatter_(-1, targets.unsqueeze(-1), True)
    out = _TargetLogprob.apply(logits, targets, float(temperature), blocked, eos, support)
    out = out.masked_fill(mask == 0, 0.0)
    return (out, support) if return_support else out


def gumbel_choice(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: argmax(logp + Gumbel noise). logp [B, V] (may hold -inf), noise [B, V] uniform(0,1)."""
    u = noise.clamp_(min=torch.finfo(noise.dtype).tiny, max=1.0 - torch.finfo(noise.dtype).eps)
    g = -torch.log(-torch.log(u))
    return torch.argmax(logp + g.to(logp.dtype), dim=-1)
