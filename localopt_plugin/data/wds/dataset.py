"""The ``video-wds`` dataset: its flags, the loader configuration and the batch source.

The stages (``shards`` -> ``samples`` -> ``blend`` -> ``batch``) are pure functions of
``(seed, data-parallel rank, worker slot, sample index)``, which makes resuming exact: resuming
after ``k = consumed_samples / (micro_batch * R)`` micro-batches per rank replays the blend
draws (no I/O), skips whole component epochs by position and re-reads at most one epoch share
per component (tar read and npy parse, no input building). It needs the same seed, data,
``R``, micro-batch size and ``--data-num-workers``. Format: docs/data-format.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import sentencepiece
import torch

from localopt_plugin.config_flags import FlagConfig, option
from localopt_plugin.data.manifest import (
    Manifest,
    check_compatible,
    fingerprint_file,
    with_overrides,
)
from localopt_plugin.data.source import VideoTokenSource
from localopt_plugin.data.wds.batch import RankStream
from localopt_plugin.data.wds.shards import BlendComponent, resolve_components
from localopt_plugin.errors import UserError
from localopt_plugin.platform import cuda_available
from localopt_plugin.registry import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoWdsConfig(FlagConfig):
    """Flags of the ``video-wds`` dataset (``--data-path``/``--valid-data-path``, and
    Megatron-LM's ``--train-data-path``, are Megatron's: :meth:`from_args` reads them)."""

    GROUP: ClassVar[str] = "video-wds dataset"

    data_path: tuple[str, ...] = ()
    valid_data_path: tuple[str, ...] | None = None
    num_workers: int = option(2, "DataLoader workers per rank (0: read in the training "
                              "process); the sample order depends on it, so keep it when "
                              "resuming", flag="--data-num-workers")
    shuffle_buffer: int = option(1000, "samples in each worker's shuffle buffer",
                                 flag="--data-shuffle-buffer")
    condition: str | None = option(None, "condition on the class label or the caption (default: "
                                   "the manifest's)", flag="--data-condition",
                                   choices=("class", "text"))
    max_text_tokens: int | None = option(None, "caption tokens per sample, padded/truncated "
                                         "(default: the manifest's)", type=int)
    text_tokenizer_model: str | None = option(None, "sentencepiece model of the captions "
                                              "(default: the manifest's); its fingerprint must "
                                              "match the manifest")
    null_condition_prob: float = option(0.0, "probability of replacing a training sample's "
                                        "condition with the null condition (classifier-free "
                                        "guidance)")
    max_bad_sample_fraction: float = option(0.01, "stop the run when a worker has skipped "
                                            "more than this fraction of the samples it read "
                                            "(never judged on less than one epoch share)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values) -> VideoWdsConfig:
        # Megatron-LM names the training split --train-data-path when --valid-data-path is set
        data_path = args.data_path or getattr(args, "train_data_path", None)
        valid = args.valid_data_path
        return super().from_args(args, data_path=tuple(data_path or ()),
                                 valid_data_path=tuple(valid) if valid else None, **values)

    def validate(self) -> None:
        if not self.data_path:
            raise UserError("--dataset video-wds needs --data-path (Megatron-LM: --data-path, "
                            "or --train-data-path with --valid-data-path)")
        if not 0.0 <= self.null_condition_prob <= 1.0:
            raise UserError(f"--null-condition-prob {self.null_condition_prob} is not in "
                            f"[0, 1]")
        if not 0.0 <= self.max_bad_sample_fraction < 1.0:
            raise UserError(f"--max-bad-sample-fraction {self.max_bad_sample_fraction} is "
                            f"not in [0, 1)")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise UserError("--data-num-workers must be >= 0 and --data-shuffle-buffer >= 1")


@dataclass(frozen=True)
class LoaderConfig:
    """Everything the workers need (pickled into them)."""

    components: tuple[BlendComponent, ...]
    manifest: Manifest  # with the flags' overrides: defines vocabulary and layout
    text_model: bytes | None = None  # the sentencepiece model proto
    null_condition_prob: float = 0.0
    max_bad_fraction: float = 0.01
    shuffle_buffer: int = 1000


@dataclass
class WebDatasetSource:
    """A BatchSource over video-token shards (see the module docstring for the order)."""

    config: LoaderConfig
    num_workers: int = 2
    # skip counts by reason, per (dp rank, slot), as last reported by the workers
    skipped: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)

    def skipped_samples(self) -> Counter[str]:
        """Bad samples skipped so far, by reason, over the ranks and slots read here."""
        total: Counter[str] = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return total

    def batches(self, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                consumed_samples: int = 0) -> Iterator[dict]:
        step = micro_batch_size * dp_size
        if consumed_samples % step:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of {step}")
        slots = max(1, self.num_workers)
        stream = RankStream(self.config, micro_batch_size, dp_rank, dp_size, seed,
                            consumed_samples // step, slots)
        if self.num_workers:
            stream = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                pin_memory=cuda_available())
        for batch, (slot, skipped) in stream:
            self.skipped[(dp_rank, slot)] = skipped
            yield batch


def text_model(manifest: Manifest, override: str | None) -> bytes | None:
    """The caption tokenizer's bytes, checked against the manifest's fingerprint and size."""
    if manifest.condition != "text":
        return None
    path = override or manifest.text_model_path()
    if not os.path.exists(path):
        raise UserError(f"sentencepiece model {path} (of {manifest.path}) not found")
    expected = manifest.text_tokenizer.fingerprint
    if fingerprint_file(path) != expected:
        raise UserError(f"sentencepiece model {path} has fingerprint {fingerprint_file(path)} "
                        f"but {manifest.path} expects {expected}")
    with open(path, "rb") as f:
        proto = f.read()
    size = sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()
    if size != manifest.text_tokenizer.vocab_size:
        raise UserError(f"sentencepiece model {path} has {size} pieces but {manifest.path} "
                        f"says {manifest.text_tokenizer.vocab_size}")
    return proto


@register("dataset", "video-wds", config=VideoWdsConfig)
def video_wds(config: VideoWdsConfig, *, seed: int = 0) -> VideoTokenSource:
    """Train (and valid) shards from ``--data-path``/``--valid-data-path``; see the docs."""
    train, manifests = resolve_components(list(config.data_path))
    valid, valid_manifests = (resolve_components(list(config.valid_data_path))
                              if config.valid_data_path else (None, []))
    check_compatible(manifests + valid_manifests)
    manifest = with_overrides(manifests[0], config.condition, config.max_text_tokens)
    proto = text_model(manifest, config.text_tokenizer_model)

    def source(components: list[BlendComponent], null_prob: float) -> WebDatasetSource:
        loader = LoaderConfig(tuple(components), manifest, proto, null_prob,
                              config.max_bad_sample_fraction, config.shuffle_buffer)
        return WebDatasetSource(loader, config.num_workers)

    for component in train + (valid or []):
        log.info("video-wds: %s: %d shards, %d samples, weight %g", component.spec,
                 len(component.shards), component.num_samples, component.weight)
    return VideoTokenSource(
        vocab=manifest.vocab,
        layout=manifest.layout,
        train=source(train, config.null_condition_prob),
        valid=source(valid, 0.0) if valid else None,  # validate on the true conditions
        info={"manifest": manifest, "manifests": manifests + valid_manifests},
    )
