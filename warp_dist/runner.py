"""Glue between the launcher and the trainer: run folder, logging, the final SFT-vs-WARP table."""

from __future__ import annotations

import time
from pathlib import Path

from . import checkpoint
from .config import WarpConfig


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet_libraries() -> None:
    """No per-shard progress bars or accelerator-detection chatter from the libraries underneath."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def run(cfg: WarpConfig) -> dict:
    """Run WARP on this rank. Any exception ends this process at once with a non-zero code (see dist.fail_fast)."""
    from . import dist as distmod

    d = distmod.init(cfg.train.policies, cfg.dist_timeout_s, cpu=cfg.cpu)  # topology errors before any work
    try:
        quiet_libraries()
        from .trainer import Warp

        out = Path(cfg.output_dir)
        metrics = out / "metrics.jsonl"
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_yaml(out / "config.yaml", cfg.to_dict())
            if metrics.exists():
                metrics.unlink()
        t0 = time.perf_counter()
        summary = Warp(cfg, d, log=log, metrics_path=metrics).run()
        if d.is_main:
            log(f"done in {time.perf_counter() - t0:.0f}s -> {out}")
            print(result_table(summary), flush=True)
        return summary
    except Exception as exc:  # noqa: BLE001 - a failing rank must end the whole job, never hang it
        if d.active:
            distmod.fail_fast(exc, d.rank)
        raise


def result_table(summary: dict) -> str:
    s, f = summary["sft"], summary["final"]
    rows = [
        "| model | reward (mean ± std) | KL to SFT | identical to SFT | mean length |",
        "|---|---|---|---|---|",
        f"| SFT | {s['reward_mean']:+.3f} ± {s['reward_std']:.3f} | {s['kl_mean']:.3f} | "
        f"{s['identical_fraction']:.2f} | {s['length_mean']:.1f} |",
        f"| WARP | {f['reward_mean']:+.3f} ± {f['reward_std']:.3f} | {f['kl_mean']:.3f} | "
        f"{f['identical_fraction']:.2f} | {f['length_mean']:.1f} |",
    ]
    lines = ["", *rows, ""]
    for i, smp in enumerate(summary.get("samples", []), 1):
        lines += [f"[{i}] prompt: {smp['prompt']!r}",
                  f"    SFT  ({smp['sft_reward']:+.3f}): {smp['sft']!r}",
                  f"    WARP ({smp['warp_reward']:+.3f}): {smp['warp']!r}"]
    return "\n".join(lines)
