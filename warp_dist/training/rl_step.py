"""RL phase: one policy trained for T REINFORCE steps from theta_init against its EMA anchor (or the SFT anchor).

A step: the group's batch of prompts (rank r of a group of G takes every G-th slot, k completions each; a
tensor-parallel engine samples the whole group batch on every rank of the group), the reward, the KL-shaped reward
r - beta * sum_t(log pi - log pi_anchor) under the sampling distribution, the baseline over the whole group batch
(leave-one-out, per prompt when k > 1, or the mean), one optimizer step, the EMA update, and the new weights pushed
into the rollout engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import dist as distmod
from .. import faults
from ..data import decode_pairs
from ..guards import check_finite, where
from ..rollout.base import build_batch
from ..weights import write_stream
from . import rl
from .session import Session


def policy_seed(base: int, iteration: int, policy: int) -> int:
    return base + 1000 * iteration + policy


def step_seed(seed: int, step: int) -> int:
    return seed * 100003 + step


def train_policy(s: Session, iteration: int, policy: int, progress=None,
                 restore: Callable[[], int] | None = None, on_step=None) -> list[dict]:
    """T REINFORCE steps from theta_init; the trained weights stay in the policy module. Returns the step records.

    `restore()`: puts back a checkpoint's policy in training (weights, EMA, optimizer) after the policy began and
    returns the step it had reached; `on_step(step, rec)` runs after every step (the periodic checkpoints).
    """
    tc = s.cfg.train
    seed = policy_seed(tc.seed, iteration, policy)
    torch.manual_seed(seed)
    s.policy.begin(s.init)
    if tc.anchor == "sft":  # plain KL-regularised REINFORCE baseline: the anchor never moves
        s.reference.load_(s.sft.part, "sft")
    else:
        s.reference.load_(s.init.part, "ema")
    first = 1
    if restore is not None:
        first = restore() + 1
    s.push_weights()
    order = torch.randperm(len(s.train_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    history = []
    if progress is not None and first > 1:
        progress.update(first - 1)
    for step in range(first, tc.steps + 1):
        rec = rl_step(s, iteration, policy, step, seed, order)
        history.append(rec)
        s.records.add(rec)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{rec['reward_mean']:+.3f}", kl=f"{rec['kl_to_ema']:.3f}")
        elif step % s.cfg.log_every == 0 or step == tc.steps:
            s.log(f"iter {iteration} policy {policy} step {step}/{tc.steps} reward {rec['reward_mean']:+.4f} "
                  f"kl_ema {rec['kl_to_ema']:.4f} loss {rec['loss']:+.4f} |g| {rec['grad_norm']:.3f}")
        if on_step is not None:
            on_step(step, rec)
    s.policy.end()
    # freed memory goes back to the OS at the end of a policy, not after every step: a step's activations
    # come back from the heap on the next step, and trimming them made every step page-fault them in again
    # (bf16 SmolLM2 step on the 2-core Xeon: policy forward 0.53 -> 0.31 s without the per-step trim)
    distmod.trim_allocator()
    return history


def rl_step(s: Session, iteration: int, policy: int, step: int, seed: int, order: list[int]) -> dict:
    """One step of policy `policy`; returns its metrics record."""
    tc, d, k = s.cfg.train, s.dist, s.k
    g, r, B = d.group_size, d.group_rank, s.local_batch
    t0 = s.clock()
    # the group's step batch is tc.batch_size prompts; rank r of the group takes every g-th one, k times each
    slots = [j * g + r for j in range(B)]
    asked = list(range(tc.batch_size)) if s.group_sampling else slots  # TP engine: the whole group batch
    idx = [order[((step - 1) * tc.batch_size + slot) % len(order)] for slot in asked]
    at = where(iteration, policy, step)
    gens = s.sample([s.train_prompts.ids[i] for i in idx], step_seed(seed, step), asked, at, k)
    if s.group_sampling:  # keep this rank's slots
        keep = [slot * k + c for slot in slots for c in range(k)]
        gens = type(gens)([gens.prompt_ids[i] for i in keep], [gens.completion_ids[i] for i in keep],
                          [gens.sampler_logprobs[i] for i in keep] if gens.sampler_logprobs else None)
        idx = [idx[slot] for slot in slots]
    t1 = s.clock()
    ptexts, ctexts = decode_pairs(s.tokenizer, gens.prompt_ids, gens.completion_ids)
    rows, convs = s.train_prompts.reward_inputs(idx, k)  # the dataset columns (an answer) and conversations
    # one finite score per completion, or a one-line error
    reward = s.reward(ptexts, ctexts, where=at, rows=rows, conversations=convs)
    parts = {name: v.mean().item() for name, v in s.reward.last_parts.items()}  # a sum's terms, an accuracy
    t2 = s.clock()
    s.backend.sleep()  # CUDA + vLLM sleep mode: give the engine's memory to the training step
    batch = build_batch(gens, s.pad, s.device)
    logp, support = s.logprobs(s.policy.loss_logits, batch)
    with torch.no_grad():
        logp_ref, _ = s.logprobs(s.reference.logits, batch, support)
    shaped = rl.kl_shaped_reward(reward.to(s.device), logp.detach(), logp_ref, batch.mask, tc.beta)
    check_finite(shaped, "shaped reward", at)
    adv = shaped - group_baseline(s, shaped)
    loss = rl.reinforce_loss(rl.sequence_logprob(logp, batch.mask), adv)
    check_finite(loss.detach(), "loss", at)
    grad_norm = s.policy.step(loss, at)
    if tc.anchor == "ema":
        s.reference.ema_update_(s.policy, tc.mu)
    faults.point("step")
    t3 = s.clock()
    s.push_weights()
    t4 = s.clock()
    s.tick("generate", t1 - t0)
    s.tick("score", t2 - t1)
    s.tick("train", t3 - t2)
    kl_ema = rl.kl_estimate(logp.detach(), logp_ref, batch.mask).mean().item()
    rec = {"kind": "train", "iteration": iteration, "policy": policy, "step": step, "rank": d.rank,
           "time": time.time(),
           "reward_mean": reward.mean().item(), "reward_std": reward.std(unbiased=False).item(),
           "shaped_reward_mean": shaped.mean().item(), "kl_to_ema": kl_ema, "loss": loss.item(),
           "grad_norm": grad_norm, "length_mean": float(batch.mask.sum(-1).mean().item()),
           "time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_train_s": t3 - t2,
           "time_sync_s": t4 - t3, "tokens_per_s": gens.num_tokens / max(t1 - t0, 1e-9),
           **{f"{name}_mean": v for name, v in parts.items()}}
    if gens.sampler_logprobs is not None:
        rec["sampler_logprob_gap"] = sampler_gap(gens.sampler_logprobs, logp.detach().cpu(), batch.mask.cpu())
    return rec


def group_baseline(s: Session, shaped: torch.Tensor) -> torch.Tensor:
    """This rank's baselines, computed over the whole group batch (so the estimator does not depend on G)."""
    g, k, B = s.dist.group_size, s.k, s.local_batch
    if g == 1:
        return rl.baseline(shaped, s.cfg.train.baseline, k)
    every = s.dist.group_all_gather(shaped.detach())  # [g * B * k], rank-major
    # rank r's j-th prompt is slot j * g + r of the group batch: put the batch back in slot order
    ordered = every.view(g, B, k).transpose(0, 1).reshape(-1)
    base = rl.baseline(ordered, s.cfg.train.baseline, k).view(B, g, k)
    return base[:, s.dist.group_rank].reshape(-1)


def save_policy(s: Session, iteration: int, policy: int) -> Path:
    """The trained policy as fp32 safetensors (its group gathers tensor by tensor, the leader writes)."""
    path = s.state_dir / "blobs" / f"iter{iteration}_policy{policy}.safetensors"
    w = s.weights
    at = where(iteration, policy, phase="end of training")

    def checked():  # non-finite weights are never written
        for i, (name, t) in enumerate(w.iter_full(torch.float32)):
            check_finite(t, f"policy weights tensor {name}", at)
            if i == len(w.names) // 2:
                faults.point("blob")
            yield name, t

    stream = checked()
    t0 = time.perf_counter()
    if s.dist.is_leader:
        write_stream(path, [(n, w.shapes[n], torch.float32) for n in w.names], stream)
    else:
        for _ in stream:
            pass
    s.tick("checkpoint", time.perf_counter() - t0)  # the policy file is the phase-boundary checkpoint's
    return path


def sampler_gap(sampler_logprobs: list[list[float]], logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log p_sampler - log p_trainer| over sampled tokens (the rollout engine's numbers vs the trainer's)."""
    tot, n = 0.0, 0
    for b, lps in enumerate(sampler_logprobs):
        m = int(mask[b].sum().item())
        for j, v in enumerate(lps[:m]):
            tot += abs(v - logp[b, j].item())
            n += 1
    return tot / max(n, 1)
