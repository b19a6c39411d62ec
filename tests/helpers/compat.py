"""Real public launch scripts' flags and DeepSpeed JSON files (tests/data/compat), made runnable
here the way docs/from-megatron.md tells a user to: text-data flags replaced by ``--data-path
SHARDS``, fp16/NCCL replaced where there is no GPU, and (for CPU tests only) sizes shrunk while
every other flag name and value is kept."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from helpers.launch import TESTS

COMPAT = TESTS / "data" / "compat"
SCRIPTS = sorted(p.stem for p in (COMPAT / "scripts").glob("*.flags"))
DS_JSONS = sorted(p.stem for p in (COMPAT / "ds_json").glob("*.json"))

# Megatron's text pipeline: what --data-path SHARDS replaces (docs/from-megatron.md)
TEXT_DATA = {"--data-path", "--vocab-file", "--merge-file", "--tokenizer-type",
             "--tokenizer-model", "--data-impl", "--split", "--mock-data", "--vocab-size",
             "--data-cache-path", "--tiktoken-pattern", "--no-mmap-bin-files",
             "--train-desc-path", "--train-doc-idx-path", "--train-idx-path",
             "--train-sample-idx-path", "--train-shuffle-idx-path"}
# model, batch and schedule sizes for a CPU test; token counts are in samples x SEQ_TOKENS
SHRINK = {"--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "128",
          "--num-attention-heads": "4", "--num-query-groups": "2", "--num-key-value-heads": "2",
          "--kv-channels": "16", "--micro-batch-size": "1", "--global-batch-size": "2",
          "--train-iters": "4", "--train-samples": "8", "--lr-warmup-iters": "1",
          "--lr-decay-iters": "4", "--lr-warmup-samples": "2", "--lr-decay-samples": "8",
          "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
          "--exit-duration-in-mins": "30"}
TOKEN_SAMPLES = {"--train-tokens": 8, "--lr-decay-tokens": 8, "--lr-warmup-tokens": 2}
SEQ_TOKENS = 27  # the test shards' sequence (3 condition tokens + 2 frames x 12)
SHRUNK_JSON = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
               "gradient_accumulation_steps": 2}  # with one data-parallel rank


def read_flags(name: str) -> list[list[str]]:
    """A script's arguments as [flag, values...] groups, in its order."""
    groups: list[list[str]] = []
    for line in (COMPAT / "scripts" / f"{name}.flags").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words = shlex.split(line, posix=False)  # keeps '99,1,0' quoted as the script does
            groups.append(words)
    return groups


def read_json(path: Path) -> dict:
    """A fixture JSON without its ``// source:`` line (DeepSpeed's hjson reads it as is)."""
    return json.loads("".join(line for line in path.read_text().splitlines(keepends=True)
                              if not line.lstrip().startswith("//")))


def source_of(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# source: github:", "// source: github:")), path
    return first


def for_this_machine(name: str, shards: str, tmp: Path, *, drop: tuple[str, ...] = (),
                     shrink: bool = True, cpu: bool = True) -> list[str]:
    """Script ``name``'s argv as a user runs it here (see the module docstring)."""
    argv: list[str] = []
    for flag, *values in read_flags(name):
        if flag in TEXT_DATA or flag in drop:
            continue
        if cpu and flag == "--fp16":
            flag = "--bf16"
        if cpu and flag == "--distributed-backend" and values == ["nccl"]:
            values = ["gloo"]
        if shrink and flag in SHRINK:
            values = [SHRINK[flag]]
        if shrink and flag in TOKEN_SAMPLES:
            values = [str(TOKEN_SAMPLES[flag] * SEQ_TOKENS)]
        if shrink and flag in ("--seq-length", "--max-position-embeddings"):
            values = [str(SEQ_TOKENS)]
        if flag in ("--save", "--load"):
            values = [str(tmp / "checkpoints")]
        if flag == "--tensorboard-dir":
            values = [str(tmp / "tensorboard")]
        if flag == "--deepspeed_config":
            own = COMPAT / "scripts" / f"{name}.ds_config.json"
            if not own.exists():  # made from a template that is not a fixture
                continue
            values = [str(_shrunk_json(own, tmp) if shrink else own)]
        argv += [flag, *values]
    return [*argv, "--data-path", shards]


def _shrunk_json(path: Path, tmp: Path, *, bf16_for_fp16: bool = False) -> Path:
    """The JSON with its batch keys set to the shrunk batch sizes (and, with
    ``bf16_for_fp16``, an enabled fp16 section replaced by bf16)."""
    cfg = read_json(path)
    cfg.update({k: v for k, v in SHRUNK_JSON.items() if k in cfg})
    fp16 = cfg.get("fp16")
    if bf16_for_fp16 and isinstance(fp16, dict) and fp16.get("enabled", True):
        del cfg["fp16"]
        cfg["bf16"] = {"enabled": True}
    out = tmp / path.name
    out.write_text(json.dumps(cfg))
    return out


def json_for_this_machine(name: str, tmp: Path, *, cpu: bool = True) -> Path:
    """DeepSpeed JSON ``name`` as a user runs it here: its batch keys shrunk to one process and,
    on a CPU, an enabled fp16 section replaced by bf16 (the edit docs/from-megatron.md names)."""
    return _shrunk_json(COMPAT / "ds_json" / f"{name}.json", tmp, bf16_for_fp16=cpu)
