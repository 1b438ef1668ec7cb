"""Evaluation metrics on held-out prompts: reward, KL(pi || pi_sft) from samples of pi, identical-to-SFT fraction.

KL is the mean over prompts of sum_t (log pi(y_t) - log pi_sft(y_t)) for y ~ pi (a Monte-Carlo estimate of the
sequence-level KL, both log-probs under the sampling distribution). `identical_fraction` compares each completion
with the SFT model's completion sampled with the same seed: with equal weights it is exactly 1.

The trainer (`Warp.evaluate_state`) samples and scores: prompt i is sampled with its own seed (eval.seed, i), batches
are spread over the ranks, and `summarize` puts every rank's records back in prompt order, so the numbers do not depend
on how many ranks share the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EvalResult:
    metrics: dict
    completions: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def summarize(records: list[dict], rank_times: list[dict], sft_completions: list[list[int]] | None) -> EvalResult:
    """Metrics over all prompts (records from every rank) + throughput overall and per rank."""
    records = sorted(records, key=lambda r: r["index"])
    n = len(records)
    comps = [r["completion"] for r in records]
    rt = torch.tensor([r["reward"] for r in records], dtype=torch.float64)
    if sft_completions is None:
        ident = float("nan")
    else:
        ident = sum(a == b for a, b in zip(comps, sft_completions, strict=True)) / n
    gen_wall = max(t["generate"] for t in rank_times)
    tokens = sum(t["tokens"] for t in rank_times)
    metrics = {
        "reward_mean": rt.mean().item(), "reward_std": rt.std(unbiased=False).item(),
        "kl_mean": sum(r["kl"] for r in records) / n, "identical_fraction": ident, "num_prompts": n,
        "length_mean": sum(r["length"] for r in records) / n, "num_tokens": tokens,
        "time_generate_s": gen_wall, "time_score_s": max(t["score"] for t in rank_times),
        "time_kl_s": max(t["kl"] for t in rank_times),
        "tokens_per_s": tokens / max(gen_wall, 1e-9),
        "tokens_per_s_per_rank": [t["tokens"] / max(t["generate"], 1e-9) for t in rank_times],
        "num_ranks": len(rank_times),
    }
    return EvalResult(metrics, comps, [r["text"] for r in records], [r["reward"] for r in records])
