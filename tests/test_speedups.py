"""Correctness of the speed-ups (speed issue): each one must give the log-probs of the plain path.

- completion-only logits (`logits_to_keep`) == the last positions of the full-sequence pass;
- bf16 autocast (fp32 weights) within a stated tolerance of fp32;
- the eager attention kernel (what `model.attention=auto` picks for short bf16 sequences on CPU) == sdpa;
- the chunked, fused completion log-prob (`sampling._TargetLogprob`) == log_softmax + gather, values and gradients.
"""

from __future__ import annotations

import pytest
import torch

from warp_dist import sampling
from warp_dist.config import ConfigError, config_from_dict
from warp_dist.training.policy import EAGER_MAX_TOKENS, attention_impl
from warp_dist.training.session import Session

# bf16 autocast vs fp32, token log-probs (nats) of the tiny GPT-2 on the sampled completions below: measured max |diff|
# 0.0016, mean 0.0005 (2-core Xeon, sdpa and eager alike); the bounds leave ~6x / 4x room
BF16_MAX_ABS = 0.01
BF16_MEAN_ABS = 0.002


def _cfg(tmp_path, **model):
    return config_from_dict({
        "output_dir": str(tmp_path), "progress": False,
        "model": {"name": "embedded:tiny-gpt2", **model},
        "data": {"prompt_min_tokens": 3, "prompt_max_tokens": 8, "num_train_prompts": 16, "num_eval_prompts": 8},
        "reward": {"kind": "vader"}, "rollout": {"backend": "hf", "max_new_tokens": 10},
        "train": {"iterations": 1, "policies": 1, "batch_size": 8},
        "eval": {"batch_size": 8},
    })


@pytest.fixture(scope="module")
def batch_and_fp32(tmp_path_factory, tiny_model_path):
    """One sampled batch (left-padded prompts of 3..8 tokens, completions of unequal length) and its fp32 log-probs."""
    w = Session(_cfg(tmp_path_factory.mktemp("fp32"), attention="sdpa"), log=lambda *_: None)
    try:
        prompts = [w.train_prompts.ids[i] for i in range(8)]
        gens = w.backend.generate(prompts, w.sampling, seed=11)
        from warp_dist.rollout.base import build_batch

        batch = build_batch(gens, w.pad)
        lp, _ = w.logprobs(w.reference.logits, batch)
        full = _full_pass_logprobs(w, batch)
    finally:
        w.close()
    assert (batch.att[:, :batch.prompt_len] == 0).any()  # left padding: the attention mask matters
    return batch, lp, full


def _full_pass_logprobs(w, batch):
    """The same log-probs from logits of EVERY position (no logits_to_keep), cut to the completion afterwards."""
    ws = w.reference.w
    keep_flag, ws._keep = ws._keep, False
    try:
        lp, _ = w.logprobs(w.reference.logits, batch)
    finally:
        ws._keep = keep_flag
    return lp


def test_completion_only_logits_equal_the_full_pass(batch_and_fp32):
    batch, lp, full = batch_and_fp32
    m = batch.mask > 0
    torch.testing.assert_close(lp[m], full[m], rtol=0, atol=1e-5)


def test_tiny_gpt2_supports_completion_only_logits(tmp_path, tiny_model_path):
    w = Session(_cfg(tmp_path), log=lambda *_: None)
    try:
        assert w.reference.w._keep and w.policy.w._keep  # the fast path is the one the trainer takes
    finally:
        w.close()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bf16_autocast_logprobs_within_tolerance_of_fp32(batch_and_fp32, tmp_path, attention):
    batch, lp32, _ = batch_and_fp32
    w = Session(_cfg(tmp_path, dtype="bfloat16", attention=attention), log=lambda *_: None)
    try:
        assert w.attention == attention
        lp16, _ = w.logprobs(w.reference.logits, batch)
        with torch.no_grad():
            train_lp, _ = w.logprobs(w.policy.loss_logits, batch)  # the pass gradients flow through
    finally:
        w.close()
    m = batch.mask > 0
    diff = (lp16[m] - lp32[m]).abs()
    assert lp16.dtype == torch.float32
    assert diff.max() <= BF16_MAX_ABS and diff.mean() <= BF16_MEAN_ABS, (diff.max(), diff.mean())
    assert diff.max() > 0  # it did compute in bf16
    torch.testing.assert_close(train_lp[m], lp16[m], rtol=0, atol=1e-6)


def test_eager_attention_equals_sdpa_in_fp32(batch_and_fp32, tmp_path):
    batch, lp_sdpa, _ = batch_and_fp32
    w = Session(_cfg(tmp_path, attention="eager"), log=lambda *_: None)
    try:
        assert w.policy.module.config._attn_implementation == "eager"
        lp, _ = w.logprobs(w.reference.logits, batch)
    finally:
        w.close()
    m = batch.mask > 0
    torch.testing.assert_close(lp[m], lp_sdpa[m], rtol=0, atol=1e-5)


def test_auto_attention_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_impl("auto", cpu, torch.bfloat16, 34) == "eager"
    # otherwise the model's own default ("": transformers picks sdpa where the model has it, eager elsewhere)
    assert attention_impl("auto", cpu, torch.bfloat16, EAGER_MAX_TOKENS + 1) == ""  # long: eager keeps L x L
    assert attention_impl("auto", cpu, torch.float32, 34) == ""
    assert attention_impl("auto", cuda, torch.bfloat16, 34) == ""
    assert attention_impl("sdpa", cpu, torch.bfloat16, 34) == "sdpa"
    assert attention_impl("eager", cuda, torch.float32, 4096) == "eager"


def test_auto_attention_in_the_trainer(tmp_path, tiny_model_path):
    for dtype, kernel in (("bfloat16", "eager"), ("float32", "sdpa")):  # prompts 8 + 2 + 10 new tokens: short
        w = Session(_cfg(tmp_path / dtype, dtype=dtype), log=lambda *_: None)
        try:
            assert w.attention == kernel  # fp32: the tiny GPT-2's own default, sdpa
            for m in (w.policy.module, w.reference.w.module):
                assert m.config._attn_implementation == kernel
        finally:
            w.close()


def test_bad_attention_is_one_line():
    with pytest.raises(ConfigError, match=r"model\.attention.*auto \| sdpa \| eager"):
        config_from_dict({"model": {"attention": "flash"}})


def _reference_logprobs(logits, targets, mask, temperature, min_new_tokens, eos_ids, support):
    """The plain formula: log_softmax of the processed fp32 logits, gathered at the targets."""
    x = logits.float() / temperature
    blocked = sampling.eos_block_mask(targets.shape[1], min_new_tokens).expand(targets.shape)
    x = sampling.block_eos(x, blocked, eos_ids)
    if support is not None:
        x = x.masked_fill(~support, float("-inf"))
    lp = torch.log_softmax(x, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(mask == 0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [0, 5])
def test_fused_chunked_logprobs_equal_log_softmax_values_and_grads(monkeypatch, dtype, top_k):
    B, L, V = 3, 7, 40
    C = L - 1
    torch.manual_seed(0)
    full = (2 * torch.randn(B, L, V)).to(dtype).requires_grad_()
    logits = full[:, :-1]  # a non-contiguous view, as a sliced model output would be
    targets = torch.randint(0, V, (B, C))
    targets[0, 4] = 3  # an EOS after the blocked positions
    mask = torch.ones(B, C)
    mask[1, 4:] = 0  # a finished completion
    weights = torch.randn(B, C)
    monkeypatch.setattr(sampling, "CHUNK_BYTES", 4 * V * 2)  # chunks of 2 rows: a sequence spans several chunks
    ours, support = sampling.token_logprobs(logits, targets, mask, temperature=0.7, top_k=top_k, min_new_tokens=3,
                                            eos_ids=[3, 11], return_support=True)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), full)
    ref = _reference_logprobs(logits, targets, mask, 0.7, 3, [3, 11], support)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), full)
    assert (support is None) == (top_k == 0)
    assert torch.isfinite(ours).all() and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    assert g_ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is rounded to the logits' dtype
    assert torch.allclose(g_ours.float(), g_ref.float(), atol=tol, rtol=tol), (g_ours - g_ref).abs().max()
    assert g_ours[:, -1].abs().sum() == 0  # the dropped last position gets no gradient
    assert g_ours[:, :3, 3].abs().sum() == 0 and g_ours[:, :3, 11].abs().sum() == 0  # blocked EOS: none either


def test_fused_logprobs_under_no_grad_and_with_a_given_support():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 30)
    targets = torch.randint(0, 30, (2, 5))
    mask = torch.ones(2, 5)
    _, support = sampling.token_logprobs(logits, targets, mask, top_p=0.8, return_support=True)
    other = torch.randn(2, 5, 30)
    with torch.no_grad():
        ours = sampling.token_logprobs(other, targets, mask, support=support)
    ref = _reference_logprobs(other, targets, mask, 1.0, 0, [], support)
    assert torch.allclose(ours, ref, atol=1e-6)


ALLOCATOR_SCRIPT = r"""
import ctypes, sys
import torch
from warp_dist import dist

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def grow(n=64 << 20):
    before = rss()
    t = torch.ones(n // 4)  # touched: resident
    del t
    return rss() - before  # what stays resident after the free

assert dist.tune_allocator(), "tune_allocator did not apply"
kept = grow()
with dist.mapped_blocks():
    inside = grow()
dist.trim_allocator()
after = grow()
# ZeRO-3's rule (the trainer sets it after dist.init's heap rule): blocks >= 256 KiB mmapped; a merge leaves it as is
assert dist.tune_allocator(mmap_threshold=1 << 18), "tune_allocator(mmap_threshold) did not apply"
with dist.mapped_blocks():
    pass
zero3 = grow()
print(kept, inside, after, zero3)
"""


def test_allocator_heap_rule_and_mapped_blocks_for_the_merge():
    """tune_allocator's default keeps a freed 64 MiB tensor in the heap (the next step reuses it: no page faults);
    inside mapped_blocks (the merge) the same tensor is mmapped and goes back to the OS when freed; after it, the heap
    rule is back; under ZeRO-3's rule (blocks >= 256 KiB mmapped) a merge changes nothing."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "WARP_DIST_MALLOC"}
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, inside, after, zero3 = (int(v) for v in out.stdout.split())
    mib = 1 << 20
    assert kept > 48 * mib, f"heap rule: a freed 64 MiB tensor should stay resident, {kept / mib:.1f} MiB did"
    assert inside < 16 * mib, f"mapped_blocks: a freed 64 MiB tensor should leave, {inside / mib:.1f} MiB stayed"
    assert after > 48 * mib, f"after mapped_blocks the heap rule is back, {after / mib:.1f} MiB stayed"
    assert zero3 < 16 * mib, f"ZeRO-3's mmap rule survives a merge: {zero3 / mib:.1f} MiB of a freed 64 MiB stayed"
