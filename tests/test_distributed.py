"""Real multi-process runs on CPU (gloo) through `accelerate launch`; every launch has a timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, accelerate_launch, free_port, subprocess_env
from warp_dist import merging
from warp_dist.topology import TopologyError, plan

pytestmark = pytest.mark.multiproc


def launch(n: int, script: str, *args: str, timeout: int = 420, cli: bool = False) -> subprocess.CompletedProcess:
    cmd = accelerate_launch(n, str(ROOT / script), *args, cli=cli)
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=timeout)


def tiny(out, *extra):
    return ["--config", str(ROOT / "configs" / "warp" / "tiny.yaml"), f"output_dir={out}", "train.steps=3", *extra]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_topology_plans_and_errors():
    t = plan(4, 2)
    assert t.groups == ((0, 1), (2, 3)) and t.group_policies == ((0,), (1,))
    assert t.leader_of_policy(1) == 2 and t.rank_in_group(3) == 1
    t = plan(2, 4)
    assert t.groups == ((0,), (1,)) and t.policies_of(1) == (2, 3)
    assert plan(1, 3).policies_of(0) == (0, 1, 2)
    with pytest.raises(TopologyError, match="multiple of M"):
        plan(3, 2)
    with pytest.raises(TopologyError, match="divisible"):
        plan(2, 3)


def test_two_policies_on_two_ranks_merge_equals_reference(tmp_path, tiny_model_path):
    out = tmp_path / "w2m2"
    # through the `accelerate` executable, as the README's commands (the other launches run its launch module)
    proc = launch(2, "launch/warp.py", *tiny(out, "save_iterations=true", "merge.kernel=native"), cli=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["merge_kernel"] for r in recs if r["kind"] == "merge"} == {"native"}  # the C++ merge, every tensor
    train = [r for r in recs if r["kind"] == "train" and r["iteration"] == 1]
    by_policy = {p: [r for r in train if r["policy"] == p] for p in (0, 1)}
    assert {r["rank"] for r in by_policy[0]} == {0} and {r["rank"] for r in by_policy[1]} == {1}
    # both policies trained at the same time: their step intervals overlap
    span = {p: (min(r["time"] for r in v) - v[0]["time_train_s"], max(r["time"] for r in v)) for p, v in by_policy.items()}
    assert span[0][0] < span[1][1] and span[1][0] < span[0][1], span
    for it in (1, 2):
        d = out / f"iter_{it}"
        init, p0, p1, merged = (_load(d / n) for n in ("init", "policy_0", "policy_1", "merged"))
        ref, _ = merging.merge_state_dicts(init, [p0, p1], 0.5, 0.5)
        worst = max((ref[k] - merged[k]).abs().max().item() for k in merged)
        assert worst <= 1e-6, f"iteration {it}: streamed merge differs from reference by {worst}"
        assert any(not torch.equal(p0[k], p1[k]) for k in p0), "the two policies must differ"


def test_one_policy_data_parallel_under_zero2(tmp_path, tiny_model_path):
    out = tmp_path / "zero2"
    proc = launch(2, "launch/warp.py", *tiny(out, "train.policies=1", "train.iterations=1",
                                            "train.deepspeed=configs/deepspeed/zero2.json"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "engine=deepspeed" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final"]["weight_distance_to_sft"] > 0
    assert summary["final"]["num_prompts"] == 16 and summary["final"]["num_ranks"] == 2
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in recs if r["kind"] == "train"} == {0, 1}


@pytest.mark.slow  # test_training_does_not_depend_on_the_group_size runs the same DDP group and checks more
def test_one_policy_ddp_group_keeps_ranks_in_sync(tmp_path, tiny_model_path):
    out = tmp_path / "ddp"
    proc = launch(2, "launch/warp.py", *tiny(out, "train.policies=1", "train.iterations=1", "save_iterations=true"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "engine=ddp" in proc.stdout
    # both ranks stepped on different prompts but with averaged gradients: policy_0 (saved by rank 0) is the
    # merge input, and the final model is a real move away from SFT
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["weight_distance_to_sft"] > 0


def test_evaluation_over_two_ranks_matches_one_rank(tmp_path, tiny_model_path):
    cfg = str(ROOT / "configs" / "warp" / "tiny.yaml")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    p1 = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_eval_script.py"), cfg, str(one), "eval.batch_size=4"],
                        cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = launch(2, "tests/dist_eval_script.py", cfg, str(two), "eval.batch_size=4")
    assert p2.returncode == 0, p2.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["texts"] == b["texts"]
    for key in ("reward_mean", "reward_std", "kl_mean", "identical_fraction", "num_prompts", "length_mean"):
        assert a["moved"][key] == pytest.approx(b["moved"][key], abs=1e-5), key
        assert a["sft"][key] == pytest.approx(b["sft"][key], abs=1e-5), key
    assert b["moved"]["num_ranks"] == 2 and len(b["moved"]["tokens_per_s_per_rank"]) == 2
    assert a["moved"]["identical_fraction"] < 1.0


def test_shutdown_destroys_the_process_group_once():
    """A finished job destroys its process groups before the interpreter exits (gloo's worker threads outliving Python
    can abort a finished rank with exit -6); without a group, or a second time, it does nothing."""
    code = ("import torch.distributed as t; from warp_dist import dist; dist.shutdown(); "
            "d = dist.init(1, 60.0, cpu=True, need_process_group=True); assert t.is_initialized(); "
            "dist.shutdown(); assert not t.is_initialized(); dist.shutdown(); print('shut down')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("shut down"), proc.stderr[-2000:]


def test_failing_rank_ends_the_job_promptly(tmp_path, tiny_model_path):
    out = tmp_path / "fail"
    t0 = time.time()
    proc = launch(2, "launch/warp.py", *tiny(out, "reward.kind=callable", "reward.callable=tests.toy_rewards:fail_on_rank_1",
                                            "dist_timeout_s=60"), timeout=240)
    assert proc.returncode != 0
    assert "[rank 1] FAILED" in proc.stderr and "injected failure on rank 1" in proc.stderr
    assert time.time() - t0 < 180


@pytest.mark.slow  # 4 ranks on 2 cores; ZeRO-3 G=2 (with its merge) and two policy groups each run on 2 ranks above
def test_four_ranks_two_groups_zero3(tmp_path, tiny_model_path):
    out = tmp_path / "zero3"
    proc = launch(4, "launch/warp.py", *tiny(out, "train.iterations=1", "train.deepspeed=configs/deepspeed/zero3.json"),
                  timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["final"]["weight_distance_to_sft"] > 0


def _final_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


def test_training_does_not_depend_on_the_group_size(tmp_path, tiny_model_path):
    """One policy on 1 rank vs on a 2-rank DDP group, 1 prompt per rank with the leave-one-out baseline: the
    baseline is computed over the whole group batch and every prompt has its own sampling seed, so both runs
    take the same steps (the old per-rank baseline raised here, and changed the estimator with G)."""
    args = ["train.policies=1", "train.iterations=1", "train.batch_size=2", "train.baseline=loo", "train.steps=3",
            "eval.every_iteration=false"]
    one, two = tmp_path / "g1", tmp_path / "g2"
    p1 = subprocess.run([sys.executable, str(ROOT / "launch" / "warp.py"), *tiny(one, *args)], cwd=ROOT,
                        env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = launch(2, "launch/warp.py", *tiny(two, *args))
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "engine=ddp" in p2.stdout
    a, b, sft = _final_weights(one), _final_weights(two), _load(tiny_model_path)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - sft[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and worst <= 1e-5, (worst, moved)


def eos_heavy_model(tmp_path, tiny_model_path):
    """The tiny GPT-2 with ~20 % of its vocabulary ending a completion: completions end at different lengths."""
    import shutil

    model = tmp_path / "eos_heavy"
    shutil.copytree(tiny_model_path, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = list(range(0, 1000, 5))
    (model / "generation_config.json").write_text(json.dumps(gen))
    return model


def test_zero3_group_matches_one_plain_rank_over_iterations(tmp_path, tiny_model_path):
    """One policy on a 2-rank ZeRO-3 group vs on one plain rank, 3 iterations, and 20 evaluation prompts in batches of
    16 (a short last batch: the group's two ranks evaluate batches of different lengths), with a model whose
    completions end at different lengths (ZeRO-3 forwards are collectives: HF sampling keeps the group in step).
    - At the first step of every iteration the policy and its EMA anchor both hold theta_init: kl_to_ema is 0. Today's
      code gave 0.076 and 0.043 in iterations 2 and 3 (persistent ZeRO-3 parameters kept stale whole copies, and the
      optimizer's fp32 master was never reset to theta_init).
    - The evaluation finishes (it waited on the ranks' unequal numbers of forwards until dist_timeout_s).
    - The same samples and gradient norms (to ~1e-5 relative) at every step, and final weights within 5 % of the
      largest move from SFT (measured 1.1e-4 against 6.0e-3: sums in another order, which AdamW's normalisation
      magnifies where gradients are near zero)."""
    args = ["train.policies=1", "train.iterations=3", "train.steps=3", "data.num_eval_prompts=20", "eval.batch_size=16",
            f"model.name={eos_heavy_model(tmp_path, tiny_model_path)}"]
    plain, z3 = tmp_path / "plain", tmp_path / "z3"
    p1 = subprocess.run([sys.executable, str(ROOT / "launch" / "warp.py"), *tiny(plain, *args)], cwd=ROOT,
                        env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = launch(2, "launch/warp.py", *tiny(z3, *args, "train.deepspeed=configs/deepspeed/zero3.json",
                                           "dist_timeout_s=120"), timeout=500)
    assert p2.returncode == 0, p2.stderr[-4000:]
    recs = [json.loads(x) for x in (z3 / "metrics.jsonl").read_text().splitlines()]
    first = {(r["iteration"], r["rank"]): r["kl_to_ema"] for r in recs if r["kind"] == "train" and r["step"] == 1}
    assert sorted(first) == [(i, r) for i in (1, 2, 3) for r in (0, 1)]
    assert all(abs(v) <= 1e-6 for v in first.values()), first
    lengths = {}
    for r in recs:
        if r["kind"] == "train":
            lengths.setdefault((r["iteration"], r["step"]), {})[r["rank"]] = r["length_mean"]
    assert any(v[0] != v[1] for v in lengths.values()), lengths  # the ranks really finished at different lengths
    assert json.loads((z3 / "summary.json").read_text())["final"]["num_prompts"] == 20
    a, b, sft = _final_weights(plain), _final_weights(z3), _load(tiny_model_path)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - sft[k]).abs().max().item() for k in sft if k in a)
    assert moved > 1e-3 and worst <= 0.05 * moved, (worst, moved)
    plain_recs = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in plain_recs if r["kind"] == "train"):
        pair = [z for z in recs if z["kind"] == "train" and (z["iteration"], z["step"]) == (r["iteration"], r["step"])]
        assert sum(z["reward_mean"] for z in pair) / 2 == pytest.approx(r["reward_mean"], abs=1e-4)
        assert all(z["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4) for z in pair)
    assert json.loads((z3 / "summary.json").read_text())["final"]["num_prompts"] == 20


def launch_env(n: int, *args: str, env: dict, timeout: int = 420, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(accelerate_launch(n, str(ROOT / "launch" / "warp.py"), *args), cwd=cwd,
                          env=subprocess_env(OMP_NUM_THREADS=1, **env), capture_output=True, text=True,
                          timeout=timeout)


def test_a_slow_policy_group_waits_at_the_merge(tmp_path, tiny_model_path):
    """Two policy groups, rank 1's 10 s slower than dist_timeout_s = 4 s: the other group waits for it at the phase
    boundaries (phase_timeout_s) and the run finishes (today's code failed: 'Timed out waiting 4000ms'). A dead rank
    still ends the job at once: test_ddp_group_reads_theta_init_from_rank_0s_file, with no phase limit at all."""
    t0 = time.time()
    slow = launch_env(2, *tiny(tmp_path / "slow", "train.iterations=1", "train.steps=2", "dist_timeout_s=4",
                               "eval.every_iteration=false"), env={"WARP_DIST_SLOW_AT": "step:10:rank1"})
    assert slow.returncode == 0, slow.stderr[-3000:]
    assert time.time() - t0 > 10  # the slow rank really was slow


def test_two_nodes_without_a_shared_output_dir_are_refused(tmp_path, tiny_model_path):
    """Two 'nodes' on this machine (two launches, --num_machines 2) whose output_dir is a relative path, so each
    node's rank sees its own folder, as on nodes with local disks: refused in one line before any work."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(node), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"), "output_dir=run"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(OMP_NUM_THREADS=1), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    lines = [ln for _, err in outs for ln in err.splitlines() if ln.startswith("error: output_dir=run")]
    assert len(lines) == 1, [err[-2000:] for _, err in outs]
    assert "rank 1" in lines[0] and "does not see the file rank 0 wrote" in lines[0]
    assert not (tmp_path / "node0" / "run" / "metrics.jsonl").exists()  # refused before the run started


def test_ddp_group_reads_theta_init_from_rank_0s_file(tmp_path, tiny_model_path):
    """Under DDP (whole tensors on every rank) only rank 0 writes the next theta_init, and the group's other rank
    reads it (today's code had every rank compute and write the same whole file). Rank 0 is killed at iteration 2's
    first step with no phase time limit (phase_timeout_s=0): every rank still ends at once, and the run folder holds
    rank 0's file of the next theta_init and no per-rank copies."""
    out = tmp_path / "ddp"
    t0 = time.time()
    proc = launch_env(2, *tiny(out, "train.policies=1", "train.steps=1", "eval.every_iteration=false",
                               "phase_timeout_s=0"), env={"WARP_DIST_KILL_AT": "step:2:rank0"}, timeout=300)
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr and "engine=ddp" in proc.stdout, proc.stderr[-2000:]
    assert time.time() - t0 < 120
    blobs = {p.name for p in (out / "state" / "blobs").iterdir()}
    assert "iter2_init.safetensors" in blobs, blobs
    assert not [b for b in blobs if ".rank" in b], blobs


@pytest.mark.slow  # the default run samples the same EOS-heavy model under ZeRO-3 in test_zero3_group_matches_...
def test_zero3_hf_sampling_keeps_the_group_in_step(tmp_path, tiny_model_path):
    """ZeRO-3 forwards are collectives: ranks whose completions end at different lengths must keep stepping
    together (they used to wait on each other until the timeout)."""
    model = eos_heavy_model(tmp_path, tiny_model_path)
    out = tmp_path / "z3hf"
    proc = launch(2, "launch/warp.py", *tiny(out, f"model.name={model}", "train.policies=1", "train.iterations=1",
                                            "train.deepspeed=configs/deepspeed/zero3.json", "rollout.backend=hf",
                                            "dist_timeout_s=90"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    by_step = {}
    for r in train:
        by_step.setdefault(r["step"], {})[r["rank"]] = r["length_mean"]
    assert any(v[0] != v[1] for v in by_step.values()), by_step  # the ranks really finished at different lengths
    assert min(r["length_mean"] for r in train) < 12


@pytest.mark.parametrize("group", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_per_rank_model_state_falls_with_the_group_size(group, tmp_path, tiny_model_path):
    """ZeRO-3 with G ranks per policy: the policy's weights, gradients, AdamW moments and the EMA anchor each rank
    holds are 1/G of the G = 1 figures (bytes counted from the tensors themselves, after one RL step)."""
    args = ["train.policies=1", "train.deepspeed=configs/deepspeed/zero3.json"]
    held = {}
    for g in (1, group):
        out = tmp_path / f"g{g}.json"
        argv = ["tests/held_bytes_script.py", str(ROOT / "configs" / "warp" / "tiny.yaml"), str(out), *args,
                f"output_dir={tmp_path / f'run{g}'}"]
        if g == 1:
            proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1),
                                  capture_output=True, text=True, timeout=300)
        else:
            proc = launch(g, *argv, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        held[g] = json.loads(out.read_text())
    keys = ("policy_weights", "gradients", "optimizer", "reference")
    one = held[1][0]
    assert all(one[k] > 0 for k in keys), one
    for g in (group,):
        for rank_bytes in held[g]:
            for k in keys:  # 1/G plus the small tensors DeepSpeed keeps whole (persistence threshold) and padding
                assert rank_bytes[k] <= one[k] / g * 1.15, (g, k, rank_bytes[k], one[k])
