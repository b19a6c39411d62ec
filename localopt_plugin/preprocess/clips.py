"""Clips of a video: decode with PyAV, pick frames by stride or target fps, resize + center crop.

Why sequential decoding: training clips come from short videos, and a seek-free decode is exact
(the same frames on every run and every machine). With one clip per video decoding stops after
the first clip; with several, the whole video is decoded to learn its length, keeping only
frames already shrunk to the output resolution. Bad files raise ``RejectedVideo`` with a
reason, never anything else.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from localopt_plugin.data.procedural import render_video
from localopt_plugin.data.recall import render_recall_video
from localopt_plugin.preprocess.inputs import VideoInput

PROCEDURAL_FPS = 8.0  # the nominal frame rate of procedural videos


class RejectedVideo(Exception):
    """A video that yields no clip; the message is the reason written to the rejects file."""


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut: ``frames`` per clip, every ``stride``-th frame or resampled to ``fps``."""

    frames: int = 17
    stride: int = 1
    fps: float | None = None
    clips_per_video: int = 1
    height: int = 64
    width: int = 64

    def step(self, source_fps: float) -> float:
        """Source frames between consecutive clip frames."""
        return source_fps / self.fps if self.fps else float(self.stride)

    def indices(self, start: int, source_fps: float) -> list[int]:
        step = self.step(source_fps)
        return [start + math.floor(k * step + 0.5) for k in range(self.frames)]

    def span(self, source_fps: float) -> int:
        """Source frames one clip covers."""
        return self.indices(0, source_fps)[-1] + 1

    def starts(self, total: int, source_fps: float) -> list[int]:
        """First frames of the clips: ``clips_per_video`` evenly spaced, duplicates dropped."""
        last = total - self.span(source_fps)
        if last < 0:
            return []
        points = np.linspace(0, last, self.clips_per_video) if self.clips_per_video > 1 else [0]
        return sorted({math.floor(p + 0.5) for p in points})


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 [frames, height, width, 3]
    indices: list[int]  # source frame indices
    start: float  # seconds
    fps: float  # frame rate of the clip


def resize_center_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale so the frame covers ``height x width`` (bicubic), then cut out the centre."""
    w, h = image.size
    if (w, h) != (width, height):
        scale = max(width / w, height / h)
        size = (max(width, math.floor(w * scale + 0.5)), max(height, math.floor(h * scale + 0.5)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image.convert("RGB"))


def _decode_file(path: str, spec: ClipSpec) -> tuple[np.ndarray, float]:
    """Resized frames (all, or just the first clip's) and the source frame rate."""
    if not os.path.isfile(path):
        raise RejectedVideo("missing file")
    if os.path.getsize(path) == 0:
        raise RejectedVideo("empty file")
    import av  # PyAV only where a file is decoded: procedural videos need no FFmpeg

    try:
        container = av.open(path)
    except Exception as err:  # PyAV raises many FFmpeg error types for unreadable input
        raise RejectedVideo(f"undecodable: {type(err).__name__}: {err}") from None
    with container:
        if not container.streams.video:
            raise RejectedVideo("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise RejectedVideo("unknown frame rate")
        fps = float(rate)
        limit = spec.span(fps) if spec.clips_per_video == 1 else None
        frames: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                frames.append(resize_center_crop(frame.to_image(), spec.height, spec.width))
                if limit is not None and len(frames) >= limit:
                    break
        except Exception as err:
            raise RejectedVideo(f"truncated or corrupt: decoding failed after {len(frames)} "
                                f"frames: {type(err).__name__}: {err}") from None
    if not frames:
        raise RejectedVideo("no decodable frames")
    return np.stack(frames), fps


def _render(video: VideoInput, spec: ClipSpec) -> tuple[np.ndarray, float]:
    """A procedural video long enough for ``clips_per_video`` back-to-back clips."""
    cls, seed = video.procedural
    total = spec.clips_per_video * spec.span(PROCEDURAL_FPS)
    size = max(spec.height, spec.width)
    if video.recall is not None:
        frames = render_recall_video(cls, seed, total, size, video.recall)
    else:
        frames = render_video(cls, seed, total, size=size, background=video.background)
    top, left = (frames.shape[1] - spec.height) // 2, (frames.shape[2] - spec.width) // 2
    return frames[:, top:top + spec.height, left:left + spec.width], PROCEDURAL_FPS


def load_clips(video: VideoInput, spec: ClipSpec) -> list[Clip]:
    """The video's clips in order, or ``RejectedVideo`` saying why it has none."""
    frames, fps = _render(video, spec) if video.procedural else _decode_file(video.source, spec)
    starts = spec.starts(len(frames), fps)
    if not starts:
        raise RejectedVideo(f"too short: {len(frames)} frames, a clip needs {spec.span(fps)}")
    clips = []
    for start in starts:
        indices = spec.indices(start, fps)
        clips.append(Clip(frames[indices], indices, start / fps, fps / spec.step(fps)))
    return clips
