"""Config: presets load, dotted overrides are typed, bad keys/values give one-line errors naming the field."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from warp_dist.config import ConfigError, WarpConfig, config_from_dict, load_config, validate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "warp" / "tiny.yaml"
STAGE_PRESETS = ("sft", "reward_model")  # loaded by warp_dist.stages.config, tested below
PRESETS = sorted((REPO / "configs" / "warp").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, WarpConfig)
    assert cfg.preset == path.stem
    assert cfg.output_dir.startswith(f"runs/{path.stem}-")
    validate(cfg)


@pytest.mark.parametrize("stage", STAGE_PRESETS)
def test_stage_presets_load(stage):
    from warp_dist.stages.config import load_stage_config

    cfg = load_stage_config(stage, REPO / "configs" / "stages" / f"{stage}.yaml", [])
    assert cfg.preset == stage
    assert cfg.output_dir.startswith(f"runs/{stage}-")
    with pytest.raises(ConfigError, match="train.lr"):
        load_stage_config(stage, REPO / "configs" / "stages" / f"{stage}.yaml", ["train.lr=-1"])


def test_tiny_preset_values():
    assert TINY.is_file()
    cfg = load_config(TINY)
    assert cfg.model.name == "embedded:tiny-gpt2"
    assert cfg.train.steps == 4 and cfg.train.batch_size == 8
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.data.prompt_min_tokens == 4 and cfg.data.prompt_max_tokens == 8
    assert cfg.progress is False
    # keys the YAML does not mention keep their defaults
    assert cfg.train.baseline == WarpConfig().train.baseline


def test_overrides_are_typed():
    cfg = load_config(TINY, ["train.steps=5", "merge.eta=0.3", "save_iterations=true", "train.lr=1e-4",
                             "reward.text=completion", "progress=off", "merge.lam=1", "output_dir=runs/x"])
    assert cfg.train.steps == 5 and type(cfg.train.steps) is int
    assert cfg.merge.eta == 0.3 and type(cfg.merge.eta) is float
    assert cfg.save_iterations is True
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float
    assert cfg.reward.text == "completion"
    assert cfg.progress is False
    assert cfg.merge.lam == 1.0 and type(cfg.merge.lam) is float
    assert cfg.output_dir == "runs/x"
    # later overrides win over earlier ones and over the YAML
    assert load_config(TINY, ["train.steps=5", "train.steps=7"]).train.steps == 7


def test_overrides_without_preset_and_nested():
    cfg = load_config(None, ["rollout.vllm.max_model_len=128", "rollout.vllm.enforce_eager=false", "train.steps=5.0"])
    assert cfg.rollout.vllm.max_model_len == 128 and cfg.rollout.vllm.enforce_eager == "false"
    assert cfg.train.steps == 5 and type(cfg.train.steps) is int
    assert cfg.preset == "custom"


def _err(overrides, path=TINY) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_unknown_override_key_suggests():
    msg = _err(["train.stepz=3"])
    assert "train.stepz" in msg
    assert "train.steps" in msg


def test_unknown_top_level_override_key():
    msg = _err(["trian.steps=3"])
    assert "trian" in msg


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 3\nfoo_bar: 1\n")
    msg = _err([], path=p)
    assert "foo_bar" in msg
    p.write_text("train:\n  stepz: 3\n")
    msg = _err([], path=p)
    assert "train.stepz" in msg and "train.steps" in msg


def test_yaml_section_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: 3\n")
    assert "train" in _err([], path=p)
    p.write_text("- a\n- b\n")
    _err([], path=p)
    assert "nope.yaml" in _err([], path=tmp_path / "nope.yaml")


def test_override_without_equals():
    assert "train.steps" in _err(["train.steps"])


@pytest.mark.parametrize("override,field", [
    ("train.policies=0", "train.policies"),
    ("train.iterations=0", "train.iterations"),
    ("train.steps=0", "train.steps"),
    ("train.steps=-3", "train.steps"),
    ("merge.eta=1.5", "merge.eta"),
    ("merge.eta=-0.1", "merge.eta"),
    ("merge.lam=2", "merge.lam"),
    ("merge.lam=-0.5", "merge.lam"),
    ("merge.kernel=fast", "merge.kernel"),
    ("train.mu=0", "train.mu"),
    ("train.mu=1.5", "train.mu"),
    ("train.beta=-1", "train.beta"),
    ("train.lr=-1e-5", "train.lr"),
    ("train.baseline=median", "train.baseline"),
    ("rollout.backend=foo", "rollout.backend"),
    ("reward.kind=foo", "reward.kind"),
    ("reward.text=foo", "reward.text"),
    ("model.dtype=int8", "model.dtype"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("merge.eta=abc", "merge.eta"),
    ("save_iterations=maybe", "save_iterations"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("merge.eta=.nan", "merge.eta"),
])
def test_bad_values_raise_one_line_error_naming_field(override, field):
    msg = _err([override])
    assert field in msg


def test_prompt_max_smaller_than_min():
    msg = _err(["data.prompt_min_tokens=8", "data.prompt_max_tokens=4"])
    assert "data.prompt_max_tokens" in msg


def test_cross_field_checks():
    assert "train.batch_size" in _err(["train.batch_size=1", "train.baseline=loo"])
    load_config(TINY, ["train.batch_size=1", "train.baseline=mean"])  # fine with the mean baseline
    assert "data.num_train_prompts" in _err(["data.num_train_prompts=4"])  # < batch_size 8
    assert "reward.name" in _err(["reward.kind=classifier"])
    assert "reward.callable" in _err(["reward.kind=callable", "reward.callable=nocolon"])


def test_config_from_dict_roundtrip():
    cfg = load_config(TINY, ["train.steps=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError):
        config_from_dict({"train": {"stepz": 1}})


def test_launcher_rejects_unknown_key_fast():
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "launch/warp.py", "--config", "configs/warp/tiny.yaml", "train.stepz=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    assert "train.stepz" in res.stderr
    assert "train.steps" in res.stderr
    assert elapsed < 20


def test_launcher_rejects_bad_value():
    res = subprocess.run([sys.executable, "launch/warp.py", "--config", "configs/warp/tiny.yaml", "merge.eta=1.5"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "merge.eta" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cpu_has_bf16_reads_the_flags_line():
    from warp_dist.config import cpu_has_bf16

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\nbugs\t\t: \n"
    sapphire = "flags\t: avx512f amx_tile amx_bf16 amx_int8\n"
    avx2 = "flags\t: fpu sse2 avx avx2 fma\n"
    skylake = "flags\t: avx2 avx512f avx512bw avx512vl\nmodel name\t: avx512_bf16 in a name is not a flag\n"
    assert cpu_has_bf16(zen4) and cpu_has_bf16(sapphire)
    assert not cpu_has_bf16(avx2) and not cpu_has_bf16(skylake) and not cpu_has_bf16("")


def test_model_dtype_auto_is_made_concrete_for_this_machine():
    """auto resolves while loading (so config.yaml, caches and reports name the dtype that ran): here, on CPU, from
    this machine's /proc/cpuinfo flags; a concrete dtype passes through."""
    from warp_dist.config import cpu_has_bf16, resolve_dtype

    info = Path("/proc/cpuinfo")
    expected = "bfloat16" if info.exists() and cpu_has_bf16(info.read_text()) else "float32"
    cfg = load_config(TINY, ["model.dtype=auto", "cpu=true"])
    assert cfg.model.dtype == expected
    assert resolve_dtype("auto", cpu=True) == expected
    assert resolve_dtype("float32", cpu=True) == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert config_from_dict(cfg.to_dict()).model.dtype == expected
    assert config_from_dict({"model": {"dtype": "auto"}, "cpu": True}).model.dtype == expected
    assert "auto" in _err(["model.dtype=int8"])


def test_demo_settings_pick_dtype_and_steps_and_refuse_bad_values():
    """make demo's overrides (launch/demo_settings.py): auto resolves as model.dtype=auto does (no CUDA in CI) and
    takes that dtype's steps; explicit values pass through; a bad DEMO_DTYPE / DEMO_STEPS ends in one line naming it."""
    from warp_dist.config import resolve_dtype

    def run(*args):
        return subprocess.run([sys.executable, "launch/demo_settings.py", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    dtype = resolve_dtype("auto")
    res = run()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [f"model.dtype={dtype}", f"train.steps={ {'float32': 10, 'bfloat16': 13}[dtype]}"]
    assert run("--dtype", "float32").stdout.split() == ["model.dtype=float32", "train.steps=10"]
    assert run("--dtype", "bfloat16").stdout.split() == ["model.dtype=bfloat16", "train.steps=13"]
    assert run("--dtype", "float32", "--steps", "25").stdout.split() == ["model.dtype=float32", "train.steps=25"]
    refused = [(("--dtype", "float16"), "DEMO_DTYPE"), (("--dtype", ""), "DEMO_DTYPE"), (("--steps", "0"), "DEMO_STEPS"),
               (("--steps", "ten"), "DEMO_STEPS"), (("--steps", "\u00b2"), "DEMO_STEPS")]
    for args, name in refused:
        res = run(*args)
        assert res.returncode == 2 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and name in res.stderr, res.stderr
    # the overrides it prints load as a WARP config
    cfg = load_config(TINY, run("--dtype", "bfloat16").stdout.split())
    assert cfg.model.dtype == "bfloat16" and cfg.train.steps == 13


def test_config_file_errors_are_one_line(tmp_path):
    from warp_dist.config import ConfigError, load_config

    cases = {"syntax.yaml": ("train:\n  steps: 3\n  lr: [1e-5\n", "syntax.yaml:4:1: YAML syntax error"),
             "tabs.yaml": ("train:\n\tsteps: 3\n", "tabs.yaml:2:1: YAML syntax error"),
             "empty.yaml": ("\n# nothing here\n", "is empty"),
             "list.yaml": ("- a\n- b\n", "holds a YAML list, not a mapping")}
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
