"""Build a randomly initialised GPT-2-shaped causal LM folder (with the tiny-gpt2 BPE tokenizer) for throughput runs
on machines without hub access. Weights are random: use it for speed and memory, never for quality.

    python benchmarks/random_lm.py --out /tmp/gpt2-124m --layers 12 --dim 768 --heads 12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--positions", type=int, default=1024)
    args = ap.parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from warp_dist.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("embedded:tiny-gpt2"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=args.positions, n_embd=args.dim, n_layer=args.layers,
                     n_head=args.heads, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    out = Path(args.out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return out


if __name__ == "__main__":
    main()
