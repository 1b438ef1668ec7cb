"""Shared fixtures: one cache of embedded models per test session, the tiny GPT-2 built once."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

# Subprocesses (launch/warp.py, accelerate launch) inherit this, so every test shares one built tiny model.
os.environ.setdefault("WARP_DIST_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "warp_dist_test_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs `-n`), give each worker its own share of the cores.

    Without this every worker's torch (and every rank it launches) sizes its thread pool to all the cores, and the
    workers' pools fight for them: an in-process test went from 5 s alone to 46 s next to another worker. Pinned,
    a worker and the subprocesses it starts (affinity is inherited; warp_dist sizes threads from it) behave as on a
    machine with that many cores.
    """
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not name.startswith("gw") or count < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    i = int(name[2:])
    per, extra = divmod(len(cores), count)
    if per == 0:  # more workers than cores: share round robin
        share = [cores[i % len(cores)]]
    else:
        start = i * per + min(i, extra)
        share = cores[start: start + per + (1 if i < extra else 0)]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(len(share))


_pin_xdist_worker()

# `make test` hands whole files to its workers (--dist loadfile) in collection order (--no-loadscope-reorder: xdist
# would otherwise sort the files by their number of tests): the slowest files go first, so that no worker is left
# running one long file while the other idles. How long each file takes is measured, not kept by hand:
# `make test-durations` runs the suite and writes tests/durations.json (seconds per file); a file not in it (a new
# one) goes first, as if it were the slowest.
DURATIONS = Path(__file__).with_name("durations.json")
_RECORD = os.environ.get("WARP_DIST_RECORD_DURATIONS", "")
_spent: dict[str, float] = {}


def pytest_collection_modifyitems(items):
    import json

    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    first = max(known.values(), default=0.0) + 1.0
    items.sort(key=lambda item: -known.get(item.path.name, first))  # stable: each file keeps its own order


def pytest_runtest_logreport(report):
    if _RECORD:
        name = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
        _spent[name] = _spent.get(name, 0.0) + report.duration


def pytest_sessionfinish(session):
    if _RECORD and _spent and not os.environ.get("PYTEST_XDIST_WORKER"):
        import json

        Path(_RECORD).write_text(json.dumps({k: round(v, 1) for k, v in sorted(_spent.items())}, indent=1) + "\n")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from warp_dist.models import resolve_model_path

    return resolve_model_path("embedded:tiny-gpt2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(n: int, *args: str, cli: bool = False) -> list[str]:
    """The command line of `accelerate launch` with n gloo ranks on this machine, then the script and its args.

    By default it runs the launcher as `python -m accelerate.commands.launch`: the same launch_command without the
    `accelerate` CLI importing all its subcommands first (estimate-memory imports transformers: ~5 s of CPU and of
    wall time per launch here). cli=True goes through the `accelerate` executable, as the README's commands do.
    """
    head = [str(BIN / "accelerate"), "launch"] if cli else [sys.executable, "-m", "accelerate.commands.launch"]
    return [*head, "--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env
