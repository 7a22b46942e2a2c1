"""A walk's hard-link table gives each inode the first path it was entered with."""

from __future__ import annotations

from lamina.oci.firstpaths import FirstPaths


def test_an_inode_keeps_the_first_path_entered() -> None:
    table = FirstPaths()
    assert table.first(1, 10, "a") == "a"
    assert table.first(1, 11, "b") == "b"
    assert table.first(1, 10, "c") == "a"
    assert table.first(1, 10, "d") == "a"


def test_a_directorys_files_are_entered_together_and_may_link_within_it() -> None:
    table = FirstPaths()
    assert table.firsts(1, "d/", [("x", 5), ("y", 6), ("z", 5)]) == ["d/x", "d/y", "d/x"]
    assert table.firsts(1, "e/", [("p", 6), ("q", 7)]) == ["d/y", "e/q"]
    assert table.first(1, 7, "f/r") == "e/q"


def test_the_same_inode_number_on_another_device_is_another_file() -> None:
    table = FirstPaths()
    assert table.first(1, 10, "a") == "a"
    assert table.first(2, 10, "b") == "b"
    assert table.first(2, 10, "c") == "b"


def test_paths_are_found_among_many_directories() -> None:
    table = FirstPaths()
    for d in range(300):
        names = [(f"f{i}", d * 1000 + i) for i in range(d % 7 + 1)]
        assert table.firsts(1, f"d{d}/", names) == [f"d{d}/{name}" for name, _ in names]
    for d in range(0, 300, 13):
        for i in range(d % 7 + 1):
            assert table.first(1, d * 1000 + i, "later") == f"d{d}/f{i}"
