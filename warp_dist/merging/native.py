"""merge.kernel=native: the WARP merge of one tensor as two small C++ functions (merge_kernel.cpp: the Gram sweep and
the output sweep), built once per machine with the C++ compiler torch.compile uses, loaded with ctypes and called on
tensors' memory; the merge method's coefficients are computed in between (merging.methods).

The compiled kernel's math (merging.compiled; the same output bits for the same coefficients) without its fixed cost
per call (dynamo's guards, AOT wrappers, ~30 buffer allocations and ~15
OpenMP barriers: 100-150 us a tensor, most of the merge of a model with many small tensors), at 1.15-2.05x its
bandwidth in benchmarks/merge.py (all the Gram's pair sums in one loop, bf16 widened without shuffles, non-temporal
stores for outputs larger than the cache). The build (about a second) lands in a cache folder under a name that
carries a hash of the source, the compiler, its flags and this CPU's instruction-set flags (-march=native), written
to a temporary name and renamed, so concurrent ranks and later processes share it. It links the OpenMP runtime torch already
loaded (same soname, libgomp.so.1), so the merge runs on torch's thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("merge_kernel.cpp")
FLAGS = ["-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernel reads and writes; others merge eagerly

_FN = None


def cache_dir() -> Path:
    """WARP_DIST_CACHE, else $XDG_CACHE_HOME/warp_dist, else ~/.cache/warp_dist."""
    if os.environ.get("WARP_DIST_CACHE"):
        return Path(os.environ["WARP_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "warp_dist"


def compiler_names() -> list[str]:
    """The C++ compiler names torch inductor tries (the one torch.compile uses here), in its order."""
    try:
        from torch._inductor import config as inductor_config

        return [c for c in inductor_config.cpp.cxx if c]
    except Exception:  # noqa: BLE001 - an inductor without this setting: the usual name
        return ["g++"]


def compiler() -> str | None:
    """The first of `compiler_names` on PATH, else None."""
    return next((path for path in map(shutil.which, compiler_names()) if path), None)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, *version, *FLAGS, _cpu_flags()]).encode()).hexdigest()
    return cache_dir() / f"merge_kernel-{key[:16]}.so"


def build(cxx: str, dest: Path) -> None:
    """Compile SOURCE into dest through a temporary file in dest's folder (renamed when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".tmp.so", dir=dest.parent)
    os.close(fd)
    try:
        libdir = Path(torch.__file__).parent / "lib"  # torch's libgomp.so.1, the runtime already in this process
        cmd = [cxx, *FLAGS, str(SOURCE), "-o", tmp, f"-L{libdir}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [x.strip() for x in done.stderr.splitlines() if x.strip()] or ["no output"]
            # the compiler's first error (its last line is often a caret or a count of errors)
            first = next((x for x in lines if "error" in x.lower()), lines[-1])
            raise RuntimeError(f"merge.kernel=native: building {SOURCE.name} with {cxx} failed: {first}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Kernel:
    """The built library's two sweeps (ctypes functions) and the most policies they take."""

    def __init__(self, lib):
        p, i64, i, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self.gram, self.apply = lib.warp_gram, lib.warp_apply
        self.gram.restype = self.apply.restype = ctypes.c_int
        self.gram.argtypes = [i, i64, i, p, p, p, p]
        self.apply.argtypes = [i, i64, i, p, p, p, f32, p, p]
        lib.warp_merge_max_policies.restype = ctypes.c_int
        self.max_policies = lib.warp_merge_max_policies()


def load() -> Kernel:
    """The kernel, built on first use (RuntimeError with the reason when it cannot be)."""
    global _FN
    if _FN is None:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError(f"merge.kernel=native needs a C++ compiler ({' or '.join(compiler_names())}) on PATH; "
                               "none was found")
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        _FN = Kernel(ctypes.CDLL(str(path)))
    return _FN


def unavailable() -> str:
    """'' when merge.kernel=native can run here (builds the kernel if it is not cached yet), else why not."""
    try:
        load()
    except (RuntimeError, OSError) as e:
        return str(e)
    return ""


def max_policies() -> int:
    """The most policies the kernel merges in one call (8: one compiled loop per count; more merge elsewhere)."""
    return load().max_policies


def supports(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None) -> bool:
    """Whether the kernel takes these flat tensors: on the CPU, contiguous, of one length and one dtype it knows (fp32
    or bf16), at most its number of policies."""
    ts = [x, *ps] + ([f] if f is not None else [])
    return (x.dtype in DTYPES and len(ps) <= max_policies()
            and all(t.dtype == x.dtype and t.device.type == "cpu" and t.is_contiguous() and t.numel() == x.numel()
                    for t in ts))


def _pointers(ps: list[torch.Tensor]):
    return (ctypes.c_void_p * len(ps))(*[p.data_ptr() for p in ps])


def _check(rc: int, M: int) -> None:
    if rc != 0:
        raise ValueError(f"merge.kernel=native: {M} policies, the kernel takes 1..{load().max_policies}")


def gram(x: torch.Tensor, ps: list[torch.Tensor], f: torch.Tensor | None) -> torch.Tensor:
    """The [M + 1, M + 1] fp64 Gram matrix of [p_i - x ..., x - f] (last row and column 0 without f) of flat tensors
    `supports` takes."""
    M = len(ps)
    g = torch.zeros(M + 1, M + 1, dtype=torch.float64)
    _check(load().gram(DTYPES[x.dtype], x.numel(), M, x.data_ptr(), _pointers(ps),
                       f.data_ptr() if f is not None else None, g.data_ptr()), M)
    return g


def apply(x: torch.Tensor, ps: list[torch.Tensor], coef: list[float], eta: float, out: torch.Tensor,
          nxt: torch.Tensor) -> None:
    """out = x + sum_i coef_i (p_i - x) and nxt = lerp(x, out, eta), fp32 arithmetic (coef rounded to fp32), written
    in x's dtype into the flat, contiguous out and nxt."""
    M = len(ps)
    cf = (ctypes.c_float * M)(*[float(c) for c in coef])
    _check(load().apply(DTYPES[x.dtype], x.numel(), M, x.data_ptr(), _pointers(ps), cf, float(eta), out.data_ptr(),
                        nxt.data_ptr()), M)
