"""Evaluate a finished run folder: SFT, every iteration's policies and merge, the eta front, baselines; then report.

    python launch/eval.py --run runs/demo [--eta-grid 0,0.1,...,1] [--iterations] [--baselines runs/baselines/*]
    accelerate launch --multi_gpu --num_processes 2 launch/eval.py --run runs/demo

Every model is evaluated by the trainer's own (sharded) evaluation on the run's held-out prompts and sampling seeds,
so the eta = 0 and eta = 1 ends of the front reproduce the SFT and final rows exactly. Writes <run>/report/eval.json
and, unless --no-report, report.md, report.html, pareto.png, training.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_GRID = ",".join(f"{i / 10:g}" for i in range(11))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="evaluate a WARP run folder and build its report")
    ap.add_argument("--run", required=True, help="run folder written by launch/warp.py")
    ap.add_argument("--eta-grid", default=DEFAULT_GRID, help="interpolation weights between SFT and final")
    ap.add_argument("--iterations", action="store_true", help="also the eta front of every iteration's merge")
    ap.add_argument("--baselines", nargs="*", default=[], help="run folders of baselines (e.g. warp_dist.sweep)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value on top of the run's config.yaml")
    return ap.parse_args(argv)


def load_weights(folder: Path, like: dict):
    """A run's HF folder as a state dict shaped like `like` (tied tensors stay tied)."""
    from safetensors.torch import load_file

    from warp_dist import merging

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors (not a model folder of a finished run)")
    state = merging.clone_state(like)
    seen = set()
    for f in files:
        for k, v in load_file(str(f)).items():
            if k not in state:
                raise KeyError(f"{f}: tensor {k!r} does not belong to the run's model")
            state[k].copy_(v)
            seen.add(k)
    missing = [k for k in merging.unique_names(state) if k not in seen]
    if missing:
        raise KeyError(f"{folder}: missing tensors {missing[:3]}")
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    from warp_dist.config import ConfigError, load_config

    try:
        if not (run / "config.yaml").is_file() or not (run / "final").is_dir():
            raise ConfigError(f"--run {run}: not a finished run folder (needs config.yaml and final/)")
        grid = [float(x) for x in args.eta_grid.split(",") if x.strip()]
        if not grid or any(not 0 <= e <= 1 for e in grid):
            raise ConfigError(f"--eta-grid {args.eta_grid!r}: allowed comma-separated numbers in [0, 1]")
        cfg = load_config(run / "config.yaml", [*args.overrides, f"output_dir={run}", "progress=false"])
        for b in args.baselines:
            if not (Path(b) / "final").is_dir():
                raise ConfigError(f"--baselines {b}: not a finished run folder")
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from warp_dist import checkpoint, merging
    from warp_dist import dist as distmod
    from warp_dist.runner import log, quiet_libraries
    from warp_dist.trainer import Warp, fmt_metrics

    d = distmod.init(1, cfg.dist_timeout_s, cpu=cfg.cpu)
    try:
        quiet_libraries()
        w = Warp(cfg, d, log=log)
        rows = []

        def add(name, kind, state, sft_res, **extra):
            res = w.evaluate_state(state, sft_res)
            rows.append({"name": name, "kind": kind, **extra, **res.metrics})
            w.log(fmt_metrics(name, res.metrics))
            return res

        sft = add("sft", "sft", w.sft_state, None, eta=0.0)
        final = load_weights(run / "final", w.sft_state)
        fin = add("final", "final", final, sft, eta=1.0)
        it = 1
        while (run / f"iter_{it}").is_dir():
            folder = run / f"iter_{it}"
            for p in sorted(folder.glob("policy_*")):
                add(f"iter {it} {p.name}", "policy", load_weights(p, w.sft_state), sft, iteration=it,
                    policy=int(p.name.split("_")[1]))
            if (folder / "merged").is_dir():
                merged = load_weights(folder / "merged", w.sft_state)
                add(f"iter {it} merged", "merged", merged, sft, iteration=it)
                if args.iterations:
                    for eta in grid:
                        add(f"iter {it} front eta={eta:g}", "front", merging.interpolate_state(w.sft_state, merged, eta),
                            sft, iteration=it, eta=eta)
            it += 1
        for eta in grid:
            add(f"front eta={eta:g}", "front", merging.interpolate_state(w.sft_state, final, eta), sft, eta=eta,
                iteration=cfg.train.iterations)
        for b in args.baselines:
            bcfg = load_config(Path(b) / "config.yaml")
            add(f"REINFORCE beta={bcfg.train.beta:g}", "baseline", load_weights(Path(b) / "final", w.sft_state), sft,
                beta=bcfg.train.beta, folder=str(b))
        w.backend.close()
        if d.is_main:
            checkpoint.write_json(run / "report" / "eval.json",
                                  {"rows": rows, "samples": samples(w, sft, fin, cfg.eval.num_samples_shown)})
            if not args.no_report:
                from warp_dist.report import build_report

                out = build_report(run)
                log(f"report: {out / 'report.md'}  {out / 'report.html'}  {out / 'pareto.png'}")
        d.barrier()
        return 0
    except Exception as exc:  # noqa: BLE001 - a failing rank ends every rank
        if d.active:
            distmod.fail_fast(exc, d.rank)
        raise


def samples(w, sft, fin, n: int) -> list[dict]:
    """SFT vs final continuations of the first n eval prompts (same seeds), with their rewards."""
    return [{"prompt": w.eval_prompts.texts[i], "sft": sft.texts[i], "sft_reward": sft.rewards[i],
             "warp": fin.texts[i], "warp_reward": fin.rewards[i]} for i in range(min(n, len(fin.texts)))]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
