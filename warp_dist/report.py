"""The report of a run: reward-KL Pareto plot, training curves, metrics and sample tables (Markdown + HTML).

`build_report(run_dir)` reads <run>/report/eval.json (written by launch/eval.py) and <run>/metrics.jsonl and
writes <run>/report/{pareto.png, training.png, report.md, report.html}; every file goes through a temp name.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path

from .checkpoint import write_text

STYLE = {"sft": ("black", "s", "SFT"), "final": ("tab:red", "*", "WARP final"), "policy": ("tab:gray", "o", "policy"),
         "merged": ("tab:blue", "D", "SLERP merge"), "baseline": ("tab:green", "^", "REINFORCE (SFT anchor)")}


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    fronts: dict = {}
    for r in rows:
        if r["kind"] == "front":
            fronts.setdefault(r.get("iteration"), []).append(r)
    for it, pts in sorted(fronts.items(), key=lambda kv: kv[0] or 0):
        pts = sorted(pts, key=lambda r: r["eta"])
        ax.plot([p["kl_mean"] for p in pts], [p["reward_mean"] for p in pts], "-", marker=".", alpha=0.8,
                label=f"eta front (SFT -> iter {it})")
    seen = set()
    for r in rows:
        if r["kind"] not in STYLE:
            continue
        color, marker, label = STYLE[r["kind"]]
        ax.scatter(r["kl_mean"], r["reward_mean"], c=color, marker=marker, s=90 if r["kind"] == "final" else 50,
                   label=None if label in seen else label, zorder=3, edgecolors="white")
        seen.add(label)
        if r["kind"] in ("baseline", "policy", "merged"):
            tag = f"beta={r['beta']:g}" if r["kind"] == "baseline" else r["name"].replace("iter ", "i")
            ax.annotate(tag, (r["kl_mean"], r["reward_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("KL(pi || pi_SFT) per completion (nats, Monte-Carlo)")
    ax.set_ylabel("reward (mean over held-out prompts)")
    ax.set_title("Reward vs KL to the SFT model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_fig(fig, path)
    plt.close(fig)


def training_plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    steps = max((r["step"] for r in train), default=1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    curves: dict = {}
    for r in train:
        curves.setdefault((r["iteration"], r["policy"]), []).append(r)
    for (it, m), rs in sorted(curves.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        x = [(it - 1) * steps + r["step"] for r in rs]
        a1.plot(x, [r["reward_mean"] for r in rs], label=f"iter {it} policy {m}", alpha=0.8)
        a2.plot(x, [r["kl_to_ema"] for r in rs], label=f"iter {it} policy {m}", alpha=0.8)
    a1.set_title("batch reward per step")
    a2.set_title("KL to the EMA anchor per step")
    for a in (a1, a2):
        a.set_xlabel("step (iterations laid end to end)")
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    _save_fig(fig, path)
    plt.close(fig)


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def metrics_table(rows: list[dict]) -> list[list[str]]:
    head = ["model", "kind", "reward (mean ± std)", "KL to SFT", "identical to SFT", "mean length"]
    body = [[r["name"], r["kind"], f"{r['reward_mean']:+.3f} ± {r['reward_std']:.3f}", _fmt(r["kl_mean"]),
             _fmt(r["identical_fraction"], ".2f"), _fmt(r["length_mean"], ".1f")] for r in rows]
    return [head, *body]


def sample_table(samples: list[dict]) -> list[list[str]]:
    head = ["prompt", "SFT continuation", "SFT reward", "WARP continuation", "WARP reward"]
    return [head, *[[s["prompt"], s["sft"], f"{s['sft_reward']:+.3f}", s["warp"], f"{s['warp_reward']:+.3f}"]
                    for s in samples]]


def _md(table: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    out = run / "report"
    data = json.loads((out / "eval.json").read_text())
    rows, samples = data["rows"], data.get("samples", [])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "metrics.jsonl").exists() else []
    pareto_plot(rows, out / "pareto.png")
    training_plot(records, out / "training.png")
    mt, st = metrics_table(rows), sample_table(samples)
    title = f"WARP report: {run.name}"
    md = "\n\n".join([f"# {title}", "![reward vs KL](pareto.png)", "![training](training.png)", "## Metrics",
                      _md(mt), "## Samples (same prompts and seeds)", _md(st) if samples else "(none)"]) + "\n"
    write_text(out / "report.md", md)
    imgs = {n: base64.b64encode((out / n).read_bytes()).decode() for n in ("pareto.png", "training.png")}
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            + "".join(f"<img alt='{n}' src='data:image/png;base64,{b}' style='max-width:100%'>" for n, b in imgs.items())
            + "<h2>Metrics</h2>" + _html_table(mt) + "<h2>Samples (same prompts and seeds)</h2>"
            + (_html_table(st) if samples else "<p>(none)</p>") + "</body></html>\n")
    write_text(out / "report.html", page)
    return out
