"""Rewards (VADER, callable, local sequence classifier) and IMDB prompt loading."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from warp_dist.config import DataConfig, RewardConfig
from warp_dist.data import clean, load_bundled_reviews, load_prompts, make_prompts
from warp_dist.rewards import build_reward
from warp_dist.rewards.scorers import CallableReward, ClassifierReward, VaderReward


# Reward functions referenced as `<this module>:<name>`; the module is already in sys.modules under __name__,
# whatever rootdir/import mode pytest uses.
def share_of_a(prompts, completions):
    return [c.count("a") / max(len(c), 1) for c in completions]


def prompt_length(prompts, completions):
    return [float(len(p)) for p in prompts]


def too_few(prompts, completions):
    return [0.0] * (len(completions) - 1)


HERE = __name__


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from warp_dist.models import resolve_model_path

    cache = tmp_path_factory.mktemp("wdcache")
    return resolve_model_path("embedded:tiny-gpt2", cache_dir=str(cache))


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from warp_dist.models import load_tokenizer

    return load_tokenizer(tiny_path)


# ---------------------------------------------------------------------------------------------- VADER


@pytest.fixture(scope="module")
def vader():
    return VaderReward()


def test_vader_positive_negative(vader):
    out = vader(["This movie was ", "This movie was "],
                ["absolutely wonderful, I loved it! Brilliant and beautiful.",
                 "terrible, awful and boring. I hated it, the worst film ever."])
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out[0].item() > 0.5
    assert out[1].item() < -0.5


def test_vader_text_full_vs_completion():
    prompts = ["I hated this awful, terrible, horrible film. ", "What a wonderful, great, lovely movie. "]
    comps = ["The end", "The end"]
    full = VaderReward(text="full")(prompts, comps)
    comp = VaderReward(text="completion")(prompts, comps)
    assert full[0].item() < -0.5 and full[1].item() > 0.5
    assert comp.tolist() == [0.0, 0.0]
    # 'full' scores exactly the concatenation prompt + completion
    direct = VaderReward(text="completion")(["", ""], [p + c for p, c in zip(prompts, comps, strict=True)])
    torch.testing.assert_close(full, direct)


def test_vader_batching_matches_single_calls():
    texts = ["good", "bad", "great fun", "awful mess", "fine", "boring", "superb"]
    batched = VaderReward(text="completion", batch_size=3)([""] * len(texts), texts)
    single = torch.cat([VaderReward(text="completion")([""], [t]) for t in texts])
    assert batched.shape == (len(texts),)
    torch.testing.assert_close(batched, single)


# ------------------------------------------------------------------------------------------- callable


def test_callable_reward_returns_values():
    r = CallableReward(f"{HERE}:share_of_a")
    out = r(["p1", "p2", "p3"], ["aaaa", "abab", "xyz"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 0.0]))
    # the function receives the prompts too
    torch.testing.assert_close(CallableReward(f"{HERE}:prompt_length")(["ab", "abcd"], ["x", "y"]),
                               torch.tensor([2.0, 4.0]))


def test_callable_reward_wrong_length_raises():
    r = CallableReward(f"{HERE}:too_few")
    with pytest.raises(ValueError, match="2 scores for 3"):
        r(["a", "b", "c"], ["a", "b", "c"])


@pytest.mark.parametrize("spec", ["no_such_module_xyz_123:f", f"{HERE}:no_such_function", "nocolon", f"{HERE}:"])
def test_callable_reward_bad_spec_raises(spec):
    with pytest.raises(ValueError, match="reward.callable"):
        CallableReward(spec)


def test_build_reward_kinds():
    assert isinstance(build_reward(RewardConfig(kind="vader", text="completion")), VaderReward)
    r = build_reward(RewardConfig(kind="callable", callable=f"{HERE}:share_of_a"))
    assert isinstance(r, CallableReward)
    torch.testing.assert_close(r(["x"], ["aa"]), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        build_reward(RewardConfig(kind="nope"))


# ------------------------------------------------------------------------------------------ classifier


@pytest.fixture(scope="module")
def classifier_dir(tiny_path, tokenizer, tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=3,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=0)
    model = GPT2ForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("clf")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


CLF_TEXTS = ["a great movie", "this film was a total waste of two hours, honestly", "ok", "I loved the actors."]


def _direct_logits(folder, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding involved
            rows.append(model(**tok(t, return_tensors="pt")).logits[0].float())
    return torch.stack(rows)


def test_classifier_reward_label_logit_and_difference(classifier_dir):
    prompts = ["", "", "", ""]
    logits = _direct_logits(classifier_dir, CLF_TEXTS)
    assert logits.shape == (4, 3)
    r = ClassifierReward(classifier_dir, label=2, text="completion", batch_size=3)
    torch.testing.assert_close(r(prompts, CLF_TEXTS), logits[:, 2], rtol=1e-4, atol=1e-4)
    r = ClassifierReward(classifier_dir, label=1, minus_label=0, text="completion")
    diff = r(prompts, CLF_TEXTS)
    torch.testing.assert_close(diff, logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-4)
    assert diff.abs().max().item() > 1e-4  # not trivially zero
    # text='full' scores prompt + completion
    full = ClassifierReward(classifier_dir, label=1, minus_label=0, text="full")(["a great", "ok "], [" movie", "then"])
    exp = _direct_logits(classifier_dir, ["a great movie", "ok then"])
    torch.testing.assert_close(full, exp[:, 1] - exp[:, 0], rtol=1e-4, atol=1e-4)


def test_classifier_reward_errors(classifier_dir, tmp_path):
    with pytest.raises(ValueError, match="reward.label"):
        ClassifierReward(classifier_dir, label=3)
    with pytest.raises(ValueError, match="reward.minus_label"):
        ClassifierReward(classifier_dir, label=0, minus_label=5)
    with pytest.raises(RuntimeError, match="reward.name"):
        ClassifierReward(str(tmp_path / "no_such_classifier"))


# ----------------------------------------------------------------------------------------------- data


def test_clean():
    assert clean("Great film.<br /><br />Loved it.<BR>The end<br/>!") == "Great film. Loved it. The end !"
    assert clean("  a \n\t b  ") == "a b"
    assert "<br" not in clean("x<br />y").lower()


@pytest.fixture(scope="module")
def data_cfg():
    return DataConfig(source="bundled", prompt_min_tokens=6, prompt_max_tokens=10, num_train_prompts=48,
                      num_eval_prompts=12, seed=0)


@pytest.fixture(scope="module")
def prompts_seed0(data_cfg, tokenizer):
    return load_prompts(data_cfg, tokenizer)


def test_load_prompts_counts_lengths_disjoint(prompts_seed0, data_cfg, tokenizer):
    tr, ev = prompts_seed0
    assert len(tr) == 48 and len(tr.texts) == 48
    assert len(ev) == 12 and len(ev.texts) == 12
    lens = [len(i) for i in tr.ids + ev.ids]
    assert all(6 <= n <= 10 for n in lens)
    assert len(set(lens)) > 1  # lengths are drawn from the range, not fixed
    for ids, text in zip(tr.ids + ev.ids, tr.texts + ev.texts, strict=True):
        assert tokenizer.decode(ids) == text
        assert all(isinstance(t, int) for t in ids)
        assert "<br" not in text.lower()
    assert not set(tr.texts) & set(ev.texts)


def test_make_prompts_fixed_length_skips_short_and_raises(tokenizer):
    long_texts = [f"review number {i} is a long text about a movie that goes on and on for a while" for i in range(6)]
    texts = ["short", *long_texts[:3], "tiny", *long_texts[3:]]
    pr = make_prompts(texts, tokenizer, 5, 5, 5, seed=0)
    assert len(pr) == 5 and {len(i) for i in pr.ids} == {5}
    # the too-short reviews were skipped: prompts are the first 5 tokens of the long ones, in order
    for ids, text, full in zip(pr.ids, pr.texts, long_texts[:5], strict=True):
        assert ids == tokenizer(full, add_special_tokens=False)["input_ids"][:5]
        assert full.startswith(text) and text == tokenizer.decode(ids)
    with pytest.raises(RuntimeError, match="long enough"):
        make_prompts(texts, tokenizer, 7, 5, 5, seed=0)


def test_load_prompts_deterministic_and_seeded(prompts_seed0, data_cfg, tokenizer):
    tr, ev = prompts_seed0
    tr2, ev2 = load_prompts(data_cfg, tokenizer)
    assert tr2.ids == tr.ids and tr2.texts == tr.texts
    assert ev2.ids == ev.ids and ev2.texts == ev.texts
    tr3, ev3 = load_prompts(replace(data_cfg, seed=1), tokenizer)
    assert tr3.texts != tr.texts and ev3.texts != ev.texts
    assert len(tr3) == len(tr) and len(ev3) == len(ev)


def test_eval_prompts_never_equal_a_train_prompt(data_cfg, tokenizer):
    """Prompts of 2 tokens (the 7B preset's prompt_min_tokens): many reviews start alike ("This movie", "I have"), so
    eval candidates equal to a train prompt token for token are skipped for the next review and counted; with
    longer prompts none is skipped and the eval prompts are the ones drawn before this rule."""
    short = replace(data_cfg, prompt_min_tokens=2, prompt_max_tokens=2, num_train_prompts=256, num_eval_prompts=64)
    tr, ev = load_prompts(short, tokenizer)
    assert len(ev) == 64 and ev.duplicates_skipped > 0
    assert not {tuple(p) for p in ev.ids} & {tuple(p) for p in tr.ids}
    tr8, ev8 = load_prompts(data_cfg, tokenizer)
    texts = load_bundled_reviews(data_cfg.seed)
    cut = min(len(texts) // 2, max(4 * 12, 12 + 64))
    drawn = make_prompts(texts[:cut], tokenizer, 12, 6, 10, data_cfg.seed + 1)
    assert ev8.duplicates_skipped == 0 and ev8.ids == drawn.ids
