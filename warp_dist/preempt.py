"""Preemption-safe stops: a signal (SIGTERM, SIGINT, SIGUSR1 by default: `stop_signals`) asks the run to stop; every
rank stops at the next step or phase boundary that all ranks agree on (`Dist.any` there), one checkpoint is written,
and the process exits with EXIT_PREEMPTED. A second signal at least REPEAT_S seconds after the first ends the process
at once (the checkpoint being written is a temp folder: the previous one stays whole); a repeat within REPEAT_S is the
same request delivered twice (a cluster signals every process of a job, and a launcher forwards the signal again).
"""

from __future__ import annotations

import os
import signal
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint written; resume=true continues
REPEAT_S = float(os.environ.get("WARP_DIST_SIGNAL_REPEAT_S", "2.0"))  # the tests set 0
NAMES = ("TERM", "INT", "USR1", "USR2", "HUP")  # stop_signals choices


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint (exit EXIT_PREEMPTED)."""

    def __init__(self, signame: str, where: str):
        what = f"SIG{signame}" if signame else "a signal to another rank"
        super().__init__(f"stopped on {what} {where}: a checkpoint was written; resume=true continues the run")
        self.signame = signame


class Stopper:
    """The signal handlers of one process; `requested` is the first signal's name ("" while none came)."""

    def __init__(self, names: str = "TERM,INT,USR1"):
        self.requested = ""
        self.at = 0.0
        self._old: dict[int, object] = {}
        for name in [n.strip().upper().removeprefix("SIG") for n in names.split(",") if n.strip()]:
            sig = getattr(signal, f"SIG{name}")
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name.removeprefix("SIG")
        now = time.monotonic()
        if not self.requested:
            self.requested, self.at = name, now
            print(f"[stop] SIG{name} received: stopping at the next step boundary after a checkpoint "
                  "(a second signal ends the process at once)", flush=True)
            return
        if now - self.at >= REPEAT_S:  # a second request: end now; the checkpoint in progress is a temp folder
            print(f"[stop] second SIG{name}: exiting without waiting for the checkpoint", flush=True)
            os._exit(128 + signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def parse(names: str) -> list[str]:
    """The signal names of `stop_signals` ("" = none), or ValueError naming the bad one."""
    out = []
    for n in (x.strip().upper().removeprefix("SIG") for x in names.split(",") if x.strip()):
        if n not in NAMES:
            raise ValueError(n)
        out.append(n)
    return out
