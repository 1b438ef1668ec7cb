"""Rollout backends behind one interface (`RolloutBackend`): HF (samples from the training module) and vLLM."""

from .base import (
    Batch,
    Generations,
    RolloutBackend,
    SamplingConfig,
    StaleWeightsError,
    build_batch,
    request_seed,
)
from .hf import HFBackend


def resolve_backend(kind: str, log=print) -> str:
    """`auto` -> vllm when importable, else hf."""
    if kind != "auto":
        return kind
    import importlib.util

    kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    log(f"rollout.backend=auto -> {kind}")
    return kind


def make_backend(kind: str, *, module_fn, tokenizer, model_path: str, eos_ids, dtype: str = "float32",
                 device=None, vllm_cfg=None, seed: int = 0, autocast_fn=None, sync=None, max_seqs: int = 64,
                 max_len: int = 0, tensor_parallel: int = 1, log=print):
    """Build the rollout backend named by `rollout.backend` (hf | vllm | auto)."""
    kind = resolve_backend(kind, log)
    if kind == "hf":
        return HFBackend(module_fn, tokenizer.pad_token_id, eos_ids, autocast_fn=autocast_fn, sync=sync)
    if kind == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(model_path, tokenizer, vllm_cfg, dtype=dtype, seed=seed, device=device or "cpu",
                           max_seqs=max_seqs, max_len=max_len, eos_ids=eos_ids, tensor_parallel=tensor_parallel,
                           log=log)
    raise ValueError(f"rollout.backend={kind!r}: allowed hf | vllm | auto")


__all__ = ["Batch", "Generations", "RolloutBackend", "SamplingConfig", "StaleWeightsError", "build_batch",
           "request_seed", "HFBackend", "make_backend", "resolve_backend"]
