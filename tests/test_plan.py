"""The memory plan (warp_dist.checks.plan): arithmetic of the memory rule, the command, and the refusal before any weights."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, subprocess_env
from warp_dist.checks import plan
from warp_dist.config import load_config

SMOL = ["model.name=embedded:smollm2-135m", "train.batch_size=16"]
ZERO3 = "train.deepspeed=configs/deepspeed/zero3.json"
QWEN = ROOT / "configs" / "models" / "qwen2.5-7b" / "config.json"


def arch_7b() -> plan.Arch:
    from transformers import AutoConfig

    return plan.Arch.from_config(AutoConfig.from_pretrained(str(QWEN.parent)))


def cfg_of(*overrides, preset="tiny.yaml"):
    return load_config(ROOT / "configs" / "warp" / preset, list(overrides))


def model_state(p: plan.Plan, rank: int) -> int:
    keys = ("policy weights", "gradients", "optimizer (AdamW)", "EMA / SFT reference")
    return sum(p.components[rank][k][0] for k in keys)


def test_arch_from_config_counts_the_parameters():
    a = arch_7b()
    assert 7.5e9 < a.num_params < 7.7e9  # Qwen2.5-7B: 7.62 B parameters (untied embeddings)
    assert a.largest_tensor == 152064 * 3584 and a.dims.layers == 28 and a.dims.kv_heads == 4
    assert a.largest_layer < a.num_params / 20


def test_model_state_is_partitioned_one_over_g_under_zero3():
    a = arch_7b()
    c = cfg_of(ZERO3, "train.policies=1", "model.dtype=bfloat16")
    base = model_state(plan.build(c, 1, arch=a), 0)
    assert base == 4 * a.num_params * 5  # weights + gradients + 2 AdamW moments + EMA, fp32, whole
    for g in (2, 4, 8):
        p = plan.build(c, g, arch=a)
        assert all(abs(model_state(p, r) - base / g) <= 20 for r in range(g))
    plain = plan.build(cfg_of("train.policies=1"), 1, arch=a)
    assert model_state(plain, 0) == base  # the same 20 bytes per parameter without DeepSpeed


def test_peak_phase_and_host_items_on_cuda():
    a = arch_7b()
    c = cfg_of(ZERO3, "train.policies=2", "model.dtype=bfloat16", "rollout.backend=vllm")
    p = plan.build(c, 8, device="cuda", capacity=80 * 10**9, arch=a)
    r0 = p.components[0]
    assert r0["merge buffers"][2].startswith("host") and p.host_total(0) > 0
    # host items do not count against the GPU; the engine sleeps during the training pass
    assert r0["rollout engine"][0] > 0 and "train" not in r0["rollout engine"][3]
    assert p.phase_total(0, "merge") - p.phase_total(0, "train") == (
        r0["rollout engine"][0] + r0["merge buffers (GPU)"][0] - r0["activations"][0] - r0["ZeRO-3 gathers"][0])
    assert p.rank_total(0) >= p.rank_total(1)  # rank 0 is the merger
    assert p.rank_total(0) < 80e9  # the shipped 8-GPU preset fits an 80 GB GPU


def test_capacity_refusal_is_one_line_with_advice():
    c = cfg_of(*SMOL, "train.policies=1")
    with pytest.raises(plan.PlanError) as e:
        plan.check(c, 1, device="cpu", capacity=10**9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan: rank 0 needs about")
    assert "ZeRO-3 (train.deepspeed=configs/deepspeed/zero3.json)" in msg and "train.batch_size" in msg
    p = plan.check(c, 1, device="cpu", capacity=10**12)  # fits: no error
    assert p.rank_total(0) > 10**9


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * 10**9 and plan.parse_bytes("24GiB") == 24 * 2**30
    assert plan.parse_bytes("512MB") == 512 * 10**6 and plan.parse_bytes("1e9") == 10**9
    with pytest.raises(plan.PlanError):
        plan.parse_bytes("lots")


def test_plan_command_prints_every_component():
    cmd = [sys.executable, "-m", "warp_dist.checks.plan", "--config", str(ROOT / "configs" / "warp" / "qwen2_5_7b_8gpu.yaml"),
           "--ranks", "8", "--device", "cuda", "--device-memory", "80GB", "--model-config", str(QWEN)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE=1), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for comp in ("policy weights", "gradients", "optimizer (AdamW)", "EMA / SFT reference", "rollout engine",
                 "merge buffers", "activations", "peak ("):
        assert comp in proc.stdout, comp
    small = subprocess.run(cmd[:-4] + ["--device-memory", "16GB", "--model-config", str(QWEN)], cwd=ROOT,
                           env=subprocess_env(HF_HUB_OFFLINE=1), capture_output=True, text=True, timeout=120)
    assert small.returncode == 1 and "does not fit" in small.stdout


def test_launch_refuses_a_run_that_cannot_fit_before_loading_weights(tmp_path):
    """launch/warp.py runs the plan after the preflight: one line, exit 2, in seconds, nothing written."""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
                           f"output_dir={out}"], cwd=ROOT, env=subprocess_env(WARP_DIST_DEVICE_MEMORY="100MB"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory plan: rank 0 needs about"), proc.stderr
    assert "but has 0.1 GB on cpu" in lines[0]
    assert not out.exists() and time.perf_counter() - t0 < 60
