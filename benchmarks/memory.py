"""Peak memory per rank: one process, and ZeRO-3 with G = 1, 2, 4 ranks per policy (M = 1 and M = 2).

    python benchmarks/memory.py --size cpu      # SmolLM2-135M (model state dominates), ~20 min on 2 cores
    python benchmarks/memory.py --size tiny     # tiny GPT-2, the test suite

Every case is a real `launch/warp.py` run (`accelerate launch --multi_gpu` for W > 1, DS_ACCELERATOR=cpu) of
configs/warp/baseline_reinforce.yaml shortened to 2 RL steps (the command of the memory issue) with the case's overrides;
while it runs, the peak resident memory of every rank (VmHWM in /proc/<pid>/status; on CUDA the trainer's
torch.cuda.max_memory_allocated would be the figure) is read every 0.2 s. Each figure is set next to the memory plan's
prediction for that rank (warp_dist.checks.plan, from config.json only) and the ratio to the one-process HF run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "memory"
ZERO3 = "train.deepspeed=configs/deepspeed/zero3.json"
# name -> (ranks, overrides)
CASES = {
    "1 process, HF": (1, ["rollout.backend=hf"]),
    "1 process, vLLM": (1, ["rollout.backend=vllm"]),
    "ZeRO-3 G=1 M=1": (1, ["rollout.backend=hf", ZERO3]),
    "ZeRO-3 G=2 M=1": (2, ["rollout.backend=hf", ZERO3]),
    "ZeRO-3 G=4 M=1": (4, ["rollout.backend=hf", ZERO3]),
    "ZeRO-3 G=1 M=2": (2, ["rollout.backend=hf", ZERO3, "train.policies=2"]),
    "ZeRO-3 G=2 M=2": (4, ["rollout.backend=hf", ZERO3, "train.policies=2"]),
}
PRESETS = {
    "tiny": dict(config="configs/warp/tiny.yaml", cases="1 process, HF;ZeRO-3 G=1 M=1;ZeRO-3 G=2 M=1",
                 extra="train.steps=2,train.iterations=1,data.num_eval_prompts=8", timeout=300),
    "cpu": dict(config="configs/warp/baseline_reinforce.yaml", cases=";".join(CASES),
                extra="train.steps=2,data.num_eval_prompts=32", timeout=2400),
    "gpu": dict(config="configs/warp/baseline_reinforce.yaml", cases="1 process, HF;ZeRO-3 G=1 M=1",
                extra="train.steps=2,data.num_eval_prompts=32", timeout=1200),
}
COLUMNS = ["case", "ranks", "peak per rank GB (max over ranks)", "plan GB", "measured / plan",
           "peak / one-process HF", "wall s", "command"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--config", default=None, help="WARP preset (relative to the repository root)")
    ap.add_argument("--cases", default=None, help=f"';'-separated subset of: {'; '.join(CASES)}")
    ap.add_argument("--extra", default=None, help="comma-separated overrides added to every case")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per case")
    args = common.apply_preset(ap.parse_args(argv), PRESETS)
    unknown = [c for c in args.cases.split(";") if c and c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; allowed {list(CASES)}")
    return args


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = []
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    kids += [int(x) for x in fh.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def rank_of(pid: int) -> int | None:
    """The RANK of a launch/warp.py process (from its environment), None for other processes."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"launch/warp.py" not in fh.read():
                return None
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        return int(env.get(b"RANK", b"0"))
    except (OSError, ValueError):
        return None


def vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_case(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[dict[int, int], float, int]:
    """Run `cmd`; returns ({rank: peak bytes}, wall seconds, exit code)."""
    peaks: dict[int, int] = {}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                for p in [proc.pid, *descendants(proc.pid)]:
                    r = rank_of(p)
                    h = vmhwm(p) if r is not None else None
                    if h is not None:
                        peaks[r] = max(peaks.get(r, 0), h)
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # the launcher and every rank it started
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = -9
        stop.set()
        th.join()
    return peaks, time.perf_counter() - t0, rc


def plan_for(config: str, overrides: list[str], ranks: int) -> dict[int, int] | None:
    """The memory plan's per-rank prediction (bytes), or None when warp_dist.checks.plan is not available."""
    try:
        from warp_dist.checks import plan as planmod
        from warp_dist.config import load_config
    except ImportError:
        return None
    cfg = load_config(ROOT / config, overrides)
    p = planmod.check(cfg, ranks, device="cpu", enforce=False)
    return {r: p.rank_total(r) for r in range(ranks)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    extra = [x for x in args.extra.split(",") if x]
    rows, results = [], []
    baseline = None
    with tempfile.TemporaryDirectory(prefix="warp_bench_mem_") as tmp:
        tmp = Path(tmp)
        for i, name in enumerate([c for c in args.cases.split(";") if c]):
            ranks, ov = CASES[name]
            overrides = [*extra, *ov, f"output_dir={tmp / f'case{i}'}", "progress=false"]
            script_args = ["--config", args.config, *overrides]
            cmd = common.launch_cmd(ranks, ROOT / "launch" / "warp.py", script_args)
            env = common.subprocess_env(DS_ACCELERATOR="cpu", **common.thread_env(ranks))
            peaks, wall, rc = run_case(cmd, env, args.timeout, tmp / f"case{i}.log")
            if rc != 0 or not peaks:  # recorded and reported; the other cases still run
                tail = (tmp / f"case{i}.log").read_text()[-1500:]
                print(f"{name}: exit {rc} after {wall:.0f} s (timeout {args.timeout:.0f} s)\n{tail}", flush=True)
                results.append({"case": name, "ranks": ranks, "error": f"exit {rc} after {wall:.0f} s"})
                rows.append([name, str(ranks), f"failed (exit {rc})", "-", "-", "-", common.fmt(wall), "-"])
                continue
            try:
                predicted = plan_for(args.config, overrides, ranks)
            except Exception as exc:  # noqa: BLE001 - the measurement stands on its own
                predicted = None
                print(f"plan failed for {name}: {exc}", flush=True)
            peak = max(peaks.values())
            if name == "1 process, HF":
                baseline = peak
            shown = " ".join(["python" if ranks == 1 else f"accelerate launch --multi_gpu --num_processes {ranks}",
                              "launch/warp.py", "--config", args.config, *[o for o in overrides
                                                                          if not o.startswith("output_dir=")]])
            res = {"case": name, "ranks": ranks, "peak_bytes_per_rank": {str(r): v for r, v in sorted(peaks.items())},
                   "peak_bytes_max": peak, "wall_s": wall, "command": shown,
                   "plan_bytes_per_rank": {str(r): v for r, v in predicted.items()} if predicted else None}
            res["measured_over_plan"] = (peak / max(predicted.values())) if predicted else None
            res["peak_over_one_process_hf"] = (peak / baseline) if baseline else None
            results.append(res)
            rows.append([name, str(ranks), common.fmt(peak / common.GB),
                         common.fmt(max(predicted.values()) / common.GB) if predicted else "-",
                         common.fmt_ratio(res["measured_over_plan"]), common.fmt_ratio(res["peak_over_one_process_hf"]),
                         common.fmt(wall), f"`{shown}`"])
            print(common.md_table(COLUMNS, rows[-1:]), flush=True)
    out = {"config": {"config": args.config, "extra": extra}, "cases": results, "rows": rows}
    return common.finish(NAME, args, argv, out, COLUMNS, rows)


def table(res: dict) -> list[list[str]]:
    return res["rows"]


if __name__ == "__main__":
    main(sys.argv[1:])
