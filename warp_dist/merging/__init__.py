"""Merging: the WARP merge of M policies' task vectors and LITI, per tensor (`core.merge_pass`) with the method's
coefficients (`methods`: slerp, lerp; registered in METHODS) and three kernels (eager torch ops, `compiled`
torch.compile graphs, `native` C++), plus whole-state-dict conveniences. Pure math: tensors in, tensors out.

The names below are loaded when first used, so reading `merging.methods` (the config does) does not import torch.
"""

from __future__ import annotations

import importlib

_HOME = {
    "methods": ("EPS", "METHODS", "coefficients", "lerp_coefficients", "slerp_coefficients"),
    "compiled": ("COMPILED_MIN", "GRAM_BLOCK", "compiled_merge_pass"),
    "core": ("CHUNK", "KERNELS", "accumulate_dots", "clone_state", "compiler_available", "distance",
             "gram_diagnostics", "interpolate_state", "kernel_for", "liti", "merge_pass", "merge_state_dicts",
             "merge_tensor", "merge_tensor_reference", "slerp", "slerp_many", "stats_from_dots", "storage_key",
             "task_vector_stats", "unique_names"),
}
_WHERE = {name: module for module, names in _HOME.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif name in ("core", "methods", "compiled", "native"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found once
    return value
