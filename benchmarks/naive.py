"""WARP written the plain way, in one process: what a user writes in an afternoon with transformers.

The yardstick of benchmarks/train_step.py (one RL step) and benchmarks/e2e.py (a whole run). Same algorithm,
prompts, reward, seeds and hyper-parameters as the project, none of its engineering:
- `model.generate` (HF's sampler) on the left-padded batch, fp32 weights and compute;
- a full forward of the policy over prompt + completion (logits at every position), a full forward of an EMA copy
  of the model, KL-shaped REINFORCE with the configured baseline, `loss.backward()`, `torch.optim.AdamW` (default,
  not fused), gradient clipping, an EMA update;
- M policies one after the other in the same process, whole state dicts in memory, `merge_state_dicts`.
It borrows from warp_dist only what defines the algorithm's numbers: data/prompts, the reward, and the pure math
(rl.py, merging.py), so a difference in speed is the engineering's, not the algorithm's.
"""

from __future__ import annotations

import copy
import time

import torch


class NaiveWarp:
    """One process, one policy at a time, everything whole and fp32."""

    def __init__(self, cfg, device: torch.device | None = None):
        from warp_dist import merging
        from warp_dist.data import load_prompts
        from warp_dist.models import load_causal_lm, load_tokenizer, resolve_model_path
        from warp_dist.rewards import build_reward

        self.cfg = cfg
        self.device = device or torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
        path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
        self.tok = load_tokenizer(path)
        self.model = load_causal_lm(path, "float32", self.device)
        self.sft_model = copy.deepcopy(self.model).requires_grad_(False)
        self.reward_fn = build_reward(cfg.reward, self.device)
        self.train_prompts, self.eval_prompts = load_prompts(cfg.data, self.tok)
        self.sft_state = merging.clone_state(self.model.state_dict())
        self.pad = self.tok.pad_token_id

    # ------------------------------------------------------------------ the pieces
    def sample(self, prompts: list[list[int]], seed: int):
        """HF generate on a left-padded batch -> (ids [B, P + C], attention mask, P, completion mask [B, C])."""
        ro, tok = self.cfg.rollout, self.tok
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (P - len(p)) + p for p in prompts], device=self.device)
        att = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=ids, attention_mask=att, do_sample=True, max_new_tokens=ro.max_new_tokens,
                                  min_new_tokens=ro.min_new_tokens or None, temperature=ro.temperature,
                                  top_k=ro.top_k, top_p=ro.top_p, pad_token_id=self.pad)
        comp = out[:, P:]
        ended = (comp == tok.eos_token_id).cumsum(-1)
        cmask = (ended == 0) | ((ended == 1) & (comp == tok.eos_token_id))  # up to and including the first EOS
        return out, torch.cat([att, cmask.long()], 1), P, cmask.float()

    def seq_logp(self, model, ids, att, P):
        """Per-token log-probs of the completion under `model` (full forward, logits everywhere, / temperature)."""
        logits = model(input_ids=ids, attention_mask=att).logits[:, P - 1:-1].float() / self.cfg.rollout.temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)

    def texts(self, ids, P, cmask) -> list[str]:
        return [self.tok.decode(c[m.bool()], skip_special_tokens=True) for c, m in zip(ids[:, P:], cmask, strict=True)]

    # ------------------------------------------------------------------ one policy's RL
    def start_policy(self, init_state: dict, anchor_state: dict | None = None) -> None:
        tc = self.cfg.train
        self.model.load_state_dict(init_state)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        if anchor_state is not None:
            self.ema.load_state_dict(anchor_state)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [e for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True)
                           if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)

    def step(self, prompt_ids: list[list[int]], prompt_texts: list[str], seed: int) -> dict:
        """One RL step; returns the phase times and the batch's mean reward."""
        from warp_dist.training import rl

        tc = self.cfg.train
        t0 = time.perf_counter()
        with torch.no_grad():
            ids, att, P, cm = self.sample(prompt_ids, seed)
        t1 = time.perf_counter()
        reward = self.reward_fn(prompt_texts, self.texts(ids, P, cm)).to(self.device)
        t2 = time.perf_counter()
        logp = self.seq_logp(self.model, ids, att, P)
        with torch.no_grad():
            logp_ema = self.seq_logp(self.ema, ids, att, P)
        shaped = rl.kl_shaped_reward(reward, logp.detach(), logp_ema, cm, tc.beta)
        loss = rl.reinforce_loss(rl.sequence_logprob(logp, cm), shaped - rl.baseline(shaped, tc.baseline))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        self.opt.step()
        if tc.anchor != "sft":
            rl.ema_update(self.ema_params, self.params, tc.mu)
        t3 = time.perf_counter()
        return {"generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "step_s": t3 - t0,
                "reward_mean": reward.mean().item(), "tokens": int(cm.sum().item())}

    # ------------------------------------------------------------------ the whole run
    def run(self) -> dict:
        from warp_dist import merging
        from warp_dist.training.rl_step import policy_seed

        cfg, tc = self.cfg, self.cfg.train
        t0 = time.perf_counter()
        init, slerp = self.sft_state, self.sft_state
        rewards = []
        for it in range(1, tc.iterations + 1):
            finals = []
            for m in range(tc.policies):
                seed = policy_seed(tc.seed, it, m)
                torch.manual_seed(seed)
                self.start_policy(init, self.sft_state if tc.anchor == "sft" else None)
                order = torch.randperm(len(self.train_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
                for s in range(1, tc.steps + 1):
                    idx = [order[((s - 1) * tc.batch_size + j) % len(order)] for j in range(tc.batch_size)]
                    rec = self.step([self.train_prompts.ids[j] for j in idx], [self.train_prompts.texts[j] for j in idx],
                                    seed * 100003 + s)
                    rewards.append(rec["reward_mean"])
                finals.append(merging.clone_state(self.model.state_dict()))
                del self.ema, self.opt
            slerp, init = merging.merge_state_dicts(init, finals, cfg.merge.lam, cfg.merge.eta)
            del finals
        return {"final_state": slerp, "run_s": time.perf_counter() - t0, "train_rewards": rewards}
