"""The KV partition state machine (app/services/kv/machine.py) against a dict model, across replicas and imports."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sortedcontainers import SortedDict

from app.services.kv.errors import KvError, NotHeld, Refused, RevisionMismatch, StaleEpoch
from app.services.kv.machine import Event, Held, PartitionState
from app.services.kv.messages import (
    NO_CHECK,
    REV_SHIFT,
    Batch,
    Check,
    Command,
    Create,
    Delete,
    KeyEvent,
    Merge,
    Op,
    Put,
    ShardChanged,
    ShardEvent,
    Split,
    Written,
    revision,
)

PARTITION = 7

# Keys and values mix ASCII, the ASCII/non-ASCII edge, 2-, 3- and 4-byte UTF-8 and NUL (the smallest
# non-empty key); "" is a key too (the bottom of the key space).
CHARS = ["a", "b", "k", "m", "z", "\x00", "\x7f", "\x80", "é", "ß", "Ω", "日", "本", "😀", "\U0010fffd"]
KEYS = st.text(alphabet=st.sampled_from(CHARS), max_size=3)
VALUES = st.text(alphabet=st.sampled_from(CHARS), max_size=4)

ShardPrint = tuple[str, str, int, int, tuple[tuple[object, ...], ...]]
Result = tuple[object, list[Event]]


# ---- helpers (independent of the code under test where they check it) --------------------------


def utf8(text: str) -> int:
    """Bytes of a text in UTF-8, the model's own way."""
    return len(text.encode("utf-8"))


def in_range(key: str, start: str, end: str) -> bool:
    """Whether the key is in [start, end), "" end being the top of the key space."""
    return start <= key and (end == "" or key < end)


def shard_print(shard: Held) -> ShardPrint:
    """What every holder of a shard must agree on: range, epoch, size and every key's value and stat."""
    items = tuple((k, *msgspec.structs.astuple(i)) for k, i in shard.items.items())
    return (shard.start, shard.end, shard.epoch, shard.size, items)


def held_prints(state: PartitionState) -> dict[int, ShardPrint]:
    """Each held shard's print."""
    return {sid: shard_print(h) for sid, h in state.held.items()}


def local_prints(state: PartitionState) -> dict[int, tuple[ShardPrint, int, int]]:
    """Held shards with this replica's own counters too (a refused command changes none of it)."""
    return {sid: (shard_print(h), h.writes, h.since) for sid, h in state.held.items()}


def copy_of(shard: Held, since: int) -> Held:
    """An exporter's image of a shard taken at log position `since`: a deep copy of its items."""
    items = SortedDict({k: msgspec.structs.replace(i) for k, i in shard.items.items()})
    return Held(shard.id, shard.start, shard.end, shard.epoch, items, since=since)


def run(state: PartitionState, seq: int, *cmds: Command) -> list[Result]:
    """Apply one entry's commands."""
    state.begin_entry(seq)
    return [state.apply(cmd) for cmd in cmds]


def same_result(a: object, b: object) -> bool:
    """Results agree: equal structs, or errors of the same type and message."""
    if isinstance(a, KvError) or isinstance(b, KvError):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


@dataclass
class Shard:
    """The model's view of a shard: its range and epoch."""

    start: str
    end: str
    epoch: int


@dataclass
class Expect:
    """What a command must give: a result (or an error type) and its events."""

    error: type[KvError] | None = None
    result: object = None
    events: tuple[Event, ...] = ()


# ---- the stateful test ---------------------------------------------------------------------------


class KvMachine(RuleBasedStateMachine):
    """Replica A holds every shard and is checked against a model; replica B holds only what it imports
    (a copy of A's shard taken while B keeps applying, possibly ahead of or behind B), applies the same log
    at its own pace, and must agree with A on every shard it holds after every entry."""

    def __init__(self) -> None:
        super().__init__()
        self.a = PartitionState(PARTITION)
        self.b = PartitionState(PARTITION)
        self.seq = 0
        self.log: list[list[Command]] = [[]]  # by seq (0: nothing)
        self.a_results: list[list[Result]] = [[]]
        self.a_prints: list[dict[int, ShardPrint]] = [{}]  # A's shards after each entry
        self.items: dict[str, tuple[str, int, int, int]] = {}  # key -> value, create, mod, version
        self.shards: dict[int, Shard] = {}
        self.next_id = 1
        self.last_rev = 0
        self.splits: list[tuple[int, int, int]] = []  # (seq, parent, child) of every split applied
        self.entry: list[Command] = []
        self.entry_results: list[Result] = []
        # replica B
        self.b_pos = 0
        self.b_importing = False
        self.b_copy: tuple[Held, int] | None = None  # the image in transit and the position it was taken at
        self.transit: set[int] = set()  # the copied shard and what split off it since the copy
        self.b_owned: set[int] = set()  # what B holds once it reaches the head of the log

    # ---- the model ---------------------------------------------------------------------------

    def fresh_id(self) -> int:
        sid = self.next_id
        self.next_id += 1
        return sid

    def route(self, key: str) -> int:
        found = [sid for sid, s in self.shards.items() if in_range(key, s.start, s.end)]
        assert len(found) == 1, (key, found)
        return found[0]

    def b_side(self, sid: int) -> str:
        if sid in self.transit:
            return "transit"
        return "owned" if sid in self.b_owned else "none"

    def keys_st(self) -> st.SearchStrategy[str]:
        if not self.items:
            return KEYS
        return st.one_of(st.sampled_from(sorted(self.items)), KEYS)

    def have(self, key: str) -> int:
        item = self.items.get(key)
        return item[2] if item else 0

    def cas(self, data: st.DataObject, key: str) -> int:
        """An if_revision for the key: none, its revision, "absent" (0) or a wrong one."""
        mode = data.draw(st.sampled_from(["none", "right", "absent", "wrong"]))
        if mode == "none":
            return NO_CHECK
        if mode == "right":
            return self.have(key)
        if mode == "absent":
            return 0
        return self.have(key) + data.draw(st.integers(1, 3))

    def epoch_for(self, data: st.DataObject, sid: int) -> int:
        """Mostly the shard's epoch; sometimes a stale one."""
        epoch = self.shards[sid].epoch
        if data.draw(st.integers(0, 5)) == 0:
            return epoch - 1 if epoch > 1 else epoch + 1
        return epoch

    # ---- entries -------------------------------------------------------------------------------

    def begin(self) -> None:
        self.seq += 1
        self.a.begin_entry(self.seq)
        self.entry, self.entry_results = [], []

    def finish(self) -> None:
        self.log.append(self.entry)
        self.a_results.append(self.entry_results)
        self.a_prints.append(held_prints(self.a))
        assert len(self.log) == self.seq + 1

    def submit(self, cmd: Command, expect: Expect, changes_created: bool = False) -> None:
        """Apply a command on A and check its result, its events and that an error changed nothing."""
        rev = revision(self.seq, len(self.entry))
        before, created = local_prints(self.a), set(self.a.created)
        result, events = self.a.apply(cmd)
        event(f"{type(cmd).__name__} -> {type(result).__name__}")
        self.entry.append(cmd)
        self.entry_results.append((result, events))
        if expect.error is not None:
            assert type(result) is expect.error, (cmd, result)
            assert events == []
            assert local_prints(self.a) == before, f"refused {cmd} changed the data"
            if not changes_created:
                assert self.a.created == created
            return
        assert result == expect.result, (cmd, result, expect.result)
        assert events == list(expect.events), (cmd, events, expect.events)
        assert rev > self.last_rev
        self.last_rev = rev
        if isinstance(result, Written):
            assert result.revision == rev

    def expect_write(self, cmd: Put | Delete | Batch) -> Expect:
        """Apply a write to the model; what the machine must answer."""
        rev = revision(self.seq, len(self.entry))
        shard = self.shards[cmd.shard]
        if cmd.epoch != shard.epoch:
            return Expect(StaleEpoch)
        if isinstance(cmd, Batch):
            if any(not in_range(op.key, shard.start, shard.end) for op in cmd.ops):
                return Expect(StaleEpoch)
            for check in cmd.checks:
                if not in_range(check.key, shard.start, shard.end):
                    return Expect(StaleEpoch)
                if check.revision != NO_CHECK and self.have(check.key) != check.revision:
                    return Expect(RevisionMismatch)
            events: list[Event] = []
            deleted = 0
            for op in cmd.ops:
                if op.value is not None:
                    events.append(self.model_put(cmd.shard, op.key, op.value, rev))
                elif op.key in self.items:
                    events.append(self.model_delete(cmd.shard, op.key, rev))
                    deleted += 1
            return Expect(result=Written(rev, 0, deleted), events=tuple(events))
        if not in_range(cmd.key, shard.start, shard.end):
            return Expect(StaleEpoch)
        have = self.have(cmd.key)
        if cmd.if_revision not in (NO_CHECK, have):
            return Expect(RevisionMismatch)
        if isinstance(cmd, Put):
            event = self.model_put(cmd.shard, cmd.key, cmd.value, rev)
            return Expect(result=Written(rev, have), events=(event,))
        if cmd.key not in self.items:
            return Expect(result=Written(rev, 0, 0))
        event = self.model_delete(cmd.shard, cmd.key, rev)
        return Expect(result=Written(rev, have, 1), events=(event,))

    def model_put(self, sid: int, key: str, value: str, rev: int) -> KeyEvent:
        old = self.items.get(key)
        create, version = (old[1], old[3] + 1) if old else (rev, 1)  # etcd: version counts writes since creation
        self.items[key] = (value, create, rev, version)
        return KeyEvent(sid, "put", key, rev, value, create, version)

    def model_delete(self, sid: int, key: str, rev: int) -> KeyEvent:
        del self.items[key]
        return KeyEvent(sid, "delete", key, rev)

    def write_cmd(self, data: st.DataObject) -> Put | Delete | Batch:
        """A write routed to the shard covering its key (sometimes at a stale epoch, or to the wrong shard)."""
        kind = data.draw(st.sampled_from(["put", "delete", "batch"]))
        if kind == "batch":
            keys = data.draw(st.lists(self.keys_st(), max_size=4, unique=True))
            sid = self.route(keys[0]) if keys else data.draw(st.sampled_from(sorted(self.shards)))
            if data.draw(st.integers(0, 4)):  # mostly one shard's keys (a cross-shard batch: StaleEpoch)
                keys = [k for k in keys if in_range(k, self.shards[sid].start, self.shards[sid].end)]
            ops: list[Op] = []
            checks: list[Check] = []
            for key in keys:
                role = data.draw(st.sampled_from(["put", "delete", "check", "check+put"]))
                if "check" in role:
                    checks.append(Check(key, self.cas(data, key)))
                if "put" in role:
                    ops.append(Op(key, data.draw(VALUES)))
                elif role == "delete":
                    ops.append(Op(key, None))
            sid = self.misroute(data, sid)
            return Batch(sid, self.epoch_for(data, sid), tuple(ops), tuple(checks))
        key = data.draw(self.keys_st())
        sid = self.misroute(data, self.route(key))
        if kind == "put":
            return Put(sid, self.epoch_for(data, sid), key, data.draw(VALUES), self.cas(data, key))
        return Delete(sid, self.epoch_for(data, sid), key, self.cas(data, key))

    def misroute(self, data: st.DataObject, sid: int) -> int:
        """Sometimes another shard (the key is outside it: StaleEpoch)."""
        if len(self.shards) > 1 and data.draw(st.integers(0, 7)) == 0:
            return data.draw(st.sampled_from(sorted(s for s in self.shards if s != sid)))
        return sid

    def split_cmd(self, data: st.DataObject) -> tuple[Split, Expect] | None:
        rev = revision(self.seq, len(self.entry))
        if data.draw(st.integers(0, 9)) == 0:  # a retried split: the child is the right neighbour already
            pairs = self.neighbours()
            if not pairs:
                return None
            left, right = data.draw(st.sampled_from(pairs))
            ls, rs = self.shards[left], self.shards[right]
            cmd = Split(left, self.epoch_for(data, left), ls.end, right)
            return cmd, Expect(result=ShardChanged(left, ls.epoch, ls.start, ls.end, right, rs.start, rs.end))
        key = data.draw(self.keys_st())
        routed = data.draw(st.integers(0, 4)) > 0  # mostly the key's shard; else any (often Refused)
        sid = self.route(key) if routed else data.draw(st.sampled_from(sorted(self.shards)))
        child = self.fresh_id()
        cmd = Split(sid, self.epoch_for(data, sid), key, child)
        shard = self.shards[sid]
        if cmd.epoch != shard.epoch:
            return cmd, Expect(StaleEpoch)
        if key <= shard.start or (shard.end and key >= shard.end):
            return cmd, Expect(Refused)
        epoch = shard.epoch + 1
        self.shards[child] = Shard(key, shard.end, epoch)
        end, shard.end, shard.epoch = shard.end, key, epoch
        self.splits.append((self.seq, sid, child))
        for family in (self.transit, self.b_owned):
            if sid in family:
                family.add(child)
        events = (
            ShardEvent(sid, "split", rev, epoch, shard.start, key, child),
            ShardEvent(child, "create", rev, epoch, key, end, sid),
        )
        return cmd, Expect(result=ShardChanged(sid, epoch, shard.start, key, child, key, end), events=events)

    def neighbours(self) -> list[tuple[int, int]]:
        """(left, right) pairs of adjacent shards B holds both or neither of (none of them in transit)."""
        by_start = {s.start: sid for sid, s in self.shards.items()}
        pairs = []
        for sid, s in sorted(self.shards.items()):
            right = by_start.get(s.end) if s.end else None
            if right is not None and self.b_side(sid) == self.b_side(right) != "transit":
                pairs.append((sid, right))
        return pairs

    def merge_cmd(self, data: st.DataObject) -> tuple[Merge, Expect] | None:
        rev = revision(self.seq, len(self.entry))
        pairs = self.neighbours()
        if data.draw(st.integers(0, 5)) == 0:  # not neighbours (or a shard with itself): Refused
            pairs = [
                (x, y)
                for x in sorted(self.shards)
                for y in sorted(self.shards)
                if self.shards[x].end != self.shards[y].start and self.b_side(x) == self.b_side(y) != "transit"
            ]
        if not pairs:
            return None
        sid, other = data.draw(st.sampled_from(pairs))
        cmd = Merge(sid, self.epoch_for(data, sid), other, self.epoch_for(data, other))
        shard, right = self.shards[sid], self.shards[other]
        if cmd.epoch != shard.epoch or cmd.other_epoch != right.epoch:
            return cmd, Expect(StaleEpoch)
        if not shard.end or shard.end != right.start:
            return cmd, Expect(Refused)
        shard.end = right.end
        shard.epoch = max(shard.epoch, right.epoch) + 1
        del self.shards[other]
        self.b_owned.discard(other)
        events = (ShardEvent(sid, "merge", rev, shard.epoch, shard.start, shard.end, other),)
        return cmd, Expect(result=ShardChanged(sid, shard.epoch, shard.start, shard.end, other), events=events)

    # ---- rules: the log --------------------------------------------------------------------------

    @initialize(bounds=st.lists(KEYS.filter(bool), max_size=3, unique=True))
    def create_shards(self, bounds: list[str]) -> None:
        """The first entry creates shards tiling the key space."""
        cuts = ["", *sorted(bounds), ""]
        self.begin()
        for start, end in itertools.pairwise(cuts):
            sid = self.fresh_id()
            assert self.a.want(sid)
            self.shards[sid] = Shard(start, end, 1)
            made = ShardEvent(sid, "create", revision(self.seq, len(self.entry)), 1, start, end)
            self.submit(Create(sid, start, end), Expect(result=ShardChanged(sid, 1, start, end), events=(made,)))
            assert not self.a.want(sid)
        self.finish()

    @rule(data=st.data(), size=st.integers(1, 4))
    def entry_of_commands(self, data: st.DataObject, size: int) -> None:
        """One entry of writes, splits, merges and repeated Creates, each checked as it applies."""
        self.begin()
        for _ in range(size):
            kind = data.draw(st.sampled_from(["write"] * 6 + ["split", "split", "merge", "create"]))
            if kind == "write":
                cmd = self.write_cmd(data)
                self.submit(cmd, self.expect_write(cmd))
            elif kind == "split":
                made = self.split_cmd(data)
                if made is not None:
                    self.submit(*made, changes_created=True)
            elif kind == "merge":
                merged = self.merge_cmd(data)
                if merged is not None:
                    self.submit(*merged)
            else:  # a Create runs once: a second one of any id the log made is Refused
                sid = data.draw(st.sampled_from(sorted(self.a.created)))
                self.submit(Create(sid, data.draw(KEYS), ""), Expect(Refused))
                assert not self.a.want(sid)
        self.finish()

    @rule(data=st.data())
    def scan(self, data: st.DataObject) -> None:
        """A held shard's scan of [start, end) is the model's keys there, in order."""
        sid = data.draw(st.sampled_from(sorted(self.shards)))
        start, end = data.draw(KEYS), data.draw(KEYS)
        shard = self.shards[sid]
        want = [
            (k, self.items[k])
            for k in sorted(self.items)
            if in_range(k, shard.start, shard.end) and in_range(k, start, end)
        ]
        got = [(k, (i.value, i.create, i.mod, i.version)) for k, i in self.a.held[sid].scan(start, end)]
        assert got == want

    # ---- rules: replica B ------------------------------------------------------------------------

    @precondition(lambda self: self.b_pos < self.seq)
    @rule(steps=st.integers(1, 6))
    def b_apply(self, steps: int) -> None:
        """B applies the next entries; on every shard it holds it must agree with A after each."""
        self.b_advance(steps)

    def b_advance(self, steps: int) -> None:
        for _ in range(min(steps, self.seq - self.b_pos)):
            self.b_pos += 1
            held_before = {sid: h.since for sid, h in self.b.held.items()}
            results = run(self.b, self.b_pos, *self.log[self.b_pos])
            for cmd, (rb, eb), (ra, ea) in zip(self.log[self.b_pos], results, self.a_results[self.b_pos], strict=True):
                if isinstance(cmd, Create):
                    early = cmd.shard in held_before and self.b_pos <= held_before[cmd.shard]
                    # An image from a later position makes B count the shard created before its Create.
                    assert same_result(rb, ra) or (early and isinstance(rb, Refused))
                    assert eb == []  # B wants nothing
                elif isinstance(rb, NotHeld):
                    assert cmd.shard not in held_before or self.b_pos <= held_before[cmd.shard]
                else:
                    assert same_result(rb, ra), (cmd, rb, ra)
                    assert eb == ea
            self.b_agrees()

    def b_agrees(self) -> None:
        """Every shard B holds (whose image is not from a later position) equals A's at B's position."""
        a_then = self.a_prints[self.b_pos]
        for sid, shard in self.b.held.items():
            if shard.since > self.b_pos:
                continue
            assert sid in a_then, f"B holds shard {sid}, which A does not at {self.b_pos}"
            assert shard_print(shard) == a_then[sid], f"shard {sid} differs at {self.b_pos}"
        for key in self.items:
            found = self.b.locate(key)
            covering = [h for h in self.b.held.values() if in_range(key, h.start, h.end)]
            assert found is (covering[0] if covering else None)

    @precondition(lambda self: not self.b_importing)
    @rule()
    def b_begin_import(self) -> None:
        self.b.begin_import()
        self.b_importing = True

    @precondition(lambda self: not self.b_importing)
    @rule(data=st.data(), before=st.integers(0, 2), during=st.integers(1, 5))
    def b_import_while_the_log_goes_on(self, data: st.DataObject, before: int, during: int) -> None:
        """A whole import: B begins, entries come, A copies a shard, entries (splits too) come while the copy
        travels and B applies some or all of them, then B installs and catches up."""
        self.b_begin_import()
        for _ in range(before):
            self.entry_of_commands(data, data.draw(st.integers(1, 4)))
        self.b_take_copy(data)
        if self.b_copy is None:
            self.b_abandon_import()
            return
        for _ in range(during):
            self.entry_of_commands(data, data.draw(st.integers(1, 4)))
            self.b_advance(data.draw(st.integers(0, 3)))
        self.b_install(catch_up=data.draw(st.booleans()))
        self.b_advance(self.seq - self.b_pos)

    @precondition(lambda self: self.b_copy is None)
    @rule(data=st.data())
    def b_take_copy(self, data: st.DataObject) -> None:
        """The exporter (A) copies a shard B does not hold at the head of the log, at or after B's position
        when B began importing (B begins now if it had not)."""
        candidates = sorted(set(self.shards) - self.b_owned)
        if not candidates:
            return
        if not self.b_importing:
            self.b_begin_import()
        sid = data.draw(st.sampled_from(candidates))
        self.b_copy = (copy_of(self.a.held[sid], since=self.seq), self.seq)
        self.transit = {sid}

    @precondition(lambda self: self.b_copy is not None)
    @rule(catch_up=st.booleans())
    def b_install(self, catch_up: bool) -> None:
        """B installs the copy (after catching up with the log, or where it is): it replays what it kept for
        the shard and what split off it since the copy."""
        assert self.b_copy is not None
        if catch_up:
            self.b_advance(self.seq - self.b_pos)
        image, taken = self.b_copy
        ours = {image.id}
        for seq, parent, child in self.splits:
            if taken < seq <= self.b_pos and parent in ours:
                ours.add(child)
        before = set(self.b.held)
        event(f"install: copy {'behind' if taken < self.b_pos else 'ahead of' if taken > self.b_pos else 'at'} B")
        event(f"install: {len(ours)} shard(s)")
        event(f"install: {min(max(self.b_pos - taken, 0), 3)} entries to replay (3: 3 or more)")
        assert self.b.install(image) == sorted(ours)
        assert set(self.b.held) == before | ours
        assert not before & ours
        self.b.end_import()
        self.b_importing = False
        self.b_copy = None
        self.b_owned |= self.transit
        self.transit = set()
        self.b_agrees()

    @precondition(lambda self: self.b_importing)
    @rule()
    def b_abandon_import(self) -> None:
        """An import fails: the copy (if any) is thrown away and B stops keeping commands."""
        self.b.end_import()
        self.b_importing = False
        self.b_copy = None
        self.transit = set()

    @precondition(lambda self: self.b_pos == self.seq and not self.b_importing and bool(self.b_owned))
    @rule(data=st.data())
    def b_drop(self, data: st.DataObject) -> None:
        """The scheduler moves a shard away from B."""
        sid = data.draw(st.sampled_from(sorted(self.b_owned)))
        dropped = self.b.drop(sid)
        assert dropped is not None
        assert shard_print(dropped) == shard_print(self.a.held[sid])
        self.b_owned.discard(sid)

    # ---- invariants ------------------------------------------------------------------------------

    @invariant()
    def a_matches_the_model(self) -> None:
        held = self.a.held
        assert {sid: (h.start, h.end, h.epoch) for sid, h in held.items()} == {
            sid: (s.start, s.end, s.epoch) for sid, s in self.shards.items()
        }
        union: dict[str, tuple[str, int, int, int]] = {}
        for shard in held.values():
            for key, item in shard.items.items():
                assert in_range(key, shard.start, shard.end), (key, shard.id, shard.start, shard.end)
                assert key not in union
                union[key] = (item.value, item.create, item.mod, item.version)
            assert shard.size == sum(utf8(k) + utf8(i.value) for k, i in shard.items.items())
        assert union == self.items
        assert set(held) <= self.a.created

    @invariant()
    def ranges_tile_the_key_space(self) -> None:
        ranges = sorted((h.start, h.end) for h in self.a.held.values())
        if not ranges:
            return
        assert ranges[0][0] == ""
        assert ranges[-1][1] == ""
        for (start, end), (next_start, _) in itertools.pairwise(ranges):
            assert start < end == next_start
        for key in self.items:
            found = self.a.locate(key)
            assert found is not None
            assert found.id == self.route(key)

    @invariant()
    def b_holds_what_it_owns(self) -> None:
        if self.b_pos == self.seq and self.b_copy is None:
            assert set(self.b.held) == self.b_owned


TestKvMachine = KvMachine.TestCase
TestKvMachine.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---- plain cases -----------------------------------------------------------------------------------


def holding(*shards: tuple[int, str, str], want: tuple[int, ...] | None = None) -> PartitionState:
    """A replica after an entry at seq 1 created the shards, holding those in `want` (all by default)."""
    state = PartitionState(PARTITION)
    for sid, _, _ in shards:
        if want is None or sid in want:
            assert state.want(sid)
    run(state, 1, *(Create(sid, start, end) for sid, start, end in shards))
    return state


def test_create_runs_once() -> None:
    state = holding((1, "", "m"), (2, "m", ""), want=(1,))
    run(state, 2, Put(1, 1, "a", "x"))
    before = local_prints(state)
    [(result, events)] = run(state, 3, Create(1, "", ""))
    assert isinstance(result, Refused)
    assert events == []
    [(result, _)] = run(state, 4, Create(2, "m", ""))  # created by the log, not held here: still once
    assert isinstance(result, Refused)
    assert local_prints(state) == before
    assert not state.want(1)
    assert not state.want(2)
    run(state, 5, Split(1, 1, "g", 3))
    assert not state.want(3)  # a split child is created by the split
    assert state.want(4)


def test_revisions_are_log_positions() -> None:
    state = holding((1, "", ""))
    results = run(state, 2, Put(1, 1, "a", "1"), Put(1, 1, "b", "1"), Put(1, 1, "a", "2"))
    results += run(state, 3, Put(1, 1, "a", "3"))
    revs = [r.revision for r, _ in results if isinstance(r, Written)]
    assert revs == [revision(2, 0), revision(2, 1), revision(2, 2), revision(3, 0)]
    assert revs == sorted(set(revs))


@settings(max_examples=300)
@given(positions=st.lists(st.tuples(st.integers(1, 2**40), st.integers(0, 1023)), min_size=2, unique=True))
def test_revision_order_is_log_order(positions: list[tuple[int, int]]) -> None:
    ordered = sorted(positions)
    revs = [revision(seq, index) for seq, index in ordered]
    assert all(a < b for a, b in itertools.pairwise(revs))
    assert all(rev >> REV_SHIFT == seq for rev, (seq, _) in zip(revs, ordered, strict=True))


def test_versions_follow_etcd() -> None:
    state = holding((1, "", ""))
    item = state.held[1].items
    run(state, 2, Put(1, 1, "k", "a"))
    assert (item["k"].create, item["k"].mod, item["k"].version) == (revision(2, 0), revision(2, 0), 1)
    [(w, _)] = run(state, 3, Put(1, 1, "k", "b"))
    assert w == Written(revision(3, 0), revision(2, 0))
    assert (item["k"].create, item["k"].mod, item["k"].version) == (revision(2, 0), revision(3, 0), 2)
    [(w, events)] = run(state, 4, Delete(1, 1, "k", if_revision=revision(3, 0)))
    assert w == Written(revision(4, 0), revision(3, 0), 1)
    assert events == [KeyEvent(1, "delete", "k", revision(4, 0))]
    [(w, events)] = run(state, 5, Put(1, 1, "k", "c", if_revision=0))
    assert w == Written(revision(5, 0), 0)
    assert (item["k"].create, item["k"].mod, item["k"].version) == (revision(5, 0), revision(5, 0), 1)
    assert events == [KeyEvent(1, "put", "k", revision(5, 0), "c", revision(5, 0), 1)]
    [(err, events)] = run(state, 6, Put(1, 1, "k", "d", if_revision=revision(2, 0)))
    assert isinstance(err, RevisionMismatch)
    assert (err.key, err.revision) == ("k", revision(5, 0))
    assert events == []
    assert item["k"].value == "c"


def test_unicode_and_the_bottom_of_the_key_space() -> None:
    state = holding((1, "", ""))
    keys = {"": "empty", "\x00": "nul", "é": "ü", "日本": "語", "😀": "\U0010fffd", "z": ""}
    run(state, 2, *(Put(1, 1, k, v) for k, v in keys.items()))
    shard = state.held[1]
    assert dict((k, i.value) for k, i in shard.items.items()) == keys
    assert shard.size == sum(utf8(k) + utf8(v) for k, v in keys.items())
    assert shard.size > sum(len(k) + len(v) for k, v in keys.items())
    [(err, _)] = run(state, 3, Split(1, 1, "", 2))  # "" is the shard's start: nothing below it
    assert isinstance(err, Refused)
    [(changed, _)] = run(state, 4, Split(1, 1, "\x00", 2))
    assert changed == ShardChanged(1, 2, "", "\x00", 2, "\x00", "")
    assert list(state.held[1].items) == [""]
    assert state.held[1].size == utf8("empty")
    [(changed, _)] = run(state, 5, Split(2, 2, "é", 3))
    assert list(state.held[2].items) == ["\x00", "z"]
    assert list(state.held[3].items) == ["é", "日本", "😀"]
    assert state.held[3].size == sum(utf8(k) + utf8(keys[k]) for k in ("é", "日本", "😀"))
    [(err, _)] = run(state, 6, Put(2, 3, "😀", "x"))  # outside shard 2 now
    assert isinstance(err, StaleEpoch)
    assert (err.shard, err.epoch) == (2, 3)
    [(changed, _)] = run(state, 7, Merge(2, 3, 3, 3))
    assert changed == ShardChanged(2, 4, "\x00", "", 3)
    assert state.held[2].size == sum(utf8(k) + utf8(v) for k, v in keys.items() if k)


def test_import_with_a_split_in_transit() -> None:
    """The copy is taken at S after B began importing; B keeps applying, the shard splits, then B installs."""
    a = holding((1, "", "m"), (2, "m", ""))
    b = holding((1, "", "m"), (2, "m", ""), want=())
    entries: list[list[Command]] = [
        [Put(1, 1, "a", "1"), Put(2, 1, "n", "1")],
        [Put(1, 1, "c", "2"), Delete(1, 1, "a")],
        [Put(1, 1, "a", "3"), Put(1, 1, "k", "4")],
        [Split(1, 1, "d", 3), Put(1, 2, "b", "5")],
        [Put(3, 2, "k", "6"), Put(3, 2, "e", "7")],
    ]
    seq = 1
    image = None
    for i, cmds in enumerate(entries):
        seq += 1
        if i == 1:
            b.begin_import()
        run(a, seq, *cmds)
        run(b, seq, *cmds)
        if i == 2:
            image = copy_of(a.held[1], since=seq)  # taken after B began, installed two entries later
    assert image is not None
    assert b.install(image) == [1, 3]
    b.end_import()
    more: list[list[Command]] = [[Put(1, 2, "b", "8"), Put(3, 2, "k", "9", if_revision=revision(6, 0))]]
    more += [[Split(3, 2, "h", 4), Put(4, 3, "k", "10")], [Merge(1, 2, 3, 3)]]
    for cmds in [[], *more]:
        if cmds:
            seq += 1
            assert [r for r, _ in run(b, seq, *cmds)] == [r for r, _ in run(a, seq, *cmds)]
        assert held_prints(b) == {sid: shard_print(a.held[sid]) for sid in b.held}
    assert sorted(b.held) == [1, 4]


# ---- merges with one side missing, and merges while a copy is in transit --------------------------


def test_merge_holding_only_the_left_shard_drops_it_and_says_lost() -> None:
    state = holding((1, "", "m"), (2, "m", ""), want=(1,))
    run(state, 2, Put(1, 1, "a", "x"))
    [(result, events)] = run(state, 3, Merge(1, 1, 2, 1))
    assert isinstance(result, KvError)
    assert 1 not in state.held
    assert events == [ShardEvent(1, "lost", revision(3, 0), 1, "", "m", 2)]


def test_merge_holding_only_the_right_shard_drops_it_and_says_lost() -> None:
    state = holding((1, "", "m"), (2, "m", ""), want=(2,))
    run(state, 2, Put(2, 1, "n", "x"))
    [(_, events)] = run(state, 3, Merge(1, 1, 2, 1))
    assert 2 not in state.held, "shard 2 ended in the merge, but this replica still holds its stale copy"
    assert [(e.shard, e.kind) for e in events if isinstance(e, ShardEvent)] == [(2, "lost")]


def import_across(transit: list[list[Command]]) -> tuple[PartitionState, PartitionState, list[int]]:
    """A holds shards 1 [""-"m") and 2 ["m"-""); B copies shard 1 at seq 2 and installs after `transit`."""
    a = holding((1, "", "m"), (2, "m", ""))
    b = holding((1, "", "m"), (2, "m", ""), want=())
    b.begin_import()
    first: list[Command] = [Put(1, 1, "a", "1"), Put(2, 1, "n", "1")]
    run(a, 2, *first)
    run(b, 2, *first)
    image = copy_of(a.held[1], since=2)
    for seq, cmds in enumerate(transit, start=3):
        run(a, seq, *cmds)
        run(b, seq, *cmds)
    ids = b.install(image)
    b.end_import()
    return a, b, ids


@pytest.mark.parametrize(
    "transit",
    [
        pytest.param([[Split(1, 1, "g", 3)], [Merge(1, 2, 3, 2)]], id="split-then-merged-back"),
        pytest.param([[Merge(1, 1, 2, 1)]], id="took-in-its-neighbour"),
        pytest.param([[Split(2, 1, "t", 3)], [Merge(2, 2, 1, 1)]], id="not-a-neighbour"),
    ],
)
def test_install_after_merges_in_transit(transit: list[list[Command]]) -> None:
    """Whatever merged while the copy travelled, install works and B ends with only what A has, equal."""
    a, b, ids = import_across(transit)
    assert set(ids) == set(b.held)
    assert held_prints(b) == {sid: shard_print(a.held[sid]) for sid in b.held if sid in a.held}
    assert set(b.held) <= set(a.held)
    for sid in b.held:
        assert (b.held[sid].start, b.held[sid].end) == (a.held[sid].start, a.held[sid].end)


def test_install_after_the_shard_merged_away_in_transit() -> None:
    """Shard 1 is taken in by its left neighbour while its copy travels: B must not keep it."""
    a = holding((1, "", "g"), (2, "g", ""))
    b = holding((1, "", "g"), (2, "g", ""), want=())
    b.begin_import()
    run(a, 2, Put(2, 1, "k", "1"))
    run(b, 2, Put(2, 1, "k", "1"))
    image = copy_of(a.held[2], since=2)
    run(a, 3, Merge(1, 1, 2, 1))
    run(b, 3, Merge(1, 1, 2, 1))
    b.install(image)
    b.end_import()
    assert 2 not in a.held
    assert 2 not in b.held, "shard 2 ended in a merge while its copy travelled, but B installed it"
