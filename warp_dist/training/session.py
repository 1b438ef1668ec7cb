"""What one rank holds for a run, built once, and what every phase uses of it.

A `Session` is the config and the process groups, the tokenizer and the sampling distribution, the prompts, the
reward and the judge, the SFT weights on disk, the policy and the reference model (what each holds and in which dtype
is `warp_dist.training.policy`'s memory rule), theta_init, the rollout backend, the metrics records and the phase
timers. Its methods are the few things every phase does with them: push the policy's weights into the backend, sample,
take log-probs under the sampling distribution, record metrics.

`Session(cfg)` joins the ranks itself when no `dist` is given. `Session(cfg, dist, training=False)` builds what an
evaluation needs only (launch/eval.py): the policy's module and
weights, no optimizer, no DeepSpeed engine, a rollout engine sized to the evaluation batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import checkpoint, sampling
from .. import dist as distmod
from ..config import WarpConfig
from ..data import load_prompts
from ..evaluation.judge import build_judge, judge_label, resolve_judge
from ..modelinfo import dims, largest_layer
from ..models import DTYPES, eos_token_ids, load_causal_lm, load_tokenizer, param_layout, resolve_model_path
from ..rewards import build_reward
from ..rollout import make_backend, resolve_backend
from ..rollout.base import SamplingConfig
from ..topology import tensor_parallel_size
from ..tracking import Tracking
from ..weights import ModelFiles, ParamFiles, SafeFile, write_stream
from .policy import (
    InitStore,
    Policy,
    Reference,
    Weights,
    attention_impl,
    autocast,
    build_module,
    deepspeed_config,
)


class Records:
    """Metrics records: rank 0 writes its own to metrics.jsonl (and the trackers) at once; the other ranks hold theirs
    until `gather`, a collective at the next checkpoint."""

    def __init__(self, d: distmod.Dist, metrics: checkpoint.MetricsLog, tracker: Tracking | None):
        self.d, self.metrics, self.tracker = d, metrics, tracker
        self._pending: list[dict] = []

    def add(self, rec: dict) -> None:
        if self.d.is_main:
            self._write(rec)
        else:
            self._pending.append(rec)

    def _write(self, rec: dict) -> None:
        self.metrics.write(rec)
        if self.tracker is not None:
            self.tracker.record(rec)

    def gather(self) -> None:
        for recs in self.d.all_gather_object(self._pending)[1:]:
            for rec in recs:
                self._write(rec)
        self._pending = []


class Session:
    """One rank's view of a WARP run (see the module docstring)."""

    def __init__(self, cfg: WarpConfig, dist: distmod.Dist | None = None, log=print, metrics_path=None,
                 training: bool = True):
        tc = cfg.train
        d = dist or distmod.init(tc.policies, cfg.dist_timeout_s, cpu=cfg.cpu, phase_timeout_s=cfg.phase_timeout_s,
                                 need_process_group=bool(tc.deepspeed) and training)
        self.cfg, self.dist, self.device, self.is_main = cfg, d, d.device, d.is_main
        self.log = log if self.is_main else (lambda *_: None)
        tracker = (Tracking(cfg.log_with, cfg.output_dir, tc.steps, d.group_size, config_text(cfg))
                   if self.is_main and metrics_path and training else None)
        self.records = Records(d, checkpoint.MetricsLog(metrics_path if self.is_main else None), tracker)
        if training and tc.batch_size % d.group_size:
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
        # the prompts first: a data error stops the run before any model (reward model included) loads
        self.train_prompts, self.eval_prompts = load_prompts(cfg.data, self.tokenizer, cfg.model.name)
        dropped = f", {self.train_prompts.dropped} too long dropped" if self.train_prompts.dropped else ""
        if self.train_prompts.conversations is not None:
            longest = max(len(p) for p in self.train_prompts.ids + self.eval_prompts.ids)
            dropped += f"; through the chat template, the longest {longest} tokens"
        self.log(f"prompts: {len(self.train_prompts)} train, {len(self.eval_prompts)} eval "
                 f"({self.eval_prompts.duplicates_skipped} eval candidates equal to a train prompt skipped{dropped})")
        self.reward = build_reward(cfg.reward, self.device)
        self.judge = build_judge(cfg, self.device)  # the evaluation's independent judge (None: eval.judge gives none)
        self.judge_name = judge_label(resolve_judge(cfg.reward, cfg.eval, cfg.data.source)[1])
        # the models (warp_dist.training.policy says what each holds): SFT on disk, policy, reference, theta_init
        self.sft = self._open_sft()
        ds = tc.deepspeed if training else ""
        sizes = dict(hidden=dims(self.model_path).hidden,
                     layer_numel=largest_layer(self.sft_layout[0], self.sft_layout[2]))
        ds_conf = deepspeed_config(ds, tc, d.group_size, True, **sizes) if ds else None
        ref_conf = deepspeed_config(ds, tc, d.group_size, False, **sizes) if ds else None
        zero3 = ds_conf is not None and ds_conf["zero_optimization"].get("stage", 0) == 3
        if zero3:
            distmod.tune_allocator(mmap_threshold=1 << 18, arenas=2)  # partitions of a few hundred KB: off the heap
        max_len = cfg.data.prompt_max_tokens + 2 + cfg.rollout.max_new_tokens
        attention = attention_impl(cfg.model.attention, self.device, self.compute_dtype, max_len)
        module = build_module(self.model_path, d, ds_conf, self.sft.part, attention)
        self.reference = Reference(module, self.model_path, d, self.compute_dtype, ref_conf, self.sft.part, attention)
        self.attention = module.config._attn_implementation  # the kernel the model runs (auto may leave its default)
        self.policy: Policy | None = None
        if training:
            gc = tc.gradient_checkpointing
            checkpointing = gc == "true" or (gc == "auto" and zero3)
            self.policy = Policy(module, d, self.compute_dtype, tc, ds_conf, checkpointing=checkpointing)
            self.weights = self.policy.w
        else:
            self.weights = Weights(module, d, self.compute_dtype)
        self.init = InitStore(self.weights, self.sft.part)  # theta_init of iteration 1: the SFT weights
        distmod.trim_allocator()
        backend = resolve_backend(cfg.rollout.backend, self.log)
        # one vLLM engine per policy group (tensor parallel over its G ranks) or one per rank: rollout.vllm
        tp = (tensor_parallel_size(cfg.rollout.vllm.tensor_parallel, self.device.type == "cuda", d.group_size)
              if backend == "vllm" else 1)
        self.backend = make_backend(
            backend, module_fn=lambda: self.weights.module, tokenizer=self.tokenizer,
            model_path=self.model_path, eos_ids=self.sampling.eos_ids, dtype=cfg.model.dtype, device=self.device,
            vllm_cfg=cfg.rollout.vllm, seed=tc.seed + 7919 * (d.topo.group_of(d.rank) if tp > 1 else d.rank),
            autocast_fn=lambda: autocast(self.device, self.compute_dtype),
            sync=d.group_any if (self.weights.zero3 and d.group_size > 1) else None,
            max_seqs=max(tc.batch_size * self.k if training else 0, cfg.eval.batch_size), max_len=max_len,
            tensor_parallel=tp, log=self.log)
        # a tensor-parallel engine samples the whole group batch on every rank of the group (the same requests and
        # seeds: the engine's seed too is the group's)
        self.group_sampling = tp > 1
        self.timers: dict[str, float] = {}

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
            model = load_causal_lm(self.model_path, "float32", "cpu")
            params = dict(model.named_parameters())
            write_stream(path, [(n, shapes[n], torch.float32) for n in names],
                         ((n, params[n].detach()) for n in names))
            del model, params
        self.dist.barrier()
        return ParamFiles(SafeFile(path), {n: n for n in names})

    # ---------------------------------------------------------------- what every phase does
    def clock(self) -> float:
        """Wall clock for phase timings; waits for queued CUDA work so time lands in the right phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def tick(self, phase: str, seconds: float) -> None:
        self.timers[phase] = self.timers.get(phase, 0.0) + seconds

    def push_weights(self) -> None:
        """The policy's weights into the rollout backend (streamed tensor by tensor; gathered under ZeRO-3), labelled
        with their write version: a later write that is not pushed makes the next sample refuse."""
        t0 = time.perf_counter()
        self.backend.update_weights(lambda: self.weights.iter_full(with_aliases=True, copy=False),
                                    self.weights.version)
        self.tick("sync", time.perf_counter() - t0)

    def sample(self, prompt_ids, seed: int, indices: list[int], where: str, num_completions: int = 1):
        """The backend's completions from the policy's current weights (refused, naming `where`, if they changed since
        the last push)."""
        w = self.weights
        return self.backend.generate(prompt_ids, self.sampling, seed=seed, version=w.version, indices=indices,
                                     num_completions=num_completions, where=where, last_write=w.last_write)

    def logprobs(self, logits_fn, batch, support=None):
        """Completion log-probs from `logits_fn` (a model's) under the sampling distribution. -> ([B, C], support)"""
        logits = logits_fn(batch.ids, batch.att, batch.pos, batch.positions)  # [B, C, V]
        s = self.sampling
        return sampling.token_logprobs(logits, batch.targets, batch.mask, s.temperature, s.top_k, s.top_p,
                                       s.min_new_tokens, s.eos_ids, support=support, return_support=True)

    def policy_logits(self, ids, att, pos, keep) -> torch.Tensor:
        """The policy module's logits, no gradient (sampling-free scoring: evaluation)."""
        with torch.no_grad():
            return self.weights.logits(self.weights.module, ids, att, pos, keep)

    def held_bytes(self) -> dict[str, int]:
        """What this rank holds, by component, counted from its tensors (see the memory rule in training.policy)."""
        out = (self.policy.held_bytes() if self.policy is not None
               else {"policy_weights": self.weights.local_bytes(), "gradients": 0, "optimizer": 0})
        out["reference"] = self.reference.w.local_bytes()
        out["theta_init"] = 0  # on disk (InitStore), read when needed
        out["rollout_engine"] = self.backend.held_bytes()
        out["total"] = sum(out.values())
        return out

    def state_dict(self, which: str = "policy") -> dict[str, torch.Tensor]:
        """Full fp32 copy of the policy's (or the reference's, or the SFT) parameters — for tests and small models;
        a collective under ZeRO-3."""
        if which == "sft":
            return {n: self.sft.full(n) for n in self.weights.names}
        w = self.weights if which == "policy" else self.reference.w
        return dict(w.iter_full(torch.float32))

    def close(self) -> None:
        if self.records.tracker is not None:
            self.records.tracker.close()
        self.backend.close()
        if self.policy is not None:
            self.policy.close()
        self.reference.close()


def config_text(cfg: WarpConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
