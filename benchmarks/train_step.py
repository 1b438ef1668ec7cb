"""One RL step: the project's settings side by side with a naive loop, in one run, phase by phase.

    python benchmarks/train_step.py --size cpu                 # SmolLM2-135M, the demo's step shape
    python benchmarks/train_step.py --size tiny                # seconds (the test suite)

naive:    benchmarks/naive.py `NaiveWarp.step` — HF `generate`, fp32, full-sequence logits, a full forward of an EMA
          copy, `loss.backward()`, plain AdamW, EMA update (what a user writes with transformers in an afternoon).
project:  `training.rl_step.rl_step` (the trainer's own step) for each --variants entry, e.g. `fp32-hf` (fp32 compute, HF
          backend), `fp32-vllm` (the demo's setting on a CPU without bf16 instructions), `bf16-vllm` (bf16 autocast
          compute with fp32 master weights and EMA, vLLM rollouts: the demo's setting on a CPU with them). Every
          variant and the naive loop run the same prompts, reward and hyper-parameters, one after the other, each
          in a fresh `python` process (--in-process: all in this one; an earlier run's engines and allocator state
          then slowed later ones: bf16-vllm 4.5-5.1 s per step there, 3.6-3.8 s alone); every step samples exactly
          --new-tokens tokens (min = max) so the work per step is fixed. Step 1 of each is a warm-up; the table
          shows medians over the timed steps.
Columns: generate / score (reward) / train (forward, anchor forward, backward, optimizer, EMA) / weight push (into
the rollout engine; none for naive and HF) / step, tokens per second of the whole step, and step / naive step (the
goal of the speed issue is <= 0.5x). Quality is checked by benchmarks/e2e.py (final rewards of a whole run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
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
    "tiny": dict(model="embedded:tiny-gpt2", batch_size=4, new_tokens=8, prompt_tokens=8, steps=3,
                 variants="fp32-hf,bf16-hf,fp32-vllm"),
    "cpu": dict(model="embedded:smollm2-135m", batch_size=16, new_tokens=24, prompt_tokens=8, steps=5,
                variants="fp32-hf,fp32-vllm,bf16-hf,bf16-vllm"),
    "gpu": dict(model="embedded:smollm2-135m", batch_size=64, new_tokens=64, prompt_tokens=16, steps=6,
                variants="fp32-hf,bf16-hf"),
}
VARIANTS = {"fp32-hf": ("float32", "hf"), "fp32-vllm": ("float32", "vllm"), "bf16-hf": ("bfloat16", "hf"),
            "bf16-vllm": ("bfloat16", "vllm")}
COLUMNS = ["run", "model", "batch x new tokens", "generate s", "score s", "train s", "weight push s", "step s",
           "step tok/s", "push share", "step / naive"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--model", default=None, help="embedded:tiny-gpt2 | embedded:smollm2-135m | HF folder")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step (one completion each)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion tokens per prompt (fixed)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per run; the first is the warm-up")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    ap.add_argument("--in-process", action="store_true",
                    help="run the naive loop and every variant in this process, one after another (default: each in "
                         "a fresh process, so no run inherits an earlier one's engines, threads or allocator state)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--roofline", action="store_true",
                    help="also count the train phase's matmul FLOPs, time torch.mm on the model's shape in fp32 and "
                         "bf16, and say how close each run's train phase is to that rate (the 'roofline' record)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the parts of the train phase (policy forward, anchor forward, backward + clip + "
                         "optimizer, EMA) and of the push, per call; medians go to each run's 'breakdown_s'")
    args = common.apply_preset(ap.parse_args(argv), PRESETS)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is the warm-up)")
    unknown = [v for v in args.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; allowed {', '.join(VARIANTS)}")
    return args


def warp_config(args, dtype: str, backend: str, out_dir: str):
    from warp_dist.config import config_from_dict

    b, t = args.batch_size, args.new_tokens
    return config_from_dict({
        "output_dir": out_dir, "progress": False, "log_every": 10**6,
        "model": {"name": args.model, "dtype": dtype},
        "data": {"prompt_min_tokens": args.prompt_tokens, "prompt_max_tokens": args.prompt_tokens,
                 "num_train_prompts": b * args.steps, "num_eval_prompts": 1, "seed": args.seed},
        "reward": {"kind": "vader"},
        "rollout": {"backend": backend, "max_new_tokens": t, "min_new_tokens": t},
        "train": {"iterations": 1, "policies": 1, "steps": args.steps, "batch_size": b, "seed": args.seed,
                  "lr": 1e-5},
    })


def summarize(steps: list[dict]) -> dict:
    timed = steps[1:]
    med = {k: statistics.median(s[k] for s in timed) for k in ("generate_s", "score_s", "train_s", "push_s", "step_s")}
    tokens = statistics.median(s["tokens"] for s in timed)
    return {**med, "tokens_per_step": tokens, "step_tokens_per_s": tokens / med["step_s"],
            "push_share": med["push_s"] / med["step_s"], "rewards": [s["reward_mean"] for s in steps],
            "steps": steps}


def bench_naive(args) -> dict:
    """The naive loop on the same prompts (benchmarks/naive.py)."""
    import torch

    from benchmarks.naive import NaiveWarp

    with tempfile.TemporaryDirectory(prefix="warp_bench_naive_") as tmp:
        cfg = warp_config(args, "float32", "hf", tmp)
        nw = NaiveWarp(cfg)
        nw.start_policy(nw.sft_state)
        b = args.batch_size
        steps = []
        for s in range(args.steps):
            ids = nw.train_prompts.ids[s * b:(s + 1) * b]
            texts = nw.train_prompts.texts[s * b:(s + 1) * b]
            rec = nw.step(ids, texts, seed=1000 + s)
            steps.append({**rec, "push_s": 0.0})
        del nw
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return summarize(steps)


def bench_variant(args, name: str) -> dict:
    """The trainer's own step (`training.rl_step.rl_step`) for one dtype x backend."""
    from warp_dist.training.rl_step import rl_step
    from warp_dist.training.session import Session

    dtype, backend = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="warp_bench_step_") as tmp:
        cfg = warp_config(args, dtype, backend, tmp)
        t0 = time.perf_counter()
        w = Session(cfg, log=lambda *_: None)
        setup_s = time.perf_counter() - t0
        parts: dict[str, list[float]] = {}
        if args.breakdown:
            timed_calls(w, parts)
        try:
            w.policy.begin(w.init)
            w.reference.load_(w.init.part, "ema")
            w.push_weights()
            order = list(range(len(w.train_prompts)))
            steps = []
            for s in range(1, args.steps + 1):
                r = rl_step(w, 1, 0, s, 1000, order)
                steps.append({"generate_s": r["time_generate_s"], "score_s": r["time_score_s"],
                              "train_s": r["time_train_s"], "push_s": r["time_sync_s"],
                              "step_s": r["time_generate_s"] + r["time_score_s"] + r["time_train_s"] + r["time_sync_s"],
                              "reward_mean": r["reward_mean"], "tokens": r["length_mean"] * args.batch_size,
                              "sampler_logprob_gap": r.get("sampler_logprob_gap")})
        finally:
            w.close()
    out = summarize(steps)
    out["setup_s"] = setup_s
    if parts:  # the first step's calls (and the push before it) are the warm-up
        out["breakdown_s"] = {k: statistics.median(v[-(args.steps - 1):]) for k, v in parts.items()}
    gc.collect()
    return out


def bench_one(args, name: str) -> dict:
    return bench_naive(args) if name == "naive" else bench_variant(args, name)


def run_child(args, argv, name: str) -> dict:
    """One run (the naive loop or a variant) in a fresh `python` process with this command's settings."""
    return common.rerun_as_child(__file__, argv, name, f"train_step run {name!r}")


def timed_calls(w, parts: dict[str, list[float]]) -> None:
    """Wrap the trainer's forward passes, optimizer step, EMA update and weight push with wall-clock timers."""
    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts.setdefault(key, []).append(time.perf_counter() - t0)
        setattr(obj, attr, timed)

    wrap(w.policy, "loss_logits", "policy forward")
    wrap(w.reference, "logits", "anchor forward")
    wrap(w.policy, "step", "backward + clip + optimizer")
    wrap(w.reference, "ema_update_", "EMA update")
    wrap(w.backend, "update_weights", "weight push")


def train_flops(args) -> dict:
    """Matmul FLOPs of one step's train phase, counted from the model: every nn.Linear but the LM head over all
    B x (prompt + completion) tokens, the LM head over the B x C completion positions only (what the project's step
    computes; the naive loop projects every position: `naive_train_flops`); forward = 2 x weights x rows, backward =
    2 x forward, and the train phase = policy forward + backward + anchor forward = 4 x forward. Attention scores
    (sequences of 32 tokens), the optimizer and element-wise work are left out, so the count is a floor."""
    import torch

    from warp_dist.models import load_causal_lm, resolve_model_path

    model = load_causal_lm(resolve_model_path(args.model), "float32", "cpu")
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules()  # GPT-2's Conv1D layers are linear maps too
               if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head)
    head_numel = head.weight.numel()
    cfg = model.config
    hidden = cfg.hidden_size
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    del model
    rows = args.batch_size * (args.prompt_tokens + args.new_tokens)
    forward = 2 * body * rows + 2 * head_numel * args.batch_size * args.new_tokens
    naive_forward = 2 * (body + head_numel) * rows  # the naive loop projects every position
    return {"linear_weights": body, "head_weights": head_numel, "forward_flops": forward, "train_flops": 4 * forward,
            "naive_train_flops": 4 * naive_forward, "mlp_shape": [rows, hidden, inner]}


def matmul_rate(dtype_name: str, rows: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of torch.mm [rows, k] x [k, n] in this dtype on this machine (the model's own matmul shape), best of
    the calls over ~`seconds` after a warm-up."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(rows, k).to(dt), torch.randn(k, n).to(dt)
    for _ in range(3):
        torch.mm(a, b)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        common.sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * k * n / best


def roofline(args, runs: dict) -> dict:
    """How close each run's train phase is to what this machine's matmuls allow: the step's train FLOPs over its
    train time against torch.mm's rate on the model's MLP shape, and the step it would take with the train phase
    at that rate (generate, score and push as measured)."""
    flops = train_flops(args)
    shape = flops["mlp_shape"]
    rates = {dt: matmul_rate(dt, *shape) for dt in ("float32", "bfloat16")}
    naive = runs.get("naive", {}).get("step_s")
    out = {"flops": flops, "matmul_shape": shape, "matmul_flops_per_s": rates, "runs": {}}
    for name, r in runs.items():
        if "train_s" not in r:
            continue
        dt = "float32" if name == "naive" else VARIANTS[name][0]
        work = flops["naive_train_flops" if name == "naive" else "train_flops"]
        floor_train = work / rates[dt]
        best_step = r["step_s"] - r["train_s"] + floor_train
        out["runs"][name] = {"train_flops_per_s": work / r["train_s"], "of_matmul_rate": work / r["train_s"] / rates[dt],
                             "train_s_at_matmul_rate": floor_train, "step_s_at_matmul_rate": best_step,
                             "best_step_over_naive": best_step / naive if naive else None}
    return out


def roofline_note(rf: dict) -> str:
    f, rates = rf["flops"], rf["matmul_flops_per_s"]
    parts = [f"roofline: train phase = {f['train_flops'] / 1e9:.0f} GFLOP per step (policy forward + backward + anchor "
             f"forward, matmuls only); torch.mm {' x '.join(map(str, rf['matmul_shape']))} runs at "
             f"{rates['float32'] / 1e9:.0f} GFLOP/s fp32 and {rates['bfloat16'] / 1e9:.0f} GFLOP/s bf16 here"]
    for name, r in rf["runs"].items():
        ratio = f", {r['best_step_over_naive']:.2f}x naive" if r["best_step_over_naive"] else ""
        parts.append(f"{name}: train at {r['train_flops_per_s'] / 1e9:.0f} GFLOP/s ({100 * r['of_matmul_rate']:.0f} % of "
                     f"that rate); at 100 % its step would be {r['step_s_at_matmul_rate']:.2f} s{ratio}")
    return "; ".join(parts)


def table(res: dict) -> list[list[str]]:
    c, naive = res["config"], res["runs"].get("naive", {})
    rows = []
    for name, r in res["runs"].items():
        if "skipped" in r:
            rows.append([name, c["model"], f"{c['batch_size']} x {c['new_tokens']}", f"skipped: {r['skipped']}",
                         *["-"] * (len(COLUMNS) - 4)])
            continue
        rows.append([name, c["model"], f"{c['batch_size']} x {c['new_tokens']}", common.fmt(r["generate_s"]),
                     common.fmt(r["score_s"]), common.fmt(r["train_s"]), common.fmt(r["push_s"]),
                     common.fmt(r["step_s"]), common.fmt(r["step_tokens_per_s"]), f"{100 * r['push_share']:.1f}%",
                     common.fmt_ratio(common.ratio(r["step_s"], naive.get("step_s")))])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    if args.child:  # one run, in the fresh process the parent started; its result goes to a JSON file
        name, out = args.child.split("=", 1)
        res = bench_one(args, name)
        common.write_json_atomic(out, res)
        return res
    runs = {}
    names = ([] if args.no_naive else ["naive"]) + [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        if name != "naive" and VARIANTS[name][1] == "vllm" and common.vllm_import_error() is not None:
            runs[name] = {"skipped": f"vLLM not importable ({common.vllm_import_error()})"}
        elif args.in_process:
            torch.manual_seed(args.seed)
            runs[name] = bench_one(args, name)
        else:
            runs[name] = run_child(args, argv, name)
    naive = runs.get("naive", {})
    ratios = {name: r["step_s"] / naive["step_s"] for name, r in runs.items()
              if name != "naive" and "step_s" in r and "step_s" in naive}
    res = {
        "config": {"model": args.model, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
                   "prompt_tokens": args.prompt_tokens, "steps": args.steps, "warmup_steps": 1,
                   "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()},
        "runs": runs,
        "step_over_naive": ratios,
        "notes": "medians over the timed steps (step 1 of every run left out); every run samples the same prompts",
    }
    if args.roofline:
        res["roofline"] = roofline(args, runs)
        res["notes"] += ". " + roofline_note(res["roofline"])
    res["rows"] = table(res)
    for name, r in runs.items():
        if "breakdown_s" in r:
            print(f"{name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["breakdown_s"].items()), flush=True)
    return common.finish(NAME, args, argv, res, COLUMNS, res["rows"])


if __name__ == "__main__":
    main(sys.argv[1:])
