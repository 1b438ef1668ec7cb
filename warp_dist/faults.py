"""Fault injection for the resume tests: SIGKILL this very process at a named point of a run.

    WARP_DIST_KILL_AT=checkpoint:3         kill at the 3rd time any rank reaches point "checkpoint"
    WARP_DIST_KILL_AT=merge:1:rank1        ... only on rank 1

    WARP_DIST_SLOW_AT=step:20:rank1        rank 1 sleeps 20 s the first time it reaches point "step" (a slow group)
    WARP_DIST_SIGNAL_AT=step:3:TERM        send this process SIGTERM the 3rd time it reaches "step" (a comma list:
                                           step:3:TERM,checkpoint:2:TERM also signals again during a checkpoint)

Points: step (after an optimizer step, before the weight push), checkpoint (rank files written, checkpoint not yet
renamed), blob (half of a policy file written), merge (half of the tensors merged), eval (after the first evaluation
batch). Inert unless a variable is set; the kill is a real SIGKILL, exactly what the OOM killer or a pre-empted node
does, so the tests exercise the same recovery a user needs.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}


def _slow(name: str) -> None:
    spec = os.environ.get("WARP_DIST_SLOW_AT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name or f"slow:{name}" in _counts:
        return
    if len(parts) > 2 and parts[2] != f"rank{os.environ.get('RANK', '0')}":
        return
    _counts[f"slow:{name}"] = 1
    time.sleep(float(parts[1]))


def _signal(name: str) -> None:
    for spec in filter(None, os.environ.get("WARP_DIST_SIGNAL_AT", "").split(",")):
        parts = spec.split(":")
        if parts[0] != name or (len(parts) > 3 and parts[3] != f"rank{os.environ.get('RANK', '0')}"):
            continue
        key = f"signal:{spec}"
        _counts[key] = _counts.get(key, 0) + 1
        if _counts[key] == int(parts[1]):
            os.kill(os.getpid(), getattr(signal, f"SIG{parts[2]}"))


def point(name: str) -> None:
    _slow(name)
    _signal(name)
    spec = os.environ.get("WARP_DIST_KILL_AT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name:
        return
    if len(parts) > 2 and parts[2] != f"rank{os.environ.get('RANK', '0')}":
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(parts[1]):
        os.kill(os.getpid(), signal.SIGKILL)
