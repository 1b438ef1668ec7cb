"""Evaluation on held-out prompts: reward, KL(pi || pi_sft) from samples of pi, identical-to-SFT fraction.

KL is the mean over prompts of sum_t (log pi(y_t) - log pi_sft(y_t)) for y ~ pi (a Monte-Carlo estimate of the
sequence-level KL). `identical_fraction` compares each completion with the SFT model's completion sampled
with the same seed: with equal weights it is exactly 1.

The prompts are cut into fixed batches; batch k is sampled with seed + k. A rank evaluates whole batches, so the
records do not depend on how many ranks share the work (`summarize` puts them back in prompt order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .rl import kl_estimate, token_logprobs
from .rollout.base import Generations, SamplingConfig, build_batch


@torch.no_grad()
def completion_logprobs(model, gens: Generations, pad_id: int, temperature: float = 1.0, chunk: int = 32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completions under `model`: ([B, L-1], completion_mask [B, L-1]) on CPU."""
    device = next(model.parameters()).device
    ids, att, cm = build_batch(gens, pad_id, device)
    outs = []
    for i in range(0, ids.shape[0], chunk):
        logits = model(input_ids=ids[i:i + chunk], attention_mask=att[i:i + chunk]).logits
        outs.append(token_logprobs(logits.float() / temperature, ids[i:i + chunk]))
    return torch.cat(outs).cpu(), cm.cpu()


def batch_starts(num_prompts: int, batch_size: int) -> list[int]:
    return list(range(0, num_prompts, batch_size))


def sample_and_score(model, sft_model, backend, tokenizer, reward_fn, prompt_ids: list[list[int]],
                     prompt_texts: list[str], sampling: SamplingConfig, seed: int, batch_size: int,
                     batches: list[int], version: int | None = None) -> tuple[list[dict], dict]:
    """Evaluate the batches numbered `batches` (batch k = prompts[k*B:(k+1)*B], seed + k).

    Returns per-prompt records {index, completion, reward, kl, length} and this rank's phase times.
    """
    pad = tokenizer.pad_token_id
    records, times = [], {"generate": 0.0, "score": 0.0, "kl": 0.0, "tokens": 0}
    for k in batches:
        i = k * batch_size
        t0 = time.perf_counter()
        gens = backend.generate(prompt_ids[i:i + batch_size], sampling, seed + k, version=version)
        t1 = time.perf_counter()
        texts = tokenizer.batch_decode(gens.completion_ids, skip_special_tokens=True)
        r = reward_fn(prompt_texts[i:i + batch_size], texts).tolist()
        t2 = time.perf_counter()
        lp, cm = completion_logprobs(model, gens, pad, sampling.temperature)
        lp_sft, _ = completion_logprobs(sft_model, gens, pad, sampling.temperature)
        kl = kl_estimate(lp, lp_sft, cm).tolist()
        times["kl"] += time.perf_counter() - t2
        times["generate"] += t1 - t0
        times["score"] += t2 - t1
        times["tokens"] += gens.num_tokens
        for j, c in enumerate(gens.completion_ids):
            records.append({"index": i + j, "completion": c, "text": texts[j], "reward": r[j], "kl": kl[j],
                            "length": len(c)})
    return records, times


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


def evaluate(model, sft_model, backend, tokenizer, reward_fn, prompt_ids, prompt_texts, sampling: SamplingConfig,
             seed: int, batch_size: int, sft_completions=None, version: int | None = None) -> EvalResult:
    """Single-process evaluation of every prompt."""
    batches = list(range(len(batch_starts(len(prompt_ids), batch_size))))
    records, times = sample_and_score(model, sft_model, backend, tokenizer, reward_fn, prompt_ids, prompt_texts,
                                      sampling, seed, batch_size, batches, version)
    return summarize(records, [times], sft_completions)
