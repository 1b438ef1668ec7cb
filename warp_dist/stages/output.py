"""A stage's output folder: one result per folder, keyed by the resolved config, written atomically.

    decide(cfg, stage)        -> "new" | "skip" | "overwrite", or StageError (read-only, torch-free)
    begin(output_dir)         -> a fresh temp folder next to output_dir (a killed run's leftovers removed first)
    publish(tmp, output_dir)  -> tmp renamed to output_dir (an old result is replaced only now)

A complete result is output_dir/summary.json with {"stage", "complete": true, "config_hash"} (written last, inside
the temp folder) next to config.yaml and the model files. Same stage and hash: "skip" (nothing to do; overwrite=true
trains again). Another config's result: refused unless overwrite=true. Anything else in a non-empty folder (a WARP
run, your files): refused, nothing removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .config import STAGES, config_hash, flat, hashed_fields

SUMMARY = "summary.json"
CONFIG = "config.yaml"


class StageError(ValueError):
    """Bad input found before or while preparing a stage (output_dir, model, data, ranks); one line."""


def read_summary(folder: str | Path) -> dict | None:
    """summary.json of a complete stage result in `folder`, else None."""
    p = Path(folder) / SUMMARY
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(s, dict) and s.get("complete") is True and s.get("stage") in STAGES and "config_hash" in s:
        return s
    return None


def first_difference(folder: Path, cfg) -> str:
    """`key=<stored> here, <new> now` for the first result-defining field that differs ("" if unknown)."""
    try:
        stored = flat(yaml.safe_load((folder / CONFIG).read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    for key, value in hashed_fields(cfg).items():
        if stored.get(key) != value:
            return f" ({key}={stored.get(key)!r} there, {value!r} now)"
    return ""


def decide(cfg, stage: str) -> str:
    """May `stage` write cfg.output_dir? "new" (nothing there), "skip" (the same config's complete result is there),
    "overwrite" (a stage result is there and overwrite=true); otherwise StageError, with nothing touched."""
    out = Path(cfg.output_dir).expanduser()
    where = f"output_dir={cfg.output_dir!r}"
    if out.exists() and not out.is_dir():
        raise StageError(f"{where} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    summary = read_summary(out)
    if summary is None:
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise StageError(f"{where} is not empty and holds no complete warp_dist stage result ({shown}, ...): "
                         "nothing was removed; choose another output_dir")
    if cfg.overwrite:
        return "overwrite"
    if summary["stage"] == stage and summary["config_hash"] == config_hash(cfg):
        return "skip"
    what = "another config" if summary["stage"] == stage else f"the {summary['stage']} stage"
    diff = first_difference(out, cfg) if summary["stage"] == stage else ""
    raise StageError(f"{where} holds a {summary['stage']} result of {what}{diff}: add overwrite=true to replace it, "
                     "or choose another output_dir")


def _leftovers(out: Path) -> list[Path]:
    """What a killed write of `out` can leave next to it: temp folders and the aside copy of the old result."""
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp") or p.name == f".{out.name}.old"]


def begin(output_dir: str | Path) -> Path:
    """Rank 0: remove leftovers of a killed write of output_dir, then make a fresh temp folder next to it."""
    from ..checkpoint import tmp_dir_for

    out = Path(output_dir).expanduser().absolute()
    for p in _leftovers(out):
        shutil.rmtree(p, ignore_errors=True)
    tmp = tmp_dir_for(out)
    tmp.chmod(0o755)  # mkdtemp makes 0700; results are for everyone to read
    return tmp


def publish(tmp: Path, output_dir: str | Path) -> Path:
    """Rename the complete temp folder to output_dir (the old result, if any, is removed after the rename)."""
    from ..checkpoint import replace_dir

    out = Path(output_dir).expanduser().absolute()
    replace_dir(Path(tmp), out)
    return out


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
