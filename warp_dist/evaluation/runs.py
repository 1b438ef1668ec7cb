"""Evaluate a finished run folder: SFT, every iteration's policies and merge, the eta front, baselines; then report.

    python launch/eval.py --run runs/demo [--eta-grid 0,0.1,...,1] [--iterations] [--baselines runs/demo/baselines/*]
    accelerate launch --num_processes 2 launch/eval.py --run runs/demo [dotted.key=value ...]
    warp-eval --run runs/demo                      # the same, installed as a console script

Every model goes through the trainer's own sharded evaluation (`evaluation.Evaluator`: eval batch k on rank k % W,
sampled with eval.seed + k) on the run's held-out prompts, so the numbers do not depend on the number of ranks and
the eta = 0 / eta = 1 ends of the front reproduce the SFT / final rows exactly. Overrides apply on top of the run's
config.yaml (e.g. eval.batch_size=64 data.num_eval_prompts=256 rollout.backend=hf). Rank 0 writes
<run>/report/eval.json (a list of rows: name, kind, iteration, policy, eta, beta, folder + the metrics, with 95 %
intervals, the judge's score and distinct-n, + per_prompt: {reward, kl, judge} lists in prompt order, which the
report's paired bootstrap differences resample; a model whose weights equal an evaluated one's (the front's
eta = 0 and eta = 1 ends, the last iteration's merge = final/) reuses that row, marked same_as; a model the training
run or a baseline run already evaluated with the same weights, SFT model and settings takes that run's result from
its evals.json, marked reused_from, unless --recompute) and
<run>/report/samples.json (SFT vs final continuations of the first eval prompts), then, unless --no-report,
report.md, report.html, pareto.png and training.png (warp_dist.evaluation.report). Assumes a filesystem every rank can read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_GRID = "0,0.1,...,1"
KINDS = ("sft", "policy", "merged", "front", "final", "baseline")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="evaluate a WARP run folder and build its report",
                                 epilog="overrides: dotted.key=value on top of the run's config.yaml")
    ap.add_argument("--run", required=True, help="run folder written by launch/warp.py")
    ap.add_argument("--eta-grid", default=DEFAULT_GRID,
                    help="weights eta of (1 - eta) theta_sft + eta theta_final: a,b,c or a,b,...,c (default %(default)s)")
    ap.add_argument("--iterations", action="store_true", help="also the eta front of every iteration's merge")
    ap.add_argument("--baselines", nargs="*", default=[], help="finished run folders of baselines (warp_dist.sweep)")
    ap.add_argument("--no-report", action="store_true", help="write eval.json only")
    ap.add_argument("--recompute", action="store_true",
                    help="evaluate every model, also those the training runs already evaluated (evals.json)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. eval.batch_size=64")
    return ap.parse_args(argv)


def parse_grid(text: str) -> list[float]:
    """'0,0.5,1' -> [0, 0.5, 1]; 'a,b,...,c' -> a, b, b + (b - a), ... up to c (an arithmetic progression)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i != 2 or len(parts) != 4:
            raise ValueError("'...' must come as a,b,...,c")
        a, b, c = float(parts[0]), float(parts[1]), float(parts[3])
        step = b - a
        if step <= 0 or c < a:
            raise ValueError("a,b,...,c needs a < b and c >= a")
        n = round((c - a) / step)
        if abs(a + n * step - c) > 1e-9:
            raise ValueError(f"c={c:g} is not a + k * (b - a)")
        grid = [round(a + k * step, 10) for k in range(n + 1)]
    else:
        grid = [float(p) for p in parts]
    if not grid or any(not 0 <= e <= 1 for e in grid):
        raise ValueError("allowed: comma-separated numbers in [0, 1]")
    return sorted(set(grid))


def load_weights(folder: Path, w):
    """A run's HF model folder as a source (parameter name -> fp32 tensor, read from disk on demand), checked
    against the run's model `w` (a warp_dist.training.policy.Weights): every parameter present with its shape."""
    from warp_dist.weights import ModelFiles, ParamFiles

    try:
        files = ModelFiles(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no model.safetensors (not a model folder of a finished run)") from None
    found = ParamFiles.match(files, w.names, w.aliases, w.shapes)
    if found is None:
        missing = [n for n in w.names if not any(k in files for k, v in w.aliases.items() if v == n)]
        files.close()
        raise KeyError(f"{folder}: tensors missing or of the wrong size for the run's model: {missing[:3]}")
    return found.full


def check_inputs(args, run: Path):
    """Everything that can be wrong with the command line, before any model is loaded. -> (cfg, grid, baselines)."""
    from warp_dist.config import ConfigError, load_config

    if not (run / "config.yaml").is_file() or not (run / "final").is_dir():
        raise ConfigError(f"--run {run}: not a finished run folder (needs config.yaml and final/)")
    try:
        grid = parse_grid(args.eta_grid)
    except ValueError as exc:
        raise ConfigError(f"--eta-grid {args.eta_grid!r}: {exc}") from None
    cfg = load_config(run / "config.yaml", [*args.overrides, f"output_dir={run}", "progress=false"])
    baselines = []
    for b in args.baselines:
        b = Path(b)
        if not (b / "config.yaml").is_file() or not (b / "final").is_dir():
            raise ConfigError(f"--baselines {b}: not a finished run folder (needs config.yaml and final/)")
        bcfg = load_config(b / "config.yaml", [f"output_dir={b}"])
        if bcfg.model.name != cfg.model.name:
            raise ConfigError(f"--baselines {b}: trained from model.name={bcfg.model.name!r}, the run from "
                              f"{cfg.model.name!r}: a baseline must start from the same SFT model")
        baselines.append((b, bcfg))
    return cfg, grid, baselines


ROW_FIELDS = ("name", "kind", "iteration", "policy", "eta", "beta", "folder", "per_prompt", "same_as", "reused_from")


def row(name: str, kind: str, metrics: dict, iteration=None, policy=None, eta=None, beta=None, folder=None,
        per_prompt: dict | None = None) -> dict:
    out = {"name": name, "kind": kind, "iteration": iteration, "policy": policy, "eta": eta, "beta": beta,
           "folder": folder, **metrics}
    if per_prompt is not None:
        out["per_prompt"] = per_prompt
    return out


def reused_row(src: dict, name: str, kind: str, **extra) -> dict:
    """The row of a model whose weights equal those of the already evaluated `src` row: its metrics and per-prompt
    values (evaluation is deterministic given the weights, the prompts and eval.seed), marked same_as."""
    metrics = {k: v for k, v in src.items() if k not in ROW_FIELDS}
    return {**row(name, kind, metrics, per_prompt=src.get("per_prompt"), **extra), "same_as": src["name"]}


def front_end(eta: float, start: str, end: str) -> str | None:
    """The row an eta-front point reuses: `start` at eta = 0, `end` at eta = 1 (torch.lerp is exact at its ends)."""
    return {0.0: start, 1.0: end}.get(eta)


def same_weights(a, b, names: list[str]) -> bool:
    """Whether two sources (name -> tensor) hold equal tensors under every name, read one tensor at a time."""
    import torch

    return all(torch.equal(a(n), b(n)) for n in names)


def main(argv=None) -> int:
    """0 on success; 2 for bad input; 1 for an evaluation that failed cleanly (warp-eval, launch/eval.py)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    run = Path(args.run)
    from warp_dist.config import ConfigError

    try:
        cfg, grid, baselines = check_inputs(args, run)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from warp_dist.checks import preflight
    from warp_dist.guards import RunError
    from warp_dist.runner import print_error

    try:
        preflight.check_eval(cfg)  # the run's model, reward and backend are still there, before any weights load
        rc = evaluate(args, run, cfg, grid, baselines)
        if rc == 0:
            from warp_dist.dist import shutdown

            shutdown()
        return rc
    except preflight.PreflightError as exc:
        print_error(exc, cfg.debug)
        return 2
    except RunError as exc:  # one process; with several ranks fail_rank ends the job
        print_error(exc, cfg.debug)
        return 1


class Rows:
    """The evaluation rows of a run folder, and how each is had: evaluated here, reused from an evaluated row with the
    same weights (`same_as`), or taken from a training run's evals.json (same weights and settings)."""

    def __init__(self, s, evaluator, recompute: bool):
        from warp_dist.evaluation import evalcache

        self.s, self.evaluator = s, evaluator
        self.rows: list[dict] = []
        self.results: dict[str, object] = {}  # row name -> its evaluation result
        self.setting = evalcache.settings(s.cfg, False)
        self.sft_digest = evalcache.folder_digest(s.model_path) if not recompute else None
        self.stores: dict[Path, object] = {}  # run folder -> its evals.json, read once

    def from_store(self, store_run: Path, entry: str, folder: Path | None):
        """(result, origin) of the training run's own evaluation `entry` of `folder` (None: the SFT model), when its
        evals.json holds one for exactly these weights and settings; else None. Folders are hashed only when there is
        an entry to check them against."""
        from warp_dist.evaluation import evalcache

        if self.sft_digest is None:
            return None
        if store_run not in self.stores:
            self.stores[store_run] = evalcache.Store(store_run)
        store = self.stores[store_run]
        if entry not in store.results:
            return None
        weights = self.sft_digest if folder is None else evalcache.folder_digest(folder)
        res = store.get(entry, self.setting, weights, self.sft_digest)
        return None if res is None else (res, f"{store.path} [{entry}]")

    def add(self, name, kind, state, sft_res, same_as: str | None = None, cached=None, **extra):
        """Evaluate `state`, or (same_as: the name of an evaluated row with the same weights) reuse that row, or
        (cached: the training run's own result for these weights and settings) take that."""
        from warp_dist.evaluation.metrics import fmt_metrics

        if same_as is not None:
            self.rows.append(reused_row(next(r for r in self.rows if r["name"] == same_as), name, kind, **extra))
            self.s.log(f"{name}: the same weights as {same_as} (its row reused)")
            self.results[name] = self.results[same_as]
            return self.results[name]
        if cached is not None:
            res, origin = cached
            self.s.log(f"{name}: evaluated by the training run, same weights and settings ({origin} reused)")
        else:
            res, origin = self.evaluator.evaluate(state, sft_res), None
        self.rows.append({**row(name, kind, res.metrics, per_prompt=res.per_prompt(), **extra),
                          **({"reused_from": origin} if origin else {})})
        self.s.log(fmt_metrics(name, res.metrics))
        self.results[name] = res
        return res


def evaluate_iterations(rows: Rows, run: Path, cfg, grid: list[float], with_fronts: bool, sft, final) -> None:
    """Every iter_<i>/ folder: its policies, its merge (final/'s row when it is the last merge) and, with_fronts, the
    eta front of every merge but the last."""
    from warp_dist.weights import lerp_source

    s, beta, pw = rows.s, cfg.train.beta, rows.s.weights
    it = 1
    while (run / f"iter_{it}").is_dir():
        folder = run / f"iter_{it}"
        for p in sorted(folder.glob("policy_*"), key=lambda p: int(p.name.split("_")[1])):
            rows.add(f"iter {it} {p.name}", "policy", load_weights(p, pw), sft, iteration=it,
                     policy=int(p.name.split("_")[1]), beta=beta, folder=str(p))
        if (folder / "merged").is_dir():
            merged = load_weights(folder / "merged", pw)
            last = it == cfg.train.iterations and same_weights(merged, final, pw.names)  # final/ is this merge
            rows.add(f"iter {it} merged", "merged", merged, sft, same_as="final" if last else None,
                     cached=None if last else rows.from_store(run, f"iter {it} merged", folder / "merged"),
                     iteration=it, beta=beta, folder=str(folder / "merged"))
            if with_fronts and it < cfg.train.iterations:  # the last merge is final/: its front comes below
                for eta in grid:
                    rows.add(f"iter {it} front eta={eta:g}", "front", lerp_source(s.sft.full, merged, eta), sft,
                             same_as=front_end(eta, "sft", f"iter {it} merged"), iteration=it, eta=eta, beta=beta)
            del merged
        it += 1


def evaluate(args, run: Path, cfg, grid: list[float], baselines: list) -> int:
    """Every model of the run folder (and the baselines) through the trainer's sharded evaluation; rank 0 writes
    report/eval.json, report/samples.json and, unless --no-report, the report."""
    from warp_dist import checkpoint
    from warp_dist import dist as distmod
    from warp_dist.evaluation.evaluator import Evaluator
    from warp_dist.evaluation.metrics import sample_rows
    from warp_dist.runner import fail_rank, log, quiet_libraries
    from warp_dist.training.session import Session
    from warp_dist.weights import lerp_source

    # one "policy" over all ranks: evaluation shards batches over every rank whatever the run's M was
    d = distmod.init(1, cfg.dist_timeout_s, cpu=cfg.cpu, phase_timeout_s=cfg.phase_timeout_s)
    try:
        quiet_libraries()
        s = Session(cfg, d, log=log, training=False)  # nothing is trained here: no optimizer, no DeepSpeed engine
        rows, beta, pw = Rows(s, Evaluator(s), args.recompute), cfg.train.beta, s.weights
        s.log(f"eval: {run} on {len(s.eval_prompts)} held-out prompts, eval.seed={cfg.eval.seed}, "
              f"{d.world_size} rank(s), eta grid {grid}")
        sft = rows.add("sft", "sft", s.sft.full, None, cached=rows.from_store(run, "sft", None), iteration=0, eta=0.0)
        final = load_weights(run / "final", pw)
        fin = rows.add("final", "final", final, sft, cached=rows.from_store(run, "final", run / "final"),
                       iteration=cfg.train.iterations, eta=1.0, beta=beta, folder=str(run / "final"))
        evaluate_iterations(rows, run, cfg, grid, args.iterations, sft, final)
        for eta in grid:
            rows.add(f"front eta={eta:g}", "front", lerp_source(s.sft.full, final, eta), sft,
                     same_as=front_end(eta, "sft", "final"), iteration=cfg.train.iterations, eta=eta, beta=beta)
        for b, bcfg in baselines:
            rows.add(f"{b.name} (REINFORCE beta={bcfg.train.beta:g})", "baseline", load_weights(b / "final", pw),
                     sft, cached=rows.from_store(b, "final", b / "final"), beta=bcfg.train.beta, folder=str(b))
        s.close()
        if d.is_main:
            out = run / "report"
            checkpoint.write_json(out / "samples.json",
                                  sample_rows(s.eval_prompts.texts, sft, fin, cfg.eval.num_samples_shown))
            checkpoint.write_json(out / "eval.json", rows.rows)
            log(f"wrote {out / 'eval.json'} ({len(rows.rows)} rows)")
            if not args.no_report:
                from warp_dist.evaluation.report import build_report

                build_report(run)
                log(f"report: {out / 'report.md'}  {out / 'report.html'}  {out / 'pareto.png'}  "
                    f"{out / 'training.png'}")
        d.barrier()
        return 0
    except Exception as exc:  # noqa: BLE001 - a failing rank ends every rank
        if d.active:
            fail_rank(exc, d.rank, cfg.debug)
        raise


if __name__ == "__main__":
    sys.exit(main())
