"""Two finished run folders against each other: the same numbers (summary.json and metrics.jsonl with every timing
left out) and bit-identical final weights? The check that a refactor changed nothing:

    python benchmarks/compare_runs.py runs/before runs/after        # exit 0 when identical, 1 otherwise

Prints one line per part (and the first differing keys / tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMING = ("timers_s", "tokens_per_s", "tokens_per_s_per_rank")  # besides every key that starts with "time"


def without_timings(x):
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if not (k.startswith("time") or k in TIMING)}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


def compare(a: Path, b: Path) -> dict[str, list[str]]:
    """{part: what differs} for summary.json, metrics.jsonl and final/model.safetensors ([] = identical)."""
    from safetensors.torch import load_file

    out: dict[str, list[str]] = {}
    sa, sb = (without_timings(json.loads((r / "summary.json").read_text())) for r in (a, b))
    out["summary.json"] = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    ma, mb = ([without_timings(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()]
              for r in (a, b))
    out["metrics.jsonl"] = ([f"{len(ma)} vs {len(mb)} records"] if len(ma) != len(mb) else
                            [f"record {i}" for i, (x, y) in enumerate(zip(ma, mb, strict=True)) if x != y])
    wa, wb = (load_file(str(r / "final" / "model.safetensors")) for r in (a, b))
    out["final weights"] = sorted(set(wa) ^ set(wb)) + [k for k in sorted(set(wa) & set(wb))
                                                        if not wa[k].equal(wb[k])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    diffs = compare(args.a, args.b)
    for part, d in diffs.items():
        print(f"{part}: " + ("identical" if not d else f"differ ({', '.join(d[:5])}{' ...' if len(d) > 5 else ''})"))
    return 0 if not any(diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
