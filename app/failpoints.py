"""Named failpoints for tests, as etcd's gofail: off unless FLEETMATE_FAILPOINTS names them.

FLEETMATE_FAILPOINTS="log.apply=raise;log.before_append=sleep(0.5)" makes `hit("log.apply")` raise
and `hit("log.before_append")` sleep. Actions: `raise` (FailpointError), `sleep(SECONDS)` (blocks
the thread: the point is to stall), `kill` (SIGKILL to this process, a crash at that very line),
and `N*ACTION` to act on the N-th hit only (`3*kill`). The variable is read once at start; with it
unset every `hit()` is one dictionary lookup on an empty dict.
"""

from __future__ import annotations

import os
import re
import signal
import time

ENV = "FLEETMATE_FAILPOINTS"
_ACTION = re.compile(r"^(?:(\d+)\*)?(raise|kill|sleep\((\d+(?:\.\d+)?)\))$")


class FailpointError(RuntimeError):
    """Raised by a failpoint set to `raise`."""


def parse(text: str) -> dict[str, tuple[int, str, float]]:
    """name -> (on which hit, 0 = every one; action; seconds for sleep). ValueError names a bad entry."""
    out: dict[str, tuple[int, str, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, action = item.partition("=")
        found = _ACTION.match(action.strip())
        if not sep or not name.strip() or found is None:
            raise ValueError(f"{ENV}: {item!r} is not NAME=raise|kill|sleep(SECONDS), optionally N*ACTION")
        nth, verb, seconds = found.groups()
        out[name.strip()] = (int(nth or 0), verb if not verb.startswith("sleep") else "sleep", float(seconds or 0))
    return out


try:
    _points = parse(os.environ.get(ENV, ""))
    error: str | None = None  # the configuration loader refuses to start with it (exit 2)
except ValueError as exc:
    _points, error = {}, str(exc)
_hits: dict[str, int] = {}


def hit(name: str) -> None:
    """Act if the failpoint `name` is enabled (see the module's docstring)."""
    point = _points.get(name)
    if point is None:
        return
    nth, action, seconds = point
    _hits[name] = count = _hits.get(name, 0) + 1
    if nth and count != nth:
        return
    if action == "raise":
        raise FailpointError(f"failpoint {name}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)


def enabled() -> list[str]:
    """The names of the failpoints set for this process."""
    return sorted(_points)
