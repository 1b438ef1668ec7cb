"""The WARP loop (arXiv 2406.16768, Algorithm 1), readable top to bottom.

Variant implemented: for i in 1..I, M policies start from theta_init and each runs T steps of REINFORCE on
k completions per prompt (default 1) with the KL-shaped reward r - beta * sum_t(log pi - log pi_ema); the baseline
is leave-one-out (RLOO per prompt when k > 1) or the mean, computed over the whole policy-group batch. The EMA anchor
starts at theta_init and moves with rate mu after every optimizer step. The M task vectors are merged with SLERP
(one angle per tensor; iteratively with 1/m for M > 2), then theta_init <- LITI(eta). Output: the last theta_slerp.
Every log-prob (policy, anchor, SFT) is taken under the distribution the tokens were sampled from (temperature,
min_new_tokens, top-k/top-p; see `warp_dist.sampling`). Departures from the paper: AdamW instead of Adafactor.

Phases: setup -> evaluate SFT -> (train policies -> merge -> diagnose -> evaluate) x I -> final evaluation -> save.
What each rank holds, and in which dtype, is `warp_dist.policy`'s memory rule; this file only runs the algorithm.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, evalcache, faults, merging, rl, sampling, stats
from . import dist as distmod
from .config import WarpConfig
from .data import decode_pairs, load_prompts
from .evaluation import EvalResult, summarize
from .guards import RunError, check_finite, where
from .judge import build_judge, judge_label, resolve_judge
from .models import eos_token_ids, load_tokenizer, param_layout, resolve_model_path
from .policy import (
    DTYPES,
    InitStore,
    Policy,
    Reference,
    attention_impl,
    autocast,
    build_module,
    deepspeed_config,
)
from .rewards import build_reward
from .rollout import SamplingConfig, build_batch, make_backend, resolve_backend
from .topology import tensor_parallel_size
from .tracking import Tracking, samples_markdown
from .weights import ModelFiles, ParamFiles, SafeFile, Source, StreamWriter, source_part, write_stream


class NoProgressError(RunError):
    """Training left the weights where they started: the failure mode WARP runs must never hide."""


def policy_seed(base: int, iteration: int, policy: int) -> int:
    return base + 1000 * iteration + policy


def step_seed(seed: int, step: int) -> int:
    return seed * 100003 + step


@dataclass
class PolicyResult:
    history: list[dict] = field(default_factory=list)
    path: Path | None = None  # fp32 safetensors of the trained policy (written by its group leader)


class Warp:
    """One process's view of a WARP run: policy, reference, theta_init, reward, prompts, rollout backend, metrics."""

    def __init__(self, cfg: WarpConfig, dist: distmod.Dist | None = None, log=print, metrics_path=None):
        tc = cfg.train
        self.dist = dist or distmod.init(tc.policies, cfg.dist_timeout_s, cpu=cfg.cpu,
                                         need_process_group=bool(tc.deepspeed), phase_timeout_s=cfg.phase_timeout_s)
        d = self.dist
        self.cfg, self.device, self.is_main = cfg, d.device, d.is_main
        self.log = log if self.is_main else (lambda *_: None)
        self.metrics = checkpoint.MetricsLog(metrics_path if self.is_main else None)
        # the same records into TensorBoard / wandb (log_with), rank 0 of a run with a metrics file only
        self.tracker = (Tracking(cfg.log_with, cfg.output_dir, tc.steps, d.group_size, _config_text(cfg))
                        if self.is_main and metrics_path else None)
        if tc.batch_size % d.group_size:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the policy group size "
                             f"{d.group_size}")
        self.local_batch = tc.batch_size // d.group_size
        self.k = cfg.rollout.num_completions
        self.compute_dtype = DTYPES[cfg.model.dtype]
        self.state_dir = Path(cfg.output_dir) / "state"
        self.model_path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
        self.tokenizer = load_tokenizer(self.model_path)
        self.pad = self.tokenizer.pad_token_id
        self.sampling = SamplingConfig.from_rollout(cfg.rollout, eos_token_ids(self.tokenizer, self.model_path))
        self.reward = build_reward(cfg.reward, self.device)
        self.judge = build_judge(cfg, self.device)  # the evaluation's independent judge (None: eval.judge gives none)
        self.judge_name = judge_label(resolve_judge(cfg.reward, cfg.eval)[1])
        self.train_prompts, self.eval_prompts = load_prompts(cfg.data, self.tokenizer)
        self.log(f"prompts: {len(self.train_prompts)} train, {len(self.eval_prompts)} eval "
                 f"({self.eval_prompts.duplicates_skipped} eval candidates equal to a train prompt skipped)")
        # the models (see warp_dist.policy for what each holds): SFT on disk, policy, reference, theta_init
        self.sft = self._open_sft()
        sizes = dict(hidden=self.hidden_size(), layer_numel=largest_layer(self.sft_layout[0], self.sft_layout[2]))
        ds_conf = deepspeed_config(tc.deepspeed, tc, d.group_size, True, **sizes) if tc.deepspeed else None
        ref_conf = deepspeed_config(tc.deepspeed, tc, d.group_size, False, **sizes) if tc.deepspeed else None
        zero3 = ds_conf is not None and ds_conf["zero_optimization"].get("stage", 0) == 3
        if zero3:
            distmod.tune_allocator(mmap_threshold=1 << 18, arenas=2)  # partitions of a few hundred KB: off the heap
        max_len = cfg.data.prompt_max_tokens + 2 + cfg.rollout.max_new_tokens
        attention = attention_impl(cfg.model.attention, self.device, self.compute_dtype, max_len)
        module = build_module(self.model_path, d, ds_conf, self.sft.part, attention)
        self.reference = Reference(module, self.model_path, d, self.compute_dtype, ref_conf, self.sft.part, attention)
        self.attention = module.config._attn_implementation  # the kernel the model runs (auto may leave its default)
        gc = tc.gradient_checkpointing
        checkpointing = gc == "true" or (gc == "auto" and zero3)
        self.policy = Policy(module, d, self.compute_dtype, tc, ds_conf, checkpointing=checkpointing)
        self.init = InitStore(self.policy.w, self.sft.part)  # theta_init of iteration 1: the SFT weights
        distmod.trim_allocator()
        backend = resolve_backend(cfg.rollout.backend, self.log)
        # one vLLM engine per policy group (tensor parallel over its G ranks) or one per rank: rollout.vllm
        tp = (tensor_parallel_size(cfg.rollout.vllm.tensor_parallel, self.device.type == "cuda", d.group_size)
              if backend == "vllm" else 1)
        self.backend = make_backend(
            backend, module_fn=lambda: self.policy.module, tokenizer=self.tokenizer,
            model_path=self.model_path, eos_ids=self.sampling.eos_ids, dtype=cfg.model.dtype, device=self.device,
            vllm_cfg=cfg.rollout.vllm, seed=tc.seed + 7919 * (d.topo.group_of(d.rank) if tp > 1 else d.rank),
            autocast_fn=lambda: autocast(self.device, self.compute_dtype),
            sync=d.group_any if (self.policy.w.zero3 and d.group_size > 1) else None,
            max_seqs=max(tc.batch_size * self.k, cfg.eval.batch_size), max_len=max_len, tensor_parallel=tp,
            log=self.log)
        # a tensor-parallel engine samples the whole group batch on every rank of the group (the same requests and
        # seeds: the engine's seed too is the group's)
        self.group_sampling = tp > 1
        self.timers: dict[str, float] = {}
        self._pending: list[dict] = []

    # ---------------------------------------------------------------- setup helpers
    def _open_sft(self) -> ParamFiles:
        """The SFT parameters on disk, tensor by tensor: the model folder itself when its safetensors carry every
        parameter, else a canonical fp32 copy `state/sft.safetensors` written once by rank 0."""
        names, aliases, shapes = self.sft_layout = param_layout(self.model_path)
        try:
            found = ParamFiles.match(ModelFiles(self.model_path), names, aliases, shapes)
        except FileNotFoundError:
            found = None
        if found is not None:
            return found
        path = self.state_dir / "sft.safetensors"
        if self.is_main and not path.exists():
            from .models import load_causal_lm

            model = load_causal_lm(self.model_path, "float32", "cpu")
            params = dict(model.named_parameters())
            write_stream(path, [(n, shapes[n], torch.float32) for n in names],
                               ((n, params[n].detach()) for n in names))
            del model, params
        self.dist.barrier()
        return ParamFiles(SafeFile(path), {n: n for n in names})

    def hidden_size(self) -> int:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(self.model_path)
        return int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0) or 0)

    # ---------------------------------------------------------------- helpers
    def _clock(self) -> float:
        """Wall clock for phase timings; waits for queued CUDA work so time lands in the right phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tick(self, phase: str, seconds: float) -> None:
        self.timers[phase] = self.timers.get(phase, 0.0) + seconds

    def push_weights(self) -> None:
        """The policy's weights into the rollout backend (streamed tensor by tensor; gathered under ZeRO-3), labelled
        with their write version: a later write that is not pushed makes the next sample refuse."""
        t0 = time.perf_counter()
        self.backend.update_weights(lambda: self.policy.w.iter_full(with_aliases=True, copy=False),
                                    self.policy.w.version)
        self._tick("sync", time.perf_counter() - t0)

    def sample(self, prompt_ids, seed: int, indices: list[int], where: str, num_completions: int = 1):
        """The backend's completions from the policy's current weights (refused, naming `where`, if they changed since
        the last push)."""
        w = self.policy.w
        return self.backend.generate(prompt_ids, self.sampling, seed=seed, version=w.version, indices=indices,
                                     num_completions=num_completions, where=where, last_write=w.last_write)

    def logprobs(self, logits_fn, batch, support=None):
        """Completion log-probs from `logits_fn` (a model's) under the sampling distribution. -> ([B, C], support)"""
        logits = logits_fn(batch.ids, batch.att, batch.pos, batch.positions)  # [B, C, V]
        s = self.sampling
        return sampling.token_logprobs(logits, batch.targets, batch.mask, s.temperature, s.top_k, s.top_p,
                                       s.min_new_tokens, s.eos_ids, support=support, return_support=True)

    def held_bytes(self) -> dict[str, int]:
        """What this rank holds, by component, counted from its tensors (see warp_dist.policy's memory rule)."""
        out = self.policy.held_bytes()
        out["reference"] = self.reference.w.local_bytes()
        out["theta_init"] = 0  # on disk (InitStore), read when needed
        out["rollout_engine"] = getattr(self.backend, "held_bytes", lambda: 0)()
        out["total"] = sum(out.values())
        return out

    def state_dict(self, which: str = "policy") -> dict[str, torch.Tensor]:
        """Full fp32 copy of the policy's (or the reference's, or the SFT) parameters — for tests and small models;
        a collective under ZeRO-3."""
        if which == "sft":
            return {n: self.sft.full(n) for n in self.policy.names}
        w = self.policy.w if which == "policy" else self.reference.w
        return dict(w.iter_full(torch.float32))

    def record(self, rec: dict) -> None:
        """Metrics go to rank 0's JSONL (and trackers); other ranks hold theirs until `gather_records`."""
        if self.is_main:
            self._write(rec)
        else:
            self._pending.append(rec)

    def _write(self, rec: dict) -> None:
        self.metrics.write(rec)
        if self.tracker is not None:
            self.tracker.record(rec)

    def gather_records(self) -> None:
        for recs in self.dist.all_gather_object(self._pending)[1:]:
            for rec in recs:
                self._write(rec)
        self._pending = []

    # ---------------------------------------------------------------- phase: RL for one policy
    def train_policy(self, iteration: int, policy: int, progress=None, resume: Path | None = None,
                     on_step=None) -> PolicyResult:
        """T REINFORCE steps from theta_init with an EMA anchor; the trained weights stay in the policy module.

        `resume`: a checkpoint's rank folder holding this policy mid-training (weights, EMA, optimizer, RNG) and the
        step it had reached; `on_step(step)` runs after every step (the periodic checkpoints).
        """
        tc = self.cfg.train
        seed = policy_seed(tc.seed, iteration, policy)
        torch.manual_seed(seed)
        self.policy.begin(self.init)
        if tc.anchor == "sft":  # plain KL-regularised REINFORCE baseline: the anchor never moves
            self.reference.load_(self.sft.part, "sft")
        else:
            self.reference.load_(self.init.part, "ema")
        first = 1
        if resume is not None:
            first = self.restore_rank_state(resume) + 1
        self.push_weights()
        order = torch.randperm(len(self.train_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        history = []
        if progress is not None and first > 1:
            progress.update(first - 1)
        for step in range(first, tc.steps + 1):
            rec = self.rl_step(iteration, policy, step, seed, order)
            history.append(rec)
            self.record(rec)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{rec['reward_mean']:+.3f}", kl=f"{rec['kl_to_ema']:.3f}")
            elif step % self.cfg.log_every == 0 or step == tc.steps:
                self.log(f"iter {iteration} policy {policy} step {step}/{tc.steps} reward {rec['reward_mean']:+.4f} "
                         f"kl_ema {rec['kl_to_ema']:.4f} loss {rec['loss']:+.4f} |g| {rec['grad_norm']:.3f}")
            if on_step is not None:
                on_step(step, rec)
        self.policy.end()
        # freed memory goes back to the OS at the end of a policy, not after every step: a step's activations
        # come back from the heap on the next step, and trimming them made every step page-fault them in again
        # (bf16 SmolLM2 step on the 2-core Xeon: policy forward 0.53 -> 0.31 s without the per-step trim)
        distmod.trim_allocator()
        return PolicyResult(history)

    def rl_step(self, iteration: int, policy: int, step: int, seed: int, order: list[int]) -> dict:
        tc, d, k = self.cfg.train, self.dist, self.k
        g, r, B = d.group_size, d.group_rank, self.local_batch
        t0 = self._clock()
        # the group's step batch is tc.batch_size prompts; rank r of the group takes every g-th one, k times each
        slots = [j * g + r for j in range(B)]
        asked = list(range(tc.batch_size)) if self.group_sampling else slots  # TP engine: the whole group batch
        idx = [order[((step - 1) * tc.batch_size + s) % len(order)] for s in asked]
        at = where(iteration, policy, step)
        gens = self.sample([self.train_prompts.ids[i] for i in idx], step_seed(seed, step), asked, at, k)
        if self.group_sampling:  # keep this rank's slots
            keep = [s * k + c for s in slots for c in range(k)]
            gens = type(gens)([gens.prompt_ids[i] for i in keep], [gens.completion_ids[i] for i in keep],
                              [gens.sampler_logprobs[i] for i in keep] if gens.sampler_logprobs else None)
        t1 = self._clock()
        ptexts, ctexts = decode_pairs(self.tokenizer, gens.prompt_ids, gens.completion_ids)
        reward = self.reward(ptexts, ctexts, where=at)  # one finite score per completion, or a one-line error
        t2 = self._clock()
        self.backend.sleep()  # CUDA + vLLM sleep mode: give the engine's memory to the training step
        batch = build_batch(gens, self.pad, self.device)
        logp, support = self.logprobs(self.policy.loss_logits, batch)
        with torch.no_grad():
            logp_ref, _ = self.logprobs(self.reference.logits, batch, support)
        shaped = rl.kl_shaped_reward(reward.to(self.device), logp.detach(), logp_ref, batch.mask, tc.beta)
        check_finite(shaped, "shaped reward", at)
        adv = shaped - self.group_baseline(shaped)
        loss = rl.reinforce_loss(rl.sequence_logprob(logp, batch.mask), adv)
        check_finite(loss.detach(), "loss", at)
        grad_norm = self.policy.step(loss, at)
        if tc.anchor == "ema":
            self.reference.ema_update_(self.policy, tc.mu)
        faults.point("step")
        t3 = self._clock()
        self.push_weights()
        t4 = self._clock()
        self._tick("generate", t1 - t0)
        self._tick("score", t2 - t1)
        self._tick("train", t3 - t2)
        kl_ema = rl.kl_estimate(logp.detach(), logp_ref, batch.mask).mean().item()
        rec = {"kind": "train", "iteration": iteration, "policy": policy, "step": step, "rank": d.rank,
               "time": time.time(),
               "reward_mean": reward.mean().item(), "reward_std": reward.std(unbiased=False).item(),
               "shaped_reward_mean": shaped.mean().item(), "kl_to_ema": kl_ema, "loss": loss.item(),
               "grad_norm": grad_norm, "length_mean": float(batch.mask.sum(-1).mean().item()),
               "time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_train_s": t3 - t2,
               "time_sync_s": t4 - t3, "tokens_per_s": gens.num_tokens / max(t1 - t0, 1e-9)}
        if gens.sampler_logprobs is not None:
            rec["sampler_logprob_gap"] = sampler_gap(gens.sampler_logprobs, logp.detach().cpu(), batch.mask.cpu())
        return rec

    def group_baseline(self, shaped: torch.Tensor) -> torch.Tensor:
        """This rank's baselines, computed over the whole group batch (so the estimator does not depend on G)."""
        g, k, B = self.dist.group_size, self.k, self.local_batch
        if g == 1:
            return rl.baseline(shaped, self.cfg.train.baseline, k)
        every = self.dist.group_all_gather(shaped.detach())  # [g * B * k], rank-major
        # rank r's j-th prompt is slot j * g + r of the group batch: put the batch back in slot order
        ordered = every.view(g, B, k).transpose(0, 1).reshape(-1)
        base = rl.baseline(ordered, self.cfg.train.baseline, k).view(B, g, k)
        return base[:, self.dist.group_rank].reshape(-1)

    def save_policy(self, iteration: int, policy: int) -> Path:
        """The trained policy as fp32 safetensors (its group gathers tensor by tensor, the leader writes)."""
        path = self.state_dir / "blobs" / f"iter{iteration}_policy{policy}.safetensors"
        w = self.policy.w
        at = where(iteration, policy, phase="end of training")

        def checked():  # non-finite weights are never written
            for i, (name, t) in enumerate(w.iter_full(torch.float32)):
                check_finite(t, f"policy weights tensor {name}", at)
                if i == len(w.names) // 2:
                    faults.point("blob")
                yield name, t

        stream = checked()
        t0 = time.perf_counter()
        if self.dist.is_leader:
            write_stream(path, [(n, w.shapes[n], torch.float32) for n in w.names], stream)
        else:
            for _ in stream:
                pass
        self._tick("checkpoint", time.perf_counter() - t0)  # the policy file is the phase-boundary checkpoint's
        return path

    # ---------------------------------------------------------------- phase: merge (rank 0 streams, all update)
    def merge(self, iteration: int, policy_paths: dict[int, Path]) -> dict:
        """SLERP + LITI of this iteration's policies, tensor by tensor (see dist.stream_merge).

        After it: every rank's theta_init slices are the next theta_init, its policy module holds theta_slerp, and
        rank 0 has written both as fp32 safetensors (state/blobs) plus the merge diagnostics.
        """
        cfg, d, w = self.cfg, self.dist, self.policy.w
        files = {m: SafeFile(p) for m, p in policy_paths.items() if d.topo.leader_of_policy(m) == d.rank}
        sources = {m: (lambda name, f=f: f.get(name)) for m, f in files.items()}
        blobs = self.state_dir / "blobs"
        stats = MergeDiagnostics(d.topo.num_policies) if d.is_main else None
        full_init = blobs / f"iter{iteration + 1}_init.safetensors"
        own_init = blobs / f"iter{iteration + 1}_init.rank{d.rank}.safetensors"
        own_is_full = self.init_is_full()
        writers = []
        if d.is_main:
            specs = [(n, w.shapes[n], torch.float32) for n in w.names]
            writers = [StreamWriter(blobs / f"iter{iteration}_slerp.safetensors", specs), StreamWriter(full_init, specs)]
        mine = None if own_is_full else StreamWriter(own_init, self.init.parts_specs())

        def on_main(name, init, slerp, nxt, policies, gram):
            if not bool(torch.isfinite(gram).all()):  # a NaN/inf in a policy or in theta_init: name it
                for m, t in enumerate(policies):
                    check_finite(t, f"policy {m} tensor {name}", where(iteration, phase="merge"))
                check_finite(init, f"theta_init tensor {name}", where(iteration, phase="merge"))
            check_finite(torch.tensor(merging.slerp_coefficients(gram[:-1, :-1], cfg.merge.lam)),
                         f"merge coefficients of {name}", where(iteration, phase="merge"))
            stats.add(init.numel(), gram, cfg.merge.lam, cfg.merge.eta)
            writers[0].add(name, slerp)
            writers[1].add(name, nxt)

        first = iteration == 1  # theta_init is the SFT model: |theta_slerp - sft| needs no second read

        numels = [int(torch.Size(w.shapes[n]).numel()) for n in w.names]
        model_bytes = 4 * sum(numels)  # merged in fp32
        kernel = merging.kernel_for(cfg.merge.kernel, model_bytes, d.topo.num_policies, cfg.train.iterations)

        largest = max(numels)
        reused: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

        def merge_fn(name, init_full, policies):
            sft = None if first else self.sft.full(name)
            dt, n = init_full.dtype, init_full.numel()
            if dt.is_floating_point and dt not in reused:  # output buffers for every tensor: no fresh pages each time
                reused[dt] = (torch.empty(largest, dtype=dt), torch.empty(largest, dtype=dt))
            out, nxt = (reused[dt][0][:n], reused[dt][1][:n]) if dt.is_floating_point else (None, None)
            # safe to reuse: on_main writes both to files and on_slerp copies theta_slerp out before the next tensor
            return merging.merge_pass(init_full, policies, cfg.merge.lam, cfg.merge.eta, sft=sft, kernel=kernel,
                                      out=out, nxt=nxt)

        half = w.names[len(w.names) // 2]

        def on_slerp(name, full):
            if name == half:
                faults.point("merge")
            start, count = w.span(name)
            part = source_part(lambda _: full)(name, start, count)
            if mine is not None:  # the next theta_init (LITI) of this rank's slice, as rank 0 computes it
                mine.add(name, torch.lerp(self.init.own(name), part, cfg.merge.eta))
            w.local(name).copy_(part)  # the policy module now holds theta_slerp (for evaluation and saving)

        every = writers + ([mine] if mine is not None else [])
        try:
            distmod.stream_merge(d, w.names, w.shapes, self.init.own, sources, merge_fn, on_slerp,
                                 on_main if d.is_main else None)
            for wr in every:
                wr.close()
            w.written("the merge (theta_slerp)")
        except BaseException:
            for wr in every:
                wr.abort()
            raise
        finally:
            for f in files.values():
                f.close()
        self.init.close()
        d.barrier()  # rank 0's file of the next theta_init is complete before another rank opens it
        self.init = InitStore.from_file(w, full_init if own_is_full else own_init, full=own_is_full)
        distmod.trim_allocator()
        diag = d.broadcast_object(stats.summary() if d.is_main else None)
        return {**diag, "merge_kernel": kernel} if isinstance(diag, dict) else diag

    # ---------------------------------------------------------------- phase: evaluation (sharded over ranks)
    def evaluate_state(self, state: Source | dict | None, sft: EvalResult | None) -> EvalResult:
        """Evaluate weights on the held-out prompts (None = what the policy module holds now). Batch k of the
        prompts goes to rank k % W; every prompt is sampled with its own seed, so the numbers do not depend on W."""
        t0 = time.perf_counter()
        if state is not None:
            src = state if callable(state) else (lambda n, s=state: s[n].float())
            self.policy.w.load_(source_part(src), "the weights under evaluation")
        self.reference.load_(self.sft.part, "sft")
        self.push_weights()
        ec, d = self.cfg.eval, self.dist
        nb = -(-len(self.eval_prompts) // ec.batch_size)
        # batch k goes to rank k % W; with a tensor-parallel engine to group k % M, whose ranks all run it
        units, unit = (d.topo.num_policies, d.topo.group_of(d.rank)) if self.group_sampling else (d.world_size, d.rank)
        mine = [k for k in range(nb) if k % units == unit]
        rounds = -(-nb // units)  # every rank runs the same number of batches (ZeRO-3 forwards are collective)
        records, times = [], {"generate": 0.0, "score": 0.0, "kl": 0.0, "tokens": 0}
        for i in range(rounds):
            real = i < len(mine)
            k = mine[i] if real else 0
            got, t = self.eval_batch(k)
            faults.point("eval")
            if real and (d.is_leader or not self.group_sampling):
                records += got
                for key in times:
                    times[key] += t[key]
        gathered = d.all_gather_object((records, times))
        res = summarize([r for recs, _ in gathered for r in recs], [t for _, t in gathered],
                        sft.completions if sft is not None else None, judge=self.judge_name)
        if sft is None:
            res.metrics["identical_fraction"] = 1.0  # the SFT model against itself, by definition
        res.metrics["time_eval_s"] = time.perf_counter() - t0
        self._tick("eval", time.perf_counter() - t0)
        distmod.trim_allocator()
        return res

    @torch.no_grad()
    def eval_batch(self, k: int) -> tuple[list[dict], dict]:
        ec = self.cfg.eval
        lo = k * ec.batch_size
        ids = self.eval_prompts.ids[lo: lo + ec.batch_size]
        t0 = time.perf_counter()
        gens = self.sample(ids, ec.seed, list(range(lo, lo + len(ids))), f"evaluation batch {k}")
        t1 = time.perf_counter()
        ptexts, ctexts = decode_pairs(self.tokenizer, gens.prompt_ids, gens.completion_ids)
        r = self.reward(ptexts, ctexts, where=f"evaluation batch {k}").tolist()
        # the judge scores the same texts, per prompt (the same on any number of ranks)
        jd = (self.judge(ptexts, ctexts, where=f"evaluation batch {k}").tolist() if self.judge is not None
              else [None] * len(ctexts))
        t2 = time.perf_counter()
        kl = []
        chunk = 8  # rows scored at a time: bounds the [rows, C, V] logits
        # ZeRO-3 forwards are collectives inside the policy group: every rank runs as many as a full batch needs,
        # a rank with a short last batch on a stand-in row (its result dropped), or the group waits until the timeout
        rows = ec.batch_size if (self.policy.w.zero3 and self.dist.group_size > 1) else len(ids)
        for a in range(0, rows, chunk):
            real = a < len(ids)
            take = slice(a, a + chunk) if real else slice(0, 1)
            sub = type(gens)(gens.prompt_ids[take], gens.completion_ids[take])
            batch = build_batch(sub, self.pad, self.device)
            lp, support = self.logprobs(self.policy.logits, batch)
            lp_sft, _ = self.logprobs(self.reference.logits, batch, support)
            if real:
                kl += rl.kl_estimate(lp, lp_sft, batch.mask).tolist()
        t3 = time.perf_counter()
        records = [{"index": lo + j, "completion": c, "text": ctexts[j], "reward": r[j], "kl": kl[j], "judge": jd[j],
                    "length": len(c)} for j, c in enumerate(gens.completion_ids)]
        return records, {"generate": t1 - t0, "score": t2 - t1, "kl": t3 - t2, "tokens": gens.num_tokens}

    # ---------------------------------------------------------------- the whole run
    def run(self) -> dict:
        """The whole run, resumable: every phase boundary (and every `checkpoint_every` steps) is a checkpoint, and a
        resumed run skips what its last checkpoint says is done."""
        cfg, d, tc = self.cfg, self.dist, self.cfg.train
        out = Path(cfg.output_dir)
        t_start = time.perf_counter()
        pos = self.pos = self.start_position()
        if pos.get("done"):
            self.log(f"the run in {out} is already finished: nothing to resume")
            self.close()
            return json.loads((out / "summary.json").read_text())
        self.log(f"WARP: model={cfg.model.name} reward={cfg.reward.kind} backend={self.backend.name} "
                 f"I={tc.iterations} M={tc.policies} T={tc.steps} batch={tc.batch_size}x{self.k} beta={tc.beta} "
                 f"mu={tc.mu} lambda={cfg.merge.lam} eta={cfg.merge.eta} dtype={cfg.model.dtype} attention={self.attention} "
                 f"ranks={d.world_size} groups={list(d.topo.groups)} engine={self.policy.kind}"
                 + (f" push={self.backend.push_method()}" if hasattr(self.backend, "push_method") else "")
                 + f" -> {out}"
                 + (f" (resumed at checkpoint {pos['seq']}: {pos['phase']})" if pos["seq"] else ""))
        if pos["sft_eval"] is None:  # phase: the SFT model
            reused = self.reused_sft_eval()
            ev = reused[1] if reused else self.evaluate_state(self.sft.full, None)
            self.record({"kind": "eval", "model": "sft", "iteration": 0, **ev.metrics,
                         **({"reused_from": reused[0]} if reused else {})})
            self.log(fmt_metrics("SFT", ev.metrics))
            pos["sft_eval"] = ev.to_json()
            self.checkpoint("sft evaluated")
        sft_eval = EvalResult.from_json(pos["sft_eval"])
        mine = d.topo.policies_of(d.rank)
        for it in range(pos["iteration"], tc.iterations + 1):
            pos["iteration"] = it
            t0 = time.perf_counter()
            for k, m in enumerate(mine):  # phase: RL, one policy slot at a time (every rank has as many slots)
                if k < pos["slots_done"] or pos["merged"] >= it:
                    continue
                resume = self.ckpt_dir / f"rank{d.rank}" if pos["step"] else None
                bar = progress_bar(tc.steps, f"iter {it}/{tc.iterations} policy {m + 1}/{tc.policies}",
                                   cfg.progress and self.is_main)
                self.train_policy(it, m, progress=bar, resume=resume,
                                  on_step=lambda step, rec, k=k: self.periodic_checkpoint(k, step))
                if bar is not None:
                    bar.close()
                path = self.save_policy(it, m)
                pos["slots_done"], pos["step"] = k + 1, 0
                for part in d.all_gather_object({m: path.name} if d.is_leader else {}):
                    pos["policy_files"].update({str(q): n for q, n in part.items()})
                pos["train_time_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.checkpoint("policy trained")
            if pos["merged"] < it:  # phase: merge
                t0 = time.perf_counter()
                d.barrier()  # every policy is trained before the merger starts
                t_wait = time.perf_counter() - t0
                paths = {int(m): self.state_dir / "blobs" / n for m, n in pos["policy_files"].items()}
                t0 = time.perf_counter()
                diag = self.merge(it, paths)
                t_merge = time.perf_counter() - t0
                self._tick("merge", t_merge)
                diag.update(trends(self.histories(it)))
                check_progress(diag)
                self.record({"kind": "merge", "iteration": it, "time_train_s": pos["train_time_s"],
                             "time_wait_s": t_wait, "time_merge_s": t_merge, **diag})
                self.log(fmt_diag(it, diag))
                if cfg.save_iterations:
                    self.save_iteration(out / f"iter_{it}", it, paths)
                pos.update(merged=it, slots_done=0, step=0, policy_files={}, train_time_s=0.0,
                           slerp_distance_to_sft=diag["slerp_distance_to_sft"])
                self.checkpoint("merged")
            elif pos["evaluated"] < it:  # resumed after the merge: the policy module must hold theta_slerp
                slerp = SafeFile(self.state_dir / "blobs" / f"iter{it}_slerp.safetensors")
                self.policy.w.load_(slerp.part, "theta_slerp (resumed)")
                slerp.close()
            if pos["evaluated"] < it:  # phase: evaluation of theta_slerp
                last = it == tc.iterations
                if last or cfg.eval.every_iteration:
                    ev = self.evaluate_state(None, sft_eval)  # the policy module holds theta_slerp
                    self.record({"kind": "eval", "model": "final" if last else "slerp", "iteration": it, **ev.metrics})
                    self.log(fmt_metrics("WARP final" if last else f"iter {it} slerp", ev.metrics))
                    if last:
                        pos["final_eval"] = ev.to_json()
                    else:  # kept for evals.json (launch/eval.py reuses it for iter_<i>/merged)
                        pos.setdefault("slerp_evals", {})[str(it)] = ev.to_json()
                pos["evaluated"] = it
                pos["iteration"] = it + 1
                self.checkpoint("evaluated")
        return self.finish(pos, sft_eval, t_start)

    def finish(self, pos: dict, sft_eval: EvalResult, t_start: float) -> dict:
        """final/ (the last theta_slerp), summary.json, and the run state removed: the run is complete."""
        cfg, d, tc = self.cfg, self.dist, self.cfg.train
        out = Path(cfg.output_dir)
        final_eval = EvalResult.from_json(pos["final_eval"])
        final_dist = pos["slerp_distance_to_sft"]
        if final_dist == 0.0:
            raise NoProgressError("the final weights are identical to the SFT weights: nothing was learned")
        if final_eval.metrics["identical_fraction"] == 1.0:
            self.log("ERROR: every final generation is identical to the SFT model's: the policy did not move "
                     "enough to change a single sample (raise train.lr or train.steps)")
        timers = {**self.timers, "total": time.perf_counter() - t_start + pos.get("elapsed_s", 0.0)}
        summary = {"sft": sft_eval.metrics, "final": {**final_eval.metrics, "weight_distance_to_sft": final_dist},
                   "timers_s": timers, "world_size": d.world_size,
                   "samples": sample_rows(self.eval_prompts.texts, sft_eval, final_eval, cfg.eval.num_samples_shown),
                   "final_vs_sft": paired_differences(final_eval, sft_eval),
                   "per_prompt": {"sft": sft_eval.per_prompt(), "final": final_eval.per_prompt()}}
        if self.tracker is not None:
            self.tracker.text("samples", samples_markdown(summary["samples"]), tc.iterations * tc.steps)
        if self.is_main:
            slerp = SafeFile(self.state_dir / "blobs" / f"iter{tc.iterations}_slerp.safetensors")
            self.save_model(out / "final", lambda n: slerp.get(n))
            slerp.close()
            self.write_evals(out, pos, sft_eval, final_eval)
            checkpoint.write_json(out / "summary.json", summary)
        d.barrier()
        self.close()
        if self.is_main:  # the run is complete: its resumable state is no longer needed (final/ is the result)
            checkpoint.remove_tree(self.state_dir)
        return summary

    def reused_sft_eval(self) -> tuple[str, EvalResult] | None:
        """eval.reuse_from: (the file, the SFT evaluation) of another run made with this SFT model's weights and these
        settings (the rule launch/eval.py reuses by); rank 0 looks, every rank gets its answer. None: evaluate here."""
        runs = [r.strip() for r in self.cfg.eval.reuse_from.split(",") if r.strip()]
        if not runs:
            return None
        found = None
        if self.is_main:
            setting = evalcache.settings(self.cfg, bool(self.cfg.train.deepspeed))
            digest = evalcache.folder_digest(self.model_path)
            for run in runs:
                store = evalcache.Store(run)
                res = store.get("sft", setting, digest, digest)
                if res is not None:
                    found = (str(store.path), res.to_json())
                    break
            if found is None:
                self.log(f"eval.reuse_from: no evaluation of this SFT model with these settings in {', '.join(runs)}; "
                         "evaluating it here")
        found = self.dist.broadcast_object(found)
        if found is None:
            return None
        self.log(f"SFT evaluation taken from {found[0]} (same SFT weights and settings)")
        return found[0], EvalResult.from_json(found[1])

    def write_evals(self, out: Path, pos: dict, sft_eval: EvalResult, final_eval: EvalResult) -> None:
        """<run>/evals.json (warp_dist.evalcache): this run's evaluations, keyed by the weights they measured, for
        launch/eval.py to reuse. Saved folders count only when written in float32 (what was evaluated, exactly)."""
        cfg = self.cfg
        exact = (cfg.save_dtype or cfg.model.dtype) == "float32"
        entries = {"sft": (evalcache.folder_digest(self.model_path), sft_eval)}
        if exact:
            entries["final"] = (evalcache.folder_digest(out / "final"), final_eval)
            for it, packed in pos.get("slerp_evals", {}).items():
                entries[f"iter {it} merged"] = (evalcache.folder_digest(out / f"iter_{it}" / "merged"),
                                                EvalResult.from_json(packed))
        evalcache.write(out, evalcache.settings(cfg, bool(cfg.train.deepspeed)), entries, entries["sft"][0])

    # ---------------------------------------------------------------- checkpoints and resume
    def start_position(self) -> dict:
        """A fresh position, or (resume: true) the last complete checkpoint's, the same on every rank."""
        cfg, d = self.cfg, self.dist
        fresh = {"seq": 0, "phase": "start", "iteration": 1, "slots_done": 0, "step": 0, "merged": 0,
                 "evaluated": 0, "policy_files": {}, "sft_eval": None, "final_eval": None, "histories": {},
                 "train_time_s": 0.0, "version": 0, "world_size": d.world_size}
        self.ckpt_dir = None
        found = None
        if cfg.resume and d.is_main:
            out = Path(cfg.output_dir)
            if (out / "summary.json").is_file() and not checkpoint.checkpoints(self.state_dir):
                found = {"done": True}
            else:
                checkpoint.clean_partial(self.state_dir)
                ckpts = checkpoint.checkpoints(self.state_dir)
                if ckpts:
                    found = {**checkpoint.read_position(ckpts[-1]), "path": str(ckpts[-1])}
        found = d.broadcast_object(found)
        if found is None:
            if cfg.resume:
                self.log("resume: no complete checkpoint yet, starting from the beginning")
                if self.is_main:  # records of the killed attempt (before its first checkpoint) are redone
                    checkpoint.truncate_lines(Path(cfg.output_dir) / "metrics.jsonl", 0)
                    self.replay_trackers()
            return fresh
        if found.get("done"):
            return found
        if found["world_size"] != d.world_size:
            n = found["world_size"]
            raise RunError(f"resume: the checkpoint was written by {n} rank{'s' if n != 1 else ''}, this launch has "
                           f"{d.world_size}: relaunch with --num_processes {n}")
        self.ckpt_dir = Path(found.pop("path"))
        if self.is_main:  # the metrics written after that checkpoint belong to work that is redone
            checkpoint.truncate_lines(Path(cfg.output_dir) / "metrics.jsonl", found["metrics_lines"])
            self.replay_trackers()
        self.timers = dict(found.get("timers", {}))
        found["elapsed_s"] = found.get("timers", {}).get("elapsed", 0.0)
        it = found["iteration"]
        init_it = it if found["merged"] < it else it + 1  # the theta_init the next RL phase starts from
        if 1 < init_it <= self.cfg.train.iterations:
            self.init.close()
            self.init = self.init_store_for(init_it)
        checkpoint.load_rng(self.ckpt_dir / f"rank{d.rank}" / "rng.pt")
        return found

    def replay_trackers(self) -> None:
        """Resume: TensorBoard is rebuilt from metrics.jsonl as cut back (no duplicate points; see tracking.py)."""
        if self.tracker is not None and self.metrics.path is not None:
            p = self.metrics.path
            self.tracker.replay([json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else [])

    def init_is_full(self) -> bool:
        """Whether this rank reads theta_init from rank 0's file of whole tensors: every rank whose slices are whole
        tensors (not ZeRO-3; rank 0 alone in its group). Only ZeRO-3 ranks compute and write their own slices of the
        next theta_init (under DDP every rank of a group had computed and written the same whole file)."""
        return not self.policy.w.zero3 or (self.dist.is_main and self.dist.group_size == 1)

    def init_store_for(self, iteration: int) -> InitStore:
        """theta_init of `iteration` (> 1) from the files the merge of iteration - 1 wrote."""
        d, blobs = self.dist, self.state_dir / "blobs"
        if self.init_is_full():
            return InitStore.from_file(self.policy.w, blobs / f"iter{iteration}_init.safetensors", full=True)
        return InitStore.from_file(self.policy.w, blobs / f"iter{iteration}_init.rank{d.rank}.safetensors", full=False)

    def histories(self, iteration: int) -> dict[int, list[dict]]:
        """Every policy's train records of this iteration (from the checkpointed metrics when resumed)."""
        recs = [json.loads(x) for x in Path(self.metrics.path).read_text().splitlines()] if self.is_main else []
        out: dict[int, list[dict]] = {}
        for r in recs:
            if r.get("kind") == "train" and r["iteration"] == iteration:
                out.setdefault(r["policy"], []).append(r)
        for h in out.values():
            h.sort(key=lambda r: (r["step"], r["rank"]))
        return self.dist.broadcast_object(out)

    def periodic_checkpoint(self, slot: int, step: int) -> None:
        every = self.cfg.checkpoint_every
        if every and step % every == 0 and step < self.cfg.train.steps:
            self.pos["step"] = step
            self.checkpoint("training", rank_state=True)

    def checkpoint(self, phase: str, rank_state: bool = False) -> None:
        """Write a complete checkpoint (a collective: every rank calls it at the same point of the run)."""
        d, state_dir = self.dist, self.state_dir
        t0 = time.perf_counter()
        self.gather_records()
        seq = self.pos["seq"] + 1
        if d.is_main:
            checkpoint.begin_checkpoint(state_dir, seq)
        d.barrier()
        rank_dir = checkpoint.checkpoint_tmp(state_dir, seq) / f"rank{d.rank}"
        checkpoint.save_rng(rank_dir / "rng.pt")
        if rank_state:
            self.save_rank_state(rank_dir)
        faults.point("checkpoint")
        d.barrier()
        self.pos.update(seq=seq, phase=phase, version=self.policy.w.version,
                        timers={**self.timers, "elapsed": self.pos.get("elapsed_s", 0.0)})
        if d.is_main:
            self.pos["metrics_lines"] = checkpoint.count_lines(self.metrics.path)
            self.pos["blobs"] = self.needed_blobs()
            final = checkpoint.finish_checkpoint(state_dir, seq, self.pos, self.cfg.keep_checkpoints)
        else:
            final = None
        self.ckpt_dir = Path(d.broadcast_object(str(final) if final else None))
        self._tick("checkpoint", time.perf_counter() - t0)

    def needed_blobs(self) -> list[str]:
        """Blob files the run still needs from this position (a checkpoint keeps them)."""
        pos, tc = self.pos, self.cfg.train
        it = pos["iteration"]
        names = list(pos["policy_files"].values())
        init_it = it if pos["merged"] < it else it + 1
        if 1 < init_it <= tc.iterations:
            names.append(f"iter{init_it}_init.safetensors")
            if self.policy.w.zero3:
                names += [f"iter{init_it}_init.rank{r}.safetensors" for r in range(self.dist.world_size)]
        if pos["merged"] >= 1:
            names.append(f"iter{pos['merged']}_slerp.safetensors")
        return names

    def save_rank_state(self, folder: Path) -> None:
        """This rank's share of the policy in training: weights, EMA, optimizer state (exact fp32)."""
        w, ref = self.policy.w, self.reference.w
        specs = [(n, (w.span(n)[1],), torch.float32) for n in w.names]
        write_stream(folder / "policy.safetensors", specs, ((n, w.local(n)) for n in w.names))
        write_stream(folder / "ema.safetensors", specs, ((n, ref.local(n)) for n in ref.names))
        checkpoint.torch_save_atomic(self.policy.optimizer.state_dict(), folder / "optimizer.pt")

    def restore_rank_state(self, folder: Path) -> int:
        """The policy in training as `save_rank_state` wrote it; returns the last completed step."""
        pol, ema = SafeFile(folder / "policy.safetensors"), SafeFile(folder / "ema.safetensors")
        try:
            opt = checkpoint.load_safe(folder / "optimizer.pt")
            self.policy.restore(lambda n, start, count: pol.get(n), opt)
            self.reference.load_(lambda n, start, count: ema.get(n), "ema")
        finally:
            pol.close()
            ema.close()
        return self.pos["step"]

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.backend.close()
        self.policy.close()
        self.reference.close()

    # ---------------------------------------------------------------- saving
    def save_model(self, folder: Path, source: Source) -> None:
        """HF folder (config, generation config, tokenizer, safetensors) of `source`'s weights, written tensor by
        tensor in save_dtype (rank 0 / the caller only)."""
        w = self.policy.w
        dtype = DTYPES[getattr(self.cfg, "save_dtype", "") or self.cfg.model.dtype]
        checkpoint.save_hf_folder(folder, self.policy.module.config, self.tokenizer, w.names, w.shapes, source,
                                  dtype, w.buffers, getattr(self.policy.module, "generation_config", None))

    def save_iteration(self, folder: Path, iteration: int, paths: dict[int, Path]) -> None:
        """iter_<i>/: init/, policy_<m>/ and merged/ HF folders from the iteration's fp32 blobs (rank 0)."""
        if self.is_main:
            blobs = self.state_dir / "blobs"
            init = blobs / f"iter{iteration}_init.safetensors"
            items = [("init", init if init.exists() else None), ("merged", blobs / f"iter{iteration}_slerp.safetensors")]
            items += [(f"policy_{m}", p) for m, p in sorted(paths.items())]
            for name, path in items:
                if path is None:  # iteration 1 starts from the SFT weights
                    self.save_model(folder / name, self.sft.full)
                    continue
                f = SafeFile(path)
                self.save_model(folder / name, lambda n, f=f: f.get(n))
                f.close()
        self.dist.barrier()


def largest_layer(names: list[str], shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters of the largest repeated block (`...layers.<i>.` / `...h.<i>.`); the largest tensor if none."""
    import re

    blocks: dict[str, int] = {}
    for n in names:
        m = re.match(r"(.*?\.\d+)\.", n)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + int(torch.Size(shapes[n]).numel())
    return max(blocks.values()) if blocks else max(int(torch.Size(s).numel()) for s in shapes.values())


# -------------------------------------------------------------------- diagnostics and printing
class MergeDiagnostics:
    """Accumulated on rank 0 during the merge, tensor by tensor, from each tensor's `merging.merge_pass` Gram matrix
    (no extra pass over the weights): the task vectors' whole-model Gram matrix (norms and angles), the per-tensor
    angles SLERP actually used (size-weighted min / median / max), and how far theta_init and theta_slerp moved."""

    def __init__(self, num_policies: int):
        self.M = num_policies
        self.dots = torch.zeros(num_policies, num_policies, dtype=torch.float64)
        self.tensor_angles: dict[str, list[tuple[float, int]]] = {}
        self.sq = {"init_moved": 0.0, "slerp_distance_to_init": 0.0, "slerp_distance_to_sft": 0.0}

    def add(self, numel: int, gram: torch.Tensor, lam: float, eta: float) -> None:
        """One tensor: `gram` is merge_pass's [M + 1, M + 1] Gram matrix of [task vectors..., init - sft]."""
        M = self.M
        g = gram[:M, :M]
        self.dots += g
        for k, v in merging.gram_diagnostics(gram, merging.slerp_coefficients(g, lam), eta).items():
            self.sq[k] += v
        for i in range(M):
            for j in range(i + 1, M):
                denom = math.sqrt(max(g[i, i].item(), 0.0) * max(g[j, j].item(), 0.0))
                if denom > 0:
                    ang = math.degrees(math.acos(max(-1.0, min(1.0, g[i, j].item() / denom))))
                    self.tensor_angles.setdefault(f"{i}-{j}", []).append((ang, numel))

    def summary(self) -> dict:
        out = merging.stats_from_dots(self.dots)
        out["tensor_angle_deg"] = {k: weighted_quantiles(v) for k, v in self.tensor_angles.items()}
        out.update({k: math.sqrt(v) for k, v in self.sq.items()})
        return out


def weighted_quantiles(values: list[tuple[float, int]]) -> dict:
    """min / size-weighted median / max of (value, weight) pairs."""
    vs = sorted(values)
    total = sum(w for _, w in vs)
    acc, median = 0, vs[-1][0]
    for v, w in vs:
        acc += w
        if acc >= total / 2:
            median = v
            break
    return {"min": vs[0][0], "median": median, "max": vs[-1][0]}


def paired_differences(a: EvalResult, b: EvalResult) -> dict:
    """a - b on the same prompts and seeds: reward, KL and judge (when both have one), each with its paired
    bootstrap 95 % interval (warp_dist.stats.paired_bootstrap, 2000 resamples, seed 0)."""
    out = {"reward": stats.paired_bootstrap(a.rewards, b.rewards)}
    if a.kls and b.kls:
        out["kl"] = stats.paired_bootstrap(a.kls, b.kls)
    if a.judges is not None and b.judges is not None:
        out["judge"] = stats.paired_bootstrap(a.judges, b.judges)
    return out


def _config_text(cfg: WarpConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def sampler_gap(sampler_logprobs: list[list[float]], logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |log p_sampler - log p_trainer| over sampled tokens (the rollout engine's numbers vs the trainer's)."""
    tot, n = 0.0, 0
    for b, lps in enumerate(sampler_logprobs):
        m = int(mask[b].sum().item())
        for j, v in enumerate(lps[:m]):
            tot += abs(v - logp[b, j].item())
            n += 1
    return tot / max(n, 1)


def trends(histories: dict[int, list[dict]]) -> dict:
    order = sorted(histories)
    return {"policy_reward_first_last": [[histories[m][0]["reward_mean"], histories[m][-1]["reward_mean"]]
                                         for m in order],
            "policy_kl_to_ema_last": [histories[m][-1]["kl_to_ema"] for m in order]}


def check_progress(diag: dict) -> None:
    for m, norm in enumerate(diag["task_vector_norm"]):
        if norm == 0.0 or not math.isfinite(norm):
            raise NoProgressError(f"policy {m}'s task vector has norm {norm}: its training did not change the "
                                  "weights (check train.lr, the reward's variance, and the gradients)")


def fmt_diag(it: int, d: dict) -> str:
    norms = ", ".join(f"{x:.4g}" for x in d["task_vector_norm"])
    ang = ", ".join(f"{k}: {v:.1f} deg (cos {d['cosine'][k]:.3f})" for k, v in d["angle_deg"].items()) or "-"
    per = d.get("tensor_angle_deg", {})
    per_txt = ", ".join(f"{k}: min {v['min']:.1f} / median {v['median']:.1f} / max {v['max']:.1f}"
                        for k, v in per.items())
    rw = "; ".join(f"p{m} {a:+.3f}->{b:+.3f}" for m, (a, b) in enumerate(d["policy_reward_first_last"]))
    return (f"iter {it} merge: |task vectors| [{norms}] whole-model angles [{ang}]"
            + (f" per-tensor angles [{per_txt}]" if per_txt else "")
            + f" init moved {d['init_moved']:.4g} |slerp - sft| {d['slerp_distance_to_sft']:.4g} reward {rw}")


def fmt_metrics(name: str, m: dict) -> str:
    judge = ""
    if m.get("judge_mean") is not None:
        judge = f"  judge {m['judge']} {m['judge_mean']:+.4f}"
    ci = ""
    if "reward_ci_low" in m:
        ci = f" [{m['reward_ci_low']:+.4f}, {m['reward_ci_high']:+.4f}]"
    return (f"{name}: reward {m['reward_mean']:+.4f}{ci} ± {m['reward_std']:.4f}  KL {m['kl_mean']:.4f}  "
            f"identical {m['identical_fraction']:.2f}  len {m['length_mean']:.1f}"
            + (f"  distinct-2 {m['distinct_2']:.3f}" if "distinct_2" in m else "") + f"{judge}  n={m['num_prompts']}")


def sample_rows(prompts: list[str], sft: EvalResult, final: EvalResult, n: int) -> list[dict]:
    return [{"prompt": prompts[i], "sft": sft.texts[i], "sft_reward": sft.rewards[i], "warp": final.texts[i],
             "warp_reward": final.rewards[i]} for i in range(min(n, len(prompts)))]


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
