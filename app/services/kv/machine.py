"""One log partition's state machine, pure: the shards this replica holds, their keys, splits and merges.

Every replica that follows a partition applies every entry, but keeps data only for the shards it
holds; commands for other shards are answered `NotHeld` and change nothing. Which shards a replica
holds is its own business (the scheduler's assignment, imports and drops): that part is local and
goes through `want`, `install` and `drop`, never through the log. Every holder of a shard applies the
same commands for it from the same image at the same positions, so all copies agree.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import msgspec
from sortedcontainers import SortedDict

from app.services.kv.errors import KvError, NotHeld, Refused, RevisionMismatch, StaleEpoch
from app.services.kv.messages import (
    NO_CHECK,
    Batch,
    Command,
    Create,
    Delete,
    Expire,
    KeyEvent,
    Merge,
    Put,
    ShardChanged,
    ShardEvent,
    Split,
    Written,
    revision,
)

Event = KeyEvent | ShardEvent


def nbytes(text: str) -> int:
    """UTF-8 length of a text (the common ASCII case without encoding it)."""
    return len(text) if text.isascii() else len(text.encode())


class Item(msgspec.Struct, array_like=True):
    """A key's value and stat: the revision that created it, the last that changed it, its write count;
    when it expires (ms, 0: never) and the registry session it lives with (0: none)."""

    value: str
    create: int
    mod: int
    version: int
    expires: int = 0
    session: int = 0


class Held:
    """A shard this replica holds: its range and data epoch, and its keys in order."""

    __slots__ = ("end", "epoch", "id", "items", "since", "size", "start", "timed", "writes")

    def __init__(
        self,
        shard: int,
        start: str,
        end: str,
        epoch: int = 1,
        items: SortedDict[str, Item] | None = None,
        since: int = 0,
    ) -> None:
        self.id = shard
        self.start = start
        self.end = end  # "": the top of the key space
        self.epoch = epoch
        self.items: SortedDict[str, Item] = items if items is not None else SortedDict()
        self.since = since  # commands at log positions <= since are in the data already (an imported image)
        self.size = sum(nbytes(k) + nbytes(v.value) for k, v in self.items.items())
        self.writes = 0
        self.timed = {k for k, v in self.items.items() if v.expires or v.session}  # keys with a TTL or a session

    def covers(self, key: str) -> bool:
        """Whether the key is in [start, end)."""
        return key >= self.start and (not self.end or key < self.end)

    def scan(self, start: str, end: str) -> Iterator[tuple[str, Item]]:
        """Keys in [start, end) ("" end: to the shard's end) in order."""
        for key in self.items.irange(minimum=start, maximum=end or None, inclusive=(True, False)):
            yield key, self.items[key]


class PartitionState:
    """The applied state of one partition on this replica (see the module docstring)."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.held: dict[int, Held] = {}
        self.created: set[int] = set()  # every shard id the log created (held or not): a Create runs once
        self.wanted: set[int] = set()  # local: hold these from their Create on
        self.seq = 0  # the entry being applied
        self.index = 0  # the command's index in it
        self._buffer: list[tuple[int, int, Command]] | None = None  # entries seen while an import runs
        self._importing = 0
        self._reshaped = 0  # counts shards coming and going (locate's sorted starts follow it)
        self._sorted_at = -1
        self._starts: list[tuple[str, int]] = []

    # ---- the log side -----------------------------------------------------------------------

    def begin_entry(self, seq: int) -> None:
        """The commands that follow belong to the entry at stream sequence seq."""
        self.seq = seq
        self.index = 0

    def apply(self, cmd: Command) -> tuple[object, list[Event]]:
        """Apply one command at the current position; a refused command is its error, nothing changed."""
        index = self.index
        self.index += 1
        events: list[Event] = []
        try:
            result = self._apply(cmd, self.seq, index, events)
        except KvError as err:  # events only when a copy turned out wrong and was dropped ("lost")
            return err, events
        except Exception as exc:  # the same on every holder: this command's error, the log goes on
            return KvError(f"{type(cmd).__name__} could not be applied: {exc!r}"), []
        return result, events

    def _apply(self, cmd: Command, seq: int, index: int, events: list[Event]) -> object:
        if isinstance(cmd, Create):
            return self._create(cmd, seq, index, events)
        if isinstance(cmd, Split):
            self.created.add(cmd.child)
        shard = self.held.get(cmd.shard)
        if shard is None and isinstance(cmd, Merge):
            self._lose_merged(cmd, seq, index, events)
        if shard is None or seq <= shard.since:
            if self._buffer is not None and shard is None:
                self._buffer.append((seq, index, cmd))
            raise NotHeld(f"shard {cmd.shard} is not held here")
        if isinstance(cmd, Expire):
            return self._expire(shard, cmd, revision(seq, index), events)
        if cmd.epoch != shard.epoch and not isinstance(cmd, Split | Merge):
            raise StaleEpoch(
                f"shard {shard.id} is at epoch {shard.epoch}, the write was routed at {cmd.epoch}",
                shard.id,
                shard.epoch,
            )
        rev = revision(seq, index)
        match cmd:
            case Put():
                expires = cmd.time_ms + cmd.ttl_ms if cmd.ttl_ms > 0 else 0
                return self._put(shard, cmd.key, cmd.value, cmd.if_revision, rev, events, expires, cmd.session)
            case Delete():
                return self._delete(shard, cmd.key, cmd.if_revision, rev, events)
            case Batch():
                return self._batch(shard, cmd, rev, events)
            case Split():
                return self._split(shard, cmd, rev, events)
            case Merge():
                return self._merge(shard, cmd, rev, events)
        raise KvError(f"unknown command {type(cmd).__name__}")

    def _create(self, cmd: Create, seq: int, index: int, events: list[Event]) -> object:
        if cmd.shard in self.created:
            raise Refused(f"shard {cmd.shard} was created already")
        self.created.add(cmd.shard)
        if cmd.shard in self.wanted:
            self.wanted.discard(cmd.shard)
            self.held[cmd.shard] = Held(cmd.shard, cmd.start, cmd.end, since=seq - 1)
            self._reshaped += 1
            events.append(ShardEvent(cmd.shard, "create", revision(seq, index), 1, cmd.start, cmd.end))
        return ShardChanged(cmd.shard, 1, cmd.start, cmd.end)

    def _check_key(self, shard: Held, key: str) -> None:
        if not shard.covers(key):
            raise StaleEpoch(
                f"key {key!r} is not in shard {shard.id} [{shard.start!r}, {shard.end!r})", shard.id, shard.epoch
            )

    def _put(
        self,
        shard: Held,
        key: str,
        value: str,
        if_rev: int,
        rev: int,
        events: list[Event],
        expires: int = 0,
        session: int = 0,
    ) -> Written:
        self._check_key(shard, key)
        old = shard.items.get(key)
        self._compare(key, old, if_rev)
        self._set(shard, key, value, old, rev, events, expires, session)
        return Written(rev, old.mod if old else 0)

    def _set(
        self,
        shard: Held,
        key: str,
        value: str,
        old: Item | None,
        rev: int,
        events: list[Event],
        expires: int = 0,
        session: int = 0,
    ) -> None:
        if old is None:
            item = Item(value, rev, rev, 1, expires, session)
            shard.size += nbytes(key) + nbytes(value)
        else:
            item = Item(value, old.create, rev, old.version + 1, expires, session)
            shard.size += nbytes(value) - nbytes(old.value)
        shard.items[key] = item
        if expires or session:
            shard.timed.add(key)
        else:
            shard.timed.discard(key)
        shard.writes += 1
        events.append(KeyEvent(shard.id, "put", key, rev, value, item.create, item.version))

    def _unset(self, shard: Held, key: str, old: Item, rev: int, events: list[Event]) -> None:
        del shard.items[key]
        shard.timed.discard(key)
        shard.size -= nbytes(key) + nbytes(old.value)
        shard.writes += 1
        events.append(KeyEvent(shard.id, "delete", key, rev))

    @staticmethod
    def _compare(key: str, old: Item | None, if_rev: int) -> None:
        if if_rev == NO_CHECK:
            return
        have = old.mod if old is not None else 0
        if have != if_rev:
            raise RevisionMismatch(f"key {key!r} is at revision {have}, not {if_rev}", key, have)

    def _delete(self, shard: Held, key: str, if_rev: int, rev: int, events: list[Event]) -> Written:
        self._check_key(shard, key)
        old = shard.items.get(key)
        self._compare(key, old, if_rev)
        if old is None:
            return Written(rev, 0, 0)
        self._unset(shard, key, old, rev, events)
        return Written(rev, old.mod, 1)

    def _batch(self, shard: Held, cmd: Batch, rev: int, events: list[Event]) -> Written:
        for op in cmd.ops:
            self._check_key(shard, op.key)
        for check in cmd.checks:
            self._check_key(shard, check.key)
            self._compare(check.key, shard.items.get(check.key), check.revision)
        deleted = 0
        for op in cmd.ops:
            old = shard.items.get(op.key)
            if op.value is not None:
                self._set(shard, op.key, op.value, old, rev, events)
            elif old is not None:
                self._unset(shard, op.key, old, rev, events)
                deleted += 1
        return Written(rev, 0, deleted)

    def _expire(self, shard: Held, cmd: Expire, rev: int, events: list[Event]) -> Written:
        deleted = 0
        for key, at in cmd.keys:
            old = shard.items.get(key)
            if old is not None and old.mod == at and shard.covers(key):
                self._unset(shard, key, old, rev, events)
                deleted += 1
        return Written(rev, 0, deleted)

    def _split(self, shard: Held, cmd: Split, rev: int, events: list[Event]) -> ShardChanged:
        child = self.held.get(cmd.child)
        if child is not None:  # applied already (a retried entry): the same answer
            if shard.end == cmd.key and child.start == cmd.key:
                return ShardChanged(shard.id, shard.epoch, shard.start, shard.end, child.id, child.start, child.end)
            raise Refused(f"shard {cmd.child} exists already")
        if cmd.epoch != shard.epoch:
            raise StaleEpoch(
                f"shard {shard.id} is at epoch {shard.epoch}, the split was asked at {cmd.epoch}", shard.id, shard.epoch
            )
        if cmd.key <= shard.start or (shard.end and cmd.key >= shard.end):
            raise Refused(f"split key {cmd.key!r} is not inside shard {shard.id} [{shard.start!r}, {shard.end!r})")
        cut = shard.items.bisect_left(cmd.key)
        keys = shard.items.keys()
        upper = SortedDict({k: shard.items[k] for k in keys[cut:]})
        lower = SortedDict({k: shard.items[k] for k in keys[:cut]})
        epoch = shard.epoch + 1
        new = Held(cmd.child, cmd.key, shard.end, epoch, upper, since=shard.since)
        new.writes = shard.writes // 2
        shard.items, shard.end, shard.epoch = lower, cmd.key, epoch
        shard.timed -= new.timed
        shard.size -= new.size
        shard.writes -= new.writes
        self.held[new.id] = new
        self._reshaped += 1
        events.append(ShardEvent(shard.id, "split", rev, epoch, shard.start, shard.end, new.id))
        events.append(ShardEvent(new.id, "create", rev, epoch, new.start, new.end, shard.id))
        return ShardChanged(shard.id, epoch, shard.start, shard.end, new.id, new.start, new.end)

    def _lose_merged(self, cmd: Merge, seq: int, index: int, events: list[Event]) -> None:
        """A merge into a shard not held here ends the right-hand shard held alone: the copy is dropped as lost."""
        other = self.held.get(cmd.other)
        if other is None or seq <= other.since:
            return
        del self.held[other.id]
        self._reshaped += 1
        events.append(
            ShardEvent(other.id, "lost", revision(seq, index), other.epoch, other.start, other.end, cmd.shard)
        )
        raise Refused(f"shard {cmd.other} was merged into shard {cmd.shard}, not held here: its copy is dropped")

    def _merge(self, shard: Held, cmd: Merge, rev: int, events: list[Event]) -> ShardChanged:
        if cmd.epoch != shard.epoch:
            raise StaleEpoch(
                f"shard {shard.id} is at epoch {shard.epoch}, the merge was asked at {cmd.epoch}", shard.id, shard.epoch
            )
        other = self.held.get(cmd.other)
        if other is None:
            # The holders of both merge them; a replica holding only this one is left with a copy
            # whose range is now wrong: it is marked lost, and the service drops and re-imports it.
            self.held.pop(shard.id)
            self._reshaped += 1
            events.append(ShardEvent(shard.id, "lost", rev, shard.epoch, shard.start, shard.end, cmd.other))
            raise Refused(f"shard {cmd.other} is not held here: shard {shard.id} is dropped to be copied again")
        if cmd.other_epoch != other.epoch:
            raise StaleEpoch(
                f"shard {other.id} is at epoch {other.epoch}, the merge was asked at {cmd.other_epoch}",
                other.id,
                other.epoch,
            )
        if not shard.end or shard.end != other.start:
            raise Refused(f"shard {shard.id} ends at {shard.end!r}, shard {other.id} starts at {other.start!r}")
        shard.items.update(other.items)
        shard.timed |= other.timed
        shard.size += other.size
        shard.writes += other.writes
        shard.end = other.end
        shard.epoch = max(shard.epoch, other.epoch) + 1
        shard.since = max(shard.since, other.since)
        del self.held[other.id]
        self._reshaped += 1
        events.append(ShardEvent(shard.id, "merge", rev, shard.epoch, shard.start, shard.end, other.id))
        return ShardChanged(shard.id, shard.epoch, shard.start, shard.end, other.id)

    # ---- the local side: which shards this replica holds -----------------------------------

    def want(self, shard: int) -> bool:
        """Hold `shard` from its Create entry on; False when it was created already (copy it instead)."""
        if shard in self.created or shard in self.held:
            return False
        self.wanted.add(shard)
        return True

    def begin_import(self) -> None:
        """From now on keep the commands for shards not held, so an image taken later can be caught up."""
        self._importing += 1
        if self._buffer is None:
            self._buffer = []

    def end_import(self) -> None:
        """An import finished or failed: stop keeping commands when none is left running."""
        self._importing = max(0, self._importing - 1)
        if not self._importing:
            self._buffer = None

    def install(self, shard: Held) -> list[int]:
        """Hold an imported shard copy (its `since` the position its image covers), caught up with what
        arrived since; the ids now held (the shard and any shard split off it while it came)."""
        if shard.id in self.held:
            raise Refused(f"shard {shard.id} is held already")
        self.held[shard.id] = shard
        self._reshaped += 1
        self.created.add(shard.id)
        ours = {shard.id}
        buffered, self._buffer = self._buffer or [], None  # replaying must not buffer again
        try:
            for seq, index, cmd in buffered:
                other = cmd.other if isinstance(cmd, Merge) else None
                if cmd.shard not in ours and other not in ours:
                    continue
                target = self.held.get(cmd.shard if cmd.shard in ours else other or 0)
                if target is None or seq <= target.since:
                    continue
                result, _ = self._replay(cmd, seq, index)
                if isinstance(result, ShardChanged) and isinstance(cmd, Split) and cmd.child in self.held:
                    ours.add(cmd.child)
                ours &= set(self.held)  # merged away, or dropped as lost
        finally:
            self._buffer = buffered if self._importing else None
        for sid in ours:  # what arrived before now is in the copy; the log goes on from here
            self.held[sid].since = max(self.held[sid].since, self.seq)
        return sorted(ours)

    def _replay(self, cmd: Command, seq: int, index: int) -> tuple[object, list[Event]]:
        saved, self.seq, self.index = (self.seq, self.index), seq, index
        try:
            return self.apply(cmd)
        finally:
            self.seq, self.index = saved

    def drop(self, shard: int) -> Held | None:
        """Stop holding a shard (the scheduler moved it away); its copy, to delete from the store."""
        self.wanted.discard(shard)
        self._reshaped += 1
        return self.held.pop(shard, None)

    def load(self, held: dict[int, Held], created: set[int]) -> None:
        """Hold these copies (read back from the local file), forgetting any held before."""
        self.held = held
        self.created = created
        self._reshaped += 1

    def locate(self, key: str) -> Held | None:
        """The held shard whose range covers the key."""
        if self._sorted_at != self._reshaped:  # shards came or went: sort their starts again
            self._sorted_at = self._reshaped
            self._starts = sorted((s.start, s.id) for s in self.held.values())
        i = bisect.bisect_right(self._starts, (key, 1 << 62)) - 1
        if i < 0:
            return None
        shard = self.held.get(self._starts[i][1])
        return shard if shard is not None and shard.covers(key) else None
