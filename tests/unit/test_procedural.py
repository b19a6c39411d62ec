"""The procedural video generator: shapes, determinism, class semantics."""

from __future__ import annotations

import numpy as np
import pytest

from localopt_plugin.data.procedural import (
    MOTIONS,
    NUM_CLASSES,
    PLAIN_GROUND,
    PLAIN_SHAPE,
    SHAPES,
    class_name,
    render_video,
)


@pytest.mark.parametrize("num_frames,size", [(1, 64), (5, 64), (17, 64), (9, 32), (3, 96)])
def test_shape_and_dtype(num_frames, size):
    video = render_video(3, 7, num_frames, size)
    assert video.shape == (num_frames, size, size, 3) and video.dtype == np.uint8


def test_deterministic_and_seed_dependent():
    a, b = render_video(4, 11, 9), render_video(4, 11, 9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_video(4, 12, 9))
    assert not np.array_equal(a, render_video(5, 11, 9))


def test_shorter_clip_is_a_prefix():
    """A clip's frames do not depend on its length, so any T is a window of one video."""
    np.testing.assert_array_equal(render_video(9, 3, 5), render_video(9, 3, 17)[:5])


def test_class_names():
    assert NUM_CLASSES == len(SHAPES) * len(MOTIONS) == 12
    names = [class_name(i) for i in range(NUM_CLASSES)]
    assert len(set(names)) == NUM_CLASSES
    assert class_name(0) == "circle-horizontal" and class_name(11) == "triangle-pulse"
    for bad in (-1, NUM_CLASSES):
        with pytest.raises(ValueError, match="class_id"):
            class_name(bad)
        with pytest.raises(ValueError, match="class_id"):
            render_video(bad, 0, 4)


def _moving_centroids(video: np.ndarray) -> np.ndarray:
    """Centroid (row, col) of the pixels that change strongly between consecutive frames."""
    diff = np.abs(np.diff(video.astype(np.int16), axis=0)).max(-1) > 60
    rows, cols = np.indices(diff.shape[1:])
    return np.array([[rows[d].mean(), cols[d].mean()] for d in diff if d.sum() > 3])


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_motion_direction_matches_the_class(shape):
    """Independent of the renderer's code: measure where the frames change."""
    horizontal, vertical = shape * 4 + 0, shape * 4 + 1
    for seed in range(3):
        h = _moving_centroids(render_video(horizontal, seed, 17))
        v = _moving_centroids(render_video(vertical, seed, 17))
        assert len(h) > 8 and len(v) > 8
        assert h[:, 1].std() > 2 * h[:, 0].std()  # moves along columns
        assert v[:, 0].std() > 2 * v[:, 1].std()  # moves along rows


def test_shape_is_visible_and_background_is_textured():
    video = render_video(0, 1, 1).astype(np.float64)
    assert video.std(axis=(1, 2)).min() > 5  # not flat
    assert len(np.unique(video.reshape(-1, 3), axis=0)) > 200  # gradient + texture


def test_calm_variant_keeps_the_classes_without_texture():
    """calm: a still gradient behind the shape (most pixels never change, where the textured
    background drifts everywhere), the same motions (measured from the frames, as above)."""
    def still_fraction(video: np.ndarray) -> float:
        return float((np.ptp(video.astype(np.int16), axis=0).max(-1) == 0).mean())

    for cls in range(NUM_CLASSES):
        assert still_fraction(render_video(cls, 3, 17, background="calm")) > 0.3
        assert still_fraction(render_video(cls, 3, 17)) < 0.05
    h = _moving_centroids(render_video(0, 5, 17, background="calm"))
    v = _moving_centroids(render_video(1, 5, 17, background="calm"))
    assert h[:, 1].std() > 2 * h[:, 0].std() and v[:, 0].std() > 2 * v[:, 1].std()
    with pytest.raises(ValueError, match="background must be one of"):
        render_video(0, 0, 4, background="noisy")


def test_plain_variant_draws_upright_shapes_in_two_colours():
    """plain: every pixel is the ground colour, the shape colour or an anti-aliased mix of them
    (no gradient), the class's motion (measured as above), and an upright square (its bounding box
    is filled, unlike a rotated one)."""
    ground, shape = (np.round(np.array(c) * 255) for c in (PLAIN_GROUND, PLAIN_SHAPE))
    for cls in range(NUM_CLASSES):
        video = render_video(cls, 4, 17, background="plain").astype(np.float64)
        mix = ((video - ground) @ (shape - ground)) / ((shape - ground) @ (shape - ground))
        mixed = ground + np.clip(mix, 0, 1)[..., None] * (shape - ground)
        assert np.abs(video - mixed).max() <= 1.0
        assert (mix > 0.99).mean() > 0.05  # the shape is drawn
    h = _moving_centroids(render_video(0, 5, 17, background="plain"))
    v = _moving_centroids(render_video(1, 5, 17, background="plain"))
    assert h[:, 1].std() > 2 * h[:, 0].std() and v[:, 0].std() > 2 * v[:, 1].std()
    square = render_video(SHAPES.index("square") * 4 + 3, 0, 1, background="plain")[0]
    inside = np.argwhere(np.abs(square.astype(np.float64) - shape).max(-1) < 2)
    (r0, c0), (r1, c1) = inside.min(0), inside.max(0)
    assert len(inside) > 0.9 * (r1 - r0 + 1) * (c1 - c0 + 1)


def _shape_centroid(frame: np.ndarray) -> np.ndarray:
    """(row, col) centroid of the plain shape colour's pixels."""
    shape = np.round(np.array(PLAIN_SHAPE) * 255)
    rows, cols = np.nonzero(np.abs(frame.astype(np.float64) - shape).max(-1) < 2)
    return np.array([rows.mean(), cols.mean()])


def test_simple_variant_has_four_clips_per_class_whose_first_frame_tells_the_motion():
    """simple: plain's colours; a seed picks one of 4 clips of its class; the first frames of
    different motions differ (horizontal starts at a side wall, vertical at the top or bottom,
    orbit on a diagonal, pulse in the centre); motion measured as above, whole pixels per
    frame."""
    firsts = {}
    for cls in range(NUM_CLASSES):
        clips = {render_video(cls, seed, 17, background="simple").tobytes()
                 for seed in range(40)}
        assert len(clips) == 4
        firsts[cls] = {render_video(cls, seed, 1, background="simple").tobytes()
                       for seed in range(40)}
    for shape in range(len(SHAPES)):
        motions = [firsts[shape * 4 + m] for m in range(len(MOTIONS))]
        assert all(not a & b for i, a in enumerate(motions) for b in motions[i + 1:])
    h = _moving_centroids(render_video(0, 5, 17, background="simple"))
    v = _moving_centroids(render_video(1, 5, 17, background="simple"))
    assert h[:, 1].std() > 2 * h[:, 0].std() and v[:, 0].std() > 2 * v[:, 1].std()
    start = _shape_centroid(render_video(0, 5, 1, background="simple")[0])
    assert abs(start[1] - 32) > 10 and abs(start[0] - 31.5) < 1  # at a side wall
    step = np.diff([_shape_centroid(f) for f in render_video(0, 5, 4, background="simple")],
                   axis=0)
    assert np.allclose(np.abs(step[:, 1]), np.round(np.abs(step[:, 1])), atol=0.05)
    assert np.abs(step[:, 1]).min() >= 2
