"""The report of a run: reward-KL Pareto plot, training curves, metrics and sample tables (Markdown + HTML).

`build_report(run_dir)` reads <run>/report/eval.json (rows written by launch/eval.py), <run>/report/samples.json
(or the samples of <run>/summary.json), <run>/metrics.jsonl, <run>/config.yaml and <run>/summary.json, and writes
<run>/report/{pareto.png, training.png, report.md, report.html, paired.json}; every file goes through a temp name
and a rename. report.html is self-contained (the PNGs are embedded as base64 data URIs).

Statistics (warp_dist.evaluation.stats): the metrics table gives each mean with its 95 % Student-t interval over prompts; the
paired table gives differences between models evaluated on the same prompts and seeds (WARP final - SFT, every
merge - each of its members, and for each baseline the eta-front point at matched KL - that baseline, i.e. the
front point whose KL is nearest the baseline's) with paired bootstrap 95 % intervals (2000 resamples of prompts,
seed 0) and whether each interval excludes zero; the Pareto plot has reward and KL intervals as error bars. Paired
differences need the rows' per-prompt values (eval.json written by this version of launch/eval.py).

    python -m warp_dist.evaluation.report runs/demo
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from ..checkpoint import write_json, write_text
from . import stats

# kind -> (colour, marker, legend label)
STYLE = {"sft": ("black", "s", "SFT"), "final": ("tab:red", "*", "WARP final"), "policy": ("tab:gray", "o", "policy"),
         "merged": ("tab:blue", "D", "SLERP merge"), "baseline": ("tab:green", "^", "REINFORCE baseline")}
PNGS = ("pareto.png", "training.png")


# ------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def load_rows(out: Path) -> list[dict]:
    data = _read_json(out / "eval.json")
    if data is None:
        raise FileNotFoundError(f"{out / 'eval.json'}: run `python launch/eval.py --run {out.parent}` first")
    return data["rows"] if isinstance(data, dict) else data  # older eval.json: {"rows": [...], "samples": [...]}


def load_samples(run: Path) -> list[dict]:
    """SFT vs final continuations: eval.py's samples.json, else the trainer's summary.json samples."""
    s = _read_json(run / "report" / "samples.json")
    if s is None:
        old = _read_json(run / "report" / "eval.json")
        s = old.get("samples") if isinstance(old, dict) else None
    if s is None:
        s = (_read_json(run / "summary.json") or {}).get("samples", [])
    return s


def load_records(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def load_config_dict(run: Path) -> dict:
    p = run / "config.yaml"
    if not p.is_file():
        return {}
    import yaml

    return yaml.safe_load(p.read_text()) or {}


# ------------------------------------------------------------------------------------------------ plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _err(r: dict, key: str) -> list[list[float]] | None:
    """[[below], [above]] of the mean `key`_mean's 95 % interval (matplotlib's asymmetric errors), None without one."""
    lo, hi, m = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"), r.get(f"{key}_mean")
    if lo is None or hi is None or m is None or not all(math.isfinite(v) for v in (lo, hi, m)):
        return None
    return [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]


def error_bars(ax, r: dict, color, alpha: float = 0.45) -> None:
    """Reward (vertical) and KL (horizontal) 95 % intervals of a row, when it has them."""
    xe, ye = _err(r, "kl"), _err(r, "reward")
    if xe is None and ye is None:
        return
    ax.errorbar(r["kl_mean"], r["reward_mean"], xerr=xe, yerr=ye, fmt="none", ecolor=color, elinewidth=0.8,
                capsize=2, alpha=alpha, zorder=1)


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Reward vs KL(pi || pi_SFT): eta fronts as lines, one marker per model, baselines as a dashed front; every
    point with its reward and KL 95 % intervals as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    fronts: dict = {}
    for r in rows:
        if r["kind"] == "front":
            fronts.setdefault(r.get("iteration") or 0, []).append(r)
    last = max(fronts, default=None)
    for it, pts in sorted(fronts.items()):
        pts = sorted(pts, key=lambda r: r["eta"])
        main = it == last
        ax.plot([p["kl_mean"] for p in pts], [p["reward_mean"] for p in pts], "-" if main else ":", marker=".",
                color="tab:red" if main else None, alpha=0.9 if main else 0.6, zorder=2,
                label="eta front: (1-eta) SFT + eta final" if main else f"eta front: SFT -> iter {it} merge")
        for p in pts:
            error_bars(ax, p, "tab:red" if main else "gray", 0.35)
        if main:
            for p in pts:
                ax.annotate(f"{p['eta']:g}", (p["kl_mean"], p["reward_mean"]), fontsize=6, color="tab:red",
                            xytext=(0, -9), textcoords="offset points", ha="center")
    base = sorted((r for r in rows if r["kind"] == "baseline"), key=lambda r: r["kl_mean"])
    if len(base) > 1:
        ax.plot([r["kl_mean"] for r in base], [r["reward_mean"] for r in base], "--", color="tab:green", alpha=0.6,
                zorder=2)
    seen = set()
    for r in rows:
        if r["kind"] not in STYLE:
            continue
        color, marker, label = STYLE[r["kind"]]
        error_bars(ax, r, color)
        ax.scatter(r["kl_mean"], r["reward_mean"], c=color, marker=marker, s=140 if r["kind"] == "final" else 55,
                   label=None if label in seen else label, zorder=5 if r["kind"] == "final" else 3,
                   edgecolors="white", linewidths=0.6)
        seen.add(label)
        if r["kind"] == "baseline":
            tag = f"beta={r['beta']:g}"
        elif r["kind"] == "policy":
            tag = f"i{r['iteration']} p{r['policy']}"
        elif r["kind"] == "merged":
            tag = f"i{r['iteration']} merge"
        else:
            continue
        ax.annotate(tag, (r["kl_mean"], r["reward_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("KL(pi || pi_SFT) per completion (nats, Monte-Carlo over held-out prompts)")
    ax.set_ylabel("reward (mean over held-out prompts)")
    ax.set_title("Reward vs KL to the SFT model (higher and further left is better)\nerror bars: 95 % intervals "
                 "over prompts", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_fig(fig, path)
    plt.close(fig)


def training_curves(records: list[dict]) -> dict[tuple[int, int], list[tuple[int, float, float]]]:
    """(iteration, policy) -> [(global step, reward, KL to the anchor)], averaged over the ranks of a policy group.

    Global step = (iteration - 1) * T + step, so the iterations are laid end to end.
    """
    train = [r for r in records if r.get("kind") == "train"]
    T = max((r["step"] for r in train), default=1)
    acc: dict = {}
    for r in train:
        a = acc.setdefault((r["iteration"], r["policy"]), {}).setdefault(r["step"], [0.0, 0.0, 0])
        a[0] += r["reward_mean"]
        a[1] += r["kl_to_ema"]
        a[2] += 1
    return {key: [((key[0] - 1) * T + s, a[0] / a[2], a[1] / a[2]) for s, a in sorted(steps.items())]
            for key, steps in sorted(acc.items())}


def training_plot(records: list[dict], path: Path, anchor: str = "ema") -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = training_curves(records)
    for (it, m), pts in curves.items():
        x = [p[0] for p in pts]
        kw = dict(label=f"iter {it} policy {m}", alpha=0.85, marker="." if len(pts) < 30 else None)
        a1.plot(x, [p[1] for p in pts], **kw)
        a2.plot(x, [p[2] for p in pts], **kw)
    merges = sorted({it for it, _ in curves})[1:]
    T = max((r["step"] for r in records if r.get("kind") == "train"), default=0)
    for a in (a1, a2):
        for it in merges:  # where a merge restarted the policies from the new theta_init
            a.axvline((it - 1) * T + 0.5, color="gray", ls=":", lw=0.8)
        a.set_xlabel("global step (iterations laid end to end)")
        a.grid(alpha=0.3)
    a1.set_title("batch reward per step")
    a2.set_title("KL to the SFT anchor per step" if anchor == "sft" else "KL to the EMA anchor per step")
    if curves:
        a1.legend(fontsize=7)
    else:
        a1.text(0.5, 0.5, "no training records in metrics.jsonl", ha="center", transform=a1.transAxes)
    save_fig(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def judge_name(rows: list[dict]) -> str:
    return next((r["judge"] for r in rows if r.get("judge")), "none")


def part_names(rows: list[dict]) -> list[str]:
    """What the reward measured besides its value, in every row: `accuracy` (a verifiable reward), `reward_<name>`
    (the terms of a sum)."""
    names = [k[:-len("_mean")] for k in (rows[0] if rows else {}) if k.endswith("_mean") and
             (k == "accuracy_mean" or (k.startswith("reward_") and k != "reward_mean"))]
    return [n for n in names if all(f"{n}_mean" in r for r in rows)]


def metrics_table(rows: list[dict]) -> list[list[str]]:
    parts = part_names(rows)
    head = ["model", "kind", "eta", "beta", "reward [95% CI]", *[f"{p} [95% CI]" for p in parts], "reward std",
            "KL to SFT [95% CI]", f"judge: {judge_name(rows)} [95% CI]", "identical to SFT", "mean length",
            "distinct-1", "distinct-2"]
    body = [[r["name"] + (f" (= {r['same_as']})" if r.get("same_as") else ""), r["kind"], _fmt(r.get("eta"), "g"),
             _fmt(r.get("beta"), "g"), stats.with_interval(r, "reward"),
             *[stats.with_interval(r, p, ".3f") for p in parts],
             _fmt(r["reward_std"]), stats.with_interval(r, "kl", ".3f"), stats.with_interval(r, "judge"),
             _fmt(r["identical_fraction"], ".2f"), _fmt(r["length_mean"], ".1f"), _fmt(r.get("distinct_1")),
             _fmt(r.get("distinct_2"))] for r in rows]
    return [head, *body]


# ------------------------------------------------------------------------------------------------ paired differences
def _pairs(rows: list[dict]) -> list[tuple[str, dict, dict, str]]:
    """(label, a, b, note): the comparisons of the paired table, a - b."""
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    out = []
    sft, final = by_kind.get("sft", [None])[0], by_kind.get("final", [None])[0]
    if sft is not None and final is not None:
        out.append(("WARP final - SFT", final, sft, ""))
    for mg in sorted(by_kind.get("merged", []), key=lambda r: r["iteration"]):
        for p in sorted((p for p in by_kind.get("policy", []) if p["iteration"] == mg["iteration"]),
                        key=lambda r: r["policy"]):
            out.append((f"{mg['name']} - {p['name']}", mg, p, "merge vs member"))
    fronts = by_kind.get("front", [])
    if fronts:
        last = max(r.get("iteration") or 0 for r in fronts)
        front = [r for r in fronts if (r.get("iteration") or 0) == last]
        for b in by_kind.get("baseline", []):
            f = front[stats.nearest([r["kl_mean"] for r in front], b["kl_mean"])]
            out.append((f"{f['name']} - {b['name']}", f, b,
                        f"matched KL: the front point nearest the baseline's KL ({f['kl_mean']:.3f} vs "
                        f"{b['kl_mean']:.3f})"))
    return out


def paired_differences(rows: list[dict], resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED
                       ) -> list[dict]:
    """One entry per (comparison, metric) whose two rows both carry per-prompt values of that metric."""
    out = []
    for label, a, b, note in _pairs(rows):
        diffs = stats.paired_differences(a.get("per_prompt") or {}, b.get("per_prompt") or {}, resamples, seed)
        for metric, res in diffs.items():
            out.append({"comparison": label, "a": a["name"], "b": b["name"], "metric": metric, "note": note, **res})
    return out


def paired_table(diffs: list[dict]) -> list[list[str]]:
    head = ["comparison (a - b)", "metric", "difference", "95% CI (paired bootstrap)", "excludes 0", "note"]
    body = [[d["comparison"], d["metric"], f"{d['diff']:+.3f}", f"[{d['low']:+.3f}, {d['high']:+.3f}]",
             "yes" if d["excludes_zero"] else "no", d["note"]] for d in diffs]
    return [head, *body]


def merge_table(rows: list[dict]) -> list[list[str]]:
    """Per iteration: each policy's reward and KL next to their SLERP merge's (does merging beat its members?)."""
    its = sorted({r["iteration"] for r in rows if r["kind"] == "merged"})
    body = []
    for it in its:
        pols = sorted((r for r in rows if r["kind"] == "policy" and r["iteration"] == it), key=lambda r: r["policy"])
        (mg,) = [r for r in rows if r["kind"] == "merged" and r["iteration"] == it]
        best = max((p["reward_mean"] for p in pols), default=float("nan"))
        body.append([str(it), "; ".join(f"p{p['policy']} {p['reward_mean']:+.3f} (KL {p['kl_mean']:.3f})" for p in pols),
                     f"{mg['reward_mean']:+.3f} (KL {mg['kl_mean']:.3f})", _fmt(mg["reward_mean"] - best, "+.3f")])
    return [["iteration", "policies: reward (KL)", "SLERP merge: reward (KL)", "merge - best policy"], *body]


def sample_table(samples: list[dict]) -> list[list[str]]:
    head = ["prompt", "SFT continuation", "SFT reward", "WARP continuation", "WARP reward"]
    return [head, *[[s["prompt"], s["sft"], f"{s['sft_reward']:+.3f}", s["warp"], f"{s['warp_reward']:+.3f}"]
                    for s in samples]]


def run_facts(cfg: dict, summary: dict, rows: list[dict]) -> list[list[str]]:
    t, m, e, d = (cfg.get(k, {}) for k in ("train", "merge", "eval", "data"))
    n = next((r["num_prompts"] for r in rows if r["kind"] == "sft"), d.get("num_eval_prompts"))
    facts = [["model (SFT)", cfg.get("model", {}).get("name", "?")],
             ["reward", cfg.get("reward", {}).get("kind", "?") + (f" {cfg['reward']['name']}"
                                                                   if cfg.get("reward", {}).get("name") else "")],
             ["I x M x T (iterations x policies x steps)", f"{t.get('iterations')} x {t.get('policies')} x {t.get('steps')}"],
             ["batch, lr", f"{t.get('batch_size')}, {t.get('lr')}"],
             ["beta, mu, anchor", f"{t.get('beta')}, {t.get('mu')}, {t.get('anchor', 'ema')}"],
             ["SLERP lambda, LITI eta", f"{m.get('lam')}, {m.get('eta')}"],
             ["judge (independent of the reward)", judge_name(rows)],
             ["held-out prompts, eval seed", f"{n}, {e.get('seed')}"]]
    total = summary.get("timers_s", {}).get("total")
    if total is not None:
        facts.append(["training wall time", f"{total:.0f} s on {summary.get('world_size', 1)} rank(s)"])
    return [["setting", "value"], *facts]


def _md(table: list[list[str]]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def headline(rows: list[dict]) -> str:
    by = {r["kind"]: r for r in rows if r["kind"] in ("sft", "final")}
    if len(by) < 2:
        return ""
    s, f = by["sft"], by["final"]
    return (f"WARP final: reward {f['reward_mean']:+.3f} vs SFT {s['reward_mean']:+.3f} "
            f"({f['reward_mean'] - s['reward_mean']:+.3f}) at KL {f['kl_mean']:.3f} from SFT; "
            f"{f['identical_fraction']:.0%} of its continuations are identical to the SFT model's.")


# ------------------------------------------------------------------------------------------------ the report
def build_report(run_dir: str | Path) -> Path:
    """Write pareto.png, training.png, report.md and report.html into <run>/report/; returns that folder."""
    run = Path(run_dir)
    out = run / "report"
    rows = load_rows(out)
    samples = load_samples(run)
    cfg = load_config_dict(run)
    summary = _read_json(run / "summary.json", {})
    pareto_plot(rows, out / "pareto.png")
    training_plot(load_records(run), out / "training.png", cfg.get("train", {}).get("anchor", "ema"))
    title = f"WARP report: {run.name}"
    diffs = paired_differences(rows)
    write_json(out / "paired.json", diffs)
    sections = [("Run", run_facts(cfg, summary, rows)), ("Metrics (held-out prompts, same sampling seeds)",
                                                         metrics_table(rows))]
    sections.append(("Paired differences (same prompts and seeds; paired bootstrap over prompts)",
                     paired_table(diffs)))
    if any(r["kind"] == "merged" for r in rows):
        sections.append(("Merging vs its members", merge_table(rows)))
    sections.append(("Samples: SFT vs WARP final (same prompts, same seeds)", sample_table(samples)))
    note = ("KL is the Monte-Carlo estimate of KL(pi || pi_SFT) per completion; 'identical to SFT' is the share of "
            "prompts whose continuation equals the SFT model's under the same seed; the judge scores the same texts "
            "independently of the reward (a reward rising while the judge does not is reward hacking); distinct-n is "
            "unique / total token n-grams over all completions; '(= X)': the same weights as X, whose numbers it "
            "reuses. [95% CI]: Student-t interval of the mean over "
            "prompts. Paired differences resample prompts with replacement (2000 resamples, seed 0), both models' "
            "values of a prompt together; 'excludes 0' = the interval lies on one side of zero. Produced by "
            f"`python launch/eval.py --run {run}`.")
    head = headline(rows)
    md = [f"# {title}", head, note, "## Reward vs KL", "[pareto.png](pareto.png)\n\n![reward vs KL](pareto.png)",
          "## Training", "[training.png](training.png)\n\n![training curves](training.png)"]
    for name, table in sections:
        md += [f"## {name}", _md(table) if len(table) > 1 else "(none)"]
    write_text(out / "report.md", "\n\n".join(x for x in md if x) + "\n")
    imgs = {n: base64.b64encode((out / n).read_bytes()).decode() for n in PNGS}
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p><b>{html.escape(head)}</b></p>" if head else "",
             f"<p>{html.escape(note)}</p>", "<h2>Reward vs KL</h2>",
             f"<img alt='pareto.png' src='data:image/png;base64,{imgs['pareto.png']}'>", "<h2>Training</h2>",
             f"<img alt='training.png' src='data:image/png;base64,{imgs['training.png']}'>"]
    for name, table in sections:
        parts += [f"<h2>{html.escape(name)}</h2>", _html_table(table) if len(table) > 1 else "<p>(none)</p>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;"
            "padding:0 1em}table{border-collapse:collapse;font-size:13px;margin-bottom:1em}td,th{border:1px solid #ccc;"
            "padding:3px 6px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"
            + "".join(parts) + "</body></html>\n")
    write_text(out / "report.html", page)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m warp_dist.evaluation.report <run folder with report/eval.json>")
    print(build_report(sys.argv[1]))
