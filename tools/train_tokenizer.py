"""Train the embedded fsq-video tokenizer on procedural videos (CPU, deterministic).

    .venv/bin/python tools/train_tokenizer.py --steps 1600 --batch-size 6 --seed 0 \
        --output localopt_plugin/tokenizers/weights/fsq_video.pt
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localopt_plugin.tokenizers.fsq import default_weights_path
from localopt_plugin.tokenizers.training import train_fsq_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=default_weights_path(),
                        help="weights file (.pt); a .json record is written beside it")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--num-frames", type=int, default=9, help="frames per training clip")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--channels", type=int, default=None, help="override model width")
    args = parser.parse_args(argv)
    config = {"channels": args.channels} if args.channels else None
    command = shlex.join(["python", "tools/train_tokenizer.py", *(sys.argv[1:] if argv is None
                                                                  else argv)])
    record = train_fsq_tokenizer(args.output, steps=args.steps, seed=args.seed,
                                 batch_size=args.batch_size, num_frames=args.num_frames,
                                 lr=args.lr, threads=args.threads, config=config,
                                 command=command)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
