"""Rank 0's last step: ``manifest.json``, ``rejects.jsonl``, the caption tokenizer, the summary.

Everything is rebuilt from the shard records and shard files in shard order, so the result is
the same whichever ranks wrote which shards, and a resumed run that finds every shard done
rewrites identical files.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter

import sentencepiece

from localopt_plugin.data.manifest import MANIFEST_NAME, Manifest, TextTokenizer, fingerprint_file
from localopt_plugin.errors import UserError
from localopt_plugin.preprocess.clips import ClipSpec
from localopt_plugin.preprocess.writer import ShardPlan, ShardRecord, record_path

REJECTS_NAME = "rejects.jsonl"
CAPTION_MODEL_NAME = "captions.model"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_records(out: str, plan: ShardPlan) -> list[ShardRecord]:
    records = []
    for shard in range(plan.num_shards):
        with open(record_path(out, plan.name(shard))) as f:
            records.append(ShardRecord(**json.load(f)))
    return records


def captions(out: str, records: list[ShardRecord]) -> list[str]:
    """Every sample's caption (``.txt`` member), in shard and sample order."""
    texts = []
    for record in records:
        with tarfile.open(os.path.join(out, record.name)) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode())
    return texts


def train_caption_tokenizer(texts: list[str], vocab_size: int, path: str) -> TextTokenizer:
    """A unigram sentencepiece model of the captions; training is single-threaded and in
    memory (no file names end up in the model), so the same captions give the same bytes."""
    if not texts:
        raise UserError("--train-text-tokenizer needs captions, but no sample has one")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    _atomic_write(path, model.getvalue())
    size = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
    return TextTokenizer(os.path.basename(path), fingerprint_file(path), size)


def write_dataset_files(out: str, plan: ShardPlan, spec: ClipSpec, tokenizer_name: str,
                        tokenizer_fingerprint: str, vocab_size: int,
                        latent_grid: tuple[int, int, int], num_classes: int,
                        class_names: list[str] | None, settings: str,
                        text_vocab_size: int | None, max_text_tokens: int) -> dict:
    """Write the rejects file, caption model and manifest; returns the dataset totals."""
    records = load_records(out, plan)
    rejects = [r for record in records for r in record.rejects]
    _atomic_write(os.path.join(out, REJECTS_NAME),
                  "".join(json.dumps(r) + "\n" for r in rejects).encode())
    text = None
    if text_vocab_size is not None:
        text = train_caption_tokenizer(captions(out, records), text_vocab_size,
                                       os.path.join(out, CAPTION_MODEL_NAME))
    manifest = Manifest(
        tokenizer=tokenizer_name, tokenizer_fingerprint=tokenizer_fingerprint,
        video_vocab_size=vocab_size, latent_grid=latent_grid, source_frames=spec.frames,
        source_resolution=(spec.height, spec.width),
        shards={r.name: r.samples for r in records},
        condition="text" if text else "class", num_classes=num_classes, text_tokenizer=text,
        max_text_tokens=max_text_tokens if text else 0)
    body = manifest.to_json()
    if class_names is not None:
        body["class_names"] = class_names
    body["preprocess"] = {"settings": settings, "videos": plan.num_videos,
                          "videos_per_shard": plan.videos_per_shard, "clips": vars(spec),
                          "rejects": len(rejects), "rejects_file": REJECTS_NAME}
    body["ranks"] = {"shards": {r.name: r.rank for r in records}}  # who wrote each shard
    _atomic_write(os.path.join(out, MANIFEST_NAME), (json.dumps(body, indent=2) + "\n").encode())
    for leftover in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        os.remove(leftover)  # temporary shards of killed runs (possibly of another rank count)
    return {"shards": len(records), "samples": manifest.num_samples, "rejects": len(rejects),
            "reject_reasons": Counter(r["reason"].split(":")[0] for r in rejects)}


_COUNTS = ("written", "reused", "videos", "clips", "rejects")


def _row(name: str, s: dict) -> tuple[str, ...]:
    rate = s["clips"] / s["seconds"] if s["seconds"] > 0 else 0.0
    return (name, *(str(s[k]) for k in _COUNTS), f"{s['seconds']:.1f}", f"{rate:.1f}")


def summary_table(stats: list[dict], totals: dict, out: str, plan: ShardPlan) -> str:
    """Per-rank table: clips/s is the clips tokenized in this run over the rank's work time;
    the ``all`` row divides the sum by the slowest rank's time (the job's throughput)."""
    header = ("rank", "shards new", "shards done before", "videos", "clips", "rejects",
              "seconds", "clips/s")
    everyone = {k: sum(s[k] for s in stats) for k in _COUNTS}
    everyone["seconds"] = max(s["seconds"] for s in stats)
    rows = [header, *(_row(str(s["rank"]), s) for s in sorted(stats, key=lambda s: s["rank"])),
            _row("all", everyone)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(totals["reject_reasons"].items()))
    last = plan.num_shards - 1
    lines += [
        "",
        f"dataset: {totals['samples']} samples in {totals['shards']} shards, "
        f"{totals['rejects']} rejected videos{f' ({reasons})' if reasons else ''}",
        f"manifest: {os.path.join(out, MANIFEST_NAME)}   rejects: "
        f"{os.path.join(out, REJECTS_NAME)}",
        f"--data-path {os.path.join(out, plan.prefix)}-{{{0:06d}..{last:06d}}}.tar",
    ]
    return "\n".join(lines)
