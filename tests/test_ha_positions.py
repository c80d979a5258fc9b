"""Replication positions against simple models: GTID sets as sets of transactions, positions per domain, LSNs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.adaptors.positions import Lsn, MariaDBGtidPos, MySQLGtidSet, PositionError, parse

UUIDS = ["3e11fa47-71ca-11e1-9e33-c80aa9429562", "4a6f1c2e-0000-11e1-9e33-c80aa9429562"]

transactions = st.sets(st.tuples(st.sampled_from(UUIDS), st.integers(1, 40)), max_size=60)


def _text(txs: set[tuple[str, int]]) -> str:
    """A GTID set in MySQL's syntax, one interval per transaction (parse must merge them)."""
    return ",".join(f"{u}:{n}" for u, n in sorted(txs))


def _model(gtids: MySQLGtidSet) -> set[tuple[str, int]]:
    return {(u, n) for u, intervals in gtids.sets.items() for s, e in intervals for n in range(s, e + 1)}


@given(transactions, transactions)
def test_mysql_gtid_sets_behave_as_sets_of_transactions(a: set[tuple[str, int]], b: set[tuple[str, int]]) -> None:
    x, y = MySQLGtidSet.parse(_text(a)), MySQLGtidSet.parse(_text(b))
    assert _model(x) == a
    assert x.size() == len(a)
    assert _model(x.minus(y)) == a - b
    assert x.covers(y) == (a >= b)
    assert MySQLGtidSet.parse(str(x)) == x  # merged intervals print and parse back


def test_mysql_gtid_set_syntax() -> None:
    gtids = MySQLGtidSet.parse(f"{UUIDS[0].upper()}:1-5:7,\n{UUIDS[1]}:3")
    assert gtids.size() == 7
    assert str(gtids) == f"{UUIDS[0]}:1-5:7,{UUIDS[1]}:3"
    assert MySQLGtidSet.parse("").size() == 0
    tagged = MySQLGtidSet.parse(f"{UUIDS[0]}:1-3,{UUIDS[0]}:tg:1-2:5")
    assert tagged.size() == 6
    assert MySQLGtidSet.parse(str(tagged)) == tagged
    assert not MySQLGtidSet.parse(f"{UUIDS[0]}:1-9").covers(tagged), "a tag is a source of its own"
    for bad in ("nope:1", f"{UUIDS[0]}:5-2", f"{UUIDS[0]}:0", f"{UUIDS[0]}:x", f"{UUIDS[0]}:1:x-y"):
        with pytest.raises(PositionError):
            MySQLGtidSet.parse(bad)


domains = st.dictionaries(st.integers(0, 3), st.tuples(st.integers(1, 5), st.integers(0, 100)), max_size=4)


@given(domains, domains)
def test_mariadb_positions_cover_per_domain(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> None:
    x = MariaDBGtidPos.parse(",".join(f"{d}-{s}-{n}" for d, (s, n) in a.items()))
    y = MariaDBGtidPos(b)
    assert x.domains == a
    assert x.covers(y) == all(d in a and a[d][1] >= n for d, (_, n) in b.items())
    assert set(x.ahead_of(y)) == {d for d, (_, n) in a.items() if d not in b or n > b[d][1]}


def test_mariadb_position_syntax() -> None:
    assert MariaDBGtidPos.parse("0-1-100, 1-2-7").domains == {0: (1, 100), 1: (2, 7)}
    for bad in ("0-1", "a-b-c", "0-1-5,0-2-6"):
        with pytest.raises(PositionError):
            MariaDBGtidPos.parse(bad)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_lsns_order_like_integers(a: int, b: int) -> None:
    x = Lsn.parse(f"{a >> 32:X}/{a & 0xFFFFFFFF:X}")
    assert x.value == a
    assert x.covers(Lsn(b)) == (a >= b)


def test_parse_picks_the_engine_and_rejects_bad_text() -> None:
    assert isinstance(parse("postgresql", "postgresql", "0/3000060"), Lsn)
    assert parse("postgresql", "postgresql", "") == Lsn(0)
    assert isinstance(parse("mysql", "mariadb", "0-1-1"), MariaDBGtidPos)
    assert isinstance(parse("mysql", "mysql", f"{UUIDS[0]}:1"), MySQLGtidSet)
    with pytest.raises(PositionError):
        Lsn.parse("16-B374D848")
    with pytest.raises(TypeError):
        Lsn(1).covers(MariaDBGtidPos({}))
