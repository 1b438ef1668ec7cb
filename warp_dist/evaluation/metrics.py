"""Evaluation metrics on held-out prompts: reward, KL(pi || pi_sft) from samples of pi, identical-to-SFT fraction.

KL is the mean over prompts of sum_t (log pi(y_t) - log pi_sft(y_t)) for y ~ pi (a Monte-Carlo estimate of the
sequence-level KL, both log-probs under the sampling distribution). `identical_fraction` compares each completion
with the SFT model's completion sampled with the same seed: with equal weights it is exactly 1.

Every result also carries (see warp_dist.evaluation.stats for what the intervals mean):
- reward_ci_low / reward_ci_high, kl_ci_low / kl_ci_high: 95 % Student-t intervals of the means over prompts;
- judge ("vader" | "classifier:<id>" | "none"), judge_mean, judge_std, judge_ci_low, judge_ci_high: the independent
  judge's score of the same texts (warp_dist.evaluation.judge; null when there is no judge);
- distinct_1, distinct_2: unique / total token n-grams over all completions (n-grams never cross completions);
- per prompt (EvalResult: rewards, kls, judges, in prompt order), for paired comparisons between models;
- what the reward measured besides its value (`accuracy` for the verifiable reward, `reward_<name>` for each term of
  a sum): <name>_mean, <name>_ci_low, <name>_ci_high, and per prompt in EvalResult.parts.

The evaluator (`evaluation.evaluator.Evaluator`) samples and scores: prompt i is sampled with its own seed (eval.seed, i), batches
are spread over the ranks, and `summarize` puts every rank's records back in prompt order, so the numbers do not depend
on how many ranks share the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import distinct_n, mean_ci


@dataclass
class EvalResult:
    metrics: dict
    completions: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    judges: list[float] | None = None  # None: no judge
    parts: dict[str, list[float]] = field(default_factory=dict)  # a sum's terms, an accuracy: per prompt, by name

    def per_prompt(self) -> dict:
        """Per-prompt values in prompt order (what paired bootstraps resample): reward, kl, judge (or None)."""
        return {"reward": list(self.rewards), "kl": list(self.kls),
                "judge": None if self.judges is None else list(self.judges),
                **{name: list(v) for name, v in self.parts.items()}}

    def to_json(self) -> dict:
        """As plain JSON (it goes into checkpoint positions and the run's evals.json)."""
        return {"metrics": self.metrics, "completions": self.completions, "texts": self.texts,
                "rewards": self.rewards, "kls": self.kls, "judges": self.judges, "parts": self.parts}

    @classmethod
    def from_json(cls, data: dict) -> EvalResult:
        return cls(data["metrics"], data["completions"], data["texts"], data["rewards"], data.get("kls", []),
                   data.get("judges"), data.get("parts") or {})


def interval_metrics(prefix: str, values: list[float]) -> dict:
    """<prefix>_ci_low / <prefix>_ci_high: the 95 % t-interval of the mean of `values`."""
    _, lo, hi = mean_ci(values)
    return {f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi}


def judge_metrics(judge: str, values: list[float] | None) -> dict:
    if values is None:
        return {"judge": judge, "judge_mean": None, "judge_std": None, "judge_ci_low": None, "judge_ci_high": None}
    t = torch.tensor(values, dtype=torch.float64)
    return {"judge": judge, "judge_mean": t.mean().item(), "judge_std": t.std(unbiased=False).item(),
            **interval_metrics("judge", values)}


def summarize(records: list[dict], rank_times: list[dict], sft_completions: list[list[int]] | None,
              judge: str = "none") -> EvalResult:
    """Metrics over all prompts (records from every rank) + throughput overall and per rank. `judge`: the judge's
    name; records carry its per-prompt score as "judge" (None without one)."""
    records = sorted(records, key=lambda r: r["index"])
    n = len(records)
    comps = [r["completion"] for r in records]
    rewards, kls = [r["reward"] for r in records], [r["kl"] for r in records]
    judges = [r["judge"] for r in records] if records and all(r.get("judge") is not None for r in records) else None
    rt = torch.tensor(rewards, dtype=torch.float64)
    if sft_completions is None:
        ident = float("nan")
    else:
        ident = sum(a == b for a, b in zip(comps, sft_completions, strict=True)) / n
    gen_wall = max(t["generate"] for t in rank_times)
    tokens = sum(t["tokens"] for t in rank_times)
    metrics = {
        "reward_mean": rt.mean().item(), "reward_std": rt.std(unbiased=False).item(), **interval_metrics("reward", rewards),
        "kl_mean": sum(kls) / n, **interval_metrics("kl", kls), **judge_metrics(judge, judges),
        "identical_fraction": ident, "num_prompts": n,
        "length_mean": sum(r["length"] for r in records) / n, "distinct_1": distinct_n(comps, 1),
        "distinct_2": distinct_n(comps, 2), "num_tokens": tokens,
        "time_generate_s": gen_wall, "time_score_s": max(t["score"] for t in rank_times),
        "time_kl_s": max(t["kl"] for t in rank_times),
        "tokens_per_s": tokens / max(gen_wall, 1e-9),
        "tokens_per_s_per_rank": [t["tokens"] / max(t["generate"], 1e-9) for t in rank_times],
        "num_ranks": len(rank_times),
    }
    parts = {name: [r["parts"][name] for r in records] for name in (records[0].get("parts") or {})} if records else {}
    for name, values in parts.items():  # a sum's terms (reward_<name>), a verifiable reward's accuracy
        metrics[f"{name}_mean"] = sum(values) / n
        metrics.update(interval_metrics(name, values))
    return EvalResult(metrics, comps, [r["text"] for r in records], rewards, kls, judges, parts)


def fmt_metrics(name: str, m: dict) -> str:
    """One log line of an evaluation's metrics."""
    judge = ""
    if m.get("judge_mean") is not None:
        judge = f"  judge {m['judge']} {m['judge_mean']:+.4f}"
    ci = ""
    if "reward_ci_low" in m:
        ci = f" [{m['reward_ci_low']:+.4f}, {m['reward_ci_high']:+.4f}]"
    if m.get("accuracy_mean") is not None:
        judge = f"  accuracy {m['accuracy_mean']:.3f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]" + judge
    return (f"{name}: reward {m['reward_mean']:+.4f}{ci} ± {m['reward_std']:.4f}  KL {m['kl_mean']:.4f}  "
            f"identical {m['identical_fraction']:.2f}  len {m['length_mean']:.1f}"
            + (f"  distinct-2 {m['distinct_2']:.3f}" if "distinct_2" in m else "") + f"{judge}  n={m['num_prompts']}")


def sample_rows(prompts: list[str], sft: EvalResult, final: EvalResult, n: int) -> list[dict]:
    """The first n prompts with the SFT model's and the final model's continuations and rewards."""
    return [{"prompt": prompts[i], "sft": sft.texts[i], "sft_reward": sft.rewards[i], "warp": final.texts[i],
             "warp_reward": final.rewards[i]} for i in range(min(n, len(prompts)))]
