"""Cut fsq-video's codebook to the ids of one procedural variant (what fsq-video-simple and
fsq-video-recall ship).

    .venv/bin/python tools/build_codebook.py --background simple --seeds-per-class 100
    .venv/bin/python tools/build_codebook.py --background recall   # every clip of the variant
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localopt_plugin.data.procedural import BACKGROUNDS
from localopt_plugin.tokenizers import build_tokenizer
from localopt_plugin.tokenizers.fsq import RECALL_CODES_NAME, SIMPLE_CODES_NAME, shipped_path
from localopt_plugin.tokenizers.training import recall_codebook, variant_codebook

SHIPPED = {"simple": SIMPLE_CODES_NAME, "recall": RECALL_CODES_NAME}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--background", default="simple", choices=(*BACKGROUNDS, "recall"))
    parser.add_argument("--seeds-per-class", type=int, default=100,
                        help="seeds rendered per class (not for recall: it takes every clip)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default for simple and recall: the shipped codebook)")
    args = parser.parse_args(argv)
    if args.output is None:
        if args.background not in SHIPPED:
            parser.error(f"--output is needed for a background other than {' or '.join(SHIPPED)}")
        args.output = shipped_path(SHIPPED[args.background])
    tokenizer = build_tokenizer("fsq-video")
    if args.background == "recall":
        record = recall_codebook(tokenizer)
        found = f"{record['clips']} clips"
    else:
        record = variant_codebook(tokenizer, args.background, args.seeds_per_class)
        found = f"distinct clips per class: {record['distinct_clips_per_class']}"
    record["command"] = shlex.join(["python", "tools/build_codebook.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    args.output.write_text(json.dumps(record) + "\n")
    print(f"{len(record['codes'])} ids; {found} -> {args.output}")


if __name__ == "__main__":
    main()
