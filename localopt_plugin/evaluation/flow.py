"""Temporal consistency: the flow-warping error between consecutive frames.

Why: error accumulation in autoregressive video shows up as flicker and drifting content; a
frame that follows from its predecessor by motion is well predicted by warping the predecessor
along the optical flow. For each pair ``(t, t+1)`` the dense Farneback flow from ``t+1`` to
``t`` (grayscale) samples frame ``t`` at the matched positions (``cv2.remap``), and the error
is the mean absolute difference to frame ``t+1`` (intensities in [0, 1]), over the pixels whose
match lies inside the frame. The video's score is the mean over pairs: lower is smoother.
"""

from __future__ import annotations

import numpy as np

# OpenCV's reference Farneback settings (the optical-flow tutorial's values).
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
             "poly_sigma": 1.2, "flags": 0}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("flow consistency needs OpenCV: pip install "
                          "opencv-python-headless") from None
    return cv2


def warping_errors(frames: np.ndarray) -> list[float]:
    """The warping error of every consecutive pair of uint8 RGB frames ``[T, H, W, 3]``."""
    cv2 = _cv2()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
        raise ValueError(f"need uint8 [T >= 2, H, W, 3] frames, got {frames.dtype} "
                         f"{list(frames.shape)}")
    h, w = frames.shape[1:3]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    errors = []
    for t in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, **FARNEBACK)
        map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
        warped = cv2.remap(frames[t], map_x, map_y, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        diff = np.abs(warped.astype(np.float32) - frames[t + 1].astype(np.float32)) / 255.0
        errors.append(float(diff[inside].mean()) if inside.any() else float(diff.mean()))
    return errors


def flow_warping_error(frames: np.ndarray) -> float:
    """Mean warping error over consecutive pairs (lower: more temporally consistent)."""
    return float(np.mean(warping_errors(frames)))


def real_flow_error(background: str, tokenizer: str | None, count: int = 24, frames: int = 17,
                    size: int = 64) -> float:
    """The mean warping error of ``count`` real procedural clips of ``background`` (the
    classifier report's control clips; through ``tokenizer``'s encode/decode when given, as
    generated videos are): the value a generator of real-looking motion scores; lower is not
    better than this."""
    from localopt_plugin.evaluation.classifier import CONTROL_SEED_START, procedural_clips

    clips, _ = procedural_clips(count, CONTROL_SEED_START, frames, size, background)
    if tokenizer:
        from localopt_plugin.tokenizers import build_tokenizer

        codec = build_tokenizer(tokenizer)
        clips = [codec.decode(codec.encode(clip)) for clip in clips]
    return float(np.mean([flow_warping_error(clip) for clip in clips]))
