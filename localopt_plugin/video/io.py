"""Reading and writing videos: mp4 through PyAV's bundled FFmpeg, GIF and PNG through Pillow.

Why: decoded tokens must be looked at (samples, reconstructions) and real mp4 files read,
with no system FFmpeg. All frames are uint8 ``[T, H, W, 3]`` RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} "
                         f"{list(frames.shape)}")
    return frames


def mp4_codec() -> str:
    """The best mp4 video encoder in this PyAV build: H.264 (libx264) if present, else MPEG-4."""
    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        return name
    raise RuntimeError("this PyAV build has neither an H.264 nor an MPEG-4 encoder")


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, quality: int = 18) -> Path:
    """Encode ``frames`` as yuv420p mp4; ``quality`` is x264's CRF (lower is better).

    yuv420p subsamples chroma 2x2, so height and width must be even.
    """
    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = mp4_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(quality)}
        else:  # MPEG-4 part 2: a fixed quantiser scale (2 is near-transparent)
            stream.codec_context.qscale = 2
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Decode the first video stream (all frames, or the first ``max_frames``) to uint8 RGB."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return np.stack(frames)


def write_gif(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """An endlessly looping GIF (256-colour palette per frame, so expect some banding)."""
    frames = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps), optimize=False, disposal=1)
    return path


def frame_grid(videos: Sequence[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """One row per video, its frames side by side, ``pad`` pixels between cells.

    Shorter videos leave their remaining cells at ``pad_value``; every frame must have the
    size of the first video's frames.
    """
    videos = [_check_frames(v) for v in videos]
    if not videos:
        raise ValueError("need at least one video")
    h, w = videos[0].shape[1:3]
    if any(v.shape[1:3] != (h, w) for v in videos):
        raise ValueError("all videos must have the same frame size")
    cols = max(len(v) for v in videos)
    grid = np.full((len(videos) * (h + pad) - pad, cols * (w + pad) - pad, 3), pad_value,
                   dtype=np.uint8)
    for r, video in enumerate(videos):
        for c, frame in enumerate(video):
            grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = frame
    return grid


def save_grid_png(path: str | Path, videos: Sequence[np.ndarray], pad: int = 2) -> Path:
    """Save ``frame_grid(videos)`` as PNG (e.g. originals and reconstructions as rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame_grid(videos, pad)).save(path)
    return path
