"""A deterministic place to stop a long job, for the tests that kill and resume it.

With ``LOCALOPT_PAUSE_AT=NAME:N:FILE`` in the environment, a job that calls
``pause_point(NAME, n)`` writes FILE when ``n`` reaches N and then waits there until it is
killed, so a test kills it at a known point instead of racing it. Unset (every real run), the
call returns at once. Only the kill-and-resume tests set it.
"""

from __future__ import annotations

import os
import time

ENV = "LOCALOPT_PAUSE_AT"


def pause_point(name: str, reached: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, count, path = spec.split(":", 2)
    if point != name or reached != int(count):
        return
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    while True:  # until killed
        time.sleep(1)
