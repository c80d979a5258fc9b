"""The KV's log commands (one partition's entries) and the results apply gives back."""

from __future__ import annotations

import msgspec

# A key's revision is its position in its partition's log: the entry's stream sequence shifted
# left by REV_SHIFT, plus the command's index in that entry (the batcher puts at most 1,024
# commands in an entry). Every holder of a shard computes the same revisions.
REV_SHIFT = 16
NO_CHECK = -1  # if_revision: write whatever is there; 0: only if the key does not exist


def revision(seq: int, index: int) -> int:
    """The revision of the command at `index` in the entry at stream sequence `seq`."""
    return (seq << REV_SHIFT) | index


class Create(msgspec.Struct, frozen=True, tag="create", array_like=True):
    """A shard comes into being, empty, with its key range ("" as end: the top of the key space)."""

    shard: int
    start: str
    end: str
    time_ms: int = 0


class Put(msgspec.Struct, frozen=True, tag="put", array_like=True):
    """Set a key in a shard at the shard's data epoch; if_revision >= 0 makes it a compare-and-set.

    ttl_ms: the key expires that long after time_ms (the appender's clock); session: the key lives
    as long as that registry session (0: neither). A put without them makes the key lasting again."""

    shard: int
    epoch: int
    key: str
    value: str
    if_revision: int = NO_CHECK
    time_ms: int = 0
    ttl_ms: int = 0
    session: int = 0


class Delete(msgspec.Struct, frozen=True, tag="del", array_like=True):
    """Delete a key; if_revision >= 1 deletes only that revision of it."""

    shard: int
    epoch: int
    key: str
    if_revision: int = NO_CHECK
    time_ms: int = 0


class Check(msgspec.Struct, frozen=True, array_like=True):
    """A batch's condition: the key's revision is `revision` (0: the key does not exist)."""

    key: str
    revision: int


class Op(msgspec.Struct, frozen=True, array_like=True):
    """One write of a batch: a put (value given) or a delete (value None)."""

    key: str
    value: str | None = None


class Batch(msgspec.Struct, frozen=True, tag="batch", array_like=True):
    """Writes within one shard, all or none, if every check holds."""

    shard: int
    epoch: int
    ops: tuple[Op, ...]
    checks: tuple[Check, ...] = ()
    time_ms: int = 0


class Split(msgspec.Struct, frozen=True, tag="split", array_like=True):
    """Split a shard at a key: [start, key) stays, [key, end) becomes shard `child`; both get epoch + 1."""

    shard: int
    epoch: int
    key: str
    child: int
    time_ms: int = 0


class Merge(msgspec.Struct, frozen=True, tag="merge", array_like=True):
    """A shard takes in its right neighbour `other` (which ends); the result's epoch passes both."""

    shard: int
    epoch: int
    other: int
    other_epoch: int
    time_ms: int = 0


class Expire(msgspec.Struct, frozen=True, tag="expire", array_like=True):
    """The shard's leader ends keys whose time ran out or whose session closed: each is deleted only if it
    is still at the revision named (a key written again since lives on)."""

    shard: int
    keys: tuple[tuple[str, int], ...]
    why: str = "ttl"
    time_ms: int = 0


Command = Create | Put | Delete | Batch | Split | Merge | Expire


class Entry(msgspec.Struct, array_like=True):
    """One log entry: a batch of commands."""

    commands: list[Command]


# ---- results --------------------------------------------------------------------------------


class Written(msgspec.Struct, frozen=True):
    """A write applied: the revision it made, and the one the key had before (0: none)."""

    revision: int
    prev_revision: int = 0
    deleted: int = 0


class ShardChanged(msgspec.Struct, frozen=True):
    """A split or merge applied: the shards' epochs and ranges after it."""

    shard: int
    epoch: int
    start: str
    end: str
    other: int = 0
    other_start: str = ""
    other_end: str = ""


# ---- events (for watches and the shard table) -------------------------------------------------


class KeyEvent(msgspec.Struct, frozen=True):
    """A key changed: put (value set) or delete, at a revision, in a shard."""

    shard: int
    kind: str  # "put" | "delete"
    key: str
    revision: int
    value: str = ""
    create_revision: int = 0
    version: int = 0


class ShardEvent(msgspec.Struct, frozen=True):
    """A shard was created, split, merged, or dropped here, at a revision."""

    shard: int
    kind: str  # "create" | "split" | "merge"
    revision: int
    epoch: int
    start: str
    end: str
    other: int = 0
