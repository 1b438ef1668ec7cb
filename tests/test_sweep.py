"""warp_dist.sweep: a real 2-point grid of the tiny preset writes its table and plot, a rerun retrains nothing, bad
grids fail in one line before anything runs; the points' TensorBoard event files hold the expected scalars.

One module-scoped sweep (2 points x I = 1, M = 2, T = 1, a callable reward so that VADER is the judge) in one
subprocess; the other tests read its files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env
from tests.test_tracking import tb_scalars, tb_texts
from warp_dist import sweep

TINY = ROOT / "configs" / "warp" / "tiny.yaml"
GRID = ["--grid", "train.lr=1e-3,2e-3"]
FIXED = ["train.steps=1", "train.iterations=1", "train.batch_size=4", "rollout.max_new_tokens=6",
         "data.num_eval_prompts=8", "eval.batch_size=8",
         "reward.kind=callable", "reward.callable=tests.toy_rewards:share_of_e"]


ONE_THREAD = {"WARP_DIST_NUM_THREADS": 1, "OMP_NUM_THREADS": 1}  # what a point side by side on 2 cores gets


def _sweep(out, *extra, grid=GRID, fixed=FIXED, all_cores=False):
    cmd = [sys.executable, "-m", "warp_dist.sweep", "--config", str(TINY), *grid, "--out", str(out), *fixed, *extra]
    # all_cores: the sweep may use every core of the machine, not only this xdist worker's share
    widen = (lambda: os.sched_setaffinity(0, range(os.cpu_count()))) if all_cores else None
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**ONE_THREAD), capture_output=True, text=True,
                          timeout=400, preexec_fn=widen)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    proc = _sweep(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_grid_runs_every_point_and_writes_table_and_plot(swept):
    out, proc = swept
    assert f"points: {out / 'lr_0.001'} {out / 'lr_0.002'}" in proc.stdout
    data = json.loads((out / "sweep.json").read_text())
    assert data["grid"] == {"train.lr": ["1e-3", "2e-3"]}
    pts = data["points"]
    assert [p["name"] for p in pts] == ["lr_0.001", "lr_0.002"]
    assert [p["fields"] for p in pts] == [{"train.lr": 0.001}, {"train.lr": 0.002}]
    for p in pts:
        summary = json.loads((out / p["name"] / "summary.json").read_text())
        assert p["action"] == "trained" and p["reward_mean"] == summary["final"]["reward_mean"]
        assert p["reward_ci_low"] <= p["reward_mean"] <= p["reward_ci_high"]
        assert p["kl_ci_low"] <= p["kl_mean"] <= p["kl_ci_high"]
        assert p["judge"] == "vader" and p["judge_ci_low"] <= p["judge_mean"] <= p["judge_ci_high"]
    md = (out / "sweep.md").read_text()
    assert "| point | train.lr | final reward [95% CI]" in md and "judge: vader" in md
    assert "| lr_0.001 | 0.001 |" in md and "| lr_0.002 | 0.002 |" in md
    blob = (out / "sweep.png").read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_trainer_rows_carry_judge_intervals_and_diversity(swept):
    out, _ = swept
    run = out / "lr_0.001"
    summary = json.loads((run / "summary.json").read_text())
    n = summary["final"]["num_prompts"]
    for model in ("sft", "final"):
        m = summary[model]
        assert m["judge"] == "vader" and 0 < m["distinct_1"] <= 1 and 0 < m["distinct_2"] <= 1
        assert len(summary["per_prompt"][model]["judge"]) == len(summary["per_prompt"][model]["kl"]) == n
        assert m["judge_mean"] == pytest.approx(sum(summary["per_prompt"][model]["judge"]) / n)
    assert set(summary["final_vs_sft"]) == {"reward", "kl", "judge"}
    d = summary["final_vs_sft"]["reward"]
    assert d["low"] <= d["diff"] <= d["high"] and d["resamples"] == 2000
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["model"] for e in evals] == ["sft", "final"] and all("judge_ci_high" in e for e in evals)


def test_tensorboard_holds_every_record_kind(swept):
    out, _ = swept
    run = out / "lr_0.001"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    sc = tb_scalars(run / "tb")
    for m in (0, 1):
        assert [s for s, _ in sc[f"train/policy_{m}/reward_mean"]] == [1]
        assert f"train/policy_{m}/kl_to_ema" in sc and f"train/policy_{m}/loss" in sc
    summary = json.loads((run / "summary.json").read_text())
    rew = sc["eval/reward_mean"]
    assert [s for s, _ in rew] == [0, 1]  # SFT at step 0, the final model after T = 1 step
    assert rew[0][1] == pytest.approx(summary["sft"]["reward_mean"], abs=1e-6)
    assert rew[1][1] == pytest.approx(summary["final"]["reward_mean"], abs=1e-6)
    for tag in ("eval/judge_mean", "eval/kl_mean", "eval/reward_ci_low", "eval/distinct_2", "merge/angle_deg/0-1",
                "merge/task_vector_norm/0"):
        assert tag in sc, tag
    texts = tb_texts(run / "tb")
    assert "train:" in texts["config/text_summary"][0]
    assert summary["samples"][0]["prompt"].split()[0] in texts["samples/text_summary"][0]


def test_rerun_skips_finished_points(swept):
    out, _ = swept
    files = [p for name in ("lr_0.001", "lr_0.002") for p in
             [out / name / "final" / "model.safetensors", out / name / "metrics.jsonl", out / name / "summary.json",
              *(out / name / "tb").iterdir()]]
    before = {p: p.stat().st_mtime_ns for p in files}
    proc = _sweep(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already holds the finished run") == 2 and "WARP:" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing retrained, nothing rewritten
    assert [p["action"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["skipped (finished)"] * 2


def test_point_folders_decide_skip_resume_restart_or_refuse(swept, tmp_path):
    from warp_dist.runner import prepare_run_dir

    out, _ = swept
    grid = sweep.parse_grid(["train.lr=1e-3,2e-3"])
    assert [p.action for p in sweep.plan(TINY, grid, out, FIXED)] == ["skip", "skip"]
    fresh = sweep.plan(TINY, grid, tmp_path, FIXED)
    assert [p.action for p in fresh] == ["run", "run"]
    prepare_run_dir(fresh[0].cfg)  # a run that was killed after writing config.yaml
    (tmp_path / "lr_0.002").mkdir()
    (tmp_path / "lr_0.002" / "metrics.jsonl").write_text("")  # one killed before it wrote config.yaml
    again = sweep.plan(TINY, grid, tmp_path, FIXED)
    assert [p.action for p in again] == ["resume", "restart"]
    assert again[0].cfg.resume and again[1].cfg.overwrite
    with pytest.raises(sweep.ConfigError, match="holds a run with train.steps=1, this point has train.steps=3"):
        sweep.plan(TINY, grid, out, [*FIXED, "train.steps=3"])


def test_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys):
    base = ["--config", str(TINY), "--out", str(tmp_path / "x")]
    cases = [(["--grid", "train.lrr=1e-3,2e-3"], "train.lrr"), (["--grid", "train.lr=1e-3,-1"], "train.lr"),
             (["--grid", "output_dir=a,b"], "output_dir"), (["--grid", "train.lr"], "train.lr"),
             (["--grid", "train.lr=1,2", "train.lr=3"], "given twice"), (["--betas", "0.1,x"], "--betas"),
             (["--grid", "train.beta=0.1,0.2", "train.beta=0.3"], "given twice"),
             (["--grid", "train.lr=1e-3,2e-3", "train.lr=5"], "train.lr")]
    for args, needle in cases:
        assert sweep.main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error:") and needle in err and "\n" not in err, (args, err)
    assert sweep.main([*base, "--grid", "train.lr=1e-3,2e-3", "--out", str(tmp_path / "x"), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "--grid" not in err  # a bad plain override is named as itself
    assert not (tmp_path / "x").exists()


def test_point_names_and_grid_forms():
    assert sweep.point_name({"train.beta": 0.05}) == "beta_0.05"
    assert sweep.point_name({"train.lr": 1e-5, "merge.eta": 0.3}) == "lr_1e-05__eta_0.3"
    assert sweep.point_name({"train.seed": 1, "data.seed": 2}) == "train-seed_1__data-seed_2"
    assert sweep.point_name({"rollout.backend": "hf", "save_iterations": True}) == "backend_hf__save_iterations_true"
    # a key with one value is a plain override, not an axis (unless it is the only key)
    pts = sweep.plan(TINY, sweep.parse_grid(["train.lr=1e-3,2e-3", "train.steps=3"]), "runs/g")
    assert [p.name for p in pts] == ["lr_0.001", "lr_0.002"] and all(p.cfg.train.steps == 3 for p in pts)
    pts = sweep.plan(TINY, sweep.parse_grid(["train.beta=0.05"]), "runs/g")
    assert [p.name for p in pts] == ["beta_0.05"]
    pts = sweep.plan(TINY, sweep.parse_grid(["train.lr=1e-3,2e-3", "merge.eta=0.3,0.5"]), "runs/g")
    assert [p.name for p in pts] == ["lr_0.001__eta_0.3", "lr_0.001__eta_0.5", "lr_0.002__eta_0.3",
                                     "lr_0.002__eta_0.5"]
    assert pts[1].cfg.output_dir == "runs/g/lr_0.001__eta_0.5" and pts[1].cfg.merge.eta == 0.5


def test_slots_split_cores_and_devices_equally():
    assert sweep.slots(2, [0, 1], []) == [sweep.Slot([0], None), sweep.Slot([1], None)]
    assert sweep.slots(2, [4, 5, 6, 7, 8], [0, 1, 2]) == [sweep.Slot([4, 5], 0), sweep.Slot([6, 7], 1)]
    assert sweep.slots(1, [0, 1], []) == [sweep.Slot([0, 1], None)]
    assert sweep.Slot([2, 3], 1).env() == {"WARP_DIST_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
                                            "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "1"}
    for args, needle in [((0, [0, 1], []), "--parallel 0: allowed 1"), ((3, [0, 1], []), "allowed 1..2"),
                         ((2, [0, 1, 2, 3], [0]), "1 CUDA device(s) visible, allowed 1..1")]:
        with pytest.raises(sweep.ConfigError, match=re.escape(needle)):
            sweep.slots(*args)


def test_bad_parallel_is_one_line_before_anything_runs(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    for n, needle, extra in [(0, "--parallel 0: allowed 1", []), (cores + 1, f"allowed 1..{cores}", []),
                             (2, "--parallel 2 with --only: --only runs one point", ["--only", "lr_0.001"])]:
        args = ["--config", str(TINY), *GRID, "--out", str(tmp_path / "x"), "--parallel", str(n), *extra]
        assert sweep.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "x").exists()


needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="side by side needs 2 cores")


@needs_two_cores
def test_side_by_side_points_match_the_points_run_one_after_the_other(swept, tmp_path):
    """--parallel 2 on 2 cores: each point its own process on its own core, one thread, its log apart; every point
    ends exactly as the same point run in the one-after-the-other sweep (also one thread); a rerun skips both."""
    seq, _ = swept
    out = tmp_path / "grid"
    proc = _sweep(out, "--parallel", "2", all_cores=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cores [0]" in proc.stdout and "on cores [1]" in proc.stdout
    for name in ("lr_0.001", "lr_0.002"):
        log = (out / "logs" / f"{name}.log").read_text()
        assert "WARP:" in log or "final" in log, log[-2000:]
        a, b = (json.loads((d / name / "summary.json").read_text()) for d in (seq, out))
        assert b["final"]["reward_mean"] == a["final"]["reward_mean"], name
        assert b["final"]["kl_mean"] == a["final"]["kl_mean"], name
        assert b["samples"] == a["samples"], name
    rows = json.loads((out / "sweep.json").read_text())["points"]
    assert [r["name"] for r in rows] == ["lr_0.001", "lr_0.002"] and {r["action"] for r in rows} == {"trained"}
    again = _sweep(out, "--parallel", "2", all_cores=True)
    assert again.returncode == 0 and again.stdout.count("already holds the finished run") == 2


def _processes_naming(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


@needs_two_cores
def test_a_failing_point_side_by_side_stops_the_others(tmp_path):
    """One point's reward raises: the sweep exits 1 naming it, the long point beside it (2000 steps) is stopped (no
    process left, no summary), and the next run of the same sweep does not count either as finished."""
    out = tmp_path / "grid"
    grid = ["--grid", "reward.callable=tests.toy_rewards:share_of_e,tests.toy_rewards:raises_value_error"]
    fixed = ["train.steps=2000", *FIXED[1:6], "reward.kind=callable"]
    proc = _sweep(out, "--parallel", "2", grid=grid, fixed=fixed, all_cores=True)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    bad, good = "callable_tests.toy_rewards-raises_value_error", "callable_tests.toy_rewards-share_of_e"
    assert f"FAILED (exit code 1; log {out / 'logs' / bad}.log)" in proc.stdout
    assert "cannot score an empty completion" in proc.stderr  # the failing point's own error, from its log
    assert not (out / good / "summary.json").exists() and not (out / "sweep.json").exists()
    assert not _processes_naming(str(out)), "a point of the sweep is still running"
    sweep_grid = sweep.parse_grid([grid[1]])
    actions = {p.name: p.action for p in sweep.plan(TINY, sweep_grid, out, fixed)}
    assert actions[good] != "skip" and actions[bad] != "skip"  # neither counts as finished
