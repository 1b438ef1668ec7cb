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


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from warp_dist.models import resolve_model_path

    return resolve_model_path("embedded:tiny-gpt2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env
