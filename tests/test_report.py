"""launch/eval.py (warp_dist.evaluation.runs) and the report on a tiny finished run; the plain-REINFORCE baseline through the same path.

One module-scoped fixture trains a tiny WARP run (2 iterations x 2 policies x 2 steps, iter_<i>/ kept) and a
one-beta baseline sweep, then runs launch/eval.py once on them (~1.5 min on 2 cores); the other tests read its files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, accelerate_launch, subprocess_env

KEYS = ("reward_mean", "reward_std", "kl_mean", "identical_fraction", "length_mean", "num_prompts")
CI_KEYS = ("reward_ci_low", "reward_ci_high", "kl_ci_low", "kl_ci_high", "judge", "judge_mean", "distinct_1",
           "distinct_2")
TINY_BASELINE = ["model.name=embedded:tiny-gpt2", "rollout.backend=hf", "train.steps=3", "train.batch_size=8",
                 "train.lr=1e-3", "data.num_train_prompts=64", "data.num_eval_prompts=16", "data.prompt_min_tokens=4",
                 "eval.batch_size=8", "rollout.max_new_tokens=12", "progress=false"]


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _eval_module():
    from warp_dist.evaluation import runs

    return runs


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("report")
    run = root / "warp"
    # eval.batch_size=8: the 16 eval prompts make 2 batches, so a 2-rank evaluation really splits them
    _run([str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"), f"output_dir={run}",
          "train.steps=2", "save_iterations=true", "eval.batch_size=8"])
    base = root / "baselines"
    proc = _run(["-m", "warp_dist.sweep", "--config", str(ROOT / "configs" / "warp" / "baseline_reinforce.yaml"),
                 "--betas", "0.05", "--out", str(base), *TINY_BASELINE, f"eval.reuse_from={run}"])
    assert f"baselines: {base / 'beta_0.05'}" in proc.stdout
    _run([str(ROOT / "launch" / "eval.py"), "--run", str(run), "--eta-grid", "0,0.5,1", "--iterations",
          "--baselines", str(base / "beta_0.05")])
    return run, json.loads((run / "report" / "eval.json").read_text())


def _by_name(rows):
    return {r["name"]: r for r in rows}


# ------------------------------------------------------------------------------------------ (a) the eta front
def test_eta_endpoints_reproduce_sft_and_final_exactly(finished):
    run, rows = finished
    assert isinstance(rows, list)
    by = _by_name(rows)
    for end, ref in (("front eta=0", "sft"), ("front eta=1", "final")):  # same weights: the row is reused
        assert by[end]["same_as"] == ref
        for key in KEYS:
            assert by[end][key] == by[ref][key], (end, key)
    assert "same_as" not in by["front eta=0.5"] and "same_as" not in by["final"]
    assert by["front eta=0"]["identical_fraction"] == 1.0 and by["front eta=0"]["kl_mean"] == 0.0
    assert by["final"]["identical_fraction"] < 1.0
    # the training runs' own evaluations (evals.json: same weights, same settings) were taken, not redone
    entries = {"sft": "sft", "final": "final", "iter 1 merged": "iter 1 merged",
               "beta_0.05 (REINFORCE beta=0.05)": "final"}  # row -> the entry of its run's evals.json
    for name, entry in entries.items():
        assert by[name]["reused_from"].endswith(f"evals.json [{entry}]"), name
    assert all("reused_from" not in r for r in rows if r["kind"] in ("policy", "front") and "same_as" not in r)
    summary = json.loads((run / "summary.json").read_text())
    assert by["final"]["reward_mean"] == summary["final"]["reward_mean"]


def test_baseline_took_the_sft_evaluation_of_the_warp_run(finished):
    """eval.reuse_from: the baseline run (same SFT model and settings) took the WARP run's SFT evaluation from its
    evals.json instead of making it again: the same numbers, and the record says where they came from."""
    run, _ = finished

    def sft_record(folder):
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in recs if r["kind"] == "eval" and r["model"] == "sft")

    mine, theirs = sft_record(run), sft_record(run.parent / "baselines" / "beta_0.05")
    assert "reused_from" not in mine and theirs["reused_from"] == str(run / "evals.json")
    for key in KEYS + CI_KEYS:
        assert theirs[key] == mine[key], key
    b_summary = json.loads((run.parent / "baselines" / "beta_0.05" / "summary.json").read_text())
    assert b_summary["per_prompt"]["sft"] == json.loads((run / "summary.json").read_text())["per_prompt"]["sft"]


def test_reused_rows_equal_recomputed_ones(finished, tmp_path):
    """eval.py --recompute evaluates from the saved folders what the reused rows took from evals.json: the same
    completions (samples), rewards, identical fractions; KL within float rounding."""
    run, rows = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    base = run.parent / "baselines" / "beta_0.05"
    _run([str(ROOT / "launch" / "eval.py"), "--run", str(copy), "--eta-grid", "1", "--recompute", "--no-report",
          "--baselines", str(base)])
    again = _by_name(json.loads((copy / "report" / "eval.json").read_text()))
    by = _by_name(rows)
    for name in ("sft", "final", "iter 1 merged", "beta_0.05 (REINFORCE beta=0.05)"):
        assert "reused_from" in by[name] and "reused_from" not in again[name], name
        for key in ("reward_mean", "reward_std", "identical_fraction", "length_mean", "num_prompts", "distinct_2"):
            assert again[name][key] == by[name][key], (name, key)
        assert again[name]["per_prompt"]["reward"] == by[name]["per_prompt"]["reward"], name
        assert again[name]["kl_mean"] == pytest.approx(by[name]["kl_mean"], abs=1e-6), name
    assert json.loads((copy / "report" / "samples.json").read_text()) == \
        json.loads((run / "report" / "samples.json").read_text())


def test_eval_store_reuses_only_the_same_weights_and_settings(tmp_path):
    from warp_dist.config import load_config
    from warp_dist.evaluation import evalcache
    from warp_dist.evaluation.metrics import EvalResult

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    assert evalcache.folder_digest(tmp_path / "nothing") is None and evalcache.folder_digest(tmp_path) is None
    dg = evalcache.folder_digest(folder)
    cfg = load_config(ROOT / "configs" / "warp" / "tiny.yaml", [])
    setting = evalcache.settings(cfg, False)
    res = EvalResult({"reward_mean": 0.5}, [[1, 2]], ["x"], [0.5], [0.1], None)
    evalcache.write(tmp_path, setting, {"final": (dg, res), "gone": (None, res)}, "sft-digest")
    store = evalcache.Store(tmp_path)
    assert store.get("final", setting, dg, "sft-digest") == res and store.get("gone", setting, dg, "sft-digest") is None
    assert store.get("final", setting, dg, "other-sft") is None
    assert store.get("final", evalcache.settings(cfg, True), dg, "sft-digest") is None  # DeepSpeed-trained
    other = load_config(ROOT / "configs" / "warp" / "tiny.yaml", ["data.num_eval_prompts=32"])
    assert store.get("final", evalcache.settings(other, False), dg, "sft-digest") is None
    (folder / "model.safetensors").write_bytes(b"abd")  # the same folder, other weights
    assert store.get("final", setting, evalcache.folder_digest(folder), "sft-digest") is None
    (tmp_path / evalcache.FILE).write_text("{not json")
    assert evalcache.Store(tmp_path).get("final", setting, dg, "sft-digest") is None


def test_eval_rows_cover_policies_merges_fronts_and_baseline(finished):
    _, rows = finished
    for r in rows:
        assert {"name", "kind", "iteration", "policy", "eta", "beta", *KEYS, *CI_KEYS} <= r.keys(), r["name"]
        assert r["kind"] in ("sft", "policy", "merged", "front", "final", "baseline")
        assert r["reward_ci_low"] <= r["reward_mean"] <= r["reward_ci_high"]
        assert r["judge"] == "none" and r["judge_mean"] is None  # tiny.yaml: VADER reward, no judge classifier
        pp = r["per_prompt"]
        assert len(pp["reward"]) == len(pp["kl"]) == r["num_prompts"] and pp["judge"] is None
        assert sum(pp["reward"]) / r["num_prompts"] == pytest.approx(r["reward_mean"])
    kinds = [r["kind"] for r in rows]
    assert kinds.count("sft") == 1 and kinds.count("final") == 1 and kinds.count("baseline") == 1
    pols = [(r["iteration"], r["policy"]) for r in rows if r["kind"] == "policy"]
    assert sorted(pols) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(r["iteration"] for r in rows if r["kind"] == "merged") == [1, 2]
    fronts = {(r["iteration"], r["eta"]) for r in rows if r["kind"] == "front"}
    assert fronts == {(it, e) for it in (1, 2) for e in (0.0, 0.5, 1.0)}  # --iterations: iteration 1's merge too
    by = _by_name(rows)
    # the last iteration's merge is final/ (found equal tensor by tensor): its row is final's; iteration 1's is its own
    assert by["iter 2 merged"]["same_as"] == "final" and "same_as" not in by["iter 1 merged"]
    assert all(by["iter 2 merged"][k] == by["final"][k] for k in KEYS)
    assert by["iter 1 front eta=1"]["same_as"] == "iter 1 merged" and by["iter 1 front eta=0"]["same_as"] == "sft"
    # policies moved away from SFT, and the front is not flat
    assert all(r["kl_mean"] != 0.0 for r in rows if r["kind"] == "policy")
    assert by["front eta=0.5"]["identical_fraction"] < 1.0


def test_samples_are_sft_vs_final_with_rewards(finished):
    run, rows = finished
    samples = json.loads((run / "report" / "samples.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert len(samples) == 2  # tiny.yaml: eval.num_samples_shown=2
    assert samples == summary["samples"]  # same prompts, same seeds as the trainer's own samples


# ------------------------------------------------------------------------------------------ (b) the report
def test_report_files_are_real(finished):
    run, _ = finished
    out = run / "report"
    import matplotlib.image

    for name in ("pareto.png", "training.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, name
        img = matplotlib.image.imread(str(out / name))
        assert img.shape[0] > 200 and img.shape[1] > 300
    md = (out / "report.md").read_text()
    assert "(pareto.png)" in md and "(training.png)" in md
    assert "| sft | sft |" in md and "| final | final |" in md and "beta_0.05 (REINFORCE beta=0.05)" in md
    assert "## Merging vs its members" in md and "SFT continuation" in md
    # paired differences: final - SFT, every merge - each member, the front at matched KL - the baseline
    assert "## Paired differences" in md and "| WARP final - SFT | reward |" in md
    assert "| iter 1 merged - iter 1 policy_0 | reward |" in md and "matched KL" in md
    paired = json.loads((out / "paired.json").read_text())
    assert {(d["comparison"].split(" - ")[0], d["metric"]) for d in paired} >= {("WARP final", "reward"),
                                                                               ("WARP final", "kl")}
    assert len([d for d in paired if d["metric"] == "reward"]) == 1 + 2 * 2 + 1  # final, 2 merges x 2, baseline
    assert all(d["low"] <= d["diff"] <= d["high"] and d["resamples"] == 2000 for d in paired)
    assert "reward [95% CI]" in md and "distinct-2" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and page.count("<table>") >= 4
    assert "src='pareto.png'" not in page  # self-contained
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_report_builds_from_rows_alone(tmp_path):
    """No model: hand-written rows, a multi-rank metrics.jsonl (ranks of one group averaged), samples from summary."""
    from warp_dist.evaluation import report

    out = tmp_path / "report"
    out.mkdir()
    m = {"reward_std": 0.1, "identical_fraction": 0.5, "length_mean": 10.0, "num_prompts": 4}
    rows = [{"name": "sft", "kind": "sft", "iteration": 0, "policy": None, "eta": 0.0, "beta": None,
             **m, "reward_mean": 0.0, "kl_mean": 0.0},
            {"name": "final", "kind": "final", "iteration": 1, "policy": None, "eta": 1.0, "beta": 0.1,
             **m, "reward_mean": 0.5, "kl_mean": 2.0},
            *[{"name": f"front eta={e:g}", "kind": "front", "iteration": 1, "policy": None, "eta": e, "beta": 0.1,
               **m, "reward_mean": e / 2, "kl_mean": 2 * e * e} for e in (0.0, 0.5, 1.0)],
            {"name": "b (REINFORCE beta=0.2)", "kind": "baseline", "iteration": None, "policy": None, "eta": None,
             "beta": 0.2, **m, "reward_mean": 0.3, "kl_mean": 1.5}]
    for r in rows:  # per-prompt values (4 prompts): every model = SFT + its mean, KL as given
        r["per_prompt"] = {"reward": [r["reward_mean"] + d for d in (-0.25, 0.25, -0.5, 0.5)],
                           "kl": [r["kl_mean"]] * 4, "judge": None}
    (out / "eval.json").write_text(json.dumps(rows))
    recs = [{"kind": "train", "iteration": 1, "policy": 0, "step": s, "rank": k, "reward_mean": float(k),
             "kl_to_ema": 0.1 * s} for s in (1, 2, 3) for k in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"samples": [
        {"prompt": "A | B", "sft": "meh", "sft_reward": -0.1, "warp": "great", "warp_reward": 0.8}]}))
    assert report.training_curves(recs)[(1, 0)][0] == (1, 0.5, pytest.approx(0.1))
    report.build_report(tmp_path)
    for name in ("pareto.png", "training.png", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "A \\| B" in md and "+0.800" in md and "## Merging vs its members" not in md
    paired = {(d["comparison"], d["metric"]): d for d in json.loads((out / "paired.json").read_text())}
    d = paired[("WARP final - SFT", "reward")]  # a constant per-prompt difference: a zero-width interval at it
    assert d["diff"] == d["low"] == d["high"] == 0.5 and d["excludes_zero"]
    # the baseline (KL 1.5) meets the front point whose KL is nearest: eta = 1 (KL 2.0), not eta = 0.5 (KL 0.5)
    d = paired[("front eta=1 - b (REINFORCE beta=0.2)", "reward")]
    assert d["diff"] == pytest.approx(0.2) and "matched KL" in d["note"]
    assert "| WARP final - SFT | reward | +0.500 | [+0.500, +0.500] | yes |" in md
    assert "<td>A | B</td>" in (out / "report.html").read_text()


# ------------------------------------------------------------------------------------------ (c) the baseline
def test_baseline_preset_trains_with_a_fixed_sft_anchor(finished):
    run, rows = finished
    (b,) = [r for r in rows if r["kind"] == "baseline"]
    assert b["beta"] == 0.05 and b["name"] == "beta_0.05 (REINFORCE beta=0.05)"
    assert b["kl_mean"] != 0.0 and b["identical_fraction"] < 1.0  # it trained, and eval.py read its final/
    folder = run.parent / "baselines" / "beta_0.05"
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["train"]["anchor"] == "sft" and cfg["train"]["policies"] == 1 and cfg["train"]["iterations"] == 1
    assert cfg["merge"]["eta"] == 1.0 and cfg["train"]["beta"] == 0.05
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if r["kind"] == "train"]) == 3


def test_baseline_preset_is_valid_as_shipped():
    from warp_dist.config import load_config
    from warp_dist.sweep import plan_sweep

    cfg = load_config(ROOT / "configs" / "warp" / "baseline_reinforce.yaml")
    assert (cfg.train.policies, cfg.train.iterations, cfg.train.anchor, cfg.merge.eta) == (1, 1, "sft", 1.0)
    demo = load_config(ROOT / "configs" / "warp" / "demo.yaml")
    for part in ("model", "data", "reward", "rollout", "eval"):  # compared on the demo's prompts and reward
        assert getattr(cfg, part) == getattr(demo, part), part
    cfgs = plan_sweep(ROOT / "configs" / "warp" / "baseline_reinforce.yaml", [0.01, 0.3], "runs/b", ["train.steps=2"])
    assert [(c.train.beta, c.output_dir, c.train.steps) for c in cfgs] == [(0.01, "runs/b/beta_0.01", 2),
                                                                          (0.3, "runs/b/beta_0.3", 2)]


# ------------------------------------------------------------------------------------------ errors, grid
def test_reuse_rests_on_lerp_being_exact_at_its_ends():
    """eval.py reuses the SFT / final rows for eta = 0 / 1: lerp_source must give exactly those tensors."""
    import torch

    from warp_dist.weights import dict_source, lerp_source

    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(257, 33, generator=g) * 1e3, "b": torch.tensor([0.0, -0.0, 1e-38, -3e38, 7.0])}
    b = {"w": torch.randn(257, 33, generator=g) * 1e-3, "b": torch.tensor([-0.0, 5.0, 3e38, 1e-40, 7.0])}
    sa, sb = dict_source(a), dict_source(b)
    mod = _eval_module()
    assert mod.same_weights(lerp_source(sa, sb, 0.0), sa, list(a))
    assert mod.same_weights(lerp_source(sa, sb, 1.0), sb, list(a))
    assert not mod.same_weights(lerp_source(sa, sb, 0.5), sb, list(a))
    src = {"name": "final", "kind": "final", "iteration": 2, "policy": None, "eta": 1.0, "beta": 0.1, "folder": "f",
           "reward_mean": 0.5, "per_prompt": {"reward": [0.5]}}
    r = mod.reused_row(src, "front eta=1", "front", iteration=2, eta=1.0, beta=0.1)
    assert r["same_as"] == "final" and r["kind"] == "front" and r["folder"] is None
    assert r["reward_mean"] == 0.5 and r["per_prompt"] == {"reward": [0.5]}


def test_eta_grid_parsing():
    ev = _eval_module()
    assert ev.parse_grid("0,0.1,...,1") == [round(0.1 * i, 10) for i in range(11)]
    assert ev.parse_grid("1,0,0.5") == [0.0, 0.5, 1.0]
    for bad in ("", "0,2", "0,0.3,...,1", "a"):
        with pytest.raises(ValueError):
            ev.parse_grid(bad)


def test_eval_rejects_bad_input_before_loading_anything(tmp_path, capsys):
    ev = _eval_module()
    assert ev.main(["--run", str(tmp_path)]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: embedded:tiny-gpt2\n")
    assert ev.main(["--run", str(run), "--eta-grid", "0,1.5"]) == 2
    assert "--eta-grid" in capsys.readouterr().err
    other = tmp_path / "other"
    (other / "final").mkdir(parents=True)
    (other / "config.yaml").write_text("model:\n  name: embedded:smollm2-135m\n")
    assert ev.main(["--run", str(run), "--baselines", str(other)]) == 2
    assert "same SFT model" in capsys.readouterr().err
    assert ev.main(["--run", str(run), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ under accelerate
@pytest.mark.slow  # the trainer's 2-rank evaluation is tested in test_distributed
@pytest.mark.multiproc
def test_eval_on_two_ranks_matches_one(finished, tmp_path):
    run, rows = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report", "iter_*"))
    cmd = accelerate_launch(2, str(ROOT / "launch" / "eval.py"), "--run", str(copy), "--eta-grid", "0,1", "--no-report",
                            "--recompute", "cpu=true")
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = _by_name(json.loads((copy / "report" / "eval.json").read_text()))
    one = _by_name(rows)
    assert set(two) == {"sft", "final", "front eta=0", "front eta=1"}
    assert not (copy / "report" / "report.md").exists()  # --no-report
    for name, r in two.items():
        assert r["num_ranks"] == 2
        for key in KEYS:
            assert r[key] == pytest.approx(one[name][key], abs=1e-5), (name, key)
    assert json.loads((copy / "report" / "samples.json").read_text()) == \
        json.loads((run / "report" / "samples.json").read_text())
