"""The WARP loop (arXiv 2406.16768, Algorithm 1), readable top to bottom.

Variant implemented: for i in 1..I, M policies start from theta_init and each runs T steps of REINFORCE on
one completion per prompt with the KL-shaped reward r - beta * sum_t(log pi - log pi_ema) (baseline: batch mean
or leave-one-out); the EMA anchor starts at theta_init and moves with rate mu after every optimizer step.
The M task vectors are merged with SLERP (iteratively with 1/m for M > 2), then theta_init <- LITI(eta).
Output: the last theta_slerp. Departures from the paper: one sample per prompt, AdamW instead of Adafactor,
log-probs at the sampling temperature without top-k/top-p renormalisation.

Phases: setup -> (train policies -> merge -> diagnose -> evaluate) x I -> final evaluation -> save.
`train_policy` is one call so the distributed runner can place each policy on its own ranks.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, merging, rl
from . import dist as distmod
from .config import WarpConfig
from .data import load_prompts
from .evaluation import EvalResult, batch_starts, sample_and_score, summarize
from .models import load_causal_lm, load_tokenizer, resolve_model_path
from .rewards import build_reward
from .rollout import SamplingConfig, build_batch, make_backend


class NoProgressError(RuntimeError):
    """Training left the weights where they started: the failure mode WARP runs must never hide."""


def policy_seed(base: int, iteration: int, policy: int) -> int:
    return base + 1000 * iteration + policy


@dataclass
class PolicyResult:
    state: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)


class Warp:
    """One process's view of a WARP run: models, reward, prompts, rollout backend, metrics log."""

    def __init__(self, cfg: WarpConfig, dist: distmod.Dist | None = None, log=print, metrics_path=None):
        self.dist = dist or distmod.init(cfg.train.policies, cfg.dist_timeout_s, cpu=cfg.cpu)
        self.cfg, self.device, self.is_main = cfg, self.dist.device, self.dist.is_main
        self.log = log if self.is_main else (lambda *_: None)
        self.metrics = checkpoint.MetricsLog(metrics_path if self.is_main else None)
        g = self.dist.topo.group_size
        if cfg.train.batch_size % g:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the policy group size {g}")
        self.local_batch = cfg.train.batch_size // g
        # DeepSpeed needs a process group even for a group of one rank: create one per rank, on every rank
        self.solo_groups = {}
        if cfg.train.deepspeed and self.dist.active:
            import torch.distributed as tdist

            self.solo_groups = {r: tdist.new_group([r]) for r in range(self.dist.world_size)}
        self.model_path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_causal_lm(self.model_path, cfg.model.dtype, self.device)
        self.sft_model = copy.deepcopy(self.model).requires_grad_(False)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.sft_state = merging.clone_state(self.model.state_dict(), "cpu")
        self.reward = build_reward(cfg.reward, self.device)
        self.train_prompts, self.eval_prompts = load_prompts(cfg.data, self.tokenizer)
        self.sampling = SamplingConfig.from_rollout(cfg.rollout)
        self.backend = make_backend(cfg.rollout.backend, self.model, self.tokenizer, self.model_path,
                                    cfg.rollout.vllm, seed=cfg.train.seed + 7919 * self.dist.rank, log=self.log)
        self.version = 0
        self.timers: dict[str, float] = {}
        self._pending: list[dict] = []

    # ---------------------------------------------------------------- helpers
    def _clock(self) -> float:
        """Wall clock for phase timings; waits for queued CUDA work so time lands in the right phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tick(self, phase: str, seconds: float) -> None:
        self.timers[phase] = self.timers.get(phase, 0.0) + seconds

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put `state` into the (whole, unwrapped) model and the rollout engine (new weights version)."""
        self.model.load_state_dict(state)
        self.push_weights(self.model)

    def push_weights(self, module, engine=None) -> None:
        """New weights version into the rollout backend (gathered first when ZeRO-3 partitions them)."""
        t0 = time.perf_counter()
        self.version += 1
        if engine is not None:
            with engine.gathered(engine.module.parameters()):
                self.backend.update_weights(module, self.version)
        else:
            self.backend.update_weights(module, self.version)
        self._tick("sync", time.perf_counter() - t0)

    # ---------------------------------------------------------------- phase: RL for one policy
    def train_policy(self, init_state: dict[str, torch.Tensor], iteration: int, policy: int,
                     progress=None) -> PolicyResult:
        """T REINFORCE steps from `init_state` with an EMA anchor; returns the trained weights (CPU copy)."""
        tc, d = self.cfg.train, self.dist
        seed = policy_seed(tc.seed, iteration, policy)
        torch.manual_seed(seed)
        eng = distmod.PolicyEngine(d, self.model, init_state, tc, tc.deepspeed, self.solo_groups)
        self.push_weights(eng.module, eng)
        fixed_anchor = tc.anchor == "sft"  # plain KL-regularised REINFORCE baseline: the anchor never moves
        self.ema_model.load_state_dict(self.sft_state if fixed_anchor else init_state)
        ema_params = [e for e, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True)
                      if p.requires_grad]
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_prompts), generator=gen).tolist()
        r, g, B = d.topo.rank_in_group(d.rank), d.topo.group_size, self.local_batch
        pad = self.tokenizer.pad_token_id
        history = []
        for step in range(1, tc.steps + 1):
            t0 = self._clock()
            # the group's step batch is tc.batch_size prompts; rank r of the group takes every g-th one
            idx = [order[((step - 1) * tc.batch_size + j * g + r) % len(order)] for j in range(B)]
            prompts = [self.train_prompts.ids[j] for j in idx]
            texts = [self.train_prompts.texts[j] for j in idx]
            gens = self.backend.generate(prompts, self.sampling, seed=(seed * 100003 + step) * 64 + r,
                                         version=self.version)
            t1 = self._clock()
            completions = self.tokenizer.batch_decode(gens.completion_ids, skip_special_tokens=True)
            reward = self.reward(texts, completions)
            t2 = self._clock()
            self.backend.sleep()  # CUDA + vLLM sleep mode: give the engine's memory to the training step
            ids, att, cm = build_batch(gens, pad, self.device)
            logits = eng.forward_module(input_ids=ids, attention_mask=att).logits
            logp = rl.token_logprobs(logits.float() / self.sampling.temperature, ids)
            with torch.no_grad():
                logp_ema = rl.token_logprobs(
                    self.ema_model(input_ids=ids, attention_mask=att).logits.float() / self.sampling.temperature, ids)
            shaped = rl.kl_shaped_reward(reward.to(self.device), logp.detach(), logp_ema, cm, tc.beta)
            adv = shaped - rl.baseline(shaped, tc.baseline)
            loss = rl.reinforce_loss(rl.sequence_logprob(logp, cm), adv)
            grad_norm = eng.step(loss)
            if not fixed_anchor:
                with eng.gathered(eng.params):
                    rl.ema_update(ema_params, eng.params, tc.mu)
            t3 = self._clock()
            self.push_weights(eng.module, eng)
            t4 = self._clock()
            self._tick("generate", t1 - t0)
            self._tick("score", t2 - t1)
            self._tick("train", t3 - t2)
            kl_ema = rl.kl_estimate(logp.detach(), logp_ema, cm).mean().item()
            rec = {"kind": "train", "iteration": iteration, "policy": policy, "step": step, "rank": d.rank,
                   "time": time.time(),
                   "reward_mean": reward.mean().item(), "reward_std": reward.std(unbiased=False).item(),
                   "shaped_reward_mean": shaped.mean().item(), "kl_to_ema": kl_ema, "loss": loss.item(),
                   "grad_norm": grad_norm, "length_mean": float(cm.sum(-1).mean().item()),
                   "time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_train_s": t3 - t2,
                   "time_sync_s": t4 - t3, "tokens_per_s": gens.num_tokens / max(t1 - t0, 1e-9)}
            if gens.sampler_logprobs is not None:
                rec["sampler_logprob_gap"] = sampler_gap(gens.sampler_logprobs, logp.detach().cpu(), cm.cpu())
            history.append(rec)
            self.record(rec)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{rec['reward_mean']:+.3f}", kl=f"{kl_ema:.3f}")
            elif step % self.cfg.log_every == 0 or step == tc.steps:
                self.log(f"iter {iteration} policy {policy} step {step}/{tc.steps} reward {rec['reward_mean']:+.4f} "
                         f"kl_ema {kl_ema:.4f} loss {rec['loss']:+.4f} |g| {grad_norm:.3f}")
        state = eng.state_dict()
        eng.close()
        return PolicyResult(state, history)

    def record(self, rec: dict) -> None:
        """Metrics go to rank 0's JSONL; other ranks hold theirs until `gather_records`."""
        if self.is_main:
            self.metrics.write(rec)
        else:
            self._pending.append(rec)

    def gather_records(self) -> None:
        for recs in self.dist.all_gather_object(self._pending)[1:]:
            for rec in recs:
                self.metrics.write(rec)
        self._pending = []

    # ---------------------------------------------------------------- phase: evaluation (sharded over ranks)
    def evaluate_state(self, state: dict[str, torch.Tensor], sft: EvalResult | None) -> EvalResult:
        """Evaluate `state` on the held-out prompts; batch k goes to rank k % W; every rank gets the result."""
        t0 = time.perf_counter()
        self.load_weights(state)
        ec, d = self.cfg.eval, self.dist
        nb = len(batch_starts(len(self.eval_prompts), ec.batch_size))
        mine = [k for k in range(nb) if k % d.world_size == d.rank]
        records, times = sample_and_score(self.model, self.sft_model, self.backend, self.tokenizer, self.reward,
                                          self.eval_prompts.ids, self.eval_prompts.texts, self.sampling, ec.seed,
                                          ec.batch_size, mine, self.version)
        gathered = d.all_gather_object((records, times))
        res = summarize([r for recs, _ in gathered for r in recs], [t for _, t in gathered],
                        sft.completions if sft is not None else None)
        if sft is None:
            res.metrics["identical_fraction"] = 1.0  # the SFT model against itself, by definition
        res.metrics["time_eval_s"] = time.perf_counter() - t0
        self._tick("eval", time.perf_counter() - t0)
        return res

    # ---------------------------------------------------------------- the whole run
    def run(self) -> dict:
        cfg, d, tc = self.cfg, self.dist, self.cfg.train
        out = Path(cfg.output_dir)
        t_start = time.perf_counter()
        self.log(f"WARP: model={cfg.model.name} reward={cfg.reward.kind} backend={self.backend.name} "
                 f"I={tc.iterations} M={tc.policies} T={tc.steps} batch={tc.batch_size} beta={tc.beta} mu={tc.mu} "
                 f"lambda={cfg.merge.lam} eta={cfg.merge.eta} ranks={d.world_size} groups={list(d.topo.groups)} "
                 f"engine={'deepspeed' if tc.deepspeed else ('ddp' if d.topo.group_size > 1 else 'plain')} -> {out}")
        sft_eval = self.evaluate_state(self.sft_state, None)
        self.record({"kind": "eval", "model": "sft", "iteration": 0, **sft_eval.metrics})
        self.log(fmt_metrics("SFT", sft_eval.metrics))
        init = self.sft_state
        slerp_state = init
        mine = d.topo.policies_of(d.rank)
        for it in range(1, tc.iterations + 1):
            results = {}
            t0 = time.perf_counter()
            for m in mine:
                bar = progress_bar(tc.steps, f"iter {it}/{tc.iterations} policy {m + 1}/{tc.policies}",
                                   cfg.progress and self.is_main)
                results[m] = self.train_policy(init, it, m, progress=bar)
                if bar is not None:
                    bar.close()
            t_train = time.perf_counter() - t0
            self.gather_records()
            t0 = time.perf_counter()
            d.barrier()  # every policy is trained before the merger starts
            t_wait = time.perf_counter() - t0
            t0 = time.perf_counter()
            sources = {m: (lambda name, st=r.state: st[name]) for m, r in results.items()}
            slerp_state, next_init, dots = distmod.stream_merge(d, init, sources, cfg.merge.lam, cfg.merge.eta)
            t_merge = time.perf_counter() - t0
            self._tick("merge", t_merge)
            histories = d.all_gather_object({m: r.history for m, r in results.items()})
            hist = {m: h for part in histories for m, h in part.items()}
            diag = diagnose(dots, init, slerp_state, next_init, self.sft_state, hist)
            self.record({"kind": "merge", "iteration": it, "time_train_s": t_train, "time_wait_s": t_wait,
                         "time_merge_s": t_merge, **diag})
            self.log(fmt_diag(it, diag))
            if cfg.save_iterations:
                self.save_iteration(out / f"iter_{it}", init, results, slerp_state)
            if cfg.eval.every_iteration and it < tc.iterations:
                ev = self.evaluate_state(slerp_state, sft_eval)
                self.record({"kind": "eval", "model": "slerp", "iteration": it, **ev.metrics})
                self.log(fmt_metrics(f"iter {it} slerp", ev.metrics))
            init = next_init
            del results
        final_dist = merging.distance(slerp_state, self.sft_state)
        if final_dist == 0.0:
            raise NoProgressError("the final weights are identical to the SFT weights: nothing was learned")
        final_eval = self.evaluate_state(slerp_state, sft_eval)
        self.record({"kind": "eval", "model": "final", "iteration": tc.iterations, **final_eval.metrics})
        self.log(fmt_metrics("WARP final", final_eval.metrics))
        if final_eval.metrics["identical_fraction"] == 1.0:
            self.log("ERROR: every final generation is identical to the SFT model's: the policy did not move "
                     "enough to change a single sample (raise train.lr or train.steps)")
        summary = {"sft": sft_eval.metrics, "final": {**final_eval.metrics, "weight_distance_to_sft": final_dist},
                   "timers_s": {**self.timers, "total": time.perf_counter() - t_start},
                   "world_size": d.world_size,
                   "samples": sample_rows(self.eval_prompts.texts, sft_eval, final_eval, cfg.eval.num_samples_shown)}
        if self.is_main:
            checkpoint.save_model(self.model, slerp_state, self.tokenizer, out / "final")
            checkpoint.write_json(out / "summary.json", summary)
        d.barrier()
        self.backend.close()
        return summary

    def save_iteration(self, folder: Path, init, results: dict, slerp_state) -> None:
        """iter_<i>/: init/ and merged/ from rank 0, policy_<m>/ from the leader of m's group."""
        d = self.dist
        if self.is_main:
            checkpoint.save_model(self.model, init, self.tokenizer, folder / "init")
            checkpoint.save_model(self.model, slerp_state, self.tokenizer, folder / "merged")
        for m, r in results.items():
            if d.topo.leader_of_policy(m) == d.rank:
                checkpoint.save_model(self.model, r.state, self.tokenizer, folder / f"policy_{m}")
        d.barrier()


# -------------------------------------------------------------------- diagnostics and printing
def sampler_gap(sampler_logprobs: list[list[float]], logp: torch.Tensor, cm: torch.Tensor) -> float:
    """Mean |log p_sampler - log p_trainer| over sampled tokens (vLLM's numbers vs the training model's)."""
    tot, n = 0.0, 0
    for b, lps in enumerate(sampler_logprobs):
        pos = cm[b].nonzero().flatten().tolist()
        for t, v in zip(pos, lps, strict=False):
            tot += abs(v - logp[b, t].item())
            n += 1
    return tot / max(n, 1)


def diagnose(dots: torch.Tensor, init, slerp_state, next_init, sft_state, histories: dict[int, list[dict]]) -> dict:
    """Task-vector norms and angles (from the merger's Gram matrix), how far theta_init moved, reward/KL trends."""
    stats = merging.stats_from_dots(dots)
    for m, norm in enumerate(stats["task_vector_norm"]):
        if norm == 0.0 or not math.isfinite(norm):
            raise NoProgressError(f"policy {m}'s task vector has norm {norm}: its training did not change the "
                                  "weights (check train.lr, the reward's variance, and the gradients)")
    order = sorted(histories)
    return {**stats,
            "init_moved": merging.distance(next_init, init),
            "slerp_distance_to_init": merging.distance(slerp_state, init),
            "slerp_distance_to_sft": merging.distance(slerp_state, sft_state),
            "policy_reward_first_last": [[histories[m][0]["reward_mean"], histories[m][-1]["reward_mean"]]
                                         for m in order],
            "policy_kl_to_ema_last": [histories[m][-1]["kl_to_ema"] for m in order]}


def fmt_diag(it: int, d: dict) -> str:
    norms = ", ".join(f"{x:.4g}" for x in d["task_vector_norm"])
    ang = ", ".join(f"{k}: {v:.1f} deg (cos {d['cosine'][k]:.3f})" for k, v in d["angle_deg"].items()) or "-"
    rw = "; ".join(f"p{m} {a:+.3f}->{b:+.3f}" for m, (a, b) in enumerate(d["policy_reward_first_last"]))
    return (f"iter {it} merge: |task vectors| [{norms}] angles [{ang}] init moved {d['init_moved']:.4g} "
            f"|slerp - sft| {d['slerp_distance_to_sft']:.4g} reward {rw}")


def fmt_metrics(name: str, m: dict) -> str:
    return (f"{name}: reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}  KL {m['kl_mean']:.4f}  "
            f"identical {m['identical_fraction']:.2f}  len {m['length_mean']:.1f}  n={m['num_prompts']}")


def sample_rows(prompts: list[str], sft: EvalResult, final: EvalResult, n: int) -> list[dict]:
    return [{"prompt": prompts[i], "sft": sft.texts[i], "sft_reward": sft.rewards[i], "warp": final.texts[i],
             "warp_reward": final.rewards[i]} for i in range(min(n, len(prompts)))]


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
