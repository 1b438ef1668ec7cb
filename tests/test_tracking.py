"""TensorBoard logging (warp_dist.tracking): record -> scalars at a global step, replay after resume leaves no
duplicate point, log_with=none writes nothing. The real runs' event files are checked in tests/test_sweep.py."""

from __future__ import annotations

import pytest

from warp_dist.tracking import Tracking, flatten, scalars


def tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files under `folder` (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def tb_texts(folder) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    ea.Reload()
    return {t: [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)] for t in ea.Tags()["tensors"]}


TRAIN = {"kind": "train", "iteration": 2, "policy": 1, "step": 3, "rank": 0, "time": 1e9, "reward_mean": 0.5,
         "loss": -1.0, "grad_norm": float("nan")}


def test_records_become_scalars_at_a_global_step():
    step, vals = scalars(TRAIN, steps_per_iteration=4)
    assert step == 7 and vals == {"train/policy_1/reward_mean": 0.5, "train/policy_1/loss": -1.0}  # NaN skipped
    step, vals = scalars({**TRAIN, "rank": 3}, 4, group_size=2)
    assert set(vals) == {"train/policy_1/rank_3/reward_mean", "train/policy_1/rank_3/loss"}
    step, vals = scalars({"kind": "merge", "iteration": 2, "angle_deg": {"0-1": 88.0}, "task_vector_norm": [1.0, 2.0],
                          "tensor_angle_deg": {"0-1": {"min": 3.0}}}, 4)
    assert step == 8 and vals == {"merge/angle_deg/0-1": 88.0, "merge/task_vector_norm/0": 1.0,
                                  "merge/task_vector_norm/1": 2.0, "merge/tensor_angle_deg/0-1/min": 3.0}
    step, vals = scalars({"kind": "eval", "model": "sft", "iteration": 0, "reward_mean": 0.1, "judge": "vader",
                          "judge_mean": None, "num_prompts": 16}, 4)
    assert step == 0 and vals == {"eval/reward_mean": 0.1, "eval/num_prompts": 16.0}
    assert scalars({"kind": "other"}, 4) is None
    out: dict = {}
    flatten("x", {"a": True, "b": "text", "c": [1, None]}, out)
    assert out == {"x/c/0": 1.0}


def test_replay_rewrites_tb_without_duplicates(tmp_path):
    recs = [{**TRAIN, "iteration": 1, "policy": 0, "step": s, "reward_mean": 0.1 * s} for s in (1, 2, 3)]
    t = Tracking("tensorboard", tmp_path, steps_per_iteration=3, config_text="a: 1")
    for r in recs:
        t.record(r)
    t.close()
    assert [s for s, _ in tb_scalars(tmp_path / "tb")["train/policy_0/reward_mean"]] == [1, 2, 3]
    # resumed at a checkpoint after step 2: the records after it are cut from metrics.jsonl, then redone
    t = Tracking("tensorboard", tmp_path, 3, config_text="a: 1")
    t.replay(recs[:2])
    t.record({**recs[2], "reward_mean": 0.25})
    t.text("samples", "| a | b |", 3)
    t.close()
    got = tb_scalars(tmp_path / "tb")["train/policy_0/reward_mean"]
    assert [s for s, _ in got] == [1, 2, 3] and got[2][1] == pytest.approx(0.25)
    texts = tb_texts(tmp_path / "tb")
    assert texts["config/text_summary"] == ["```\na: 1\n```"] and texts["samples/text_summary"] == ["| a | b |"]


def test_log_with_none_writes_nothing(tmp_path):
    t = Tracking("none", tmp_path, 3)
    t.record(TRAIN)
    t.text("samples", "x", 0)
    t.replay([TRAIN])
    t.close()
    assert not (tmp_path / "tb").exists() and not list(tmp_path.iterdir())
