"""Core attention that can attend to keys/values kept from an earlier forward, without a mask.

An :class:`AttentionPlan` describes a forward whose tokens are ``head`` tokens at positions
``[0, head)`` followed by tail tokens at ``[m, m + tail)``, where the keys/values of the
positions in between, ``[head, m)``, were kept in a :class:`KVMemory` by an earlier forward:

* Local Optimization: the context pass (``no_grad``) runs the prefix and the context frames as
  plain causal attention and stores the context's keys/values; the window pass re-runs the
  prefix (head) with the window (tail), attending to the kept context;
* generation: the prompt is stored, then each new token (a tail of one) attends to the cache;
* several windows per context pass: the tail is several windows, each at its own positions
  ``[start_i, start_i + n_i)``; window ``i`` attends to the head, the kept context before
  ``start_i`` and causally to itself, never to another window (``AttentionPlan.windows``).

Keys are in position order: head, kept context, tail. Head queries attend causally to the head;
tail queries attend to every key, bottom-right aligned (a tail query sees the head, all the
kept context and the tail up to itself). No ``[queries, keys]`` mask tensor is ever built:

* :class:`SDPAttention` (the local spec) splits the tail's attention into mask-free blocks (the
  head and the kept context fully visible, the tail causal), runs each with the fused kernel
  and merges them exactly with their log-sum-exps; its backward runs each block's backward with
  the merged output and log-sum-exp (the scheme ring/context-parallel attention uses). Where
  that kernel is unavailable (CUDA, attention dropout) it makes one SDPA call over the keys in
  position order with ``causal_lower_right``, which CUDA's flash/efficient kernels take as is;
* the TransformerEngine core attention (``te_attention``) makes the same single call with
  ``causal_bottom_right``.

Under context parallelism the plan carries this rank's slice of the forward's tokens
(:class:`~localopt_plugin.model.context_parallel.SequenceShard`): :class:`SDPAttention` turns
its sequence-sharded queries/keys/values into head-sharded whole sequences by all-to-all, runs
the plan over them as one process would (keeping and reading only its heads' keys/values) and
turns the output back.

The plan rides in Megatron's ``packed_seq_params`` argument, which every transformer layer
passes to its core attention and which Megatron's activation recomputation (selective and
full) captures, so a recomputed forward runs the same plan: no module state is involved.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention.bias import causal_lower_right

from localopt_plugin.model.context_parallel import (
    SequenceShard,
    heads_to_sequence,
    replicate_groups,
    sequence_to_heads,
)
from localopt_plugin.model.kv_memory import KVMemory
from localopt_plugin.platform import cuda_available


@dataclass(eq=False)
class AttentionPlan(PackedSeqParams):
    """What every attention layer does in one forward (see the module docstring).

    head: this forward's first ``head`` tokens sit at positions ``[0, head)``; the rest (the
        tail) continue after the positions ``memory`` holds.
    memory: keys/values of earlier positions to attend to and/or to store into.
    store_from: store this forward's keys/values from token ``store_from`` on (detached).
    shard: under context parallelism, this rank's slice of the forward's tokens; ``head``,
        ``store_from`` and the memory's positions count the whole forward's tokens.
    padding: under sequence parallelism, rows after the forward's tokens (this context-parallel
        rank's, under both) to split them evenly over TP ranks: dropped before attention (and
        before the all-to-all), zero outputs.
    windows: when the tail holds several windows, ``(first position, length)`` of each, in
        the tail's order; empty: the tail is one run continuing after the memory.
    """

    qkv_format: str = "sbhd"  # Megatron reads it: this is not a packed (thd) batch
    head: int = 0
    memory: KVMemory | None = None
    store_from: int | None = None
    shard: SequenceShard | None = None
    padding: int = 0  # rows appended for sequence parallelism: not attended to, not kept
    windows: tuple[tuple[int, int], ...] = ()


def plan_for(positions: torch.Tensor, memory: KVMemory | None = None,
             store_from: int | None = None, shard: SequenceShard | None = None,
             windows: tuple[tuple[int, int], ...] = ()) -> AttentionPlan | None:
    """The plan for a forward over ``positions`` ([s], shared by the batch, the whole forward's
    under context parallelism), or None when plain causal attention computes the same
    (contiguous positions, nothing to attend to or keep, one rank). ``windows``: the tail is
    several windows (see :class:`AttentionPlan`)."""
    if windows:
        return _windows_plan(positions, memory, store_from, shard, tuple(windows))
    steps = positions.diff()
    if memory is None and store_from is None:
        if bool((steps == 1).all()):
            return None if shard is None else AttentionPlan(head=len(positions), shard=shard)
        raise ValueError("positions with gaps need the keys/values of the positions between "
                         "(a KVMemory)")
    if memory is None:
        raise ValueError("store_from needs a KVMemory to store into")
    starts_at_zero = positions == torch.arange(len(positions), device=positions.device)
    head = len(positions) if bool(starts_at_zero.all()) else int(starts_at_zero.long().argmin())
    tail = positions[head:]
    if len(tail):
        expected = max(head, memory.filled_end())
        if int(tail[0]) != expected or not bool((tail.diff() == 1).all()):
            raise ValueError(f"positions after the first {head} must run contiguously from "
                             f"{expected} (the first position the memory does not hold), got "
                             f"{tail.tolist()[:4]}...")
    return AttentionPlan(head=head, memory=memory, store_from=store_from, shard=shard)


def _windows_plan(positions: torch.Tensor, memory: KVMemory | None, store_from: int | None,
                  shard: SequenceShard | None,
                  windows: tuple[tuple[int, int], ...]) -> AttentionPlan:
    """:func:`plan_for` of a tail of several windows: each must sit at contiguous positions
    whose context (the positions between the head and its start) the memory holds."""
    if store_from is not None:
        raise ValueError("a forward of several windows keeps no keys/values (store_from)")
    head = len(positions) - sum(length for _, length in windows)
    kept_until = head if memory is None else max(head, memory.filled_end())
    expected = [torch.arange(head)]
    for start, length in windows:
        if length <= 0 or not head <= start <= kept_until:
            raise ValueError(f"a window of {length} tokens at position {start}: windows start "
                             f"between the head's end {head} and the memory's {kept_until}")
        expected.append(torch.arange(start, start + length))
    if not torch.equal(positions.cpu(), torch.cat(expected)):
        raise ValueError(f"positions do not run the head then the windows {windows}")
    return AttentionPlan(head=head, memory=memory, shard=shard, windows=windows)


def context_memory(model: torch.nn.Module, kept_from: int, context_end: int,
                   total_end: int) -> KVMemory:
    """A memory for context positions ``[kept_from, context_end)`` of a forward that will end
    at ``total_end``: with room for the other positions where the model's core attention wants
    every key in one tensor (single-call kernels), else exactly the context."""
    if wants_ordered_keys(model):
        return KVMemory(0, total_end, kept_from=kept_from)
    return KVMemory(kept_from, context_end)


def wants_ordered_keys(model: torch.nn.Module) -> bool:
    return any(getattr(m, "ordered_keys", False) for m in model.modules())


@dataclass
class WindowKeys:
    """The keys/values a tail attends to: head (visible), kept context (visible), tail (causal).

    Tensors are ``[s, b, groups, head_dim]``.
    """

    head: tuple[torch.Tensor, torch.Tensor]
    context: tuple[torch.Tensor, torch.Tensor]
    tail: tuple[torch.Tensor, torch.Tensor]
    memory: KVMemory | None
    layer: int
    tail_start: int
    shared: bool = False  # one of several windows reading the same memory

    def length(self) -> int:
        return self.tail[0].shape[0]

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """``(keys, values, causal)`` per non-empty block, in position order."""
        parts = ((*self.head, False), (*self.context, False), (*self.tail, True))
        return [p for p in parts if p[0].shape[0]]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys/values in position order as views of the memory's buffers, with this
        forward's head and tail written into their rows (autograd flows through the writes).
        A window that shares the memory with others gets a copy instead: its tail's rows hold
        the context of a later window, and autograd keeps every window's keys until backward."""
        if self.shared:
            return tuple(torch.cat([self.head[i], self.context[i], self.tail[i]])
                         for i in (0, 1))
        if self.memory.start != 0:
            raise RuntimeError("this memory holds only the context: create it with "
                               "context_memory() so that it has rows for every position")
        keys, values = self.memory.buffers(self.layer)
        head = self.head[0].shape[0]
        stop = self.tail_start + self.tail[0].shape[0]
        for buffer, own_head, own_tail in ((keys, self.head[0], self.tail[0]),
                                           (values, self.head[1], self.tail[1])):
            buffer[:head] = own_head
            buffer[self.tail_start:stop] = own_tail
        return keys[:stop], values[:stop]


def split_by_plan(layer: int, key: torch.Tensor, value: torch.Tensor,
                  plan: AttentionPlan) -> tuple[int, list[WindowKeys]]:
    """Store what the plan keeps; return the head length and the keys of each window of the
    tail (none without a tail, one unless the plan has several windows).

    key/value: ``[s, b, groups, head_dim]`` of this forward's tokens.
    """
    head, memory = plan.head, plan.memory
    if plan.windows:
        windows, offset = [], head
        for start, length in plan.windows:
            context = (memory.read(layer, head, start) if start > head else
                       (key[:0], value[:0]))
            tail = (key[offset:offset + length], value[offset:offset + length])
            windows.append(WindowKeys((key[:head], value[:head]), context, tail, memory,
                                      layer, start, shared=True))
            offset += length
        return head, windows
    tail_start = max(head, memory.filled_until(layer))
    if plan.store_from is not None:
        first = plan.store_from
        if first < head < key.shape[0] and tail_start != head:
            raise ValueError("a stored run must be contiguous in position")
        position = first if first < head else tail_start + first - head
        memory.store(layer, key[first:], value[first:], position)
    if key.shape[0] == head:
        return head, []
    context = memory.read(layer, head, tail_start) if tail_start > head else (
        key[:0], value[:0])
    return head, [WindowKeys((key[:head], value[:head]), context, (key[head:], value[head:]),
                             memory, layer, tail_start)]


class _MergedBlockAttention(torch.autograd.Function):
    """Attention of one query block over several key blocks, merged by log-sum-exp.

    Forward runs the fused (flash) CPU kernel per block and merges ``out = sum_i
    exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``. Backward runs each block's
    kernel backward with the merged ``out`` and ``lse``, which is exact: the kernel's backward
    recomputes ``P = exp(S - lse)`` and ``D = rowsum(dO * out)`` from them. Only the inputs,
    the merged output and the log-sum-exp are saved (no mask, no score matrix).
    Tensors are ``[b, heads (groups for keys), s, d]``.
    """

    @staticmethod
    def forward(ctx, scale: float, causal: tuple[bool, ...], query: torch.Tensor,
                *keys_values: torch.Tensor) -> torch.Tensor:
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        outs, lses = [], []
        for i, is_causal in enumerate(causal):
            out, lse = kernel(query, keys_values[2 * i], keys_values[2 * i + 1], 0.0,
                              is_causal, scale=scale)
            outs.append(out)
            lses.append(lse)
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        merged = sum(o.float() * torch.exp(block_lse - lse).unsqueeze(-1)
                     for o, block_lse in zip(outs, lses, strict=True))
        merged = merged.to(query.dtype)
        ctx.save_for_backward(query, merged, lse, *keys_values)
        ctx.scale, ctx.causal = scale, causal
        return merged

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, out, lse, *keys_values = ctx.saved_tensors
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        grad_query = None
        grads: list[torch.Tensor] = []
        for i, is_causal in enumerate(ctx.causal):
            dq, dk, dv = kernel(grad_out, query, keys_values[2 * i], keys_values[2 * i + 1],
                                out, lse, 0.0, is_causal, scale=ctx.scale)
            grad_query = dq.float() if grad_query is None else grad_query + dq.float()
            grads += [dk, dv]
        return None, None, grad_query.to(query.dtype), *grads


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """Megatron's ``[s, b, heads, d]`` as SDPA's ``[b, heads, s, d]`` (a view)."""
    return t.permute(1, 2, 0, 3)


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule on ``scaled_dot_product_attention`` that runs
    :class:`AttentionPlan` s (same constructor and forward contract as Megatron's)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_unused,
    ) -> None:
        super().__init__(config=config)
        self.context_parallel = config.context_parallel_size
        if self.context_parallel > 1 and cp_comm_type not in (None, "a2a"):
            raise ValueError(f"SDPAttention runs context parallelism as all-to-all (a2a), not "
                             f"{cp_comm_type!r}: use --cp-comm-type a2a")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("SDPAttention supports only the vanilla softmax")
        tp = pg_collection.tp.size() if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_world_size()
        )
        self.layer_number = max(1, layer_number)
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        if self.heads % self.context_parallel:
            raise ValueError(f"{self.heads} attention heads per tensor-parallel rank do not "
                             f"split over --context-parallel-size {self.context_parallel}")
        self.softmax_scale = softmax_scale if softmax_scale is not None else (
            config.kv_channels**-0.5)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        # Where the merged-block kernel cannot run, tails need every key in one tensor.
        self.ordered_keys = cuda_available() or self.dropout_p > 0

    def _sdpa(self, q, k, v, **kwargs) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout_p > 0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            return F.scaled_dot_product_attention(
                _bhsd(q), _bhsd(k), _bhsd(v), dropout_p=dropout_p, scale=self.softmax_scale,
                enable_gqa=k.shape[2] != q.shape[2], **kwargs)

    def _window(self, query: torch.Tensor, keys: WindowKeys) -> torch.Tensor:
        merged_kernel = not cuda_available() and not (self.training and self.dropout_p > 0)
        if merged_kernel:
            blocks = keys.blocks()
            causal = tuple(c for _, _, c in blocks)
            tensors = [_bhsd(t) for k, v, _ in blocks for t in (k, v)]
            return _MergedBlockAttention.apply(self.softmax_scale, causal, _bhsd(query),
                                               *tensors)
        k, v = keys.ordered()
        q_len, k_len = query.shape[0], k.shape[0]
        if q_len == k_len:
            return self._sdpa(query, k, v, is_causal=True)
        return self._sdpa(query, k, v, attn_mask=None if q_len == 1 else
                          causal_lower_right(q_len, k_len))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        plan = packed_seq_params if isinstance(packed_seq_params, AttentionPlan) else None
        shard = plan.shard if plan is not None else None
        if (shard is None) != (self.context_parallel == 1):
            raise RuntimeError(f"a forward under --context-parallel-size "
                               f"{self.context_parallel} needs a plan sharded over as many "
                               f"ranks (forward_hidden with a SequenceShard), got "
                               f"{'none' if shard is None else shard.world}")
        batch = query.shape[1]
        padding = plan.padding if plan is not None else 0
        if padding:  # sequence parallelism's rows after the tokens (see AttentionPlan)
            query, key, value = (t[:t.shape[0] - padding] for t in (query, key, value))
        if shard is not None:  # [s / cp, b, n, d] -> [s, b, n / cp, d]
            key, value = (replicate_groups(t, self.heads, shard.world) for t in (key, value))
            query, key, value = (sequence_to_heads(t, shard) for t in (query, key, value))
        if plan is not None and (plan.memory is not None or plan.store_from is not None
                                 or plan.windows):
            head, windows = split_by_plan(self.layer_number, key, value, plan)
            parts = []
            if head:
                parts.append(self._sdpa(query[:head], key[:head], value[:head],
                                        is_causal=True))
            offset = head
            for window in windows:
                parts.append(self._window(query[offset:offset + window.length()], window))
                offset += window.length()
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        elif packed_seq_params is not None and plan is None:
            raise ValueError("SDPAttention does not support packed (thd) sequences")
        elif attention_mask is not None:  # Megatron's masks are True where masked out
            out = self._sdpa(query, key, value, attn_mask=~attention_mask)
        else:
            out = self._sdpa(query, key, value, is_causal=True)
        out = out.permute(2, 0, 1, 3)  # [b, heads, s, dim] -> [s, b, heads, dim]
        if shard is not None:
            out = heads_to_sequence(out, shard)
        if padding:
            out = torch.cat([out, out.new_zeros((padding, *out.shape[1:]))])
        return out.reshape(out.shape[0], batch, -1)
