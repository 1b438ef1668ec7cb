"""Rollout throughput: HF `generate` vs the vLLM backend on the same IMDB prompts, in one run.

    python benchmarks/rollout.py --size cpu                      # tiny GPT-2, CPU preset
    python benchmarks/rollout.py --model embedded:smollm2-135m --size cpu

Both backends sample (temperature 1, no top-k/top-p) exactly --new-tokens tokens per prompt (min = max, so EOS
cannot shorten one side), each after a warm-up generate; tokens/s = generated tokens / wall time of one timed
generate. Writes a JSON result (atomically) and prints a Markdown table row. `main(argv)` returns the result dict.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {  # num_prompts, prompt_tokens, new_tokens
    "cpu": (64, 8, 48),
    "gpu": (512, 16, 128),
}
HEADER = ("| model | device | prompts | prompt tokens | new tokens | HF tok/s | vLLM tok/s | vLLM/HF |\n"
          "|---|---|---|---|---|---|---|---|")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny-gpt2", help="embedded:tiny-gpt2 | embedded:smollm2-135m | path")
    ap.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="preset for the three sizes below")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout.json"))
    args = ap.parse_args(argv)
    n, p, t = PRESETS[args.size]
    args.num_prompts = args.num_prompts or n
    args.prompt_tokens = args.prompt_tokens or p
    args.new_tokens = args.new_tokens or t
    return args


def imdb_prompts(tok, n: int, length: int) -> list[list[int]]:
    from warp_dist.data import load_bundled_reviews

    prompts = []
    for text in load_bundled_reviews(seed=0):
        ids = tok(text[: 20 * length])["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    raise RuntimeError(f"only {len(prompts)} reviews have {length} tokens")


def timed(backend, prompts, sampling, seed) -> float:
    """Tokens/s of one generate, after a warm-up generate on a slice of the prompts."""
    import torch

    backend.generate(prompts[: max(1, min(8, len(prompts)))], sampling, seed=seed + 1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gens = backend.generate(prompts, sampling, seed=seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return gens.num_tokens / (time.perf_counter() - t0)


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import vllm

    from warp_dist.config import VllmConfig
    from warp_dist.models import eos_token_ids, load_causal_lm, load_tokenizer, resolve_model_path
    from warp_dist.rollout.base import SamplingConfig
    from warp_dist.rollout.hf import HFBackend
    from warp_dist.rollout.vllm import VllmBackend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    prompts = imdb_prompts(tok, args.num_prompts, args.prompt_tokens)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    holder = {"model": load_causal_lm(path, args.dtype, device)}
    hf_tps = timed(HFBackend(lambda: holder["model"], tok.pad_token_id, eos_token_ids(tok, path)), prompts, sampling,
                   args.seed)
    holder.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    engine = VllmBackend(path, tok, VllmConfig(sleep_mode=False), dtype=args.dtype, seed=args.seed, device=device,
                         max_seqs=len(prompts), max_len=args.prompt_tokens + args.new_tokens + 2)
    engine_s = time.perf_counter() - t0
    try:
        vllm_tps = timed(engine, prompts, sampling, args.seed)
    finally:
        engine.close()

    res = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({len(os.sched_getaffinity(0))} cores)",
        "num_prompts": args.num_prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "hf_tokens_per_s": round(hf_tps, 1),
        "vllm_tokens_per_s": round(vllm_tps, 1),
        "speedup": round(vllm_tps / hf_tps, 3),
        "vllm_engine_start_s": round(engine_s, 1),
        "torch_version": torch.__version__,
        "vllm_version": vllm.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_atomic(Path(args.out), res)
    print(HEADER)
    print(f"| {res['model']} | {res['device']} | {res['num_prompts']} | {res['prompt_tokens']} | {res['new_tokens']} "
          f"| {res['hf_tokens_per_s']:.0f} | {res['vllm_tokens_per_s']:.0f} | {res['speedup']:.2f}x |")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
