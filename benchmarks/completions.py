"""k completions per prompt (rollout.num_completions, RLOO per prompt): throughput and reward gain per second.

    python benchmarks/completions.py --size cpu      # SmolLM2-135M, vLLM, 16 completions per step, k = 1, 2, 4
    python benchmarks/completions.py --size tiny     # the test suite

For each k the trainer runs one policy (`training.rl_step.train_policy`, the real RL loop) with the same number of completions per
step (batch_size = completions / k prompts, k completions each: the prompt is one vLLM request with n = k, prefilled
once) from the same SFT start. Reported per k: generated tokens per second of sampling, whole-step tokens per second,
and the reward gain per second of training time: (mean batch reward of the last third of the steps - mean of the
first third) / the seconds those steps took. Rewards are noisy at this size: read the gain with its spread (the
standard error of the two thirds' difference is given).
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "completions"
PRESETS = {
    "tiny": dict(model="embedded:tiny-gpt2", completions=8, new_tokens=8, steps=6, ks="1,2,4", backend="vllm",
                 lr=1e-3),
    "cpu": dict(model="embedded:smollm2-135m", completions=16, new_tokens=24, steps=24, ks="1,2,4", backend="vllm",
                lr=4e-5),
    "gpu": dict(model="embedded:smollm2-135m", completions=64, new_tokens=64, steps=30, ks="1,2,4", backend="hf",
                lr=4e-5),
}
COLUMNS = ["k", "prompts x k", "steps", "sampling tok/s", "step tok/s", "step s", "reward first third",
           "reward last third", "gain / s (± se)"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--completions", type=int, default=None, help="completions per step (divisible by every k)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ks", default=None, help="comma list of k")
    ap.add_argument("--backend", default=None, choices=("hf", "vllm"))
    ap.add_argument("--lr", type=float, default=None)
    args = common.apply_preset(ap.parse_args(argv), PRESETS)
    ks = common.int_list(args.ks)
    if not ks or any(k < 1 or args.completions % k for k in ks):
        ap.error(f"--ks: every k must be >= 1 and divide --completions={args.completions}")
    if args.steps < 3:
        ap.error("--steps must be >= 3 (first and last thirds)")
    return args


def run_k(args, k: int) -> dict:
    from warp_dist.config import config_from_dict
    from warp_dist.training.rl_step import train_policy
    from warp_dist.training.session import Session

    prompts = args.completions // k
    with tempfile.TemporaryDirectory(prefix="warp_bench_k_") as tmp:
        cfg = config_from_dict({
            "output_dir": tmp, "progress": False, "log_every": 10**6, "log_with": "none",
            "model": {"name": args.model},
            "data": {"num_train_prompts": max(prompts * args.steps, 16), "num_eval_prompts": 1, "seed": args.seed},
            "reward": {"kind": "vader"},
            "rollout": {"backend": args.backend, "max_new_tokens": args.new_tokens, "num_completions": k},
            "train": {"iterations": 1, "policies": 1, "steps": args.steps, "batch_size": prompts, "lr": args.lr,
                      "seed": args.seed, "baseline": "loo"},
        })
        s = Session(cfg, log=lambda *_: None)
        try:
            hist = train_policy(s, 1, 0)
        finally:
            s.close()
    third = max(1, len(hist) // 3)
    first, last = hist[:third], hist[-third:]
    step_s = [r["time_generate_s"] + r["time_score_s"] + r["time_train_s"] + r["time_sync_s"] for r in hist]
    tokens = [r["length_mean"] * args.completions for r in hist]
    r1, r2 = [r["reward_mean"] for r in first], [r["reward_mean"] for r in last]
    span = sum(step_s[third:len(hist) - third]) + (step_s[third - 1] + step_s[-third]) / 2  # first -> last third
    gain = (statistics.mean(r2) - statistics.mean(r1))
    se = math.sqrt(statistics.pvariance(r1) / len(r1) + statistics.pvariance(r2) / len(r2))
    timed = hist[1:]  # step 1 is the warm-up
    return {"k": k, "prompts": prompts, "steps": len(hist),
            "sampling_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_tokens_per_s": statistics.median(t / s for t, s in zip(tokens[1:], step_s[1:], strict=True)),
            "step_s": statistics.median(step_s[1:]), "reward_first_third": statistics.mean(r1),
            "reward_last_third": statistics.mean(r2), "reward_gain": gain, "reward_gain_se": se,
            "gain_seconds": span, "reward_gain_per_s": gain / span, "reward_gain_per_s_se": se / span,
            "rewards": [r["reward_mean"] for r in hist]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend == "vllm" and common.vllm_import_error() is not None:
        raise SystemExit(f"--backend vllm: vLLM not importable ({common.vllm_import_error()})")
    runs = [run_k(args, k) for k in common.int_list(args.ks)]
    res = {"config": {"model": args.model, "completions_per_step": args.completions, "new_tokens": args.new_tokens,
                      "steps": args.steps, "backend": args.backend, "lr": args.lr}, "runs": runs,
           "notes": "same completions per step for every k (prompts x k); gain / s = (last third's mean batch reward "
                    "- first third's) / seconds between them; se = standard error of that difference / seconds"}
    return common.finish(NAME, args, argv, res, COLUMNS, table(res))


def table(res: dict) -> list[list[str]]:
    return [[str(r["k"]), f"{r['prompts']} x {r['k']}", str(r["steps"]), common.fmt(r["sampling_tokens_per_s"]),
             common.fmt(r["step_tokens_per_s"]), common.fmt(r["step_s"]), f"{r['reward_first_third']:+.3f}",
             f"{r['reward_last_third']:+.3f}", f"{r['reward_gain_per_s']:+.2e} (± {r['reward_gain_per_s_se']:.1e})"]
            for r in res["runs"]]


if __name__ == "__main__":
    main(sys.argv[1:])
