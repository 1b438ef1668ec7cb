"""Guards that stop a run at once, with one line saying where and what: non-finite rewards, losses, weights.

    check_finite(reward, "reward", where(1, 0, 3), "reward.callable=mod:f")
    -> NonFiniteError("iteration 1 policy 0 step 3: reward contains NaN (2 of 8 values) from reward.callable=mod:f")

No I/O and no process groups: the trainer calls these on each rank and lets the normal failure path end the job.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class RunError(RuntimeError):
    """A run cannot go on; the message alone says why, in one line (launchers print it without a traceback)."""


class NonFiniteError(RunError):
    """A reward, loss, gradient norm or weight holds NaN or inf."""


def where(iteration: int | None = None, policy: int | None = None, step: int | None = None, phase: str = "") -> str:
    """Position string of an error: where(1, 0, 3) -> "iteration 1 policy 0 step 3"; parts left None are omitted.

    `phase` is appended as is, e.g. where(2, phase="merge") -> "iteration 2 merge".
    """
    parts = [f"{name} {v}" for name, v in (("iteration", iteration), ("policy", policy), ("step", step))
             if v is not None]
    if phase:
        parts.append(phase)
    return " ".join(parts)


def describe_non_finite(values: torch.Tensor) -> str:
    """"" when every value is finite, else e.g. "NaN (2 of 8 values), inf (1 of 8 values)" (any shape, any device)."""
    if not values.is_floating_point():  # integer and bool tensors are always finite
        return ""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return ""
    n = values.numel()
    n_nan = int(torch.isnan(values).sum())
    n_inf = int(torch.isinf(values).sum())
    if n == 1:
        return "NaN" if n_nan else ("inf" if float(values.reshape(-1)[0]) > 0 else "-inf")
    parts = [f"{label} ({k} of {n} values)" for label, k in (("NaN", n_nan), ("inf", n_inf)) if k]
    return ", ".join(parts)


def check_finite(values: torch.Tensor, what: str, where: str = "", source: str = "") -> None:
    """Raise NonFiniteError when `values` (any shape; a 0-d loss or grad norm is fine) holds NaN or inf.

    what: the quantity ("reward", "shaped reward", "loss", "grad norm", "merged tensor lm_head.weight").
    where: the position, see `where()`; source: who produced it ("reward.callable=mod:f"), "" = not said.
    Message: "<where>: <what> contains NaN (2 of 8 values), inf (1 of 8 values) from <source>"; a single value reads
    "<where>: loss is NaN". Costs one device sync (`.any()`); counting happens only on failure.
    """
    bad = describe_non_finite(values)
    if not bad:
        return
    verb = "is" if values.numel() == 1 else "contains"
    msg = f"{what} {verb} {bad}"
    if source:
        msg += f" from {source}"
    raise NonFiniteError(f"{where}: {msg}" if where else msg)


def check_state_finite(state: Mapping[str, torch.Tensor], what: str, where: str = "") -> None:
    """check_finite on every floating tensor of a state dict; the message names the first bad tensor.

    Call it before saving weights (non-finite weights are never saved) and on merge results.
    """
    for name, t in state.items():
        check_finite(t.detach(), f"{what} tensor {name}", where)
