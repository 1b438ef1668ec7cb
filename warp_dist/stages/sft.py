"""SFT stage: fine-tune a causal LM on IMDB reviews, so that WARP starts from a model of review text.

    python launch/sft.py --config configs/stages/sft.yaml [dotted.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/sft.py --config configs/stages/sft.yaml    # data-parallel

Each training sequence is one review's first `data.max_tokens` tokens, laid out like a WARP prompt (BOS when the
tokenizer adds one) and ended by EOS when the whole review fits. The loss is the mean next-token loss over every
real token of the (global) batch; dropout is off (as in WARP). With W ranks each rank takes every W-th review of a step's batch; DDP averages
the gradients, so one rank and W ranks take the same steps up to float rounding. The eval loss (before and after)
is the same token-weighted mean over held-out reviews, sharded over the ranks. Rank 0 writes output_dir: an HF
folder (loadable by transformers, vLLM, and as WARP's model.name) + config.yaml + summary.json.

Which reviews (data.seed = WARP's data.seed): WARP's prompts come from the first reviews of the shuffle
(warp_dist.data.load_prompts: its eval prompts from the first min(n/2, max(4 e, e + 64)) reviews, its training
prompts from the next ones), so SFT trains on reviews from index data.skip_reviews on and evaluates on the last
data.num_eval_reviews: the SFT model has not seen the reviews WARP's prompts begin, and its eval loss is measured
on reviews neither it nor WARP's prompts use.
"""

from __future__ import annotations

import contextlib
import os
import random
import time

from ..runner import log
from .common import environment, lr_factor, skip_line, write_result
from .config import SftConfig, config_hash
from .output import StageError, decide


# ------------------------------------------------------------------------------------------------- pure pieces
def encode(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each review: BOS (when the tokenizer adds one) + its first tokens, max_tokens in all, + EOS when
    the whole review fits. Reviews that give fewer than 2 tokens are dropped (nothing to predict)."""
    from ..data import bos_prefix

    bos = bos_prefix(tokenizer)
    eos = tokenizer.eos_token_id
    room = max_tokens - len(bos)
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        seq = bos + ids[:room]
        if len(ids) < room and eos is not None:
            seq.append(eos)
        if len(seq) >= 2:
            out.append(seq)
    return out


def collate(seqs: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) right-padded to the longest sequence."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def nll_sum(model, seqs: list[list[int]], pad_id: int, device):
    """(sum of next-token losses, number of predicted tokens) of a batch of sequences."""
    import torch.nn.functional as F

    ids, mask = collate(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return loss, int((target != -100).sum())


def predicted_tokens(seqs: list[list[int]]) -> int:
    return sum(len(s) - 1 for s in seqs)


def eval_loss(model, seqs: list[list[int]], batch_size: int, pad_id: int, d) -> float:
    """Mean next-token loss over every token of `seqs`; batch k is computed on rank k % W, the sums all-reduced."""
    import torch

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for k, i in enumerate(range(0, len(seqs), batch_size)):
            if k % d.world_size != d.rank:
                continue
            s, n = nll_sum(model, seqs[i:i + batch_size], pad_id, d.device)
            total += torch.tensor([float(s), float(n)], dtype=torch.float64)
    if d.active:
        import torch.distributed as tdist

        total = d.comm_tensor(total)
        tdist.all_reduce(total)
        total = total.cpu()
    model.train(was_training)
    return float(total[0] / total[1])


# ------------------------------------------------------------------------------------------------- the stage
def check_ranks(cfg: SftConfig, world: int) -> None:
    t = cfg.train
    if t.batch_size % world:
        raise StageError(f"train.batch_size={t.batch_size} must be divisible by the number of ranks ({world})")


def preflight(cfg: SftConfig) -> None:
    """Cheap checks before any weights load (one line each): output_dir writable, data, the model resolvable."""
    from ..checks import preflight as pf

    pf.check_output_dir(cfg.output_dir)
    pf.check_data(cfg)
    pf.check_model(cfg)  # embedded name, local folder with config.json, or a hub id reachable now; a causal LM


def _decide_on_rank0(cfg: SftConfig, world: int):
    """Rank 0's decision for output_dir, shared with every rank: returns (decision, Dist)."""
    if world == 1:
        decision = decide(cfg, "sft")  # torch-free: a cached result is answered before torch is imported
        if decision == "skip":
            return decision, None
    from .. import dist

    if world == 1:
        return decision, dist.init(1, cfg.dist_timeout_s, cfg.cpu)
    d = dist.init(1, cfg.dist_timeout_s, cfg.cpu)
    answer = None
    if d.is_main:
        try:
            answer = decide(cfg, "sft")
        except StageError as exc:
            answer = StageError(str(exc))
    answer = d.broadcast_object(answer)
    if isinstance(answer, StageError):
        raise answer
    return answer, d


def run(cfg: SftConfig, command: str = "", t0: float | None = None) -> dict | None:
    """Fine-tune as cfg says and write cfg.output_dir; None (and one line) when it already holds this result."""
    t0 = time.time() if t0 is None else t0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_ranks(cfg, world)
    decision, d = _decide_on_rank0(cfg, world)
    if decision == "skip":
        if os.environ.get("RANK", "0") == "0":
            from .output import read_summary

            s = read_summary(cfg.output_dir) or {}
            print(skip_line("sft", cfg, s, f"eval loss {s.get('eval_loss_before', float('nan')):.3f} -> "
                                           f"{s.get('eval_loss_after', float('nan')):.3f}"), flush=True)
        return None
    preflight(cfg)
    return _train(cfg, d, decision, command, t0)


def _train(cfg: SftConfig, d, decision: str, command: str, t0: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ..data import clean
    from ..guards import check_finite
    from ..models import disable_dropout, load_tokenizer, resolve_model_path
    from ..runner import quiet_libraries
    from .texts import load_reviews, sft_split

    quiet_libraries()
    timings: dict[str, float] = {"startup_s": time.time() - t0}
    say = log if d.is_main else (lambda msg: None)
    m, data, t = cfg.model, cfg.data, cfg.train
    say(f"sft: {m.name} on {data.num_train_reviews} IMDB reviews ({data.source}), {d.world_size} rank(s), "
        f"config {config_hash(cfg)} -> {cfg.output_dir}" + (" (replacing the result there)" if decision == "overwrite" else ""))

    tic = time.time()
    path = resolve_model_path(m.name, m.cache_dir)  # embedded models are built once, under a lock
    tok = load_tokenizer(path)
    torch.manual_seed(t.seed)
    model = disable_dropout(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(d.device))
    timings["load_model_s"] = time.time() - tic

    tic = time.time()
    try:
        texts = load_reviews(data.source, data.seed, cleaned=False)  # WARP's order; only the used ones cleaned
        train_texts, eval_texts = sft_split(texts, data.skip_reviews, data.num_train_reviews, data.num_eval_reviews)
        train_texts, eval_texts = [clean(x) for x in train_texts], [clean(x) for x in eval_texts]
    except (ValueError, RuntimeError) as exc:
        raise StageError(str(exc)) from None
    train_seqs = encode(tok, train_texts, data.max_tokens)
    eval_seqs = encode(tok, eval_texts, data.max_tokens)
    if len(train_seqs) < t.batch_size:
        raise StageError(f"only {len(train_seqs)} training reviews give 2+ tokens: fewer than train.batch_size")
    timings["data_s"] = time.time() - tic
    pad = tok.pad_token_id

    tic = time.time()
    before = eval_loss(model, eval_seqs, cfg.eval.batch_size, pad, d)
    timings["eval_before_s"] = time.time() - tic
    say(f"sft: eval loss before {before:.4f} on {len(eval_seqs)} held-out reviews ({predicted_tokens(eval_seqs)} "
        f"tokens, {timings['eval_before_s']:.0f} s)")

    tic = time.time()
    losses, grad_norms, tokens_seen = _fit(cfg, model, train_seqs, pad, d, say, check_finite)
    timings["train_s"] = time.time() - tic

    tic = time.time()
    after = eval_loss(model, eval_seqs, cfg.eval.batch_size, pad, d)
    timings["eval_after_s"] = time.time() - tic
    say(f"sft: eval loss after {after:.4f} (before {before:.4f}, {after - before:+.4f})")

    summary = {
        "stage": "sft", "complete": True, "config_hash": config_hash(cfg),
        "base_model": m.name, "base_model_path": path,
        "eval_loss_before": before, "eval_loss_after": after, "eval_loss_change": after - before,
        "eval_reviews": len(eval_seqs), "eval_tokens": predicted_tokens(eval_seqs),
        "train_reviews": len(train_seqs), "train_tokens": tokens_seen, "steps": len(losses),
        "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "train_losses": losses, "grad_norms": grad_norms,
        "train_tokens_per_s": tokens_seen / max(timings["train_s"], 1e-9),
        "world_size": d.world_size, "device": str(d.device),
        "data": {"source": data.source, "seed": data.seed,
                 "train": f"reviews [{data.skip_reviews}, {data.skip_reviews + data.num_train_reviews}) of the "
                          f"seed-{data.seed} shuffle", "eval": f"the last {data.num_eval_reviews} reviews",
                 "warp_prompts": f"WARP (same data.seed) takes its prompts from the first reviews; the first "
                                 f"{data.skip_reviews} are not used here"},
        "command": command, "output_dir": cfg.output_dir, "timings": timings, **environment(),
    }
    if d.is_main:
        write_result(cfg, summary, model, tok, t0)
        say(f"sft: wrote {cfg.output_dir} ({timings['save_s']:.0f} s to save; {time.time() - t0:.0f} s in all)")
    d.barrier()
    return summary


def _fit(cfg: SftConfig, model, train_seqs, pad: int, d, say, check_finite):
    """The optimizer loop; returns (per-step global mean losses, gradient norms, training tokens)."""
    import torch

    t = cfg.train
    W, rank = d.world_size, d.rank
    steps_per_epoch = len(train_seqs) // t.batch_size
    total = steps_per_epoch * t.epochs
    micro = t.micro_batch_size or t.batch_size // W
    model.train()
    net = model
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, t.warmup_steps))
    losses, norms, seen = [], [], 0
    tic = time.time()
    step = 0
    for epoch in range(t.epochs):
        order = list(range(len(train_seqs)))
        random.Random(t.seed * 1000 + epoch).shuffle(order)
        for s in range(steps_per_epoch):
            rows = [train_seqs[i] for i in order[s * t.batch_size:(s + 1) * t.batch_size]]
            n_global = predicted_tokens(rows)
            mine = rows[rank::W]
            chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            local = 0.0
            for j, chunk in enumerate(chunks):
                sync = contextlib.nullcontext() if (not d.active or j == len(chunks) - 1) else net.no_sync()
                with sync:
                    loss_sum, _ = nll_sum(net, chunk, pad, d.device)
                    (loss_sum * (W / n_global)).backward()
                local += float(loss_sum.detach())
            mean = _global_sum(local, d) / n_global
            check_finite(torch.tensor(mean), "loss", f"sft step {step + 1}")
            gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(mean)
            norms.append(float(gn))
            seen += n_global
            step += 1
            if step % cfg.log_every == 0 or step == total:
                el = time.time() - tic
                say(f"sft: step {step}/{total} loss {mean:.4f} grad norm {float(gn):.2f} "
                    f"lr {lr:.2e} {seen / el:.0f} tok/s ({el:.0f} s)")
    return losses, norms, seen


def _global_sum(x: float, d) -> float:
    if not d.active:
        return x
    import torch
    import torch.distributed as tdist

    t = d.comm_tensor(torch.tensor([x], dtype=torch.float64))
    tdist.all_reduce(t)
    return float(t.cpu()[0])
