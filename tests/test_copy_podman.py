"""COPY rules checked against a second implementation: podman (buildah) building FROM scratch.

Each case is one COPY line; podman builds them all into one image and
writes its root filesystem with `-o type=local`, lamina's selection and
writer produce the same destinations, and the two trees must agree on
paths, types, modes, owners, link targets and contents. Only cases where
Docker, BuildKit and buildah agree are listed (podman 4.3 has neither
symbolic --chmod nor --exclude/--parents).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from lamina.cache.statcache import StatCache
from lamina.engine.context import open_build_context, open_rootfs
from lamina.engine.steps.copyadd.chmod import parse_chmod
from lamina.engine.steps.copyadd.placement import write_selection
from lamina.engine.steps.copyadd.selection import CopyOptions, select_sources

# (flags as written in the Dockerfile, sources, dest)
CASES: list[tuple[str, list[str], str]] = [
    ("", ["a.txt"], "/s1/"),
    ("", ["a.txt"], "/s2/renamed"),
    ("", ["dir"], "/s3"),
    ("", ["dir"], "/s4/"),
    ("", ["*.txt"], "/s5/"),
    ("", ["link"], "/s6/"),
    ("", ["a.txt", "b.txt"], "/s7/"),
    # --chmod into directories that exist: the ones COPY creates take an octal
    # --chmod in current BuildKit (testCopyChmod), 0755 in buildah and BuildKit 0.8.
    ("--chmod=0640", ["dir"], "/s4/"),
    ("--chown=12:34", ["dir"], "/s9/"),
    ("", ["d*"], "/s10/"),
    ("", ["."], "/s11/"),
    ("", ["dir/sub/../c.txt"], "/s12/"),
    ("", ["build"], "/s13/"),
    ("--chmod=4755", ["a.txt"], "/s1/"),
    ("", ["b.txt"], "/s1"),  # /s1 is a directory by now: b.txt goes into it
    ("--chown=7:7", ["dir"], "/s3/"),  # existing /s3 keeps its owner, new entries get 7:7
]


def _context(root: Path) -> None:
    files = {
        "a.txt": "a",
        "b.txt": "bb",
        "keep.md": "keep",
        "README.md": "readme",
        "build/out.o": "object",
        "build/keep": "kept",
        "dir/c.txt": "c",
        "dir/sub/d.go": "package d",
        "docs/guide.txt": "guide",
        ".dockerignore": "*.md\n!keep.md\nbuild\n!build/keep\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    os.chmod(root / "dir" / "sub", 0o750)
    os.symlink("a.txt", root / "link")
    os.symlink("../a.txt", root / "dir" / "up")
    dockerfile = ["FROM scratch"]
    for flags, sources, dest in CASES:
        dockerfile.append(" ".join(["COPY", flags, *sources, dest]).replace("  ", " "))
    (root / "Dockerfile").write_text("\n".join(dockerfile) + "\n")


class _Image:
    """The stage so far, for `dest is an existing directory` (symlinks resolved inside it)."""

    def __init__(self, root: Path) -> None:
        self.tree = open_rootfs(root, StatCache(None))

    def resolve(self, path: str, *, follow_last: bool = True) -> str | None:
        resolved = self.tree.resolve(path.lstrip("/"), follow_last=follow_last)
        return "/" + resolved if os.path.lexists(self.tree.abspath(resolved)) else None

    def stat(self, path: str) -> os.stat_result | None:
        resolved = self.resolve(path)
        return os.lstat(self.tree.abspath(resolved.lstrip("/"))) if resolved else None


def _options(flags: str) -> CopyOptions:
    if flags.startswith("--chmod="):
        return CopyOptions(chmod=parse_chmod(flags.removeprefix("--chmod=")))
    if flags.startswith("--chown="):
        uid, gid = flags.removeprefix("--chown=").split(":")
        return CopyOptions(chown=(int(uid), int(gid)))
    return CopyOptions()


def _listing(root: Path) -> dict[str, tuple[str, int, int, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0o777, st.st_uid, st.st_gid, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, path.read_text())
    return out


pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a rootful podman build needs root"),
]


def _podman_build(context: Path, tmp_path: Path) -> Path:
    """Build `context` with podman (its own throwaway storage); return the root filesystem."""
    out = tmp_path / "podman-out"
    with tempfile.TemporaryDirectory(prefix="lamina-pd-") as run:  # podman wants a short runroot
        storage = ["--root", str(tmp_path / "storage"), "--runroot", run, "--storage-driver", "vfs"]
        build = ["build", "--network=none", "--pull=never", "-o", f"type=local,dest={out}", str(context)]
        result = subprocess.run(["podman", *storage, *build], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_copy_matches_podman(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    _context(context)
    theirs = _podman_build(context, tmp_path)

    ours = tmp_path / "lamina-out"
    ours.mkdir()
    tree = open_build_context(context, StatCache(None))
    image = _Image(ours)  # the image so far is what the earlier cases wrote
    for flags, sources, dest in CASES:
        selection = select_sources(tree, sources, dest, _options(flags), image)
        write_selection(tree, selection, ours, image)

    want, got = _listing(theirs), _listing(ours)
    assert len(want) > 40  # podman really wrote the tree
    assert sorted(got) == sorted(want)
    assert {p: v for p, v in got.items() if v != want[p]} == {}


IGNORE_FILE = """# comment
**/*.log
!important.log
docs/**
!docs/keep/**
vendor
*/tmp
[ab]?.txt
!a1.txt
/root-only
.*
!.dockerignore
**/node_modules
sp?ace.txt
"""
IGNORE_TREE = [
    "x.log",
    "important.log",
    "sub/y.log",
    "sub/important.log",
    "docs/a.md",
    "docs/keep/b.md",
    "docs/keep/deep/c.md",
    "vendor/v.go",
    "vendor/a/b/c.go",
    "p/tmp/t",
    "p/q/tmp/t",
    "a1.txt",
    "a2.txt",
    "b3.txt",
    "c4.txt",
    "root-only",
    "sub/root-only",
    "sp ace.txt",
    ".env",
    ".git/config",
    "node_modules/m/i.js",
    "src/node_modules/x.js",
]


def test_dockerignore_walk_matches_podman(tmp_path: Path) -> None:
    """What `COPY . /` sends: exceptions re-including files under excluded directories."""
    context = tmp_path / "ctx"
    for rel in IGNORE_TREE:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_text(rel)
    (context / ".dockerignore").write_text(IGNORE_FILE)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    theirs = _podman_build(context, tmp_path)
    want = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*"))
    got = sorted(e.path for e in open_build_context(context, StatCache(None)).walk())
    assert "docs/keep/deep/c.md" in want and "vendor" not in want
    assert got == want
