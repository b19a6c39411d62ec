"""Regenerate (or check) localopt_plugin/training/megatron_lm_flags.json: every flag of
Megatron-LM's own parser (``megatron.training.arguments.add_megatron_arguments``), with how
many values it takes and, for a flag that takes values, its default, so that localopt-train
recognises each by name and its tests hold the plugin's defaults to Megatron-LM's.

    .venv312/bin/python tools/megatron_lm_flags.py           # rewrite the list
    .venv312/bin/python tools/megatron_lm_flags.py --check   # exit 1 if a flag is missing

Needs Megatron-LM's ``megatron.training`` (megatron-core >= 0.17 on Python >= 3.12:
``bash tools/setup_megatron_lm_env.sh``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LIST = Path(__file__).resolve().parents[1] / "localopt_plugin/training/megatron_lm_flags.json"


def _jsonable(value):
    """A default as JSON holds it (an object that JSON cannot hold: its repr)."""
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def installed_flags() -> tuple[str, dict[str, int | str], dict[str, object]]:
    """(megatron-core version, option string -> nargs: 0 for a switch, 1 for one value,
    option string -> default of each flag that takes values)."""
    import megatron.core
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    flags: dict[str, int | str] = {}
    defaults: dict[str, object] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        nargs = 1 if action.nargs is None else action.nargs
        for option in action.option_strings:
            flags[option] = nargs
            if nargs != 0:
                defaults[option] = _jsonable(action.default)
    return (megatron.core.__version__.split("+")[0], dict(sorted(flags.items())),
            dict(sorted(defaults.items())))


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--check", action="store_true",
                     help="compare with the installed Megatron-LM instead of writing")
    version, flags, defaults = installed_flags()
    if cli.parse_args().check:
        stored = json.loads(LIST.read_text())
        listed, listed_defaults = stored["flags"], stored["defaults"]
        missing = sorted(set(flags) - set(listed))
        changed = sorted(f for f in set(flags) & set(listed) if flags[f] != listed[f])
        moved = sorted(f for f in defaults if listed_defaults.get(f, defaults[f]) != defaults[f])
        for flag in missing:
            print(f"missing from {LIST.name}: {flag}")
        for flag in changed:
            print(f"takes {flags[flag]} values in Megatron-LM {version}, {listed[flag]} listed: "
                  f"{flag}")
        for flag in moved:
            print(f"defaults to {defaults[flag]!r} in Megatron-LM {version}, "
                  f"{listed_defaults[flag]!r} listed: {flag}")
        if missing or changed or moved:
            print(f"regenerate: python {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{LIST.name} covers Megatron-LM {version}'s {len(flags)} flags")
        return 0
    LIST.write_text(json.dumps({
        "megatron_core": version,
        "regenerate": "python tools/megatron_lm_flags.py  (in .venv312)",
        "flags": flags, "defaults": defaults}, indent=0) + "\n")
    print(f"wrote {len(flags)} flags of Megatron-LM {version} to {LIST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
