"""Procedural class-conditional RGB videos: a real pixel data set that ships as code.

Why: the tokenizer, the shard-preprocessing tool and the main job need videos with learnable
structure and class labels, but no data set can be downloaded here. Every video is a function of
``(class_id, seed)`` only, so any split is reproducible from its seed list and nothing is stored.

A video shows one anti-aliased shape moving over a textured background:

* class ``= shape * len(MOTIONS) + motion``: 3 shapes (circle, square, triangle) x 4 motions
  (horizontal bounce, vertical bounce, orbit, pulse) = 12 classes; ``class_name(i)`` gives e.g.
  ``"triangle-orbit"``.
* the seed picks everything else: background gradient colours and direction, two sinusoidal
  texture layers drifting slowly (a gentle camera pan), the shape's colour, size, speed, phase
  and rotation.
* ``background="calm"`` is an easier variant of the same classes: the gradient without the
  drifting texture, larger shapes that start near the centre (what a small model learns to draw
  within minutes).
* ``background="plain"`` draws the calm video's geometry (same seed: same size and motion) with
  upright shapes in two fixed colours on a flat ground, colours that the embedded tokenizer
  codes with one id each (a clip uses about 130 token ids).
* ``background="simple"`` draws plain's colours with few trajectories: a fixed size, each
  motion starting from its own place (horizontal at the left or right wall, vertical at the top
  or bottom wall, orbit on a diagonal, pulse in the centre) and moving inwards at 2 or 3 pixels
  per frame (at 64x64: whole token-grid steps per latent frame), so the first frame shows the
  class and a seed picks one of 4 clips of it (48 distinct clips, 136 fsq-video ids in all:
  the ``fsq-video-simple`` tokenizer keeps just those): the main job's data (docs/RESULTS.md).

Motions are periodic in time, so any number of frames works, and a shorter clip is a prefix of
a longer one. Rendering is vectorised over ``[T, H, W]`` in numpy (a 17-frame 64x64 clip takes
about 10 ms on one CPU core). Geometry is in units of the frame size, so ``size`` rescales the
same video.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("textured", "calm", "plain", "simple")
PLAIN_GROUND, PLAIN_SHAPE = (0.3, 0.2, 0.5), (0.9, 0.9, 0.3)  # the plain variant's colours
MOTIONS = ("horizontal", "vertical", "orbit", "pulse")
NUM_CLASSES = len(SHAPES) * len(MOTIONS)


def class_name(class_id: int) -> str:
    """``"<shape>-<motion>"`` for a class id in ``[0, NUM_CLASSES)``."""
    shape, motion = split_class(class_id)
    return f"{SHAPES[shape]}-{MOTIONS[motion]}"


def split_class(class_id: int) -> tuple[int, int]:
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id {class_id} outside [0, {NUM_CLASSES})")
    return divmod(int(class_id), len(MOTIONS))


def _bounce(start: float, velocity: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position moving at ``velocity`` and reflecting off ``lo``/``hi`` (a triangle wave)."""
    span = hi - lo
    s = np.mod(start - lo + velocity * t, 2 * span)
    return lo + np.where(s < span, s, 2 * span - s)


def _background(rng: np.random.Generator, t: np.ndarray, u: np.ndarray,
                v: np.ndarray, textured: bool = True) -> np.ndarray:
    """A colour gradient plus (textured) two drifting sinusoid layers: ``[T, H, W, 3]``."""
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (u - 0.5) * np.cos(angle) + (v - 0.5) * np.sin(angle), 0, 1)
    image = c0 + (c1 - c0) * ramp[None, :, :, None]  # [1, H, W, 3]
    if not textured:
        return np.broadcast_to(image, (len(t), *image.shape[1:]))
    for _ in range(2):
        freq = rng.uniform(1.0, 4.0)  # cycles per frame width
        direction = rng.uniform(0, 2 * np.pi)
        drift = rng.uniform(-0.05, 0.05)  # cycles per frame: the slow pan
        colour = rng.uniform(-0.12, 0.12, size=3)
        phase = 2 * np.pi * (freq * (u * np.cos(direction) + v * np.sin(direction))[None]
                             + drift * t[:, None, None] + rng.uniform(0, 1))
        image = image + np.sin(phase)[..., None] * colour
    return np.clip(image, 0, 1)


def shape_distance(shape: int, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray,
                    rotation: float) -> np.ndarray:
    """Signed distance to the shape's edge (negative inside), in the units of dx/dy."""
    if shape == 0:
        return np.hypot(dx, dy) - radius
    if shape == 1:
        c, s = np.cos(rotation), np.sin(rotation)
        return np.maximum(np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)) - 0.8 * radius
    # Equilateral triangle with circumradius ``radius``: the max over its three edge normals.
    angles = rotation + np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    dots = [np.cos(a) * dx + np.sin(a) * dy for a in angles]
    return np.maximum(np.maximum(dots[0], dots[1]), dots[2]) - 0.5 * radius


def _simple_geometry(motion: int, rng: np.random.Generator,
                     t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The simple variant's centre and radius per frame: each motion starts from its own place
    (so the first frame tells the motion), the seed picks the side and the speed."""
    side = rng.choice([-1.0, 1.0])
    speed = rng.choice([2.0, 3.0])
    return simple_trajectory(MOTIONS[motion], side, speed, t)


def simple_trajectory(motion: str, side: float, speed_pixels: float,
                      t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre ``(x, y)`` and radius per frame time ``t`` of the simple variant's ``motion``,
    starting on ``side`` (-1 or 1) and moving inwards at ``speed_pixels`` per frame at 64x64
    (in units of the frame size)."""
    speed = -side * speed_pixels / 64
    radius = np.full_like(t, 0.28)
    lo, hi = 20 / 64, 44 / 64  # walls on the 4-pixel token grid at 64x64
    still = np.full_like(t, 0.5)
    if motion == "horizontal":
        return _bounce(0.5 + 0.1875 * side, speed, t, lo, hi), still, radius
    if motion == "vertical":
        return still, _bounce(0.5 + 0.1875 * side, speed, t, lo, hi), radius
    if motion == "orbit":
        theta = np.pi / 4 + np.pi * (side > 0) + t * speed / 0.17
        return 0.5 + 0.17 * np.cos(theta), 0.5 + 0.17 * np.sin(theta), radius
    return still, still, radius * (1 + 0.35 * np.sin(12.8 * speed * t))


def render_video(class_id: int, seed: int, num_frames: int, size: int = 64,
                 background: str = "textured") -> np.ndarray:
    """The video of ``class_id`` drawn with ``seed``: uint8 ``[num_frames, size, size, 3]``.

    Deterministic: the same arguments give the same pixels on every machine (numpy's PCG64).
    """
    if num_frames < 1 or size < 4:
        raise ValueError(f"need num_frames >= 1 and size >= 4, got {num_frames}, {size}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got "
                         f"{background!r}")
    shape, motion = split_class(class_id)
    rng = np.random.default_rng([int(seed), int(class_id)])
    t = np.arange(num_frames, dtype=np.float64)
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size
    v, u = np.meshgrid(grid, grid, indexing="ij")  # v: rows (down), u: columns (right)
    calm = background != "textured"
    frames = _background(rng, t, u, v, textured=not calm)

    radius = np.full(num_frames, rng.uniform(0.24, 0.32) if calm else rng.uniform(0.12, 0.2))
    speed = rng.uniform(0.02, 0.05) * rng.choice([-1.0, 1.0])  # frame widths per frame
    lo, hi = radius[0] + 0.02, 1 - radius[0] - 0.02
    # calm: the shape starts near the centre (it still moves anywhere)
    x0, y0 = rng.uniform(0.42, 0.58, size=2) if calm else rng.uniform(lo, hi, size=2)
    if motion == 0:
        cx, cy = _bounce(x0, speed, t, lo, hi), np.full_like(t, y0)
    elif motion == 1:
        cx, cy = np.full_like(t, x0), _bounce(y0, speed, t, lo, hi)
    elif motion == 2:
        orbit = rng.uniform(0.12, 0.22)
        theta = rng.uniform(0, 2 * np.pi) + t * speed / orbit
        cx, cy = 0.5 + orbit * np.cos(theta), 0.5 + orbit * np.sin(theta)
    else:
        cx, cy = np.full_like(t, x0), np.full_like(t, y0)
        radius = radius * (1 + 0.35 * np.sin(rng.uniform(0.3, 0.7) * t + rng.uniform(0, 6.3)))
    rotation = rng.uniform(0, 2 * np.pi)
    colour = rng.uniform(0, 1, size=3)
    colour[rng.integers(3)] = rng.choice([0.05, 0.95])  # saturated: stands out from the ground
    if background == "simple":  # its own geometry, drawn after the calm draws
        cx, cy, radius = _simple_geometry(motion, rng, t)
    if background in ("plain", "simple"):  # plain keeps its seed's calm geometry
        frames = np.broadcast_to(np.asarray(PLAIN_GROUND), frames.shape)
        colour, rotation = np.asarray(PLAIN_SHAPE), 0.0

    # Distances in pixels so that the anti-aliasing ramp is one pixel wide at any size.
    dx = (u[None] - cx[:, None, None]) * size
    dy = (v[None] - cy[:, None, None]) * size
    dist = shape_distance(shape, dx, dy, radius[:, None, None] * size, rotation)
    alpha = np.clip(0.5 - dist, 0, 1)[..., None]
    frames = frames * (1 - alpha) + colour * alpha
    return np.round(frames * 255).astype(np.uint8)
