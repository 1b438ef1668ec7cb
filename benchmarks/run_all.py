"""Run the benchmark set and write one Markdown report with machine info, date and the command beside every number.

    python benchmarks/run_all.py                  # --size cpu: ~10-11 min on 2 quiet cores -> benchmarks/RESULTS.md
    python benchmarks/run_all.py --size tiny      # smoke run (~1.5 min) -> benchmarks/results/tiny/RESULTS.md
    python benchmarks/run_all.py --no-run         # re-render the report from the JSONs already there
    python benchmarks/run_all.py --size tiny --results-dir /tmp/b   # JSONs, logs and RESULTS.md all in /tmp/b

Order: rollout (HF vs vLLM tokens/s, benchmarks/rollout.py), train_step, merge, scaling, e2e, completions; memory
(per-rank peak memory of real runs, ~40 min) only with `--only memory`. Each benchmark runs
as its own `python benchmarks/<name>.py ...` process (`main(argv)` of that file), so one benchmark's engines,
threads and allocator state cannot leak into the next; its log goes to <results>/logs/<name>.log. A failing
benchmark is reported in the Markdown and the exit code, and the others still run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "run_all"
ORDER = ("rollout", "train_step", "merge", "scaling", "e2e", "completions", "memory")
DEFAULT = ORDER[:-1]  # memory.py runs ~40 min of real runs: `--only memory` (or run it directly) adds its section
# rough seconds per benchmark on 2 quiet cores (cpu preset); the machine these were sized on was shared
ESTIMATE_S = {"cpu": {"rollout": 60, "train_step": 110, "merge": 420, "scaling": 60, "e2e": 900, "completions": 600,
                      "memory": 2400},
              "tiny": {"rollout": 30, "train_step": 25, "merge": 10, "scaling": 25, "e2e": 20, "completions": 40,
                       "memory": 120}}
TITLES = {
    "rollout": "Rollout throughput: HF generate vs vLLM",
    "train_step": "One RL step, phase by phase",
    "merge": "SLERP + LITI merge vs a plain copy; streaming merger memory",
    "scaling": "Policies on M ranks vs one after the other on one rank",
    "e2e": "Whole WARP run: this project vs a naive single-process loop",
    "completions": "k completions per prompt (RLOO): tokens/s and reward gain per second",
    "memory": "Peak memory per rank: one process and ZeRO-3 with G = 1, 2, 4 (next to the memory plan)",
}
ROLLOUT_COLUMNS = ["model", "device", "prompts", "prompt tokens", "new tokens", "HF tok/s", "vLLM tok/s", "vLLM / HF"]


def default_paths(size: str) -> tuple[Path, Path]:
    if size == "cpu":
        return common.RESULTS, ROOT / "benchmarks" / "RESULTS.md"
    d = common.RESULTS / size
    return d, d / "RESULTS.md"


def bench_argv(name: str, size: str, results: Path) -> list[str]:
    """Arguments of one benchmark for a size preset (rollout.py has cpu/gpu presets only: tiny = small overrides)."""
    out = ["--out", str(results / f"{name}.json")]
    if name == "rollout":
        if size == "tiny":
            return ["--size", "cpu", "--num-prompts", "4", "--prompt-tokens", "4", "--new-tokens", "8", *out]
        return ["--size", size, "--model", "embedded:smollm2-135m", *out]
    return ["--size", size, *out]


def rel(path: str) -> str:
    """Paths under the repository root written relative to it (commands in the report rerun from the root)."""
    return path.replace(str(ROOT) + "/", "")


def bench_command(name: str, argv: list[str]) -> str:
    return shlex.join(["python", f"benchmarks/{name}.py", *[rel(a) for a in argv]])


def run_one(name: str, argv: list[str], results: Path, timeout: float) -> dict:
    """Run benchmarks/<name>.py in its own process; returns {name, command, seconds, ok, error?}."""
    log = results / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [common.python_bin(), str(ROOT / "benchmarks" / f"{name}.py"), *argv]
    t0 = time.perf_counter()
    status = {"name": name, "command": bench_command(name, argv)}
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, env=common.subprocess_env(), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        status["ok"] = proc.returncode == 0
        if not status["ok"]:
            tail = log.read_text()[-1500:]
            status["error"] = f"exit code {proc.returncode}; log {rel(str(log))}:\n{tail}"
    except subprocess.TimeoutExpired:
        status.update(ok=False, error=f"timed out after {timeout:.0f}s; log {rel(str(log))}")
    status["seconds"] = time.perf_counter() - t0
    return status


# ------------------------------------------------------------------------------------------ the report
def rollout_rows(r: dict) -> list[list[str]]:
    return [[r["model"], r["device"], str(r["num_prompts"]), str(r["prompt_tokens"]), str(r["new_tokens"]),
             common.fmt(r["hf_tokens_per_s"]), common.fmt(r["vllm_tokens_per_s"]), common.fmt_ratio(r["speedup"])]]


def section_table(name: str, res: dict, command: str) -> tuple[list[str], list[list[str]]]:
    if name == "rollout":
        cols, rows = ROLLOUT_COLUMNS, rollout_rows(res)
    else:
        import importlib

        mod = importlib.import_module(f"benchmarks.{name}")
        cols, rows = mod.COLUMNS, mod.table(res)
    if cols and cols[-1] == "command":  # the script gives each row its own command: keep it, add none
        return list(cols), [list(row) for row in rows]
    return [*cols, "command"], [[*row, f"`{command}`"] for row in rows]


def machine_lines(m: dict) -> list[str]:
    cuda = m.get("cuda_device") or "none"
    return [f"- CPU: {m.get('cpu_model')} — {m.get('cores')} usable cores, {m.get('memory_gb')} GiB RAM; "
            f"GPU: {cuda}",
            f"- torch {m.get('torch')}, transformers {m.get('transformers')}, vLLM {m.get('vllm') or 'not installed'}, "
            f"accelerate {m.get('accelerate')}, DeepSpeed {m.get('deepspeed') or '-'}; Python {m.get('python')}",
            f"- {m.get('platform')}; git {m.get('git_commit') or '-'}"]


def notes_of(name: str, res: dict) -> list[str]:
    out = []
    for key in ("counting", "notes"):
        if res.get(key):
            out.append(f"{key.capitalize()}: {res[key]}")
    if name == "rollout":
        out.append("Both backends sample exactly `new tokens` per prompt after a warm-up; tok/s = generated "
                   "tokens / wall time of one generate.")
    return out


def render(size: str, results: Path, statuses: dict[str, dict], started: str | None) -> str:
    lines = ["# Benchmark results", ""]
    found = {}
    for name in ORDER:
        p = results / f"{name}.json"
        if p.exists():
            try:
                found[name] = json.loads(p.read_text())
            except json.JSONDecodeError:
                pass
    machine = next((r["machine"] for r in found.values() if r.get("machine")), None) or common.machine_info()
    dates = sorted(r["machine"]["date"] for r in found.values() if r.get("machine", {}).get("date"))
    lines += [f"Written by `python benchmarks/run_all.py --size {size}`"
              + (f", started {started}" if started else "")
              + (f"; benchmark dates {dates[0]} .. {dates[-1]} (UTC)" if dates else "") + ".",
              "Every number below comes from the command beside it (run from the repository root); each JSON "
              f"under `{rel(str(results))}/` has the full record.", "", "## Machine", "", *machine_lines(machine), ""]
    if statuses:
        lines += ["## Runs", "", "| benchmark | seconds | status |", "|---|---|---|"]
        for name in ORDER:
            st = statuses.get(name)
            if st:
                lines.append(f"| {name} | {st['seconds']:.0f} | {'ok' if st['ok'] else 'FAILED'} |")
        lines.append("")
    for i, name in enumerate(ORDER, 1):
        lines += [f"## {i}. {TITLES[name]}", ""]
        st = statuses.get(name, {})
        if st and not st["ok"]:
            lines += [f"FAILED: `{st['command']}`", "", "```", st.get("error", "")[-1500:], "```", ""]
            continue
        res = found.get(name)
        if res is None:
            lines += [f"Not run (no `{rel(str(results / (name + '.json')))}`).", ""]
            continue
        # the JSON's own command when it records one (rollout.py does not), else the one run_all used
        command = rel(res.get("command") or st.get("command") or bench_command(name, bench_argv(name, size, results)))
        try:
            cols, rows = section_table(name, res, command)
        except (KeyError, TypeError, IndexError):  # a JSON written by an older version of the script
            lines += [f"Stale record (written by an older `{name}.py`, another layout): rerun `{command}`.", ""]
            continue
        lines += [common.md_table(cols, rows), ""]
        m = res.get("machine")
        if m and m.get("date"):
            lines.append(f"Measured {m['date']} on {m.get('cpu_model', '?')} x {m.get('cores', '?')} cores "
                         f"(load average {m.get('load_average_1m')}); `{command}`.")
        lines += [*notes_of(name, res), ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.set_defaults(out=None)
    ap.add_argument("--results-dir", default=None, help="where the JSONs go (default per size, see above); the report too unless --out")
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma list out of {','.join(ORDER)} (default: all "
                    "but memory)")
    ap.add_argument("--no-run", action="store_true", help="only re-render the report from existing JSONs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    args = ap.parse_args(argv)
    res_dir, md = default_paths(args.size)
    given_dir = args.results_dir
    args.results_dir = Path(given_dir) if given_dir else res_dir
    # the report goes beside the JSONs it is rendered from when only --results-dir is given
    args.out = Path(args.out) if args.out else (args.results_dir / "RESULTS.md" if given_dir else md)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.only if x not in ORDER]
    if bad:
        ap.error(f"--only: unknown benchmark(s) {bad}; allowed {', '.join(ORDER)}")
    return args


HISTORY = "# Earlier measurements and history"  # RESULTS.md from this heading on is kept when it is rewritten


def main(argv=None) -> dict:
    args = parse_args(argv)
    results: Path = args.results_dir
    statuses: dict[str, dict] = {}
    started = None
    if not args.no_run:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        est = ESTIMATE_S.get(args.size, {})
        total = sum(est.get(n, 0) for n in args.only)
        if total:
            print(f"running {', '.join(args.only)} at --size {args.size}: about {total / 60:.0f} min on 2 quiet "
                  f"cores (more on a busy machine)", flush=True)
        for name in args.only:
            argv_b = bench_argv(name, args.size, results)
            print(f"[{time.strftime('%H:%M:%S')}] {bench_command(name, argv_b)}", flush=True)
            st = run_one(name, argv_b, results, args.timeout)
            statuses[name] = st
            print(f"    {'ok' if st['ok'] else 'FAILED'} in {st['seconds']:.0f}s"
                  + ("" if st["ok"] else f"\n{st['error']}"), flush=True)
    text = render(args.size, results, statuses, started)
    if args.out.is_file():  # the hand-kept history below the generated sections stays
        old = args.out.read_text()
        if HISTORY in old:
            text = text.rstrip("\n") + "\n\n" + old[old.index(HISTORY):]
    common.write_text_atomic(args.out, text)
    print(f"wrote {rel(str(args.out))}", flush=True)
    failed = [n for n, s in statuses.items() if not s["ok"]]
    return {"report": str(args.out), "statuses": statuses, "failed": failed}


if __name__ == "__main__":
    res = main(sys.argv[1:])
    sys.exit(1 if res["failed"] else 0)
