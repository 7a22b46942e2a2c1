"""The packed table behind the stat cache: fixed-size rows found by key (issue 22)."""

from __future__ import annotations

import hashlib

from lamina.packedtable import PackedTable


def _key(i: int) -> bytes:
    return hashlib.sha256(b"%d" % i).digest()[:8]


def test_every_key_added_is_found_with_its_value_across_growth() -> None:
    table = PackedTable(8, 4)
    for i in range(5000):  # the index is rebuilt many times on the way
        assert table.add(_key(i), b"%04d" % (i % 10000)) == i
    assert len(table) == 5000
    assert all(table.get(_key(i)) == b"%04d" % i for i in range(5000))
    assert table.get(_key(5000)) is None and table.find(_key(5001)) == -1


def test_a_key_added_again_answers_with_its_newest_row() -> None:
    table = PackedTable(8, 1)
    table.add(_key(1), b"a")
    table.add(_key(2), b"b")
    assert table.add(_key(1), b"c") == 2
    assert table.get(_key(1)) == b"c" and table.get(_key(2)) == b"b"
    assert [table.latest(row) for row in range(3)] == [False, True, True]


def test_rows_loaded_from_bytes_are_the_table_and_later_rows_win() -> None:
    rows = bytearray(_key(1) + b"x" + _key(2) + b"y" + _key(1) + b"z" + b"torn")
    table = PackedTable(8, 1, rows)
    assert table.rows is rows and len(table) == 3  # kept, not copied; the torn tail dropped
    assert table.get(_key(1)) == b"z" and table.get(_key(2)) == b"y"


def test_a_value_set_in_place_is_what_is_read_and_written_out() -> None:
    table = PackedTable(8, 2)
    for i in range(10):
        table.add(_key(i), b"..")
    table.set_value(table.find(_key(3)), b"!!")
    assert table.get(_key(3)) == b"!!"
    assert b"".join(table.chunks(size=30)) == bytes(table.rows)  # in chunks of whole rows
    assert b"".join(table.chunks(iter([3, 0]))) == _key(3) + b"!!" + _key(0) + b".."


def test_setdefault_keeps_the_first_value_of_a_key_across_growth() -> None:
    table = PackedTable(8, 4)
    for i in range(3000):
        assert table.setdefault(_key(i), i.to_bytes(4, "little")) == i
    for i in range(0, 3000, 7):
        assert table.setdefault(_key(i), b"\xff" * 4) == i  # there: its row, unchanged
        assert table.get(_key(i)) == i.to_bytes(4, "little")
    assert len(table) == 3000
