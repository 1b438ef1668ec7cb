"""The models a rank holds, and the memory rule they follow (the one place it is written).

A rank of a policy group of G ranks (G = W / M; G = 1 when ranks train several policies in turn) holds:

| component | plain / DDP | DeepSpeed ZeRO-2 | DeepSpeed ZeRO-3 |
|---|---|---|---|
| policy weights (+ fp32 master) | whole, fp32 | whole, fp32 (+ fp32 master partition 1/G) | 1/G, fp32 (+ fp32 master partition 1/G) |
| gradients | whole, fp32 | 1/G, fp32 | 1/G, fp32 |
| AdamW moments | whole, 2 x fp32 | 1/G, 2 x fp32 | 1/G, 2 x fp32 |
| reference module (EMA anchor while training, SFT while evaluating) | whole, fp32 | whole, fp32 | 1/G, fp32 |
| theta_init (`InitStore`) | on disk, fp32 (read when needed) | same | this rank's 1/G slices, on disk |
| SFT weights | on disk only (`state/sft.safetensors` or the model folder), streamed into the reference for evaluation | same | same |
| rollout engine | `rollout/`: HF samples from the policy module itself; vLLM holds one compute-dtype copy per rank on CPU | | |

Every weight, the EMA and theta_init are fp32 on every path. `model.dtype = bfloat16` is the *compute* dtype: forward
and backward run under `torch.autocast` with fp32 weights (DeepSpeed's own bf16/fp16 modes are switched off). So task
vectors, the EMA update and LITI are exact fp32 arithmetic whatever the compute dtype. DeepSpeed 0.19's ZeRO-3 still
keeps its fp32 master as a separate partition (its test for reusing fp32 weights compares a torch.device with a
string and never holds; with offload the master is on the offload device anyway): `Policy.begin` and `restore` copy
the weights written into it, and the memory plan counts it in ZeRO-3's buffers.

The reference module is one frozen copy used twice: it carries the EMA anchor during an RL phase (reset to theta_init
at the start of each policy, moved by `ema_update_`) and is loaded with the SFT weights from disk for an evaluation,
so no rank ever keeps a resident SFT copy. Under ZeRO-3 it is a second DeepSpeed engine in inference mode holding
partitions (a partitioned forward, as TRL/OpenRLHF hold their reference model); its EMA update is elementwise on the
local partitions (no gather). Full tensors appear one at a time only (`Weights.gathered`, `Weights.iter_full`), for the
weight push, the merge and saving.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator

import torch

from .. import dist as distmod
from . import rl

PartFn = Callable[[str, int, int], torch.Tensor]  # (name, start, count) -> fp32 [count] slice of the flat tensor


def autocast(device: torch.device, compute_dtype: torch.dtype):
    """bf16 compute with fp32 weights; a no-op for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def autocast_inside(module: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Make `module`'s own forward enter the compute-dtype autocast (hooks on the module), so a wrapper that switches
    an outer autocast off cannot change the dtype it computes in.

    Why: DeepSpeed's engine forward (0.19, `runtime/torch_autocast.autocast_if_enabled`) disables an outer autocast
    that its config does not declare, and its test (`torch.is_autocast_enabled()` without a device) sees CUDA
    autocast only: on GPUs the policy's loss forward under ZeRO ran in fp32 while the reference and the sampler ran in
    bf16. Declaring `torch_autocast` in the DeepSpeed config instead would also make ZeRO-3 gather Linear weights in
    bf16 (`comm_dtype`), and the gathered full weights are what the merge and the saved files read: task vectors
    rounded to bf16. A no-op for fp32."""
    if compute_dtype == torch.float32:
        return
    entered: list = []

    def enter(_mod, _args):
        ctx = torch.autocast(device_type=device.type, dtype=compute_dtype)
        ctx.__enter__()
        entered.append(ctx)

    def leave(_mod, _args, _out):
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


EAGER_MAX_TOKENS = 64  # auto picks eager attention up to this sequence length (bf16 on CPU)


def attention_impl(choice: str, device: torch.device, compute_dtype: torch.dtype, max_len: int) -> str:
    """The attention kernel the training and evaluation module uses (`model.attention`).

    auto: "eager" for bf16 on CPU with sequences of at most EAGER_MAX_TOKENS (prompt + completion): there torch's CPU
    flash-attention backward in bf16 cost ~0.23 s more per RL step of SmolLM2-135M (16 x 32 tokens, 2-core Xeon)
    than the eager matmul-softmax path, which autocast runs in bf16 too; at 128 tokens the two were even, and eager
    keeps B x heads x L x L probabilities per layer for backward. Otherwise "" = the model's own default
    (transformers picks sdpa where the model supports it; asking for sdpa explicitly fails on a model without it).
    """
    if choice != "auto":
        return choice
    short = max_len <= EAGER_MAX_TOKENS
    return "eager" if device.type == "cpu" and compute_dtype == torch.bfloat16 and short else ""


class Weights:
    """A causal LM held by this rank: whole, or partitioned over the policy group under ZeRO-3.

    `names` are the unique trainable parameters (tied weights once, first name); `aliases` maps every state-dict key
    of a parameter to its name; `span(name)` is this rank's (start, count) slice of the flattened tensor and
    `local(name)` the 1-D tensor holding it (the whole parameter when not partitioned).
    """

    def __init__(self, module: torch.nn.Module, d: distmod.Dist, compute_dtype: torch.dtype, zero3: bool = False):
        self.module, self.d, self.compute_dtype, self.zero3 = module, d, compute_dtype, zero3
        self.device = d.device
        self.params: dict[str, torch.nn.Parameter] = {}
        self.aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in first:
                first[id(p)] = name
                self.params[name] = p
            self.aliases[name] = first[id(p)]
        self.names = list(self.params)
        self.shapes = {n: tuple(p.ds_shape) if zero3 else tuple(p.shape) for n, p in self.params.items()}
        self.numels = {n: int(torch.Size(s).numel()) for n, s in self.shapes.items()}
        params = {id(p) for p in self.params.values()}
        self.buffers = {k: v for k, v in module.state_dict().items()
                        if k not in self.aliases and id(v) not in params}
        self._keep = "logits_to_keep" in inspect.signature(module.forward).parameters
        # every write to the weights bumps `version` (the rollout engine is labelled with the version it was pushed):
        # sampling after a write that was not pushed is refused (RolloutBackend.generate); `last_write` names it
        self.version = 0
        self.last_write = "construction"

    # ------------------------------------------------------------------ this rank's share
    def local(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return p.ds_tensor.data if self.zero3 else p.data.view(-1)

    def span(self, name: str) -> tuple[int, int]:
        if self.zero3:
            n = self.params[name].ds_tensor.numel()
            return self.d.group_rank * n, n
        return 0, self.numels[name]

    @torch.no_grad()
    def load_(self, part: PartFn, what: str = "a load") -> None:
        """Every parameter <- part(name, start, count) for this rank's span (under ZeRO-3 a collective inside the
        policy group at the end: `written`)."""
        for name in self.names:
            start, count = self.span(name)
            self.local(name).copy_(part(name, start, count).to(self.local(name).dtype))
        self.written(what)

    def written(self, what: str, refresh: bool = True) -> None:
        """Call after this rank's shares were changed in place: bumps `version`, and under ZeRO-3 refreshes the
        persistent parameters' full copies (`refresh_persistent`; refresh=False where DeepSpeed did it, the step)."""
        self.version += 1
        self.last_write = what
        if refresh:
            self.refresh_persistent()

    def persistent(self) -> list[torch.nn.Parameter]:
        """ZeRO-3 parameters DeepSpeed keeps whole on every rank (numel <= stage3_param_persistence_threshold)."""
        if not self.zero3:
            return []
        return [self.params[n] for n in self.names if getattr(self.params[n], "ds_persist", False)]

    @torch.no_grad()
    def refresh_persistent(self) -> None:
        """Rebuild the full copies of persistent ZeRO-3 parameters from their partitions (a collective inside the
        policy group; a no-op without ZeRO-3).

        DeepSpeed gathers a persistent parameter (norms, biases) once and keeps it whole; only an optimizer step
        re-gathers it. The partitions are the truth: after warp_dist writes them (theta_init, the EMA update, the
        merge, an evaluation's weights) the whole copies would keep their old values (the EMA anchor's norms stayed
        at their first values: kl_to_ema was 0.076 at the first step of iteration 2, where the policy and its anchor
        are equal). Partitioning releases the stale copy; the gather rebuilds it from the partitions."""
        ps = self.persistent()
        if ps:
            ps[0].partition(param_list=ps)
            ps[0].all_gather(param_list=ps)

    @contextlib.contextmanager
    def gathered(self, name: str):
        """The full parameter `name` (a collective inside the policy group under ZeRO-3)."""
        p = self.params[name]
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield p.data
        else:
            yield p.data

    def iter_full(self, dtype: torch.dtype | None = None, with_aliases: bool = False, copy: bool = True
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time; with_aliases also yields tied names (same tensor) and the
        persistent buffers — the full state dict, as vLLM's loader wants it. copy=False yields the live parameter
        itself when it is whole and already in `dtype` (the consumer must not keep or modify it); under ZeRO-3 the
        gathered tensor is always copied (it is partitioned again when the next one is gathered)."""
        by_name: dict[str, list[str]] = {}
        for key, name in self.aliases.items():
            by_name.setdefault(name, []).append(key)
        for name in self.names:
            with self.gathered(name) as full:
                want = dtype if dtype is not None else full.dtype
                t = full.detach().to(want, copy=copy or self.zero3)
            for key in (by_name[name] if with_aliases else [name]):
                yield key, t
        if with_aliases:
            for key, b in self.buffers.items():
                yield key, b.detach()

    def local_bytes(self) -> int:
        """Bytes of this rank's share of every parameter (ZeRO-3: its partitions; else whole tensors)."""
        return sum(tensor_bytes(self.local(n)) for n in self.names)

    # ------------------------------------------------------------------ forward
    def logits(self, module, ids: torch.Tensor, att: torch.Tensor, pos: torch.Tensor, keep,
               outer_autocast: bool = True) -> torch.Tensor:
        """Logits of the last `keep` positions [B, keep, V], or of the positions in the 1-D tensor `keep` [B, len, V]
        (only those are projected through the LM head when the model takes `logits_to_keep`). outer_autocast=False:
        the module enters the compute dtype itself (`autocast_inside`)."""
        with autocast(self.device, self.compute_dtype) if outer_autocast else contextlib.nullcontext():
            if self._keep:
                out = module(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=keep, use_cache=False)
                return out.logits
            out = module(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False)
            return out.logits[:, -keep:] if isinstance(keep, int) else out.logits[:, keep]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_tensors(zero_opt):
    for t in getattr(zero_opt, "fp32_partitioned_groups_flat", []) or []:
        if t.grad is not None:
            yield t.grad


class InitStore:
    """theta_init on this rank: each parameter's slice (`Weights.span`) as fp32 **on disk**, read when needed (at
    the start of each policy and in the merge) and never resident. Iteration 1 reads the SFT files; after each merge
    the rank reads the file its slices were written to (`parts_specs` / `file_part`)."""

    def __init__(self, w: Weights, reader: PartFn, files=None):
        self.w, self._reader, self._files = w, reader, files

    def part(self, name: str, start: int, count: int) -> torch.Tensor:
        return self._reader(name, start, count)

    def own(self, name: str) -> torch.Tensor:
        """This rank's slice of `name` (fp32)."""
        return self._reader(name, *self.w.span(name))

    def parts_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Specs of a file holding this rank's slices (name -> [count] fp32)."""
        return [(n, (self.w.span(n)[1],), torch.float32) for n in self.w.names]

    @classmethod
    def from_file(cls, w: Weights, path, full: bool) -> InitStore:
        """A store over a safetensors file of full tensors (`full`) or of this rank's slices."""
        from ..weights import SafeFile

        f = SafeFile(path)
        if full:
            return cls(w, lambda n, start, count: f.part(n, start, count), f)

        def own_slice(n, start, count):
            if (start, count) != w.span(n):
                raise ValueError(f"{path} holds this rank's slice of {n}, asked for [{start}:{start + count}]")
            return f.get(n)

        return cls(w, own_slice, f)

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None


# ---------------------------------------------------------------------------- DeepSpeed plumbing
# ZeRO buffer sizes (elements) that follow the memory rule when the JSON leaves them "auto" or unset: buckets of one
# layer's size, and a partitioned forward that keeps at most two layers gathered and releases each after use.
ZERO_AUTO = {
    "reduce_bucket_size": lambda h, layer: max(h * h, 2**20),
    "allgather_bucket_size": lambda h, layer: max(h * h, 2**20),
    "stage3_prefetch_bucket_size": lambda h, layer: max(int(0.9 * h * h), 2**20),
    "stage3_param_persistence_threshold": lambda h, layer: 10 * h,
    "stage3_max_live_parameters": lambda h, layer: 2 * layer,
    "stage3_max_reuse_distance": lambda h, layer: 0,
    "sub_group_size": lambda h, layer: 2 * layer,  # optimizer steps in chunks: AdamW temporaries of 2 layers
}


def deepspeed_config(path: str, tc, group_size: int, training: bool, hidden: int = 0, layer_numel: int = 0) -> dict:
    """The user's DeepSpeed JSON with warp_dist's batch sizes, optimizer and precision (fp32 weights: bf16/fp16 off).

    ZeRO buffer sizes left "auto" or unset are sized from the model (`ZERO_AUTO`: hidden size, largest layer):
    DeepSpeed's own defaults (5e8-element buckets, up to 1e9 live gathered parameters) would let one rank gather and
    buffer the whole model, which is what partitioning is meant to avoid.
    """
    import json

    with open(path) as fh:
        conf = json.load(fh)
    zero = conf.setdefault("zero_optimization", {})
    if hidden and layer_numel:
        for key, rule in ZERO_AUTO.items():
            if (key.startswith("stage3_") or key == "sub_group_size") and int(zero.get("stage", 0)) != 3:
                continue
            if zero.get(key, "auto") == "auto":
                zero[key] = int(rule(hidden, layer_numel))
    per_rank = max(1, tc.batch_size // group_size)
    conf.update(train_micro_batch_size_per_gpu=per_rank, gradient_accumulation_steps=1,
                train_batch_size=per_rank * group_size, gradient_clipping=tc.max_grad_norm)
    conf["bf16"] = {"enabled": False}
    conf["fp16"] = {"enabled": False}
    conf.pop("torch_autocast", None)
    if training:
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                         "torch_adam": True}}
    else:
        conf.pop("optimizer", None)
        conf.pop("scheduler", None)
    return conf


def zero_stage(conf: dict) -> int:
    return int(conf.get("zero_optimization", {}).get("stage", 0))


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError("train.deepspeed is set but DeepSpeed is not installed: pip install -e .[deepspeed]") from None
    return deepspeed


def build_module(model_path: str, d: distmod.Dist, conf: dict | None, part: PartFn | None, attention: str = ""):
    """The causal LM for this rank, fp32, with `attention` as its attention kernel ("" = the model's default; see
    `attention_impl`).
    ZeRO-3: constructed partitioned (never whole) and filled from `part`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if conf is not None and zero_stage(conf) == 3:
        deepspeed = _import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if d.device.type == "cuda" else "gloo")
        hf_cfg = AutoConfig.from_pretrained(model_path)
        # dtype=None: the config (bf16/fp16 off) then gives fp32 — an explicit dtype is overridden on CPUs by
        # DeepSpeed 0.19's precedence in `_set_dtype`; no global patch of F.linear (mem_efficient_linear=False)
        from transformers.initialization import no_init_weights

        with deepspeed.zero.Init(data_parallel_group=d.group, config_dict_or_path=conf, dtype=None,
                                 mem_efficient_linear=False, mpu=distmod.GroupMPU(d.group, d.solo)), no_init_weights():
            # no random init: the partitions are filled from `part` below (init code would index empty partitions)
            kw = {"attn_implementation": attention} if attention else {}
            module = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, **kw)
        module.tie_weights()  # no_init_weights also skips the tying that post-init does
        module.eval()
        from ..models import disable_dropout

        disable_dropout(module)
        w = Weights(module, d, torch.float32, zero3=True)
        if part is not None:
            w.load_(part)
        return module
    from ..models import load_causal_lm

    return load_causal_lm(model_path, "float32", d.device, attention=attention)


class Policy:
    """The policy being trained on this rank: module, optimizer and fp32 master (plain, DDP or DeepSpeed).

    `begin(init)` starts a new policy from theta_init with a fresh optimizer; `loss_logits` is the forward pass that
    gradients flow through; `step` is one optimizer step (gradient clipping included); `master(name)` is this rank's
    fp32 values of a parameter (what the EMA follows).
    """

    def __init__(self, module, d: distmod.Dist, compute_dtype: torch.dtype, tc, ds_conf: dict | None,
                 checkpointing: bool = False):
        self.d, self.tc = d, tc
        self.checkpointing = checkpointing
        if checkpointing:  # recompute each layer in backward: activations of one layer instead of all
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.kind = "plain"
        self.engine = self.ddp = self.opt = None
        zero3 = ds_conf is not None and zero_stage(ds_conf) == 3
        if ds_conf is not None:
            deepspeed = _import_deepspeed()
            self.kind = "deepspeed"
            self.stage = zero_stage(ds_conf)
            self.engine, _, _, _ = deepspeed.initialize(
                model=module, config=ds_conf, mpu=distmod.GroupMPU(d.group, d.solo),
                model_parameters=[p for p in module.parameters() if p.requires_grad])
            module = self.engine.module
            autocast_inside(module, d.device, compute_dtype)  # the engine forward may switch an outer autocast off
        elif d.group_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.kind = "ddp"
            self.ddp = DDP(module, process_group=d.group, gradient_as_bucket_view=True,
                           device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.w = Weights(module, d, compute_dtype, zero3=zero3)
        if zero3:
            bad = [n for n in self.w.names if self.w.local(n).dtype != torch.float32]
            if bad:
                raise RuntimeError(f"ZeRO-3 partitions of {bad[0]} are {self.w.local(bad[0]).dtype}, not fp32: warp_dist keeps fp32 weights")
        self._trainable = [self.w.params[n] for n in self.w.names]

    @property
    def module(self):
        return self.w.module

    @property
    def names(self) -> list[str]:
        return self.w.names

    # ------------------------------------------------------------------ lifecycle
    @torch.no_grad()
    def begin(self, init: InitStore) -> None:
        """Weights <- theta_init (this rank's share), optimizer state zeroed (a new policy)."""
        self.w.load_(init.part, "the start of a policy (theta_init)")
        if self.kind == "deepspeed":
            self._sync_master()
            reset_optimizer_state(self.engine.optimizer.optimizer)
            self.engine.zero_grad()
        else:
            self.opt = make_adamw(self._trainable, self.tc.lr, self.tc.weight_decay)

    def _sync_master(self) -> None:
        """DeepSpeed: the optimizer's fp32 master <- the weights just written. ZeRO-1/2 keep a separate master
        partition; ZeRO-3 does too when the optimizer or the parameters are offloaded (`offload_optimizer` /
        `offload_param`: a clone on the offload device), and without it the next optimizer step would write the
        previous policy's master back over theta_init. Without offload ZeRO-3's master is the partition itself
        (the copy is onto the same memory)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for n in self.w.names:
            p = self.w.params[n]
            if self.stage == 3:
                safe_set_local_fp32_param(p, p.ds_tensor.data)
            elif self.stage in (1, 2):
                safe_set_full_fp32_param(p, p.data)

    def end(self) -> None:
        """Free what only training needs: the optimizer (plain/DDP) and the gradients."""
        if self.kind != "deepspeed":
            self.opt = None
            for p in self._trainable:
                p.grad = None

    def loss_logits(self, ids, att, pos, keep) -> torch.Tensor:
        """The forward pass gradients flow through (train() mode only for gradient checkpointing; dropout is 0)."""
        fwd = self.engine if self.engine is not None else (self.ddp if self.ddp is not None else self.w.module)
        # through DeepSpeed's engine the module enters autocast itself (autocast_inside): no outer one for the engine
        # to see and switch off (it would also warn)
        outer = self.engine is None
        if not self.checkpointing:
            return self.w.logits(fwd, ids, att, pos, keep, outer)
        self.w.module.train()
        try:
            return self.w.logits(fwd, ids, att, pos, keep, outer)
        finally:
            self.w.module.eval()

    @torch.no_grad()
    def logits(self, ids, att, pos, keep) -> torch.Tensor:
        return self.w.logits(self.w.module, ids, att, pos, keep)

    def step(self, loss: torch.Tensor, at: str = "") -> float:
        """backward + clip + optimizer step; a non-finite gradient norm stops the run before the weights change
        (plain/DDP: checked between clipping and the step; DeepSpeed clips and steps in one call, so its weights
        are checked when they are next written: the merge and every saved file refuse non-finite values)."""
        from ..guards import check_finite

        if self.kind == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
            self.w.written("an optimizer step", refresh=False)  # DeepSpeed re-gathers its persistent parameters
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            check_finite(torch.tensor(norm), "grad norm", at)
            return norm
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, self.tc.max_grad_norm)
        check_finite(norm.detach(), "grad norm", at)
        self.opt.step()
        self.w.written("an optimizer step")
        self.opt.zero_grad(set_to_none=True)  # gradients are not held while the next batch is sampled and scored
        return norm.item()

    def master(self, name: str) -> torch.Tensor:
        """This rank's fp32 values of `name` (the whole parameter unless ZeRO-3)."""
        return self.w.local(name)

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the policy, by component, counted from the tensors themselves."""
        out = {"policy_weights": self.w.local_bytes(), "gradients": 0, "optimizer": 0}
        if self.kind == "deepspeed":
            zo = self.engine.optimizer
            flat = getattr(zo, "grad_partitions_flat_buffer", None)
            if flat is not None:
                out["gradients"] = tensor_bytes(flat)
            else:
                out["gradients"] = sum(tensor_bytes(g) for g in _grad_tensors(zo))
            out["optimizer"] = sum(tensor_bytes(v) for st in zo.optimizer.state.values() for v in st.values()
                                   if torch.is_tensor(v))
            if self.stage in (1, 2):  # the fp32 master partition is a separate copy there
                out["policy_weights"] += sum(tensor_bytes(t) for t in getattr(zo, "single_partition_of_fp32_groups", []))
            if self.stage == 3:  # and under ZeRO-3 when it is not the weights' own flat buffer (see the module doc)
                pairs = zip(getattr(zo, "fp32_partitioned_groups_flat", []),
                            getattr(zo, "fp16_partitioned_groups_flat", []), strict=False)
                out["policy_weights"] += sum(tensor_bytes(m) for m, f in pairs if m.data_ptr() != f.data_ptr())
        else:
            out["gradients"] = sum(tensor_bytes(p.grad) for p in self._trainable if p.grad is not None)
            if self.opt is not None:
                out["optimizer"] = sum(tensor_bytes(v) for st in self.opt.state.values() for v in st.values()
                                       if torch.is_tensor(v))
        return out

    # ------------------------------------------------------------------ training state (checkpoints)
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer stepping this rank's fp32 values (DeepSpeed's inner one holds the partitions)."""
        return self.engine.optimizer.optimizer if self.kind == "deepspeed" else self.opt

    @torch.no_grad()
    def restore(self, part: PartFn, optimizer_state: dict) -> None:
        """After `begin`: this rank's weights and optimizer state as saved mid-policy (exact, fp32)."""
        self.w.load_(part, "a checkpoint's policy weights")
        if self.kind == "deepspeed":
            self._sync_master()
        self.optimizer.load_state_dict(optimizer_state)

    def close(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.destroy()
            self.engine = None
        self.opt = self.ddp = None


def make_adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's fused AdamW where it exists (CPU and CUDA, fp32 weights): one pass over each tensor instead of a
    dozen, ~10x faster on this 2-core CPU for SmolLM2 (0.035 s vs 0.38 s per step); the plain one otherwise."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def reset_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Zero every state tensor (moments and step counters) in place: a fresh AdamW for the next policy."""
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                v.zero_()
            elif isinstance(v, (int, float)):
                st[k] = type(v)(0)


class Reference:
    """The frozen reference model: EMA anchor during RL, SFT model during evaluation (one copy, see module doc)."""

    def __init__(self, policy_module, model_path: str, d: distmod.Dist, compute_dtype: torch.dtype,
                 ds_conf: dict | None, part: PartFn | None, attention: str = ""):
        self.engine = None
        zero3 = ds_conf is not None and zero_stage(ds_conf) == 3
        if zero3:
            deepspeed = _import_deepspeed()
            module = build_module(model_path, d, ds_conf, part, attention)
            self.engine, _, _, _ = deepspeed.initialize(model=module, config=ds_conf,
                                                        mpu=distmod.GroupMPU(d.group, d.solo))
            module = self.engine.module
        else:
            module = copy.deepcopy(policy_module)
        module.requires_grad_(False)
        module.eval()
        self.w = Weights(module, d, compute_dtype, zero3=zero3)
        self.holds = "init"

    @torch.no_grad()
    def load_(self, part: PartFn, holds: str) -> None:
        self.w.load_(part, f"the {holds} weights")
        self.holds = holds

    @torch.no_grad()
    def ema_update_(self, policy: Policy, mu: float) -> None:
        """ema <- (1 - mu) ema + mu theta on this rank's share of every parameter (elementwise; under ZeRO-3 the
        persistent parameters' full copies are then rebuilt from the partitions: a small gather)."""
        rl.ema_update([self.w.local(n) for n in self.w.names], [policy.master(n) for n in self.w.names], mu)
        self.w.written("the EMA update")

    @torch.no_grad()
    def logits(self, ids, att, pos, keep) -> torch.Tensor:
        return self.w.logits(self.w.module, ids, att, pos, keep)

    def close(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.destroy()
            self.engine = None
