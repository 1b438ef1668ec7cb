"""The second judge: an independent scorer of the evaluated texts, so that reward hacking shows up as a gap.

A policy trained on one reward can learn what that reward likes rather than what it was meant to measure (e.g. a
classifier's blind spots, or VADER's love of a few words). Every evaluation therefore also scores the same texts
(`reward.text`: prompt + completion, or the completion) with a judge that was *not* trained against:

    eval.judge = auto        reward.kind = classifier | callable  ->  VADER
                             reward.kind = vader                  ->  eval.judge_classifier when set, else none
    eval.judge = vader       VADER (refused when the reward is VADER itself)
    eval.judge = none        no judge (judge_* metrics are null)
    eval.judge = <id>        a sequence classifier (local folder or hub id; refused when it is reward.name)

A classifier judge scores P(positive) * 2 - 1 (softmax over its labels; in [-1, 1] like VADER's compound score), with
"positive" the label whose id2label name is POSITIVE (`warp_dist.rewards.scorers.positive_label`).

`resolve_judge` is pure (the config check uses it); `build_judge` loads the scorer.
"""

from __future__ import annotations

CHOICES = ("auto", "vader", "none")


class JudgeConfigError(ValueError):
    """eval.judge / eval.judge_classifier cannot be used with this reward; one line naming the field."""


def resolve_judge(reward, eval_cfg, source: str = "bundled") -> tuple[str, str]:
    """(kind, name): ("vader", "vader") | ("classifier", <folder or hub id>) | ("none", "none"). auto judges
    sentiment only on the IMDB task (data.source bundled / hub): any other task has no automatic second judge."""
    j = (eval_cfg.judge or "auto").strip()
    if j == "auto":
        if source not in ("bundled", "hub") or reward.kind in ("verifiable", "format", "sum"):
            return "none", "none"
        if reward.kind == "vader":
            if eval_cfg.judge_classifier:
                return _classifier(reward, eval_cfg.judge_classifier, "eval.judge_classifier")
            return "none", "none"
        return "vader", "vader"
    if j == "none":
        return "none", "none"
    if j == "vader":
        if reward.kind == "vader":
            raise JudgeConfigError("eval.judge='vader' is invalid: the reward is VADER itself (reward.kind=vader); "
                                   "allowed auto, none or a sequence-classifier folder / hub id")
        return "vader", "vader"
    return _classifier(reward, j, "eval.judge")


def _classifier(reward, name: str, key: str) -> tuple[str, str]:
    if reward.kind == "classifier" and name == reward.name:
        raise JudgeConfigError(f"{key}={name!r} is invalid: it is the reward itself (reward.name); allowed another "
                               "classifier, vader, auto or none")
    return "classifier", name


def judge_label(name: str) -> str:
    """The name evaluation rows carry: 'vader', 'classifier:<id>' or 'none'."""
    return name if name in ("vader", "none") else f"classifier:{name}"


def build_judge(cfg, device="cpu"):
    """The judge of cfg (a `warp_dist.rewards.scorers.Reward` scoring [B] floats), or None for no judge."""
    kind, name = resolve_judge(cfg.reward, cfg.eval, cfg.data.source)
    if kind == "none":
        return None
    from ..rewards.scorers import ClassifierJudge, VaderReward

    kw = {"text": cfg.reward.text, "batch_size": cfg.reward.batch_size}
    if kind == "vader":
        return VaderReward(source="eval.judge=vader", **kw)
    key = "eval.judge_classifier" if (cfg.eval.judge or "auto") == "auto" else "eval.judge"
    return ClassifierJudge(name, cfg.reward.max_length, device=device, key=key, **kw)
