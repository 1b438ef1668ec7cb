"""A whole WARP run with this project vs a deliberately naive single-process loop of the same config.

    python benchmarks/e2e.py --size cpu       # SmolLM2-135M, demo config shortened; project on 2 ranks
    python benchmarks/e2e.py --size tiny      # tiny GPT-2, seconds

project: `launch/warp.py` on the config (`accelerate launch --num_processes R` when --ranks > 1): its rollout
         backend, policies on their own ranks, streaming merge, sharded evaluation, saved final model.
naive:   this file's `naive_run`, in a fresh `python` process: HF generate, the M policies one after the other,
         `merging.merge_state_dicts` on whole in-memory state dicts, no weight versions, no sharding; the same
         warp_dist.rl / merging / rewards / data / evaluation functions, the same seeds, prompt order and
         evaluations (SFT first, theta_slerp after each iteration but the last when eval.every_iteration, final).
Both write their final evaluation on the same held-out prompts with the same sampling seeds, so the final reward
and KL say whether speed was bought with quality. With --ranks 1 and the HF backend the two runs sample the same
tokens and their numbers should agree to rounding. Walls are the processes' wall times (startup included);
`run` times leave out setup (loading model, data, reward, engines).
"""

from __future__ import annotations

import argparse
import copy
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
    "tiny": dict(config="configs/tiny.yaml", model="", backend="", ranks=1, iterations=2, policies=2, steps=2,
                 batch_size=8, new_tokens=8, eval_prompts=8, eval_batch=8, timeout=300),
    "cpu": dict(config="configs/demo.yaml", model="", backend="", ranks=2, iterations=2, policies=2, steps=3,
                batch_size=8, new_tokens=16, eval_prompts=32, eval_batch=16, timeout=900),
    "gpu": dict(config="configs/demo.yaml", model="", backend="", ranks=2, iterations=2, policies=2, steps=25,
                batch_size=32, new_tokens=48, eval_prompts=128, eval_batch=32, timeout=3600),
}
COLUMNS = ["config", "I x M x T", "batch x tokens", "project (ranks, backend)", "project wall s", "naive wall s",
           "naive / project wall", "project run s", "naive run s", "naive / project run",
           "final reward project (SFT)", "final reward naive (SFT)", "KL project", "KL naive"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--config", default=None, help="WARP preset YAML (relative to the repository root)")
    ap.add_argument("--model", default=None, help="override model.name ('' = the config's)")
    ap.add_argument("--backend", default=None, help="override rollout.backend for the project run ('' = config's)")
    ap.add_argument("--ranks", type=int, default=None, help="ranks of the project run (1 = plain python)")
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
    """WARP the simple way, one process, as a user writes it in an afternoon with plain transformers: HF `generate`,
    a full forward/backward of the policy, a full forward of the EMA anchor, whole-model deep copies and
    state-dict merges. Same algorithm, data, reward and seeds as the project; the reference point for its engineering.
    """
    import torch

    from warp_dist import merging, rl
    from warp_dist.data import load_prompts
    from warp_dist.models import load_causal_lm, load_tokenizer, resolve_model_path
    from warp_dist.rewards import build_reward
    from warp_dist.trainer import policy_seed

    t_start = time.perf_counter()
    tc, ec, ro = cfg.train, cfg.eval, cfg.rollout
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, "float32", device)
    sft_model = copy.deepcopy(model).requires_grad_(False)
    reward_fn = build_reward(cfg.reward, device)
    train_prompts, eval_prompts = load_prompts(cfg.data, tok)
    sft_state = merging.clone_state(model.state_dict())
    pad = tok.pad_token_id
    t_setup = time.perf_counter() - t_start

    def sample(prompts, seed):
        """HF generate on a left-padded batch; returns (input_ids [B, L], prompt length P, completion mask)."""
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)
        att = (torch.arange(P, device=device) >= torch.tensor([P - len(p) for p in prompts], device=device)[:, None])
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=att.long(), do_sample=True, max_new_tokens=ro.max_new_tokens,
                             min_new_tokens=ro.min_new_tokens or None, temperature=ro.temperature, top_k=ro.top_k,
                             top_p=ro.top_p, pad_token_id=pad)
        comp = out[:, P:]
        done = (comp == tok.eos_token_id).cumsum(-1)
        cmask = (done == 0) | ((done == 1) & (comp == tok.eos_token_id))  # up to and including the first EOS
        full_att = torch.cat([att.long(), cmask.long()], 1)
        return out, full_att, P, cmask.float()

    def seq_logp(m, ids, att, P):
        logits = m(input_ids=ids, attention_mask=att).logits[:, P - 1:-1].float() / ro.temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)

    def run_eval(state, sft_texts):
        model.load_state_dict(state)
        rewards, kls, texts = [], [], []
        with torch.no_grad():
            for k, i in enumerate(range(0, len(eval_prompts), ec.batch_size)):
                ids, att, P, cm = sample(eval_prompts.ids[i:i + ec.batch_size], ec.seed + k)
                comp = [tok.decode(c[m.bool()], skip_special_tokens=True) for c, m in zip(ids[:, P:], cm, strict=True)]
                rewards += reward_fn(eval_prompts.texts[i:i + ec.batch_size], comp).tolist()
                kls += ((seq_logp(model, ids, att, P) - seq_logp(sft_model, ids, att, P)) * cm).sum(-1).tolist()
                texts += comp
        same = sum(a == b for a, b in zip(texts, sft_texts, strict=True)) / len(texts) if sft_texts else 1.0
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        return {"reward_mean": mean, "reward_std": std, "kl_mean": sum(kls) / len(kls),
                "identical_fraction": same, "num_prompts": len(rewards)}, texts

    t0 = time.perf_counter()
    sft_eval, sft_texts = run_eval(sft_state, None)
    init, slerp_state, evals = sft_state, sft_state, []
    for it in range(1, tc.iterations + 1):
        finals = []
        for m in range(tc.policies):
            seed = policy_seed(tc.seed, it, m)
            torch.manual_seed(seed)
            model.load_state_dict(init)
            ema = copy.deepcopy(model).requires_grad_(False)
            if tc.anchor == "sft":
                ema.load_state_dict(sft_state)
            params = [p for p in model.parameters() if p.requires_grad]
            ema_params = [e for e, p in zip(ema.parameters(), model.parameters(), strict=True) if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
            order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(seed)).tolist()
            for step in range(1, tc.steps + 1):
                idx = [order[((step - 1) * tc.batch_size + j) % len(order)] for j in range(tc.batch_size)]
                with torch.no_grad():
                    ids, att, P, cm = sample([train_prompts.ids[j] for j in idx], seed * 100003 + step)
                comp = [tok.decode(c[k.bool()], skip_special_tokens=True) for c, k in zip(ids[:, P:], cm, strict=True)]
                reward = reward_fn([train_prompts.texts[j] for j in idx], comp).to(device)
                logp = seq_logp(model, ids, att, P)
                with torch.no_grad():
                    logp_ema = seq_logp(ema, ids, att, P)
                shaped = rl.kl_shaped_reward(reward, logp.detach(), logp_ema, cm, tc.beta)
                loss = rl.reinforce_loss(rl.sequence_logprob(logp, cm), shaped - rl.baseline(shaped, tc.baseline))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                opt.step()
                if tc.anchor != "sft":
                    rl.ema_update(ema_params, params, tc.mu)
            finals.append(merging.clone_state(model.state_dict()))
            del ema, opt
        slerp_state, init = merging.merge_state_dicts(init, finals, cfg.merge.lam, cfg.merge.eta)
        del finals
        if ec.every_iteration and it < tc.iterations:
            evals.append(run_eval(slerp_state, sft_texts)[0])
    final, _ = run_eval(slerp_state, sft_texts)
    t_run = time.perf_counter() - t0
    return {"sft": sft_eval, "final": {**final, "weight_distance_to_sft": merging.distance(slerp_state, sft_state)},
            "iteration_evals": evals, "setup_s": t_setup, "run_s": t_run, "total_s": time.perf_counter() - t_start}


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
    return load_config(ROOT / args.config, ov)


def table(res: dict) -> list[list[str]]:
    c, p, n = res["config"], res["project"], res["naive"]
    return [[c["config"], f"{c['iterations']} x {c['policies']} x {c['steps']}",
             f"{c['batch_size']} x {c['new_tokens']}", f"{c['ranks']}, {c['backend']}", common.fmt(p["wall_s"]),
             common.fmt(n["wall_s"]), common.fmt_ratio(res["ratios"]["naive_over_project_wall"]),
             common.fmt(p["run_s"]), common.fmt(n["run_s"]), common.fmt_ratio(res["ratios"]["naive_over_project_run"]),
             f"{p['final_reward_mean']:+.4f} ({p['sft_reward_mean']:+.4f})",
             f"{n['final_reward_mean']:+.4f} ({n['sft_reward_mean']:+.4f})", common.fmt(p["final_kl_mean"]),
             common.fmt(n["final_kl_mean"])]]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.naive:
        return naive_worker(args.naive, args.naive_out)
    import torch

    from warp_dist import checkpoint

    if torch.cuda.is_available() and args.ranks > torch.cuda.device_count():
        print(f"--ranks {args.ranks}: only {torch.cuda.device_count()} GPU(s), using that many ranks", flush=True)
        args.ranks = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="warp_bench_e2e_") as tmp:
        tmp = Path(tmp)
        cfg = build_config(args, tmp / "project")
        cfg_path = checkpoint.write_yaml(tmp / "config.yaml", cfg.to_dict())
        if cfg.rollout.backend in ("vllm", "auto"):
            # resolve 'auto' here so the report names the backend; vLLM missing -> HF (the table says so)
            cfg.rollout.backend = "vllm" if common.vllm_import_error() is None else "hf"
            cfg_path = checkpoint.write_yaml(tmp / "config.yaml", cfg.to_dict())
        backend = cfg.rollout.backend
        # project: its own launcher, threads split between its ranks
        cmd = common.launch_cmd(args.ranks, ROOT / "launch" / "warp.py", ["--config", str(cfg_path)])
        wall_p, _ = common.run_timed(cmd, common.subprocess_env(**common.thread_env(args.ranks)), args.timeout,
                                     log_path=tmp / "project.log")
        summary = checkpoint_json(tmp / "project" / "summary.json")
        # naive: a fresh python process with every core
        naive_out = tmp / "naive.json"
        ncmd = [common.python_bin(), str(Path(__file__).resolve()), "--naive", str(cfg_path), "--naive-out",
                str(naive_out)]
        wall_n, _ = common.run_timed(ncmd, common.subprocess_env(**common.thread_env(1)), args.timeout,
                                     log_path=tmp / "naive.log")
        naive = checkpoint_json(naive_out)
    proj = {"wall_s": wall_p, "run_s": summary["timers_s"]["total"], "timers_s": summary["timers_s"],
            "final_reward_mean": summary["final"]["reward_mean"], "final_kl_mean": summary["final"]["kl_mean"],
            "final_reward_std": summary["final"]["reward_std"], "sft_reward_mean": summary["sft"]["reward_mean"],
            "final_identical_fraction": summary["final"]["identical_fraction"],
            "weight_distance_to_sft": summary["final"]["weight_distance_to_sft"], "world_size": summary["world_size"]}
    proj["reward_gain"] = proj["final_reward_mean"] - proj["sft_reward_mean"]
    nv = {"wall_s": wall_n, "run_s": naive["run_s"], "setup_s": naive["setup_s"],
          "final_reward_mean": naive["final"]["reward_mean"], "final_kl_mean": naive["final"]["kl_mean"],
          "final_reward_std": naive["final"]["reward_std"], "sft_reward_mean": naive["sft"]["reward_mean"],
          "final_identical_fraction": naive["final"]["identical_fraction"],
          "weight_distance_to_sft": naive["final"]["weight_distance_to_sft"]}
    nv["reward_gain"] = nv["final_reward_mean"] - nv["sft_reward_mean"]
    res = {
        "config": {"config": args.config, "model": cfg.model.name, "backend": backend, "ranks": args.ranks,
                   "iterations": args.iterations, "policies": args.policies, "steps": args.steps,
                   "batch_size": args.batch_size, "new_tokens": args.new_tokens, "eval_prompts": args.eval_prompts,
                   "eval_batch": args.eval_batch, "seed": args.seed, "project_command": " ".join(cmd)},
        "project": proj,
        "naive": nv,
        "ratios": {"naive_over_project_wall": wall_n / wall_p, "naive_over_project_run": nv["run_s"] / proj["run_s"],
                   "final_reward_project_minus_naive": proj["final_reward_mean"] - nv["final_reward_mean"],
                   "sft_reward_project_minus_naive": proj["sft_reward_mean"] - nv["sft_reward_mean"],
                   "weight_distance_to_sft_project_minus_naive":
                       proj["weight_distance_to_sft"] - nv["weight_distance_to_sft"]},
        "notes": "ratios > 1: the project is faster. Same eval prompts and eval seeds for both; the project "
                 f"samples with its '{backend}' backend on {args.ranks} rank(s), the naive loop with HF generate "
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
