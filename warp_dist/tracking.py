"""Train / merge / eval records into TensorBoard (and/or Weights & Biases) through Accelerate's trackers, on rank 0.

    log_with: tensorboard           (default) event files in <output_dir>/tb/:  tensorboard --logdir runs/<run>/tb
    log_with: wandb                 a wandb run (project warp_dist, named after the run folder); needs `pip install wandb`
    log_with: tensorboard,wandb     both;  log_with: none  neither (metrics.jsonl is written in every case)

Every record the trainer writes to metrics.jsonl is also logged, numeric fields as scalars (nested dicts and lists
flattened: merge/angle_deg/0-1, eval/tokens_per_s_per_rank/0), at a global step (`scalars`):

    train  train/policy_<m>/<field>   step (iteration - 1) * T + step   (+ /rank_<r> when a policy group has G > 1)
    merge  merge/<field>              step iteration * T
    eval   eval/<field>               step iteration * T  (SFT: 0; then every iteration's merge, the last = final)

plus the resolved config (text "config", step 0) and the SFT-vs-WARP sample table (text "samples", at the end).

Resume: metrics.jsonl is cut back to the checkpoint; `replay` then deletes tb/ and rewrites it from the kept records,
so TensorBoard holds no duplicate or orphaned point. wandb cannot delete what it logged: a resumed run is a new wandb
run holding the replayed history (the killed one stays, partial), and its x axis is the logged `global_step` field
(wandb steps must increase, ours restart at every policy).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

SKIP = {"train": ("kind", "iteration", "policy", "step", "rank", "time"), "merge": ("kind", "iteration"),
        "eval": ("kind", "model", "iteration", "judge")}


def trackers_of(log_with: str) -> list[str]:
    text = (log_with or "none").strip()
    return [] if text == "none" else [x.strip() for x in text.split(",") if x.strip()]


def flatten(prefix: str, value, out: dict[str, float]) -> None:
    """Finite numbers under `prefix` (dicts and lists flattened with '/'); strings, None, bools and NaN skipped."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(f"{prefix}/{i}", v, out)


def scalars(rec: dict, steps_per_iteration: int, group_size: int = 1) -> tuple[int, dict[str, float]] | None:
    """(global step, {tag: value}) of a metrics record; None for a record kind that is not logged."""
    kind = rec.get("kind")
    if kind not in SKIP:
        return None
    T = steps_per_iteration
    if kind == "train":
        step = (rec["iteration"] - 1) * T + rec["step"]
        prefix = f"train/policy_{rec['policy']}" + (f"/rank_{rec['rank']}" if group_size > 1 else "")
    else:
        step = rec.get("iteration", 0) * T
        prefix = kind
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k not in SKIP[kind]:
            flatten(f"{prefix}/{k}", v, out)
    return step, out


def samples_markdown(samples: list[dict]) -> str:
    """The SFT-vs-WARP sample table as Markdown (TensorBoard renders it in the Text tab)."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| prompt | SFT | SFT reward | WARP | WARP reward |", "|---|---|---|---|---|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['sft'])} | {s['sft_reward']:+.3f} | {cell(s['warp'])} | "
              f"{s['warp_reward']:+.3f} |" for s in samples]
    return "\n".join(lines)


class Tracking:
    """Rank 0's trackers of one run folder; started on the first record (nothing is written before)."""

    def __init__(self, log_with: str, output_dir: str | Path, steps_per_iteration: int, group_size: int = 1,
                 config_text: str = ""):
        self.kinds = trackers_of(log_with)
        self.out = Path(output_dir)
        self.T, self.group_size, self.config_text = steps_per_iteration, group_size, config_text
        self.trackers: list = []
        self.started = False

    @property
    def tb_dir(self) -> Path:
        return self.out / "tb"

    def start(self) -> None:
        if self.started or not self.kinds:
            self.started = True
            return
        from accelerate import PartialState
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        PartialState()  # the trackers log through Accelerate's logger, which needs its state (ranks: the existing one)
        for kind in self.kinds:
            if kind == "tensorboard":
                t = TensorBoardTracker("tb", self.out)
            else:
                t = WandBTracker("warp_dist", name=self.out.name, dir=str(self.out))
            t.main_process_only = False  # this object only exists on rank 0: no Accelerate state is consulted
            try:
                t.start()
            except ImportError as exc:  # preflight checks this; a direct caller gets the same one line
                raise RuntimeError(f"log_with={','.join(self.kinds)}: {kind} cannot be imported ({exc}); pip install "
                                   f"{kind}, or log_with=none") from None
            self.trackers.append(t)
        self.started = True
        if self.config_text:
            self.text("config", "```\n" + self.config_text + "\n```", 0)

    def _log(self, values: dict, step: int) -> None:
        for t in self.trackers:
            if t.name == "wandb":  # wandb steps must increase; ours restart with every policy
                t.log({**values, "global_step": step})
            else:
                t.log(values, step=step)

    def record(self, rec: dict) -> None:
        got = scalars(rec, self.T, self.group_size)
        if got is None or not self.kinds:
            return
        self.start()
        step, values = got
        if values:
            self._log(values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if not self.kinds:
            return
        self.start()
        self._log({tag: text}, step)

    def replay(self, records: list[dict]) -> None:
        """Resume: tb/ is rewritten from `records` (metrics.jsonl as cut back to the checkpoint)."""
        if not self.kinds:
            return
        self.close()
        if self.tb_dir.is_dir() and "tensorboard" in self.kinds:
            shutil.rmtree(self.tb_dir)
        self.trackers, self.started = [], False
        self.start()
        for rec in records:
            self.record(rec)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []
