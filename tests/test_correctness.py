"""Correctness on real models (issue: sampling-distribution log-probs, BOS, group baselines, bf16, decoding, angles).

Each test here pins one of the failures a line-by-line review found; the multi-rank ones (group baseline,
ZeRO-3 sampling) are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from warp_dist import merging, sampling
from warp_dist.config import config_from_dict
from warp_dist.data import bos_prefix, decode_pairs, make_prompts
from warp_dist.models import eos_token_ids, load_causal_lm, load_tokenizer
from warp_dist.rollout.base import SamplingConfig, build_batch
from warp_dist.rollout.hf import HFBackend
from warp_dist.training.merger import MergeDiagnostics, weighted_quantiles
from warp_dist.training.rl_step import train_policy
from warp_dist.training.session import Session

# ------------------------------------------------------------------------ the processed sampling distribution


def hf_processed(logits, T, k, p, blocked, eos):
    """HF generate's own logits processors, applied in generate's order, then log-softmax."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = logits.clone()
    if blocked:
        x[:, eos] = float("-inf")
    x = TemperatureLogitsWarper(T)(None, x)
    if k:
        x = TopKLogitsWarper(k)(None, x)
    if p < 1.0:
        x = TopPLogitsWarper(p)(None, x)
    return torch.log_softmax(x, -1)


@pytest.mark.parametrize("T,k,p,blocked", [(1.0, 0, 1.0, False), (0.7, 5, 1.0, False), (1.0, 0, 0.8, False),
                                           (1.3, 5, 0.8, True), (0.5, 1, 0.9, True)])
def test_processed_logprobs_equal_hf_logits_processors(T, k, p, blocked):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 50, generator=g)
    eos = [3, 7]
    ours = sampling.processed_logprobs(logits, T, k, p, torch.full((6,), blocked), eos)
    ref = hf_processed(logits, T, k, p, blocked, eos)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin], rtol=0, atol=1e-5)
    if blocked:
        assert torch.isinf(ours[:, eos]).all()


def test_token_logprobs_score_another_model_on_the_samplers_support():
    g = torch.Generator().manual_seed(1)
    B, C, V = 3, 4, 30
    pol, ref = torch.randn(B, C, V, generator=g), torch.randn(B, C, V, generator=g)
    mask = torch.ones(B, C)
    mask[2, 3] = 0  # a padded position comes back as 0, never -inf / NaN
    lp_pol = sampling.processed_logprobs(pol, 1.0, 4)
    targets = lp_pol.argmax(-1)  # tokens inside the policy's top-4
    ours, support = sampling.token_logprobs(pol, targets, mask, top_k=4, return_support=True)
    torch.testing.assert_close(ours[mask > 0], lp_pol.gather(-1, targets[..., None])[..., 0][mask > 0])
    assert support.sum(-1).eq(4).all()
    # the reference is renormalised over the same 4 tokens: finite even where its own top-4 would drop the token
    ours_ref = sampling.token_logprobs(ref, targets, mask, top_k=4, support=support)
    want = torch.log_softmax(ref.masked_fill(~support, float("-inf")), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ours_ref[mask > 0], want[mask > 0])
    assert torch.isfinite(ours_ref).all() and ours_ref[2, 3] == 0
    # a sampled token just outside the trainer's support (a near-tie broken differently) stays finite
    outside = torch.log_softmax(pol, -1).argmin(-1)
    assert torch.isfinite(sampling.token_logprobs(pol, outside, mask, top_k=4)).all()


# ------------------------------------------------------------------------ the HF backend's sampler


@pytest.fixture(scope="module")
def eos_heavy_model(tiny_model_path, tmp_path_factory):
    """The tiny GPT-2 with 200 token ids declared as EOS, so completions end at very different lengths."""
    folder = tmp_path_factory.mktemp("eos_heavy") / "model"
    shutil.copytree(tiny_model_path, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = list(range(0, 1000, 5))
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return str(folder)


def test_hf_sampler_logprobs_are_the_trainers_and_respect_the_filters(eos_heavy_model):
    tok = load_tokenizer(eos_heavy_model)
    model = load_causal_lm(eos_heavy_model)
    eos = eos_token_ids(tok, eos_heavy_model)
    assert len(eos) >= 200
    prompts = [tok(t)["input_ids"] for t in ["This movie was", "I hated", "A", "The plot of this film is"]] * 2
    backend = HFBackend(lambda: model, tok.pad_token_id, eos)
    for kw in (dict(top_k=5, top_p=0.8), dict(temperature=0.7, min_new_tokens=6), dict(top_p=0.5)):
        s = SamplingConfig(max_new_tokens=10, eos_ids=tuple(sorted(eos)), **kw)
        gens = backend.generate(prompts, s, seed=3)
        b = build_batch(gens, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b.ids, attention_mask=b.att, position_ids=b.pos).logits[:, -b.keep:][:, :-1]
        lp = sampling.token_logprobs(logits, b.targets, b.mask, s.temperature, s.top_k, s.top_p, s.min_new_tokens,
                                     s.eos_ids)
        sampler = torch.tensor([x for row in gens.sampler_logprobs for x in row])
        gap = (lp[b.mask > 0] - sampler).abs()
        assert gap.max() < 1e-4, (kw, gap.max())
        for c in gens.completion_ids:
            ends = [j for j, t in enumerate(c) if t in eos]
            assert ends == ([len(c) - 1] if ends else [])  # a completion stops at its first EOS
            assert not ends or ends[0] >= s.min_new_tokens  # ... which min_new_tokens keeps away
    lengths = {len(c) for c in gens.completion_ids}
    assert len(lengths) > 1  # rows finished at different lengths
    # a completion depends on its prompt, seed and index only, not on the batch it shares
    s = SamplingConfig(max_new_tokens=10, eos_ids=tuple(sorted(eos)), top_k=5)
    full = backend.generate(prompts, s, seed=5, indices=list(range(8)))
    part = backend.generate(prompts[5:], s, seed=5, indices=[5, 6, 7])
    assert part.completion_ids == full.completion_ids[5:]


# ------------------------------------------------------------------------ BOS and decoding


def _bpe_tokenizer(pre, dec, bos: bool):
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from warp_dist.data import load_bundled_reviews

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre, dec
    tk.train_from_iterator(load_bundled_reviews(seed=0)[:300],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                               show_progress=False))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def sentencepiece_like(bos=True):
    from tokenizers import decoders, pre_tokenizers

    return _bpe_tokenizer(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                          decoders.Metaspace(replacement="▁", prepend_scheme="always"), bos)


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    tok = sentencepiece_like(bos=True)
    assert bos_prefix(tok) == [tok.bos_token_id]
    prompts = make_prompts(["This movie was great and I loved it"] * 3, tok, 2, 3, 3, seed=0)
    for ids, text in zip(prompts.ids, prompts.texts, strict=True):
        assert ids[0] == tok.bos_token_id and len(ids) == 4  # BOS + 3 tokens of text
        assert "<s>" not in text and text.startswith("This")
    plain = sentencepiece_like(bos=False)
    assert bos_prefix(plain) == []
    assert make_prompts(["This movie was great"], plain, 1, 3, 3, seed=0).ids[0][0] != plain.bos_token_id
    gpt2 = load_tokenizer_tiny()
    assert bos_prefix(gpt2) == []  # GPT-2 tokenizers add nothing: prompts unchanged


def load_tokenizer_tiny():
    from warp_dist.models import resolve_model_path

    return load_tokenizer(resolve_model_path("embedded:tiny-gpt2"))


def test_reward_text_is_the_whole_decoded_sequence():
    tok = sentencepiece_like(bos=True)
    p = tok("This movie was")["input_ids"]  # with BOS
    c = tok("great fun", add_special_tokens=False)["input_ids"]
    glued = tok.decode(p, skip_special_tokens=True) + tok.decode(c, skip_special_tokens=True)
    assert glued == "This movie wasgreat fun"  # what the reward used to see
    prompts, comps = decode_pairs(tok, [p], [c])
    assert prompts[0] + comps[0] == "This movie was great fun" and comps[0] == " great fun"
    # a multibyte character split between prompt and completion (byte-level BPE) is decoded whole
    gpt2 = load_tokenizer_tiny()
    ids = gpt2("Un film très beau", add_special_tokens=False)["input_ids"]
    full = gpt2.decode(ids)
    for cut in range(1, len(ids)):
        pr, co = decode_pairs(gpt2, [ids[:cut]], [ids[cut:]])
        assert pr[0] + co[0] == full


# ------------------------------------------------------------------------ bf16: fp32 master weights and EMA


def _tiny_cfg(tmp_path, **kw):
    model = kw.pop("model", {})
    return config_from_dict({
        "output_dir": str(tmp_path), "progress": False,
        "model": {"name": "embedded:tiny-gpt2", **model},
        "data": {"prompt_min_tokens": 4, "prompt_max_tokens": 8, "num_train_prompts": 64, "num_eval_prompts": 8},
        "reward": {"kind": "vader"}, "rollout": {"backend": "hf", "max_new_tokens": 12},
        "train": {"iterations": 1, "policies": 1, "batch_size": 8, **kw},
        "eval": {"batch_size": 8},
    })


def test_bf16_keeps_fp32_master_weights_and_ema(tmp_path, tiny_model_path):
    """The issue's reproduction (tiny preset, lr 1e-5, 10 steps): bf16 task vectors were 57 % shorter than fp32's
    because AdamW stepped bf16 weights and the EMA could not move; with fp32 master weights they agree."""
    norms = {}
    for dtype in ("float32", "bfloat16"):
        w = Session(_tiny_cfg(tmp_path / dtype, lr=1e-5, steps=10, model={"dtype": dtype}), log=lambda *_: None)
        for part in (w.policy.w, w.reference.w):
            assert all(part.local(n).dtype == torch.float32 for n in part.names)
        assert all(w.init.own(n).dtype == torch.float32 for n in w.weights.names)
        sft = w.state_dict("sft")
        train_policy(w, 1, 0)
        pol, ema = w.state_dict("policy"), w.state_dict("reference")
        norms[dtype] = sum((pol[n] - sft[n]).double().pow(2).sum() for n in sft).sqrt().item()
        ema_move = sum((ema[n] - sft[n]).double().pow(2).sum() for n in sft).sqrt().item()
        assert 0 < ema_move < norms[dtype]  # the EMA moved (a bf16 EMA copy could not)
        w.close()
    assert norms["float32"] > 0
    assert abs(norms["bfloat16"] - norms["float32"]) <= 0.2 * norms["float32"], norms


def test_deepspeed_precision_comes_from_model_dtype(tmp_path):
    from warp_dist.training.policy import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    tc = _tiny_cfg(tmp_path).train
    conf = deepspeed_config(str(path), tc, group_size=2, training=True)
    assert conf["bf16"] == {"enabled": False} and conf["fp16"] == {"enabled": False}
    assert conf["train_micro_batch_size_per_gpu"] * 2 == conf["train_batch_size"] == tc.batch_size


# ------------------------------------------------------------------------ per-tensor angles


def test_merge_diagnostics_report_the_per_tensor_angles_slerp_used():
    init = [torch.zeros(4), torch.zeros(100)]
    # tensor 0 (4 elements): task vectors at 90 deg; tensor 1 (100 elements): at 0 deg
    p0 = [torch.tensor([1.0, 0, 0, 0]), torch.ones(100)]
    p1 = [torch.tensor([0.0, 1, 0, 0]), 2 * torch.ones(100)]
    diag = MergeDiagnostics(2)
    for i in range(2):
        _, _, gram = merging.merge_pass(init[i], [p0[i], p1[i]], 0.5, 0.5)
        diag.add(init[i].numel(), gram, 0.5, 0.5)
    s = diag.summary()
    per = s["tensor_angle_deg"]["0-1"]
    assert per["min"] == pytest.approx(0.0, abs=1e-3) and per["max"] == pytest.approx(90.0)
    assert per["median"] == pytest.approx(0.0, abs=1e-3)  # 100 of the 104 elements sit in the 0-degree tensor
    # the whole-model angle is another number: it mixes the tensors
    assert 0.0 < s["angle_deg"]["0-1"] < 90.0
    assert weighted_quantiles([(10.0, 1), (20.0, 1), (30.0, 5)]) == {"min": 10.0, "median": 30.0, "max": 30.0}


def test_gradient_checkpointing_changes_memory_not_the_math(tmp_path, tiny_model_path):
    """train.gradient_checkpointing recomputes layers in backward (train() mode, dropout removed): same weights."""
    states = {}
    for gc in ("false", "true"):
        cfg = _tiny_cfg(tmp_path / gc, lr=1e-3, steps=3)
        cfg.train.gradient_checkpointing = gc
        w = Session(cfg, log=lambda *_: None)
        assert w.policy.checkpointing == (gc == "true")
        train_policy(w, 1, 0)
        states[gc] = w.state_dict("policy")
        w.close()
    sft = Session(_tiny_cfg(tmp_path / "sft"), log=lambda *_: None).state_dict("sft")
    moved = max((states["false"][k] - sft[k]).abs().max().item() for k in sft)
    worst = max((states["false"][k] - states["true"][k]).abs().max().item() for k in sft)
    assert moved > 1e-3 and worst < 1e-5, (moved, worst)
