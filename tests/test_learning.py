"""WARP must move a real model: reward rises, weights and generations differ from the SFT start."""

from __future__ import annotations

import torch

from warp_dist import merging
from warp_dist.config import config_from_dict
from warp_dist.evaluation.evaluator import Evaluator
from warp_dist.training.rl_step import train_policy
from warp_dist.training.session import Session


def _cfg(tmp_path, **train):
    return config_from_dict({
        "output_dir": str(tmp_path / "run"), "progress": False,
        "model": {"name": "embedded:tiny-gpt2"},
        "data": {"prompt_min_tokens": 4, "prompt_max_tokens": 6, "num_train_prompts": 128, "num_eval_prompts": 16},
        "reward": {"kind": "callable", "callable": "tests.toy_rewards:share_of_e", "text": "completion"},
        "rollout": {"backend": "hf", "max_new_tokens": 12},
        "train": {"iterations": 1, "policies": 1, "steps": 40, "batch_size": 16, "lr": 3e-3, "beta": 0.0,
                  **train},
        "eval": {"batch_size": 16},
    })


def test_reward_rises_and_weights_and_generations_move(tmp_path, tiny_model_path):
    w = Session(_cfg(tmp_path), log=lambda *_: None)
    sft = w.state_dict("sft")
    res = train_policy(w, 1, 0)
    trained = w.state_dict("policy")
    rewards = [h["reward_mean"] for h in res]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.05, f"reward did not rise: first {first:.3f} last {last:.3f}"
    changed = [k for k in trained if not torch.equal(trained[k], sft[k])]
    trainable = [k for k, p in w.policy.module.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed), f"unchanged parameters: {set(trainable) - set(changed)}"
    sft_eval = Evaluator(w).evaluate(sft, None)
    trained_eval = Evaluator(w).evaluate(trained, sft_eval)
    assert trained_eval.metrics["identical_fraction"] < 0.5
    assert trained_eval.metrics["reward_mean"] > sft_eval.metrics["reward_mean"]
    assert trained_eval.metrics["kl_mean"] > 0.0


def test_same_weights_give_identical_generations_and_zero_kl(tmp_path, tiny_model_path):
    w = Session(_cfg(tmp_path), log=lambda *_: None)
    a = Evaluator(w).evaluate(w.state_dict("sft"), None)
    b = Evaluator(w).evaluate(merging.clone_state(w.state_dict("sft")), a)
    assert b.metrics["identical_fraction"] == 1.0
    assert abs(b.metrics["kl_mean"]) < 1e-6
    assert b.metrics["reward_mean"] == a.metrics["reward_mean"]


def test_ema_anchor_follows_policy_at_rate_mu(tmp_path, tiny_model_path):
    w = Session(_cfg(tmp_path, steps=3, mu=0.5), log=lambda *_: None)
    sft = w.state_dict("sft")
    train_policy(w, 1, 0)
    ema, pol = w.state_dict("reference"), w.state_dict("policy")
    name = "transformer.h.0.mlp.c_fc.weight"
    d_ema = (ema[name] - sft[name]).norm().item()
    d_pol = (pol[name] - sft[name]).norm().item()
    assert 0.0 < d_ema < d_pol
