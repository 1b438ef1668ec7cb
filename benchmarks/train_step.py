"""One RL step of WARP split into its phases: generate / score / forward-backward-optimizer / EMA / weight push.

    python benchmarks/train_step.py --size cpu                 # SmolLM2-135M, HF and (if importable) vLLM
    python benchmarks/train_step.py --size tiny --backends hf  # seconds

Runs `Warp.train_policy` (the trainer's own step loop, one policy, one rank) for --steps steps per rollout
backend and reads its history records; step 1 is the warm-up and is left out. Every step samples exactly
--new-tokens tokens per prompt (min = max new tokens) so the work per step is fixed.

- generate / score / weight push: the records' time_generate_s, time_score_s, time_sync_s.
- EMA: `warp_dist.rl.ema_update` timed on its own on the same parameter lists (median of 5, after a warm-up);
  the records' time_train_s includes it, so fwd+bwd+opt = time_train_s - EMA.
- generation tok/s = completion tokens / generate time; step tok/s = completion tokens / whole step.
- push share = weight push time / whole step (the price of an engine that holds its own copy of the weights).
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "train_step"
PRESETS = {
    "tiny": dict(model="embedded:tiny-gpt2", batch_size=4, new_tokens=8, prompt_tokens=8, steps=3, backends="hf,vllm"),
    "cpu": dict(model="embedded:smollm2-135m", batch_size=16, new_tokens=24, prompt_tokens=8, steps=4,
                backends="hf,vllm"),
    "gpu": dict(model="embedded:smollm2-135m", batch_size=64, new_tokens=64, prompt_tokens=16, steps=6,
                backends="hf,vllm"),
}
COLUMNS = ["backend", "model", "batch x new tokens", "generate s", "score s", "fwd+bwd+opt s", "EMA s",
           "weight push s", "step s", "gen tok/s", "step tok/s", "push share of step", "HF step / step"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--model", default=None, help="embedded:tiny-gpt2 | embedded:smollm2-135m | HF folder")
    ap.add_argument("--backends", default=None, help="comma list of hf, vllm (vllm is skipped if not importable)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step (one completion each)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion tokens per prompt (fixed)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="RL steps per backend; the first is the warm-up")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kv-cache-gb", type=float, default=0.0, help="vLLM-CPU KV cache (GiB); 0 = sized to the batch")
    args = common.apply_preset(ap.parse_args(argv), PRESETS)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is the warm-up)")
    return args


def warp_config(args, backend: str, out_dir: str):
    from warp_dist.config import config_from_dict

    b, t = args.batch_size, args.new_tokens
    return config_from_dict({
        "output_dir": out_dir, "progress": False, "log_every": 10**6,
        "model": {"name": args.model, "dtype": args.dtype},
        "data": {"prompt_min_tokens": args.prompt_tokens, "prompt_max_tokens": args.prompt_tokens,
                 "num_train_prompts": b * args.steps, "num_eval_prompts": 1, "seed": args.seed},
        "reward": {"kind": "vader"},
        "rollout": {"backend": backend, "max_new_tokens": t, "min_new_tokens": t,
                    "vllm": {"kv_cache_space_gb": args.kv_cache_gb}},
        "train": {"iterations": 1, "policies": 1, "steps": args.steps, "batch_size": b, "seed": args.seed},
    })


def time_ema(w, mu: float) -> float:
    """Median seconds of one EMA update over the trainable parameters (what the trainer does per step)."""
    import torch

    ref = w.reference.w
    snapshot = {n: ref.local(n).clone() for n in ref.names}
    res = common.timeit(lambda: w.reference.ema_update_(w.policy, mu), repeat=5, warmup=1)
    with torch.no_grad():
        for n, s in snapshot.items():
            ref.local(n).copy_(s)
    return res["median_s"]


def bench_backend(args, backend: str) -> dict:
    """Build a Warp for `backend`, run the step loop, average the timed steps' phases."""
    import torch

    from warp_dist.trainer import Warp

    with tempfile.TemporaryDirectory(prefix="warp_bench_step_") as tmp:
        cfg = warp_config(args, backend, tmp)
        t0 = time.perf_counter()
        w = Warp(cfg, log=lambda *_: None)
        setup_s = time.perf_counter() - t0
        try:
            res = w.train_policy(iteration=1, policy=0)
            ema_s = time_ema(w, cfg.train.mu)
            num_params = sum(w.policy.w.numels.values())
        finally:
            w.close()
    timed = res.history[1:]
    gen = common.mean(r["time_generate_s"] for r in timed)
    score = common.mean(r["time_score_s"] for r in timed)
    train = common.mean(r["time_train_s"] for r in timed)
    push = common.mean(r["time_sync_s"] for r in timed)
    tokens = common.mean(r["tokens_per_s"] * r["time_generate_s"] for r in timed)
    step = gen + score + train + push
    gaps = [r["sampler_logprob_gap"] for r in timed if "sampler_logprob_gap" in r]
    out = {
        "setup_s": setup_s, "timed_steps": len(timed), "tokens_per_step": tokens,
        "generate_s": gen, "score_s": score, "train_incl_ema_s": train,
        "fwd_bwd_opt_s": max(train - ema_s, 0.0), "ema_s": ema_s, "weight_push_s": push, "step_s": step,
        "generate_tokens_per_s": tokens / gen, "step_tokens_per_s": tokens / step,
        "weight_push_share": push / step,
        "share": {"generate": gen / step, "score": score / step, "fwd_bwd_opt": max(train - ema_s, 0.0) / step,
                  "ema": ema_s / step, "weight_push": push / step},
        "num_params": num_params,
        "sampler_logprob_gap": common.mean(gaps),
        "steps": [{k: r[k] for k in ("step", "time_generate_s", "time_score_s", "time_train_s", "time_sync_s",
                                     "tokens_per_s", "reward_mean")} for r in res.history],
    }
    del w, res
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def table(res: dict) -> list[list[str]]:
    c = res["config"]
    hf = res["backends"].get("hf", {})
    rows = []
    for name, r in res["backends"].items():
        if "skipped" in r:
            rows.append([name, c["model"], f"{c['batch_size']} x {c['new_tokens']}", f"skipped: {r['skipped']}",
                         *["-"] * (len(COLUMNS) - 4)])
            continue
        rows.append([name, c["model"], f"{c['batch_size']} x {c['new_tokens']}", common.fmt(r["generate_s"]),
                     common.fmt(r["score_s"]), common.fmt(r["fwd_bwd_opt_s"]), common.fmt(r["ema_s"]),
                     common.fmt(r["weight_push_s"]), common.fmt(r["step_s"]),
                     common.fmt(r["generate_tokens_per_s"]), common.fmt(r["step_tokens_per_s"]),
                     f"{100 * r['weight_push_share']:.1f}%",
                     common.fmt_ratio(common.ratio(hf.get("step_s"), r["step_s"])) if "step_s" in hf else "-"])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("hf", "vllm"):
            raise SystemExit(f"--backends: unknown backend {b!r}; allowed hf, vllm")
    results = {}
    for b in backends:
        if b == "vllm":
            why = common.vllm_import_error()
            if why is not None:
                results[b] = {"skipped": f"vLLM not importable ({why})"}
                continue
            try:
                results[b] = bench_backend(args, b)
            except Exception as exc:  # noqa: BLE001 - keep the HF numbers; the table and JSON say what failed
                first = (str(exc).splitlines() or [""])[0][:300]
                results[b] = {"skipped": f"failed: {type(exc).__name__}: {first}"}
            continue
        results[b] = bench_backend(args, b)
    hf, vl = results.get("hf", {}), results.get("vllm", {})
    ratios = {}
    if "step_s" in hf and "step_s" in vl:
        ratios = {"hf_step_over_vllm_step": hf["step_s"] / vl["step_s"],
                  "hf_generate_over_vllm_generate": hf["generate_s"] / vl["generate_s"]}
    res = {
        "config": {"model": args.model, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
                   "prompt_tokens": args.prompt_tokens, "steps": args.steps, "warmup_steps": 1,
                   "dtype": args.dtype, "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "torch_threads": torch.get_num_threads()},
        "backends": results,
        "ratios": ratios,
        "notes": "per-step means over the timed steps (step 1 left out); fwd+bwd+opt = time_train_s - EMA, "
                 "EMA timed separately with rl.ema_update on the same parameters",
    }
    res["rows"] = table(res)
    return common.finish(NAME, args, argv, res, COLUMNS, res["rows"])


if __name__ == "__main__":
    main(sys.argv[1:])
