"""Merging math: SLERP of task vectors, iterative SLERP for M > 2, LITI, whole-state-dict merges."""

from __future__ import annotations

import math

import pytest
import torch

from warp_dist.merging import (
    clone_state,
    distance,
    liti,
    merge_state_dicts,
    merge_tensor,
    slerp,
    slerp_many,
    task_vector_stats,
    unique_names,
)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 4)])
def test_slerp_endpoints(shape):
    d1, d2 = _rand(*shape, seed=1), _rand(*shape, seed=2)
    torch.testing.assert_close(slerp(d1, d2, 0.0), d1, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(d1, d2, 1.0), d2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_slerp_orthogonal_equal_norm_keeps_norm(lam):
    d1 = torch.tensor([3.0, 0.0, 0.0, 0.0])
    d2 = torch.tensor([0.0, 0.0, 3.0, 0.0])
    out = slerp(d1, d2, lam)
    assert out.norm().item() == pytest.approx(3.0, abs=1e-5)
    # and it is the point at angle lam * 90 degrees in the d1-d2 plane
    expected = 3.0 * torch.tensor([math.cos(lam * math.pi / 2), 0.0, math.sin(lam * math.pi / 2), 0.0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # linear interpolation would shrink it (except at the endpoints): slerp really is spherical
    if 0 < lam < 1:
        assert ((1 - lam) * d1 + lam * d2).norm().item() < 3.0 - 1e-3


def test_slerp_orthogonal_equal_norm_random_high_dim():
    a = _rand(64, 32, seed=3)
    b = _rand(64, 32, seed=4)
    # make b orthogonal to a with the same norm
    b = b - (b * a).sum() / (a * a).sum() * a
    b = b * a.norm() / b.norm()
    for lam in (0.3, 0.5, 0.9):
        assert slerp(a, b, lam).norm().item() == pytest.approx(a.norm().item(), rel=1e-5)


def test_slerp_60_degrees_by_hand():
    s3 = math.sqrt(3.0)
    d1 = torch.tensor([2.0, 0.0])  # norm 2, angle 0
    d2 = torch.tensor([1.5, 1.5 * s3])  # norm 3, angle 60 degrees
    omega = math.pi / 3
    for lam in (0.5, 0.25, 0.7):
        c1 = math.sin((1 - lam) * omega) / math.sin(omega)
        c2 = math.sin(lam * omega) / math.sin(omega)
        expected = torch.tensor([c1 * 2.0 + c2 * 1.5, c2 * 1.5 * s3])
        torch.testing.assert_close(slerp(d1, d2, lam), expected, rtol=0, atol=1e-5)
    # at lam = 0.5 both coefficients are sin(30)/sin(60) = 1/sqrt(3)
    torch.testing.assert_close(slerp(d1, d2, 0.5), (d1 + d2) / s3, rtol=0, atol=1e-5)
    # unit vectors: the midpoint is the unit vector at 30 degrees
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, s3 / 2])
    torch.testing.assert_close(slerp(u1, u2, 0.5), torch.tensor([s3 / 2, 0.5]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_slerp_colinear_same_direction_is_linear(scale, lam):
    d1 = _rand(5, 6, seed=5)
    d2 = scale * d1
    out = slerp(d1, d2, lam)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, (1 - lam) * d1 + lam * d2, rtol=1e-5, atol=1e-5)


def test_slerp_identical_vectors_exactly_linear_no_nan():
    d = torch.full((3, 3), 0.7)
    out = slerp(d, d.clone(), 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_slerp_zero_vector_fallback(lam):
    d = _rand(4, 3, seed=6)
    z = torch.zeros_like(d)
    out1 = slerp(z, d, lam)
    out2 = slerp(d, z, lam)
    out3 = slerp(z, z, lam)
    for o in (out1, out2, out3):
        assert torch.isfinite(o).all()
    torch.testing.assert_close(out1, lam * d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out2, (1 - lam) * d, rtol=1e-6, atol=1e-6)
    assert torch.equal(out3, z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4)])
def test_slerp_dtype_and_shape_preserved(dtype, shape):
    d1, d2 = _rand(*shape, seed=7, dtype=dtype), _rand(*shape, seed=8, dtype=dtype)
    out = slerp(d1, d2, 0.5)
    assert out.dtype == dtype
    assert out.shape == d1.shape
    # the math is done in fp32 on the (already rounded) inputs, then cast back
    ref = slerp(d1.float(), d2.float(), 0.5).to(dtype)
    assert torch.equal(out, ref)
    many = slerp_many([d1, d2, _rand(*shape, seed=9, dtype=dtype)])
    assert many.dtype == dtype and many.shape == d1.shape


def test_slerp_non_contiguous_input():
    d1, d2 = _rand(5, 7, seed=10), _rand(5, 7, seed=11)
    out = slerp(d1.t(), d2.t(), 0.3)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, slerp(d1, d2, 0.3).t(), rtol=0, atol=1e-6)


def test_slerp_many_m1_and_m2():
    d1, d2 = _rand(4, 4, seed=12), _rand(4, 4, seed=13)
    one = slerp_many([d1])
    assert torch.equal(one, d1) and one.data_ptr() != d1.data_ptr()
    torch.testing.assert_close(slerp_many([d1, d2], 0.3), slerp(d1, d2, 0.3), rtol=0, atol=0)
    with pytest.raises(ValueError):
        slerp_many([])


def test_slerp_many_m3_iterative_by_hand():
    d1, d2, d3 = _rand(3, 8, seed=14), _rand(3, 8, seed=15), _rand(3, 8, seed=16)
    expected = slerp(slerp(d1, d2, 1 / 2), d3, 1 / 3)
    torch.testing.assert_close(slerp_many([d1, d2, d3]), expected, rtol=0, atol=1e-6)
    # and it is not simply the first pairwise merge (d3 is really folded in)
    assert (slerp_many([d1, d2, d3]) - slerp(d1, d2, 0.5)).abs().max().item() > 1e-2


def test_slerp_many_m4_iterative_by_hand():
    ds = [_rand(10, seed=20 + i) for i in range(4)]
    expected = slerp(slerp(slerp(ds[0], ds[1], 1 / 2), ds[2], 1 / 3), ds[3], 1 / 4)
    torch.testing.assert_close(slerp_many(ds), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ liti


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liti_endpoints_and_midpoint(dtype):
    init, target = _rand(4, 5, seed=30, dtype=dtype), _rand(4, 5, seed=31, dtype=dtype)
    assert torch.equal(liti(init, target, 0.0), init)
    assert torch.equal(liti(init, target, 1.0), target)
    out = liti(init, target, 0.3)
    assert out.dtype == dtype
    ref = (0.7 * init.float() + 0.3 * target.float()).to(dtype)
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- merge_tensor


@pytest.mark.parametrize("t", [torch.arange(6).view(2, 3), torch.tensor([True, False, True]),
                               torch.tensor([1, 2, 3], dtype=torch.uint8)])
def test_merge_tensor_non_float_untouched(t):
    policies = [t + 1 if t.dtype != torch.bool else ~t, t.clone()]
    merged, nxt = merge_tensor(t, policies, 0.5, 0.3)
    assert merged is t and nxt is t
    assert merged.dtype == t.dtype


def test_merge_tensor_values_by_hand():
    init = _rand(3, 4, seed=40)
    p1, p2 = init + _rand(3, 4, seed=41), init + _rand(3, 4, seed=42)
    lam, eta = 0.4, 0.3
    merged, nxt = merge_tensor(init, [p1, p2], lam, eta)
    exp_merged = init + slerp(p1 - init, p2 - init, lam)
    torch.testing.assert_close(merged, exp_merged, rtol=0, atol=1e-5)
    torch.testing.assert_close(nxt, (1 - eta) * init + eta * exp_merged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_tensor_low_precision_dtype(dtype):
    init = _rand(8, 8, seed=43, dtype=dtype)
    p1 = (init.float() + 0.1 * _rand(8, 8, seed=44)).to(dtype)
    p2 = (init.float() + 0.1 * _rand(8, 8, seed=45)).to(dtype)
    merged, nxt = merge_tensor(init, [p1, p2], 0.5, 0.5)
    assert merged.dtype == dtype and nxt.dtype == dtype
    ref = (init.float() + slerp(p1.float() - init.float(), p2.float() - init.float(), 0.5)).to(dtype)
    torch.testing.assert_close(merged, ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- whole state dicts (GPT-2)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg).eval()


def _perturbed(state, seed, scale=0.05):
    """A policy: clone (ties kept) and add noise to each distinct float storage once."""
    p = clone_state(state)
    g = torch.Generator().manual_seed(seed)
    for k in unique_names(p):
        if p[k].is_floating_point():
            p[k].add_(scale * torch.randn(p[k].shape, generator=g))
    return p


TIED = ("lm_head.weight", "transformer.wte.weight")


@pytest.fixture(scope="module")
def gpt2():
    return _tiny_gpt2()


def test_gpt2_state_dict_is_tied(gpt2):
    sd = gpt2.state_dict()
    assert sd[TIED[0]].data_ptr() == sd[TIED[1]].data_ptr()
    names = unique_names(sd)
    assert len(names) == len(sd) - 1
    assert sum(n in names for n in TIED) == 1


def test_clone_state_keeps_ties_and_copies(gpt2):
    sd = gpt2.state_dict()
    c = clone_state(sd)
    assert set(c) == set(sd)
    assert c[TIED[0]] is c[TIED[1]]
    for k in sd:
        assert torch.equal(c[k], sd[k])
        assert c[k].data_ptr() != sd[k].data_ptr()
        assert not c[k].requires_grad
    before = sd["transformer.wte.weight"].clone()
    c["transformer.wte.weight"].add_(1.0)
    c["transformer.h.0.ln_1.weight"].zero_()
    assert torch.equal(sd["transformer.wte.weight"], before)
    assert torch.equal(gpt2.transformer.wte.weight.detach(), before)
    h = clone_state(sd, dtype=torch.bfloat16)  # cast once per storage: still tied
    assert h[TIED[0]] is h[TIED[1]] and all(v.dtype == torch.bfloat16 for v in h.values() if v.is_floating_point())
    assert torch.equal(h["transformer.h.0.attn.c_attn.bias"], sd["transformer.h.0.attn.c_attn.bias"].bfloat16())
    assert gpt2.transformer.h[0].ln_1.weight.abs().sum().item() > 0
    # the tied partner followed the in-place change in the clone
    assert torch.equal(c["lm_head.weight"], before + 1.0)


def test_merge_state_dicts_gpt2_ties_keys_values_and_load(gpt2):
    init = clone_state(gpt2.state_dict())
    pols = [_perturbed(init, seed=100), _perturbed(init, seed=101)]
    lam, eta = 0.5, 0.3
    merged, nxt = merge_state_dicts(init, pols, lam, eta)
    for out in (merged, nxt):
        assert set(out) == set(init)
        assert out[TIED[0]] is out[TIED[1]]
        for k in init:
            assert out[k].shape == init[k].shape and out[k].dtype == init[k].dtype
    # values: per tensor init + slerp(delta1, delta2) and LITI
    for k in unique_names(init):
        d1, d2 = pols[0][k] - init[k], pols[1][k] - init[k]
        exp = init[k] + slerp(d1, d2, lam)
        torch.testing.assert_close(merged[k], exp, rtol=0, atol=1e-5)
        torch.testing.assert_close(nxt[k], (1 - eta) * init[k] + eta * exp, rtol=0, atol=1e-5)
    # the merge actually moved the weights
    assert distance(init, merged) > 1e-3
    # loadable into the model, strictly, and the model stays tied
    m = _tiny_gpt2()
    m.load_state_dict(merged, strict=True)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(m.transformer.wte.weight.detach(), merged["transformer.wte.weight"], rtol=0, atol=0)
    m.load_state_dict(nxt, strict=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(m(input_ids=ids).logits).all()


@pytest.mark.parametrize("m", [1, 2, 3])
def test_merge_identical_policies_equal_init_returns_init(gpt2, m):
    init = clone_state(gpt2.state_dict())
    merged, nxt = merge_state_dicts(init, [clone_state(init) for _ in range(m)], 0.5, 0.3)
    for k in init:
        assert torch.equal(merged[k], init[k]), k
        assert torch.equal(nxt[k], init[k]), k


def test_merge_identical_policies_returns_that_policy(gpt2):
    init = clone_state(gpt2.state_dict())
    p = _perturbed(init, seed=7)
    merged, _ = merge_state_dicts(init, [p, clone_state(p), clone_state(p)], 0.5, 0.5)
    assert distance(merged, p) < 1e-4 * max(1.0, distance(init, p))


def test_merge_state_dicts_non_float_passthrough():
    init = {"w": torch.ones(3), "step": torch.tensor(5), "mask": torch.tensor([True, False])}
    pols = [{"w": torch.ones(3) * 2, "step": torch.tensor(9), "mask": torch.tensor([False, False])}] * 2
    merged, nxt = merge_state_dicts(init, pols, 0.5, 0.5)
    assert merged["step"] is init["step"] and nxt["mask"] is init["mask"]
    torch.testing.assert_close(merged["w"], torch.ones(3) * 2)
    torch.testing.assert_close(nxt["w"], torch.ones(3) * 1.5)


# ------------------------------------------------------------------------------------- stats / distance


def test_task_vector_stats_by_hand():
    t = torch.zeros(2)
    init = {"a": t, "a_tied": t, "b": torch.zeros(1), "n": torch.tensor([1, 2])}
    p0a = torch.tensor([3.0, 0.0])
    p1a = torch.tensor([3.0, 0.0])
    p0 = {"a": p0a, "a_tied": p0a, "b": torch.tensor([4.0]), "n": torch.tensor([7, 7])}
    p1 = {"a": p1a, "a_tied": p1a, "b": torch.tensor([0.0]), "n": torch.tensor([0, 0])}
    p2 = {"a": torch.tensor([0.0, 2.0]), "a_tied": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0]),
          "n": torch.tensor([1, 2])}
    st = task_vector_stats(init, [p0, p1, p2])
    # tied tensor counted once; integer tensor ignored
    assert st["task_vector_norm"] == pytest.approx([5.0, 3.0, 2.0])
    assert st["cosine"]["0-1"] == pytest.approx(9.0 / 15.0)
    assert st["cosine"]["0-2"] == pytest.approx(0.0, abs=1e-12)
    assert st["cosine"]["1-2"] == pytest.approx(0.0, abs=1e-12)
    assert st["angle_deg"]["0-1"] == pytest.approx(math.degrees(math.acos(0.6)))
    assert st["angle_deg"]["0-2"] == pytest.approx(90.0)
    assert set(st["cosine"]) == {"0-1", "0-2", "1-2"}


def test_task_vector_stats_zero_vector_gives_nan_cosine():
    init = {"a": torch.zeros(2)}
    st = task_vector_stats(init, [{"a": torch.zeros(2)}, {"a": torch.ones(2)}])
    assert st["task_vector_norm"] == pytest.approx([0.0, math.sqrt(2)])
    assert math.isnan(st["cosine"]["0-1"]) and math.isnan(st["angle_deg"]["0-1"])


def test_distance(gpt2):
    sd = gpt2.state_dict()
    assert distance(sd, clone_state(sd)) == 0.0
    a = {"x": torch.zeros(2), "n": torch.tensor([1])}
    b = {"x": torch.tensor([3.0, 4.0]), "n": torch.tensor([100])}
    assert distance(a, b) == pytest.approx(5.0)
    # tied tensors count once
    t = torch.zeros(2)
    u = torch.tensor([3.0, 4.0])
    assert distance({"x": t, "y": t}, {"x": u, "y": u}) == pytest.approx(5.0)
    assert distance(a, b) == pytest.approx(distance(b, a))


# ------------------------------------------------------------------------ the fused one-pass merge (merge_pass)
from warp_dist import merging  # noqa: E402


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,chunk", [((7,), 4), ((300, 257), 1000), ((64, 64), 1 << 16)])
def test_merge_pass_equals_the_reference_merge(M, shape, chunk):
    init = _rand(*shape, seed=60)
    policies = [init + 0.01 * _rand(*shape, seed=61 + m) for m in range(M)]
    slerp_t, nxt, gram = merging.merge_pass(init, policies, 0.4, 0.3, chunk=chunk)
    ref_s, ref_n = merging.merge_tensor_reference(init, policies, 0.4, 0.3)
    torch.testing.assert_close(slerp_t, ref_s, rtol=0, atol=5e-7)  # one fp32 ulp of |init| ~ 4: the same math
    torch.testing.assert_close(nxt, ref_n, rtol=0, atol=5e-7)
    assert slerp_t.shape == init.shape and slerp_t.dtype == init.dtype
    # the Gram matrix is the two-pass one: <d_i, d_j> in fp64 over the whole tensor
    ds = [(p.double() - init.double()).flatten() for p in policies]
    two_pass = torch.tensor([[float(a @ b) for b in ds] for a in ds], dtype=torch.float64)
    torch.testing.assert_close(gram[:M, :M], two_pass, rtol=1e-6, atol=1e-9)
    assert gram[M].abs().max().item() == 0.0  # no sft given: init - sft is 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_pass_low_precision_matches_the_reference(dtype):
    init = _rand(40, 40, seed=70, dtype=dtype)
    policies = [(init.float() + 0.1 * _rand(40, 40, seed=71 + m)).to(dtype) for m in range(2)]
    s, n, _ = merging.merge_pass(init, policies, 0.5, 0.5, chunk=300)
    rs, rn = merging.merge_tensor_reference(init, policies, 0.5, 0.5)
    assert s.dtype == dtype and n.dtype == dtype
    assert (s.float() - rs.float()).abs().max().item() <= 0.02 and (n.float() - rn.float()).abs().max().item() <= 0.02


def test_slerp_coefficients_by_hand():
    # orthogonal unit vectors, lambda 0.5: sin(pi/4) / sin(pi/2) = 1/sqrt(2) each
    c = merging.slerp_coefficients(torch.eye(2, dtype=torch.float64), 0.5)
    assert c == pytest.approx([2**-0.5, 2**-0.5])
    # colinear (sin Omega = 0) and zero-norm vectors fall back to linear interpolation
    assert merging.slerp_coefficients(torch.tensor([[1.0, 2.0], [2.0, 4.0]]), 0.3) == pytest.approx([0.7, 0.3])
    assert merging.slerp_coefficients(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), 0.3) == pytest.approx([0.7, 0.3])
    assert merging.slerp_coefficients(torch.tensor([[3.0]]), 0.5) == [1.0]
    # M = 3 folds with 1/m: the same vector as slerp_many on the tensors
    ds = [_rand(50, seed=80 + i) for i in range(3)]
    g = torch.tensor([[float(a.double() @ b.double()) for b in ds] for a in ds], dtype=torch.float64)
    c = merging.slerp_coefficients(g, 0.5)
    torch.testing.assert_close(sum(ci * d for ci, d in zip(c, ds, strict=True)), slerp_many(ds), rtol=0, atol=1e-5)


def test_merge_pass_diagnostics_and_non_finite_inputs():
    init, sft = _rand(30, seed=90), _rand(30, seed=91)
    policies = [init + _rand(30, seed=92), init + _rand(30, seed=93)]
    s, n, gram = merging.merge_pass(init, policies, 0.5, 0.25, sft=sft, chunk=7)
    c = merging.slerp_coefficients(gram[:2, :2], 0.5)
    d = merging.gram_diagnostics(gram, c, 0.25)
    assert math.sqrt(d["slerp_distance_to_sft"]) == pytest.approx((s - sft).norm().item(), rel=1e-5)
    assert math.sqrt(d["slerp_distance_to_init"]) == pytest.approx((s - init).norm().item(), rel=1e-5)
    assert math.sqrt(d["init_moved"]) == pytest.approx((n - init).norm().item(), rel=1e-5)
    bad = policies[1].clone()
    bad[3] = float("nan")
    _, _, g = merging.merge_pass(init, [policies[0], bad], 0.5, 0.25)
    assert not math.isfinite(g[1, 1].item()) and math.isfinite(g[0, 0].item())
    bad_init = init.clone()
    bad_init[0] = float("inf")
    _, _, g = merging.merge_pass(bad_init, policies, 0.5, 0.25)
    assert not bool(torch.isfinite(g).all())


# ------------------------------------------------------- merge_pass destinations and the compiled kernel
def test_merge_pass_writes_into_given_destinations_and_rejects_bad_ones():
    init = _rand(50, 40, seed=100)
    policies = [init + 0.01 * _rand(50, 40, seed=101 + m) for m in range(2)]
    ref_s, ref_n, ref_g = merging.merge_pass(init, policies, 0.5, 0.3, chunk=333)
    out, nxt = torch.full((2000,), float("nan")), torch.full((2000,), float("nan"))
    s, n, g = merging.merge_pass(init, policies, 0.5, 0.3, chunk=333, out=out, nxt=nxt)
    assert s.data_ptr() == out.data_ptr() and n.data_ptr() == nxt.data_ptr()  # written in place, no new tensor
    assert torch.equal(s, ref_s) and torch.equal(n, ref_n) and torch.equal(g, ref_g)
    with pytest.raises(ValueError, match="merge_pass out: needs a contiguous torch.float32 tensor of 2000"):
        merging.merge_pass(init, policies, 0.5, 0.3, out=torch.empty(1999))
    with pytest.raises(ValueError, match="merge_pass nxt: needs a contiguous torch.float32"):
        merging.merge_pass(init, policies, 0.5, 0.3, nxt=torch.empty(2000, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="kernel='fast': allowed eager, compiled"):
        merging.merge_pass(init, policies, 0.5, 0.3, kernel="fast")


@pytest.mark.skipif(bool(merging.compiler_available()), reason="torch.compile needs a C++ compiler here")
@pytest.mark.parametrize("dtype,M,with_sft", [(torch.float32, 1, False), (torch.float32, 2, True),
                                               (torch.float32, 3, False), (torch.bfloat16, 2, True)])
def test_compiled_merge_equals_the_eager_one(dtype, M, with_sft):
    n = merging.COMPILED_MIN + 4321  # above the size where the compiled sweeps take over, not a multiple of anything
    init = _rand(n, seed=110).to(dtype)
    policies = [(init.float() + 0.01 * _rand(n, seed=111 + m)).to(dtype) for m in range(M)]
    sft = _rand(n, seed=120).to(dtype) if with_sft else None
    es, en, eg = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft)
    out, nxt = torch.empty_like(init), torch.empty_like(init)
    cs, cn, cg = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft, kernel="compiled", out=out, nxt=nxt)
    assert cs.data_ptr() == out.data_ptr() and cs.dtype == dtype and cn.dtype == dtype
    # the same math: fp32 outputs within 2 ulp of |init| ~ 4 (the two kernels round their sums in another order);
    # bf16 outputs within one bf16 ulp
    tol = 1e-6 if dtype == torch.float32 else 0.016
    assert (cs.float() - es.float()).abs().max().item() <= tol and (cn.float() - en.float()).abs().max().item() <= tol
    # the Gram matrix against fp64 over the whole tensor. The compiled kernel sums fp32 products in fp32 over blocks of
    # GRAM_BLOCK, then in fp64: its error is bounded relative to sum |a_i b_i| (measured <= 1.5e-8 for fp32 and bf16
    # inputs, n = 70 K and 5 M; the bound leaves ~7x room), the eager kernel's (fp64 sums) is ~1e-10
    rows = [(p.double() - init.double()) for p in policies] + ([init.double() - sft.double()] if with_sft else [])
    exact = torch.tensor([[float(a @ b) for b in rows] for a in rows], dtype=torch.float64)
    scale = torch.tensor([[float(a.abs() @ b.abs()) for b in rows] for a in rows], dtype=torch.float64)
    k = len(rows)
    assert ((cg[:k, :k] - exact).abs() <= 1e-7 * scale).all(), (cg[:k, :k] - exact).abs() / scale
    assert ((eg[:k, :k] - exact).abs() <= 1e-9 * scale).all(), (eg[:k, :k] - exact).abs() / scale
    assert cg.shape == (M + 1, M + 1) and cg.dtype == torch.float64
    assert (eg[k:] == cg[k:]).all() and (eg[:, k:] == cg[:, k:]).all()  # the unused rows: zero in both
    # lam and eta reach the compiled graph as cached 0-d tensors: another value is another merge, no stale one
    es2, en2, _ = merging.merge_pass(init, policies, 0.7, 0.9, sft=sft)
    cs2, cn2, _ = merging.merge_pass(init, policies, 0.7, 0.9, sft=sft, kernel="compiled")
    assert (cs2.float() - es2.float()).abs().max().item() <= tol and (cn2.float() - en2.float()).abs().max() <= tol
    assert not torch.equal(cn2, cn) and (M != 2 or not torch.equal(cs2, cs))  # lam counts at M = 2 only
    # small tensors stay eager under kernel="compiled": identical to the eager call
    small = merging.merge_pass(init[:100], [p[:100] for p in policies], 0.4, 0.3, kernel="compiled")
    ref = merging.merge_pass(init[:100], [p[:100] for p in policies], 0.4, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(small, ref, strict=True))


def test_compiled_merge_flags_non_finite_inputs():
    if merging.compiler_available():
        pytest.skip("torch.compile needs a C++ compiler here")
    n = merging.COMPILED_MIN
    init = _rand(n, seed=130)
    policies = [init + 0.01 * _rand(n, seed=131), init + 0.01 * _rand(n, seed=132)]
    policies[1][17] = float("nan")
    _, _, g = merging.merge_pass(init, policies, 0.5, 0.5, kernel="compiled")
    assert not math.isfinite(g[1, 1].item()) and math.isfinite(g[0, 0].item())


def _native():
    from warp_dist.merging import native

    why = native.unavailable()
    if why:
        pytest.skip(why)
    return native


@pytest.mark.parametrize("dtype,M,with_sft", [(torch.float32, 1, False), (torch.float32, 2, True),
                                               (torch.float32, 4, True), (torch.bfloat16, 2, False),
                                               (torch.bfloat16, 3, True)])
def test_native_merge_is_the_compiled_one_bit_for_bit(dtype, M, with_sft):
    """merge.kernel=native runs the compiled graph's math in C++: the same output bits (their Gram sums add the same
    products in another order, so the bits agree where both round the SLERP coefficients alike, as at these sizes and
    seeds), a Gram matrix within the compiled one's bound, at every size (the compiled graph itself from 577 elements,
    where merge_pass would stay eager; below two Gram blocks the graph does not compile, and the eager merge is the
    reference)."""
    _native()  # skips where the kernel cannot be built
    for n in (2, 3, 255, 256, 577, merging.COMPILED_MIN + 4321):
        init = _rand(n, seed=150 + n).to(dtype)
        policies = [(init.float() + 0.01 * _rand(n, seed=151 + m)).to(dtype) for m in range(M)]
        sft = _rand(n, seed=160).to(dtype) if with_sft else None
        out, nxt = torch.full_like(init, float("nan")), torch.full_like(init, float("nan"))
        ns, nn, ng = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft, kernel="native", out=out, nxt=nxt)
        assert ns.data_ptr() == out.data_ptr() and nn.data_ptr() == nxt.data_ptr()  # written in place
        if n > 2 * merging.GRAM_BLOCK:
            cs, cn, _ = merging.compiled_merge_pass(init, policies, sft, 0.4, 0.3, None, None, init)
            assert torch.equal(ns, cs) and torch.equal(nn, cn), n
        es, en, _ = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft)  # the eager reference, within a rounding
        # (2 or 3 elements with M >= 2: task vectors near-colinear, where a Gram rounding moves the SLERP weights more)
        tol = (1e-6 if n > 3 else 1e-4) if dtype == torch.float32 else 0.016
        assert (ns.float() - es.float()).abs().max().item() <= tol and (nn.float() - en.float()).abs().max() <= tol
        rows = [(p.double() - init.double()) for p in policies] + ([init.double() - sft.double()] if with_sft else [])
        exact = torch.tensor([[float(a @ b) for b in rows] for a in rows], dtype=torch.float64)
        scale = torch.tensor([[float(a.abs() @ b.abs()) for b in rows] for a in rows], dtype=torch.float64)
        k = len(rows)
        assert ng.shape == (M + 1, M + 1) and ng.dtype == torch.float64
        # fp32 sums of <= 16 products per vector lane of a block of 256 (compiled: then across the lanes in fp32), the
        # lanes and blocks in fp64: ~16 u relative to sum |a_i b_i| at worst (u = 6e-8); a wrong entry is off by O(1)
        assert ((ng[:k, :k] - exact).abs() <= 1e-6 * scale).all(), n
        assert (ng[k:] == 0).all() and (ng[:, k:] == 0).all()


def test_native_merge_falls_back_to_eager_and_flags_non_finite_inputs():
    _native()
    n = 1000
    init = _rand(n, seed=170)
    policies = [init + 0.01 * _rand(n, seed=171), init + 0.01 * _rand(n, seed=172)]
    # dtypes the kernel does not take (fp16, mixed fp32/bf16) merge eagerly: the eager call's exact result
    for x, ps in ((init.half(), [p.half() for p in policies]), (init, [policies[0], policies[1].bfloat16()])):
        got, ref = merging.merge_pass(x, ps, 0.5, 0.5, kernel="native"), merging.merge_pass(x, ps, 0.5, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    policies[1][17] = float("nan")  # a NaN in a policy: its Gram diagonal is NaN, the other policy's stays finite
    _, _, g = merging.merge_pass(init, policies, 0.5, 0.5, kernel="native")
    assert not math.isfinite(g[1, 1].item()) and math.isfinite(g[0, 0].item())


def test_native_bf16_merge_keeps_every_nan_of_its_inputs():
    """bf16 outputs are rounded without a NaN test: a NaN of an input, whatever its bits (the largest payloads
    0x7FFF / 0xFFFF included, where a carry out of the rounding would reach the exponent), is NaN in both outputs,
    on both sides of the lerp formula; the other elements are the eager merge's within a rounding."""
    _native()
    n = 3000
    init = _rand(n, seed=180).bfloat16()
    policies = [(init.float() + 0.01 * _rand(n, seed=181 + m)).bfloat16() for m in range(2)]
    policies[0].view(torch.int16)[5] = 0x7FFF
    policies[1].view(torch.int16)[6] = -1  # 0xFFFF
    policies[1][7] = float("nan")
    init.view(torch.int16)[8] = -0x40  # 0xFFC0, a negative quiet NaN
    for eta in (0.3, 0.7):
        got = merging.merge_pass(init, policies, 0.4, eta, kernel="native")
        ref = merging.merge_pass(init, policies, 0.4, eta)
        for g, r in zip(got[:2], ref[:2], strict=True):
            assert g[5:9].isnan().all() and torch.equal(g.isnan(), r.isnan()), eta
            ok = ~r.isnan()
            assert (g[ok].float() - r[ok].float()).abs().max().item() <= 0.016, eta


@pytest.mark.parametrize("dtype,M,with_sft", [(torch.float32, 6, True), (torch.bfloat16, 8, True),
                                               (torch.bfloat16, 5, False)])
def test_native_merge_of_large_outputs_is_the_same_aligned_or_not(dtype, M, with_sft):
    """Outputs of >= 4 MB leave through non-temporal stores when both are 64-byte aligned (on CPUs with AVX-512),
    through plain stores otherwise: the same bits either way, the eager merge's values within a rounding; up to the
    kernel's 8 policies, a ragged tail after the last whole vector."""
    native = _native()
    n = (4 << 20) // torch.tensor([], dtype=dtype).element_size() + 77
    init = _rand(n, seed=190).to(dtype)
    policies = [(init.float() + 0.01 * _rand(n, seed=191 + m)).to(dtype) for m in range(M)]
    sft = _rand(n, seed=199).to(dtype) if with_sft else None
    bufs = [torch.full((n + 16,), float("nan"), dtype=dtype) for _ in range(4)]
    assert all(b.data_ptr() % 64 == 0 for b in bufs)  # torch's CPU allocations are 64-byte aligned
    aligned = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft, kernel="native", out=bufs[0][:n], nxt=bufs[1][:n])
    shifted = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft, kernel="native", out=bufs[2][1:n + 1],
                                 nxt=bufs[3][1:n + 1])
    assert all(torch.equal(a, b) for a, b in zip(aligned, shifted, strict=True))
    assert bufs[0][n:].isnan().all() and bufs[2][0].isnan() and bufs[2][n + 1:].isnan().all()  # nothing outside
    eager = merging.merge_pass(init, policies, 0.4, 0.3, sft=sft)
    tol = 1e-6 if dtype == torch.float32 else 0.016
    for a, b in zip(aligned[:2], eager[:2], strict=True):
        assert (a.float() - b.float()).abs().max().item() <= tol
    assert torch.allclose(aligned[2], eager[2], rtol=1e-5, atol=1e-6 * float(eager[2].abs().max()))
    assert native.max_policies() == 8


def _narrower_isas() -> list[str]:
    """-march levels below this CPU's vector width that it can run: the kernel's 8-float path (AVX2 + FMA, or SSE2
    without FMA or streaming stores) next to its 16-float AVX-512 one."""
    from warp_dist.merging import native

    flags = set(native._cpu_flags().split())
    levels = ["x86-64"] if "sse2" in flags else []
    if {"avx512f", "avx2", "fma"} <= flags:
        levels.append("x86-64-v3")
    return levels


@pytest.fixture(scope="module")
def narrow_cache(tmp_path_factory):
    """One cache folder for the narrower builds, so each -march level is built once for the cases below."""
    return tmp_path_factory.mktemp("narrow_cache")


@pytest.mark.parametrize("dtype,M,with_sft", [(torch.float32, 2, True), (torch.float32, 4, False),
                                               (torch.bfloat16, 3, True)])
def test_native_kernel_gives_the_same_merge_at_every_vector_width(narrow_cache, monkeypatch, dtype, M, with_sft):
    """The kernel takes 16 floats per vector with AVX-512 and 8 below it (one register each), fuses the Gram products
    where the CPU has FMA and streams outputs of >= 4 MB where it has AVX: built for a narrower instruction set than
    this CPU's (what an AVX2 or older machine runs), its outputs are the -march=native build's within a rounding and
    its Gram matrix within the sums' bound, on a ragged size and on one large enough to stream."""
    native = _native()
    levels = _narrower_isas()
    if not levels:
        pytest.skip("no narrower x86-64 level to build for on this CPU")
    el = torch.tensor([], dtype=dtype).element_size()
    sizes = (1000 + 13, (4 << 20) // el + 77)
    cases = []
    for n in sizes:
        init = _rand(n, seed=210 + n % 97).to(dtype)
        policies = [(init.float() + 0.01 * _rand(n, seed=211 + m)).to(dtype) for m in range(M)]
        sft = (init.float() - 0.02 * _rand(n, seed=219)).to(dtype) if with_sft else None
        cases.append((init, policies, sft, merging.merge_pass(init, policies, 0.4, 0.3, sft=sft, kernel="native")))
    monkeypatch.setenv("WARP_DIST_CACHE", str(narrow_cache))
    tol = 1e-6 if dtype == torch.float32 else 0.016
    flags = list(native.FLAGS)  # each level from the -march=native flags (patching the patched list kept level 1's)
    for level in levels:
        monkeypatch.setattr(native, "FLAGS", [f"-march={level}" if f == "-march=native" else f for f in flags])
        monkeypatch.setattr(native, "_FN", None)
        for init, policies, sft, (rs, rn, rg) in cases:
            out, nxt = torch.empty_like(init), torch.empty_like(init)
            g = native.gram(init, policies, sft)
            native.apply(init, policies, merging.slerp_coefficients(g[:M, :M], 0.4), 0.3, out, nxt)
            assert (out.float() - rs.float()).abs().max().item() <= tol, (level, init.numel())
            assert (nxt.float() - rn.float()).abs().max().item() <= tol, (level, init.numel())
            # |a.b| <= max diagonal: the sums' rounding bound (~16 u of sum |a_i b_i|) with room; a wrong entry is off
            # by O(1) of it
            assert (g - rg).abs().max().item() <= 2e-6 * float(rg.diagonal().max()), (level, init.numel())
        lib = native.library_path(native.compiler())  # named by the flags: this level's build, not native's
        assert lib.parent == narrow_cache and lib.exists(), lib
    assert len(list(narrow_cache.iterdir())) == len(levels)  # one build per level, shared by the cases


def test_native_merge_of_more_policies_than_the_kernel_takes():
    """Nine policies: the compiled graph from COMPILED_MIN elements (its exact result), the eager sweep below."""
    native = _native()
    if merging.compiler_available():
        pytest.skip(merging.compiler_available())
    M = native.max_policies() + 1
    for n in (merging.COMPILED_MIN, 1000):
        init = _rand(n, seed=200)
        policies = [init + 0.01 * _rand(n, seed=201 + m) for m in range(M)]
        got = merging.merge_pass(init, policies, 0.4, 0.3, kernel="native")
        ref = (merging.compiled_merge_pass(init, policies, None, 0.4, 0.3, None, None, init) if n >= merging.COMPILED_MIN
               else merging.merge_pass(init, policies, 0.4, 0.3))
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), n


def test_native_kernel_builds_once_into_its_cache_atomically(tmp_path, monkeypatch):
    native = _native()
    monkeypatch.setenv("WARP_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_FN", None)
    native.load()  # a build into the new cache folder
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("merge_kernel-") and built[0].suffix == ".so", built
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_FN", None)
    native.load()  # found: no second build, no temporary left behind
    assert list((tmp_path / "cache").iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    x = _rand(300, seed=180)
    _, _, g = merging.merge_pass(x, [x + 1, x - 1], 0.5, 0.5, kernel="native")
    assert g[0, 0].item() == pytest.approx(300.0) and g[0, 1].item() == pytest.approx(-300.0)


def test_native_kernel_reports_a_failed_build_in_one_line(tmp_path, monkeypatch):
    native = _native()
    monkeypatch.setenv("WARP_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_FN", None)
    bad = tmp_path / "merge_kernel.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    why = native.unavailable()
    assert why.startswith("merge.kernel=native: building merge_kernel.cpp with ") and "\n" not in why, why
    assert "error" in why.split(" failed: ", 1)[1], why  # the compiler's error line, not its caret or its count
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_kernel_for_auto_compiles_only_when_the_eager_merges_would_take_long(monkeypatch, tmp_path):
    assert merging.kernel_for("eager", 10**12, 2, 5) == "eager"
    assert merging.kernel_for("compiled", 1, 2, 1) == "compiled"
    small = 4 * 135_000_000  # SmolLM2-135M in fp32: (M + 3) x 0.54 GB x 2 iterations ~ 2 s eager -> eager
    assert merging.kernel_for("auto", small, 2, 2) == "eager"
    big = 4 * 7_000_000_000  # a 7 B model: minutes of eager merging -> native, when its kernel builds here
    expected = "eager" if merging.compiler_available() else "native"
    assert merging.kernel_for("auto", big, 2, 2) == expected
    from warp_dist.merging import native

    if not merging.compiler_available():  # a kernel that does not build: auto takes torch.compile's
        monkeypatch.setattr(native, "unavailable", lambda: "merge.kernel=native: building failed")
        assert merging.kernel_for("auto", big, 2, 2) == "compiled"
        monkeypatch.undo()
    monkeypatch.setattr(native, "_FN", None)  # not loaded yet in this process
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler on PATH: auto stays eager, the reason is one line
    assert "needs a C++ compiler" in merging.compiler_available()
    assert native.unavailable() == "merge.kernel=native needs a C++ compiler (g++) on PATH; none was found"
    assert merging.kernel_for("auto", big, 2, 2) == "eager"


def test_config_allows_exactly_auto_and_the_merge_kernels():
    """config.py stays torch-free, so it spells the kernel list itself; this keeps it equal to merging's."""
    from warp_dist import config

    assert config.MERGE_KERNELS == ("auto", *merging.KERNELS)


def test_slerp_coefficients_equal_slerp_of_the_vectors_including_fallbacks():
    """Every kernel merges with `slerp_coefficients` of the Gram matrix: they must give the vector SLERP
    (`slerp_many`) for orthogonal, colinear (sin(Omega) = 0 -> lerp), zero (-> lerp), single and random vectors."""
    ds = [_rand(40, seed=140 + i).double() for i in range(4)]
    e1, e2 = torch.eye(2, dtype=torch.float64)
    cases = [[e1, e2], [e1, 2 * e1], [torch.zeros(2, dtype=torch.float64), e2], [3 * e1]]
    cases += [ds[:m] for m in (2, 3, 4)]
    for vs in cases:
        g = torch.stack([torch.stack([a @ b for b in vs]) for a in vs])
        for lam in (0.3, 0.5):
            coef = merging.slerp_coefficients(g, lam)
            got = sum(c * v for c, v in zip(coef, vs, strict=True))
            want = merging.slerp_many(list(vs), lam)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (vs, lam, coef)  # slerp_many works in fp32
