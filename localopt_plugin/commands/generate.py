"""``localopt-generate``: sample videos from a trainer checkpoint and write mp4, GIF and a grid.

Example::

    localopt-generate --checkpoint runs/wds/checkpoints --out samples/ --class-labels 0 1 2 \\
        --top-k 100 --cfg-scale 3 --mode full
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from localopt_plugin.generation.generate import (
    class_conditions,
    decode_videos,
    load_context,
    prompt_conditions,
    write_videos,
)
from localopt_plugin.generation.sampling import SamplingConfig, sample_video_tokens

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localopt-generate", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="the trainer's --save directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    p.add_argument("--out", required=True, help="output directory")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class-labels", type=int, nargs="+", help="one sample per label")
    cond.add_argument("--prompts", nargs="+", help="one sample per prompt (caption data)")
    p.add_argument("--samples-per-condition", type=int, default=1)
    p.add_argument("--num-frames", type=int, default=None,
                   help="latent frames to generate (default: the training sample's)")
    p.add_argument("--mode", choices=["full", "chunked"], default="full",
                   help="full: one context over all frames (the paper's inference); chunked: "
                   "each chunk sees only the previous frames re-positioned from 0 (how the "
                   "fewer-frames baseline generates)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="new latent frames per chunk (default: the training sample's)")
    p.add_argument("--context-frames", type=int, default=None,
                   help="earlier frames each chunk sees (default: --chunk-frames)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole sequence every step (same tokens, slower)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--manifest", default=None,
                   help="the data's manifest.json (default: the one the checkpoint recorded)")
    p.add_argument("--tokenizer-path", default=None,
                   help="weights file (fsq-video) or folder (torchscript) of the tokenizer")
    p.add_argument("--no-progress", action="store_true")
    return p


def _conditions(args: argparse.Namespace, context) -> tuple[torch.Tensor, list[str]]:
    """Condition ids per sample and a file-name stem for each."""
    vocab, layout = context.vocab, context.layout
    n = args.samples_per_condition
    if vocab.text_vocab_size:
        if not args.prompts:
            raise SystemExit("error: this checkpoint is caption-conditioned: pass --prompts")
        prompts = [q for q in args.prompts for _ in range(n)]
        ids = prompt_conditions(vocab, layout, context.text_processor, prompts)
        names = [f"prompt{i // n:02d}_{i % n:02d}" for i in range(len(prompts))]
        return ids, names
    if args.prompts:
        raise SystemExit("error: this checkpoint is class-conditioned: pass --class-labels")
    labels = args.class_labels if args.class_labels else list(range(vocab.num_classes))
    labels = [label for label in labels for _ in range(n)]
    try:
        ids = class_conditions(vocab, labels)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    seen: dict[int, int] = {}
    names = []
    for label in labels:  # classNN_KK: the K-th sample of class NN (labels may repeat)
        names.append(f"class{label:02d}_{seen.get(label, 0):02d}")
        seen[label] = seen.get(label, 0) + 1
    return ids, names


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from localopt_plugin.training.distributed import init_distributed

    init_distributed(seed=args.seed)
    context = load_context(args.checkpoint, args.tag, args.manifest, args.tokenizer_path)
    try:
        config = SamplingConfig(args.temperature, args.top_k, args.top_p, args.cfg_scale)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    conditions, names = _conditions(args, context)
    num_frames = args.num_frames or context.layout.num_frames
    generator = torch.Generator().manual_seed(args.seed)
    tokens = []
    for start in range(0, len(conditions), args.batch_size):
        try:
            tokens.append(sample_video_tokens(
                context.model, context.vocab, context.layout,
                conditions[start:start + args.batch_size], num_frames, config, generator,
                mode=args.mode, chunk_frames=args.chunk_frames,
                context_frames=args.context_frames, use_cache=not args.no_kv_cache,
                show_progress=not args.no_progress))
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    tokens = torch.cat(tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", tokens.cpu().numpy())
    if context.tokenizer is None:
        log.warning("the checkpoint's data has no video tokenizer (e.g. synthetic tokens): "
                    "writing token images (GIF, grid) and no mp4")
    videos = decode_videos(context, tokens)
    written = write_videos(out, videos, names, args.fps, mp4=context.tokenizer is not None)
    settings = {k: v for k, v in vars(args).items() if k != "no_progress"}
    with open(out / "samples.json", "w") as f:
        json.dump({"settings": settings, "iteration": context.meta.get("iteration"),
                   "samples": names, "tokens_shape": list(tokens.shape),
                   "files": [p.name for p in written]}, f, indent=2)
    log.info("wrote %d samples to %s", len(names), out)
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    from localopt_plugin.commands import exit_on_user_error

    return exit_on_user_error(lambda: _main(argv))

if __name__ == "__main__":
    raise SystemExit(main())
