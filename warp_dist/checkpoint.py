"""Run-folder I/O. Every artifact is written to a temp path in the same folder and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml


def _tmp_dir_for(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save_model(model, state: dict[str, torch.Tensor] | None, tokenizer, path: str | Path) -> Path:
    """HF folder (config.json, model.safetensors, tokenizer) of `model`'s architecture with `state` as weights.

    Written by hand rather than with `save_pretrained`, which only writes on global rank 0 once torch.distributed
    is up, while policy folders are written by their group's leader. Tied tensors are stored once (first name).
    """
    from safetensors.torch import save_file

    from .merging import unique_names

    path = Path(path)
    state = model.state_dict() if state is None else state
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in unique_names(state)}
    tmp = _tmp_dir_for(path)
    try:
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_hf_folder(path: str | Path, config, tokenizer, names: list[str], shapes: dict, source, dtype: torch.dtype,
                   buffers: dict[str, torch.Tensor] | None = None, generation_config=None) -> Path:
    """HF folder (config.json, generation config, tokenizer, model.safetensors) written tensor by tensor.

    `source(name)` gives each parameter (fp32, full shape); tied parameters are stored once under their first name
    and persistent buffers are stored as they are. Loadable by transformers and vLLM. Temp folder + rename.
    """
    from .weights import write_stream

    path = Path(path)
    tmp = _tmp_dir_for(path)
    try:
        config.save_pretrained(str(tmp))
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        buffers = buffers or {}
        specs = [(n, tuple(shapes[n]), dtype) for n in names]
        specs += [(k, tuple(b.shape), b.dtype if not b.is_floating_point() else dtype) for k, b in buffers.items()]

        def stream():
            for n in names:
                yield n, source(n)
            yield from buffers.items()

        write_stream(tmp / "model.safetensors", specs, stream())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_tree(path: str | Path) -> None:
    """Remove a folder: renamed aside first (atomic), then deleted, so it is never seen half-removed."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.removing")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_yaml(path: str | Path, obj) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


class MetricsLog:
    """Append-only JSONL: one object per line, flushed at once (a crash loses at most the line being written)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
