"""Which rank trains which policy (pure: integers in, a plan out).

W ranks, M policies:
- W = M * G (G >= 1): M policy groups of G consecutive ranks; a group trains one policy data-parallel.
- W < M with M % W == 0: every rank is its own group and trains M / W policies one after the other.
Anything else is an error raised before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    world_size: int
    num_policies: int
    groups: tuple[tuple[int, ...], ...]  # ranks of each group, in group order
    group_policies: tuple[tuple[int, ...], ...]  # policies each group trains, in order

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    def group_of(self, rank: int) -> int:
        for g, ranks in enumerate(self.groups):
            if rank in ranks:
                return g
        raise TopologyError(f"rank {rank} is outside world size {self.world_size}")

    def policies_of(self, rank: int) -> tuple[int, ...]:
        return self.group_policies[self.group_of(rank)]

    def leader_of_policy(self, policy: int) -> int:
        """The rank that holds policy `policy`'s weights for the merger (first rank of its group)."""
        for ranks, pols in zip(self.groups, self.group_policies, strict=True):
            if policy in pols:
                return ranks[0]
        raise TopologyError(f"policy {policy} is outside M={self.num_policies}")

    def rank_in_group(self, rank: int) -> int:
        return self.groups[self.group_of(rank)].index(rank)


def plan(world_size: int, num_policies: int) -> Topology:
    W, M = world_size, num_policies
    if W < 1 or M < 1:
        raise TopologyError(f"world size ({W}) and train.policies ({M}) must be >= 1")
    if W >= M:
        if W % M:
            raise TopologyError(f"{W} ranks cannot be split into train.policies={M} equal groups: use a world size "
                                f"that is a multiple of M, or fewer ranks than M with M divisible by them")
        g = W // M
        groups = tuple(tuple(range(i * g, (i + 1) * g)) for i in range(M))
        return Topology(W, M, groups, tuple((i,) for i in range(M)))
    if M % W:
        raise TopologyError(f"train.policies={M} is not divisible by the {W} ranks: with fewer ranks than policies "
                            "each rank trains M / W policies, so M must be a multiple of W")
    k = M // W
    return Topology(W, M, tuple((r,) for r in range(W)), tuple(tuple(range(r * k, (r + 1) * k)) for r in range(W)))


TENSOR_PARALLEL = ("auto", "group", "1")  # rollout.vllm.tensor_parallel choices


def tensor_parallel_size(choice: str, on_cuda: bool, group_size: int) -> int:
    """Ranks one vLLM engine spans (`rollout.vllm.tensor_parallel`): "group" = the policy group's G ranks, one engine
    per group; "1" = an engine of its own on every rank; "auto" = "group" on CUDA, "1" on CPU (where a rank's whole
    engine is cheap and TP only adds a collective per layer)."""
    if choice not in TENSOR_PARALLEL:
        raise TopologyError(f"rollout.vllm.tensor_parallel={choice!r} is invalid: allowed {' | '.join(TENSOR_PARALLEL)}")
    if choice == "1" or group_size == 1:
        return 1
    return group_size if (choice == "group" or on_cuda) else 1


def tensor_parallel_problem(tp: int, heads: int, kv_heads: int, local_world_size: int) -> str:
    """Why a tensor-parallel engine of `tp` ranks cannot run this model on this node layout ("" = it can): vLLM splits
    the attention heads over the ranks (and the KV heads, or replicates them when there are fewer than ranks), and
    its engine must sit on one node (consecutive ranks of `local_world_size` per node)."""
    if tp <= 1:
        return ""
    if heads % tp:
        return f"its {heads} attention heads do not split over {tp} ranks"
    if kv_heads >= tp and kv_heads % tp:
        return f"its {kv_heads} KV heads do not split over {tp} ranks"
    if kv_heads < tp and tp % kv_heads:
        return f"its {kv_heads} KV heads cannot be replicated evenly over {tp} ranks"
    if tp > local_world_size or local_world_size % tp:
        return f"a group of {tp} ranks does not fit the {local_world_size} ranks of a node"
    return ""
