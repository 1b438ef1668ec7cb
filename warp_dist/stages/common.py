"""Pieces both stages use: the learning-rate schedule, the cached-result line, writing a result, versions."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from .config import config_hash
from .output import CONFIG, SUMMARY, begin, discard, publish


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over
    `warmup` steps to 1, then linear decay to 1 / (total - warmup) at the last step (never 0 while training)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    rest = max(1, total - warmup)
    return max(0.0, (total - step) / rest)


def skip_line(stage: str, cfg, summary: dict, figures: str) -> str:
    return (f"{stage}: output_dir={cfg.output_dir} already holds this config's result (config {config_hash(cfg)}; "
            f"{figures}): nothing to do; overwrite=true trains again")


def environment() -> dict:
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host_cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def write_result(cfg, summary: dict, model, tokenizer, t0: float) -> Path:
    """Write the model and tokenizer (save_pretrained), config.yaml and, last, summary.json (its timings get save_s
    and total_s, t0 being the stage's start) into a temp folder next to cfg.output_dir, then rename it into place.
    Nothing is left behind if anything fails."""
    from ..checkpoint import write_json, write_yaml

    tic = time.time()
    tmp = begin(cfg.output_dir)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        summary["timings"]["save_s"] = time.time() - tic
        summary["timings"]["total_s"] = time.time() - t0
        write_yaml(tmp / CONFIG, cfg.to_dict())
        write_json(tmp / SUMMARY, summary)
        return publish(tmp, cfg.output_dir)
    finally:
        discard(tmp)
