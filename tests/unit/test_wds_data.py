"""The video-wds dataset: shard round trip, rank/worker splits, blends, resume, bad input."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections import Counter

import numpy as np
import pytest
import sentencepiece
import torch
from helpers.configs import train_args
from helpers.wds_shards import CLASSES, GRID, VOCAB, train_text_model, write_dataset

from localopt_plugin import registry
from localopt_plugin.data.layout import Vocabulary
from localopt_plugin.data.manifest import check_manifest_against_model
from localopt_plugin.data.wds import VideoWdsConfig, video_wds
from localopt_plugin.data.wds.samples import (
    BAD_TOKENS,
    GRID_MISMATCH,
    MISSING_CONDITION,
    MISSING_TOKENS,
    OUT_OF_VOCAB,
    TRUNCATED,
    BadDataError,
)

FRAME_TOKENS = GRID[0] * GRID[1] * GRID[2]


def make_source(*data_path: str, workers: int = 0, flags: tuple[str, ...] = ()):
    args = train_args("--dataset", "video-wds", "--data-path", *data_path,
                      "--data-num-workers", str(workers), *flags)  # the trainer's flags
    return video_wds(VideoWdsConfig.from_args(args), seed=args.seed)


def take(source, n: int, micro_batch: int, rank: int = 0, dp: int = 1, seed: int = 7,
         consumed: int = 0) -> list[dict]:
    stream = source.train.batches(micro_batch, rank, dp, seed, consumed)
    batches = list(itertools.islice(stream, n))
    stream.close()  # stops the DataLoader workers now rather than at garbage collection
    return batches


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_vocabulary_text_ids_are_additive():
    plain = Vocabulary(100, num_classes=3)
    assert (plain.bos, plain.bov, plain.eov, plain.null_condition, plain.size) == \
        (100, 101, 102, 103, 107)
    with pytest.raises(ValueError):
        plain.pad  # noqa: B018
    text = Vocabulary(100, num_classes=3, text_vocab_size=10)
    assert text.class_token(2) == plain.class_token(2) and text.pad == 107
    assert [text.text_token(0), text.text_token(9)] == [108, 117] and text.size == 118


def test_round_trip_shard_writer(tmp_path):
    """Samples written with webdataset's ShardWriter come back with their tokens and class."""
    written = write_dataset(tmp_path / "a", 20, 6)  # shards of 6, 6, 6, 2
    assert registry.get("dataset", "video-wds").build is video_wds
    source = make_source(written.pattern)
    vocab, layout = source.vocab, source.layout
    assert (layout.video_start, layout.num_frames, layout.frame_tokens) == (3, 2, 12)
    batches = take(source, 5, 4)  # one epoch: 20 samples, each once
    assert sorted(keys(batches)) == sorted(written.samples)
    for batch in batches:
        tokens = batch["tokens"]
        assert tokens.dtype == torch.int64 and tokens.shape == (4, layout.seq_length)
        assert torch.equal(batch["labels"], tokens[:, 1:])
        assert torch.equal(batch["position_ids"], torch.arange(layout.input_length).expand(4, -1))
        start, end = layout.label_span(0, layout.num_frames)
        assert batch["loss_mask"][:, start:end].eq(1).all()
        assert batch["loss_mask"].sum() == 4 * FRAME_TOKENS
        for row, key, label in zip(tokens, batch["keys"], batch["label"], strict=True):
            sample = written.samples[key]
            assert row[0] == vocab.bos and row[2] == vocab.bov and row[-1] == vocab.eov
            assert row[1] == vocab.class_token(sample["cls"]) and label == sample["cls"]
            assert torch.equal(row[3:-1], torch.from_numpy(sample["tokens"].astype(np.int64))
                               .reshape(-1))


def test_caption_tokens_share_the_id_space(tmp_path):
    model = train_text_model(tmp_path / "spm.model")
    written = write_dataset(tmp_path / "t", 16, 4, text_model=model, max_text_tokens=6)
    source = make_source(written.pattern, flags=("--null-condition-prob", "0.3"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    vocab, layout = source.vocab, source.layout
    assert vocab.text_vocab_size == sp.get_piece_size() and layout.video_start == 8
    assert vocab.size == VOCAB + 4 + 1 + sp.get_piece_size()
    lengths, nulls = [], 0
    for batch in take(source, 4, 4):
        for row, key, null in zip(batch["tokens"], batch["keys"], batch["null_condition"],
                                  strict=True):
            condition = row[1:7].tolist()
            if null:
                nulls += 1
                assert condition == [vocab.null_condition] + [vocab.pad] * 5
                continue
            pieces = sp.encode(written.samples[key]["txt"], out_type=int)
            lengths.append(len(pieces))
            expected = [vocab.text_token(p) for p in pieces[:6]]
            assert condition == expected + [vocab.pad] * (6 - len(expected))
            assert all(vocab.pad <= t < vocab.size for t in condition)
    assert min(lengths) < 6 < max(lengths) and nulls > 0  # padded, truncated and dropped

    other = train_text_model(tmp_path / "other.model")
    other.write_bytes(other.read_bytes() + b"\0")  # another file: another fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        make_source(written.pattern, flags=("--text-tokenizer-model", str(other)))


def test_two_ranks_two_workers_split_the_epoch(tmp_path):
    written = write_dataset(tmp_path / "a", 32, 4)  # 8 shards over 4 (rank, worker) slots
    source = make_source(written.pattern, workers=2)
    per_rank = [take(source, 16, 2, rank=r, dp=2) for r in (0, 1)]  # two epochs
    epochs = [[keys(batches[:8]) for batches in per_rank], [keys(b[8:]) for b in per_rank]]
    for rank0, rank1 in epochs:
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == sorted(written.samples)
        # the DataLoader alternates workers: even and odd micro-batches come from other slots
        slots = [{k for b in per_rank[0][w:8:2] for k in b["keys"]} for w in (0, 1)]
        assert not slots[0] & slots[1]
    assert epochs[0][0] != epochs[1][0]  # reshuffled


def test_fewer_shards_than_slots_still_gives_every_rank_batches(tmp_path):
    written = write_dataset(tmp_path / "a", 12, 4)  # 3 shards for 4 slots: one slot tops up
    source = make_source(written.pattern, workers=2)
    for rank in (0, 1):
        batches = take(source, 6, 2, rank=rank, dp=2)
        assert len(batches) == 6 and all(len(b["keys"]) == 2 for b in batches)


def test_blend_weights_are_honoured(tmp_path):
    a = write_dataset(tmp_path / "a", 40, 10, name="a")
    b = write_dataset(tmp_path / "b", 40, 10, name="b", seed=1)
    source = make_source("0.3", a.pattern, "0.7", b.pattern)
    drawn = keys(take(source, 100, 16))
    share = sum(k.startswith("a") for k in drawn) / len(drawn)
    sigma = (0.3 * 0.7 / len(drawn)) ** 0.5
    assert abs(share - 0.3) < 4 * sigma, share
    assert Counter(k[0] for k in keys(take(make_source(a.pattern, b.pattern), 5, 16))) \
        .keys() == {"a", "b"}  # unweighted paths form one dataset


@pytest.mark.parametrize("workers,dp", [(2, 2), (0, 1)])
def test_resume_continues_exactly(tmp_path, workers, dp):
    a = write_dataset(tmp_path / "a", 24, 4, name="a")
    b = write_dataset(tmp_path / "b", 9, 3, name="b", seed=1)
    source = make_source("0.5", a.pattern, "0.5", b.pattern, workers=workers,
                         flags=("--null-condition-prob", "0.3", "--data-shuffle-buffer", "5"))
    total, micro = 13, 2  # crosses several component epochs per slot
    for rank in range(dp):
        full = take(source, total, micro, rank=rank, dp=dp)
        for k in (5, 10):
            resumed = take(source, total - k, micro, rank=rank, dp=dp,
                           consumed=k * micro * dp)
            for expected, got in zip(full[k:], resumed, strict=True):
                assert got["keys"] == expected["keys"]
                assert torch.equal(got["tokens"], expected["tokens"])
                assert torch.equal(got["null_condition"], expected["null_condition"])


def test_null_condition_frequency_and_determinism(tmp_path):
    written = write_dataset(tmp_path / "a", 40, 10)
    source = make_source(written.pattern, flags=("--null-condition-prob", "0.25"))
    batches = take(source, 40, 50)
    nulls = torch.cat([b["null_condition"] for b in batches])
    sigma = (0.25 * 0.75 / nulls.numel()) ** 0.5
    assert abs(nulls.float().mean().item() - 0.25) < 4 * sigma
    tokens = torch.cat([b["tokens"] for b in batches])
    assert (tokens[nulls, 1] == source.vocab.null_condition).all()
    assert (tokens[~nulls, 1] >= source.vocab.class_token(0)).all()
    again = torch.cat([b["null_condition"] for b in take(source, 40, 50)])
    other_seed = torch.cat([b["null_condition"] for b in take(source, 40, 50, seed=8)])
    assert torch.equal(nulls, again) and not torch.equal(nulls, other_seed)


def _overwrite(offset_fraction: float, size: int, value: bytes):
    def corrupt(path):
        data = bytearray(path.read_bytes())
        at = int(len(data) * offset_fraction)
        data[at: at + size] = value * size
        path.write_bytes(bytes(data))
    return corrupt


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])


def _sample_edit(edit):
    def mutate(i, sample):
        if i == 5:  # in the second shard
            edit(sample)
    return mutate


BAD_INPUTS = {
    # name: (sample edit, shard edit of the second shard, reason, samples lost)
    "corrupt tar bytes": (None, _overwrite(0.5, 600, b"\xff"), TRUNCATED, None),
    "unreadable tar": (None, _overwrite(0.0, 512, b"\x13"), TRUNCATED, 4),
    "truncated tar": (None, _truncate, TRUNCATED, None),
    "missing tokens.npy": (lambda s: s.pop("tokens.npy"), None, MISSING_TOKENS, 1),
    "missing cls": (lambda s: s.pop("cls"), None, MISSING_CONDITION, 1),
    "not an npy": (lambda s: s.update({"tokens.npy": b"garbage"}), None, BAD_TOKENS, 1),
    "token id outside the vocabulary": (
        lambda s: s["tokens.npy"].__setitem__((1, 2, 3), VOCAB), None, OUT_OF_VOCAB, 1),
    "grid mismatch": (lambda s: s.update({"tokens.npy": np.zeros((2, 3, 5), np.int16)}), None,
                      GRID_MISMATCH, 1),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_counted_and_logged(tmp_path, caplog, kind):
    edit, shard_edit, reason, lost = BAD_INPUTS[kind]
    written = write_dataset(tmp_path / "a", 12, 4, mutate=edit and _sample_edit(edit))
    if shard_edit:
        shard_edit(written.shards[1])
    source = make_source(written.pattern, flags=("--max-bad-sample-fraction", "0.5"))
    with caplog.at_level(logging.WARNING, logger="localopt_plugin.data.wds.samples"):
        stream = source.train.batches(4, 0, 1, 7)
        seen = set(next(stream)["keys"])
        # the first batch filled the shuffle buffer with the whole epoch: all shards were read
        skipped = source.train.skipped_samples()
        for batch in itertools.islice(stream, 2):  # the rest of the 12-sample epoch
            seen.update(batch["keys"])
    assert skipped[reason] >= 1, skipped
    if lost is not None:
        assert sum(skipped.values()) == lost, skipped
    first, third = set(list(written.samples)[:4]), set(list(written.samples)[8:])
    assert first | third <= seen  # the intact shards are read in full
    if edit is not None:
        assert "d00005" not in seen
    assert any(reason in r.getMessage() and "skipped so far" in r.getMessage()
               for r in caplog.records)


def test_missing_caption_is_skipped(tmp_path):
    model = train_text_model(tmp_path / "spm.model")
    written = write_dataset(tmp_path / "t", 8, 4, text_model=model,
                            mutate=_sample_edit(lambda s: s.pop("txt")))
    source = make_source(written.pattern, flags=("--max-bad-sample-fraction", "0.5"))
    assert "d00005" not in keys(take(source, 2, 4))
    assert source.train.skipped_samples() == {MISSING_CONDITION: 1}


def test_too_many_bad_samples_stop_the_run(tmp_path):
    def drop_tokens(i, sample):
        if i % 4 == 0:
            sample.pop("tokens.npy")
    written = write_dataset(tmp_path / "a", 40, 5, mutate=drop_tokens)
    tolerant = make_source(written.pattern, workers=2, flags=("--max-bad-sample-fraction", "0.3"))
    assert len(take(tolerant, 10, 2)) == 10  # 25% bad is accepted
    assert sum(tolerant.train.skipped_samples().values()) >= 2  # reported from the workers
    strict = make_source(written.pattern, workers=2,
                         flags=("--max-bad-sample-fraction", "0.1"))
    with pytest.raises(BadDataError, match=r"more than --max-bad-sample-fraction 0\.1"):
        take(strict, 20, 2)


def test_manifest_must_fit_the_model(tmp_path):
    manifest = write_dataset(tmp_path / "a", 4, 4).manifest
    needed_vocab, needed_seq = manifest.vocab.size, manifest.layout.input_length
    check_manifest_against_model(manifest, needed_vocab + 10, needed_seq)
    with pytest.raises(ValueError, match=f"{needed_vocab} ids.*vocabulary size is 40"):
        check_manifest_against_model(manifest, 40, needed_seq)
    with pytest.raises(ValueError, match=f"{needed_seq} input tokens.*--seq-length is 20"):
        check_manifest_against_model(manifest, needed_vocab, 20)


def test_inconsistent_datasets_fail_at_start(tmp_path):
    a = write_dataset(tmp_path / "a", 4, 4, name="a")
    b = write_dataset(tmp_path / "b", 4, 4, name="b")
    manifest = (tmp_path / "b" / "manifest.json")
    manifest.write_text(manifest.read_text().replace(f'"num_classes": {CLASSES}',
                                                     '"num_classes": 9'))
    with pytest.raises(ValueError, match="num_classes is 5 in .* but 9 in"):
        make_source("1", a.pattern, "1", b.pattern)
    with pytest.raises(ValueError, match="not listed in"):
        make_source(str(tmp_path / "a" / "a-000009.tar"))


def test_loader_benchmark_smoke(tmp_path, dist_world_of_one, capsys):
    from localopt_plugin.bench import loader

    parser = argparse.ArgumentParser()
    loader.add_args(parser)
    out = tmp_path / "loader.json"
    args = parser.parse_args([
        "--samples", "128", "--shard-samples", "32", "--runs", "2", "--batches", "8",
        "--model-steps", "1", "--min-ratio", "0", "--json", str(out),
        "--model-flags", "--num-layers 1 --hidden-size 32 --num-attention-heads 2"])
    assert loader.main(args) == 0
    assert "loader / model" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["loader"]["samples/s"] > 0 and result["loader"]["MB/s"] > 0
    assert result["ratio"] == result["loader"]["samples/s"] / result["model"]["samples/s"]
