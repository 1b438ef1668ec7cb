"""The benchmark scripts at --size tiny: each `main` writes a JSON with the expected fields and positive numbers,
and run_all renders the report from those JSONs. Seconds per script; the scaling one launches 2 ranks."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, subprocess_env  # ROOT: the repository root on sys.path

MACHINE_KEYS = ("cpu_model", "cores", "torch", "transformers", "vllm", "cuda_device", "date")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One folder for the module: run_all's test renders whatever the benchmark tests wrote there."""
    return tmp_path_factory.mktemp("bench_results")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_written(res: dict, path, name: str) -> dict:
    assert path.exists(), f"{name} wrote no JSON"
    on_disk = json.loads(path.read_text())
    assert on_disk["benchmark"] == name and on_disk["size"] == "tiny"
    assert on_disk["command"].startswith(f"python benchmarks/{name}.py --size tiny")
    for k in MACHINE_KEYS:
        assert k in on_disk["machine"], k
    assert on_disk["machine"]["cores"] >= 1 and on_disk["machine"]["cpu_model"]
    assert set(res) == set(on_disk)
    assert not list(path.parent.glob("*.tmp")), "a temp file was left behind"
    return on_disk


def test_train_step(results, tiny_model_path):
    from benchmarks import common, train_step

    out = results / "train_step.json"
    res = check_written(train_step.main(["--size", "tiny", "--roofline", "--out", str(out)]), out, "train_step")
    want = ["naive", "fp32-hf", "bf16-hf"] + (["fp32-vllm"] if common.vllm_import_error() is None else [])
    assert [b for b in res["runs"] if "skipped" not in res["runs"][b]] == want
    for name in want:
        r = res["runs"][name]
        assert len(r["steps"]) == res["config"]["steps"]
        for k in ("generate_s", "score_s", "train_s", "step_s", "step_tokens_per_s", "tokens_per_step"):
            assert positive(r[k]), (name, k, r[k])
        assert r["tokens_per_step"] == res["config"]["batch_size"] * res["config"]["new_tokens"]
        for s in r["steps"]:
            assert s["step_s"] == pytest.approx(s["generate_s"] + s["score_s"] + s["train_s"] + s["push_s"], rel=1e-6)
    assert res["runs"]["naive"]["push_s"] == 0 and res["runs"]["fp32-hf"]["push_s"] >= 0
    for name in want[1:]:
        assert positive(res["step_over_naive"][name])
    # the roofline's FLOP count against GPT-2's by hand: 12 h^2 weights per layer in its linear maps (qkv 3 h^2,
    # attention out h^2, MLP 4 h^2 + 4 h^2), the tied LM head V x h over the completion positions only
    from transformers import AutoConfig

    cfg, c = AutoConfig.from_pretrained(tiny_model_path), res["config"]
    h, rows = cfg.n_embd, c["batch_size"] * (c["prompt_tokens"] + c["new_tokens"])
    f = res["roofline"]["flops"]
    assert f["linear_weights"] == 12 * h * h * cfg.n_layer and f["head_weights"] == cfg.vocab_size * h
    assert f["train_flops"] == 4 * (2 * f["linear_weights"] * rows + 2 * f["head_weights"] * c["batch_size"]
                                    * c["new_tokens"])
    for name in want:
        rf = res["roofline"]["runs"][name]
        assert positive(rf["train_flops_per_s"]) and positive(rf["of_matmul_rate"])
        assert 0 < rf["step_s_at_matmul_rate"] < res["runs"][name]["step_s"] + rf["train_s_at_matmul_rate"]
    assert "roofline: train phase" in res["notes"]
    if "fp32-vllm" in want:
        assert positive(res["runs"]["fp32-vllm"]["push_s"])
        assert all(math.isfinite(s["sampler_logprob_gap"]) for s in res["runs"]["fp32-vllm"]["steps"])


def test_merge(results, tiny_model_path):
    from benchmarks import merge
    from warp_dist import merging

    out = results / "merge.json"
    # M = 2 only: each row measures the streaming merger in two fresh processes (~6 s each here); M = 4 runs the same
    # code, and the kernels' merges for M = 1..9 are checked in test_merging
    res = check_written(merge.main(["--size", "tiny", "--policies", "2", "--out", str(out)]), out, "merge")
    rows = res["rows"]
    assert [(r["state_dict"].split()[0], r["M"], r["dtype"]) for r in rows] == [
        (sd, 2, dt) for dt in ("float32", "bfloat16") for sd in ("embedded:tiny-gpt2", "synthetic")]
    for r in rows:
        keys = ["model_bytes", "largest_tensor_bytes", "merge_s", "merge_gbps", "clone_s", "clone_gbps", "copy_gbps",
                "eager_gbps", "eager_over_copy_bandwidth", "merge_over_clone_bandwidth", "stream_merge_s",
                "stream_extra_bytes_theoretical"]
        if not merging.compiler_available():  # the compiled kernel is measured where it can run
            keys += ["compiled_gbps", "compiled_over_copy_bandwidth", "compile_first_call_s"]
            assert 0 <= r["compiled_call_overhead_s"] < 0.1, r["compiled_call_overhead_s"]
        from warp_dist.merging import native

        if not native.unavailable():  # the C++ kernel, where it builds
            keys += ["native_gbps", "native_over_copy_bandwidth", "stream_native_merge_s"]
            assert 0 <= r["native_call_overhead_s"] < 0.1 and len(r["native_times_s"]) == 3, r["native_times_s"]
            # the streaming merger with the native kernel: its result is the in-memory merge's, within a rounding
            assert r["stream_native_vs_in_memory_max_abs_diff"] <= (1e-6 if r["dtype"] == "float32" else 1e-2)
            assert r["stream_native_extra_bytes_measured"] is not None
        for k in keys:
            assert positive(r[k]), (r["state_dict"], r["M"], k, r[k])
        assert r["merge_bytes"] == (r["M"] + 3) * r["model_bytes"]
        # copy and the merges timed in the same rounds; the ratio is the median of the rounds' own ratios
        assert len(r["copy_times_s"]) == len(r["eager_times_s"]) == 3
        per_byte = (r["M"] + 3) / (2 * (r["M"] + 1))
        paired = sorted(per_byte * c / e for c, e in zip(r["copy_times_s"], r["eager_times_s"], strict=True))[1]
        assert r["eager_over_copy_bandwidth"] == pytest.approx(paired, rel=1e-12)
        assert r["stream_extra_bytes_theoretical"] == r["largest_tensor_bytes"] * (r["M"] + 2)
        assert r["stream_outputs_bytes"] == r["model_bytes"]
        assert r["stream_vs_in_memory_max_abs_diff"] <= (1e-6 if r["dtype"] == "float32" else 1e-2)
    assert rows[1]["model_bytes"] == 8 * 256 * 256 * 4
    assert rows[3]["model_bytes"] == 8 * 256 * 256 * 2


def test_merge_ab(results, tmp_path):
    """Two kernel sources timed in the same rounds: here the repository's kernel against a copy of itself (one
    build, shared through the cache), so both write the same bits, and each row carries both builds' times and
    ratios; a missing source and more policies than the kernel takes are refused before anything is built."""
    import shutil

    from benchmarks import merge_ab
    from warp_dist.merging import native

    if native.unavailable():
        pytest.skip(f"the native kernel cannot be built here: {native.unavailable()}")
    base = shutil.copy(native.SOURCE, tmp_path / "baseline.cpp")
    out = results / "merge_ab.json"
    res = check_written(merge_ab.main(["--size", "tiny", "--baseline", str(base), "--out", str(out)]), out, "merge_ab")
    assert [(r["dtype"], r["M"], r["sft"]) for r in res["rows"]] == [("float32", 2, True), ("bfloat16", 2, True)]
    for r in res["rows"]:
        assert r["same_bits"] is True
        assert len(r["baseline_times_s"]) == len(r["candidate_times_s"]) == len(r["copy_times_s"]) == 3
        for k in ("copy_gbps", "baseline_s", "candidate_s", "baseline_over_copy_bandwidth",
                  "candidate_over_copy_bandwidth", "candidate_over_baseline_time"):
            assert positive(r[k]), (k, r[k])
        ratios = sorted(c / b for c, b in zip(r["candidate_times_s"], r["baseline_times_s"], strict=True))
        assert r["candidate_over_baseline_time"] == pytest.approx(ratios[1], rel=1e-12)
    assert native.SOURCE == merge_ab.ROOT / "warp_dist" / "merging" / "merge_kernel.cpp"  # restored for later callers
    with pytest.raises(SystemExit, match="--baseline: .* is not a file"):
        merge_ab.main(["--size", "tiny", "--baseline", str(tmp_path / "missing.cpp")])
    with pytest.raises(SystemExit, match=r"--policies: 9; allowed 1\.\.8"):
        merge_ab.main(["--size", "tiny", "--baseline", str(base), "--policies", "9"])


@pytest.mark.slow  # 2 policies x 2 layouts of real ranks; the same topology is tested in test_distributed
@pytest.mark.multiproc
def test_scaling(results, tiny_model_path):
    from benchmarks import scaling

    out = results / "scaling.json"
    res = check_written(scaling.main(["--size", "tiny", "--timeout", "240", "--out", str(out)]), out, "scaling")
    (row,) = res["rows"]
    par, seq = row["parallel"], row["sequential"]
    assert row["M"] == 2 and par["ranks"] == 2 and seq["ranks"] == 1
    assert par["train_ranks"] == [0, 1] and seq["train_ranks"] == [0]
    assert par["train_records"] == seq["train_records"] == 2 * res["config"]["steps"]
    assert par["eval_num_ranks"] == 2 and seq["eval_num_ranks"] == 1
    for k in ("train_speedup", "wall_speedup", "eval_speedup"):
        assert positive(row[k]), k
    for run in (par, seq):
        for k in ("wall_s", "train_phase_s", "eval_final_s"):
            assert positive(run[k]), k
    assert "cores" in res["notes"]


@pytest.mark.slow  # whole runs of the project and the naive loop; the naive step is run by test_train_step
def test_e2e(results, tiny_model_path):
    from benchmarks import e2e

    out = results / "e2e.json"
    res = check_written(e2e.main(["--size", "tiny", "--timeout", "240", "--out", str(out)]), out, "e2e")
    p, n = res["project"], res["naive"]
    for run in (p, n):
        for k in ("wall_s", "run_s", "weight_distance_to_sft"):
            assert positive(run[k]), k
        assert -1 <= run["final_reward_mean"] <= 1 and math.isfinite(run["final_kl_mean"])
    assert positive(res["ratios"]["naive_over_project_wall"])
    # tiny preset = 1 rank + HF backend. The naive loop samples with HF `generate` (its own random stream), the
    # project with per-request seeds, so the two runs see different samples: both must move their weights and
    # report the same kind of numbers, not the same numbers.
    assert res["config"]["ranks"] == 1 and res["config"]["backend"] == "hf"
    assert n["final_identical_fraction"] < 1.0 and p["final_identical_fraction"] < 1.0


def columns(line: str) -> int:
    return line.count("|") - line.count("\\|")


def test_run_all_plan_and_report(results, tmp_path):
    from benchmarks import run_all

    for size in ("tiny", "cpu"):
        for name in run_all.ORDER:
            argv = run_all.bench_argv(name, size, tmp_path)
            assert argv[0] == "--size" and argv[-2:] == ["--out", str(tmp_path / f"{name}.json")]
    assert "embedded:smollm2-135m" in run_all.bench_argv("rollout", "cpu", tmp_path)
    # --results-dir alone: the report lands beside the JSONs, not in the repository's default place
    other = tmp_path / "only_dir"
    other.mkdir()
    assert run_all.main(["--size", "tiny", "--no-run", "--results-dir", str(other)])["report"] == str(other / "RESULTS.md")
    assert (other / "RESULTS.md").exists()
    md = tmp_path / "RESULTS.md"
    res = run_all.main(["--size", "tiny", "--no-run", "--results-dir", str(results), "--out", str(md)])
    assert res["failed"] == [] and md.exists()
    text = md.read_text()
    assert "## Machine" in text and "torch" in text
    for i, name in enumerate(run_all.ORDER, 1):
        section = text.split(f"## {i}. {run_all.TITLES[name]}")[1].split("\n## ")[0]
        if not (results / f"{name}.json").exists():
            assert "Not run" in section
            continue
        lines = [x for x in section.splitlines() if x.startswith("|")]
        header, rows = lines[0], lines[2:]
        assert header.endswith("| command |") and rows, name
        for row in rows:
            assert f"`python benchmarks/{name}.py" in row and columns(row) == columns(header), row


@pytest.mark.slow  # seven real runs measured by peak RSS; the plan it checks is unit-tested in test_plan
def test_memory(results, tiny_model_path):
    """Real runs with the peak resident memory of every rank read from /proc while they run."""
    from benchmarks import memory

    out = results / "memory.json"
    res = check_written(memory.main(["--size", "tiny", "--out", str(out)]), out, "memory")
    cases = {c["case"]: c for c in res["cases"]}
    assert set(cases) == {"1 process, HF", "ZeRO-3 G=1 M=1", "ZeRO-3 G=2 M=1"}
    assert sorted(cases["ZeRO-3 G=2 M=1"]["peak_bytes_per_rank"]) == ["0", "1"]
    for c in cases.values():
        assert all(200e6 < v < 8e9 for v in c["peak_bytes_per_rank"].values()), c  # a python process with torch
    assert cases["1 process, HF"]["peak_over_one_process_hf"] == 1.0
    for c in cases.values():  # the memory plan (config.json only) predicts each rank's peak
        assert 0.75 < c["measured_over_plan"] < 1.25, c


def test_completions(results, tiny_model_path):
    """k completions per prompt through the trainer's own RL loop (HF backend here: the vLLM n=k path has its own
    end-to-end test), same completions per step for every k."""
    from benchmarks import completions

    out = results / "completions.json"
    res = check_written(completions.main(["--size", "tiny", "--backend", "hf", "--ks", "1,2", "--steps", "3",
                                          "--out", str(out)]), out, "completions")
    runs = {r["k"]: r for r in res["runs"]}
    assert set(runs) == {1, 2} and runs[1]["prompts"] == 2 * runs[2]["prompts"]
    for r in runs.values():
        assert positive(r["sampling_tokens_per_s"]) and positive(r["step_s"]) and positive(r["gain_seconds"])
        assert math.isfinite(r["reward_gain_per_s"]) and len(r["rewards"]) == 3


def test_peak_rss_anonymous_counts_a_tensor_but_not_a_mapped_file(tmp_path):
    """PeakRSS(anon=True), the merge benchmark's memory probe: a 64 MiB tensor written in the block counts; reading a
    64 MiB file through mmap (file-backed pages, as library code is) does not; plain RSS counts both."""
    import mmap

    import torch

    from benchmarks import common

    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (64 << 20))
    mib = 1 << 20
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with common.PeakRSS(anon=True) as anon, common.PeakRSS() as full:
            total = sum(mm[i] for i in range(0, len(mm), 4096))  # fault every page of the file in
        assert total == (64 << 20) // 4096
        assert anon.growth < 16 * mib <= 48 * mib < full.growth, (anon.growth / mib, full.growth / mib)
    with common.PeakRSS(anon=True) as anon:
        t = torch.ones(16 << 20)  # 64 MiB, every page written
        del t
    assert anon.growth > 48 * mib, anon.growth / mib


def test_compare_runs_sees_identical_and_different_runs(tmp_path, tiny_model_path):
    """The before/after check of a refactor (benchmarks/compare_runs.py): the same tiny run twice is identical, bit for
    bit (the trainer is deterministic on CPU); with merge.method=lerp the final weights differ."""
    import subprocess
    import sys

    from benchmarks.compare_runs import main as compare

    args = ["train.iterations=1", "train.steps=2", "data.num_eval_prompts=8", "eval.batch_size=8"]
    for name, extra in (("a", []), ("b", []), ("lerp", ["merge.method=lerp"])):
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "warp.py"), "--config",
                               str(ROOT / "configs" / "warp" / "tiny.yaml"), f"output_dir={tmp_path / name}", *args,
                               *extra], cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert compare([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert compare([str(tmp_path / "a"), str(tmp_path / "lerp")]) == 1
