"""Keys/values kept from one forward for a later one: the Local Opt. context and the KV cache.

Each attention layer gets one preallocated buffer per tensor over a range of absolute positions
``[start, end)``, in Megatron's ``[s, b, groups, head_dim]`` layout, written as forwards store
into it. Nothing is ever concatenated: a later forward reads views of the buffer, so the kept
context costs its own size once, whatever the number of reads.
"""

from __future__ import annotations

import torch


class KVMemory:
    """Per-layer key/value buffers for positions ``[start, end)``, filled in position order
    from ``kept_from`` (default ``start``; rows before it are free for the attention's use)."""

    def __init__(self, start: int, end: int, kept_from: int | None = None) -> None:
        kept_from = start if kept_from is None else kept_from
        if not 0 <= start <= kept_from <= end:
            raise ValueError(f"invalid position range [{start}, {end}) kept from {kept_from}")
        self.start, self.end, self.kept_from = start, end, kept_from
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled: dict[int, int] = {}  # per layer: positions [kept_from, filled) are kept

    def filled_until(self, layer: int) -> int:
        return self.filled.get(layer, self.kept_from)

    def filled_end(self) -> int:
        """The first position not kept (the same in every layer between forwards)."""
        return max(self.filled.values(), default=self.kept_from)

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor, position: int) -> None:
        """Keep (detached) keys/values ``[s, b, g, d]`` of positions ``[position, +s)``."""
        if position != self.filled_until(layer):
            raise ValueError(f"layer {layer}: positions must be stored in order; expected "
                             f"{self.filled_until(layer)}, got {position}")
        stop = position + key.shape[0]
        if stop > self.end:
            raise ValueError(f"positions up to {stop} exceed the memory's end {self.end}")
        if layer not in self.layers:
            shape = (self.end - self.start, *key.shape[1:])
            self.layers[layer] = (key.new_empty(shape), value.new_empty(shape))
        keys, values = self.layers[layer]
        with torch.no_grad():
            keys[position - self.start:stop - self.start].copy_(key)
            values[position - self.start:stop - self.start].copy_(value)
        self.filled[layer] = stop

    def read(self, layer: int, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the kept keys/values of positions ``[first, stop)`` (no copy)."""
        if not self.kept_from <= first <= stop <= self.filled_until(layer):
            raise ValueError(f"layer {layer} holds positions [{self.kept_from}, "
                             f"{self.filled_until(layer)}), not [{first}, {stop})")
        keys, values = self.layers[layer]
        return (keys[first - self.start:stop - self.start],
                values[first - self.start:stop - self.start])

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers of a layer, for attention that writes a forward's own keys into
        the free rows so that all keys lie in one tensor in position order."""
        return self.layers[layer]

    def num_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers.values())
