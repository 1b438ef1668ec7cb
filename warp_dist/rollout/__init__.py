"""Rollout backends behind one interface (`RolloutBackend`): HF generate and vLLM."""

from .base import Generations, RolloutBackend, SamplingConfig, StaleWeightsError, build_batch
from .hf import HFBackend


def make_backend(kind: str, model, tokenizer, model_path: str, vllm_cfg=None, seed: int = 0, log=print):
    """Build the rollout backend named by `rollout.backend` (hf | vllm | auto)."""
    if kind == "auto":
        try:
            import vllm  # noqa: F401

            kind = "vllm"
        except ImportError:
            kind = "hf"
        log(f"rollout.backend=auto -> {kind}")
    if kind == "hf":
        return HFBackend(model, tokenizer)
    if kind == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(model_path, tokenizer, vllm_cfg, dtype=str(next(model.parameters()).dtype).split(".")[-1],
                           seed=seed, device=next(model.parameters()).device)
    raise ValueError(f"rollout.backend={kind!r}: allowed hf | vllm | auto")


__all__ = ["Generations", "RolloutBackend", "SamplingConfig", "StaleWeightsError", "build_batch", "HFBackend",
           "make_backend"]
