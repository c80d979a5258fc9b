"""Named failpoints for tests, as etcd's gofail: off unless FLEETMATE_FAILPOINTS names them.

FLEETMATE_FAILPOINTS="log.apply=raise;log.before_append=sleep(0.5)" makes `hit("log.apply")` raise
and `hit("log.before_append")` sleep. Actions: `raise` (FailpointError), `sleep(SECONDS)` (blocks
the thread: the point is to stall), `kill` (SIGKILL to this process, a crash at that very line),
and `N*ACTION` to act on the N-th hit only (`3*kill`). The variable is read once at start; with it
unset every `hit()` is one dictionary lookup on an empty dict.

The points (docs/durability.md, "Failpoints", says what a kill at each one shows):

- `log.before_append` (app/log/batcher.py): an entry's publish is about to be tried; nothing sent.
- `log.after_append` (app/log/batcher.py): JetStream stored the entry; not applied nor answered.
- `log.apply` (app/log/engine.py): the next entry is read from the log and about to be applied.
- `snapshot.write` (app/storage/snapshots/): in the middle of saving a snapshot: the file store
  has written half the blob to its temporary file (nothing renamed); S3 holds the blob but not
  the meta object that lists it; the SQL stores have inserted the meta row and every chunk in a
  transaction not yet committed.
- `log.trim` (app/log/snapshots.py, Snapshotter._trim_behind): the leader has saved a snapshot
  and chosen the sequence to trim the log through; the purge is not sent.
- `snapshot.restore` (app/log/snapshots.py, Snapshotter.restore): a replica starting with
  nothing or behind a trimmed log has read and checked a snapshot, not installed it yet;
  (app/cli/restore.py) `fleetmate restore` has saved the restored snapshot to the store and
  is about to install it into each registry file of the data directory, then empty the log.
- `scheduler.step` (app/services/scheduler/leader.py): the scheduling leader decided a batch of
  procedure steps (Advance/Expire) and appended none; `scheduler.stepped`: they are appended
  and applied, their assignments not yet pushed (tests/test_scheduler_crash.py kills there).
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


def configure(text: str) -> None:
    """Replace the failpoints of this process (in-process tests; a subprocess takes FLEETMATE_FAILPOINTS)."""
    global _points
    _points = parse(text)
    _hits.clear()


def enabled() -> list[str]:
    """The names of the failpoints set for this process."""
    return sorted(_points)
