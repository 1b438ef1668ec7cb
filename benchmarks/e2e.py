"""A whole WARP run with this project vs a deliberately naive single-process loop of the same config.

    python benchmarks/e2e.py --size cpu       # SmolLM2-135M, demo config shortened; project on 2 ranks
    python benchmarks/e2e.py --size tiny      # tiny GPT-2, seconds

project: `launch/warp.py` on the config (`accelerate launch --num_processes R` when --ranks > 1): its rollout
         backend, policies on their own ranks, streaming merge, sharded evaluation, saved final model.
naive:   benchmarks/naive.py (`NaiveWarp.run`) in a fresh `python` process: HF generate, fp32, full-sequence
         logits, the M policies one after the other, whole in-memory state dicts merged with
         `merging.merge_state_dicts`; no evaluation inside its timed run.
Both final models are evaluated by the project's evaluator on the same held-out prompts and sampling seeds (the
naive one after its timed run), so the final reward and KL say whether speed was bought with quality. Walls are the
processes' wall times (startup included; the project's includes its own evaluations, SFT and final); `run` times
leave out setup (loading model, data, reward, engines).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "e2e"
PRESETS = {
    "tiny": dict(config="configs/warp/tiny.yaml", model="", backend="", ranks="1", iterations=2, policies=2, steps=2,
                 batch_size=8, new_tokens=8, eval_prompts=8, eval_batch=8, timeout=300, reward="", dtype=""),
    # the demo's shape and length (I = 2, M = 2, T = 10 as make demo runs it, 16 prompts x 24 tokens, 64 eval
    # prompts), project on 1 and 2 ranks; the model and reward of the embedded default (SmolLM2-135M, VADER) so it
    # needs no pipeline stage first
    "cpu": dict(config="configs/warp/demo.yaml", model="embedded:smollm2-135m", backend="", ranks="1,2", iterations=2,
                policies=2, steps=10, batch_size=16, new_tokens=24, eval_prompts=64, eval_batch=32, timeout=3600,
                reward="vader", dtype=""),
    "gpu": dict(config="configs/warp/demo.yaml", model="embedded:smollm2-135m", backend="", ranks="2", iterations=2,
                policies=2, steps=25, batch_size=32, new_tokens=48, eval_prompts=128, eval_batch=32, timeout=3600,
                reward="vader", dtype=""),
}
COLUMNS = ["config", "I x M x T", "batch x tokens", "project (ranks, backend, dtype)", "project wall s", "naive wall s",
           "naive / project wall", "project run s", "naive run s", "naive / project run",
           "final reward project (SFT)", "final reward naive (SFT)", "KL project", "KL naive"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--config", default=None, help="WARP preset YAML (relative to the repository root)")
    ap.add_argument("--model", default=None, help="override model.name ('' = the config's)")
    ap.add_argument("--backend", default=None, help="override rollout.backend for the project run ('' = config's)")
    ap.add_argument("--ranks", default=None, help="comma list: ranks of each project run (1 = plain python)")
    ap.add_argument("--reward", default=None, help="override reward.kind ('' = the config's)")
    ap.add_argument("--dtype", default=None, help="the project's model.dtype: float32 | bfloat16 ('' = the config's; "
                    "the naive loop is always fp32)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--policies", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None, help="rollout.max_new_tokens")
    ap.add_argument("--eval-prompts", type=int, default=None)
    ap.add_argument("--eval-batch", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    # internal: the naive run's own process (`--naive CONFIG_YAML --naive-out RESULT_JSON`)
    ap.add_argument("--naive", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--naive-out", default=None, help=argparse.SUPPRESS)
    return common.apply_preset(ap.parse_args(argv), PRESETS)


# ------------------------------------------------------------------------------------------ the naive loop
def naive_run(cfg) -> dict:
    """benchmarks/naive.py's whole run (timed), then its final weights evaluated by the project's own evaluator on
    the same held-out prompts and seeds as the project's final model (not timed), so the two rewards compare."""
    import torch

    from benchmarks.naive import NaiveWarp
    from warp_dist import merging
    from warp_dist.evaluation.evaluator import Evaluator
    from warp_dist.training.session import Session

    t_start = time.perf_counter()
    nw = NaiveWarp(cfg)
    t_setup = time.perf_counter() - t_start
    res = nw.run()
    t_total = time.perf_counter() - t_start
    final = {k: v for k, v in res["final_state"].items()}
    dist_to_sft = merging.distance(final, nw.sft_state)
    del nw
    torch.manual_seed(0)
    s = Session(cfg, log=lambda *_: None)
    params = {n: final[n] for n in s.weights.names}
    evaluator = Evaluator(s)
    sft = evaluator.evaluate(s.sft.full, None)
    fin = evaluator.evaluate(params, sft)
    s.close()
    return {"sft": sft.metrics, "final": {**fin.metrics, "weight_distance_to_sft": dist_to_sft},
            "setup_s": t_setup, "run_s": res["run_s"], "total_s": t_total,
            "train_reward_first_last": [res["train_rewards"][0], res["train_rewards"][-1]]}


def naive_worker(config_yaml: str, out: str) -> dict:
    from warp_dist.config import load_config
    from warp_dist.runner import quiet_libraries

    quiet_libraries()
    res = naive_run(load_config(config_yaml))
    common.write_json_atomic(out, res)
    return res


# ------------------------------------------------------------------------------------------ the comparison
def build_config(args, out_dir: Path):
    from warp_dist.config import load_config

    ov = [f"output_dir={out_dir}", f"train.iterations={args.iterations}", f"train.policies={args.policies}",
          f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
          f"rollout.max_new_tokens={args.new_tokens}", f"data.num_eval_prompts={args.eval_prompts}",
          f"eval.batch_size={args.eval_batch}", f"train.seed={args.seed}", "progress=false",
          "save_iterations=false"]
    if args.model:
        ov.append(f"model.name={args.model}")
    if args.backend:
        ov.append(f"rollout.backend={args.backend}")
    if args.reward:
        ov.append(f"reward.kind={args.reward}")
    if args.dtype:
        ov.append(f"model.dtype={args.dtype}")
    return load_config(ROOT / args.config, ov)


def table(res: dict) -> list[list[str]]:
    c, n = res["config"], res["naive"]
    rows = []
    for p in res.get("projects", [res["project"]]):
        rows.append([c["config"], f"{c['iterations']} x {c['policies']} x {c['steps']}",
                     f"{c['batch_size']} x {c['new_tokens']}",
                     f"{p['world_size']}, {c['backend']}, {c.get('dtype', 'float32')}",  # older JSONs: no dtype
                     common.fmt(p["wall_s"]), common.fmt(n["wall_s"]), common.fmt_ratio(n["wall_s"] / p["wall_s"]),
                     common.fmt(p["run_s"]), common.fmt(n["run_s"]), common.fmt_ratio(n["run_s"] / p["run_s"]),
                     f"{p['final_reward_mean']:+.4f} ({p['sft_reward_mean']:+.4f})",
                     f"{n['final_reward_mean']:+.4f} ({n['sft_reward_mean']:+.4f})", common.fmt(p["final_kl_mean"]),
                     common.fmt(n["final_kl_mean"])])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.naive:
        return naive_worker(args.naive, args.naive_out)
    import torch

    from warp_dist import checkpoint

    ranks_list = common.int_list(args.ranks)
    if torch.cuda.is_available():
        ranks_list = [min(r, torch.cuda.device_count()) for r in ranks_list]
    projects, cmds = [], []
    with tempfile.TemporaryDirectory(prefix="warp_bench_e2e_") as tmp:
        tmp = Path(tmp)
        cfg = build_config(args, tmp / "project")
        if cfg.rollout.backend in ("vllm", "auto"):
            # resolve 'auto' here so the report names the backend; vLLM missing -> HF (the table says so)
            cfg.rollout.backend = "vllm" if common.vllm_import_error() is None else "hf"
        backend = cfg.rollout.backend
        for ranks in ranks_list:
            cfg.output_dir = str(tmp / f"project{ranks}")
            cfg_path = checkpoint.write_yaml(tmp / f"config{ranks}.yaml", cfg.to_dict())
            # project: its own launcher, threads split between its ranks
            cmd = common.launch_cmd(ranks, ROOT / "launch" / "warp.py", ["--config", str(cfg_path)])
            wall_p, _ = common.run_timed(cmd, common.subprocess_env(**common.thread_env(ranks)), args.timeout,
                                         log_path=tmp / f"project{ranks}.log")
            summary = checkpoint_json(tmp / f"project{ranks}" / "summary.json")
            proj = {"wall_s": wall_p, "run_s": summary["timers_s"]["total"], "timers_s": summary["timers_s"],
                    "final_reward_mean": summary["final"]["reward_mean"],
                    "final_kl_mean": summary["final"]["kl_mean"], "final_reward_std": summary["final"]["reward_std"],
                    "sft_reward_mean": summary["sft"]["reward_mean"],
                    "final_identical_fraction": summary["final"]["identical_fraction"],
                    "weight_distance_to_sft": summary["final"]["weight_distance_to_sft"],
                    "world_size": summary["world_size"]}
            proj["reward_gain"] = proj["final_reward_mean"] - proj["sft_reward_mean"]
            projects.append(proj)
            cmds.append(" ".join(cmd))
        # naive: a fresh python process with every core, on the same config
        naive_out = tmp / "naive.json"
        ncmd = [common.python_bin(), str(Path(__file__).resolve()), "--naive", str(cfg_path), "--naive-out",
                str(naive_out)]
        wall_n, _ = common.run_timed(ncmd, common.subprocess_env(**common.thread_env(1)), args.timeout,
                                     log_path=tmp / "naive.log")
        naive = checkpoint_json(naive_out)
    proj = projects[0]
    nv = {"wall_s": wall_n, "run_s": naive["run_s"], "setup_s": naive["setup_s"],
          "final_reward_mean": naive["final"]["reward_mean"], "final_kl_mean": naive["final"]["kl_mean"],
          "final_reward_std": naive["final"]["reward_std"], "sft_reward_mean": naive["sft"]["reward_mean"],
          "final_identical_fraction": naive["final"]["identical_fraction"],
          "weight_distance_to_sft": naive["final"]["weight_distance_to_sft"]}
    nv["reward_gain"] = nv["final_reward_mean"] - nv["sft_reward_mean"]
    res = {
        "config": {"config": args.config, "model": cfg.model.name, "backend": backend, "dtype": cfg.model.dtype,
                   "ranks": ranks_list[0],
                   "ranks_list": ranks_list, "reward": cfg.reward.kind,
                   "iterations": args.iterations, "policies": args.policies, "steps": args.steps,
                   "batch_size": args.batch_size, "new_tokens": args.new_tokens, "eval_prompts": args.eval_prompts,
                   "eval_batch": args.eval_batch, "seed": args.seed, "project_command": cmds[0], "project_commands": cmds},
        "project": proj,
        "projects": projects,
        "naive": nv,
        "ratios": {"naive_over_project_wall": wall_n / proj["wall_s"],
                   "naive_over_project_wall_by_ranks": {str(p["world_size"]): wall_n / p["wall_s"] for p in projects}, "naive_over_project_run": nv["run_s"] / proj["run_s"],
                   "final_reward_project_minus_naive": proj["final_reward_mean"] - nv["final_reward_mean"],
                   "sft_reward_project_minus_naive": proj["sft_reward_mean"] - nv["sft_reward_mean"],
                   "weight_distance_to_sft_project_minus_naive":
                       proj["weight_distance_to_sft"] - nv["weight_distance_to_sft"]},
        "notes": "ratios > 1: the project is faster. Same eval prompts and eval seeds for both; the project "
                 f"samples with its '{backend}' backend on {', '.join(map(str, ranks_list))} rank(s), the naive loop with HF generate "
                 "on one process; project threads per rank = cores // ranks. Different backends draw different "
                 "samples from the same seeds, so compare each run's final reward with its own SFT reward "
                 "(reward_gain); with 1 rank and the HF backend both runs sample the same tokens and agree to rounding.",
    }
    return common.finish(NAME, args, argv, res, COLUMNS, table(res))


def checkpoint_json(path: Path) -> dict:
    if not path.exists():
        raise RuntimeError(f"{path} was not written")
    return json.loads(path.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
