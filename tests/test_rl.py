"""RL math: log-prob alignment, KL estimator vs exact KL, KL-shaped reward, baselines, REINFORCE, EMA."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from warp_dist.rollout.base import Generations, build_batch, truncate_at_eos
from warp_dist.sampling import token_logprobs
from warp_dist.training.rl import (
    baseline,
    ema_update,
    kl_estimate,
    kl_shaped_reward,
    reinforce_loss,
    sequence_logprob,
)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The test's reference: [B, L-1], entry t = log softmax(logits[:, t])[ids[:, t+1]] (fp32)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

# ------------------------------------------------------------------- the trainer's token log-probs (sampling.py)


def test_token_logprobs_alignment():
    """The trainer's log-probs (plain distribution: T = 1, no filters): position t of the logits scores target t."""
    g = torch.Generator().manual_seed(0)
    B, C, V = 3, 6, 7
    logits = torch.randn(B, C, V, generator=g)
    targets = torch.randint(0, V, (B, C), generator=g)
    out = token_logprobs(logits, targets, torch.ones(B, C))
    assert out.shape == (B, C)
    for b in range(B):
        for t in range(C):
            exp = torch.log_softmax(logits[b, t], -1)[targets[b, t]]
            assert out[b, t].item() == pytest.approx(exp.item(), abs=1e-6)
    assert (out <= 0).all()  # all entries are log-probs


def test_token_logprobs_low_precision_logits_give_fp32_and_grad():
    logits = torch.randn(2, 4, 5).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]])
    out = token_logprobs(logits, targets, mask)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert logits.grad[:, -1].abs().sum().item() == 0  # the masked position is unused


def test_sequence_logprob_masked_sum():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(sequence_logprob(lp, mask), torch.tensor([-5.0, -0.5]))


# ------------------------------------------------------------------------------ KL estimator vs exact KL

V = 3


class Bigram(nn.Module):
    """Tiny causal LM: the logits at position t depend only on input_ids[:, t]."""

    def __init__(self, seed: int, scale: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, 4)
        self.head = nn.Linear(4, V)
        with torch.no_grad():
            self.emb.weight.copy_(scale * torch.randn(V, 4, generator=g))
            self.head.weight.copy_(torch.randn(V, 4, generator=g))
            self.head.bias.copy_(torch.randn(V, generator=g))

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def _seq_logps(model, ids, mask):
    with torch.no_grad():
        return next_token_logprobs(model(ids), ids), mask


def _all_sequences(prompt: list[int], n_new: int = 2) -> torch.Tensor:
    return torch.tensor([prompt + list(y) for y in itertools.product(range(V), repeat=n_new)])


def _exact_kl(pi, ref, prompt):
    ids = _all_sequences(prompt)
    P = len(prompt)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    mask[:, P - 1:] = 1.0
    lp, _ = _seq_logps(pi, ids, mask)
    lr, _ = _seq_logps(ref, ids, mask)
    seq_pi = sequence_logprob(lp, mask).double()
    seq_ref = sequence_logprob(lr, mask).double()
    probs = seq_pi.exp()
    exact = (probs * (seq_pi - seq_ref)).sum().item()
    return exact, probs, kl_estimate(lp, lr, mask).double()


def _sample(pi, prompt, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(prompt).repeat(n, 1)
    with torch.no_grad():
        for _ in range(2):
            p = torch.softmax(pi(ids)[:, -1], -1)
            nxt = torch.multinomial(p, 1, generator=g)
            ids = torch.cat([ids, nxt], 1)
    return ids


def test_kl_estimate_matches_exact_kl():
    pi, ref = Bigram(1), Bigram(2)
    prompt = [0]
    exact, probs, per_seq = _exact_kl(pi, ref, prompt)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert exact > 0.05  # the two models really differ, so the check below has teeth
    # exact-weighted estimator == exact KL
    assert (probs * per_seq).sum().item() == pytest.approx(exact, abs=1e-6)

    n = 20000
    ids = _sample(pi, prompt, n, seed=0)
    mask = torch.ones(n, ids.shape[1] - 1)
    lp, _ = _seq_logps(pi, ids, mask)
    lr, _ = _seq_logps(ref, ids, mask)
    est = kl_estimate(lp, lr, mask).double()
    assert est.shape == (n,)
    se = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - exact) < 4 * se, (est.mean().item(), exact, se)
    # the samples really come from pi: empirical sequence frequencies match the enumerated probabilities
    codes = ids[:, 1] * V + ids[:, 2]
    freq = torch.bincount(codes, minlength=V * V).double() / n
    assert (freq - probs).abs().max().item() < 0.02


def test_kl_estimate_respects_completion_mask():
    """A 2-token prompt whose first transition is masked out gives the same KL as the 1-token prompt."""
    pi, ref = Bigram(3), Bigram(4)
    exact1, _, _ = _exact_kl(pi, ref, [0])
    exact2, probs2, per_seq2 = _exact_kl(pi, ref, [2, 0])
    assert exact2 == pytest.approx(exact1, abs=1e-6)
    # without the mask the prompt transition (2 -> 0) would leak into the estimate
    ids = _all_sequences([2, 0])
    lp, _ = _seq_logps(pi, ids, None)
    lr, _ = _seq_logps(ref, ids, None)
    unmasked = (probs2 * kl_estimate(lp, lr, torch.ones_like(lp)).double()).sum().item()
    assert abs(unmasked - exact1) > 1e-3


def test_kl_estimate_zero_for_same_model():
    pi = Bigram(5)
    exact, _, per_seq = _exact_kl(pi, pi, [1])
    assert exact == 0.0
    assert torch.equal(per_seq, torch.zeros_like(per_seq))


# --------------------------------------------------------------------------------------- shaped reward


def test_kl_shaped_reward_by_hand_and_detached():
    reward = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    logp_ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -0.25, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    beta = 0.1
    out = kl_shaped_reward(reward, logp, logp_ref, mask, beta)
    # row 0: kl = (-2 - -1) + (-3 - -9) = 5 ; row 1: kl = 0.5 + (-0.25) = 0.25
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.5, 2.0 - 0.025]))
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(kl_shaped_reward(reward, logp, logp_ref, mask, 0.0), reward)


# -------------------------------------------------------------------------------------------- baseline


def test_baseline_mean_and_loo():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(baseline(r, "mean"), torch.full((4,), 3.0))
    torch.testing.assert_close(baseline(r, "loo"), torch.tensor([11 / 3, 10 / 3, 3.0, 2.0]))
    assert baseline(r, "loo").shape == r.shape


def test_baseline_errors():
    with pytest.raises(ValueError):
        baseline(torch.tensor([1.0]), "loo")
    with pytest.raises(ValueError, match="median"):
        baseline(torch.tensor([1.0, 2.0]), "median")


# ------------------------------------------------------------------------------------------- REINFORCE


def test_reinforce_loss_value_and_advantage_is_constant():
    seq_logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    loss = reinforce_loss(seq_logp, adv)
    assert loss.item() == pytest.approx(-(-1.0 + 4.0 - 0.25) / 3)
    loss.backward()
    assert adv.grad is None
    torch.testing.assert_close(seq_logp.grad, -adv.detach() / 3)


def test_reinforce_step_increases_prob_of_best_token():
    torch.manual_seed(0)
    logits = nn.Parameter(torch.zeros(4))
    rewards_by_token = torch.tensor([0.0, 0.3, 1.0, 0.1])
    p_before = torch.softmax(logits.detach(), -1)
    g = torch.Generator().manual_seed(1)
    tokens = torch.multinomial(p_before, 64, replacement=True, generator=g)
    assert (tokens == 2).any()
    r = rewards_by_token[tokens]
    logp = torch.log_softmax(logits, -1)[tokens]
    loss = reinforce_loss(logp, r - baseline(r, "loo"))
    opt = torch.optim.SGD([logits], lr=1.0)
    opt.zero_grad()
    loss.backward()
    # gradient matches the REINFORCE formula -mean(A * (onehot(y) - p))
    adv = r - baseline(r, "loo")
    expected = -(adv[:, None] * (torch.nn.functional.one_hot(tokens, 4).float() - p_before)).mean(0)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)
    opt.step()
    p_after = torch.softmax(logits.detach(), -1)
    assert p_after[2] > p_before[2] + 1e-3
    assert p_after.argmax().item() == 2
    assert p_after[0] < p_before[0]


# ------------------------------------------------------------------------------------------------- EMA


def test_ema_update_mu_01_exact():
    e = [torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64)]
    p = [torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64), torch.tensor([[1.5]], dtype=torch.float64)]
    expected = [0.9 * a + 0.1 * b for a, b in zip(e, p, strict=True)]
    ema_update(e, p, 0.1)
    for a, b in zip(e, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ema_update_fp32_and_mu_one_copies():
    e = [torch.randn(5, 3)]
    p = [torch.randn(5, 3)]
    exp = 0.9 * e[0] + 0.1 * p[0]
    ema_update(e, p, 0.1)
    torch.testing.assert_close(e[0], exp, rtol=0, atol=1e-6)
    ema_update(e, p, 1.0)
    assert torch.equal(e[0], p[0])
    assert e[0].data_ptr() != p[0].data_ptr()


def test_ema_update_non_float_untouched_and_params_unchanged():
    ei = torch.tensor([1, 2, 3])
    ef = torch.zeros(3)
    pf = torch.ones(3, requires_grad=True)
    pi_ = torch.tensor([7, 8, 9])
    ema_update([ei, ef], [pi_, pf], 0.5)
    assert torch.equal(ei, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(ef, torch.full((3,), 0.5))
    assert torch.equal(pf.detach(), torch.ones(3))
    assert not ef.requires_grad


def test_ema_update_bf16_ema_and_length_mismatch():
    e = [torch.zeros(4, dtype=torch.bfloat16)]
    ema_update(e, [torch.ones(4)], 0.5)
    assert e[0].dtype == torch.bfloat16
    torch.testing.assert_close(e[0].float(), torch.full((4,), 0.5))
    with pytest.raises(ValueError):
        ema_update([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.1)


def test_ema_on_module_parameters():
    torch.manual_seed(0)
    model, anchor = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [t.detach().clone() for t in anchor.parameters()]
    ema_update(list(anchor.parameters()), list(model.parameters()), 0.25)
    for a, b, p in zip(anchor.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), 0.75 * b + 0.25 * p.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- build_batch / truncate


def test_build_batch_left_padded_prompts_right_padded_completions():
    prompts = [[5, 6, 7], [8], [9, 10]]
    comps = [[1, 2], [3], []]
    b = build_batch(Generations(prompts, comps), pad_id=0)
    assert b.ids.shape == (3, 5) and b.targets.shape == (3, 2) and b.mask.shape == (3, 2) and b.prompt_len == 3
    assert b.ids.tolist() == [[5, 6, 7, 1, 2], [0, 0, 8, 3, 0], [0, 9, 10, 0, 0]]
    assert b.att.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]]
    assert b.targets.tolist() == [[1, 2], [3, 0], [0, 0]]
    assert b.mask.tolist() == [[1, 1], [1, 0], [0, 0]]
    # positions count real tokens only, so a left-padded prompt sees the positions it would see alone
    assert b.pos.tolist()[1][2:4] == [0, 1] and b.pos.tolist()[2][1:3] == [0, 1]
    assert b.keep == 3


def test_build_batch_keep_positions_predict_the_completion():
    """logits of the last `keep` positions minus the final one are the ones that predict the completion tokens."""
    g = torch.Generator().manual_seed(0)
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    b = build_batch(Generations(prompts, comps), pad_id=0)
    logits = torch.randn(*b.ids.shape, 10, generator=g)
    full = next_token_logprobs(logits, b.ids)  # [B, L-1]: entry t predicts ids[:, t+1]
    P = b.prompt_len
    kept = torch.log_softmax(logits[:, -b.keep:][:, :-1], -1).gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(kept * b.mask, full[:, P - 1:] * b.mask)
    for i, c in enumerate(comps):
        assert b.mask[i].sum().item() == len(c)
        assert b.targets[i, : len(c)].tolist() == c


def test_truncate_at_eos():
    assert truncate_at_eos([4, 5, 0, 6, 7], {0}) == [4, 5, 0]
    assert truncate_at_eos([4, 5, 6], {0}) == [4, 5, 6]
    assert truncate_at_eos([0, 1, 2], {0}) == [0]
    assert truncate_at_eos([3, 9, 0, 9], {0, 9}) == [3, 9]
    assert truncate_at_eos([], {0}) == []


def test_rloo_baseline_per_prompt_hand_computed():
    # 2 prompts x 3 completions, prompt-major: prompt 0 -> [1, 2, 6], prompt 1 -> [0, 0, 3]
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    loo = baseline(r, "loo", num_completions=3)
    torch.testing.assert_close(loo, torch.tensor([4.0, 3.5, 1.5, 1.5, 1.5, 0.0]))
    mean = baseline(r, "mean", num_completions=3)
    torch.testing.assert_close(mean, torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    # k = 1 is the whole-batch baseline
    torch.testing.assert_close(baseline(r, "loo", 1), (r.sum() - r) / 5)
    with pytest.raises(ValueError, match="groups of num_completions=4"):
        baseline(r, "loo", num_completions=4)
