"""launch/eval.py and the report on a tiny finished run; the plain-REINFORCE baseline through the same path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("report")
    run = root / "warp"
    _run([str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={run}",
          "train.steps=2", "save_iterations=true"])
    base = root / "baselines"
    _run(["-m", "warp_dist.sweep", "--config", str(ROOT / "configs" / "baseline_reinforce.yaml"), "--betas", "0.05",
          "--out", str(base), "model.name=embedded:tiny-gpt2", "rollout.backend=hf", "train.steps=3",
          "train.batch_size=8", "train.lr=1e-3", "data.num_train_prompts=64", "data.num_eval_prompts=16",
          "data.prompt_min_tokens=4", "eval.batch_size=16", "rollout.max_new_tokens=12", "progress=false"])
    _run([str(ROOT / "launch" / "eval.py"), "--run", str(run), "--eta-grid", "0,0.5,1", "--baselines",
          str(base / "beta_0.05")])
    return run, json.loads((run / "report" / "eval.json").read_text())


def test_eta_endpoints_reproduce_sft_and_final_exactly(finished):
    _, data = finished
    rows = {r["name"]: r for r in data["rows"]}
    for end, ref in (("front eta=0", "sft"), ("front eta=1", "final")):
        for key in ("reward_mean", "reward_std", "kl_mean", "identical_fraction", "length_mean"):
            assert rows[end][key] == rows[ref][key], (end, key)
    assert rows["final"]["identical_fraction"] < 1.0
    kinds = {r["kind"] for r in data["rows"]}
    assert {"sft", "final", "policy", "merged", "front", "baseline"} <= kinds
    assert len([r for r in data["rows"] if r["kind"] == "policy"]) == 4  # 2 iterations x 2 policies


def test_report_files_are_real(finished):
    run, _ = finished
    out = run / "report"
    for name in ("pareto.png", "training.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, name
        import matplotlib.image

        img = matplotlib.image.imread(str(out / name))
        assert img.shape[0] > 200 and img.shape[1] > 300
    md = (out / "report.md").read_text()
    assert "pareto.png" in md and "| sft |" in md and "REINFORCE beta=0.05" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page


def test_baseline_preset_trains_with_a_fixed_sft_anchor(finished):
    run, data = finished
    base = [r for r in data["rows"] if r["kind"] == "baseline"]
    assert len(base) == 1 and base[0]["beta"] == 0.05 and base[0]["kl_mean"] != 0.0
    cfg = (run.parent / "baselines" / "beta_0.05" / "config.yaml").read_text()
    assert "anchor: sft" in cfg and "policies: 1" in cfg


def test_eval_rejects_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), "--run", str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a finished run folder" in proc.stderr
