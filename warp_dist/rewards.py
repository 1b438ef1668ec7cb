"""Reward models behind one batched interface: `reward(prompts, completions) -> tensor [B]` (float32, CPU).

- `vader`: VADER compound sentiment in [-1, 1].
- `classifier`: any HF sequence classifier; the logit of `label`, or `label` minus `minus_label`.
- `callable`: a user function `module:function(prompts, completions) -> list[float]`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


class Reward:
    name = "reward"

    def __init__(self, text: str = "full", batch_size: int = 64):
        self.text = text
        self.batch_size = batch_size

    def _inputs(self, prompts: list[str], completions: list[str]) -> list[str]:
        if self.text == "completion":
            return list(completions)
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = self._inputs(prompts, completions)
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            out += self.score_texts(texts[i:i + self.batch_size])
        return torch.tensor(out, dtype=torch.float32)


class VaderReward(Reward):
    name = "vader"

    def __init__(self, **kw):
        super().__init__(**kw)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts):
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]


class ClassifierReward(Reward):
    name = "classifier"

    def __init__(self, model_name: str, label: int = 1, minus_label: int = -1, max_length: int = 512,
                 device: str | torch.device = "cpu", **kw):
        super().__init__(**kw)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(model_name)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name).to(device).eval()
        except OSError as exc:
            raise RuntimeError(f"reward.name={model_name!r} could not be loaded ({str(exc).splitlines()[0]}); "
                               "without hub access use reward.kind=vader or a local classifier folder") from None
        n = self.model.config.num_labels
        for key, v, lo in (("reward.label", label, 0), ("reward.minus_label", minus_label, -1)):
            if not lo <= v < n:
                raise ValueError(f"{key}={v} is out of range: allowed {lo}..{n - 1} (the classifier has {n} labels)")
        self.label, self.minus_label, self.max_length, self.device = label, minus_label, max_length, device

    @torch.no_grad()
    def score_texts(self, texts):
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        logits = self.model(**enc.to(self.device)).logits.float()
        s = logits[:, self.label]
        if self.minus_label >= 0:
            s = s - logits[:, self.minus_label]
        return s.cpu().tolist()


class CallableReward(Reward):
    name = "callable"

    def __init__(self, spec: str, **kw):
        super().__init__(**kw)
        mod, _, fn = spec.partition(":")
        try:
            self.fn: Callable = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward.callable={spec!r} could not be imported: {exc}") from None

    def __call__(self, prompts, completions):
        out = self.fn(list(prompts), list(completions))
        t = torch.as_tensor(out, dtype=torch.float32).flatten()
        if t.numel() != len(completions):
            raise ValueError(f"reward.callable returned {t.numel()} scores for {len(completions)} completions")
        return t


def build_reward(cfg, device: str | torch.device = "cpu") -> Reward:
    kw = {"text": cfg.text, "batch_size": cfg.batch_size}
    if cfg.kind == "vader":
        return VaderReward(**kw)
    if cfg.kind == "classifier":
        return ClassifierReward(cfg.name, cfg.label, cfg.minus_label, cfg.max_length, device=device, **kw)
    if cfg.kind == "callable":
        return CallableReward(cfg.callable, **kw)
    raise ValueError(f"reward.kind={cfg.kind!r}: allowed vader | classifier | callable")
