"""Long videos are judged in the paper's clip length: 17-frame segments, consecutive ones
sharing a frame (65 frames: 4 segments). In the video tokenizer's latent frames (1 + 4k frames
become 1 + k) a segment is 5 latent frames, consecutive ones sharing one."""

from __future__ import annotations

FRAMES, FRAME_STRIDE = 17, 16
LATENT_FRAMES, LATENT_STRIDE = 5, 4


def segments(count: int, length: int = FRAMES, stride: int = FRAME_STRIDE,
             ) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each segment of ``count`` frames (none when ``count`` is at most
    one segment long); the last one ends at the last frame."""
    if count <= length:
        return []
    starts = list(range(0, count - length + 1, stride))
    if starts[-1] + length < count:
        starts.append(count - length)
    return [(s, s + length) for s in starts]
