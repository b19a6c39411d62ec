#!/usr/bin/env python3
"""The size of a copy of the working tree (tracked files and untracked files git does not
ignore) plus extra folders, by top-level folder; fails above --limit-mib. For moving the
repository and an offline wheel bundle (tools/gpu_wheels.sh) to a machine whose transfer is
capped: the default 55 MiB leaves room under a 64 MiB cap for the logs a rerun adds.

    python tools/travel_size.py --carry gpu_wheels [--limit-mib 55]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def tree_files(repo: str) -> list[str]:
    """Paths git would hand over: tracked, plus untracked files that are not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(repo, p))]


def carried_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"error: carried path {path} does not exist (fetch it first)")
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", action="append", default=[],
                        help="a path the device call names in carry (repeatable)")
    parser.add_argument("--limit-mib", type=float, default=55.0)
    args = parser.parse_args(argv)
    sizes: dict[str, int] = defaultdict(int)
    for path in tree_files(REPO):
        top = path.split("/", 1)[0] if "/" in path else "(root files)"
        sizes[top] += os.path.getsize(os.path.join(REPO, path))
    for carry in args.carry:
        path = carry if os.path.isabs(carry) else os.path.join(REPO, carry)
        sizes[f"{carry} (carried)"] += sum(os.path.getsize(f) for f in carried_files(path))
    total = sum(sizes.values())
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{size / MIB:8.2f} MiB  {name}")
    print(f"{total / MIB:8.2f} MiB  total (limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * MIB:
        print(f"error: {total / MIB:.1f} MiB would travel, over {args.limit_mib:g} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
