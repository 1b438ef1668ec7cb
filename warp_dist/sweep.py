"""Sweep any config fields: the Cartesian grid of values, one run folder per point, one table and one plot.

    python -m warp_dist.sweep --config configs/tiny.yaml --grid train.lr=1e-5,4e-5 merge.eta=0.3,0.5 \\
        --out runs/grid [dotted.key=value ...]
    python -m warp_dist.sweep --config configs/baseline_reinforce.yaml --betas 0.01,0.1,0.3 --out runs/baselines
    accelerate launch -m warp_dist.sweep --config ... (every point uses all the ranks, one point after the other)

`--grid KEY=V1,V2,...` (several keys: every combination); a key given one value is a plain override, not a grid
axis. `--betas a,b` is `--grid train.beta=a,b`. Each point runs through the trainer's own path (`runner.run`) into
<out>/<name>/, named by its values: `beta_0.05` for one key, `lr_1e-05__eta_0.3` for two (the last part of each
key; the whole dotted key when two keys share it). Points run one after the other (each uses every rank).

Before anything runs, every point's config is validated (a bad key or value is one line naming it) and its folder
is read: a folder holding a finished run of the same config is skipped; one holding an unfinished run of the same
config (killed) is resumed from its last checkpoint (resume=true); one holding a run of another config is refused;
one holding only files of a run killed before it wrote config.yaml is started again (overwrite=true).

Then rank 0 writes <out>/sweep.json and <out>/sweep.md (every point: its field values, its final reward, KL and
judge with 95 % intervals, from its summary.json) and <out>/sweep.png (reward vs KL of every point, with error bars).
"""

from __future__ import annotations

import argparse
import itertools
import math
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
         overrides: list[str] | None = None) -> list[Point]:
    """Every point's validated config and what to do with its folder; raises ConfigError before anything runs."""
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
    load_config(config, [*overrides, *fixed])  # the preset and the plain overrides alone (their errors unprefixed)
    points, names = [], set()
    for combo in itertools.product(*(v for _, v in axes)):
        sets = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        try:
            cfg = load_config(config, [*overrides, *fixed, *sets])
        except ConfigError as exc:
            msg = str(exc)
            bad = next((s for s, k in zip(sets, keys, strict=True)
                        if msg.startswith((f"{k}=", f"{k}:")) or f"'{k}'" in msg), None)
            raise ConfigError(f"--grid {bad}: {msg}" if bad else msg) from None
        values = {k: _get(cfg, k) for k in keys}
        name = point_name(values)
        if name in names:
            raise ConfigError(f"--grid: two points would share the folder name {name!r}: give distinct values")
        names.add(name)
        cfg = load_config(config, [*overrides, *fixed, *sets, f"output_dir={Path(out) / name}"])
        points.append(Point(name, values, cfg, folder_action(cfg)))
    return points


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
def run_points(points: list[Point]) -> None:
    from . import preflight
    from .runner import log, run

    for p in points:  # every check before the first run
        if p.action != "skip":
            preflight.check(p.cfg, int(os.environ.get("WORLD_SIZE", "1")))
    for p in points:
        desc = ", ".join(f"{k}={v}" for k, v in p.values.items())
        if p.action == "skip":
            log(f"sweep: {p.folder} already holds the finished run ({desc}): skipped")
            continue
        log(f"sweep: {desc} -> {p.folder}" + {"resume": " (resuming the unfinished run)",
                                              "restart": " (restarting a run killed before it began)"}.get(p.action, ""))
        run(p.cfg)


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


def _ci(r: dict, key: str, spec: str) -> str:
    m, lo, hi = r.get(f"{key}_mean"), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
    if m is None:
        return "-"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return format(m, spec)
    return f"{format(m, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def table(rows: list[dict], keys: list[str]) -> str:
    judge = next((r["judge"] for r in rows if r.get("judge")), "none")
    head = ["point", *keys, "final reward [95% CI]", "KL to SFT [95% CI]", f"judge: {judge} [95% CI]",
            "identical to SFT", "distinct-2", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], *(fmt_value(r["fields"][k]) for k in keys), _ci(r, "reward", "+.3f"),
                 _ci(r, "kl", ".3f"), _ci(r, "judge", "+.3f"),
                 "-" if r["identical_fraction"] is None else f"{r['identical_fraction']:.2f}",
                 "-" if r["distinct_2"] is None else f"{r['distinct_2']:.3f}", r["action"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from .report import _pyplot, _save_fig, error_bars

    plt = _pyplot()
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
    _save_fig(fig, path)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="overrides: dotted.key=value, applied "
                                 "to every point")
    ap.add_argument("--config", required=True, help="preset, e.g. configs/baseline_reinforce.yaml")
    ap.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                    help="config fields and their values; every combination is one run")
    ap.add_argument("--betas", default="", help="comma-separated train.beta values: the same as --grid train.beta=...")
    ap.add_argument("--out", required=True, help="folder that receives one run folder per point, sweep.{json,md,png}")
    ap.add_argument("--skip-existing", action="store_true", help=argparse.SUPPRESS)  # finished points are always kept
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every point")
    args = ap.parse_intermixed_args(argv)
    try:
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
        grid = parse_grid(items)
        points = plan(args.config, grid, args.out, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from . import preflight
    from .runner import RunDirError, print_error
    from .topology import TopologyError

    try:
        run_points(points)
    except (TopologyError, ConfigError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (preflight.PreflightError, RunDirError) as exc:
        print_error(exc)
        return 2
    if os.environ.get("RANK", "0") == "0":
        files = write_outputs(args.out, points, dict(grid), list(args.overrides))
        label = "baselines" if args.betas and len(grid) == 1 else "points"
        print(f"{label}: " + " ".join(str(p.folder) for p in points), flush=True)
        print("sweep: " + "  ".join(str(f) for f in files), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
