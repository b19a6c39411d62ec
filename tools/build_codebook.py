"""Cut fsq-video's codebook to the ids of one procedural variant (what fsq-video-simple ships).

    .venv/bin/python tools/build_codebook.py --background simple --seeds-per-class 100 \
        --output localopt_plugin/tokenizers/weights/fsq_video_simple_codes.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localopt_plugin.data.procedural import BACKGROUNDS
from localopt_plugin.tokenizers import build_tokenizer
from localopt_plugin.tokenizers.fsq import SIMPLE_CODES_NAME, shipped_path
from localopt_plugin.tokenizers.training import variant_codebook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--background", default="simple", choices=BACKGROUNDS)
    parser.add_argument("--seeds-per-class", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default for --background simple: the shipped "
                        "codebook of fsq-video-simple)")
    args = parser.parse_args(argv)
    if args.output is None:
        if args.background != "simple":
            parser.error("--output is needed for a background other than simple")
        args.output = shipped_path(SIMPLE_CODES_NAME)
    record = variant_codebook(build_tokenizer("fsq-video"), args.background,
                              args.seeds_per_class)
    record["command"] = shlex.join(["python", "tools/build_codebook.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    args.output.write_text(json.dumps(record) + "\n")
    print(f"{len(record['codes'])} ids; distinct clips per class: "
          f"{record['distinct_clips_per_class']} -> {args.output}")


if __name__ == "__main__":
    main()
