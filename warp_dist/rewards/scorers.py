"""The built-in scorers behind one batched interface: `reward(prompts, completions, where="", rows=None,
conversations=None) -> tensor [B]` (float32, CPU). `warp_dist.rewards` registers them as `reward.kind` values.

`rows[b]` holds the dataset columns of completion b's prompt (e.g. a reference `answer`; empty dicts for IMDB);
`conversations[b]` its chat messages (a list of {role, content}) when the prompt went through a chat template, else
None. Scorers that need neither ignore them.

- `vader`: VADER compound sentiment in [-1, 1].
- `classifier`: any HF sequence classifier; the logit of `label`, or `label` minus `minus_label`.
- `callable`: a user function `module:function(prompts, completions, **columns) -> list[float]`; it receives the
  dataset columns its signature names (or all of them with **kwargs), one list per column.

Every reward's output is checked: one score per completion (else `RewardError`) and finite (else
`guards.NonFiniteError`). `where` (see `guards.where`) puts the run position in front of either message.
A user callable that raises becomes a `RewardError` naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..guards import RunError, check_finite


class RewardError(RunError, ValueError):
    """A reward function failed or returned something that is not one score per completion."""


def positive_label(id2label: dict) -> int | None:
    """Index of the POSITIVE label; label 1 of an unnamed two-label classifier; None if there is none."""
    names = {int(k): str(v).strip().lower() for k, v in (id2label or {}).items()}
    for i, n in sorted(names.items()):
        if n in ("positive", "pos"):
            return i
    if sorted(names.values()) == ["label_0", "label_1"]:
        return 1
    return None



class Reward:
    name = "reward"

    def __init__(self, text: str = "full", batch_size: int = 64, source: str = ""):
        self.text = text
        self.batch_size = batch_size
        self._source = source  # set when the scorer is not the reward (the evaluation judge: "eval.judge=vader")
        # what the last call measured besides the reward, per completion, by metric name (a sum's terms
        # "reward_<name>", a verifiable reward's "accuracy"): logged and evaluated beside the reward
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def source(self) -> str:
        """The config that names this reward, for error messages ("reward.kind=vader")."""
        return self._source or f"reward.kind={self.name}"

    def _inputs(self, prompts: list[str], completions: list[str]) -> list[str]:
        if self.text == "completion":
            return list(completions)
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None,
              conversations: list | None = None) -> torch.Tensor:
        """Raw scores [B], unchecked: score_texts over batches of `batch_size` texts."""
        texts = self._inputs(prompts, completions)
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            out += self.score_texts(texts[i:i + self.batch_size])
        return torch.tensor(out, dtype=torch.float32)

    def __call__(self, prompts: list[str], completions: list[str], where: str = "", rows: list[dict] | None = None,
                 conversations: list | None = None) -> torch.Tensor:
        """Scores [B] float32: exactly one finite score per completion, or RewardError / NonFiniteError."""
        try:
            out = self.score(prompts, completions, rows, conversations)
        except RewardError as exc:
            if where:
                exc.args = (_at(where, str(exc)),)
            raise
        if out.numel() != len(completions):
            raise RewardError(_at(where, f"{self.source} returned {out.numel()} scores for "
                                         f"{len(completions)} completions"))
        check_finite(out, "reward", where, self.source)
        return out


def _at(where: str, msg: str) -> str:
    return f"{where}: {msg}" if where else msg


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

    def __init__(self, model_name: str, label: int = -1, minus_label: int = -1, max_length: int = 512,
                 device: str | torch.device = "cpu", key: str = "reward.name", **kw):
        super().__init__(**kw)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(model_name)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name).to(device).eval()
        except OSError as exc:
            raise RuntimeError(f"{key}={model_name!r} could not be loaded ({str(exc).splitlines()[0]}); "
                               "without hub access use reward.kind=vader or a local classifier folder") from None
        self.model_name, self.key = model_name, key
        n = self.model.config.num_labels
        if label < 0:  # auto: a single-logit reward model's only logit, else the POSITIVE label, else 1
            label = 0 if n == 1 else positive_label(dict(getattr(self.model.config, "id2label", None) or {})) or 1
        for key, v, lo in (("reward.label", label, 0), ("reward.minus_label", minus_label, -1)):
            if not lo <= v < n:
                raise ValueError(f"{key}={v} is out of range: allowed {lo}..{n - 1} (the classifier has {n} labels)")
        self.label, self.minus_label, self.max_length, self.device = label, minus_label, max_length, device
        # a reward model with a chat template reads a templated prompt as the conversation in its own format
        self.chat = bool(getattr(self.tok, "chat_template", None))
        self._templated = False

    @property
    def source(self) -> str:
        return self._source or f"{self.key}={self.model_name}"

    def score(self, prompts, completions, rows=None, conversations=None):
        """Scores of prompt + completion (reward.text); a conversation, when the prompt was one and this model has a
        chat template, is rendered in the model's own template with the completion as the assistant's answer."""
        if not (self.chat and conversations and all(c is not None for c in conversations)):
            return super().score(prompts, completions)
        texts = [self.tok.apply_chat_template([*c, {"role": "assistant", "content": y}], tokenize=False)
                 for c, y in zip(conversations, completions, strict=True)]
        out: list[float] = []
        self._templated = True  # the template wrote the special tokens: the tokenizer adds none
        try:
            for i in range(0, len(texts), self.batch_size):
                out += self.score_texts(texts[i:i + self.batch_size])
        finally:
            self._templated = False
        return torch.tensor(out, dtype=torch.float32)

    @torch.no_grad()
    def logits(self, texts) -> torch.Tensor:
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                       add_special_tokens=not self._templated)
        return self.model(**enc.to(self.device)).logits.float()

    def score_texts(self, texts):
        logits = self.logits(texts)
        s = logits[:, self.label]
        if self.minus_label >= 0:
            s = s - logits[:, self.minus_label]
        return s.cpu().tolist()


class ClassifierJudge(ClassifierReward):
    """The evaluation judge's classifier score: P(positive) * 2 - 1 in [-1, 1] (softmax over the labels; see
    positive_label for which label is positive)."""

    def __init__(self, model_name: str, max_length: int = 512, device: str | torch.device = "cpu",
                 key: str = "eval.judge", **kw):

        super().__init__(model_name, 0, -1, max_length, device=device, key=key, **kw)
        labels = dict(getattr(self.model.config, "id2label", None) or {})
        pos = positive_label(labels)
        if pos is None:
            raise ValueError(f"{key}={model_name!r} has labels {labels}: a judge needs one named POSITIVE "
                             "(or two unnamed labels LABEL_0 / LABEL_1)")
        self.positive = pos

    def score_texts(self, texts):
        p = self.logits(texts).softmax(-1)[:, self.positive]
        return (p * 2.0 - 1.0).cpu().tolist()


class CallableReward(Reward):
    name = "callable"

    def __init__(self, spec: str, **kw):
        super().__init__(**kw)
        self.spec = spec
        self.fn: Callable = load_callable(spec)

    @property
    def source(self) -> str:
        return f"reward.callable={self.spec}"

    def score(self, prompts, completions, rows=None, conversations=None):
        kwargs = column_kwargs(self.fn, rows, len(completions))
        try:
            out = self.fn(list(prompts), list(completions), **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported naming the callable
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RewardError(f"{self.source} raised {type(exc).__name__}: {first}") from exc
        try:
            return torch.as_tensor(out, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise RewardError(f"{self.source} returned {type(out).__name__}, not a list of "
                              f"{len(completions)} numbers") from None


def column_kwargs(fn: Callable, rows: list[dict] | None, n: int) -> dict[str, list]:
    """The dataset columns a reward function takes, as keyword arguments of one list each (TRL's convention): all of
    them when it has **kwargs, else those its signature names; {} when the prompts carry no columns."""
    import inspect

    if not rows:
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: positional arguments only
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        wanted = None
    else:
        wanted = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    names = [c for c in rows[0] if (wanted is None or c in wanted) and c not in ("prompts", "completions")]
    return {c: [r.get(c) for r in rows[:n]] for c in names}


def load_callable(spec: str) -> Callable:
    """`module:function` -> the function; ValueError (one line naming reward.callable) if it cannot be had."""
    import os
    import sys

    mod, _, fn = spec.partition(":")
    if os.getcwd() not in sys.path:  # a module beside the user's command (my_reward.py in the current folder)
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - an import can fail in any way; say which module and how
        raise ValueError(f"reward.callable={spec!r}: cannot import module {mod!r} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not hasattr(module, fn):
        raise ValueError(f"reward.callable={spec!r}: module {mod!r} has no attribute {fn!r}")
    f = getattr(module, fn)
    if not callable(f):
        raise ValueError(f"reward.callable={spec!r}: {mod}.{fn} is not callable ({type(f).__name__})")
    return f
