"""Everything distributed lives here: process groups, the streaming merger, sharded evaluation, failure exit.

Accelerate starts the ranks and picks the device (gloo on CPU, NCCL on GPUs); this module adds one process group
per policy (no gradient sync between policies), streams the M policies' tensors to rank 0 for SLERP + LITI and
broadcasts the result, and gathers evaluation records. With one process every function works without torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .topology import Topology, plan


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    topo: Topology
    group: object = None  # this rank's policy-group process group (None with one process)
    groups: tuple = ()  # every policy group's process group, in group order
    solo: object = None  # a one-rank process group of this rank (DeepSpeed's model-parallel group)
    phase: object = None  # every rank, gloo, with the phase timeout: barriers and objects at phase boundaries

    @property
    def group_size(self) -> int:
        return self.topo.group_size

    @property
    def group_rank(self) -> int:
        return self.topo.rank_in_group(self.rank)

    @property
    def is_leader(self) -> bool:
        """First rank of this rank's policy group: it sends the group's policies to the merger."""
        return self.group_rank == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # Barriers and objects run at phase boundaries (every rank trained its policies, rank 0 wrote a folder or a
    # checkpoint), where a rank may wait for a slower policy group or for rank 0's I/O far longer than a collective
    # of a training step should take: they go through `phase`, whose timeout is phase_timeout_s. The tensor
    # collectives of a step (the group's gradients, ZeRO-3 gathers, the merge's tensors) keep dist_timeout_s.
    def barrier(self) -> None:
        if self.active:
            tdist.barrier(group=self.phase)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.phase)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src, group=self.phase)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (every rank calls it at the same point: a step or phase boundary)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.phase)
        return bool(t.item() > 0)

    def group_all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a same-shaped tensor of every rank of this policy group along dim 0 (group-rank order)."""
        if self.group_size == 1:
            return t
        parts = [torch.empty_like(self.comm_tensor(t)) for _ in range(self.group_size)]
        tdist.all_gather(parts, self.comm_tensor(t).contiguous(), group=self.group)
        return torch.cat([p.to(t.device) for p in parts])

    def group_any(self, flag: bool) -> bool:
        """True if `flag` is true on any rank of this policy group (keeps a group's loops in step)."""
        if self.group_size == 1:
            return flag
        t = self.comm_tensor(torch.tensor([1.0 if flag else 0.0]))
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def group_of_rank0(self) -> bool:
        """Is this rank in policy group 0 (the merger's group)?"""
        return self.topo.group_of(self.rank) == 0

    def comm_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Tensors travel on the device of the backend (CUDA for NCCL, CPU for gloo)."""
        return t.to(self.device) if self.device.type == "cuda" else t.cpu()


def local_gpu() -> int | None:
    """This rank's own GPU (LOCAL_RANK, modulo the GPUs this process sees), made the current CUDA device; None
    without CUDA. Every CUDA query before the process group exists (`model.dtype=auto`, the memory plan) goes through
    it: a query on the default device would open a CUDA context on GPU 0 from every rank of the node (~0.5 GB each
    on the merger's GPU). `torch.cuda.is_available` and `device_count` open none."""
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if count < 1:
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % count
    torch.cuda.set_device(index)
    return index


NO_LIMIT_S = 365 * 24 * 3600.0  # phase_timeout_s = 0: a year stands for "no limit" (torch wants a timedelta)


def init(num_policies: int, timeout_s: float = 600.0, cpu: bool = False, need_process_group: bool = False,
         phase_timeout_s: float = 7200.0) -> Dist:
    """Join the ranks `accelerate launch` started, build the policy groups.

    One process needs no process group unless `need_process_group` (DeepSpeed): then a one-rank gloo/NCCL group is
    started on a free local port. `timeout_s` bounds the collectives of training (a dead or stuck rank of a group ends
    the job after it); `phase_timeout_s` (0 = no limit) the waits at phase boundaries (`Dist.phase`). A rank that
    dies ends the job sooner either way: the launcher stops the others, and gloo fails a wait on a closed peer.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    topo = plan(world, num_policies)  # fails before any process group exists
    tune_allocator()
    cpu = cpu or not torch.cuda.is_available()
    if cpu:
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world == 1 and not need_process_group:
        return Dist(0, 1, 0, 1, torch.device("cpu" if cpu else "cuda"), topo)
    if world == 1 and not tdist.is_initialized():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=timeout_s)
    if not tdist.is_initialized():  # our own init so the collective timeout applies; Accelerate then adopts it
        tdist.init_process_group("gloo" if cpu else "nccl", timeout=timeout)
    state = PartialState(cpu=cpu)  # cpu=True is what makes Accelerate see MULTI_CPU ranks
    rank, world = state.process_index, state.num_processes
    # every rank creates every group, in the same order: the policy groups, then a one-rank group per rank
    groups = tuple(tdist.new_group(list(ranks), timeout=timeout) for ranks in topo.groups)
    solos = [tdist.new_group([r], timeout=timeout) for r in range(world)]
    phase = tdist.new_group(list(range(world)), backend="gloo",
                            timeout=datetime.timedelta(seconds=phase_timeout_s or NO_LIMIT_S))
    device = torch.device("cpu") if cpu else state.device
    return Dist(rank, world, state.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                device, topo, groups[topo.group_of(rank)], groups, solos[rank], phase)


def shutdown() -> None:
    """This process's end of a job every rank finished: wait for the others, then destroy the process groups while the
    interpreter is whole. A process that exits with gloo groups alive can abort at interpreter exit, their worker
    threads outliving Python ("terminate called without an active exception", exit -6), and so fail a finished run.
    Only on success: a failing rank ends the job through fail_fast instead. No-op without a process group."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


HEAP_TRIM_THRESHOLD = (1 << 31) - 1  # free heap top kept up to ~2 GiB (mallopt takes an int); trim_allocator gives it back
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8  # glibc mallopt parameters
_GLIBC_TRIM, _GLIBC_MMAP_MAX = 128 << 10, 65536  # glibc's defaults for the trim threshold and the mmap count
_HEAP_MODE = False  # tune_allocator's default rule (every block from the heap) is the one in force in this process


def _mallopt():
    """glibc's mallopt (raises OSError / AttributeError off glibc)."""
    import ctypes

    return ctypes.CDLL("libc.so.6").mallopt


def tune_allocator(mmap_threshold: int | None = None, arenas: int = 0) -> bool:
    """Set glibc malloc for training: freed tensor memory is reused by the next step, and goes back to the OS at the
    phase boundaries (`trim_allocator`), so a rank's resident memory follows what it holds.

    Default (`mmap_threshold` None): every block comes from the heap (M_MMAP_MAX = 0) and the free top of the heap is
    kept (M_TRIM_THRESHOLD ~2 GiB) until the trainer trims at the end of each policy, merge and evaluation. A step
    allocates and frees the same large tensors every time (the bf16 casts of the weights, the LM-head and embedding
    gradients, the logits); mmapped (>= 32 MiB) or trimmed after each free, each one page-faulted in again on every
    step: a bf16 SmolLM2 RL step (vLLM rollouts) took 3.49 s with mmapped blocks >= 32 MiB, 2.95 s with those and a
    kept heap top, 2.64 s all from the heap, for +0.07 / +0.09 GB of peak RSS in the 1-process HF / vLLM runs of
    benchmarks/memory.py (4.03 -> 4.10, 5.36 -> 5.45 GB; 2-core Xeon, benchmarks/train_step.py --variants bf16-vllm).
    Older settings for the record: a 1 MiB threshold mmapped every activation too (153 M minor faults in one make
    demo, 3.76 s instead of 3.13 s per step).

    ZeRO-3 passes `mmap_threshold` = 256 KiB and `arenas` = 2: it gathers and frees each layer's weights on every
    forward, and with glibc's defaults the freed blocks (a few hundred KB to a few MB) stayed in the arena of whichever
    thread allocated them (a rank's RSS grew by ~1 GB over one evaluation of SmolLM2 while it held no more tensors);
    there blocks >= the threshold are mmapped and the heap top is trimmed as glibc does by default (the lower
    threshold costs ~5-8 % of a CPU training step). Without ZeRO-3 the arena cap is left off: with two arenas the
    training threads contend for them (a bf16 forward + backward + AdamW step of SmolLM2-135M took ~3.1 s instead of
    ~2.2 s on 2 CPU cores in a standalone timing loop, same peak RSS). Skipped when the user set MALLOC_MMAP_THRESHOLD_,
    MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_ or WARP_DIST_MALLOC=0, or off glibc.
    """
    if os.environ.get("WARP_DIST_MALLOC", "1") == "0" or any(k in os.environ for k in _ALLOCATOR_ENV):
        return False
    global _HEAP_MODE
    try:
        mallopt = _mallopt()
        if mmap_threshold is None:
            ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM, HEAP_TRIM_THRESHOLD))
        else:
            ok = (bool(mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX))
                  and bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM, _GLIBC_TRIM)))
        _HEAP_MODE = ok and mmap_threshold is None  # a later ZeRO-3 rule replaces dist.init's heap rule
        if arenas > 0:
            ok = ok and bool(mallopt(_M_ARENA_MAX, int(arenas)))
        return ok
    except (OSError, AttributeError):
        return False


MERGE_MMAP_THRESHOLD = 1 << 20


@contextlib.contextmanager
def mapped_blocks(threshold: int = MERGE_MMAP_THRESHOLD):
    """Inside: blocks >= `threshold` bytes are mmapped again, so each goes back to the OS when freed, and the free heap
    top is trimmed as glibc does by default; on exit the heap rule of `tune_allocator` is back (blocks mapped inside
    are still unmapped when freed later).

    For the merge: it allocates transient tensors of every parameter's size (received policies, the gathered
    theta_init, outputs), which the kept heap cannot reuse across sizes; all from the heap, rank 0's peak grew by up
    to ~1x the model over a SmolLM2 fp32 merge with M = 4 (benchmarks/merge.py, stream extra 519 MB; 77 MB with
    this, against the (M + 2) x largest-tensor bound of 679 MB). A no-op unless the heap rule is in force."""
    if not _HEAP_MODE:
        yield
        return
    mallopt = _mallopt()
    mallopt(_M_MMAP_THRESHOLD, int(threshold))
    mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    mallopt(_M_TRIM, _GLIBC_TRIM)  # the freed heap top goes back too
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, 0)
        mallopt(_M_TRIM, HEAP_TRIM_THRESHOLD)


def trim_allocator() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), e.g. after DeepSpeed copied every parameter
    partition into its flat buffers and freed the originals. A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def gather_full_at_zero(d: Dist, part: torch.Tensor, numel: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Rank 0 assembles a full tensor from the equal-sized slices held by the ranks of group 0 (every rank of group 0
    calls this; other ranks must not): fp32 when gathered, the slice's own dtype when group 0 is rank 0 alone.
    Returns the tensor on rank 0, None elsewhere."""
    if d.group_size == 1:  # no communication: the part as it is (merge_pass reads any float dtype)
        return part.view(shape) if d.is_main else None
    t = d.comm_tensor(part.float().contiguous())
    if not d.is_main:
        tdist.gather(t, None, dst=0, group=d.groups[0])
        return None
    # the slices land in the rows of one buffer: the full tensor is a view of it (no concatenated copy)
    flat = torch.empty(d.group_size, t.numel(), dtype=t.dtype, device=t.device)
    tdist.gather(t, list(flat.unbind(0)), dst=0, group=d.groups[0])
    return flat.view(-1)[:numel].cpu().view(shape)


def stream_merge(d: Dist, names: list[str], shapes: dict[str, tuple[int, ...]], init_part: Callable[[str], torch.Tensor],
                 sources: dict[int, TensorSource], merge_fn: Callable, on_slerp: Callable[[str, torch.Tensor], None],
                 on_main: Callable[..., None] | None = None) -> None:
    """The WARP merge, one parameter at a time, with rank 0 as the merger.

    For each name: rank 0 assembles theta_init (`init_part(name)` is this rank's flat slice; group 0's slices are
    gathered) and receives every policy's tensor from the leader of the group that trained it (`sources[m](name)`,
    called on leaders only; receiving the next tensor overlaps merging this one), computes
    `merge_fn(name, init, policies) -> (theta_slerp, next_init, info)`, calls
    `on_main(name, init, slerp, next_init, policies, info)` (files, diagnostics), and broadcasts theta_slerp (one
    broadcast per tensor). Every rank then gets `on_slerp(name, full)`
    to update its own slices (its theta_init -> LITI, its policy module -> theta_slerp). Rank 0's extra memory is the
    M received tensors, the gathered theta_init and the outputs of one parameter (plus one tensor in flight).
    """
    M = d.topo.num_policies
    leaders = {m: d.topo.leader_of_policy(m) for m in range(M)}
    mine = {m: src for m, src in sources.items() if leaders[m] == d.rank}

    def fetch_local(name, fp32: bool):
        """This rank's policies' tensors: fp32 to send (every receive buffer is fp32), as stored on rank 0 (merge_pass
        reads any float dtype chunk by chunk: no whole-tensor conversion)."""
        return {m: (src(name).to(torch.float32) if fp32 else src(name)).contiguous() for m, src in mine.items()}

    def post(name):
        """Start moving `name`'s policies to rank 0: (rank 0) receive handles + buffers, (leaders) send handles."""
        if not d.active:
            return None
        if d.is_main:
            bufs, works = {}, []
            for m in range(M):
                if leaders[m] != 0:
                    bufs[m] = d.comm_tensor(torch.empty(shapes[name], dtype=torch.float32))
                    works.append(tdist.irecv(bufs[m], src=leaders[m], tag=m))
            return bufs, works
        local = fetch_local(name, fp32=True)
        sent = {m: d.comm_tensor(t) for m, t in local.items()}
        return sent, [tdist.isend(t, dst=0, tag=m) for m, t in sent.items()]

    with mapped_blocks():  # the merge's transient tensors go back to the OS when freed
        pending = post(names[0]) if names else None
        for i, name in enumerate(names):
            current = pending
            pending = post(names[i + 1]) if i + 1 < names.__len__() else None
            shape = shapes[name]
            numel = int(torch.Size(shape).numel())
            init_full = gather_full_at_zero(d, init_part(name), numel, shape) if d.group_of_rank0() else None
            if d.is_main:
                local = fetch_local(name, fp32=False)
                if current is not None:
                    bufs, works = current
                    for w in works:
                        w.wait()
                    local.update({m: b.to("cpu") for m, b in bufs.items()})
                policies = [local[m] for m in range(M)]
                slerp, nxt, info = merge_fn(name, init_full, policies)
                if on_main is not None:
                    on_main(name, init_full, slerp, nxt, policies, info)
                del policies, local, nxt
                # broadcast buffers are fp32 on every rank; alone, theta_slerp stays in merge_fn's dtype (no copy)
                out = slerp.to(torch.float32).contiguous() if d.active else slerp
            else:
                if current is not None:
                    for w in current[1]:
                        w.wait()
                out = torch.empty(shape, dtype=torch.float32)
            if d.active:
                buf = d.comm_tensor(out)
                tdist.broadcast(buf, src=0)
                out = buf.to("cpu") if buf is not out else out
            on_slerp(name, out)
            del out, init_full


# ------------------------------------------------------------------------------ DeepSpeed's view of a policy group
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
