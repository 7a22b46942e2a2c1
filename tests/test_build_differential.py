"""Regressions found by benchmarks/differential.py: lamina's image against BuildKit's, case by case."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, image_entries, needs_id_range, rootfs, write_context
from tests.support.servers import serve_directory

pytestmark = pytest.mark.sandbox


def _archive(owner: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = (("./", tarfile.DIRTYPE), ("dir/", tarfile.DIRTYPE), ("dir/a.txt", tarfile.REGTYPE))
        for name, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.uid, info.gid = owner
            data = b"a\n" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_add_chown_archive_owns_the_directories_it_makes(cache: Path, tmp_path: Path) -> None:
    # BuildKit makes a missing destination (and its missing parents) with the
    # --chown owner before unpacking; lamina made them root's.
    needs_id_range()
    dockerfile = f"FROM {BASE}\nADD --chown=7:8 x.tar.gz /new/chowned/\nADD x.tar.gz /plain/\n"
    ctx = write_context(tmp_path / "ctx", dockerfile, {"x.tar.gz": _archive((1234, 5678))})
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    owners = {path: (entries[path].uid, entries[path].gid) for path in entries}
    assert owners["new"] == (7, 8)
    assert owners["new/chowned"] == (7, 8)
    assert owners["new/chowned/dir"] == owners["new/chowned/dir/a.txt"] == (7, 8)
    # Without --chown the archive's owners are kept (rootless too) and the made directory is root's.
    assert owners["plain"] == (0, 0)
    assert owners["plain/dir/a.txt"] == (1234, 5678)


def test_copy_heredoc_expands_like_buildkit(cache: Path, tmp_path: Path) -> None:
    # BuildKit expands an unquoted COPY/ADD heredoc's body from ARG and ENV,
    # keeping quotes and applying backslash escapes; a quoted delimiter keeps it raw.
    dockerfile = (
        f"FROM {BASE}\nARG NAME=world\nENV GREETING=hello\n"
        "COPY <<EOF /expanded\n"
        "$GREETING ${NAME} \"$NAME\" '$NAME' \\$NAME [$1] ${UNSET:-fallback}\nEOF\n"
        'COPY <<"EOF" /literal\n$GREETING \\$x "q"\nEOF\n'
        "ADD <<EOF /added\nadded $NAME\nEOF\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    out = tmp_path / "out"
    rootfs(cache, ctx, out, build_args={"NAME": "lamina"})
    assert (out / "expanded").read_text() == "hello lamina \"lamina\" 'lamina' $NAME [] fallback\n"
    assert (out / "literal").read_text() == '$GREETING \\$x "q"\n'
    assert (out / "added").read_text() == "added lamina\n"


def test_copy_heredoc_follows_its_arg(cache: Path, tmp_path: Path) -> None:
    # The expanded body keys the step: a changed ARG re-runs it.
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nARG V=1\nCOPY <<EOF /v\n$V\nEOF\n")
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    rootfs(cache, ctx, out1)
    rootfs(cache, ctx, out2, build_args={"V": "2"})
    assert (out1 / "v").read_text() == "1\n"
    assert (out2 / "v").read_text() == "2\n"


def test_workdir_keeps_an_absolute_path_as_written(cache: Path, tmp_path: Path) -> None:
    # BuildKit records `WORKDIR /app/` as "/app/" (a relative one is joined and
    # cleaned), while the directory made and entered is the clean path.
    dockerfile = (
        f"FROM {BASE}\nWORKDIR /app/\nRUN pwd > /pwd1\nWORKDIR sub/../lib/\nRUN pwd > /pwd2\n"
        "WORKDIR //x//y/\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    out = tmp_path / "out"
    result = rootfs(cache, ctx, out)
    assert result.config.config.working_dir == "//x//y/"
    lines = [h.created_by for h in result.config.history if h.created_by.startswith("WORKDIR")]
    assert lines == ["WORKDIR /app/", "WORKDIR /app/lib", "WORKDIR //x//y/"]
    assert (out / "pwd1").read_text() == "/app\n"
    assert (out / "pwd2").read_text() == "/app/lib\n"
    assert (out / "x/y").is_dir()


def test_copy_and_add_into_a_directory_of_another_user(cache: Path, tmp_path: Path) -> None:
    # Rootless, COPY/ADD into a directory a RUN gave to uid 1000 re-owned it to
    # root in the new layer, and ADD of an archive there failed (the directory
    # was given to 1000 before anything was written into it).
    needs_id_range()
    dockerfile = (
        f"FROM {BASE}\nRUN mkdir -p /d/e && chown 1000:1000 /d /d/e\n"
        "COPY f /d/e/\nADD x.tar /d/e/\nCOPY <<EOF /d/e/h.txt\nhi\nEOF\n"
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("in.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"in\n"))
    ctx = write_context(tmp_path / "ctx", dockerfile, {"f": "f\n", "x.tar": buf.getvalue()})
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    for path in ("d", "d/e"):
        assert (entries[path].uid, entries[path].gid) == (1000, 1000), path
    for path in ("d/e/f", "d/e/in.txt", "d/e/h.txt"):
        assert (entries[path].uid, entries[path].gid) == (0, 0), path


def test_copy_chmod_of_a_directory_without_search_permission(cache: Path, tmp_path: Path) -> None:
    # --chmod=640 applies to the copied directories too; rootless, lamina could
    # not fill a directory it had already made 0640. (Without an id range the
    # layer writer walks the layer outside a user namespace and cannot enter
    # such a directory: that case needs the range.)
    needs_id_range()
    files = {"tree/t": "t\n", "tree/sub/s": "s\n"}
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY --chmod=640 tree/ /tree/\n", files)
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    assert entries["tree/sub"].mode & 0o7777 == 0o640
    assert entries["tree/sub/s"].mode & 0o7777 == 0o640


def test_copy_chown_keeps_the_owner_of_existing_parents(cache: Path, tmp_path: Path) -> None:
    # Rootless, COPY --chown gave the owner to the directories above the
    # destination that already existed (BuildKit leaves them alone).
    needs_id_range()
    dockerfile = f"FROM {BASE}\nWORKDIR /srv/app\nCOPY --chown=nobody:nogroup f ./etc/\n"
    ctx = write_context(tmp_path / "ctx", dockerfile, {"f": "f\n"})
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    owners = {path: (entries[path].uid, entries[path].gid) for path in ("srv", "srv/app", "srv/app/etc")}
    assert owners == {"srv": (0, 0), "srv/app": (0, 0), "srv/app/etc": (65534, 65534)}
    assert (entries["srv/app/etc/f"].uid, entries["srv/app/etc/f"].gid) == (65534, 65534)


def test_add_url_names_and_owners(cache: Path, tmp_path: Path) -> None:
    # A URL ending in `/` is named after its last segment (Go's path.Base), and
    # the directories ADD --chown makes for a download or a heredoc are the owner's.
    needs_id_range()
    served = tmp_path / "served"
    (served / "dir").mkdir(parents=True)
    (served / "dir" / "index.html").write_text("index\n")
    with serve_directory(served) as served_at:
        url = f"{served_at}/dir/"
        dockerfile = (
            f"FROM {BASE}\nADD {url} /index/\nADD --chown=nobody:nogroup {url}index.html /web/\n"
            "COPY --chown=nobody:nogroup <<EOF /made/by/heredoc/x\nx\nEOF\n"
        )
        ctx = write_context(tmp_path / "ctx", dockerfile)
        archive = tmp_path / "image.tar"
        build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    assert "index/dir" in entries and entries["index/dir"].mode & 0o777 == 0o600
    for path in ("web", "web/index.html", "made", "made/by", "made/by/heredoc", "made/by/heredoc/x"):
        assert (entries[path].uid, entries[path].gid) == (65534, 65534), path


def test_copy_onto_a_dangling_symlink_writes_its_target(cache: Path, tmp_path: Path) -> None:
    # fsutil's RootPath follows the destination's symlinks even when the target
    # is missing: BuildKit writes /nowhere and keeps /dangling a link.
    dockerfile = (
        f"FROM {BASE}\nRUN ln -s /nowhere /dangling && ln -s /target /file-link && echo old > /target\n"
        "COPY f /dangling\nCOPY f /file-link\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile, {"f": "new\n"})
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert os.readlink(out / "dangling") == "/nowhere"
    assert (out / "nowhere").read_text() == "new\n"
    assert os.readlink(out / "file-link") == "/target"
    assert (out / "target").read_text() == "new\n"


def test_onbuild_trigger_names_a_stage_of_the_child(cache: Path, tmp_path: Path) -> None:
    # A base image's `ONBUILD COPY --from=builder` names a stage of the
    # Dockerfile that uses it; current BuildKit builds that stage first
    # (docker 20.10's cannot), lamina said "needed before it was built".
    base = write_context(
        tmp_path / "base", f"FROM {BASE}\nONBUILD COPY --from=builder /out/ /app/\nONBUILD WORKDIR /app\n"
    )
    build(cache, base, tags=["lamina-test/onbuild-from:1"])
    dockerfile = (
        f"FROM {BASE} AS builder\nRUN mkdir /out && echo built > /out/artifact\n"
        "FROM lamina-test/onbuild-from:1 AS app\nRUN pwd > /cwd\n"
        "FROM app\nRUN cat /app/artifact > /seen\n"
    )
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", dockerfile), out)
    assert (out / "app/artifact").read_text() == "built\n"
    assert (out / "cwd").read_text() == "/app\n"
    assert (out / "seen").read_text() == "built\n"


def test_onbuild_trigger_naming_its_own_stage_is_one_error(cache: Path, tmp_path: Path) -> None:
    from lamina.errors import BuildError

    base = write_context(tmp_path / "base", f"FROM {BASE}\nONBUILD COPY --from=app /etc/passwd /x\n")
    build(cache, base, tags=["lamina-test/onbuild-self:1"])
    ctx = write_context(tmp_path / "ctx", "FROM lamina-test/onbuild-self:1 AS app\nRUN true\n")
    with pytest.raises(BuildError, match="circular"):
        build(cache, ctx)


def test_run_process_starts_as_buildkit_starts_it(cache: Path, tmp_path: Path) -> None:
    # Recorded from DOCKER_BUILDKIT=1 docker build (docker 20.10.24, runc 1.1.5) with the
    # exec form, so no shell stands between: BuildKit's values, for root.
    dockerfile = (
        f"FROM {BASE}\n"
        'RUN ["/bin/sh", "-c", "exec grep -E \'^(SigIgn|SigBlk|CapBnd|CapEff|Seccomp|NoNewPrivs):\' '
        '/proc/self/status > /status"]\n'
        'RUN ["/bin/sh", "-c", "umask > /umask; exec ls /proc/self/fd > /fds"]\n'
        "RUN cat /etc/hosts > /hosts\n"
    )
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", dockerfile), out)
    assert (out / "status").read_text() == (
        "SigBlk:\t0000000000000000\n"
        "SigIgn:\t0000000000000000\n"
        "CapEff:\t00000000a80425fb\n"
        "CapBnd:\t00000000a80425fb\n"
        "NoNewPrivs:\t0\n"
        "Seccomp:\t2\n"
    )
    assert (out / "umask").read_text() == "0022\n"
    assert (out / "fds").read_text().split() == ["0", "1", "2", "3"]
    assert (
        out / "hosts"
    ).read_text() == "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"
