"""Each extension point does what docs/extending.md says, with a small example: a reward kind, a rollout backend and
a merge method, registered here (the doc's files touched: one registration each) and used by the real code paths."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT
from warp_dist import merging, rewards, rollout
from warp_dist.config import ConfigError, load_config
from warp_dist.merging import methods
from warp_dist.rewards.scorers import Reward
from warp_dist.rollout.base import Generations, RolloutBackend

TINY = ROOT / "configs" / "warp" / "tiny.yaml"
SMALL = ["data.num_train_prompts=16", "data.num_eval_prompts=8", "eval.batch_size=8", "train.batch_size=4",
         "rollout.max_new_tokens=6", "train.policies=1", "train.iterations=1"]


# ------------------------------------------------------------------------------------------------- a reward kind
class LengthReward(Reward):
    """Longer completions score higher: the number of characters / 100."""

    name = "length"

    def score_texts(self, texts):
        return [len(t) / 100 for t in texts]


@pytest.fixture
def length_reward(monkeypatch):
    kind = rewards.RewardKind(
        "length", lambda r, device: LengthReward(text=r.text, batch_size=r.batch_size),
        validate=lambda r: "" if r.text == "completion" else
        f"reward.text={r.text!r} is invalid: allowed completion when reward.kind=length",
        doc="the completion's length in characters / 100")
    monkeypatch.setitem(rewards.REWARDS, "length", kind)
    return kind


def test_a_registered_reward_is_validated_checked_and_scores_a_run(tmp_path, tiny_model_path, length_reward):
    from warp_dist.checks import plan, preflight
    from warp_dist.evaluation.evaluator import Evaluator
    from warp_dist.training.session import Session

    with pytest.raises(ConfigError, match=r"^reward.text='full' is invalid: allowed completion when reward.kind=length"):
        load_config(TINY, ["reward.kind=length"])
    cfg = load_config(TINY, [*SMALL, "reward.kind=length", "reward.text=completion", f"output_dir={tmp_path}"])
    preflight.check_reward(cfg)  # its (default) check
    assert plan.reward_params(cfg) == 0  # its (default) memory estimate
    s = Session(cfg, log=lambda *_: None)
    try:
        assert isinstance(s.reward, LengthReward)
        records, _ = Evaluator(s).batch(0)
        assert [r["reward"] for r in records] == pytest.approx([len(r["text"]) / 100 for r in records])  # fp32
    finally:
        s.close()


def test_an_unregistered_reward_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"reward.kind='length' is invalid: allowed vader \| classifier \| callable \| verifiable \| format \| sum$"):
        load_config(TINY, ["reward.kind=length"])


# ------------------------------------------------------------------------------------------------- a rollout backend
class RepeatBackend(RolloutBackend):
    """Completes every prompt by repeating its last token: no model at all (a stand-in for an external server)."""

    name = "repeat"

    def __init__(self):
        self.calls = 0

    def _generate(self, prompt_ids, sampling, seeds):
        self.calls += 1
        return Generations([list(p) for p in prompt_ids], [[p[-1]] * sampling.max_new_tokens for p in prompt_ids])

    def update_weights(self, weights, version):
        self.version = version  # nothing to copy: it ignores the weights


def test_a_registered_backend_samples_a_training_step(tmp_path, tiny_model_path, monkeypatch):
    from warp_dist.checks import plan
    from warp_dist.training.rl_step import policy_seed, rl_step
    from warp_dist.training.session import Session

    kind = rollout.BackendKind("repeat", lambda **kw: RepeatBackend(),
                               memory=lambda *_: rollout.EngineMemory(bytes=123, where="none (no model)"))
    monkeypatch.setitem(rollout.BACKENDS, "repeat", kind)
    cfg = load_config(TINY, [*SMALL, "rollout.backend=repeat", f"output_dir={tmp_path}"])
    assert plan.build(cfg, 1, device="cpu").components[0]["rollout engine"][0] == 123
    s = Session(cfg, log=lambda *_: None)
    try:
        assert isinstance(s.backend, RepeatBackend)
        s.policy.begin(s.init)
        s.reference.load_(s.init.part, "ema")
        s.push_weights()
        rec = rl_step(s, 1, 0, 1, policy_seed(0, 1, 0), list(range(len(s.train_prompts))))
        assert s.backend.calls == 1 and rec["length_mean"] == cfg.rollout.max_new_tokens
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------- a merge method
def test_a_registered_merge_method_runs_in_every_kernel(monkeypatch):
    """A method that keeps the first policy: c = [1, 0, ...] from any Gram matrix, in the eager, compiled and native
    kernels alike (those that can run here)."""
    monkeypatch.setitem(methods.METHODS, "first", lambda gram, lam: [1.0] + [0.0] * (len(gram) - 1))
    g = torch.Generator().manual_seed(0)
    n = merging.COMPILED_MIN + 77
    init = torch.randn(n, generator=g)
    ps = [init + 0.01 * torch.randn(n, generator=g) for _ in range(3)]
    kernels = ["eager"] + (["compiled"] if not merging.compiler_available() else [])
    kernels += ["native"] if not merging.native.unavailable() else []
    for kernel in kernels:
        merged, nxt, _ = merging.merge_pass(init, ps, 0.5, 0.25, kernel=kernel, method="first")
        assert torch.allclose(merged, ps[0], atol=1e-6), kernel
        assert torch.allclose(nxt, torch.lerp(init, ps[0], 0.25), atol=1e-6), kernel
    assert load_config(TINY, ["merge.method=first"]).merge.method == "first"  # the config accepts it


def test_lerp_merge_against_a_hand_computed_case():
    """merge.method=lerp: init [0, 0], policies [1, 0] and [0, 2] (orthogonal task vectors, where SLERP differs),
    lambda 0.5, eta 0.5 -> merged [0.5, 1.0], next init [0.25, 0.5]; M = 3 -> the mean."""
    init = torch.zeros(2)
    ps = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    merged, nxt, gram = merging.merge_pass(init, ps, 0.5, 0.5, method="lerp")
    assert merged.tolist() == [0.5, 1.0] and nxt.tolist() == [0.25, 0.5]
    slerped, _, _ = merging.merge_pass(init, ps, 0.5, 0.5)
    assert not torch.allclose(slerped, merged)  # SLERP keeps the norm: sin(pi/4) / sin(pi/2) of each
    assert merging.lerp_coefficients(gram[:2, :2], 0.3) == [0.7, 0.3]
    three = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([3.0, 3.0])]
    merged3, _, _ = merging.merge_pass(init, three, 0.5, 0.5, method="lerp")
    assert torch.allclose(merged3, torch.tensor([2.0, 2.0]))


def test_config_lists_the_registered_methods():
    with pytest.raises(ConfigError, match=r"merge.method='nope' is invalid: allowed slerp \| lerp$"):
        load_config(TINY, ["merge.method=nope"])
