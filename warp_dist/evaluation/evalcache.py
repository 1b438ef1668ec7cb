"""Evaluations a training run already made, kept in its folder so that launch/eval.py does not make them again.

A finished run writes `<run>/evals.json`: {"settings": ..., "results": {name: {"weights", "sft_weights",
"result"}}} with name "sft", "iter <i> merged" (when eval.every_iteration and save_iterations) and "final".
`weights` is the sha256 of the safetensors files of the folder the result measures (the SFT model folder,
iter_<i>/merged/, final/), `sft_weights` that of the SFT model it was compared with (KL, identical fraction) and
`settings` everything else the numbers depend on: the model name and compute dtype, the data, reward, rollout and
eval sections, the reward model's and the judge's files. A result is reused only when all three match what the
evaluation at hand would use; anything else (an override such as data.num_eval_prompts=256, retrained weights in
the same folder, a DeepSpeed-trained run) evaluates afresh. Evaluation is deterministic given these (every prompt
is sampled with its own seed), so a reused row equals a recomputed one (tested: the same completions and rewards,
KL within float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .. import checkpoint
from .metrics import EvalResult

FILE = "evals.json"


def folder_digest(folder: str | Path) -> str | None:
    """sha256 over a model folder's *.safetensors files (names and bytes, in name order); None when it has none."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def settings(cfg, deepspeed: bool) -> dict:
    """What an evaluation's numbers depend on besides the two models' weights (JSON-comparable)."""
    ev = cfg.eval
    files = {}
    for key, name in (("reward", cfg.reward.name), ("judge", ev.judge), ("judge_classifier", ev.judge_classifier)):
        if name and Path(name).is_dir():
            files[key] = folder_digest(name)
    return {"model": {"name": cfg.model.name, "dtype": cfg.model.dtype}, "data": dataclasses.asdict(cfg.data),
            "reward": dataclasses.asdict(cfg.reward), "rollout": dataclasses.asdict(cfg.rollout),
            "eval": {"batch_size": ev.batch_size, "seed": ev.seed, "judge": ev.judge,
                     "judge_classifier": ev.judge_classifier},
            "files": files, "deepspeed": deepspeed}


def write(run: str | Path, setting: dict, entries: dict[str, tuple[str | None, EvalResult]],
          sft_weights: str | None) -> Path | None:
    """<run>/evals.json from {name: (weights digest, result)}; entries without a digest are left out."""
    results = {name: {"weights": dg, "sft_weights": sft_weights, "result": res.to_json()}
               for name, (dg, res) in entries.items() if dg is not None and sft_weights is not None}
    if not results:
        return None
    return checkpoint.write_json(Path(run) / FILE, {"settings": setting, "results": results})


class Store:
    """The evals.json of one run folder (empty when it has none or it is unreadable)."""

    def __init__(self, run: str | Path):
        self.path = Path(run) / FILE
        try:
            data = json.loads(self.path.read_text())
            self.setting, self.results = data["settings"], data["results"]
        except (OSError, ValueError, KeyError, TypeError):
            self.setting, self.results = None, {}

    def get(self, name: str, setting: dict, weights: str | None, sft_weights: str | None) -> EvalResult | None:
        """The stored result `name` when it was made with these settings, these weights and this SFT model."""
        e = self.results.get(name)
        if e is None or weights is None or sft_weights is None or self.setting != setting:
            return None
        if e.get("weights") != weights or e.get("sft_weights") != sft_weights:
            return None
        return EvalResult.from_json(e["result"])
