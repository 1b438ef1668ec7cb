"""The CUDA path of training and generation (skipped without a GPU; the CPU path is tests/test_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_run_on_cuda(tmp_path, tiny_model_path, dtype):
    out = tmp_path / dtype
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"output_dir={out}", f"model.dtype={dtype}", "train.steps=6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["final"]["weight_distance_to_sft"] > 0 and s["final"]["identical_fraction"] < 1.0
    from safetensors.torch import load_file

    w = load_file(str(out / "final" / "model.safetensors"))
    expect = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert all(t.dtype == expect for t in w.values() if t.is_floating_point())


def test_training_step_runs_on_the_gpu(tmp_path, tiny_model_path):
    from warp_dist.config import config_from_dict
    from warp_dist.trainer import Warp

    cfg = config_from_dict({"output_dir": str(tmp_path), "progress": False,
                            "data": {"num_train_prompts": 32, "num_eval_prompts": 8},
                            "train": {"iterations": 1, "policies": 1, "steps": 2, "batch_size": 8, "lr": 1e-3}})
    w = Warp(cfg, log=lambda *_: None)
    assert w.device.type == "cuda" and next(w.model.parameters()).is_cuda
    res = w.train_policy(w.sft_state, 1, 0)
    assert any(not torch.equal(res.state[k], w.sft_state[k]) for k in res.state)
    assert torch.cuda.max_memory_allocated() > 0
