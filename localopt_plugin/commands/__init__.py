"""The command-line entry points: thin wrappers that parse flags, resolve configurations and
call the executors. Only here do :class:`~localopt_plugin.errors.UserError` s become
``error: ...`` exits.

==================  ==========================================
command             module
==================  ==========================================
localopt-train      :mod:`.train`
localopt-preprocess :mod:`.preprocess`
localopt-generate   :mod:`.generate`
localopt-eval       :mod:`.evaluate`
localopt-bench      :mod:`.bench`
localopt-report     :mod:`.report`
==================  ==========================================
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence

from localopt_plugin.errors import UserError


def exit_on_user_error(run: Callable[[], int]) -> int:
    """``run()``, with a UserError printed as one ``error:`` line (exit status 2)."""
    try:
        return run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests of the flags given on the command line (not left at their defaults)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))
