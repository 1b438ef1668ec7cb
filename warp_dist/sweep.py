"""Sweep any config fields: the Cartesian grid of values, one run folder per point, one table and one plot.

    python -m warp_dist.sweep --config configs/warp/tiny.yaml --grid train.lr=1e-5,4e-5 merge.eta=0.3,0.5 \\
        --out runs/grid [dotted.key=value ...]
    python -m warp_dist.sweep --config configs/warp/baseline_reinforce.yaml --betas 0.01,0.1,0.3 --out runs/baselines
    accelerate launch -m warp_dist.sweep --config ... (every point uses all the ranks, one point after the other)
    python -m warp_dist.sweep --config ... --parallel 2 (two points at a time, each on half the cores / its own GPU)

`--grid KEY=V1,V2,...` (several keys: every combination); a key given one value is a plain override, not a grid
axis. `--betas a,b` is `--grid train.beta=a,b`. Each point runs through the trainer's own path (`runner.run`) into
<out>/<name>/, named by its values: `beta_0.05` for one key, `lr_1e-05__eta_0.3` for two (the last part of each
key; the whole dotted key when two keys share it). Points run one after the other (each uses every rank), or with
`--parallel N` N at a time: each point its own single-rank process (`--only NAME`) pinned to 1/N of the cores
(threads = its share) and, where CUDA devices are visible, given one device; its output goes to <out>/logs/<name>.log.
The first point that fails stops the others (their folders resume on the next run) and the sweep exits non-zero.

Before anything runs, every point's config is validated (a bad key or value is one line naming it) and its folder
is read: a folder holding a finished run of the same config is skipped; one holding an unfinished run of the same
config (killed) is resumed from its last checkpoint (resume=true); one holding a run of another config is refused;
one holding only files of a run killed before it wrote config.yaml is started again (overwrite=true). Then every
point still to run passes the preflight checks and the memory plan (side by side on CPU: MemAvailable / N each).

Then rank 0 writes <out>/sweep.json and <out>/sweep.md (every point: its field values, its final reward, KL and
judge with 95 % intervals, from its summary.json) and <out>/sweep.png (reward vs KL of every point, with error bars).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, WarpConfig, config_from_dict, load_config, parse_override

FIXED_KEYS = ("output_dir", "resume", "overwrite")  # the sweep sets these per point


@dataclass
class Point:
    name: str
    values: dict[str, Any]  # grid key -> the value this point gives it (as the config holds it)
    cfg: WarpConfig
    action: str  # run | resume | restart | skip

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)


# ------------------------------------------------------------------------------------------------ the grid
def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """['train.lr=1e-5,4e-5', ...] -> [('train.lr', ['1e-5', '4e-5']), ...] (raw texts; ConfigError, one line)."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: must look like dotted.key=v1,v2 (e.g. train.lr=1e-5,4e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        vals = [v.strip() for v in raw.split(",")]
        if not key or not vals or any(v == "" for v in vals):
            raise ConfigError(f"--grid {item!r}: give a key and comma-separated values (no empty value)")
        if key in FIXED_KEYS:
            raise ConfigError(f"--grid {key}: the sweep sets {key} itself (one folder per point under --out)")
        if key in (k for k, _ in out):
            raise ConfigError(f"--grid {key}: given twice")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--grid {item!r}: values repeat")
        out.append((key, vals))
    return out


def _get(cfg: WarpConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-") or "empty"


def short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key (dots as '-') where two keys share a last part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last, strict=True)}


def point_name(values: dict[str, Any]) -> str:
    short = short_names(list(values))
    return "__".join(f"{short[k]}_{fmt_value(v)}" for k, v in values.items())


def plan(config: str | Path, grid: list[tuple[str, list[str]]], out: str | Path,
         overrides: list[str] | None = None, only: str | None = None) -> list[Point]:
    """Every point's validated config and what to do with its folder; raises ConfigError before anything runs.
    `only`: validate every point but return (and read the folder of) the point of that name alone."""
    overrides = list(overrides or [])
    axes = [(k, v) for k, v in grid if len(v) > 1] or grid  # a key with one value is a plain override ...
    fixed = [f"{k}={v[0]}" for k, v in grid if (k, v) not in axes]  # ... unless no key has more than one
    if not axes:
        raise ConfigError("--grid: give at least one key=v1,v2")
    keys = [k for k, _ in axes]
    for ov in overrides:
        k, _ = parse_override(ov)
        if k in keys:
            raise ConfigError(f"{k} is both a --grid key and an override: give it in one place")
        if k in FIXED_KEYS:
            raise ConfigError(f"override {ov!r}: the sweep sets {k} itself (one folder per point under --out)")
    try:  # the preset and the plain overrides alone (their errors unprefixed) ...
        load_config(config, [*overrides, *fixed])
    except ConfigError as exc:  # ... unless the error is about a grid key, which every point sets (checked below)
        if not any(_names_key(str(exc), k) for k in keys):
            raise
    points, names = [], set()
    for combo in itertools.product(*(v for _, v in axes)):
        sets = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        try:
            cfg = load_config(config, [*overrides, *fixed, *sets])
        except ConfigError as exc:
            msg = str(exc)
            bad = next((s for s, k in zip(sets, keys, strict=True) if _names_key(msg, k)), None)
            raise ConfigError(f"--grid {bad}: {msg}" if bad else msg) from None
        values = {k: _get(cfg, k) for k in keys}
        name = point_name(values)
        if name in names:
            raise ConfigError(f"--grid: two points would share the folder name {name!r}: give distinct values")
        names.add(name)
        if only is not None and name != only:
            continue
        cfg = load_config(config, [*overrides, *fixed, *sets, f"output_dir={Path(out) / name}"])
        points.append(Point(name, values, cfg, folder_action(cfg)))
    if only is not None and not points:
        raise ConfigError(f"--only {only!r}: no point of the grid has that name (allowed: {', '.join(sorted(names))})")
    return points


def _names_key(msg: str, key: str) -> bool:
    return msg.startswith((f"{key}=", f"{key}:")) or f"'{key}'" in msg


def folder_action(cfg: WarpConfig) -> str:
    """What a point's folder asks for: run (empty) | skip (finished, same config) | resume (unfinished, same config)
    | restart (killed before config.yaml); ConfigError when it holds a run of another config."""
    import yaml

    from .runner import run_entries, stored_config_difference

    folder = Path(cfg.output_dir)
    entries = run_entries(folder)
    if not entries:
        return "run"
    stored_path = folder / "config.yaml"
    if not stored_path.is_file():
        cfg.overwrite = True
        return "restart"
    try:
        stored = config_from_dict(yaml.safe_load(stored_path.read_text()) or {})
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as exc:
        raise ConfigError(f"sweep: {stored_path} cannot be read as a warp_dist config ({exc}); move the folder "
                          "away or choose another --out") from None
    diff = stored_config_difference(stored, cfg)
    if diff is not None:
        key, old, new = diff
        raise ConfigError(f"sweep: {folder} holds a run with {key}={old!r}, this point has {key}={new!r}: move the "
                          "folder away or choose another --out")
    if (folder / "summary.json").is_file() and not (folder / "state").exists():
        return "skip"
    cfg.resume = True
    return "resume"


# ------------------------------------------------------------------------------------------------ running
def check_points(points: list[Point], world_size: int, side_by_side: int = 1) -> None:
    """Every check before the first run: preflight and the memory plan of each point still to run. Side by side,
    a CPU point gets MemAvailable / side_by_side (each point on its own GPU keeps that GPU's memory)."""
    from .checks import plan, preflight

    for p in points:
        if p.action == "skip":
            continue
        preflight.check(p.cfg, world_size)
        cap = None
        if side_by_side > 1 and (p.cfg.cpu or not _cuda_count()):
            cap = plan.capacity_bytes("cpu", side_by_side)
        plan.check(p.cfg, world_size, capacity=cap)


def run_points(points: list[Point]) -> None:
    """One point after the other in this process (every rank of the launch runs every point)."""
    from .runner import log, run

    check_points(points, int(os.environ.get("WORLD_SIZE", "1")))
    for p in points:
        if p.action == "skip":
            _log_skip(p)
            continue
        log(f"sweep: {_desc(p)} -> {p.folder}" + {"resume": " (resuming the unfinished run)",
                                                 "restart": " (restarting a run killed before it began)"
                                                 }.get(p.action, ""))
        run(p.cfg)


def _log_skip(p) -> None:
    from .runner import log

    log(f"sweep: {p.folder} already holds the finished run ({_desc(p)}): skipped")


def _desc(p: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.values.items())


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@dataclass
class Slot:
    cores: list[int]  # the CPU cores a point side by side runs on (its affinity; its thread count = len(cores))
    gpu: int | None  # the CUDA device it sees alone (CUDA_VISIBLE_DEVICES), None on CPU

    def env(self) -> dict[str, str]:
        n = str(len(self.cores))
        env = {"WARP_DIST_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env


def slots(parallel: int, cores: list[int], gpus: list[int]) -> list[Slot]:
    """Split the machine into `parallel` equal shares: consecutive runs of the cores and, with CUDA devices, one
    device each. ConfigError (one line) when the machine has fewer cores (or devices) than points side by side."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: allowed 1 (one point after the other) up to {len(cores)} "
                          "(this machine's cores)")
    if parallel > len(cores):
        raise ConfigError(f"--parallel {parallel}: this process may use {len(cores)} CPU core(s), allowed "
                          f"1..{len(cores)} (each point side by side needs at least one core)")
    if gpus and parallel > len(gpus):
        raise ConfigError(f"--parallel {parallel}: {len(gpus)} CUDA device(s) visible, allowed 1..{len(gpus)} "
                          "(each point side by side gets its own device)")
    per = len(cores) // parallel
    return [Slot(cores[i * per:(i + 1) * per], gpus[i] if gpus else None) for i in range(parallel)]


def machine_slots(parallel: int, cfg: WarpConfig) -> list[Slot]:
    cores = sorted(os.sched_getaffinity(0))
    gpus = [] if cfg.cpu else list(range(_cuda_count()))
    return slots(parallel, cores, gpus)


def run_side_by_side(points: list[Point], child_args: list[str], parallel: int, logs: Path,
                     poll_s: float = 0.5, grace_s: float = 15.0) -> int:
    """Run the points `parallel` at a time, each as its own process (`python -m warp_dist.sweep ... --only NAME`)
    on its own share of the machine (`slots`), its output in logs/<name>.log. The first point that fails stops the
    others (SIGTERM to their process groups, SIGKILL after `grace_s`); their folders are resumed by the next run of
    the same sweep. Returns 0, or the failing point's exit code (1 when it died by a signal)."""
    import signal
    import subprocess
    import time

    from .runner import log

    todo = [p for p in points if p.action != "skip"]
    for p in points:
        if p.action == "skip":
            _log_skip(p)
    if not todo:
        return 0
    free = machine_slots(min(parallel, len(todo)), todo[0].cfg)
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[subprocess.Popen, tuple[Point, Slot, float, Path]] = {}

    def stop_all() -> None:
        for proc in running:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        while todo or running:
            while todo and free:
                p, slot = todo.pop(0), free.pop(0)
                path = logs / f"{p.name}.log"
                env = {**os.environ, **slot.env()}
                cores = set(slot.cores)
                with open(path, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-m", "warp_dist.sweep", *child_args, "--only", p.name],
                                            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                            preexec_fn=lambda c=cores: os.sched_setaffinity(0, c))
                running[proc] = (p, slot, time.monotonic(), path)
                where = f"cores {slot.cores}" + (f", cuda:{slot.gpu}" if slot.gpu is not None else "")
                log(f"sweep: {_desc(p)} -> {p.folder} on {where} (log {path})"
                    + {"resume": " (resuming)", "restart": " (restarting)"}.get(p.action, ""))
            time.sleep(poll_s)
            for proc in [q for q in running if q.poll() is not None]:
                p, slot, t0, path = running.pop(proc)
                if proc.returncode != 0:
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    sys.stderr.write("\n".join(tail) + "\n")
                    log(f"sweep: {_desc(p)} FAILED (exit code {proc.returncode}; log {path}): stopping the other "
                        f"points; run the same sweep again to resume them")
                    stop_all()
                    return proc.returncode if proc.returncode > 0 else 1
                log(f"sweep: {_desc(p)} finished in {time.monotonic() - t0:.0f} s")
                free.append(slot)
    finally:
        stop_all()  # an interrupted sweep (Ctrl-C, SIGTERM) leaves no point running
        signal.signal(signal.SIGTERM, previous)
    return 0


# ------------------------------------------------------------------------------------------------ table and plot
POINT_KEYS = ("reward_mean", "reward_ci_low", "reward_ci_high", "reward_std", "kl_mean", "kl_ci_low", "kl_ci_high",
              "judge", "judge_mean", "judge_ci_low", "judge_ci_high", "identical_fraction", "length_mean",
              "distinct_1", "distinct_2", "num_prompts")


def collect(points: list[Point]) -> list[dict]:
    import json

    rows = []
    for p in points:
        summary = json.loads((p.folder / "summary.json").read_text())
        final = summary["final"]
        rows.append({"name": p.name, "folder": str(p.folder), "fields": p.values,
                     "action": {"run": "trained", "resume": "resumed", "restart": "trained",
                                "skip": "skipped (finished)"}[p.action],
                     **{k: final.get(k) for k in POINT_KEYS},
                     "sft_reward_mean": summary["sft"]["reward_mean"],
                     "final_vs_sft": summary.get("final_vs_sft")})
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    from .evaluation.stats import with_interval

    judge = next((r["judge"] for r in rows if r.get("judge")), "none")
    head = ["point", *keys, "final reward [95% CI]", "KL to SFT [95% CI]", f"judge: {judge} [95% CI]",
            "identical to SFT", "distinct-2", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], *(fmt_value(r["fields"][k]) for k in keys), with_interval(r, "reward", "+.3f"),
                 with_interval(r, "kl", ".3f"), with_interval(r, "judge", "+.3f"),
                 "-" if r["identical_fraction"] is None else f"{r['identical_fraction']:.2f}",
                 "-" if r["distinct_2"] is None else f"{r['distinct_2']:.3f}", r["action"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from .evaluation.report import error_bars, pyplot, save_fig

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        c = colors[i % len(colors)]
        error_bars(ax, r, c)
        ax.scatter(r["kl_mean"], r["reward_mean"], color=c, s=50, zorder=3, edgecolors="white", linewidths=0.6)
        ax.annotate(r["name"], (r["kl_mean"], r["reward_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if rows:
        ax.axhline(rows[0]["sft_reward_mean"], color="black", ls=":", lw=0.8, label="SFT reward (KL 0)")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("KL(pi || pi_SFT) of the final model (nats per completion)")
    ax.set_ylabel("final reward (mean over held-out prompts)")
    ax.set_title("Sweep: reward vs KL of every point (error bars: 95 % intervals over prompts)", fontsize=10)
    ax.grid(alpha=0.3)
    save_fig(fig, path)
    plt.close(fig)


def write_outputs(out: str | Path, points: list[Point], grid_text: dict[str, list[str]], overrides: list[str]
                  ) -> list[Path]:
    from .checkpoint import write_json, write_text

    out = Path(out)
    rows = collect(points)
    keys = list(points[0].values) if points else []
    write_json(out / "sweep.json", {"grid": grid_text, "overrides": overrides, "points": rows})
    write_text(out / "sweep.md", "# Sweep\n\n" + table(rows, keys) + "\n\nFinal model of every point, evaluated by "
               "the trainer on the held-out prompts; [95% CI]: Student-t interval of the mean over prompts.\n")
    plot(rows, out / "sweep.png")
    return [out / "sweep.json", out / "sweep.md", out / "sweep.png"]


# ------------------------------------------------------------------------------------------------ compatibility
def beta_folder(out: str | Path, beta: float) -> Path:
    return Path(out) / f"beta_{beta:g}"


def plan_sweep(config: str | Path, betas: list[float], out: str | Path, overrides: list[str] | None = None
               ) -> list[WarpConfig]:
    """One validated config per beta (the `--betas` form; raises ConfigError before anything runs)."""
    if not betas:
        raise ConfigError("--betas: give at least one value")
    return [p.cfg for p in plan(config, [("train.beta", [repr(float(b)) for b in betas])], out, overrides)]


def grid_items(args) -> list[str]:
    """--grid KEY=V1,V2 ... with --betas a,b as train.beta's values first (ConfigError, one line, when wrong)."""
    items = list(args.grid)
    if args.betas:
        if any(i.split("=", 1)[0].strip() == "train.beta" for i in items):
            raise ConfigError("--betas and --grid train.beta: give train.beta in one place")
        betas = [b.strip() for b in args.betas.split(",") if b.strip()]
        if not betas:
            raise ConfigError("--betas: give at least one value")
        for b in betas:
            try:
                float(b)
            except ValueError:
                raise ConfigError(f"--betas {args.betas!r}: {b!r} is not a number") from None
        items.insert(0, "train.beta=" + ",".join(betas))
    if not items:
        raise ConfigError("give --grid KEY=V1,V2 ... or --betas a,b")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="overrides: dotted.key=value, applied "
                                 "to every point")
    ap.add_argument("--config", required=True, help="preset, e.g. configs/warp/baseline_reinforce.yaml")
    ap.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                    help="config fields and their values; every combination is one run")
    ap.add_argument("--betas", default="", help="comma-separated train.beta values: the same as --grid train.beta=...")
    ap.add_argument("--out", required=True, help="folder that receives one run folder per point, sweep.{json,md,png}")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="run N points side by side, each as its own process on 1/N of the cores (and its own CUDA "
                    "device where there are any); default 1: one after the other")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a side-by-side child: run this point alone
    ap.add_argument("--skip-existing", action="store_true", help=argparse.SUPPRESS)  # finished points are always kept
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every point")
    args = ap.parse_intermixed_args(argv)
    try:
        items = grid_items(args)
        grid = parse_grid(items)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.parallel != 1 and args.only:
            raise ConfigError(f"--parallel {args.parallel} with --only: --only runs one point of a side-by-side sweep "
                              "(the sweep passes it to its own processes); give one of the two")
        if args.parallel != 1 and world > 1:
            raise ConfigError(f"--parallel {args.parallel}: side by side, the sweep starts its own processes; run it "
                              f"with python -m warp_dist.sweep, not under a launcher of {world} ranks")
        points = plan(args.config, grid, args.out, args.overrides, only=args.only)
        if args.parallel != 1:
            machine_slots(args.parallel, points[0].cfg)  # more than the machine has: one line, now
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .checks import plan as memory_plan
    from .checks import preflight
    from .guards import RunError
    from .preempt import EXIT_PREEMPTED, Preempted
    from .runner import RunDirError, print_error
    from .topology import TopologyError

    try:
        if args.parallel == 1:
            run_points(points)
        else:
            check_points(points, 1, args.parallel)
            child = ["--config", str(args.config), "--grid", *items, "--out", str(args.out), *args.overrides]
            rc = run_side_by_side(points, child, args.parallel, Path(args.out) / "logs")
            if rc:
                return rc
    except (TopologyError, ConfigError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (preflight.PreflightError, memory_plan.PlanError, RunDirError) as exc:
        print_error(exc)
        return 2
    except RunError as exc:  # a run that failed cleanly (e.g. a failing reward callable): one line, exit 1
        print_error(exc)
        return 1
    except Preempted as exc:  # a signal: the point in progress checkpointed; rerunning the sweep resumes it
        if os.environ.get("RANK", "0") == "0":
            print(f"[stop] {exc}; rerun the same sweep command to continue", flush=True)
        return EXIT_PREEMPTED
    if "torch.distributed" in sys.modules:  # points ran in this process (side by side, only in the children)
        from .dist import shutdown

        shutdown()  # every point done on every rank
    if args.only:
        return 0
    if os.environ.get("RANK", "0") == "0":
        files = write_outputs(args.out, points, dict(grid), list(args.overrides))
        label = "baselines" if args.betas and len(grid) == 1 else "points"
        print(f"{label}: " + " ".join(str(p.folder) for p in points), flush=True)
        print("sweep: " + "  ".join(str(f) for f in files), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
