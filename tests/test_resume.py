"""Checkpoints and resume with real processes and real SIGKILLs (issue: reliability).

An uninterrupted tiny run (I = 2, M = 2, T = 3, a checkpoint every step) is the reference; runs killed at named points
(warp_dist.faults: a real SIGKILL of the process at that point) or at a random moment from outside, then resumed,
must end with bit-identical final weights and the same train records.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, subprocess_env

ARGS = ["train.steps=3", "checkpoint_every=1", "progress=false"]


def warp(out, *extra, env=None, timeout=300):
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", *ARGS, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def train_records(out):
    drop = ("time", "tokens_per_s")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in recs if r["kind"] == "train"]


def tb_steps(out):
    from tests.test_tracking import tb_scalars

    return {tag: [s for s, _ in pts] for tag, pts in tb_scalars(out / "tb").items()}


def assert_same_run(ref, out):
    assert (out / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()
    a, b = train_records(ref), train_records(out)
    assert len(b) == len(a) == 2 * 2 * 3
    assert b == a  # no step missing, none twice, every value the same
    assert not (out / "state").exists()  # a finished run keeps no resumable state
    assert tb_steps(out) == tb_steps(ref)  # TensorBoard rebuilt on resume: every point once


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    proc = warp(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("point", ["step:5", "checkpoint:7", "merge:1",  # the other two points under -m slow
                                   pytest.param("blob:2", marks=pytest.mark.slow),
                                   pytest.param("eval:2", marks=pytest.mark.slow)])
def test_killed_at_a_point_then_resumed_is_bit_identical(point, reference, tmp_path):
    out = tmp_path / "run"
    killed = warp(out, env={"WARP_DIST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = warp(out, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at checkpoint" in resumed.stdout
    assert_same_run(reference, out)


def test_killed_twice_and_at_a_random_moment(reference, tmp_path):
    """Killed at a random moment from outside, killed again while resuming, resumed again."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    want = random.Random(os.getpid()).randint(2, 9)  # some train steps in, wherever that lands
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= want:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = warp(out, "resume=true", env={"WARP_DIST_KILL_AT": "checkpoint:2"})  # killed during the resume
    assert again.returncode == -signal.SIGKILL, again.stderr[-2000:]
    final = warp(out, "resume=true")
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(reference, out)
    # resuming a finished run changes nothing
    before = (out / "summary.json").read_bytes()
    done = warp(out, "resume=true")
    assert done.returncode == 0 and "already finished" in done.stdout
    assert (out / "summary.json").read_bytes() == before


def test_non_finite_reward_names_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    proc = warp(out, "reward.kind=callable", "reward.callable=tests.toy_rewards:nan_in_training")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("error: iteration 1 policy 0 step 1: reward contains NaN (1 of 8 values) from "
                    "reward.callable=tests.toy_rewards:nan_in_training"), last
    ckpts = sorted((out / "state").glob("ckpt-*"))
    assert ckpts and json.loads((ckpts[-1] / "position.json").read_text())["phase"] == "sft evaluated"
    assert not (out / "final").exists()


def test_non_finite_loss_names_the_step(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    proc = warp(out, "reward.kind=callable", "reward.callable=tests.toy_rewards:huge_in_training")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: iteration 1 policy 0 step 1: loss is "), last
    assert not (out / "final").exists()


@pytest.mark.multiproc
def test_two_ranks_one_killed_then_resumed(tmp_path, tiny_model_path):
    """SIGKILL on rank 1 mid-training: every rank exits non-zero promptly, the folder holds a complete checkpoint, and
    the resumed 2-rank run ends with the weights of an uninterrupted 2-rank run."""
    from tests.test_distributed import launch, tiny

    ref, out = tmp_path / "ref", tmp_path / "run"
    args = ["checkpoint_every=1", "dist_timeout_s=60"]
    p = launch(2, "launch/warp.py", *tiny(ref, *args))
    assert p.returncode == 0, p.stderr[-3000:]
    t0 = time.time()
    env_launch = dict(os.environ, WARP_DIST_KILL_AT="step:4:rank1")
    p = subprocess.run(launch_cmd(out, args), cwd=ROOT, env={**subprocess_env(OMP_NUM_THREADS=1), **env_launch},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and time.time() - t0 < 120
    assert sorted((out / "state").glob("ckpt-*")), "no complete checkpoint left behind"
    p = launch(2, "launch/warp.py", *tiny(out, *args, "resume=true"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()
    assert train_records(out) == train_records(ref)


def launch_cmd(out, args):
    from tests.conftest import accelerate_launch
    from tests.test_distributed import tiny

    return accelerate_launch(2, str(ROOT / "launch" / "warp.py"), *tiny(out, *args))


def test_resume_of_a_policy_in_training_on_another_world_size_is_refused(tmp_path, tiny_model_path):
    from tests.test_distributed import launch, tiny

    out = tmp_path / "run"
    killed = warp(out, env={"WARP_DIST_KILL_AT": "step:2"})
    assert killed.returncode == -signal.SIGKILL
    p = launch(2, "launch/warp.py", *tiny(out, "checkpoint_every=1", "resume=true"))
    assert p.returncode != 0
    assert "resume: the newest checkpoint holds policies in training (step 1) written by 1 rank; their optimizer " \
        "state cannot move to 2: relaunch with --num_processes 1" in p.stderr


class _RunsCode:
    """Unpickling this would call os.system: what a checkpoint from elsewhere could do under weights_only=False."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_files_are_read_without_running_code(tmp_path):
    """Resume reads optimizer.pt and rng.pt with weights_only=True (tensors, numbers, strings, containers): a file
    holding any other object is refused in one line, and the RNG states still round-trip exactly."""
    import numpy as np
    import torch

    from warp_dist import checkpoint
    from warp_dist.guards import RunError

    bad = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _RunsCode()}, bad)
    with pytest.raises(RunError, match=r"optimizer\.pt: holds more than tensors and plain values .*posix\.system"):
        checkpoint.load_safe(bad)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    checkpoint.save_rng(tmp_path / "rng.pt")
    draws = (random.random(), np.random.randn(), torch.rand(2).tolist())
    random.random(), np.random.randn(), torch.rand(5)
    checkpoint.load_rng(tmp_path / "rng.pt")
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == draws
    sources = [p for p in (ROOT / "warp_dist").rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not sources, sources


# ------------------------------------------------------------------------------------------------ self-checking
def _newest(out):
    from warp_dist.checkpoint import checkpoints

    return checkpoints(out / "state")[-1]


@pytest.mark.parametrize("damage", ["truncate", pytest.param("bitflip", marks=pytest.mark.slow)])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(damage, reference, tmp_path):
    """A checkpoint records the size and sha256 of every file; a truncated or bit-flipped file in the newest one
    makes resume fall back to the one before it (one warning line naming the file), still bit-identical."""
    from warp_dist.checkpoint import main as verify_main

    out = tmp_path / "run"
    killed = warp(out, env={"WARP_DIST_KILL_AT": "step:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    newest = _newest(out)
    victim = newest / "rank0" / ("optimizer.pt" if damage == "truncate" else "policy.safetensors")
    blob = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(blob[: len(blob) // 2]))
    else:
        blob[len(blob) // 2] ^= 0x01  # one bit
        victim.write_bytes(bytes(blob))
    assert verify_main(["verify", str(out)]) == 1  # the CLI sees it without resuming
    resumed = warp(out, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [x for x in resumed.stdout.splitlines() if "is damaged" in x]
    assert len(warnings) == 1 and str(victim) in warnings[0], resumed.stdout[-2000:]
    assert_same_run(reference, out)


def test_no_valid_checkpoint_is_one_line(tmp_path, tiny_model_path):
    out = tmp_path / "run"
    killed = warp(out, "keep_checkpoints=1", env={"WARP_DIST_KILL_AT": "step:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (_newest(out) / "rank0" / "rng.pt").write_bytes(b"")
    resumed = warp(out, "resume=true")
    assert resumed.returncode != 0
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and "no valid checkpoint" in lines[0] and "rng.pt" in lines[0], resumed.stderr[-2000:]


def test_verify_command_on_a_whole_run(reference, tmp_path):
    out = tmp_path / "run"
    killed = warp(out, env={"WARP_DIST_KILL_AT": "merge:1"})
    assert killed.returncode == -signal.SIGKILL
    proc = subprocess.run([sys.executable, "-m", "warp_dist.checkpoint", "verify", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") >= 1 and "the newest checkpoint is whole" in proc.stdout
    man = json.loads((_newest(out) / "manifest.json").read_text())
    assert man["files"]["position.json"][0] > 0 and man["blobs"]  # the blobs it needs are listed too


# ------------------------------------------------------------------------------------------------ preemption
@pytest.mark.parametrize("sig", ["TERM", pytest.param("USR1", marks=pytest.mark.slow)])
def test_signal_stops_after_a_checkpoint_and_resumes_bit_identical(sig, reference, tmp_path):
    """SIGTERM / SIGUSR1 at step 2: the run stops after that step with one checkpoint of the policy in training,
    exits 75, and the resumed run equals the uninterrupted one bit for bit (no periodic checkpoints here: the stop's
    own checkpoint is the one resumed)."""
    from warp_dist.checkpoint import read_position
    from warp_dist.preempt import EXIT_PREEMPTED

    out = tmp_path / "run"
    stopped = warp(out, "checkpoint_every=0", env={"WARP_DIST_SIGNAL_AT": f"step:2:{sig}"})
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-2000:]
    assert f"[stop] stopped on SIG{sig} after step 2" in stopped.stdout
    pos = read_position(_newest(out))
    assert pos["phase"] == "stopped" and pos["step"] == 2
    resumed = warp(out, "resume=true", "checkpoint_every=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)


@pytest.mark.slow
def test_signal_at_a_random_moment_and_a_second_signal_during_the_checkpoint(reference, tmp_path):
    """SIGTERM from outside at a random moment -> exit 75 at the next boundary, resumed bit-identical. A second
    SIGTERM during the stop's own checkpoint -> the process ends at once (128 + 15), the checkpoint before it is
    whole, and the resume from it finishes bit-identical to the uninterrupted run."""
    from warp_dist.preempt import EXIT_PREEMPTED

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    want = random.Random(os.getpid()).randint(2, 9)
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= want:
            break
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert time.time() - t0 < 60 and "[stop] stopped on SIGTERM" in stdout
    resumed = warp(out, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)
    # a second signal during the stop's own checkpoint: checkpoint 1 is "sft evaluated", SIGTERM at step 2, the
    # stop's checkpoint is the 2nd time the checkpoint point is reached
    out = tmp_path / "twice"
    twice = warp(out, "checkpoint_every=0",
                 env={"WARP_DIST_SIGNAL_AT": "step:2:TERM,checkpoint:2:TERM", "WARP_DIST_SIGNAL_REPEAT_S": "0"})
    assert twice.returncode == 128 + signal.SIGTERM, twice.stdout[-2000:] + twice.stderr[-2000:]
    assert "second SIGTERM" in twice.stdout
    final = warp(out, "resume=true")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed at checkpoint 1: sft evaluated" in final.stdout  # the cut checkpoint left nothing behind
    assert_same_run(reference, out)


@pytest.mark.slow
def test_two_ranks_one_signalled_both_stop_at_the_same_step(tmp_path, tiny_model_path):
    """Only rank 1 gets SIGTERM: both ranks agree to stop after the same step (no rank left in a collective), both
    exit 75, and the resumed 2-rank run ends with the weights of an uninterrupted 2-rank run."""
    from tests.test_distributed import launch, tiny
    from warp_dist.checkpoint import read_position
    from warp_dist.preempt import EXIT_PREEMPTED

    ref, out = tmp_path / "ref", tmp_path / "run"
    p = launch(2, "launch/warp.py", *tiny(ref, "dist_timeout_s=60"))
    assert p.returncode == 0, p.stderr[-3000:]
    env = {**subprocess_env(OMP_NUM_THREADS=1), "WARP_DIST_SIGNAL_AT": "step:2:TERM:rank1"}
    p = subprocess.run(launch_cmd(out, ["dist_timeout_s=60"]), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "[stop] stopped on a signal to another rank after step 2" in p.stdout, \
        p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.count(f"exitcode  : {EXIT_PREEMPTED}") >= 1 or f"exit code {EXIT_PREEMPTED}" in p.stderr or \
        p.returncode == EXIT_PREEMPTED, p.stderr[-2000:]
    assert read_position(_newest(out))["step"] == 2
    p = launch(2, "launch/warp.py", *tiny(out, "dist_timeout_s=60", "resume=true"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()
    key = lambda r: (r["iteration"], r["policy"], r["step"], r["rank"])  # noqa: E731 - the stop's checkpoint
    assert sorted(train_records(out), key=key) == sorted(train_records(ref), key=key)  # gathered them earlier


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def _close(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, worst
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("before, after, kill", [(2, 1, "merge:1"), (1, 2, "blob:2")])
def test_resume_on_another_world_size_from_a_phase_boundary(before, after, kill, tmp_path, tiny_model_path):
    """2 ranks -> 1 (killed mid-merge: both policies trained) and 1 -> 2 (killed while writing the second policy:
    one trained): the policies in the checkpoint are reused, the rest trained by whichever rank holds them now, and
    the final weights equal an uninterrupted run on the first world size within 1e-5 (what differs is the order of
    float sums between one process and two: the same bound the 1-rank vs 2-rank tests use)."""
    from tests.test_distributed import launch, tiny

    ref, out = tmp_path / "ref", tmp_path / "run"

    def go(n, folder, *extra, env=None):
        if n == 1:
            return warp(folder, "checkpoint_every=0", *extra, env=env)
        if env:
            return subprocess.run(launch_cmd(folder, ["checkpoint_every=0", "dist_timeout_s=60", *extra]), cwd=ROOT,
                                  env={**subprocess_env(OMP_NUM_THREADS=1), **env}, capture_output=True, text=True,
                                  timeout=300)
        return launch(n, "launch/warp.py", *tiny(folder, "checkpoint_every=0", "dist_timeout_s=60", *extra))

    p = go(before, ref)
    assert p.returncode == 0, p.stderr[-3000:]
    p = go(before, out, env={"WARP_DIST_KILL_AT": f"{kill}" + (":rank0" if before == 2 else "")})
    assert p.returncode != 0
    p = go(after, out, "resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at checkpoint" in p.stdout
    _close(ref, out, 1e-5)
