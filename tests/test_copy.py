"""COPY/ADD source selection, keys and writing (lamina.engine.steps.copyadd: selection, placement)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina.cache.statcache import StatCache
from lamina.engine.context import SourceTree, open_build_context, open_rootfs
from lamina.engine.steps.copyadd.chmod import parse_chmod
from lamina.engine.steps.copyadd.placement import write_selection
from lamina.engine.steps.copyadd.selection import CopyOptions, destination_path, select_sources, selection_key
from lamina.errors import ContextError, InstructionError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other ids needs root")


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class FakeImage:
    """The stage being copied into: absolute paths -> stat results of a real directory."""

    def __init__(self, root: Path) -> None:
        self.tree = open_rootfs(root, StatCache(None))

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        resolved = self.tree.resolve(path.lstrip("/"), follow_last=follow_last)
        return "/" + resolved if os.path.lexists(self.tree.abspath(resolved)) else None

    def stat(self, path: str) -> os.stat_result | None:
        resolved = self.resolve(path)
        return os.lstat(self.tree.abspath(resolved.lstrip("/"))) if resolved else None


@pytest.fixture
def ctx(tmp_path: Path) -> SourceTree:
    root = tmp_path / "ctx"
    _write(
        root,
        {
            "a.txt": "a",
            "b.txt": "bb",
            "notes.md": "md",
            "src/main.go": "package main",
            "src/util/util.go": "package util",
            "src/README": "readme",
            "docs/guide.txt": "guide",
        },
    )
    os.symlink("a.txt", root / "link-to-a")
    os.symlink("../a.txt", root / "src" / "up-link")
    return open_build_context(root, StatCache(None))


def _copy(
    tree: SourceTree,
    sources: list[str],
    dest: str,
    out: Path,
    image: FakeImage | None = None,
    **options: object,
) -> dict[str, tuple[str, int, int, int, str]]:
    """Run select + write; return {path: (kind, mode, uid, gid, content or link)} of `out`."""
    selection = select_sources(tree, sources, dest, CopyOptions(**options), image)  # type: ignore[arg-type]
    out.mkdir(exist_ok=True)
    write_selection(tree, selection, out, image)
    listing = {}
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if os.geteuid() != 0:  # unprivileged: our own ids stand for root (the layer writer maps them)
                st = os.stat_result((*st[:4], 0, 0, *st[6:]))
            rel = str(path.relative_to(out))
            if stat.S_ISLNK(st.st_mode):
                listing[rel] = ("link", 0o777, st.st_uid, st.st_gid, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                listing[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, "")
            else:
                listing[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, path.read_text())
    return listing


# --- where things go -----------------------------------------------------------------------------


def test_file_into_dest_with_trailing_slash(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["a.txt"], "/app/", tmp_path / "out")
    assert got == {"app": ("dir", 0o755, 0, 0, ""), "app/a.txt": ("file", 0o644, 0, 0, "a")}


def test_file_to_dest_without_slash_is_renamed(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["a.txt"], "/app/renamed", tmp_path / "out")
    assert set(got) == {"app", "app/renamed"}


def test_file_into_existing_image_directory_without_slash(ctx: SourceTree, tmp_path: Path) -> None:
    (tmp_path / "image" / "app").mkdir(parents=True)
    got = _copy(ctx, ["a.txt"], "/app", tmp_path / "out", image=FakeImage(tmp_path / "image"))
    assert "app/a.txt" in got


def test_several_sources_make_dest_a_directory(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["a.txt", "b.txt"], "/app", tmp_path / "out")
    assert {"app/a.txt", "app/b.txt"} <= set(got)


def test_directory_source_copies_its_contents(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app", tmp_path / "out")
    assert set(got) == {"app", "app/main.go", "app/util", "app/util/util.go", "app/README", "app/up-link"}


def test_dot_copies_the_whole_context(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["."], "/", tmp_path / "out")
    assert {"a.txt", "src/util/util.go", "docs/guide.txt"} <= set(got)


def test_destination_path_against_workdir() -> None:
    assert destination_path(".", "/work") == "/work/"
    assert destination_path("", "/work") == "/work/"
    assert destination_path("sub/", "/work") == "/work/sub/"
    assert destination_path("file", "/work") == "/work/file"
    assert destination_path("/abs/./x/..", "/work") == "/abs"
    assert destination_path("/", "/work") == "/"


# --- symlinks ------------------------------------------------------------------------------------


def test_top_level_symlink_is_followed(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["link-to-a"], "/app/", tmp_path / "out")
    assert got["app/link-to-a"] == ("file", 0o644, 0, 0, "a")


def test_symlinks_inside_a_directory_are_copied_as_links(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app/", tmp_path / "out")
    assert got["app/up-link"][0] == "link"
    assert got["app/up-link"][4] == "../a.txt"


def test_source_outside_the_context_is_refused(ctx: SourceTree, tmp_path: Path) -> None:
    with pytest.raises(ContextError, match=r"forbidden path outside the build context: \.\./x"):
        select_sources(ctx, ["../x"], "/app/", CopyOptions())


def test_symlink_escaping_the_context_is_refused(ctx: SourceTree, tmp_path: Path) -> None:
    os.symlink("/etc/passwd", ctx.root / "passwd")
    with pytest.raises(ContextError, match="points outside of the build context"):
        select_sources(ctx, ["passwd"], "/app/", CopyOptions())


def test_absolute_symlinks_resolve_inside_a_stage_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    _write(root, {"opt/app/bin": "binary"})
    os.symlink("/opt/app", root / "current")
    tree = open_rootfs(root, StatCache(None))
    got = _copy(tree, ["current/bin"], "/usr/local/bin/", tmp_path / "out")
    assert got["usr/local/bin/bin"][4] == "binary"


# --- missing, wildcards, ignore, --exclude ----------------------------------------------------------


def test_missing_source_names_it(ctx: SourceTree) -> None:
    with pytest.raises(ContextError, match=r"COPY failed: file not found in build context: nope\.txt"):
        select_sources(ctx, ["nope.txt"], "/app/", CopyOptions())


def test_missing_source_in_a_stage_names_the_stage(tmp_path: Path) -> None:
    (tmp_path / "stage").mkdir()
    tree = open_rootfs(tmp_path / "stage", StatCache(None))
    with pytest.raises(ContextError, match="file not found in stage builder: /out/app"):
        select_sources(tree, ["/out/app"], "/app", CopyOptions(source_name="stage builder"))


def test_wildcard_matches_one_level_only(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["*.txt"], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/a.txt", "app/b.txt"}  # docs/guide.txt is one level down


def test_wildcard_matching_one_file_to_a_file_destination(ctx: SourceTree, tmp_path: Path) -> None:
    """BuildKit's testCopyWildcards: `COPY f*.go foo2.go` writes the file foo2.go."""
    got = _copy(ctx, ["a*.txt"], "/one.txt", tmp_path / "out")
    assert set(got) == {"one.txt"} and got["one.txt"][0] == "file"


def test_wildcard_matches_to_a_plain_destination_last_wins(ctx: SourceTree, tmp_path: Path) -> None:
    """Each match is copied as if named (fsutil): the last is the file `/app` (so in docker 20.10)."""
    got = _copy(ctx, ["*.txt"], "/app", tmp_path / "out")
    assert set(got) == {"app"} and got["app"][4] == "bb"


def test_wildcard_matching_a_directory_copies_its_contents(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["d*"], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/guide.txt"}


def test_wildcard_in_a_middle_component(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["s?c/*.go"], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/main.go"}


def test_character_class_and_escape(ctx: SourceTree, tmp_path: Path) -> None:
    # The Dockerfile's own expansion has already removed backslashes, so a
    # literal `[` is written `[[]`, as in Go's filepath.Match.
    _write(ctx.root, {"f[1].txt": "literal", "f1.txt": "one"})
    got = _copy(ctx, ["[ab].txt", "f[[]1].txt"], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/a.txt", "app/b.txt", "app/f[1].txt"}


def test_wildcard_matching_nothing_copies_nothing(ctx: SourceTree, tmp_path: Path) -> None:
    # The `COPY package.json yarn.loc[k] ./` idiom: an optional file.
    got = _copy(ctx, ["a.txt", "yarn.loc[k]"], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/a.txt"}


def test_dockerignored_files_are_not_copied(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    _write(root, {"keep.txt": "k", "secret.env": "s", "src/x.pyc": "c", "src/x.py": "p"})
    (root / ".dockerignore").write_text("*.env\n**/*.pyc\n")
    tree = open_build_context(root, StatCache(None))
    got = _copy(tree, ["."], "/app/", tmp_path / "out")
    assert set(got) == {"app", "app/.dockerignore", "app/keep.txt", "app/src", "app/src/x.py"}
    with pytest.raises(ContextError, match=r"not found in build context: secret\.env"):
        select_sources(tree, ["secret.env"], "/app/", CopyOptions())
    assert len(select_sources(tree, ["*.env"], "/app/", CopyOptions()).items) == 0


def test_exclude_applies_inside_directories(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app/", tmp_path / "out", excludes=("util", "*.go"))
    assert set(got) == {"app", "app/README", "app/up-link"}


def test_exclude_applies_to_wildcard_matches(ctx: SourceTree, tmp_path: Path) -> None:
    """Files a wildcard matches are left out (the Dockerfile reference); directories are filtered inside."""
    got = _copy(ctx, ["*"], "/app/", tmp_path / "out", excludes=("*.txt", "src", "docs", "util"))
    assert set(got) == {"app", "app/notes.md", "app/link-to-a", "app/main.go", "app/README", "app/up-link"}


def test_exclude_never_drops_a_matched_directory(ctx: SourceTree, tmp_path: Path) -> None:
    """BuildKit's testExcludedFilesOnCopy: `ADD --exclude=* dir* /6` makes an empty /6."""
    got = _copy(ctx, ["d*", "s*"], "/six", tmp_path / "out", excludes=("*",))
    assert got == {"six": ("dir", 0o755, 0, 0, "")}


def test_exclude_exception_reincludes(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app/", tmp_path / "out", excludes=("*", "!util"))
    assert set(got) == {"app", "app/util", "app/util/util.go"}


# --- --parents -------------------------------------------------------------------------------------


def test_parents_keeps_the_source_path(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src/util/util.go", "docs/guide.txt"], "/app/", tmp_path / "out", parents=True)
    assert {"app/src/util/util.go", "app/docs/guide.txt"} <= set(got)
    assert "app/src/main.go" not in got


def test_parents_pivot_drops_the_leading_part(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src/./util/*.go"], "/app/", tmp_path / "out", parents=True)
    assert set(got) == {"app", "app/util", "app/util/util.go"}


def test_parents_with_double_star(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["**/*.go"], "/app/", tmp_path / "out", parents=True)
    assert set(got) == {"app", "app/src", "app/src/main.go", "app/src/util", "app/src/util/util.go"}


def test_parents_directories_take_source_metadata_and_chmod(ctx: SourceTree, tmp_path: Path) -> None:
    os.chmod(ctx.root / "src" / "util", 0o750)
    got = _copy(ctx, ["src/util/util.go"], "/app/", tmp_path / "one", parents=True)
    assert got["app/src/util"][1] == 0o750
    got = _copy(ctx, ["src/util/util.go"], "/app/", tmp_path / "two", parents=True, chmod=parse_chmod("700"))
    assert (got["app/src/util"][1], got["app/src/util/util.go"][1]) == (0o700, 0o700)
    assert got["app"][1] == 0o700  # the destination, made by MkdirAll with the octal --chmod


def test_parents_wildcard_before_the_pivot(ctx: SourceTree, tmp_path: Path) -> None:
    """BuildKit's testCopyParents doublewildcard: each directory `s*` matches is a pivot."""
    got = _copy(ctx, ["s*/./util/*.go", "d*/./*.txt"], "/app/", tmp_path / "out", parents=True)
    assert {"app/util/util.go", "app/guide.txt"} <= set(got) and "app/src" not in got


def test_parents_missing_literal_source(ctx: SourceTree) -> None:
    with pytest.raises(ContextError, match="not found in build context: src/nope"):
        select_sources(ctx, ["src/nope"], "/app/", CopyOptions(parents=True))


# --- owners and modes ------------------------------------------------------------------------------


@needs_root
def test_chown_applies_to_files_and_created_directories(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/opt/app/", tmp_path / "out", chown=(1000, 1001))
    assert {v[2:4] for v in got.values()} == {(1000, 1001)}  # opt and opt/app too


@needs_root
def test_context_files_are_root_owned_stage_files_keep_owners(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    _write(root, {"f": "x"})
    os.chown(root / "f", 123, 456)
    got = _copy(open_build_context(root, StatCache(None)), ["f"], "/a/", tmp_path / "o1")
    assert got["a/f"][2:4] == (0, 0)
    got = _copy(open_rootfs(root, StatCache(None)), ["f"], "/a/", tmp_path / "o2")
    assert got["a/f"][2:4] == (123, 456)


def test_chmod_octal_applies_to_files_and_directories(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app/", tmp_path / "out", chmod=parse_chmod("0750"))
    assert got["app/main.go"][1] == 0o750
    assert got["app/util"][1] == 0o750
    # the destination directory itself is made with the mode too (fsutil's MkdirAll
    # takes the octal --chmod; BuildKit 0.8, in docker 20.10, still made it 0755)
    assert got["app"][1] == 0o750
    assert got["app/up-link"][0] == "link"


def test_chmod_octal_on_created_parents(ctx: SourceTree, tmp_path: Path) -> None:
    """BuildKit's testCopyChmod: `COPY --chmod=777 foo /parent/foo` makes /parent 0777."""
    got = _copy(ctx, ["a.txt"], "/parent/sub/f", tmp_path / "out", chmod=parse_chmod("770"))
    assert (got["parent"][1], got["parent/sub"][1], got["parent/sub/f"][1]) == (0o770, 0o770, 0o770)
    got = _copy(ctx, ["a.txt"], "/p/f", tmp_path / "sym", chmod=parse_chmod("u+x"))
    assert got["p"][1] == 0o755  # a symbolic mode is not a directory mode


def test_chmod_symbolic(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["src"], "/app/", tmp_path / "out", chmod=parse_chmod("u+x,go-r,a+X"))
    assert got["app/main.go"][1] == 0o711  # 644 -> u+x 744 -> go-r 700 -> a+X (now executable) 711
    assert got["app/util"][1] == 0o711  # 755 -> 755 -> 711 -> 711


@pytest.mark.parametrize(
    ("text", "before", "is_dir", "after"),
    [
        ("755", 0o600, False, 0o755),
        ("u=rw,g=r,o=", 0o777, False, 0o640),
        ("+x", 0o644, False, 0o755),
        ("a-w", 0o666, False, 0o444),
        ("g=u", 0o740, False, 0o770),
        ("a+X", 0o644, False, 0o644),
        ("a+X", 0o644, True, 0o755),
        ("u+s,+t", 0o755, False, 0o5755),
    ],
)
def test_parse_chmod(text: str, before: int, is_dir: bool, after: int) -> None:
    assert parse_chmod(text).apply(before, is_dir) == after


@pytest.mark.parametrize("text", ["", "8", "17777", "u+q", "x+r", "u+x,"])
def test_parse_chmod_rejects(text: str) -> None:
    with pytest.raises(InstructionError, match="invalid chmod"):
        parse_chmod(text)


def test_setuid_survives_chown(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    _write(root, {"tool": "#!/bin/sh\n"})
    os.chmod(root / "tool", 0o4755)
    got = _copy(open_build_context(root, StatCache(None)), ["tool"], "/bin/", tmp_path / "out", chown=(0, 0))
    assert got["bin/tool"][1] == 0o4755


# --- writing into an image -------------------------------------------------------------------------


@needs_root
def test_existing_parent_directories_keep_the_image_metadata(ctx: SourceTree, tmp_path: Path) -> None:
    image_root = tmp_path / "image"
    (image_root / "srv").mkdir(parents=True)
    os.chmod(image_root / "srv", 0o711)
    os.chown(image_root / "srv", 7, 8)
    got = _copy(ctx, ["a.txt"], "/srv/www/", tmp_path / "out", image=FakeImage(image_root), chown=(5, 5))
    assert got["srv"][1:4] == (0o711, 7, 8)  # exists below: unchanged in this layer
    assert got["srv/www"][1:4] == (0o755, 5, 5)  # created by COPY: 0755, --chown user


def test_dest_follows_symlinks_of_the_image(ctx: SourceTree, tmp_path: Path) -> None:
    image_root = tmp_path / "image"
    (image_root / "real").mkdir(parents=True)
    os.symlink("/real", image_root / "alias")
    got = _copy(ctx, ["a.txt"], "/alias/", tmp_path / "out", image=FakeImage(image_root))
    assert "real/a.txt" in got


def test_file_over_existing_directory_is_an_error(ctx: SourceTree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "app" / "a.txt").mkdir(parents=True)
    selection = select_sources(ctx, ["a.txt"], "/app/", CopyOptions())
    with pytest.raises(ContextError, match=r"cannot replace directory /app/a\.txt with a file"):
        write_selection(ctx, selection, out)


def test_source_changed_after_keying_is_not_written(ctx: SourceTree, tmp_path: Path) -> None:
    """What a COPY writes is what its key was made of, never a later change."""
    from lamina.cache import statcache

    before = (ctx.root / "a.txt").read_bytes()
    selection = select_sources(ctx, ["a.txt"], "/app/", CopyOptions())
    selection_key(ctx, selection)
    (ctx.root / "a.txt").write_text("changed!")
    (tmp_path / "out").mkdir()
    # A small file is kept from the read that hashed it: written as it was then.
    write_selection(ctx, selection, tmp_path / "out")
    assert (tmp_path / "out" / "app" / "a.txt").read_bytes() == before
    # A big one is read again, and a change since keying is refused.
    (ctx.root / "big.bin").write_bytes(b"b" * (statcache._KEEP_FILE + 1))
    selection = select_sources(ctx, ["big.bin"], "/app/", CopyOptions())
    selection_key(ctx, selection)
    (ctx.root / "big.bin").write_bytes(b"c" * (statcache._KEEP_FILE + 1))
    (tmp_path / "out2").mkdir()
    with pytest.raises(ContextError, match=r"big\.bin changed while the build was reading it"):
        write_selection(ctx, selection, tmp_path / "out2")


def test_source_date_epoch_sets_mtimes(ctx: SourceTree, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_selection(ctx, select_sources(ctx, ["src"], "/app/", CopyOptions()), out, mtime_ns=10**18)
    assert (out / "app" / "main.go").stat().st_mtime_ns == 10**18
    assert (out / "app" / "util").stat().st_mtime_ns == 10**18


def test_hardlinks_stay_hardlinks(tmp_path: Path) -> None:
    root = tmp_path / "stage"
    _write(root, {"bin/busybox": "bb"})
    os.link(root / "bin" / "busybox", root / "bin" / "sh")
    tree = open_rootfs(root, StatCache(None))
    out = tmp_path / "out"
    out.mkdir()
    selection = select_sources(tree, ["/bin"], "/usr/bin/", CopyOptions())
    write_selection(tree, selection, out)
    assert (out / "usr/bin/sh").stat().st_ino == (out / "usr/bin/busybox").stat().st_ino
    # Two separate files of the same content give a different layer, so a different key.
    other = tmp_path / "other"
    _write(other, {"bin/busybox": "bb", "bin/sh": "bb"})
    copies = open_rootfs(other, StatCache(None))
    assert selection_key(tree, selection) != selection_key(
        copies, select_sources(copies, ["/bin"], "/usr/bin/", CopyOptions())
    )


def test_same_source_twice_is_written_once(ctx: SourceTree, tmp_path: Path) -> None:
    got = _copy(ctx, ["a.txt", "a.txt"], "/app/", tmp_path / "out")
    assert got["app/a.txt"][4] == "a"


def test_symlink_in_destination_is_replaced_not_followed(ctx: SourceTree, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    out = tmp_path / "out"
    (out / "app").mkdir(parents=True)
    os.symlink(victim, out / "app" / "a.txt")
    write_selection(ctx, select_sources(ctx, ["a.txt"], "/app/", CopyOptions()), out)
    assert victim.read_text() == "untouched"
    assert not (out / "app" / "a.txt").is_symlink()


def test_symlinked_parent_in_destination_is_refused(ctx: SourceTree, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "app")
    with pytest.raises(ContextError, match="cannot copy to non-directory: /app"):
        write_selection(ctx, select_sources(ctx, ["src"], "/app/", CopyOptions()), out)
    assert list(elsewhere.iterdir()) == []


# --- the key ---------------------------------------------------------------------------------------


def _key(tree: SourceTree, sources: list[str], dest: str = "/app/", **options: object) -> str:
    return str(selection_key(tree, select_sources(tree, sources, dest, CopyOptions(**options))))  # type: ignore[arg-type]


def test_key_ignores_mtime(ctx: SourceTree) -> None:
    before = _key(ctx, ["src"])
    os.utime(ctx.root / "src" / "main.go", (1, 1))
    assert _key(ctx, ["src"]) == before


def test_key_sees_content_mode_owner_and_dest(ctx: SourceTree) -> None:
    base = _key(ctx, ["src"])
    assert _key(ctx, ["src"], "/other/") != base
    assert _key(ctx, ["src"], chown=(1, 1)) != base
    assert _key(ctx, ["src"], chmod=parse_chmod("700")) != base
    os.chmod(ctx.root / "src" / "README", 0o600)
    moded = _key(ctx, ["src"])
    assert moded != base
    (ctx.root / "src" / "README").write_text("new readme")
    assert _key(ctx, ["src"]) != moded


def test_key_ignores_files_not_selected(ctx: SourceTree) -> None:
    base = _key(ctx, ["src/*.go"])
    (ctx.root / "notes.md").write_text("unrelated change")
    (ctx.root / "src" / "README").write_text("also unrelated")
    assert _key(ctx, ["src/*.go"]) == base


def test_identical_stage_output_gives_the_same_key(tmp_path: Path) -> None:
    # COPY --from=builder: a rebuilt stage with the same files must not invalidate.
    first, second = tmp_path / "one", tmp_path / "two"
    for root in (first, second):
        _write(root, {"out/app": "binary", "out/lib/x.so": "lib"})
    os.utime(second / "out" / "app", (99, 99))
    keys = {
        str(selection_key(t, select_sources(t, ["/out"], "/usr/", CopyOptions())))
        for t in (open_rootfs(first, StatCache(None)), open_rootfs(second, StatCache(None)))
    }
    assert len(keys) == 1


# --- properties ------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "c.txt", ".hidden", "d d"])
_LEAF = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=64), st.sampled_from([0o644, 0o755, 0o600, 0o4755])),
    st.tuples(st.just("link"), st.sampled_from(["a", "../x", "/abs/target", "."]), st.just(0o777)),
)
_TREE = st.recursive(
    _LEAF,
    lambda children: st.dictionaries(_NAMES, children, max_size=4).map(lambda d: ("dir", d, 0o755)),
    max_leaves=12,
)


def _build(root: Path, node: tuple[str, object, int]) -> None:
    kind, payload, mode = node
    if kind == "dir":
        root.mkdir()
        for name, child in payload.items():  # type: ignore[attr-defined]
            _build(root / name, child)
    elif kind == "file":
        root.write_bytes(payload)  # type: ignore[arg-type]
    else:
        os.symlink(payload, root)  # type: ignore[arg-type]
    if kind != "link":
        os.chmod(root, mode)


def _listing(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
    return out


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_NAMES, _TREE, max_size=4))
def test_copying_a_directory_reproduces_it(layout: dict[str, tuple[str, object, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ctx" / "src"
        src.parent.mkdir()
        _build(src, ("dir", layout, 0o755))
        tree = open_build_context(src.parent, StatCache(None))
        out = Path(tmp) / "out"
        out.mkdir()
        selection = select_sources(tree, ["src"], "/d/", CopyOptions())
        key = selection_key(tree, selection)
        write_selection(tree, selection, out)
        assert _listing(out / "d") == _listing(src)
        for path in src.rglob("*"):  # new mtimes, same everything else: same key
            os.utime(path, (7, 7), follow_symlinks=False)
        assert selection_key(tree, select_sources(tree, ["src"], "/d/", CopyOptions())) == key


# --- stopping (Ctrl-C reaches only the main thread; the copy, on a stage's thread, polls a flag) --


def test_a_stop_set_during_the_copy_ends_it_at_the_next_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from lamina.engine.steps.copyadd import placement as copy_module

    root = tmp_path / "ctx"
    _write(root, {f"d{i % 4}/f{i:03}": "x" for i in range(400)})
    tree = open_build_context(root, StatCache(None))
    selection = select_sources(tree, ["."], "/out/", CopyOptions(), None)
    stop = threading.Event()
    copied = []
    real_copy = copy_module._Writer.write_file

    def copy_then_stop(self: object, item: object, path: str) -> int:
        copied.append(path)
        if len(copied) == 10:
            stop.set()
        return real_copy(self, item, path)  # type: ignore[arg-type]

    monkeypatch.setattr(copy_module._Writer, "write_file", copy_then_stop)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_selection(tree, selection, out, None, stop=stop)
    assert len(copied) == 10  # the file in hand is finished, no other begun
