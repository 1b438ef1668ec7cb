"""Run-folder I/O. Every artifact is written to a temp path in the same folder and renamed into place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .guards import RunError


def tmp_dir_for(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))


def replace_dir(tmp: Path, path: Path) -> None:
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
    tmp = tmp_dir_for(path)
    try:
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, path)
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
    tmp = tmp_dir_for(path)
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
        replace_dir(tmp, path)
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


# ---------------------------------------------------------------------------------------------- resumable run state
# <output_dir>/state/
#   sft.safetensors            canonical fp32 SFT parameters (only when the model folder cannot be read directly)
#   blobs/                     fp32 safetensors produced by the run: iter<i>_init[.rank<r>], iter<i>_policy<m>,
#                              iter<i>_slerp; each written to a temp name and renamed
#   ckpt-<seq>/position.json   a complete checkpoint: where the run stands, what it has computed (eval results,
#                              policy histories, timers), the blobs it needs, the metrics lines written so far
#   ckpt-<seq>/rank<r>/        rank-local training state of a policy in progress: policy.safetensors and
#                              ema.safetensors (this rank's share of every parameter), optimizer.pt, rng.pt
# A checkpoint directory is written as .ckpt-<seq>.tmp and renamed when complete, so any ckpt-<seq> is whole; the
# newest `keep` are kept and blobs no kept checkpoint names are deleted.

CKPT_PREFIX = "ckpt-"


def checkpoints(state_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    found = [p for p in state_dir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and p.name[len(CKPT_PREFIX):].isdigit() and (p / "position.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def read_position(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "position.json").read_text())


def checkpoint_tmp(state_dir: str | Path, seq: int) -> Path:
    return Path(state_dir) / f".{CKPT_PREFIX}{seq:06d}.tmp"


def begin_checkpoint(state_dir: str | Path, seq: int) -> Path:
    """Rank 0: a fresh temp folder for checkpoint `seq` (a leftover of a killed write is removed first)."""
    tmp = checkpoint_tmp(state_dir, seq)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


MANIFEST = "manifest.json"  # size and sha256 of every file a checkpoint holds or needs (its blobs)
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a blob shared by checkpoints once


def sha256_file(path: str | Path, cache: bool = False) -> str:
    """The sha256 of a file, read in 16 MB blocks (disk speed: hashlib's SHA-256 runs at GB/s with SHA extensions).
    cache=True: a file unchanged since it was last hashed in this process (same size and mtime) is not read again."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache and key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if cache:
        _HASHES[key] = digest
    return digest


def manifest(folder: Path, blobs: list[str], blob_dir: Path) -> dict:
    """{"files": {relative path: [size, sha256]}, "blobs": {name: [size, sha256]}} of a checkpoint being written."""
    files = {str(p.relative_to(folder)): [p.stat().st_size, sha256_file(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    named = {Path(b).name: blob_dir / Path(b).name for b in blobs}
    return {"files": files, "blobs": {n: [p.stat().st_size, sha256_file(p, cache=True)] for n, p in named.items()}}


def verify_checkpoint(ckpt: str | Path) -> str:
    """"" when every file the checkpoint's manifest lists is there with its size and checksum, else what is wrong
    (the first damaged file). A checkpoint without a manifest (written before manifests) counts as whole."""
    ckpt = Path(ckpt)
    try:
        man = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError:
        return "" if (ckpt / "position.json").is_file() else f"{ckpt / 'position.json'} is missing"
    except (OSError, ValueError) as exc:
        return f"{ckpt / MANIFEST} is unreadable ({type(exc).__name__})"
    entries = [(ckpt / rel, v) for rel, v in man.get("files", {}).items()]
    entries += [(ckpt.parent / "blobs" / name, v) for name, v in man.get("blobs", {}).items()]
    for path, (size, digest) in entries:
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the checkpoint wrote {size}"
        if sha256_file(path) != digest:
            return f"{path} does not match its checksum"
    return ""


def finish_checkpoint(state_dir: str | Path, seq: int, position: dict, keep: int) -> Path:
    """Rank 0: write position.json and the manifest (sizes and checksums), rename the temp folder into place, drop
    old checkpoints and unused blobs."""
    state_dir = Path(state_dir)
    tmp = checkpoint_tmp(state_dir, seq)
    write_json(tmp / "position.json", position)
    write_json(tmp / MANIFEST, manifest(tmp, position.get("blobs", []), state_dir / "blobs"))
    _fsync_dir(tmp)
    final = state_dir / f"{CKPT_PREFIX}{seq:06d}"
    os.replace(tmp, final)
    _fsync_dir(state_dir)
    kept = checkpoints(state_dir)[-keep:]
    for old in checkpoints(state_dir):
        if old not in kept:
            remove_tree(old)
    needed = {Path(p).name for c in kept for p in read_position(c).get("blobs", [])}
    blobs = state_dir / "blobs"
    if blobs.is_dir():
        for f in blobs.iterdir():
            if f.is_file() and f.name not in needed and not f.name.startswith("."):
                f.unlink()
    return final


def newest_valid(state_dir: str | Path, warn=print) -> Path | None:
    """The newest checkpoint whose files all match its manifest; a damaged newer one is set aside (renamed to
    .damaged-ckpt-<seq>, so the run's next checkpoint can take its number) with one warning line naming the damaged
    file. None when there is no checkpoint; RunError in one line when there are some and none is whole."""
    found = checkpoints(state_dir)
    damaged = []
    for ckpt in reversed(found):
        why = verify_checkpoint(ckpt)
        if not why:
            return ckpt
        damaged.append(f"{ckpt.name}: {why}")
        warn(f"warning: checkpoint {ckpt.name} is damaged ({why}); falling back to the one before it")
        aside = ckpt.with_name(f".damaged-{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
    if damaged:
        raise RunError(f"resume: no valid checkpoint in {state_dir} ({'; '.join(damaged)}); start afresh with "
                       "overwrite=true")
    return None


def clean_partial(state_dir: str | Path) -> None:
    """Remove what a killed process left half-written: temp checkpoint folders and temp blob files."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return
    for p in state_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    blobs = state_dir / "blobs"
    if blobs.is_dir():
        for f in blobs.iterdir():
            if f.name.startswith("."):
                f.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_rng(path: str | Path) -> None:
    """Every RNG state of this process (torch CPU/CUDA, Python, NumPy), atomically, in types `load_safe` reads
    (NumPy's key array as a tensor)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch_save_atomic(state, path)


def load_rng(path: str | Path) -> None:
    import random

    import numpy as np

    state = load_safe(path)
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_safe(path: str | Path):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only, so a checkpoint folder from
    elsewhere cannot run code on resume (a pickle can). A file that holds anything else is refused in one line."""
    try:
        return torch.load(str(path), weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"GLOBAL (\S+)", str(exc))
        why = f" ({found.group(1)})" if found else ""
        raise RunError(f"{path}: holds more than tensors and plain values{why}, refused by a weights_only load; a "
                       "checkpoint written by another program, or by a warp_dist before 2026-12, cannot be resumed"
                       ) from None


def torch_save_atomic(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def truncate_lines(path: str | Path, n: int) -> None:
    """Keep the first n lines of a text file (the metrics a resumed run had written by its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n:
        write_text(path, "".join(lines[:n]))


def count_lines(path: str | Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    with open(path) as fh:
        return sum(1 for _ in fh)


def verify_run(output_dir: str | Path) -> tuple[list[tuple[str, str]], int]:
    """Every checkpoint of a run folder checked against its manifest, without resuming it: ([(name, "" or what is
    damaged)], exit code: 0 when the newest is whole, 1 when only an older one is, 2 when none is or there are none)."""
    found = checkpoints(Path(output_dir) / "state")
    rows = [(c.name, verify_checkpoint(c)) for c in found]
    if not rows:
        return rows, 2
    if not rows[-1][1]:
        return rows, 0
    return rows, 1 if any(not why for _, why in rows) else 2


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m warp_dist.checkpoint",
                                 description="check a run folder's checkpoints (sizes and sha256) without resuming")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every checkpoint of a run folder")
    v.add_argument("output_dir")
    args = ap.parse_args(argv)
    if not Path(args.output_dir).is_dir():
        print(f"error: {args.output_dir} is not a folder")
        return 2
    rows, code = verify_run(args.output_dir)
    for name, why in rows:
        print(f"{name}: {'ok' if not why else 'DAMAGED: ' + why}")
    print({0: "the newest checkpoint is whole: resume=true continues from it",
           1: "the newest checkpoint is damaged: resume=true falls back to the newest whole one",
           2: "no whole checkpoint: resume=true cannot continue this run"}[code])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
