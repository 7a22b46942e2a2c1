"""Bad input meets the real CLI: one `error:` line naming file and line, nothing lost.

Each case runs `python -m lamina ...` against a cache holding the busybox
base, after a good build has filled it. It asserts the command fails with a
single `error:` line (the last line of stderr, no traceback), then that the
next good build still works and hits the cache, and that nothing appeared in
the watched tree beside the context except where an output was asked for.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.support.build import BASE, build, cached_steps, run_cli, write_context
from tests.support.nobody import as_nobody

GOOD = f"FROM {BASE}\nCOPY a.txt /a.txt\nLABEL ok=1\n"
GOOD_RUN = f"FROM {BASE}\nCOPY a.txt /a.txt\nRUN echo built > /built\n"


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", GOOD, {"a.txt": "alpha\n"})


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every path under `root` (but `skip`) with its type bits and size: what a stray write would change."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            st = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (st.st_mode, st.st_size if name in filenames else 0)
    return found


def fails(cache: Path, *args: str, cwd: Path | None = None) -> str:
    """Run lamina, expect failure with one `error:` line last; return that line."""
    proc = run_cli(*args, cache=cache, check=False, **({"cwd": cwd} if cwd else {}))
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


def still_good(cache: Path, ctx: Path, text: str = GOOD) -> None:
    """The good Dockerfile builds again, every step from the cache."""
    (ctx / "Dockerfile").write_text(text)
    result = build(cache, ctx)
    assert all(cached_steps(result)), cached_steps(result)


def bad_build(
    cache: Path, ctx: Path, dockerfile: str, *args: str, files: dict[str, bytes] | None = None
) -> str:
    """Build `dockerfile` (as ctx/bad.Dockerfile) after a good build; check nothing strayed or broke."""
    build(cache, ctx)
    for name, data in (files or {}).items():
        (ctx / name).write_bytes(data)
    (ctx / "bad.Dockerfile").write_text(dockerfile)
    watched = ctx.parent
    before = tree(watched, skip=(cache,))
    line = fails(cache, "build", "-f", str(ctx / "bad.Dockerfile"), *args, str(ctx))
    assert tree(watched, skip=(cache,)) == before
    still_good(cache, ctx)
    return line


# --- front end ---------------------------------------------------------------------------


def test_unknown_instruction(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\nFROBNICATE x\n")
    assert "bad.Dockerfile:2" in line and "FROBNICATE" in line


def test_bad_flag(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\n\nCOPY --frob=1 a.txt /a\n")
    assert "bad.Dockerfile:3" in line and "--frob" in line


def test_unterminated_heredoc(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\nRUN <<EOF\necho hi\n")
    assert "bad.Dockerfile:2" in line and "heredoc" in line


def test_control_characters_escaped(cache: Path, ctx: Path) -> None:
    """A hostile Dockerfile cannot send terminal escapes or extra lines through the error."""
    line = bad_build(cache, ctx, f"FROM {BASE}\n\x00\x1b[2Jboom\n")
    assert "bad.Dockerfile:2" in line and "\\x1b[2Jboom" in line and "\x1b" not in line


def test_target_missing(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE} AS one\nLABEL a=1\n", "--target", "nosuch")
    assert "nosuch" in line and "one" in line


def test_build_arg_malformed(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\nARG X\nLABEL x=$X\n", "--build-arg", "=oops")
    assert "--build-arg" in line and "=oops" in line


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/passwd/sub"])
def test_workdir_on_a_file(cache: Path, ctx: Path, path: str) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\nWORKDIR {path}\n")
    assert "bad.Dockerfile:2" in line and "/etc/passwd exists and is not a directory" in line


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("ARG S=²\nSTOPSIGNAL $S\n", "invalid signal: ²"),
        ("ARG P=²\nEXPOSE $P\n", "invalid containerPort: ²"),
        ("ARG P=80/sctp2\nEXPOSE $P\n", "invalid proto: sctp2"),
    ],
    ids=["stopsignal", "expose", "expose-protocol"],
)
def test_metadata_word_from_variable_located(cache: Path, ctx: Path, step: str, message: str) -> None:
    """A word only a build can check (it holds a variable) fails naming the file and line (issue 20)."""
    line = bad_build(cache, ctx, f"FROM {BASE}\n{step}")
    assert "bad.Dockerfile:3: " in line and message in line, line


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("USER ²\nWORKDIR /w\n", "unable to find user ²"),
        ("ARG U=²\nCOPY --chown=$U a.txt /b\n", "unable to find user ²"),
        ("ARG G=1:²\nCOPY --chown=$G a.txt /b\n", "unable to find group ²"),
        ("COPY --chown=4294967296 a.txt /b\n", "unable to find user 4294967296"),
        ("COPY --chown=0:4294967296 a.txt /b\n", "unable to find group 4294967296"),
    ],
    ids=["user-workdir", "chown-user", "chown-group", "uid-past-32-bits", "gid-past-32-bits"],
)
def test_owner_unicode_digits_and_huge_ids_are_names(cache: Path, ctx: Path, step: str, message: str) -> None:
    """`²` passes str.isdigit but not int(); an id is ASCII digits within 32 bits, as BuildKit's
    ParseUint(s, 10, 32); anything else is a name the image must define (issue 20)."""
    line = bad_build(cache, ctx, f"FROM {BASE}\n{step}")
    assert "bad.Dockerfile:" in line and message in line, line


def test_owner_from_passwd_with_garbage_uid(cache: Path, ctx: Path) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/sh\nevil:x:\xc2\xb2:0::/:/bin/sh\n"
    line = bad_build(
        cache,
        ctx,
        f"FROM {BASE}\nCOPY passwd /etc/passwd\nCOPY --chown=evil a.txt /b\n",
        files={"passwd": passwd},
    )
    assert "bad.Dockerfile:3: " in line and "/etc/passwd: entry 'evil' has an invalid id '²'" in line, line


# --- context ---------------------------------------------------------------------------


def test_copy_missing_file(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, f"FROM {BASE}\nCOPY missing.txt /x\n")
    assert line.startswith("error: ") and "bad.Dockerfile:2" in line and "missing.txt" in line
    assert "not found" in line


def test_copy_parent_path(cache: Path, ctx: Path) -> None:
    (ctx.parent / "outside").write_text("secret\n")
    line = bad_build(cache, ctx, f"FROM {BASE}\nCOPY ../outside /x\n")
    assert "bad.Dockerfile:2" in line and "outside the build context" in line


def test_copy_symlink_out_of_context(cache: Path, ctx: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy\n")
    (ctx / "link").symlink_to(secret)
    line = bad_build(cache, ctx, f"FROM {BASE}\nCOPY link /x\n")
    # Refused (BuildKit resolves it inside the context, where nothing is): never the host's file.
    assert "bad.Dockerfile:2" in line and "link" in line


def test_context_dir_missing(cache: Path, tmp_path: Path) -> None:
    line = fails(cache, "build", str(tmp_path / "nonexistent"))
    assert line == f"error: build context {tmp_path / 'nonexistent'} does not exist"


def test_dockerfile_is_a_directory(cache: Path, ctx: Path) -> None:
    (ctx / "Dockerfile").unlink()
    (ctx / "Dockerfile").mkdir()
    line = fails(cache, "build", str(ctx))
    assert str(ctx / "Dockerfile") in line


def test_dockerfile_unreadable() -> None:
    """A mode-000 Dockerfile; as root, lamina runs as nobody (root would read it anyway)."""
    import shutil
    import tempfile

    prefix = as_nobody("root reads a mode-000 file")
    # Somewhere nobody can reach: pytest's own tmp dirs are private to root.
    top = Path(tempfile.mkdtemp(prefix="lamina-unreadable-"))
    try:
        top.chmod(0o777)
        ctx = write_context(top / "ctx", GOOD)
        ctx.chmod(0o777)
        (ctx / "Dockerfile").chmod(0)
        env = {**os.environ, "LAMINA_CACHE": str(top / "cache"), "HOME": str(top)}
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "lamina", "build", str(ctx)],
            capture_output=True,
            text=True,
            env=env,
            cwd=top,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: cannot read Dockerfile {ctx / 'Dockerfile'}: Permission denied"
        ], proc.stderr
    finally:
        shutil.rmtree(top)


# --- images ---------------------------------------------------------------------------------


def test_copy_from_unknown_stage(cache: Path, ctx: Path) -> None:
    # As BuildKit: an unknown stage name is an image reference; none is reachable here.
    line = bad_build(cache, ctx, f"FROM {BASE}\nCOPY --from=nosuchstage /a /a\n")
    assert "bad.Dockerfile:2" in line and "nosuchstage" in line


def test_from_missing_image(cache: Path, ctx: Path) -> None:
    line = bad_build(cache, ctx, "FROM lamina-test/nosuchimage:1\nLABEL a=1\n")
    assert "bad.Dockerfile:1" in line and "nosuchimage" in line


def test_mount_from_missing_image(cache: Path, ctx: Path) -> None:
    line = bad_build(
        cache, ctx, f"FROM {BASE}\nRUN --mount=type=bind,from=lamina-test/nosuch:1,target=/m true\n"
    )
    assert "bad.Dockerfile:2" in line and "from=lamina-test/nosuch:1" in line and "None" not in line


def test_secret_file_missing(cache: Path, ctx: Path, tmp_path: Path) -> None:
    line = bad_build(cache, ctx, GOOD, "--secret", f"id=tok,src={tmp_path / 'nosuch'}")
    assert line == f"error: --secret id=tok: {tmp_path / 'nosuch'} is not a readable file"


def test_run_missing_image(cache: Path) -> None:
    line = fails(cache, "run", "lamina-test/nosuch:1", "true")
    assert "lamina-test/nosuch:1" in line


def test_run_env_without_name(cache: Path) -> None:
    assert fails(cache, "run", "-e", "=x", BASE, "true") == "error: -e '=x': the variable needs a name (K=V)"


def test_save_missing_image(cache: Path, tmp_path: Path) -> None:
    line = fails(cache, "save", "lamina-test/nosuch:1", "-o", str(tmp_path / "s.tar"))
    assert "lamina-test/nosuch:1" in line
    assert not (tmp_path / "s.tar").exists()


def test_load_truncated_archive(cache: Path, tmp_path: Path, busybox_image: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(busybox_image.read_bytes()[:3000])
    assert str(cut) in fails(cache, "load", str(cut))
    # The store still serves the base.
    build(cache, write_context(tmp_path / "ctx", GOOD, {"a.txt": "alpha\n"}))


def test_load_not_an_archive(cache: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    assert str(junk) in fails(cache, "load", str(junk))


# --- hostile archives --------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes | str | None]]) -> bytes:
    """A tar of (name, data) files, (name, str) symlinks to str, (name, None) dirs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
    return buf.getvalue()


def test_add_tar_with_parent_entry(cache: Path, ctx: Path, tmp_path: Path) -> None:
    evil = _tar([("ok.txt", b"fine"), ("../../escape.txt", b"dotdot")])
    line = bad_build(cache, ctx, f"FROM {BASE}\nADD evil.tar /dst/\n", files={"evil.tar": evil})
    assert "bad.Dockerfile:2" in line and "escape.txt" in line
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_add_tar_with_escapes_in_a_name(cache: Path, ctx: Path) -> None:
    evil = _tar([("../\x1b[2J\nerror: fake", b"x")])
    line = bad_build(cache, ctx, f"FROM {BASE}\nADD evil.tar /dst/\n", files={"evil.tar": evil})
    assert "bad.Dockerfile:2" in line and "\\x1b[2J\\nerror: fake" in line


def test_add_tar_writes_through_symlink_stay_inside(cache: Path, ctx: Path, tmp_path: Path) -> None:
    """An absolute symlink then a file under it: contained in the image (as Docker), never the host."""
    target = tmp_path / "hostdir"
    target.mkdir()
    evil = _tar(
        [
            ("abs", str(target)),
            ("abs/pwned", b"through"),
            ("rel", "../../../../../../" + str(target)),
            ("rel/pwned2", b"x"),
        ]
    )
    (ctx / "evil.tar").write_bytes(evil)
    build(cache, ctx)
    (ctx / "bad.Dockerfile").write_text(f"FROM {BASE}\nADD evil.tar /dst/\n")
    out = tmp_path / "out"
    proc = run_cli(
        "build",
        "-f",
        str(ctx / "bad.Dockerfile"),
        "-o",
        f"type=local,dest={out}",
        str(ctx),
        cache=cache,
        check=False,
    )
    assert "Traceback" not in proc.stderr
    assert list(target.iterdir()) == []
    if proc.returncode != 0:
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and "Dockerfile:2" in line and "symlink" in line
    else:
        # Resolved inside the image's root: the file lands at <rootfs>/<target>/pwned.
        assert (out / str(target).lstrip("/") / "pwned").read_bytes() == b"through"
    still_good(cache, ctx)


@pytest.mark.parametrize("dest", ["/etc/passwd/", "/etc/passwd/sub/"])
def test_add_tar_onto_a_file(cache: Path, ctx: Path, dest: str) -> None:
    """The base's file stays a file: the unpack is refused, as BuildKit's mkdir fails."""
    line = bad_build(
        cache, ctx, f"FROM {BASE}\nADD ok.tar {dest}\n", files={"ok.tar": _tar([("f.txt", b"x")])}
    )
    assert "bad.Dockerfile:2" in line and "non-directory: /etc/passwd" in line


# --- outputs -----------------------------------------------------------------------------


def test_local_output_onto_a_file(cache: Path, ctx: Path, tmp_path: Path) -> None:
    dest = tmp_path / "afile"
    dest.write_text("keep me\n")
    line = bad_build(cache, ctx, GOOD, "-o", f"type=local,dest={dest}")
    assert str(dest) in line
    assert dest.read_text() == "keep me\n"


def test_oci_output_in_missing_dir(cache: Path, ctx: Path, tmp_path: Path) -> None:
    dest = tmp_path / "nonexistent-dir" / "x.tar"
    line = bad_build(cache, ctx, GOOD, "-o", f"type=oci,dest={dest}")
    assert str(dest) in line and "tmp" not in line.replace(str(tmp_path), "")
    assert not dest.parent.exists()


@pytest.mark.parametrize("flag", ["--iidfile", "--metadata-file"])
def test_result_file_in_missing_dir(cache: Path, ctx: Path, tmp_path: Path, flag: str) -> None:
    dest = tmp_path / "nonexistent" / "out"
    line = bad_build(cache, ctx, GOOD, flag, str(dest))
    assert flag in line and f"directory {dest.parent} does not exist" in line


@pytest.mark.parametrize("flag", ["--iidfile", "-o"])
def test_result_file_under_a_file(cache: Path, ctx: Path, tmp_path: Path, flag: str) -> None:
    # The parent exists, as a file: saying it does not exist sends the user looking for it.
    (tmp_path / "afile").write_text("x\n")
    dest = tmp_path / "afile" / "out"
    value = f"type=oci,dest={dest}" if flag == "-o" else str(dest)
    line = bad_build(cache, ctx, GOOD, flag, value)
    assert f"{tmp_path / 'afile'} is not a directory" in line and "does not exist" not in line


def test_result_file_to_a_fifo_is_written_through(cache: Path, ctx: Path, tmp_path: Path) -> None:
    """--iidfile is written beside and renamed over a file, but a FIFO is written through (a
    rename would replace the pipe its reader holds)."""
    import stat
    import threading

    fifo = tmp_path / "iid"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    run_cli("build", "--progress", "quiet", "--iidfile", str(fifo), str(ctx), cache=cache)
    reader.join(timeout=60)
    assert got and got[0].startswith("sha256:") and stat.S_ISFIFO(os.stat(fifo).st_mode)


# --- RUN --------------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_run_exit_code(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    (ctx / "bad.Dockerfile").write_text(f"FROM {BASE} AS work\nRUN echo first-line; echo last-line; exit 3\n")
    proc = run_cli("build", "-f", str(ctx / "bad.Dockerfile"), str(ctx), cache=cache, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line, hint = proc.stderr.strip().splitlines()[-2:]  # the error, then how to enter what the step left
    assert (
        line.startswith("error: ") and "bad.Dockerfile:2" in line and "work" in line and "exit code 3" in line
    )
    assert hint.startswith("debug: lamina debug ")
    assert "last-line" in proc.stderr
    still_good(cache, ctx)


@pytest.mark.sandbox
def test_run_killed_by_signal(cache: Path, ctx: Path) -> None:
    (ctx / "bad.Dockerfile").write_text(f"FROM {BASE}\nRUN kill -9 $$\n")
    proc = run_cli("build", "-f", str(ctx / "bad.Dockerfile"), str(ctx), cache=cache, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-2]  # the last is `debug: lamina debug ID`
    assert line.startswith("error: ") and "bad.Dockerfile:2" in line
    assert "exit code 137 (128+SIGKILL)" in line


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.sandbox
@pytest.mark.parametrize(
    ("group", "signum", "message"),
    [
        (True, signal.SIGINT, "error: interrupted"),
        (False, signal.SIGINT, "error: interrupted"),
        (False, signal.SIGTERM, "error: terminated"),
    ],
    ids=["ctrl-c", "kill-int", "kill-term"],
)
def test_interrupt_long_run(cache: Path, tmp_path: Path, group: bool, signum: int, message: str) -> None:
    """Ctrl-C (the whole process group), `kill -INT` or `kill` (lamina alone) stop a RUN promptly."""
    scratch = cache / "tmp"
    before = set(scratch.iterdir()) if scratch.exists() else set()
    ctx, proc = _start_sleeping_build(cache, tmp_path)
    kids = _children(proc.pid)
    assert kids, "no sandbox process"
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("lamina did not stop within 5 s of SIGINT")
    assert time.monotonic() - start < 5
    assert code != 0
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == message
    time.sleep(0.2)
    assert [pid for pid in kids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)] == []
    assert (set(scratch.iterdir()) if scratch.exists() else set()) == before
    # The same Dockerfile, made short, builds in the same cache.
    (ctx / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo started\n")
    assert cached_steps(build(cache, ctx)) == [False]


def _start_sleeping_build(cache: Path, tmp_path: Path) -> tuple[Path, subprocess.Popen[str]]:
    """`lamina build` of a RUN that sleeps 30 s, in its own session, once the RUN has started."""
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN echo started; sleep 30\n")
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    env.pop("SOURCE_DATE_EPOCH", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "build", "--progress=plain", str(ctx)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.rstrip().endswith("] started"):
            break
    return ctx, proc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.mark.sandbox
def test_sigkill_scratch_removed_by_gc(cache: Path, tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the sandbox dies with lamina, its scratch dir stays until `cache gc`."""
    ctx, proc = _start_sleeping_build(cache, tmp_path)
    kids = _children(proc.pid)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in kids):
        time.sleep(0.05)
    assert [pid for pid in kids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)] == []
    assert list((cache / "tmp").iterdir()), "expected the killed build's scratch dir"
    run_cli("cache", "gc", cache=cache)
    assert list((cache / "tmp").iterdir()) == []
    (ctx / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo started\n")
    assert cached_steps(build(cache, ctx)) == [False]


def test_non_utf8_dockerfile_and_name(cache: Path, tmp_path: Path) -> None:
    """A Latin-1 Dockerfile naming a Latin-1 file builds; the history shows U+FFFD, as Go's JSON does."""
    from tests.support.build import oci_config

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_bytes(f"FROM {BASE}\nCOPY caf\xe9.txt /x\n".encode("latin-1"))
    (ctx / os.fsdecode(b"caf\xe9.txt")).write_text("latin\n")
    archive = tmp_path / "image.tar"
    proc = run_cli("build", "-o", f"type=oci,dest={archive}", str(ctx), cache=cache, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    created_by = [h.get("created_by", "") for h in oci_config(archive)["history"]]
    assert any("caf\ufffd.txt" in line for line in created_by), created_by
