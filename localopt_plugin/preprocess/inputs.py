"""What to preprocess: video files from directories, globs, CSV/JSONL lists, or procedural videos.

Every input becomes a ``VideoInput`` in one global order that depends only on the command line
(directories and globs are sorted), so every rank computes the same list and the same sample
keys without talking to the others.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from localopt_plugin.data.procedural import (
    BACKGROUNDS,
    MOTIONS,
    NUM_CLASSES,
    SHAPES,
    class_name,
    render_video,
)
from localopt_plugin.data.recall import RecallSetting
from localopt_plugin.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
PROCEDURAL = "procedural"


def procedural_kind(background: str) -> str:
    """The input prefix of a variant: ``procedural`` (textured, the default) or
    ``procedural-<variant>``."""
    return PROCEDURAL if background == "textured" else f"{PROCEDURAL}-{background}"


PROCEDURAL_KINDS = {procedural_kind(b): b for b in BACKGROUNDS}
RECALL = f"{PROCEDURAL}-recall"  # the recall variant (localopt_plugin.data.recall)
PROCEDURAL_PREFIXES = tuple(kind + ":" for kind in (*PROCEDURAL_KINDS, RECALL))
UNLABELLED_CLASS = "video"
_MOTION_PHRASES = {"horizontal": "bounces left and right", "vertical": "bounces up and down",
                   "orbit": "moves in a circle", "pulse": "grows and shrinks"}


@dataclass(frozen=True)
class VideoInput:
    """One video: a file path or ``procedural[-<variant>]:<class>:<seed>`` (the recall
    variant: ``procedural-recall:<class>:<seed>:<options>``); ``key`` prefixes its samples."""

    source: str
    key: str
    label: int | str | None = None  # raw label; resolve_labels() turns it into a class id
    caption: str | None = None

    @property
    def procedural(self) -> tuple[int, int] | None:
        """``(class_id, seed)`` of a procedural video, else None."""
        if not self.source.startswith(PROCEDURAL_PREFIXES):
            return None
        _, cls, seed = self.source.split(":")[:3]
        return int(cls), int(seed)

    @property
    def recall(self) -> RecallSetting | None:
        """The setting of a recall-variant video, else None."""
        if not self.source.startswith(RECALL + ":"):
            return None
        return RecallSetting.parse(self.source.split(":", 3)[3])

    @property
    def background(self) -> str:
        """The procedural background variant (one of ``BACKGROUNDS``)."""
        return PROCEDURAL_KINDS.get(self.source.split(":")[0], "textured")


def procedural_caption(class_id: int) -> str:
    """A short English caption of a procedural class (for text conditioning)."""
    shape, motion = divmod(class_id, len(MOTIONS))
    return f"a {SHAPES[shape]} {_MOTION_PHRASES[MOTIONS[motion]]}"


def _key(index: int, name: str, source: str) -> str:
    """A readable, unique, dot-free key: webdataset splits member names at the first dot."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:40].strip("-") or "video"
    digest = hashlib.sha1(f"{index}:{source}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _procedural(spec: str) -> list[tuple[str, str, str, str]]:
    """``procedural[-<variant>]:N[:SEED]``: video ``j`` has class ``j % NUM_CLASSES`` and seed
    ``SEED + j``; ``procedural-recall:N[:SEED[:OPTIONS]]`` also takes the recall setting."""
    parts = spec.split(":", 3)
    kind = parts[0]
    usage = f"{kind}:N or {kind}:N:SEED" + (":OPTIONS" if kind == RECALL else "")
    if len(parts) > 3 and kind != RECALL:
        raise UserError(f"bad input {spec!r}: use {usage}")
    try:
        count, first_seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise UserError(f"bad input {spec!r}: use {usage}") from None
    suffix, name = "", kind
    if kind == RECALL:
        setting = RecallSetting.parse(parts[3] if len(parts) > 3 else "")
        suffix, name = f":{setting.options()}", f"{kind}-{setting.split}"
    out = []
    for j in range(count):
        cls, seed = j % NUM_CLASSES, first_seed + j
        out.append((f"{kind}:{cls}:{seed}{suffix}", f"{name}-c{cls:02d}-s{seed}",
                    class_name(cls), procedural_caption(cls)))
    return out


def _read_list(path: Path) -> list[tuple[str, str, str | None, str | None]]:
    """Rows of a CSV (header with ``path``, optional ``label``/``caption``) or JSONL file."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    out = []
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise UserError(f"{path} row {n} has no 'path'")
        video = Path(row["path"])
        video = video if video.is_absolute() else path.parent / video
        label = row.get("label")
        out.append((str(video), video.stem, None if label in (None, "") else label,
                    row.get("caption") or None))
    return out


def _files(paths: list[str], labels_from_dirs: bool) -> list[tuple[str, str, str | None, None]]:
    return [(p, Path(p).stem, Path(p).parent.name if labels_from_dirs else None, None)
            for p in paths]


def list_inputs(specs: list[str], labels_from_dirs: bool = False) -> list[VideoInput]:
    """Expand input specs in command-line order; see ``localopt-preprocess --help``."""
    rows: list[tuple[str, str, object, str | None]] = []
    for spec in specs:
        if spec.startswith(PROCEDURAL_PREFIXES):
            rows += _procedural(spec)
        elif os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*")
                           if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
            rows += _files(found, labels_from_dirs)
        elif spec.endswith((".csv", ".jsonl")) and os.path.isfile(spec):
            rows += _read_list(Path(spec))
        elif glob.has_magic(spec):
            rows += _files(sorted(glob.glob(spec, recursive=True)), labels_from_dirs)
        else:  # a single file; a missing one is rejected (and reported) like a corrupt one
            rows += _files([spec], labels_from_dirs)
    if not rows:
        raise UserError(f"no input videos found in {specs}")
    return [VideoInput(source, _key(i, name, source), label, caption)
            for i, (source, name, label, caption) in enumerate(rows)]


def resolve_labels(inputs: list[VideoInput], num_classes: int | None = None
                   ) -> tuple[list[VideoInput], int, list[str] | None]:
    """Integer class ids, the class count and the class names (None for bare integer labels).

    No labels at all: one class, ``"video"``. Names that are all procedural class names keep
    the procedural ids; other names are numbered in sorted order. Integer labels are kept.
    """
    labels = [v.label for v in inputs]
    if all(label is None for label in labels):
        return [replace(v, label=0) for v in inputs], 1, [UNLABELLED_CLASS]
    missing = next((v.source for v in inputs if v.label is None), None)
    if missing is not None:
        raise UserError(f"{missing} has no label but other inputs have one")
    if all(isinstance(x, int) or str(x).lstrip("-").isdigit() for x in labels):
        ids = [int(x) for x in labels]
        count = num_classes or max(ids) + 1
        if min(ids) < 0 or max(ids) >= count:
            raise UserError(f"labels must lie in [0, {count}), got {min(ids)}..{max(ids)}")
        return [replace(v, label=i) for v, i in zip(inputs, ids, strict=True)], count, None
    procedural_names = [class_name(c) for c in range(NUM_CLASSES)]
    names = procedural_names if set(labels) <= set(procedural_names) else sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    if num_classes is not None and num_classes != len(names):
        raise UserError(f"--num-classes {num_classes} but the inputs name {len(names)} "
                         "classes")
    return [replace(v, label=index[v.label]) for v in inputs], len(names), names


def write_procedural_mp4s(directory: str | Path, count: int, num_frames: int, size: int = 64,
                          first_seed: int = 0, fps: int = 8) -> Path:
    """Render procedural videos to real mp4 files plus ``videos.csv`` (path, label, caption).

    Why: lets the embedded data go through the same decode path as downloaded videos.
    """
    from localopt_plugin.video.io import write_mp4  # PyAV only where mp4 is written

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    listing = directory / "videos.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "caption"])
        for source, key, label, caption in _procedural(f"{PROCEDURAL}:{count}:{first_seed}"):
            cls, seed = (int(x) for x in source.split(":")[1:])
            write_mp4(directory / f"{key}.mp4", render_video(cls, seed, num_frames, size),
                      fps=fps)
            writer.writerow([f"{key}.mp4", label, caption])
    return listing
