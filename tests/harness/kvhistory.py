"""A KV client history (puts with unique values, reads) and its checks: nothing acknowledged lost, nothing applied
twice, reads linearizable. Every write's revision orders it, so a register per key is checked against real time."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

ACKED = "ok"  # the write was acknowledged
FAILED = "fail"  # refused for sure (a 4xx): it did not happen
UNKNOWN = "unknown"  # timed out, 5xx, connection lost: it may have happened


@dataclass(frozen=True)
class Op:
    """One client operation: a put of a unique value, or a get, with its outcome and its times."""

    kind: str  # "put" | "get"
    key: str
    value: str  # put: what it wrote; get: what it read ("" when absent)
    start: float
    end: float
    outcome: str
    revision: int = 0  # put: the revision it made; get: the key's revision read (0: absent)
    version: int = 0  # get: the key's version read
    partition: int = -1  # put: the log partition it landed in (from its read token)


def check(history: list[Op], final: dict[str, tuple[str, int, int]]) -> list[str]:
    """Every violation found (empty: the history is fine). `final` maps key -> (value, revision, version)
    as read linearizably after the load stopped (absent keys left out)."""
    problems: list[str] = []
    puts: dict[str, list[Op]] = defaultdict(list)
    gets: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        (puts if op.kind == "put" else gets)[op.key].append(op)
    for key in sorted(set(puts) | set(gets)):
        problems += _check_key(key, puts[key], gets[key], final.get(key))
    return problems


def _check_key(key: str, puts: list[Op], gets: list[Op], final: tuple[str, int, int] | None) -> list[str]:
    out: list[str] = []
    acked = [p for p in puts if p.outcome == ACKED]
    unknown = [p for p in puts if p.outcome == UNKNOWN]
    by_value = {p.value: p for p in puts if p.outcome != FAILED}
    seen: dict[str, set[int]] = defaultdict(set)  # value -> revisions it was seen at
    revs = [p.revision for p in acked]
    if len(revs) != len(set(revs)):
        out.append(f"{key}: two acknowledged writes got the same revision")
    for p in acked:
        seen[p.value].add(p.revision)
    reads = [g for g in gets if g.outcome == ACKED]
    for g in reads:
        if not g.value:
            done = [p for p in acked if p.end < g.start]
            if done:
                out.append(f"{key}: read absent at {g.start:.3f} after write {done[0].value!r} was acknowledged")
            continue
        w = by_value.get(g.value)
        if w is None:
            out.append(f"{key}: read {g.value!r}, which no write wrote")
            continue
        if w.start > g.end:
            out.append(f"{key}: read {g.value!r} before it was written")
        seen[g.value].add(g.revision)
        stale = [p for p in acked if p.end < g.start and p.revision > g.revision]
        if stale:
            out.append(
                f"{key}: stale read of revision {g.revision} after revision {stale[0].revision} was acknowledged"
            )
    for a in reads:  # two reads in real-time order see revisions in that order
        later = [b for b in reads if b.start > a.end and b.revision < a.revision]
        if later:
            out.append(f"{key}: read revision {later[0].revision} after an earlier read saw {a.revision}")
            break
    for value, at in seen.items():
        if len(at) > 1:
            out.append(f"{key}: value {value!r} seen at revisions {sorted(at)}: applied twice")
    if acked:
        newest = max(acked, key=lambda p: p.revision)
        if final is None:
            out.append(f"{key}: acknowledged writes, but the key is gone at the end (lost)")
        else:
            value, revision, version = final
            if revision < newest.revision:
                out.append(f"{key}: final revision {revision} is older than acknowledged {newest.revision} (lost)")
            if not len(acked) <= version <= len(acked) + len(unknown):
                out.append(
                    f"{key}: version {version} but {len(acked)} acknowledged and {len(unknown)} unknown writes "
                    "(a write lost or applied twice)"
                )
            if value not in by_value:
                out.append(f"{key}: final value {value!r} was never written")
    return out
