"""Context parallelism of the planned core attention: head-sharded ("Ulysses") all-to-all.

A forward's tokens are split along the sequence over the context-parallel (CP) ranks in
contiguous, near-equal slices (:class:`SequenceShard`); embeddings, norms, MLPs and the output
layer run on this rank's slice only. Around attention one all-to-all turns ``[s / cp, b, heads,
d]`` into ``[s, b, heads / cp, d]`` (:func:`sequence_to_heads`) and another turns the output
back (:func:`heads_to_sequence`), so each rank attends over the whole sequence for its share of
the heads with the same mask-free kernels as one process. Why this scheme fits Local Opt.: the
context pass keeps, per layer, the keys/values of this rank's heads over the whole context
(1/cp of the kept memory), and the window's queries attend to them with no communication at all;
ring (p2p) attention would have to pass the kept context around the ring in every window pass.

With fewer query groups than CP ranks, :func:`replicate_groups` repeats each key/value group
until the groups split evenly: the kept context and the key/value all-to-all then cost that
factor more (e.g. 2 groups over 4 ranks: each rank keeps 1 replicated group instead of half of
one, 2x the ideal 1/cp).

:func:`rows_after` is the halo exchange of sequence-sharded states (ReCo's pairs that straddle
two shards). All exchanges are autograd functions whose backward is the reverse exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


def split_sizes(length: int, world: int) -> tuple[int, ...]:
    """Contiguous near-equal slices: the first ``length % world`` ranks hold one row more."""
    base, extra = divmod(length, world)
    return tuple(base + (rank < extra) for rank in range(world))


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """This rank's contiguous slice ``[start, stop)`` of a sequence split over ``group``.

    sizes: every rank's number of rows, in rank order (rank r holds the rows after rank r-1's).
    """

    group: dist.ProcessGroup
    sizes: tuple[int, ...]
    rank: int

    @classmethod
    def split(cls, length: int, group: dist.ProcessGroup) -> SequenceShard:
        """Near-equal slices (:func:`split_sizes`) over the group's ranks."""
        return cls(group, split_sizes(length, dist.get_world_size(group)),
                   dist.get_rank(group))

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]

    @property
    def stop(self) -> int:
        return self.bounds(self.rank)[1]

    def bounds(self, rank: int) -> tuple[int, int]:
        first = sum(self.sizes[:rank])
        return first, first + self.sizes[rank]

    def local(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows of a whole-sequence tensor (a view)."""
        return tensor.narrow(dim, self.start, self.sizes[self.rank])

    def between(self, first: int, stop: int | None = None) -> SequenceShard:
        """The shard of rows ``[first, stop)`` of this sequence (each rank's part of them)."""
        stop = self.total if stop is None else stop
        sizes = tuple(max(0, min(hi, stop) - max(lo, first))
                      for lo, hi in map(self.bounds, range(self.world)))
        return SequenceShard(self.group, sizes, self.rank)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """A detached tensor summed over the group (for logging partial sums)."""
        value = value.detach().clone()
        dist.all_reduce(value, group=self.group)
        return value


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with per-rank row counts; backward sends the
    gradients back the same way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send: list[int], receive: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _exchange(tensor, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(tensor: torch.Tensor, send: list[int], receive: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    out = tensor.new_empty((sum(receive), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=receive,
                           input_split_sizes=send, group=group)
    return out


def sequence_to_heads(tensor: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """``[s_r, b, n, d]`` (this rank's rows, all n heads) -> ``[s, b, n / cp, d]`` (every row,
    this rank's heads: rank r gets heads ``[r n / cp, (r + 1) n / cp)``)."""
    rows, batch, heads, dim = tensor.shape
    cp = shard.world
    if heads % cp:
        raise ValueError(f"{heads} heads do not split over {cp} context-parallel ranks")
    # rank-major blocks of heads: block j goes to rank j
    blocks = tensor.reshape(rows, batch, cp, heads // cp, dim).permute(2, 0, 1, 3, 4)
    blocks = blocks.reshape(cp * rows, batch, heads // cp, dim)
    return _AllToAll.apply(blocks, [rows] * cp, list(shard.sizes), shard.group)


def heads_to_sequence(tensor: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`: ``[s, b, n / cp, d]`` -> ``[s_r, b, n, d]``."""
    _, batch, heads, dim = tensor.shape
    cp, rows = shard.world, shard.sizes[shard.rank]
    received = _AllToAll.apply(tensor, list(shard.sizes), [rows] * cp, shard.group)
    return received.reshape(cp, rows, batch, heads, dim).permute(1, 2, 0, 3, 4).reshape(
        rows, batch, cp * heads, dim)


def rows_after(tensor: torch.Tensor, shard: SequenceShard, count: int) -> torch.Tensor:
    """The ``count`` rows that follow this rank's slice (fewer at the sequence's end), gathered
    from the later ranks: the halo a pair ``(i, i + count)`` needs across shards."""
    def wanted(rank: int) -> tuple[int, int]:  # the rows after a rank's slice
        stop = shard.bounds(rank)[1]
        return stop, min(stop + count, shard.total)

    def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        lo = max(a[0], b[0])
        return lo, max(lo, min(a[1], b[1]))

    mine = shard.bounds(shard.rank)
    ranks = range(shard.world)
    outgoing = [overlap(mine, wanted(rank)) for rank in ranks]  # in position order
    incoming = [overlap(shard.bounds(rank), wanted(shard.rank)) for rank in ranks]
    rows = torch.cat([tensor[lo - mine[0]:hi - mine[0]] for lo, hi in outgoing])
    return _AllToAll.apply(rows, [hi - lo for lo, hi in outgoing],
                           [hi - lo for lo, hi in incoming], shard.group)


def replicate_groups(key: torch.Tensor, heads: int, cp: int) -> torch.Tensor:
    """Key/value groups ``[s, b, g, d]`` repeated (each group r times, adjacent) so that
    ``g r`` splits over ``cp`` ranks and divides ``heads``: query head i still meets its group."""
    groups = key.shape[2]
    if groups % cp == 0:
        return key
    repeat = cp // math.gcd(groups, cp)
    if heads % (groups * repeat):
        raise ValueError(f"{groups} key/value groups cannot be replicated to split over {cp} "
                         f"context-parallel ranks with {heads} query heads")
    return key.repeat_interleave(repeat, dim=2)


def context_parallel_group(model: torch.nn.Module) -> dist.ProcessGroup | None:
    """The group a model's forwards are split over (its config's context-parallel size), or
    None without context parallelism."""
    if model.config.context_parallel_size == 1:
        return None
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    if dist.get_world_size(group) != model.config.context_parallel_size:
        raise RuntimeError(f"the model is configured for --context-parallel-size "
                           f"{model.config.context_parallel_size} but Megatron's context-"
                           f"parallel group has {dist.get_world_size(group)} ranks")
    return group
