"""The second judge (warp_dist.evaluation.judge): which judge a reward gets, the config and preflight errors, and real
evaluations with a tiny BERT classifier built here (its tokenizer trained with `tokenizers`): as the reward, VADER
judges; as the judge of a VADER reward, it scores P(positive) * 2 - 1."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from warp_dist.config import ConfigError, load_config
from warp_dist.evaluation.judge import judge_label, resolve_judge
from warp_dist.rewards.scorers import positive_label

TINY = ROOT / "configs" / "warp" / "tiny.yaml"
SMALL = ["data.num_eval_prompts=8", "eval.batch_size=4", "rollout.max_new_tokens=8", "reward.max_length=128",
         "progress=false"]


def _cfg(reward_kind, judge="auto", judge_classifier="", name=""):
    return SimpleNamespace(kind=reward_kind, name=name), SimpleNamespace(judge=judge, judge_classifier=judge_classifier)


def test_which_judge_a_reward_gets():
    assert resolve_judge(*_cfg("classifier", name="clf")) == ("vader", "vader")
    assert resolve_judge(*_cfg("callable")) == ("vader", "vader")
    assert resolve_judge(*_cfg("vader")) == ("none", "none")  # no classifier given: nothing independent to use
    assert resolve_judge(*_cfg("vader", judge_classifier="runs/rm")) == ("classifier", "runs/rm")
    assert resolve_judge(*_cfg("vader", judge="other/clf")) == ("classifier", "other/clf")
    assert resolve_judge(*_cfg("classifier", judge="none", name="clf")) == ("none", "none")
    assert resolve_judge(*_cfg("callable", judge="vader")) == ("vader", "vader")
    assert judge_label("vader") == "vader" and judge_label("runs/rm") == "classifier:runs/rm"


def test_positive_label():
    assert positive_label({0: "NEGATIVE", 1: "POSITIVE"}) == 1
    assert positive_label({"0": "positive", "1": "negative"}) == 0
    assert positive_label({0: "LABEL_0", 1: "LABEL_1"}) == 1
    assert positive_label({0: "neutral", 1: "angry"}) is None


@pytest.mark.parametrize("overrides,field", [
    (["eval.judge=vader"], "eval.judge"),  # the reward is VADER: not independent
    (["reward.kind=classifier", "reward.name=some/clf", "eval.judge=some/clf"], "eval.judge"),
    (["eval.judge="], "eval.judge"),
    (["log_with=tb"], "log_with"),
    (["log_with=tensorboard,tensorboard"], "log_with"),
])
def test_bad_judge_and_tracker_config_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as ei:
        load_config(TINY, overrides)
    msg = str(ei.value)
    assert field in msg and "\n" not in msg and "allowed" in msg


# ------------------------------------------------------------------------------------------------ real classifier
TEXTS = ["a great wonderful movie", "a terrible awful film", "the plot was fine", "I loved the acting",
         "boring and bad", "stars of the show", "according to the review"]


def build_classifier(folder, labels=None):
    """A 2-layer BERT sequence classifier with a WordLevel tokenizer trained on a few sentences (random weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=128)
    fast.save_pretrained(folder)
    labels = labels or {0: "NEGATIVE", 1: "POSITIVE"}
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2, id2label=labels,
        label2id={v: k for k, v in labels.items()}))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("clf") / "bert")


@pytest.fixture(scope="module")
def warp(tmp_path_factory, tiny_model_path, classifier):
    """One trainer (building one costs ~10 s here, mostly the bundled reviews); each test gives it the reward and
    judge its config builds, with the trainer's own builders (`_use`), so the tests do not depend on their order."""
    from warp_dist.training.session import Session

    cfg = load_config(TINY, [*SMALL, f"output_dir={tmp_path_factory.mktemp('judge') / 'run'}",
                             "reward.kind=classifier", f"reward.name={classifier}"])
    w = Session(cfg, log=lambda *_: None)
    yield w
    w.close()


def _use(w, overrides):
    """Reward and judge of the tiny config with `overrides`, as Warp.__init__ builds them."""
    from warp_dist.evaluation.judge import build_judge
    from warp_dist.rewards import build_reward

    cfg = load_config(TINY, [*SMALL, *overrides])
    w.cfg, w.reward, w.judge = cfg, build_reward(cfg.reward), build_judge(cfg)
    w.judge_name = judge_label(resolve_judge(cfg.reward, cfg.eval)[1])


def _evaluate(w):
    """Evaluate the SFT weights; -> (result, the whole texts the reward and the judge scored, in prompt order)."""
    from warp_dist.data import decode_pairs
    from warp_dist.evaluation.evaluator import Evaluator

    res = Evaluator(w).evaluate(None, None)  # the policy module holds the SFT weights
    texts = [decode_pairs(w.tokenizer, [w.eval_prompts.ids[i]], [c]) for i, c in enumerate(res.completions)]
    return res, [p[0] + c[0] for p, c in texts]


def test_classifier_reward_is_judged_by_vader(warp, classifier):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    # each test sets the reward and judge it needs (the tests share one trainer and may run in any order)
    _use(warp, ["reward.kind=classifier", f"reward.name={classifier}"])
    assert warp.judge_name == "vader"  # as Warp.__init__ resolves it for reward.kind=classifier
    res, full = _evaluate(warp)
    m = res.metrics
    assert m["judge"] == "vader" and len(res.judges) == m["num_prompts"] == 8
    vader = SentimentIntensityAnalyzer()
    assert res.judges == pytest.approx([vader.polarity_scores(t)["compound"] for t in full], abs=1e-6)
    assert m["judge_mean"] == pytest.approx(sum(res.judges) / 8)
    assert m["judge_ci_low"] <= m["judge_mean"] <= m["judge_ci_high"]
    assert res.rewards != res.judges  # the reward is the classifier's logit, not VADER
    for key in ("reward_ci_low", "reward_ci_high", "kl_ci_low", "kl_ci_high", "distinct_1", "distinct_2"):
        assert key in m and math.isfinite(m[key]), key
    assert res.per_prompt() == {"reward": res.rewards, "kl": res.kls, "judge": res.judges}


def test_vader_reward_is_judged_by_the_classifier(warp, classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _use(warp, [f"eval.judge_classifier={classifier}"])  # reward.kind=vader (tiny.yaml), eval.judge=auto
    res, full = _evaluate(warp)
    assert res.metrics["judge"] == f"classifier:{classifier}"
    tok = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        p = model(**tok(full, return_tensors="pt", padding=True)).logits.softmax(-1)[:, 1]
    assert res.judges == pytest.approx((p * 2 - 1).tolist(), abs=1e-5)
    assert all(-1 <= j <= 1 for j in res.judges)

    _use(warp, [f"eval.judge_classifier={classifier}", "eval.judge=none"])
    none, _ = _evaluate(warp)
    assert none.judges is None and none.metrics["judge"] == "none" and none.metrics["judge_mean"] is None
    assert none.rewards == res.rewards  # same prompts, seeds and reward


def test_preflight_checks_the_judge_and_the_trackers(tmp_path, classifier):
    from warp_dist.checks import preflight

    bad = build_classifier(tmp_path / "unnamed", {0: "calm", 1: "angry"})
    cfg = load_config(TINY, [f"eval.judge_classifier={bad}", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(preflight.PreflightError, match="eval.judge_classifier=.*POSITIVE"):
        preflight.check_judge(cfg)
    cfg = load_config(TINY, [f"eval.judge={tmp_path / 'missing'}", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(preflight.PreflightError, match="eval.judge="):
        preflight.check_judge(cfg)
    preflight.check_judge(load_config(TINY, [f"eval.judge_classifier={classifier}"]))
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(preflight.PreflightError, match="log_with=wandb needs the wandb package"):
            preflight.check_trackers(load_config(TINY, ["log_with=wandb"]))
    preflight.check_trackers(load_config(TINY, ["log_with=none"]))
    preflight.check_trackers(load_config(TINY))  # tensorboard: installed with the project
