"""`launch/warp.py` on configs/warp/tiny.yaml in a subprocess writes the whole run folder."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT, subprocess_env


def test_tiny_run_writes_metrics_summary_and_loadable_model(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", "save_iterations=true", "train.steps=3", "merge.kernel=compiled"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| WARP |" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 * 2 * 3
    assert {(r["iteration"], r["policy"]) for r in train} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert [r["iteration"] for r in recs if r["kind"] == "merge"] == [1, 2]
    assert {r["merge_kernel"] for r in recs if r["kind"] == "merge"} == {"compiled"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward_mean", "reward_std", "kl_mean", "identical_fraction", "num_prompts", "reward_ci_low",
                "reward_ci_high", "kl_ci_low", "kl_ci_high", "judge", "judge_mean", "distinct_1", "distinct_2"):
        assert key in summary["sft"] and key in summary["final"]
    assert summary["final"]["judge"] == "none"  # VADER reward and no eval.judge_classifier: no independent judge
    assert len(summary["per_prompt"]["final"]["reward"]) == summary["final"]["num_prompts"]
    assert "reward" in summary["final_vs_sft"] and "WARP - SFT, paired bootstrap" in proc.stdout
    assert list((out / "tb").glob("events.out.tfevents.*"))  # log_with: tensorboard by default
    assert summary["final"]["identical_fraction"] < 1.0
    assert (out / "config.yaml").exists()
    for d in ("init", "policy_0", "policy_1", "merged"):
        assert (out / "iter_1" / d / "config.json").exists()
        assert (out / "iter_2" / d / "config.json").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    merged = AutoModelForCausalLM.from_pretrained(out / "iter_2" / "merged")
    sft = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    AutoTokenizer.from_pretrained(out / "final")
    fs, ms, ss = final.state_dict(), merged.state_dict(), sft.state_dict()
    assert all(torch.equal(fs[k], ms[k]) for k in fs), "final/ must be the last iteration's SLERP"
    assert any(not torch.equal(fs[k], ss[k]) for k in fs), "final/ must differ from the SFT weights"
    # theta_init of iteration 2 is the LITI of iteration 1: init_2 = (1 - eta) init_1 + eta merged_1, eta = 0.5
    i1 = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "init").state_dict()
    m1 = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "merged").state_dict()
    i2 = AutoModelForCausalLM.from_pretrained(out / "iter_2" / "init").state_dict()
    k = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(i2[k], 0.5 * i1[k] + 0.5 * m1[k], atol=1e-6)
    # merge.kernel=compiled merged the embedding (the one tensor above merging.COMPILED_MIN) with the compiled
    # sweeps: iteration 1's SLERP equals the eager merge of the saved policies
    from warp_dist import merging

    pols = [AutoModelForCausalLM.from_pretrained(out / "iter_1" / f"policy_{m}").state_dict() for m in (0, 1)]
    name = "transformer.wte.weight"
    assert i1[name].numel() >= merging.COMPILED_MIN
    eager, _ = merging.merge_tensor(i1[name], [p[name] for p in pols], 0.5, 0.5)
    assert (m1[name] - eager).abs().max().item() <= 1e-6
