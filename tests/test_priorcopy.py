"""What a COPY wrote, kept on disk for its next run (copyadd/priorcopy.py, issue 22)."""

from __future__ import annotations

import zlib
from pathlib import Path

from lamina.engine.steps.copyadd import priorcopy
from lamina.engine.steps.copyadd.placement import Written
from lamina.engine.steps.copyadd.priorcopy import WRITTEN, encode, read_written


def _record(i: int) -> bytes:
    return WRITTEN.pack(bytes([i % 256]) * 32, 0o644, i, 0, 10**18 + i, i, 1000 + i, i % 2)


def test_a_stream_cut_anywhere_reads_back_every_destination() -> None:
    dests = [f"ctx/d{i // 7}/f{i}.txt" for i in range(200)] + ["ctx/ünï €"]
    stream = b"".join(encode(dest, _record(i)) for i, dest in enumerate(dests))
    for cut in (1, 3, 50, 97, len(stream)):
        files = read_written(stream[at : at + cut] for at in range(0, len(stream), cut))
        assert len(files) == len(dests)
        assert all(files.get(dest, _record(i)) == _record(i) for i, dest in enumerate(dests))
        assert files.get("ctx/d0/f9.txt", _record(9)) is None


def test_a_destination_written_twice_answers_with_the_last_record() -> None:
    files = read_written([encode("a", _record(1)) + encode("a", _record(2))])
    assert files.get("a", _record(2)) == _record(2)
    assert files.get("a", _record(1)) is None


def test_a_record_answers_only_for_the_file_it_describes() -> None:
    files = read_written([encode("a", _record(1))])
    wanted = _record(1)
    asked = WRITTEN.pack(*WRITTEN.unpack(wanted)[:6], 0, 0)  # what a rerun knows: not the inode
    assert files.get("a", asked) == wanted  # the inode and flags are the record's own
    for field, other in enumerate((b"\7" * 32, 0o600, 5, 5, 10**18, 99)):
        changed = list(WRITTEN.unpack(asked))
        changed[field] = other
        assert files.get("a", WRITTEN.pack(*changed)) is None, field


def test_a_torn_stream_is_refused() -> None:
    stream = encode("a", _record(1))
    try:
        read_written([stream[:-1]])
    except ValueError:
        return
    raise AssertionError("a torn record was read")


def test_a_copys_records_are_spooled_kept_and_loaded_by_position_and_layer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    written = Written(priorcopy.spool_dir(store))
    for i in range(1000):
        written.add(f"out/f{i}", _record(i))
    spooled = written.save()
    assert spooled.parent == store / priorcopy.DIR_NAME
    with open(spooled, "rb") as f:
        assert len(zlib.decompress(f.read())) == sum(
            len(encode(f"out/f{i}", _record(i))) for i in range(1000)
        )
    priorcopy.keep(spooled, store, "COPY at 3", "aa11")
    files = priorcopy.load(store, "COPY at 3", "aa11")
    assert files is not None and files.get("out/f999", _record(999)) == _record(999)
    assert priorcopy.load(store, "COPY at 3", "bb22") is None  # another layer's: none
    assert priorcopy.load(store, "COPY at 4", "aa11") is None  # another position's: none
    # The next run of the same COPY replaces the position's file.
    again = Written(priorcopy.spool_dir(store))
    again.add("out/new", _record(5))
    priorcopy.keep(again.save(), store, "COPY at 3", "bb22")
    assert priorcopy.load(store, "COPY at 3", "aa11") is None
    newer = priorcopy.load(store, "COPY at 3", "bb22")
    assert newer is not None and len(newer) == 1
    assert sorted(p.name.startswith(".tmp-") for p in (store / priorcopy.DIR_NAME).iterdir()) == [False]


def test_a_copy_that_is_not_kept_leaves_no_spooled_file(tmp_path: Path) -> None:
    written = Written(tmp_path / "copies")
    for i in range(5000):  # enough for the compressor to have spooled some
        written.add(f"out/f{i}", _record(i))
    assert len(list((tmp_path / "copies").iterdir())) == 1
    written.discard()
    assert list((tmp_path / "copies").iterdir()) == []
