"""The grants table of lamina.oci.opened survives a process killed while rewriting it.

The table is the only record of the true modes of directories a rootless reader opened up
(0644 dirs raised to 0744): lost, the raised modes would be read as the layer's own by
every later build and export. A rewrite killed between its two system calls must leave
the old table or the new one, never an empty one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.oci import opened

OLD = [["/c/unpacked/a/shut", 0o40644, 1, 11, 0o40744], ["/c/unpacked/a/f", 0o100124, 1, 12, 0o100524]]
NEW = [["/c/unpacked/a/shut", 0o40644, 1, 11, 0o40744]]


class Killed(BaseException):
    pass


@pytest.mark.parametrize("rows", [NEW, []], ids=["shorter", "emptied"])
def test_a_rewrite_killed_half_way_leaves_a_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[list[int | str]]
) -> None:
    fd = os.open(tmp_path / opened.TABLE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        opened._write_table(fd, OLD)
        calls: list[object] = []

        def once(real: Callable[..., object]) -> Callable[..., object]:
            def call(*args: object) -> object:
                calls.append(real)
                if len(calls) > 1:
                    raise Killed  # the process dies before its second system call
                return real(*args)

            return call

        monkeypatch.setattr(os, "ftruncate", once(os.ftruncate))
        monkeypatch.setattr(os, "pwrite", once(os.pwrite))
        with pytest.raises(Killed):
            opened._write_table(fd, rows)
        monkeypatch.undo()
        assert opened._read_table(fd) in (OLD, rows)
        opened._write_table(fd, rows)
        assert opened._read_table(fd) == rows
    finally:
        os.close(fd)
