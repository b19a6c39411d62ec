"""Independent references for the preprocessing tests: clip decoding and dataset snapshots."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import av
import numpy as np
from PIL import Image


def reference_clips(path: str | Path, frames: int, stride: int, clips: int,
                    size: int) -> list[tuple[list[int], np.ndarray]]:
    """``(source indices, uint8 clip)`` decoded frame by frame with PyAV and resized with PIL
    from the full-resolution RGB array: the tool's rules restated, not its code."""
    span = (frames - 1) * stride + 1
    with av.open(str(path)) as container:  # pass 1: the length
        total = sum(1 for _ in container.decode(video=0))
    starts = sorted({math.floor(x + 0.5) for x in np.linspace(0, total - span, clips)})
    wanted = [[start + k * stride for k in range(frames)] for start in starts]
    needed = {i for indices in wanted for i in indices}
    kept = {}
    with av.open(str(path)) as container:  # pass 2: the frames the clips use
        for i, frame in enumerate(container.decode(video=0)):
            if i in needed:
                kept[i] = _shrink(frame.to_ndarray(format="rgb24"), size)
    return [(indices, np.stack([kept[i] for i in indices])) for indices in wanted]


def _shrink(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, math.floor(w * scale + 0.5)), max(size, math.floor(h * scale + 0.5))
    image = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def tar_samples(path: str | Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} read with the standard library's tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            out.setdefault(key, {})[field] = tar.extractfile(member).read()
    return out


def snapshot(directory: str | Path) -> dict[str, object]:
    """Everything a dataset directory holds for training: shard bytes, manifest (its ``ranks``
    entry apart), rejects, caption model; plus leftovers that must not be there."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    return {
        "shards": {p.name: p.read_bytes() for p in sorted(directory.glob("*.tar"))},
        "manifest": {k: v for k, v in manifest.items() if k != "ranks"},
        "ranks": manifest["ranks"],
        "rejects": (directory / "rejects.jsonl").read_bytes(),
        "captions": [p.read_bytes() for p in directory.glob("captions.model")],
        "leftovers": sorted(p.name for p in directory.glob(".*.tmp")),
    }
