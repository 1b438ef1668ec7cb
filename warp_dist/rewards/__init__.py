"""Rewards, registered in one place: each `reward.kind` is a `RewardKind` in REWARDS that owns its config rule, its
pre-launch check, what it holds in memory, and how it is built. This module does not import torch (the config and the
pre-launch checks read it); the scorers themselves live in `scorers`.

Adding a kind (docs/extending.md): a scorer class (a `scorers.Reward` subclass: `score_texts(texts) -> list[float]`,
or `score(prompts, completions)`) and one `register(RewardKind(...))` call.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardKind:
    """One `reward.kind`.

    build(reward_cfg, device) -> a scorer (`scorers.Reward`); validate(reward_cfg) -> "" or what is wrong with the
    config, one line naming the field (checked when the config loads); check(reward_cfg) -> "" or why it cannot run
    here (before launch: packages, files); params(reward_cfg) -> parameters it holds on each rank (the memory plan)."""

    name: str
    build: Callable
    validate: Callable = field(default=lambda r: "")
    check: Callable = field(default=lambda r: "")
    params: Callable = field(default=lambda r: 0)
    doc: str = ""  # one line for the configuration reference


REWARDS: dict[str, RewardKind] = {}


def register(kind: RewardKind) -> RewardKind:
    REWARDS[kind.name] = kind
    return kind


def kind_of(reward_cfg) -> RewardKind:
    try:
        return REWARDS[reward_cfg.kind]
    except KeyError:
        raise ValueError(f"reward.kind={reward_cfg.kind!r}: allowed {' | '.join(REWARDS)}") from None


def build_reward(reward_cfg, device="cpu"):
    """The scorer `reward.kind` names: reward(prompts, completions, where) -> float32 tensor [B]."""
    return kind_of(reward_cfg).build(reward_cfg, device)


# ------------------------------------------------------------------------------------------------- the built-in kinds
def _text_kw(r) -> dict:
    return {"text": r.text, "batch_size": r.batch_size}


def _vader(r, device):
    from .scorers import VaderReward

    return VaderReward(**_text_kw(r))


def _vader_check(r) -> str:
    return "" if importlib.util.find_spec("vaderSentiment") else \
        "reward.kind=vader needs the vaderSentiment package: pip install vaderSentiment"


def _classifier(r, device):
    from .scorers import ClassifierReward

    return ClassifierReward(r.name, r.label, r.minus_label, r.max_length, device=device, **_text_kw(r))


def _classifier_check(r) -> str:
    from ..modelinfo import ModelConfigError, model_config

    try:
        model_config("reward.name", r.name, "use a local sequence-classifier folder or reward.kind=vader")
    except ModelConfigError as exc:
        return str(exc)
    return ""


def _classifier_params(r) -> int:
    """Parameters of the classifier from its config.json (0 when it cannot be read: the check reports that)."""
    from pathlib import Path

    try:
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from ..modelinfo import quiet_hub

        local = Path(r.name).expanduser().is_dir()
        with quiet_hub():  # a hub id counts only when its config is in the hub cache: no network from the plan
            mc = AutoConfig.from_pretrained(r.name, local_files_only=not local)
        with torch.device("meta"):
            m = AutoModelForSequenceClassification.from_config(mc)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001 - the pre-launch check reports an unloadable reward; the plan only counts it
        return 0


def _callable(r, device):
    from .scorers import CallableReward

    return CallableReward(r.callable, **_text_kw(r))


def _callable_check(r) -> str:
    from .scorers import load_callable

    try:
        load_callable(r.callable)
    except ValueError as exc:
        return str(exc)
    return ""


register(RewardKind("vader", _vader, check=_vader_check, doc="VADER compound sentiment of the text, in [-1, 1]"))
register(RewardKind(
    "classifier", _classifier, check=_classifier_check, params=_classifier_params,
    validate=lambda r: "" if r.name else "reward.name='' is invalid: allowed a sequence-classifier id or folder when "
                                         "reward.kind=classifier",
    doc="an HF sequence classifier or single-logit reward model (reward.name): the logit of reward.label, minus "
        "reward.minus_label's if >= 0; a conversation in the model's own chat template when it has one"))
register(RewardKind(
    "callable", _callable, check=_callable_check,
    validate=lambda r: "" if ":" in r.callable else f"reward.callable={r.callable!r} is invalid: allowed "
                                                     "module:function when reward.kind=callable",
    doc="a function module:function(prompts, completions, **columns) -> list[float] (reward.callable)"))

EXTRACT = ("auto", "last_number", "hash", "boxed")  # reward.extract choices (warp_dist.rewards.verifiable.MODES)


def _extract_rule(r) -> str:
    return "" if r.extract in EXTRACT else f"reward.extract={r.extract!r} is invalid: allowed {' | '.join(EXTRACT)}"


def _verifiable(r, device):
    from .verifiable import VerifiableReward

    return VerifiableReward(r.answer_column, r.extract, **_text_kw(r))


def _format(r, device):
    from .verifiable import FormatReward

    return FormatReward(r.extract, **_text_kw(r))


def _sum(r, device):
    from .combined import SumReward

    return SumReward({name: (t.weight, build_reward(t, device)) for name, t in r.terms.items()}, **_text_kw(r))


def _sum_check(r) -> str:
    for name, t in r.terms.items():
        why = kind_of(t).check(t)
        if why:
            return f"reward.terms.{name}: {why}"
    return ""


register(RewardKind(
    "verifiable", _verifiable, validate=lambda r: _extract_rule(r) or (
        "" if r.answer_column else "reward.answer_column='' is invalid: allowed the column holding the answer"),
    doc="1 when the completion's answer (reward.extract) equals the row's reward.answer_column after normalisation, "
        "else 0; logged as accuracy"))
register(RewardKind("format", _format, validate=_extract_rule,
                    doc="1 when the completion states an answer in the reward.extract form, else 0"))
register(RewardKind(
    "sum", _sum, check=_sum_check, params=lambda r: sum(kind_of(t).params(t) for t in r.terms.values()),
    validate=lambda r: "" if r.terms else "reward.terms={} is invalid: allowed one or more named rewards when "
                                          "reward.kind=sum (reward.terms.<name>.kind=...)",
    doc="sum over reward.terms of weight x term; each term logged as reward_<name>"))
