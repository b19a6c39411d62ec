"""Train the embedded video classifier (the evaluator of generated videos) and write its weights.

    python tools/train_classifier.py            # -> localopt_plugin/evaluation/weights/
    python tools/train_classifier.py --steps 200 --out /tmp/classifier.pt   # a quick check

Prints and writes (next to the weights, ``.json``) the training record and the accuracy on
held-out clips of every background, crisp and through the embedded tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localopt_plugin.evaluation.classifier import default_weights_path, train_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_weights_path())
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--clips", type=int, default=5760)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = "python tools/train_classifier.py " + shlex.join(argv or sys.argv[1:])
    record = train_classifier(args.out, steps=args.steps, seed=args.seed,
                              batch_size=args.batch_size, clips=args.clips,
                              threads=args.threads, command=command.strip())
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
