"""The decisions of the CUDA-only paths, exercised on the CPU (issue: the first multi-GPU run must not meet a known bug).

Where the CPU can run the real thing it does (DeepSpeed's engine forward, ZeRO-3 with an offloaded optimizer). Where
only a GPU can (vLLM's sleep mode, CUDA device queries), the test drives the same code with the CUDA answers stood in
and checks the decision it makes; tests/test_gpu.py runs the real thing on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, subprocess_env

TINY = str(ROOT / "configs" / "warp" / "tiny.yaml")


def run_script(*argv: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- item 1: bf16 + ZeRO
def test_deepspeed_engine_forward_keeps_bf16(tmp_path, tiny_model_path):
    """Through DeepSpeed's engine forward, with its autocast test answering as it does on a GPU, the policy still
    computes in bf16 and its log-probs equal the reference's at equal weights (today's code ran that forward in fp32:
    every linear output float32, a 1e-3 log-prob gap, so KL to the anchor was not 0 where policy and anchor agree)."""
    out = tmp_path / "autocast.json"
    proc = run_script("tests/autocast_script.py", TINY, str(out), f"output_dir={tmp_path / 'run'}", "train.policies=1",
                      "model.dtype=bfloat16", "train.deepspeed=configs/deepspeed/zero3.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["engine"] == "deepspeed"
    assert got["dtypes"] == ["torch.bfloat16"], got
    assert got["max_logprob_gap"] <= 1e-6, got
    assert "disabled within the DeepSpeed engine" not in proc.stderr  # the engine saw no outer autocast to turn off


# ------------------------------------------------------------------------------ item 5: each rank queries its own GPU
@pytest.fixture
def cuda_stand_in(monkeypatch):
    """torch.cuda answering as on a node of 8 GPUs, recording which device each query names (None = the default)."""
    asked: list[tuple[str, object]] = []
    cuda = torch.cuda

    def record(name, answer):
        def f(device=None, *args, **kwargs):
            asked.append((name, device))
            return answer
        return f

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 8)
    monkeypatch.setattr(cuda, "set_device", record("set_device", None))
    monkeypatch.setattr(cuda, "current_device", lambda: asked.append(("current_device", None)) or 0)
    monkeypatch.setattr(cuda, "get_device_capability", record("get_device_capability", (9, 0)))
    monkeypatch.setattr(cuda, "get_device_properties", record("get_device_properties",
                                                              SimpleNamespace(major=9, total_memory=80 * 10**9)))
    monkeypatch.setattr(cuda, "is_bf16_supported", record("is_bf16_supported", True))
    monkeypatch.setattr(cuda, "mem_get_info", record("mem_get_info", (70 * 10**9, 80 * 10**9)))
    return asked


def test_cuda_queries_before_the_process_group_name_the_ranks_own_gpu(cuda_stand_in, monkeypatch):
    """model.dtype=auto and the memory plan ask CUDA before any process group exists: on LOCAL_RANK 3 every query
    names GPU 3 (today's code asked the default device, GPU 0, from every rank: a CUDA context each on the merger's
    GPU)."""
    from warp_dist.checks import plan
    from warp_dist.config import load_config

    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = load_config(TINY, ["model.dtype=auto", "output_dir=/tmp/unused"])
    assert cfg.model.dtype == "bfloat16"
    assert plan.capacity_bytes("cuda", 8) == 80 * 10**9
    assert cuda_stand_in, "nothing was asked"
    assert all(dev == 3 for name, dev in cuda_stand_in if name != "set_device"), cuda_stand_in
    assert ("set_device", 3) in cuda_stand_in and ("current_device", None) not in cuda_stand_in


def test_pre_ampere_gpu_computes_in_float32(cuda_stand_in, monkeypatch):
    from warp_dist.config import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_dtype("auto") == "float32"
    assert resolve_dtype("auto", cpu=True) in ("float32", "bfloat16")  # the CPU's own answer, no CUDA query


# ------------------------------------------------------------------- item 7: ZeRO-3 with an offloaded fp32 master
OFFLOAD = {"zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                 "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
                                 "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                                 "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": "auto",
                                 "sub_group_size": "auto"},
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 1000000}


def test_zero3_master_starts_every_policy_from_theta_init(tmp_path, tiny_model_path):
    """Two policies in turn on one rank: under ZeRO-3 with offload_optimizer (the fp32 master a clone on the offload
    device) each policy must start from theta_init, as without DeepSpeed. DeepSpeed 0.19 keeps a separate fp32 master
    under ZeRO-3 even without offload (its alias test compares a torch.device with a string), and today's code never
    synced it: the second policy's first step continued from the first policy's weights (final weights 2.0e-3 from
    the plain run's, measured; 8e-7 with the master synced)."""
    conf = tmp_path / "z3_offload.json"
    conf.write_text(json.dumps(OFFLOAD))
    finals = {}
    for name, extra in (("plain", []), ("offload", [f"train.deepspeed={conf}"])):
        out = tmp_path / name
        proc = run_script("launch/warp.py", "--config", TINY, f"output_dir={out}", "train.iterations=1",
                          "train.steps=2", "eval.every_iteration=false", "data.num_eval_prompts=4", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from safetensors.torch import load_file

        finals[name] = load_file(str(out / "final" / "model.safetensors"))
    a, b = finals["plain"], finals["offload"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst


# ------------------------------------------------------------------------------- item 10: vLLM's CUDA-only settings
class RecordingEngine:
    """Stands in for vllm.LLM where the CPU build has no such path (sleep mode is CUDA-only)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method if isinstance(method, str) else method.__name__))
        if kwargs and "weights_iterator" in kwargs:
            list(kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def cuda_backend():
    pytest.importorskip("vllm")
    from warp_dist.rollout.vllm import VllmBackend

    b = VllmBackend.__new__(VllmBackend)
    b.llm, b.on_cuda, b.sleep_mode, b._asleep = RecordingEngine(), True, True, False
    b.push_request, b.push_mode, b.push_note, b.pushes, b.version = "auto", None, "", 0, 0
    return b


def test_sleep_drops_the_weights_and_a_push_wakes_the_engine():
    """Sleep level 2 (no pinned host copy of weights that every step re-pushes anyway); the push wakes the weights,
    loads them, then the KV cache; sampling from an engine asleep without a push is refused."""
    from warp_dist.rollout.base import StaleWeightsError

    b = cuda_backend()
    b.sleep()
    assert b.llm.calls == [("sleep", 2)]
    with pytest.raises(StaleWeightsError, match="asleep"):
        b._wake()
    b.update_weights(lambda: iter([("w", torch.zeros(2))]), 7)
    assert b.llm.calls[1:] == [("wake_up", ("weights",)), ("collective_rpc", "reload_weights"),
                               ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert b.version == 7 and not b._asleep
    b._wake()  # awake: nothing to do


def test_enforce_eager_auto_uses_cuda_graphs_on_gpus():
    pytest.importorskip("vllm")
    from warp_dist.rollout.vllm import enforce_eager

    assert enforce_eager("auto", on_cuda=True) is False
    assert enforce_eager("auto", on_cuda=False) is True
    assert enforce_eager("true", on_cuda=True) is True and enforce_eager("false", on_cuda=False) is False
