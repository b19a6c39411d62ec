"""``manifest.json``: what a directory of video-token shards holds, checked before any training.

The manifest pins the video tokenizer (name and fingerprint), its vocabulary and latent grid,
the source clips, the conditioning (class labels or captions with their sentencepiece model)
and every shard's sample count. The counts let the loader notice shards that end early
(corrupt or truncated tars) and give every data-parallel rank the same number of samples per
epoch. See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

from localopt_plugin.data.layout import SampleLayout, Vocabulary
from localopt_plugin.errors import UserError

FORMAT = "localopt-video-tokens/1"
MANIFEST_NAME = "manifest.json"
CONDITIONS = ("class", "text")


@dataclass(frozen=True)
class TextTokenizer:
    """The sentencepiece model captions are tokenized with (path relative to the manifest)."""

    model: str
    fingerprint: str
    vocab_size: int


@dataclass(frozen=True)
class Manifest:
    """The contents of one ``manifest.json`` (``path`` is where it was read from)."""

    tokenizer: str
    tokenizer_fingerprint: str
    video_vocab_size: int
    latent_grid: tuple[int, int, int]  # (F, h, w) of every tokens.npy
    source_frames: int
    source_resolution: tuple[int, int]  # (height, width) of the source clips
    shards: dict[str, int]  # shard file name (next to the manifest) -> samples
    condition: str = "class"
    num_classes: int = 0
    text_tokenizer: TextTokenizer | None = None
    max_text_tokens: int = 0  # caption tokens per sample (padded/truncated to it)
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.path or "manifest"
        if self.condition not in CONDITIONS:
            raise UserError(f"{where}: condition {self.condition!r} is not one of "
                             f"{', '.join(CONDITIONS)}")
        if self.condition == "class" and self.num_classes < 1:
            raise UserError(f"{where}: class conditioning needs num_classes >= 1")
        if self.condition == "text" and (self.text_tokenizer is None
                                         or self.max_text_tokens < 1):
            raise UserError(f"{where}: text conditioning needs text_tokenizer and "
                             f"max_text_tokens >= 1")
        if any(n < 0 for n in self.shards.values()):
            raise UserError(f"{where}: negative shard sample count")

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())

    @property
    def frame_tokens(self) -> int:
        return self.latent_grid[1] * self.latent_grid[2]

    @property
    def condition_tokens(self) -> int:
        return self.max_text_tokens if self.condition == "text" else 1

    @property
    def vocab(self) -> Vocabulary:
        if self.condition == "class":
            return Vocabulary(self.video_vocab_size, num_classes=self.num_classes)
        return Vocabulary(self.video_vocab_size, text_vocab_size=self.text_tokenizer.vocab_size)

    @property
    def layout(self) -> SampleLayout:
        return SampleLayout(video_start=2 + self.condition_tokens,
                            num_frames=self.latent_grid[0], frame_tokens=self.frame_tokens)

    def text_model_path(self) -> str:
        """The sentencepiece model, resolved against the manifest's directory."""
        return os.path.join(self.directory, self.text_tokenizer.model)

    def to_json(self) -> dict:
        out = {
            "format": FORMAT,
            "tokenizer": {"name": self.tokenizer, "fingerprint": self.tokenizer_fingerprint},
            "video_vocab_size": self.video_vocab_size,
            "latent_grid": list(self.latent_grid),
            "source": {"frames": self.source_frames,
                       "resolution": list(self.source_resolution)},
            "condition": self.condition,
            "num_classes": self.num_classes,
            "shards": [{"name": k, "samples": v} for k, v in self.shards.items()],
        }
        if self.text_tokenizer is not None:
            out["text_tokenizer"] = asdict(self.text_tokenizer)
            out["max_text_tokens"] = self.max_text_tokens
        return out

    def write(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST_NAME)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        return path


def load_manifest(path: str) -> Manifest:
    """Read a manifest; a missing or malformed one stops the run naming the file and field."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read dataset manifest {path}: {err}") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
    try:
        text = raw.get("text_tokenizer")
        return Manifest(
            tokenizer=raw["tokenizer"]["name"],
            tokenizer_fingerprint=raw["tokenizer"]["fingerprint"],
            video_vocab_size=int(raw["video_vocab_size"]),
            latent_grid=tuple(int(n) for n in raw["latent_grid"]),
            source_frames=int(raw["source"]["frames"]),
            source_resolution=tuple(int(n) for n in raw["source"]["resolution"]),
            shards={s["name"]: int(s["samples"]) for s in raw["shards"]},
            condition=raw.get("condition", "class"),
            num_classes=int(raw.get("num_classes", 0)),
            text_tokenizer=TextTokenizer(**text) if text else None,
            max_text_tokens=int(raw.get("max_text_tokens", 0)),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed manifest ({type(err).__name__}: {err})"
                         ) from None


def fingerprint_file(path: str) -> str:
    """``sha256:<hex>`` of a file: identifies tokenizer weights and sentencepiece models."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def shard_sample_counts(paths: Iterable[str]) -> dict[str, int]:
    """Samples (distinct keys) per shard file name, from the tar headers: for writing manifests."""
    counts = {}
    for path in paths:
        with tarfile.open(path) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()}
        counts[os.path.basename(path)] = len(keys)
    return counts


def _shared_fields(manifest: Manifest) -> dict:
    """What must agree between the manifests of a blend and its validation data: the ids."""
    fields = {"tokenizer_fingerprint": manifest.tokenizer_fingerprint,
              "video_vocab_size": manifest.video_vocab_size,
              "latent_grid": manifest.latent_grid, "condition": manifest.condition}
    if manifest.condition == "class":
        fields["num_classes"] = manifest.num_classes
    else:  # the same model file may sit at other paths
        fields["text_tokenizer.fingerprint"] = manifest.text_tokenizer.fingerprint
        fields["max_text_tokens"] = manifest.max_text_tokens
    return fields


def check_compatible(manifests: list[Manifest]) -> None:
    """All datasets of one run must share tokenizers, grid and conditioning."""
    first = _shared_fields(manifests[0])
    for other in manifests[1:]:
        for name, value in _shared_fields(other).items():
            if first.get(name) != value:
                raise UserError(f"datasets do not match: {name} is {first.get(name)!r} "
                                 f"in {manifests[0].path} but {value!r} in {other.path}")


def with_overrides(manifest: Manifest, condition: str | None = None,
                   max_text_tokens: int | None = None) -> Manifest:
    """The manifest as the loader uses it, with flag overrides of its conditioning."""
    return replace(manifest, condition=condition or manifest.condition,
                   max_text_tokens=max_text_tokens or manifest.max_text_tokens)


def check_manifest_against_model(manifest: Manifest, vocab_size: int, seq_length: int) -> None:
    """Stop at start when the model cannot take the dataset's ids or sequence length.

    ``vocab_size`` is the model's (possibly padded) vocabulary and ``seq_length`` its input
    length; the dataset needs every id below ``manifest.vocab.size`` and
    ``manifest.layout.input_length`` input positions.
    """
    vocab, layout = manifest.vocab, manifest.layout
    if vocab.size > vocab_size:
        raise UserError(
            f"dataset {manifest.path} needs a vocabulary of {vocab.size} ids "
            f"({vocab.video_vocab_size} video ids of tokenizer {manifest.tokenizer}, "
            f"{vocab.size - vocab.video_vocab_size} special/condition/text ids) but the model's "
            f"vocabulary size is {vocab_size}")
    if layout.input_length > seq_length:
        raise UserError(
            f"dataset {manifest.path} needs a sequence length of {layout.input_length} "
            f"input tokens (grid {'x'.join(map(str, manifest.latent_grid))} plus "
            f"{layout.video_start} prefix tokens) but the model's --seq-length is {seq_length}")
