"""Non-finite guards and reward errors: exact one-line messages from real tensors and real reward callables."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, subprocess_env
from warp_dist.config import RewardConfig
from warp_dist.guards import (
    NonFiniteError,
    RunError,
    check_finite,
    check_state_finite,
    describe_non_finite,
    where,
)
from warp_dist.rewards import build_reward
from warp_dist.rewards.scorers import RewardError

NAN, INF = float("nan"), float("inf")
TOY = "tests.toy_rewards"


def _raises(fn, *args, exc=NonFiniteError, **kw) -> str:
    with pytest.raises(exc) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, repr(msg)
    return msg


# ------------------------------------------------------------------------------------------------- where
def test_where_formats_the_position():
    assert where(1, 0, 3) == "iteration 1 policy 0 step 3"
    assert where(2) == "iteration 2"
    assert where(2, phase="merge") == "iteration 2 merge"
    assert where(1, 1) == "iteration 1 policy 1"
    assert where(None, None, 5) == "step 5"
    assert where() == ""


# ------------------------------------------------------------------------------------------------- check_finite
def test_finite_values_pass_in_every_dtype_and_shape():
    check_finite(torch.randn(8), "reward", where(1, 0, 3))
    check_finite(torch.randn(4, 5, dtype=torch.bfloat16), "merged tensor w", where(1, phase="merge"))
    check_finite(torch.tensor(1.5), "loss")
    check_finite(torch.tensor([], dtype=torch.float32), "reward")
    check_finite(torch.tensor([1, 2, 3]), "token ids")  # integers are always finite
    check_finite(torch.tensor([True, False]), "mask")
    assert describe_non_finite(torch.zeros(3)) == ""


def test_nan_in_reward_names_position_count_and_source():
    r = torch.tensor([0.1, NAN, 0.3, 0.2, NAN, 0.0, 1.0, -1.0])
    msg = _raises(check_finite, r, "reward", where(1, 0, 3), "reward.callable=mod:f")
    assert msg == "iteration 1 policy 0 step 3: reward contains NaN (2 of 8 values) from reward.callable=mod:f"


def test_nan_and_inf_are_counted_separately():
    r = torch.tensor([INF, NAN, -INF, 0.0])
    msg = _raises(check_finite, r, "shaped reward", where(2, 1, 7))
    assert msg == "iteration 2 policy 1 step 7: shaped reward contains NaN (1 of 4 values), inf (2 of 4 values)"
    assert _raises(check_finite, torch.tensor([INF, 1.0]), "reward") == "reward contains inf (1 of 2 values)"


def test_scalars_read_as_is():
    assert _raises(check_finite, torch.tensor(NAN), "loss", where(1, 0, 2)) == "iteration 1 policy 0 step 2: loss is NaN"
    assert _raises(check_finite, torch.tensor(INF), "grad norm", where(1, 0, 2)) == \
        "iteration 1 policy 0 step 2: grad norm is inf"
    assert _raises(check_finite, torch.tensor([-INF]), "loss") == "loss is -inf"


def test_two_dim_bf16_tensor_and_state_dict():
    w = torch.zeros(3, 4, dtype=torch.bfloat16)
    w[1, 2] = NAN
    assert _raises(check_finite, w, "merged tensor h.0.w", where(1, phase="merge")) == \
        "iteration 1 merge: merged tensor h.0.w contains NaN (1 of 12 values)"
    state = {"a": torch.ones(2), "ids": torch.arange(3), "b": torch.tensor([1.0, INF, INF])}
    assert _raises(check_state_finite, state, "theta_slerp", where(2, phase="merge")) == \
        "iteration 2 merge: theta_slerp tensor b contains inf (2 of 3 values)"
    check_state_finite({"a": torch.ones(2)}, "theta_init")


def test_non_finite_error_is_a_run_error():
    assert issubclass(NonFiniteError, RunError) and issubclass(NonFiniteError, RuntimeError)
    assert issubclass(RewardError, RunError) and issubclass(RewardError, ValueError)


# ------------------------------------------------------------------------------------------------- rewards
PROMPTS = [f"prompt {i} " for i in range(8)]
COMPS = [f"completion number {i}" for i in range(8)]


def _callable(name: str):
    return build_reward(RewardConfig(kind="callable", callable=f"{TOY}:{name}"))


def test_nan_reward_from_a_callable():
    msg = _raises(_callable("nan_every_other"), PROMPTS, COMPS, where=where(1, 0, 3))
    assert msg == f"iteration 1 policy 0 step 3: reward contains NaN (4 of 8 values) from reward.callable={TOY}:nan_every_other"
    # without a position (e.g. an evaluation batch) the message starts with the quantity
    assert _raises(_callable("nan_every_other"), PROMPTS[:3], COMPS[:3]) == \
        f"reward contains NaN (2 of 3 values) from reward.callable={TOY}:nan_every_other"


def test_inf_reward_from_a_callable():
    msg = _raises(_callable("inf_first_two"), PROMPTS, COMPS, where=where(2, 1, 1))
    assert msg == f"iteration 2 policy 1 step 1: reward contains inf (2 of 8 values) from reward.callable={TOY}:inf_first_two"


def test_wrong_length_names_the_callable():
    msg = _raises(_callable("one_short"), PROMPTS, COMPS, where=where(1, 0, 1), exc=RewardError)
    assert msg == f"iteration 1 policy 0 step 1: reward.callable={TOY}:one_short returned 7 scores for 8 completions"


def test_raising_callable_is_named_and_keeps_the_cause():
    with pytest.raises(RewardError) as ei:
        _callable("raises_value_error")(PROMPTS, COMPS, where=where(1, 1, 4))
    assert str(ei.value) == (f"iteration 1 policy 1 step 4: reward.callable={TOY}:raises_value_error raised "
                             "ValueError: cannot score an empty completion")
    assert isinstance(ei.value.__cause__, ValueError)  # debug=true shows the user's own frame
    msg = _raises(_callable("returns_none"), PROMPTS, COMPS, exc=RewardError)
    assert msg == f"reward.callable={TOY}:returns_none returned NoneType, not a list of 8 numbers"


def test_real_vader_reward_passes_the_guard():
    r = build_reward(RewardConfig(kind="vader"))
    out = r(["This movie was "] * 2, ["wonderful and moving.", "dull, awful and far too long."], where=where(1, 0, 1))
    assert out.shape == (2,) and torch.isfinite(out).all() and out[0] > 0 > out[1]
    assert r.source == "reward.kind=vader"


def test_run_with_nan_reward_stops_with_one_line(tmp_path, tiny_model_path):
    """launch/warp.py end to end: the first reward call returns NaN; exit 1, one error line, no final model."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", "reward.kind=callable", f"reward.callable={TOY}:nan_every_other",
           "train.iterations=1", "train.steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: (.+: )?reward contains NaN \(\d+ of \d+ values\) from reward\.callable={TOY}"
                        r":nan_every_other", last), last
    assert (out / "config.yaml").is_file() and not (out / "final").exists() and not (out / "summary.json").exists()
    metrics = out / "metrics.jsonl"
    if metrics.exists():  # nothing non-finite was recorded before the run stopped
        assert all("NaN" not in line and json.loads(line) for line in metrics.read_text().splitlines())


def test_nothing_moved_is_stopped_with_one_line(tmp_path, tiny_model_path):
    """The failure this project exists to rule out, reproduced on purpose: train.lr=0 cannot move the weights, and
    the run stops at the first merge with one line saying so (instead of reporting an 'aligned' model)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", "train.lr=0", "train.iterations=1", "train.steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: policy 0's task vector has norm 0.0: its training did not change the weights"), last
    assert not (out / "final").exists() and not (out / "summary.json").exists()


def test_a_weight_write_that_is_not_pushed_makes_the_next_sample_refuse(tmp_path, tiny_model_path, monkeypatch):
    """Every write to the policy weights (load, optimizer step, merge) bumps their version; the rollout engine is
    labelled with the version it was pushed. Skip one push (the one after step 1's optimizer step): the next sample
    is refused, naming where it was asked and the write that was not pushed. (Today's code bumped the version only
    together with a push, so this guard could never fire.)"""
    from warp_dist.config import config_from_dict
    from warp_dist.evaluation.evaluator import Evaluator
    from warp_dist.rollout.base import StaleWeightsError
    from warp_dist.training.rl_step import train_policy
    from warp_dist.training.session import Session

    cfg = config_from_dict({"output_dir": str(tmp_path), "progress": False,
                            "data": {"num_train_prompts": 16, "num_eval_prompts": 4},
                            "train": {"iterations": 1, "policies": 1, "steps": 3, "batch_size": 4}})
    w = Session(cfg, log=lambda *_: None)
    try:
        real, calls = w.push_weights, []

        def skip_the_second():
            calls.append(len(calls))
            if len(calls) != 2:
                real()

        monkeypatch.setattr(w, "push_weights", skip_the_second)
        with pytest.raises(StaleWeightsError, match=r"^iteration 1 policy 0 step 2: .* \(last written by an "
                                                    r"optimizer step\): push the weights"):
            train_policy(w, 1, 0)
        assert len(calls) == 2
        monkeypatch.setattr(w, "push_weights", real)
        w.push_weights()
        w.sample(w.eval_prompts.ids, 0, list(range(len(w.eval_prompts))), "after a push")  # current again
        w.policy.w.load_(w.sft.part, "a test's load")
        with pytest.raises(StaleWeightsError, match="evaluation batch 0: .*a test's load"):
            Evaluator(w).batch(0)
    finally:
        w.close()
