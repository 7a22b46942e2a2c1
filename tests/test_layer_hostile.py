"""Crafted hostile layers: each must fail (or be neutralised) with nothing
written outside the target directory.

Every test extracts into `arena.target`, next to `arena.outside` (a sentinel
directory holding a file called `secret`), and ends with
`arena.assert_untouched()`, which compares everything under tmp_path except
the target with a snapshot taken before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lamina.errors import LayerError
from lamina.oci.digest import Digest
from lamina.oci.extract import Whiteouts, extract_layer

# -- crafting tars -----------------------------------------------------------


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    linkname: str = "",
    mode: int = 0o644,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = pax
    return info, data


def build_tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return out.getvalue()


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, linkname=target)


def directory(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=0o755)


# -- the arena ---------------------------------------------------------------


def _snapshot(top: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    """(mode, mtime, content digest) of everything under `top` but `skip`."""
    seen: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path == skip:
                continue
            st = path.lstat()
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(top))] = (st.st_mode, st.st_mtime_ns, digest)
    return seen


@dataclasses.dataclass
class Arena:
    top: Path
    target: Path
    outside: Path
    before: dict[str, tuple[int, int, str]] = dataclasses.field(default_factory=dict)

    def extract(self, data: bytes, **options: object) -> list[str]:
        result = extract_layer(io.BytesIO(data), self.target, **options)  # type: ignore[arg-type]
        return list(result.warnings)

    def refuse(self, data: bytes, match: str, **options: object) -> LayerError:
        with pytest.raises(LayerError, match=match) as caught:
            self.extract(data, **options)
        self.assert_untouched()
        return caught.value

    def assert_untouched(self) -> None:
        assert _snapshot(self.top, self.target) == self.before
        assert (self.outside / "secret").read_bytes() == b"keep"
        assert not Path("/etc/lamina-pwned").exists()


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep")
    target = tmp_path / "target"
    target.mkdir()
    arena = Arena(tmp_path, target, outside)
    arena.before = _snapshot(tmp_path, target)
    return arena


# -- names -------------------------------------------------------------------


def test_absolute_path(arena: Arena) -> None:
    data = build_tar(member(str(arena.outside / "pwned"), data=b"x"))
    arena.refuse(data, "absolute path")


def test_absolute_path_to_etc(arena: Arena) -> None:
    arena.refuse(build_tar(member("/etc/lamina-pwned", data=b"x")), "absolute path")


def test_dotdot(arena: Arena) -> None:
    arena.refuse(build_tar(member("../outside/pwned", data=b"x")), r"\.\.")


def test_dotdot_in_the_middle(arena: Arena) -> None:
    arena.refuse(build_tar(directory("a"), member("a/../../outside/pwned", data=b"x")), r"\.\.")


def test_dotdot_hidden_in_long_pax_name(arena: Arena) -> None:
    name = "a/" * 60 + "../" * 61 + "outside/pwned"
    assert len(name) > 100  # needs a PAX path record
    arena.refuse(build_tar(member(name, data=b"x")), r"\.\.")


def test_nul_in_name(arena: Arena) -> None:
    data = build_tar(member("innocent", data=b"x", pax={"path": "a\x00/../../outside/pwned"}))
    arena.refuse(data, "NUL|\\.\\.")


def test_root_replaced_by_symlink(arena: Arena) -> None:
    data = build_tar(symlink(".", str(arena.outside)), member("pwned", data=b"x"))
    arena.refuse(data, "root directory")


def test_non_utf8_name_stays_inside(arena: Arena) -> None:
    # 0xC0 0xAE is an overlong encoding of '.': a lax decoder reads "../".
    name = b"\xc0\xae\xc0\xae/pwned".decode("utf-8", "surrogateescape")
    arena.extract(build_tar(member(name, data=b"x")))
    arena.assert_untouched()
    assert (arena.target / os.fsdecode(b"\xc0\xae\xc0\xae") / "pwned").read_bytes() == b"x"


def test_non_utf8_name_with_dotdot(arena: Arena) -> None:
    name = b"\xff\xfe/../../outside/pwned".decode("utf-8", "surrogateescape")
    arena.refuse(build_tar(member(name, data=b"x")), r"\.\.")


def test_component_too_long(arena: Arena) -> None:
    arena.refuse(build_tar(member("a" * 300, data=b"x")), "too long")


def test_long_name(arena: Arena) -> None:
    # Deeper than PATH_MAX (4096) in total: resolved one component at a time.
    parts = ["d" * 200] * 25
    members = [directory("/".join(parts[: i + 1])) for i in range(len(parts))]
    name = "/".join([*parts, "f" * 250])
    assert len(name) > 5000
    arena.extract(build_tar(*members, member(name, data=b"deep")))
    arena.assert_untouched()
    fd = os.open(arena.target, os.O_RDONLY)
    try:
        for part in parts:
            next_fd = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        assert os.stat("f" * 250, dir_fd=fd).st_size == 4
    finally:
        os.close(fd)


# -- symlinks ------------------------------------------------------------------


def test_symlink_then_write(arena: Arena) -> None:
    data = build_tar(symlink("link", str(arena.outside)), member("link/pwned", data=b"x"))
    arena.refuse(data, "link is a symlink")


def test_relative_symlink_then_write(arena: Arena) -> None:
    data = build_tar(symlink("link", "../outside"), member("link/secret", data=b"overwritten"))
    arena.refuse(data, "symlink")


def test_symlink_chain_then_write(arena: Arena) -> None:
    data = build_tar(
        directory("a"),
        symlink("a/b", "../c"),
        symlink("c", "../outside"),
        member("a/b/pwned", data=b"x"),
    )
    arena.refuse(data, "a/b is a symlink")


def test_directory_replaced_by_symlink_then_write(arena: Arena) -> None:
    data = build_tar(directory("d"), symlink("d", str(arena.outside)), member("d/pwned", data=b"x"))
    arena.refuse(data, "d is a symlink")


def test_existing_symlink_is_replaced_not_followed(arena: Arena) -> None:
    (arena.target / "f").symlink_to(arena.outside / "secret")
    arena.extract(build_tar(member("f", data=b"overwritten")))
    arena.assert_untouched()
    assert (arena.target / "f").read_bytes() == b"overwritten"
    assert not (arena.target / "f").is_symlink()


def test_symlink_target_is_not_followed_when_created(arena: Arena) -> None:
    arena.extract(build_tar(symlink("s", str(arena.outside / "secret"))))
    arena.assert_untouched()
    assert os.readlink(arena.target / "s") == str(arena.outside / "secret")


# -- hard links ---------------------------------------------------------------


def test_hardlink_outside_root(arena: Arena) -> None:
    arena.refuse(build_tar(hardlink("h", "../outside/secret")), r"hard link target.*\.\.")


def test_hardlink_absolute(arena: Arena) -> None:
    arena.refuse(build_tar(hardlink("h", str(arena.outside / "secret"))), "hard link target.*absolute")


def test_hardlink_through_symlink(arena: Arena) -> None:
    data = build_tar(symlink("link", str(arena.outside)), hardlink("h", "link/secret"))
    arena.refuse(data, "hard link target.*symlink")


def test_hardlink_to_missing_entry(arena: Arena) -> None:
    arena.refuse(build_tar(hardlink("h", "nowhere")), "does not exist")


def test_hardlink_then_write(arena: Arena) -> None:
    # Writing a file over a hard link must replace the link, not write into
    # the inode it shares (here with a file outside, as an earlier layer or
    # the caller could have left it).
    os.link(arena.outside / "secret", arena.target / "h")
    arena.before = _snapshot(arena.top, arena.target)
    arena.extract(build_tar(member("h", data=b"overwritten")))
    arena.assert_untouched()
    assert (arena.target / "h").read_bytes() == b"overwritten"


# -- whiteouts ----------------------------------------------------------------


def test_whiteout_dotdot(arena: Arena) -> None:
    arena.refuse(build_tar(directory("a"), member("a/.wh..."), fmt=tarfile.GNU_FORMAT), "whiteout of '..'")


def test_whiteout_dot(arena: Arena) -> None:
    arena.refuse(build_tar(member(".wh..")), "whiteout of '.'")


def test_whiteout_bare(arena: Arena) -> None:
    arena.refuse(build_tar(member(".wh.")), "whiteout of ''")


@pytest.mark.parametrize("mode", list(Whiteouts))
def test_whiteout_through_symlink(arena: Arena, mode: Whiteouts) -> None:
    data = build_tar(symlink("link", str(arena.outside)), member("link/.wh.secret"))
    arena.refuse(data, "symlink", whiteouts=mode)


@pytest.mark.parametrize("mode", list(Whiteouts))
def test_opaque_through_symlink(arena: Arena, mode: Whiteouts) -> None:
    data = build_tar(symlink("link", str(arena.outside)), member("link/.wh..wh..opq"))
    arena.refuse(data, "symlink", whiteouts=mode)


def test_overlay_xattrs_in_layer_are_dropped(arena: Arena) -> None:
    # Carried into an overlay lower dir, these would fake an opaque dir or a redirect.
    pax = {"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.overlay.redirect": "/etc"}
    info, _ = member("d", tarfile.DIRTYPE, pax=pax)
    warnings = arena.extract(build_tar((info, b"")), whiteouts=Whiteouts.OVERLAY)
    arena.assert_untouched()
    assert os.listxattr(arena.target / "d") == []
    assert any("overlayfs xattrs" in warning for warning in warnings)


# -- broken streams -----------------------------------------------------------


def test_short_file(arena: Arena) -> None:
    data = build_tar(member("big", data=b"x" * 4096))
    cut = data[: 512 + 1000]  # header, then 1000 of the 4096 bytes
    arena.refuse(cut, "unexpected end|short file")


def test_missing_end_of_archive(arena: Arena) -> None:
    data = build_tar(member("a", data=b"x" * 10), member("b", data=b"y" * 10))
    cut = data[: 512 * 2]  # first member only, no second header, no zero blocks
    arena.refuse(cut, "truncated")


def test_damaged_header(arena: Arena) -> None:
    data = bytearray(build_tar(member("a", data=b"x" * 10), member("b", data=b"y" * 10)))
    data[1024 + 148 : 1024 + 156] = b"0000000\0"  # second header's checksum
    arena.refuse(bytes(data), "damaged tar header")


def test_wrong_digest(arena: Arena) -> None:
    data = build_tar(member("a", data=b"x"))
    wrong = Digest.of_bytes(b"something else")
    arena.refuse(data, "hashes to", digest=wrong)


def test_not_a_tar(arena: Arena) -> None:
    arena.refuse(b"\x1f\x8b\x08\x00garbage" * 10, "gzip|tar")


def test_target_directory_that_is_a_symlink(arena: Arena) -> None:
    link = arena.top / "link-target"
    link.symlink_to(arena.outside)
    arena.before = _snapshot(arena.top, arena.target)
    with pytest.raises(LayerError, match="target directory"):
        extract_layer(io.BytesIO(build_tar(member("pwned", data=b"x"))), link)
    arena.assert_untouched()


# -- fuzzing ------------------------------------------------------------------

# Weighted by repetition: hostile parts rare enough that most layers get
# past the name checks to the symlink, hard-link and whiteout logic.
_PARTS = st.sampled_from(
    ["a"] * 6
    + ["b"] * 6
    + ["link"] * 6
    + [".", "", "..", ".wh.a", ".wh.link", ".wh..wh..opq", ".wh...", "ü\udcff"]
)
_NAMES = st.builds(
    lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
    st.integers(0, 30).map(lambda n: n == 0),
    st.lists(_PARTS, min_size=1, max_size=3),
)
_TARGETS = st.sampled_from(["..", "../outside", "/", "OUTSIDE", "a", "link/secret", "a/b", "../../.."])
_MEMBERS = st.lists(
    st.tuples(
        st.sampled_from(
            [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
        ),
        _NAMES,
        _TARGETS,
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(members=_MEMBERS, mode=st.sampled_from(list(Whiteouts)))
def test_random_hostile_layers_never_escape(members: list[tuple[bytes, str, str]], mode: Whiteouts) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        (top / "outside").mkdir()
        (top / "outside" / "secret").write_bytes(b"keep")
        arena = Arena(top, top / "target", top / "outside")
        arena.target.mkdir()
        arena.before = _snapshot(top, arena.target)
        crafted = []
        for kind, name, target in members:
            target = target.replace("OUTSIDE", str(arena.outside))
            if kind == tarfile.REGTYPE:
                crafted.append(member(name, data=b"pwned"))
            elif kind == tarfile.DIRTYPE:
                crafted.append(directory(name))
            elif kind == tarfile.SYMTYPE:
                crafted.append(symlink(name, target))
            elif kind == tarfile.LNKTYPE:
                crafted.append(hardlink(name, target))
            else:
                crafted.append(member(name, tarfile.FIFOTYPE))
        try:
            extract_layer(io.BytesIO(build_tar(*crafted)), arena.target, whiteouts=mode)
            event("extracted")
        except LayerError as err:  # refusing is fine; escaping or crashing is not
            label = str(err).split(": ")[-1][:30]
            event(label.encode("utf-8", "backslashreplace").decode("ascii", "replace"))
        arena.assert_untouched()


@pytest.mark.parametrize("marker", [".wh..wh..opq", ".wh.d"])
def test_deep_tree_under_a_whiteout(arena: Arena, marker: str) -> None:
    # 1500 levels: deeper than Python's recursion limit.
    deep = [directory("/".join(["d"] * (i + 1))) for i in range(1500)]
    try:
        arena.extract(build_tar(*deep))
        try:
            arena.extract(build_tar(member(marker)))
        except LayerError as err:
            assert "too deep" in str(err)
        arena.assert_untouched()
    finally:  # pytest's own clean-up of tmp_path recurses, and would fail on this tree
        subprocess.run(["rm", "-rf", str(arena.target)], check=True)


def test_directory_with_content_replaced_by_symlink_then_write(arena: Arena) -> None:
    # `d` was resolved (and remembered) for `d/x` before the symlink replaced it.
    data = build_tar(
        directory("d"),
        directory("d/e"),
        member("d/e/x", data=b"x"),
        symlink("d", str(arena.outside)),
        member("d/e/pwned", data=b"x"),
    )
    arena.refuse(data, "d is a symlink")
