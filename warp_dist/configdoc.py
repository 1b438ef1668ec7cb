"""The configuration reference (docs/configuration.md), generated from the config dataclasses themselves: every field
with its type, default and the comment written beside it (a trailing comment, and the comment lines right above it).

    python -m warp_dist.configdoc > docs/configuration.md

tests/test_docs.py keeps the file equal to what this prints, and checks that every `dotted.key` the docs name is a
field. Torch-free.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from typing import get_type_hints

from .config import WarpConfig
from .stages.config import RewardModelConfig, SftConfig

FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment lines directly above the field's line and the comment on it, joined."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line number -> comment text (without '#')
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out, above = {}, []
    for n, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            above = []
        elif stripped.startswith("#"):
            above.append(comments.get(n, ""))
        else:
            m = FIELD.match(line)
            if m and not stripped.startswith(("def ", "@")):
                out[m.group(1)] = " ".join([*above, *([comments[n]] if n in comments else [])]).strip()
            above = []
    return out


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every leaf field of `cls`, in definition order, sections after leaves."""
    hints, docs, defaults = get_type_hints(cls), field_comments(cls), cls()
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sections += rows(t, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, t.__name__, repr(getattr(defaults, f.name)), docs.get(f.name, "")))
    return leaves + sections


def keys(cls) -> set[str]:
    return {r[0] for r in rows(cls)}


def table(cls) -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in rows(cls):
        text = doc.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{key}` | {typ} | `{default}` | {text} |")
    return "\n".join(lines)


def markdown() -> str:
    return "\n".join([
        "# Configuration reference",
        "",
        "Generated from `warp_dist/config.py` and `warp_dist/stages/config.py` by `python -m warp_dist.configdoc` "
        "(a test keeps this file equal to its output). A preset YAML sets any of these fields; `dotted.key=value` "
        "after the preset on the command line overrides one. An unknown key or a value out of range stops the "
        "launch with one line naming the field.",
        "",
        "## WARP (`launch/warp.py`, `configs/warp/*.yaml`)",
        "",
        table(WarpConfig),
        "",
        "## The SFT stage (`launch/sft.py`, `configs/stages/sft.yaml`)",
        "",
        table(SftConfig),
        "",
        "## The reward-model stage (`launch/reward_model.py`, `configs/stages/reward_model.yaml`)",
        "",
        table(RewardModelConfig),
        "",
    ])


if __name__ == "__main__":
    print(markdown(), end="")
