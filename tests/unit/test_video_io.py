"""mp4 (PyAV), GIF and grid PNG writing, read back by independent decoders."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from localopt_plugin.data.procedural import render_video
from localopt_plugin.video.io import (
    frame_grid,
    mp4_codec,
    read_video,
    save_grid_png,
    write_gif,
    write_mp4,
)


def test_mp4_round_trip(tmp_path):
    video = render_video(6, 4, 12)
    path = write_mp4(tmp_path / "clip.mp4", video, fps=8)
    with av.open(str(path)) as container:  # decoded by PyAV directly, not our reader
        stream = container.streams.video[0]
        assert stream.codec_context.name in {"h264", "mpeg4"}
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == video.shape
    assert np.abs(decoded.astype(np.int16) - video).mean() < 6  # lossy codec, 4:2:0 chroma
    np.testing.assert_array_equal(read_video(path), decoded)
    np.testing.assert_array_equal(read_video(path, max_frames=5), decoded[:5])


def test_mp4_rejects_odd_sizes_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 63, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 64, 64, 3), np.float32))
    assert mp4_codec() in {"libx264", "h264", "mpeg4"}


def test_gif_frame_count(tmp_path):
    video = render_video(2, 1, 7, size=32)
    path = write_gif(tmp_path / "clip.gif", video, fps=10)
    with Image.open(path) as image:
        assert image.n_frames == 7 and image.size == (32, 32)
        image.seek(3)
        frame = np.asarray(image.convert("RGB"))
    assert np.abs(frame.astype(np.int16) - video[3]).mean() < 8  # 256-colour palette


def test_grid_png_size_and_layout(tmp_path):
    a, b = render_video(0, 0, 4, size=16), render_video(1, 0, 3, size=16)
    path = save_grid_png(tmp_path / "grid.png", [a, b], pad=2)
    with Image.open(path) as image:
        assert image.size == (4 * 16 + 3 * 2, 2 * 16 + 2)
        grid = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(grid[:16, 18:34], a[1])
    np.testing.assert_array_equal(grid[18:34, 36:52], b[2])
    assert (grid[18:34, 54:] == 255).all()  # the shorter row's empty cell
    with pytest.raises(ValueError, match="same frame size"):
        frame_grid([a, render_video(0, 0, 2, size=32)])
