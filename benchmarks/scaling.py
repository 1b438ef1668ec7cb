"""Policy parallelism: M policies on M ranks at once vs the same M policies one after the other on one rank.

    python benchmarks/scaling.py --size cpu            # configs/warp/tiny.yaml, M = 2, 2 ranks vs 1 rank
    python benchmarks/scaling.py --size gpu --policies 2,4,8

Both runs are `launch/warp.py` on the same config with train.iterations=1 and the same M, steps, batch and
completion length (min = max new tokens), so the total work is identical:
- M ranks: `accelerate launch --multi_gpu --num_processes M launch/warp.py ...` (gloo on CPU), one policy each;
- 1 rank: `python launch/warp.py ...`, which trains the M policies one after the other.
Training phase = time_train_s + time_wait_s of the kind=merge record in metrics.jsonl (rank 0's own training
plus its wait at the barrier for the slowest rank, i.e. the phase's wall time); total = the launcher's wall time.
Evaluation over M ranks vs 1 rank comes from the same runs: the kind=eval model=final record's time_eval_s
(the SFT evaluation before it is the warm-up); eval prompts are cut into batches that split evenly over ranks.
CPU threads: each of the M ranks gets OMP_NUM_THREADS = WARP_DIST_NUM_THREADS = cores // M, the single rank
gets all cores, so on a 2-core machine two ranks share the same 2 cores the single rank uses.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "scaling"
PRESETS = {
    "tiny": dict(config="configs/warp/tiny.yaml", model="", policies="2", steps=2, batch_size=8, new_tokens=8,
                 eval_prompts=8, eval_batch=2, timeout=300),
    "cpu": dict(config="configs/warp/tiny.yaml", model="", policies="2", steps=96, batch_size=32, new_tokens=24,
                eval_prompts=128, eval_batch=16, timeout=900),
    "gpu": dict(config="configs/warp/tiny.yaml", model="embedded:smollm2-135m", policies="2", steps=20, batch_size=32,
                new_tokens=48, eval_prompts=256, eval_batch=32, timeout=1800),
}
COLUMNS = ["M", "model", "steps x batch x tokens", "threads per rank: M ranks / 1 rank", "train s (M ranks)",
           "train s (1 rank)", "train speedup", "wall s (M ranks)", "wall s (1 rank)", "wall speedup",
           "eval s (M ranks)", "eval s (1 rank)", "eval speedup"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--config", default=None, help="WARP preset YAML (relative to the repository root)")
    ap.add_argument("--model", default=None, help="override model.name ('' = the config's)")
    ap.add_argument("--policies", default=None, help="comma list of M (each M runs on M ranks and on 1 rank)")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (T)")
    ap.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion tokens (min = max)")
    ap.add_argument("--eval-prompts", type=int, default=None, help="data.num_eval_prompts")
    ap.add_argument("--eval-batch", type=int, default=None, help="eval.batch_size")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per launched run")
    return common.apply_preset(ap.parse_args(argv), PRESETS)


def overrides(args, M: int, out: Path) -> list[str]:
    ov = [f"output_dir={out}", "train.iterations=1", f"train.policies={M}", f"train.steps={args.steps}",
          f"train.batch_size={args.batch_size}", f"rollout.max_new_tokens={args.new_tokens}",
          f"rollout.min_new_tokens={args.new_tokens}", f"data.num_eval_prompts={args.eval_prompts}",
          f"data.num_train_prompts={max(64, args.batch_size * args.steps)}", f"eval.batch_size={args.eval_batch}",
          "eval.every_iteration=false", "progress=false", f"train.seed={args.seed}"]
    if args.model:
        ov.append(f"model.name={args.model}")
    return ov


def one_run(args, M: int, ranks: int, tmp: Path) -> dict:
    out = tmp / f"m{M}_r{ranks}"
    cmd = common.launch_cmd(ranks, ROOT / "launch" / "warp.py",
                            ["--config", str(ROOT / args.config), *overrides(args, M, out)])
    env = common.subprocess_env(**common.thread_env(ranks))
    wall, _ = common.run_timed(cmd, env, args.timeout, log_path=tmp / f"m{M}_r{ranks}.log")
    recs = common.read_jsonl(out / "metrics.jsonl")
    merge = next(r for r in recs if r["kind"] == "merge")
    final = next(r for r in recs if r["kind"] == "eval" and r["model"] == "final")
    sft = next(r for r in recs if r["kind"] == "eval" and r["model"] == "sft")
    train = [r for r in recs if r["kind"] == "train"]
    return {
        "ranks": ranks, "threads_per_rank": int(env["WARP_DIST_NUM_THREADS"]), "wall_s": wall,
        "train_phase_s": merge["time_train_s"] + merge["time_wait_s"], "time_train_s_rank0": merge["time_train_s"],
        "time_wait_s_rank0": merge["time_wait_s"], "time_merge_s": merge["time_merge_s"],
        "train_records": len(train), "train_ranks": sorted({r["rank"] for r in train}),
        "eval_final_s": final["time_eval_s"], "eval_final_generate_s": final["time_generate_s"],
        "eval_final_tokens_per_s": final["tokens_per_s"], "eval_num_ranks": final["num_ranks"],
        "eval_sft_s": sft["time_eval_s"], "final_reward_mean": final["reward_mean"],
        "command": " ".join(cmd).replace(str(ROOT) + "/", ""),
    }


def table(res: dict) -> list[list[str]]:
    c = res["config"]
    rows = []
    for r in res["rows"]:
        if "skipped" in r:
            rows.append([str(r["M"]), f"skipped: {r['skipped']}", *["-"] * (len(COLUMNS) - 2)])
            continue
        p, s = r["parallel"], r["sequential"]
        rows.append([str(r["M"]), c["model"] or "(config)", f"{c['steps']} x {c['batch_size']} x {c['new_tokens']}",
                     f"{p['threads_per_rank']} x {p['ranks']} / {s['threads_per_rank']}",
                     common.fmt(p["train_phase_s"]), common.fmt(s["train_phase_s"]),
                     common.fmt_ratio(r["train_speedup"]), common.fmt(p["wall_s"]), common.fmt(s["wall_s"]),
                     common.fmt_ratio(r["wall_speedup"]), common.fmt(p["eval_final_s"]), common.fmt(s["eval_final_s"]),
                     common.fmt_ratio(r["eval_speedup"])])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    ms = common.int_list(args.policies)
    if not ms or min(ms) < 2:
        raise SystemExit("--policies: a comma list of M >= 2")
    cuda = torch.cuda.device_count()
    rows = []
    with tempfile.TemporaryDirectory(prefix="warp_bench_scaling_") as tmp:
        for M in ms:
            if cuda and cuda < M:
                rows.append({"M": M, "skipped": f"{M} ranks need {M} GPUs, found {cuda}"})
                continue
            par = one_run(args, M, M, Path(tmp))
            seq = one_run(args, M, 1, Path(tmp))
            if par["train_records"] != seq["train_records"]:
                raise RuntimeError(f"unequal work: {par['train_records']} vs {seq['train_records']} train steps")
            rows.append({"M": M, "parallel": par, "sequential": seq,
                         "train_speedup": seq["train_phase_s"] / par["train_phase_s"],
                         "wall_speedup": seq["wall_s"] / par["wall_s"],
                         "eval_speedup": seq["eval_final_s"] / par["eval_final_s"],
                         "eval_generate_speedup": seq["eval_final_generate_s"] / par["eval_final_generate_s"],
                         "train_efficiency": seq["train_phase_s"] / par["train_phase_s"] / M})
    done = [r for r in rows if "skipped" not in r]
    cores = common.num_cores()
    res = {
        "config": {"config": args.config, "model": args.model, "policies": ms, "steps": args.steps,
                   "batch_size": args.batch_size, "new_tokens": args.new_tokens, "eval_prompts": args.eval_prompts,
                   "eval_batch": args.eval_batch, "iterations": 1, "cores": cores},
        "rows": rows,
        "notes": (f"{cores} cores: each of the M ranks runs with OMP_NUM_THREADS=WARP_DIST_NUM_THREADS="
                  f"max(1, {cores} // M), the single rank with {cores}; "
                  + ("the M ranks share the cores the single rank has to itself, so a speedup above 1 says "
                     "M one-thread processes use these cores better than one process with all the threads, "
                     "not that there is more hardware. " if not cuda else "one GPU per rank. ")
                  + "train = time_train_s + time_wait_s of the merge record; eval = final eval time_eval_s."),
    }
    if not done:
        raise RuntimeError("every M was skipped: " + "; ".join(r["skipped"] for r in rows))
    return common.finish(NAME, args, argv, res, COLUMNS, table(res))


if __name__ == "__main__":
    main(sys.argv[1:])
