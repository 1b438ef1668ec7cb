"""Everything distributed lives here: process groups, the streaming merger, sharded evaluation, failure exit.

Accelerate starts the ranks and picks the device (gloo on CPU, NCCL on GPUs); this module adds one process group
per policy (no gradient sync between policies), streams the M policies' tensors to rank 0 for SLERP + LITI and
broadcasts the result, and gathers evaluation records. With one process every function works without torch.distributed.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from . import merging
from .topology import Topology, plan


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    topo: Topology
    group: object = None  # this rank's policy-group process group (None with one rank per group)
    groups: tuple = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def comm_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Tensors travel on the device of the backend (CUDA for NCCL, CPU for gloo)."""
        return t.to(self.device) if self.device.type == "cuda" else t.cpu()


def init(num_policies: int, timeout_s: float = 600.0, cpu: bool = False) -> Dist:
    """Join the ranks `accelerate launch` started, build the policy groups; one process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    topo = plan(world, num_policies)  # fails before any process group exists
    cpu = cpu or not torch.cuda.is_available()
    if cpu:
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world == 1:
        return Dist(0, 1, 0, 1, torch.device("cpu" if cpu else "cuda"), topo)
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=timeout_s)
    if not tdist.is_initialized():  # our own init so the collective timeout applies; Accelerate then adopts it
        tdist.init_process_group("gloo" if cpu else "nccl", timeout=timeout)
    state = PartialState(cpu=cpu)  # cpu=True is what makes Accelerate see MULTI_CPU ranks
    rank, world = state.process_index, state.num_processes
    groups = []
    for ranks in topo.groups:  # every rank creates every group, in the same order
        groups.append(tdist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None)
    device = torch.device("cpu") if cpu else state.device
    return Dist(rank, world, state.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                device, topo, groups[topo.group_of(rank)], tuple(groups))


def set_cpu_threads(local_world_size: int) -> int:
    """Give each local CPU rank an equal share of the cores (launchers default OMP_NUM_THREADS to 1).

    WARP_DIST_NUM_THREADS overrides the share.
    """
    n = int(os.environ.get("WARP_DIST_NUM_THREADS", "0")) or max(1, len(os.sched_getaffinity(0)) // local_world_size)
    torch.set_num_threads(n)
    return n


def fail_fast(exc: BaseException, rank: int) -> None:
    """Print the failing rank's error and leave at once: the launcher then stops every other rank."""
    sys.stderr.write(f"[rank {rank}] FAILED: {type(exc).__name__}: {exc}\n")
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


TensorSource = Callable[[str], torch.Tensor]


def stream_merge(d: Dist, init: dict[str, torch.Tensor], sources: dict[int, TensorSource], lam: float, eta: float
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """SLERP + LITI tensor by tensor on rank 0, broadcast to every rank.

    `init` is theta_init (every rank holds it); `sources[m](name)` returns policy m's tensor for the policies this
    rank's group trains (every rank of a group calls it, in the same order, so a ZeRO-3 gather inside it works).
    Rank 0 holds at most M tensors of one name at a time. Returns (theta_slerp, next theta_init, dots) on every
    rank, where dots[i, j] = <delta_i, delta_j> summed over tensors (for diagnostics).
    """
    M = d.topo.num_policies
    dots = torch.zeros(M, M, dtype=torch.float64)
    slerped: dict[str, torch.Tensor] = {}
    nxt: dict[str, torch.Tensor] = {}
    done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, base in init.items():
        key = merging.storage_key(base)
        if key in done:  # tied to an earlier tensor: share the result
            slerped[name], nxt[name] = done[key]
            continue
        local = {m: src(name) for m, src in sources.items()}
        if not base.is_floating_point():
            done[key] = (base, base)
            slerped[name], nxt[name] = base, base
            continue
        if d.is_main:
            tensors = []
            for m in range(M):
                if m in local:
                    tensors.append(local[m].detach().to("cpu", torch.float32))
                else:
                    buf = d.comm_tensor(torch.empty(base.shape, dtype=base.dtype))
                    tdist.recv(buf, src=d.topo.leader_of_policy(m))
                    tensors.append(buf.to("cpu", torch.float32))
            merging.accumulate_dots(dots, base, tensors)
            s, n = merging.merge_tensor(base, tensors, lam, eta)
            del tensors
        else:
            for m, t in local.items():
                if d.topo.leader_of_policy(m) == d.rank:
                    tdist.send(d.comm_tensor(t.detach().to(base.dtype).contiguous()), dst=0)
            s, n = torch.empty_like(base), torch.empty_like(base)
        if d.active:
            for t in (s, n):
                buf = d.comm_tensor(t.contiguous())
                tdist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))
        s, n = s.to(base.device), n.to(base.device)
        done[key] = (s, n)
        slerped[name], nxt[name] = s, n
    return slerped, nxt, d.broadcast_object(dots)


# ------------------------------------------------------------------------------ training engines for one policy
class GroupMPU:
    """What DeepSpeed's `mpu=` asks for: data parallelism over this policy's group only, no model parallelism."""

    def __init__(self, group, solo):
        self.group, self.solo = group, solo

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self):
        return tdist.get_rank(self.group)

    def get_data_parallel_world_size(self):
        return tdist.get_world_size(self.group)

    def get_model_parallel_group(self):
        return self.solo

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


class PolicyEngine:
    """Forward, backward + optimizer step, EMA and weight access for one policy on this rank's group.

    kind: 'plain' (a group of one rank), 'ddp' (DistributedDataParallel on the group's process group) or
    'deepspeed' (ZeRO-2/3 from a JSON file, data-parallel over the group through `GroupMPU`).
    """

    def __init__(self, d: Dist, model: torch.nn.Module, init_state: dict, tc, ds_config: str = "",
                 solo_groups: dict | None = None):
        self.d, self.tc = d, tc
        self.zero3 = False
        if ds_config:
            self.kind = "deepspeed"
            self._init_deepspeed(model, init_state, ds_config, solo_groups or {})
        else:
            model.load_state_dict(init_state)
            self.module = model
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
            if d.group is not None:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.kind = "ddp"
                self.forward_module = DDP(model, process_group=d.group,
                                          device_ids=[d.device.index] if d.device.type == "cuda" else None)
            else:
                self.kind = "plain"
                self.forward_module = model

    def _init_deepspeed(self, model, init_state, ds_config, solo_groups):
        import copy
        import json

        try:
            import deepspeed
        except ImportError:
            raise RuntimeError("train.deepspeed is set but DeepSpeed is not installed: pip install -e .[deepspeed]") from None
        with open(ds_config) as fh:
            conf = json.load(fh)
        g = len(self.d.topo.groups[self.d.topo.group_of(self.d.rank)])
        per_rank = self.tc.batch_size // g
        conf.update(train_micro_batch_size_per_gpu=per_rank, gradient_accumulation_steps=1,
                    train_batch_size=per_rank * g, gradient_clipping=self.tc.max_grad_norm)
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": self.tc.lr, "weight_decay": self.tc.weight_decay,
                                                         "torch_adam": True}}
        self.zero3 = conf.get("zero_optimization", {}).get("stage", 0) == 3
        module = copy.deepcopy(model)  # the plain model stays whole for evaluation
        module.load_state_dict(init_state)
        group = self.d.group
        if group is None:  # a one-rank group still needs a process group of its own for DeepSpeed
            group = solo_groups[self.d.rank]
        mpu = GroupMPU(group, solo_groups[self.d.rank])
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=conf, mpu=mpu,
                                                    model_parameters=[p for p in module.parameters()
                                                                      if p.requires_grad])
        self.module = self.engine.module
        self.forward_module = self.engine
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def step(self, loss: torch.Tensor) -> float:
        if self.kind == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm).item()
        self.opt.step()
        return norm

    def gathered(self, params):
        """Context in which ZeRO-3 partitioned parameters are whole (a no-op otherwise); collective in the group."""
        import contextlib

        if self.zero3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the policy's full weights (gathered under ZeRO-3)."""
        with self.gathered(self.module.parameters()):
            return merging.clone_state(self.module.state_dict(), "cpu")

    def close(self) -> None:
        if self.kind == "deepspeed":
            self.engine.destroy() if hasattr(self.engine, "destroy") else None
            del self.engine
        self.opt = None
