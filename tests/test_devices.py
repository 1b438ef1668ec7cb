"""Training and generation on a device: every test runs on the CPU in the default run and on CUDA where there is a GPU
(`-m gpu`), the same code with the device as a parameter, so an API change breaks it where CI sees it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, subprocess_env

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_run(tmp_path, tiny_model_path, device, dtype):
    """A whole tiny run: the weights move, and final/ is written in the compute dtype."""
    out = tmp_path / dtype
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", f"model.dtype={dtype}", "train.steps=6", "train.iterations=1",
           f"cpu={str(device == 'cpu').lower()}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["final"]["weight_distance_to_sft"] > 0 and s["final"]["identical_fraction"] < 1.0
    from safetensors.torch import load_file

    w = load_file(str(out / "final" / "model.safetensors"))
    expect = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert all(t.dtype == expect for t in w.values() if t.is_floating_point())


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_runs_on_the_device(tmp_path, tiny_model_path, device):
    """Two RL steps of one policy: every weight lives on the device, the policy moves away from theta_init (= SFT),
    the EMA anchor moves less, and on CUDA the step allocated device memory."""
    from warp_dist.config import config_from_dict
    from warp_dist.training.rl_step import train_policy
    from warp_dist.training.session import Session

    cfg = config_from_dict({"output_dir": str(tmp_path), "progress": False, "cpu": device == "cpu",
                            "data": {"num_train_prompts": 32, "num_eval_prompts": 8},
                            "train": {"iterations": 1, "policies": 1, "steps": 2, "batch_size": 8, "lr": 1e-3}})
    w = Session(cfg, log=lambda *_: None)
    try:
        assert w.device.type == device
        assert all(p.device.type == device for p in w.policy.module.parameters())
        res = train_policy(w, 1, 0)
        assert [r["step"] for r in res] == [1, 2]
        sft, now, ema = w.state_dict("sft"), w.state_dict(), w.state_dict("reference")
        moved = {k for k in now if not torch.equal(now[k].cpu(), sft[k])}
        assert len(moved) > len(now) // 2, f"only {len(moved)} of {len(now)} tensors moved"
        policy_move = sum((now[k].cpu() - sft[k]).norm() ** 2 for k in now) ** 0.5
        ema_move = sum((ema[k].cpu() - sft[k]).norm() ** 2 for k in ema) ** 0.5
        assert 0 < ema_move < policy_move  # mu = 0.01: the anchor trails the policy
        if device == "cuda":
            assert torch.cuda.max_memory_allocated() > 0
    finally:
        w.close()
