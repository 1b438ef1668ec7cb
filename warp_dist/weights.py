"""Weights on disk, one tensor at a time: a streaming safetensors writer and a positioned-read reader.

Nothing here holds a whole model: `write_stream` writes the header (all names, shapes, dtypes are known up front),
then each tensor as it is produced; `SafeFile.part(name, start, count)` reads only one rank's slice of one tensor. The format is plain safetensors: transformers, vLLM and
`safetensors.torch.load_file` read these files.

A *source* is any callable `name -> fp32 tensor` (full shape); `file_source`, `lerp_source` build them.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

Source = Callable[[str], torch.Tensor]

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Push-style safetensors writer: the header is written from `specs` up front, then `add(name, tensor)` in spec
    order, one tensor at a time; `close()` renames the temp file into place (`abort()` removes it)."""

    def __init__(self, path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in specs:
            n = 1
            for s in shape:
                n *= int(s)
            size = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._specs = list(specs)
        self._next = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"StreamWriter({self.path.name}): unexpected extra tensor {name!r}")
        want, shape, dtype = self._specs[self._next]
        if name != want:
            raise ValueError(f"StreamWriter({self.path.name}): expected tensor {want!r}, got {name!r}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"StreamWriter({self.path.name}): {name} has shape {tuple(t.shape)}, spec {tuple(shape)}")
        self._fh.write(_tensor_bytes(t.to(dtype)))
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._specs):
            self.abort()
            raise ValueError(f"StreamWriter({self.path.name}): {len(self._specs) - self._next} tensors never written")
        self._fh.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def write_stream(path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> Path:
    """Write a safetensors file from `specs` (name, shape, dtype, in file order) and a stream of (name, tensor),
    holding one tensor at a time; temp name + rename, so a crash never leaves a half-written file."""
    w = StreamWriter(path, specs, metadata)
    try:
        for name, t in tensors:
            w.add(name, t)
            del t
    except BaseException:
        w.abort()
        raise
    return w.close()


class SafeFile:
    """Read-only safetensors file, read tensor by tensor (or slice by slice) with plain positioned reads.

    No memory map: mapped file pages would count in the process's resident memory for as long as the mapping
    lives, while read() leaves them in the page cache only.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(n))
        except Exception:
            self._fh.close()
            raise
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self.entries = {k: (CODE_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                        for k, v in header.items()}

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def _read(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, in the file dtype (a new tensor)."""
        dtype, _, (a, _) = self.entries[name]
        out = torch.empty(count, dtype=dtype)
        if count == 0:
            return out
        size = out.element_size()
        view = memoryview(out.view(torch.uint8).numpy())
        pos, done = self._base + a + start * size, 0
        while done < len(view):
            got = os.preadv(self._fh.fileno(), [view[done:]], pos + done)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file reading {name}")
            done += got
        return out

    def numel(self, name: str) -> int:
        _, shape, _ = self.entries[name]
        return int(torch.Size(shape).numel())

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor `name` in its shape (cast to `dtype`; None keeps the file dtype)."""
        t = self._read(name, 0, self.numel(name)).view(self.entries[name][1])
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def part(self, name: str, start: int, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, zero-padded past the end."""
        n = self.numel(name)
        end = min(start + count, n)
        got = self._read(name, start, max(end - start, 0)).to(dtype)
        if got.numel() == count:
            return got
        out = torch.zeros(count, dtype=dtype)
        out[: got.numel()] = got
        return out

    def close(self) -> None:
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ModelFiles:
    """The safetensors files of an HF model folder (single file or sharded with an index), read tensor by tensor."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafeFile(folder / f) for f in sorted(set(weight_map.values()))}
            self._where = {k: files[f] for k, f in weight_map.items()}
            self._files = list(files.values())
        elif (folder / "model.safetensors").is_file():
            f = SafeFile(folder / "model.safetensors")
            self._where = {k: f for k in f.names()}
            self._files = [f]
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors (or index)")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafeFile:
        return self._where[name]

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return self._where[name].get(name, dtype)

    def part(self, name: str, start: int, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._where[name].part(name, start, count, dtype)

    def close(self) -> None:
        for f in self._files:
            f.close()


def file_source(files: SafeFile | ModelFiles) -> Source:
    """name -> fp32 full tensor from a file."""
    return lambda name: files.get(name, torch.float32)


def lerp_source(a: Source, b: Source, eta: float) -> Source:
    """name -> (1 - eta) a(name) + eta b(name), in fp32 (the LITI / eta-front interpolation, tensor by tensor)."""
    return lambda name: torch.lerp(a(name).float(), b(name).float(), eta)


def dict_source(state: dict[str, torch.Tensor]) -> Source:
    return lambda name: state[name].float()


class ParamFiles:
    """A model's parameters on disk, addressed by parameter name (tied names resolved through `aliases`)."""

    def __init__(self, files: SafeFile | ModelFiles, keys: dict[str, str]):
        self.files, self.keys = files, keys  # keys: parameter name -> key in the file

    @classmethod
    def match(cls, files: SafeFile | ModelFiles, names: list[str], aliases: dict[str, str],
              shapes: dict[str, tuple[int, ...]]) -> ParamFiles | None:
        """Map each parameter to a tensor of the right size stored under one of its names; None if any is missing."""
        by_name: dict[str, list[str]] = {}
        for key, name in aliases.items():
            by_name.setdefault(name, []).append(key)
        stored = set(files.names())
        keys = {}
        for n in names:
            numel = int(torch.Size(shapes[n]).numel())
            hit = [k for k in by_name.get(n, [n]) if k in stored and _numel(files, k) == numel]
            if not hit:
                return None
            keys[n] = hit[0]
        return cls(files, keys)

    def full(self, name: str) -> torch.Tensor:
        return self.files.get(self.keys[name], torch.float32)

    def part(self, name: str, start: int, count: int) -> torch.Tensor:
        return self.files.part(self.keys[name], start, count, torch.float32)

    def close(self) -> None:
        self.files.close()


def _numel(files, key: str) -> int:
    f = files.file_of(key) if isinstance(files, ModelFiles) else files
    return int(torch.Size(f.shape(key)).numel())


def source_part(source: Source) -> Callable[[str, int, int], torch.Tensor]:
    """A (name, start, count) slice reader over a full-tensor source (zero-padded past the end)."""

    def part(name: str, start: int, count: int) -> torch.Tensor:
        flat = source(name).reshape(-1)
        out = torch.zeros(count, dtype=torch.float32)
        end = min(start + count, flat.numel())
        if end > start:
            out[: end - start].copy_(flat[start:end])
        return out

    return part
