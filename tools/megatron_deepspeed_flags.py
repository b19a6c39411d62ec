"""Regenerate (or check) localopt_plugin/training/megatron_deepspeed_flags.json: every flag of
Megatron-DeepSpeed's parser (``megatron/arguments.py``), with how many values it takes and, for
a flag that takes values and has a literal default, that default, so that localopt-train knows
each by name (honoured, mapped or refused; never "unrecognized") and can say where its default
differs from Megatron-LM's.

Megatron-DeepSpeed's ``megatron`` package cannot be imported beside Megatron-Core's, so the
flags are read from the source's ``add_argument`` calls::

    git -C Megatron-DeepSpeed show COMMIT:megatron/arguments.py > arguments.py
    python tools/megatron_deepspeed_flags.py arguments.py --commit COMMIT           # rewrite
    python tools/megatron_deepspeed_flags.py arguments.py --commit COMMIT --check   # compare

The list in the package was made from deepspeedai/Megatron-DeepSpeed's last commit,
4efb479d5317ce9b86096b9d8e3e8030b0b5263b (2025-07-16).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

LIST = (Path(__file__).resolve().parents[1]
        / "localopt_plugin/training/megatron_deepspeed_flags.json")
SWITCHES = {"store_true", "store_false", "store_const", "count"}


def _constant(node: ast.AST):
    return node.value if isinstance(node, ast.Constant) else None


def source_flags(source: str) -> dict[str, int | str]:
    """Option string -> nargs (0 for a switch, 1 for one value, or argparse's '+'/'*'/N) of
    every ``add_argument`` call in ``source``."""
    return {flag: nargs for flag, (nargs, _) in _read(source).items()}


def source_defaults(source: str) -> dict[str, object]:
    """Option string -> default of every flag in ``source`` that takes values and whose
    default is a literal (argparse's None where none is written)."""
    return {flag: default for flag, (nargs, default) in _read(source).items()
            if nargs != 0 and default is not _NOT_LITERAL}


_NOT_LITERAL = object()


def _read(source: str) -> dict[str, tuple[int | str, object]]:
    flags: dict[str, tuple[int | str, object]] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        options = [v for v in map(_constant, node.args) if isinstance(v, str)
                   and v.startswith("--")]
        keywords = {k.arg: _constant(k.value) for k in node.keywords}
        if keywords.get("action") in SWITCHES:
            nargs: int | str = 0
        elif keywords.get("nargs") is not None:
            nargs = keywords["nargs"]
            nargs = 1 if nargs == "?" else nargs
        else:
            nargs = 1
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        try:
            value = None if default is None else ast.literal_eval(default)
        except ValueError:
            value = _NOT_LITERAL
        for option in options:
            flags[option] = (nargs, value)
    return dict(sorted(flags.items()))


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("arguments_py", help="Megatron-DeepSpeed's megatron/arguments.py")
    cli.add_argument("--commit", required=True, help="the commit it was read at")
    cli.add_argument("--check", action="store_true", help="compare instead of writing")
    args = cli.parse_args()
    source = Path(args.arguments_py).read_text()
    flags, defaults = source_flags(source), source_defaults(source)
    if args.check:
        stored = json.loads(LIST.read_text())
        listed = stored["flags"]
        differ = sorted(set(flags) ^ set(listed)) + sorted(
            f for f in set(flags) & set(listed) if flags[f] != listed[f]) + sorted(
            f for f in set(defaults) | set(stored["defaults"])
            if defaults.get(f) != stored["defaults"].get(f))
        for flag in differ:
            print(f"differs from {LIST.name}: {flag}")
        return 1 if differ else 0
    LIST.write_text(json.dumps({
        "source": "deepspeedai/Megatron-DeepSpeed megatron/arguments.py",
        "commit": args.commit,
        "regenerate": "python tools/megatron_deepspeed_flags.py ARGUMENTS_PY --commit COMMIT",
        "flags": flags, "defaults": defaults}, indent=0) + "\n")
    print(f"wrote {len(flags)} flags of Megatron-DeepSpeed {args.commit[:10]} to {LIST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
