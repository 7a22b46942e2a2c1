"""An image's missing layer blobs are made together (engine.output.layer_blobs).

Rootless with subordinate ids one helper process writes every layer,
framed over its stdout (engine.sandbox._frames); as root the layers are
written on threads. Either way each blob must be byte for byte the one
made alone: image digests do not depend on how many layers a build made.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.engine import sandbox, snapshot
from lamina.engine.sandbox import IdMode, Network, SandboxSpec, detect_ids
from lamina.engine.sandbox import remove_tree as sandbox_remove_tree
from lamina.engine.sandbox._frames import FrameReader, FrameWriter
from lamina.oci.extract import iter_layer
from lamina.oci.layer import Compression
from tests.support.plainuser import plain_user_missing
from tests.support.sandbox import make_rootfs


def _framed(tmp_path: Path, streams: list[bytes], piece: int) -> bytes:
    with open(tmp_path / "framed", "wb+") as f:
        writer = FrameWriter(f.fileno())
        for data in streams:
            # written as write_layer does: pieces of any size, then the end of the stream
            for start in range(0, len(data), piece):
                writer.write(data[start : start + piece])
            writer.next()
        f.seek(0)
        return f.read()


def test_frames_carry_each_stream_to_its_output_however_the_pipe_cuts_them(tmp_path: Path) -> None:
    streams = [b"first" * 1000, b"", os.urandom(3 << 20), b"x"]
    framed = _framed(tmp_path, streams, 777_777)
    for cut in (1, 3, 4096, 1 << 20):
        outs = [io.BytesIO() for _ in streams]
        reader = FrameReader(outs)
        for start in range(0, len(framed), cut):
            reader.write(framed[start : start + cut])
        assert reader.finished == len(streams)
        assert [o.getvalue() for o in outs] == streams


def test_frames_of_streams_written_at_once_reach_their_outputs(tmp_path: Path) -> None:
    # The helper writes several layers on threads: their frames interleave on the pipe.
    import threading

    streams = [os.urandom(5 << 20), b"second" * 50_000, b"", os.urandom(1 << 20)]
    lock = threading.Lock()
    with open(tmp_path / "framed", "wb+") as f:

        def write(i: int) -> None:
            writer = FrameWriter(f.fileno(), i, lock)
            for start in range(0, len(streams[i]), 300_001):
                writer.write(streams[i][start : start + 300_001])
            writer.next()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(streams))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        f.seek(0)
        framed = f.read()
    outs = [io.BytesIO() for _ in streams]
    reader = FrameReader(outs)
    for start in range(0, len(framed), 65_536):
        reader.write(framed[start : start + 65_536])
    assert reader.finished == len(streams)
    assert [o.getvalue() for o in outs] == streams


def test_frames_refuse_more_streams_than_outputs(tmp_path: Path) -> None:
    framed = _framed(tmp_path, [b"one", b"two"], 1 << 20)
    with pytest.raises(ValueError, match="more layers"):
        FrameReader([io.BytesIO()]).write(framed)


@pytest.fixture
def uppers(tmp_path: Path) -> Iterator[list[tuple[Path, list[Path]]]]:
    """Three RUN uppers stacked on a base; the second holds a file private to user 1000."""
    base = make_rootfs(tmp_path / "base")
    scripts = [
        "mkdir -p /one && echo 1 > /one/f && ln -s f /one/l",
        "mkdir -p /home/app/.ssh && echo key > /home/app/.ssh/id && chmod 600 /home/app/.ssh/id"
        + " && chmod 700 /home/app/.ssh"
        + ("" if detect_ids().mode is IdMode.SINGLE else " && chown -R 1000:1000 /home/app"),
        "rm -r /one && echo 3 > /three",
    ]
    done: list[tuple[Path, list[Path]]] = []
    for i, script in enumerate(scripts):
        lowers = [upper for upper, _ in reversed(done)] + [base]
        upper = tmp_path / f"upper{i}"
        with open(tmp_path / "out.txt", "wb") as f:
            code = sandbox.run(
                SandboxSpec(
                    argv=("/bin/sh", "-c", script),
                    lower_dirs=tuple(lowers),
                    upper_dir=upper,
                    network=Network.NONE,
                    stdout=f,
                    stderr=f,
                    stdin=subprocess.DEVNULL,
                    scratch_dir=tmp_path / "scratch",
                )
            )
        assert code == 0, (tmp_path / "out.txt").read_text()
        done.append((upper, lowers))
    yield done
    # Files a sandbox chowned to subordinate ids: pytest could not delete them.
    sandbox_remove_tree(tmp_path, keep_root=True)


@pytest.mark.sandbox
@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_layers_written_together_are_the_blobs_written_alone(
    uppers: list[tuple[Path, list[Path]]], compression: Compression
) -> None:
    alone = []
    for upper, lowers in uppers:
        blob = io.BytesIO()
        info = snapshot.write_upper(upper, blob, compression, lowers=lowers, source_date_epoch=1)
        alone.append((info, blob.getvalue()))
    outs = [io.BytesIO() for _ in uppers]
    infos = snapshot.write_uppers(uppers, outs, compression, source_date_epoch=1)
    assert [(info, out.getvalue()) for info, out in zip(infos, outs, strict=True)] == alone
    found = {e.path: e for e in iter_layer(io.BytesIO(outs[1].getvalue()), digest=infos[1].digest)}
    key = found["home/app/.ssh/id"]
    assert (key.size, key.mode) == (4, 0o600)
    assert (key.uid, key.gid) == ((0, 0) if detect_ids().mode is IdMode.SINGLE else (1000, 1000))
    assert "one/.wh..wh..opq" not in found
    assert {e.path for e in iter_layer(io.BytesIO(outs[2].getvalue()))} >= {".wh.one", "three"}


class _Restartable(io.BytesIO):
    """An output that can start over (snapshot.Restartable), as the store's blob writer can."""

    def __init__(self) -> None:
        super().__init__()
        self.discarded = 0

    def discard(self) -> None:
        self.seek(0)
        self.truncate()
        self.discarded += 1


def _copied_layer(root: Path) -> Path:
    """A layer dir as a COPY leaves it: the caller's files and directories, a directory and
    files chowned to user 1000 that others may read, one shut to its owner, links, an xattr."""
    files = {"app/a.txt": "a\n", "app/bin/run": "#!/bin/sh\n", "app/data/big": "x" * 300_000}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "app/bin/run").chmod(0o755)
    (root / "app/a.txt").chmod(0o600)  # the caller's own: read as it is
    (root / "app/link").symlink_to("a.txt")
    os.link(root / "app/a.txt", root / "app/hard")
    os.setxattr(root / "app/data/big", "user.note", b"kept")
    (root / "app/shut").mkdir(mode=0o500)
    (root / "srv/www").mkdir(parents=True)
    (root / "srv/www/index.html").write_text("<p>hi</p>\n")
    sandbox.set_owners([(root / "srv/www", 1000, 1000), (root / "srv/www/index.html", 1000, 1000)])
    return root


def _spy_helper(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many layers each call of the helper wrote (engine.sandbox.runner.write_layers_inside)."""
    from lamina.engine.sandbox import runner

    calls: list[int] = []
    real = runner.write_layers_inside

    def spy(jobs: list, *args: object, **kwargs: object) -> object:
        calls.append(len(jobs))
        return real(jobs, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "write_layers_inside", spy)
    return calls


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    sandbox_remove_tree(tmp_path, keep_root=True)  # files chowned to subordinate ids


@pytest.mark.sandbox
def test_a_copy_layer_is_written_by_the_caller_as_the_helper_writes_it(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rootless, a layer of files lamina wrote as the caller (COPY) is written in this process,
    ids mapped back as the helper sees them, byte for byte the helper's blob."""
    layer = _copied_layer(scratch / "layer")
    alone = io.BytesIO()
    expected = snapshot.write_upper(layer, alone, Compression.GZIP, source_date_epoch=1)  # the helper's
    calls = _spy_helper(monkeypatch)
    out = _Restartable()
    (info,) = snapshot.write_uppers([(layer, [])], [out], Compression.GZIP, source_date_epoch=1)
    assert (info, out.getvalue()) == (expected, alone.getvalue())
    assert (calls, out.discarded) == ([], 0)  # no helper: this process read every file
    found = {e.path: e for e in iter_layer(io.BytesIO(out.getvalue()), digest=info.digest)}
    chowned = (0, 0) if detect_ids().mode is IdMode.SINGLE else (1000, 1000)
    assert (found["srv/www/index.html"].uid, found["srv/www/index.html"].gid) == chowned
    assert (found["app/a.txt"].mode, found["app/shut"].mode) == (0o600, 0o500)
    assert dict(found["app/data/big"].xattrs) == {"user.note": b"kept"}


def _noted_and_shut(path: Path) -> None:
    path.write_text("")
    os.setxattr(path, "user.note", b"x")  # read only by who may read the file: not silently lost
    path.chmod(0)


_PRIVATE = {
    # COPY --chown=1000 of a 0600 file: only user 1000 (and the namespace's root) may read it
    "a file shut to user 1000": (lambda p: (p.write_text("secret\n"), p.chmod(0o600)), True),
    "a directory shut to user 1000": (
        lambda p: (p.mkdir(), (p / "inner").write_text("in\n"), p.chmod(0o700)),
        True,
    ),
    "a file only user 1000's group may read": (lambda p: (p.write_text("group\n"), p.chmod(0o640)), True),
    # COPY --chmod=0200: the caller's own, its owner may not read it
    "the caller's file shut to its owner": (lambda p: (p.write_text("mine\n"), p.chmod(0o200)), False),
    "the caller's empty file with an xattr, shut": (_noted_and_shut, False),
    "the caller's directory shut to its owner": (
        lambda p: (p.mkdir(), (p / "inner").write_text("in\n"), p.chmod(0o300)),
        False,
    ),
}


@pytest.mark.sandbox
@pytest.mark.parametrize("private", list(_PRIVATE))
def test_a_layer_with_a_file_the_caller_cannot_read_is_written_by_the_helper_the_same(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, private: str
) -> None:
    """Where the caller may not read a file (chowned to a subordinate id, its mode shutting
    others out, or its own shut to it), what this process wrote of the blob is dropped and
    the helper writes it all."""
    layer = _copied_layer(scratch / "layer")
    target = layer / "srv/zz-private"  # after most of the layer in the tar's order
    make, chown = _PRIVATE[private]
    make(target)
    if chown:
        owned = [target, *(target.iterdir() if target.is_dir() else ())]
        sandbox.set_owners([(path, 1000, 1000) for path in reversed(owned)])
    alone = io.BytesIO()
    expected = snapshot.write_upper(layer, alone, Compression.ZSTD, source_date_epoch=1)
    calls = _spy_helper(monkeypatch)
    out = _Restartable()
    (info,) = snapshot.write_uppers([(layer, [])], [out], Compression.ZSTD, source_date_epoch=1)
    assert (info, out.getvalue()) == (expected, alone.getvalue())
    if detect_ids().mode is IdMode.SUBORDINATE:
        assert (calls, out.discarded) == ([1], 1)
    found = {e.path for e in iter_layer(io.BytesIO(out.getvalue()), digest=info.digest)}
    assert "srv/zz-private" in found


@pytest.mark.sandbox
def test_a_runs_layer_goes_to_the_helper_without_a_try_here(
    uppers: list[tuple[Path, list[Path]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = [io.BytesIO() for _ in uppers]
    expected = [
        snapshot.write_upper(upper, out, Compression.GZIP, lowers=lowers, source_date_epoch=1)
        for (upper, lowers), out in zip(uppers, alone, strict=True)
    ]
    calls = _spy_helper(monkeypatch)
    outs = [_Restartable() for _ in uppers]
    ran = [True, True, False]  # the third read here, the others by one helper meanwhile
    infos = snapshot.write_uppers(uppers, outs, Compression.GZIP, source_date_epoch=1, ran=ran)
    assert [(i, o.getvalue()) for i, o in zip(infos, outs, strict=True)] == [
        (i, o.getvalue()) for i, o in zip(expected, alone, strict=True)
    ]
    assert [o.discarded for o in outs] == [0, 0, 0]
    if detect_ids().mode is IdMode.SUBORDINATE:
        assert calls == [2]


@pytest.mark.sandbox
def test_a_copy_rerun_takes_its_unchanged_files_from_the_old_tar_rootless_too(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COPY rerun's layer (unchanged files hard-linked from the last run's) takes their bytes
    from the last run's tar (oci.donor) in this process, and is the blob the helper writes."""
    from lamina.oci.donor import DonorTar

    old, new = scratch / "old", scratch / "new"
    for i in range(40):
        (old / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (old / f"d{i % 2}/f{i:02d}").write_text(f"{i}\n" * (i + 1))
    old_tar = _Restartable()
    snapshot.write_uppers([(old, [])], [old_tar], Compression.NONE, source_date_epoch=1)
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        if path.is_dir():
            (new / rel).mkdir(parents=True)
        else:
            os.link(path, new / rel)
    (new / "d1/f07").unlink()
    (new / "d1/f07").write_text("changed\n")
    alone = io.BytesIO()
    expected = snapshot.write_upper(new, alone, Compression.NONE, source_date_epoch=1)
    taken: list[int] = []
    real_take = DonorTar.take

    def take(self: DonorTar, *args: object) -> tuple[int, bytes]:
        count, data = real_take(self, *args)  # type: ignore[arg-type]
        taken.append(count)
        return count, data

    monkeypatch.setattr(DonorTar, "take", take)
    out = _Restartable()
    donor = (old, lambda: io.BytesIO(old_tar.getvalue()))
    (info,) = snapshot.write_uppers([(new, [])], [out], Compression.NONE, source_date_epoch=1, donors=[donor])
    assert (info, out.getvalue()) == (expected, alone.getvalue())
    assert sum(taken) == 39  # every file but the changed one, as the old tar has it


@pytest.mark.skipif(bool(plain_user_missing(ranged=True)), reason=plain_user_missing(ranged=True) or "ready")
def test_a_rootless_build_copying_private_files_to_user_1000_is_roots_image(busybox_image: Path) -> None:
    """COPY --chown=1000 of a 0600 file and a 0700 directory (unreadable to the caller once
    chowned), beside a COPY the build's process writes itself, cold and after a one-file
    change (a rerun with a donor): the image rootless with subordinate ids is root's, byte for byte."""
    import shutil

    from tests.support.build import BASE, build, make_cache, write_context
    from tests.support.plainuser import plain_user

    dockerfile = (
        f"FROM {BASE}\nCOPY --chown=1000:1000 key /etc/app/key\nCOPY --chown=1000 private /srv/private\n"
        "COPY . /data/\nRUN cat /etc/app/key /srv/private/inner > /seen\n"
    )
    files = {"key": "secret\n", "private/inner": "inner\n", **{f"src/f{i:03d}": f"{i}\n" for i in range(200)}}
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    with plain_user("lamina-asbytes-", ranged=True) as user:
        ctx = write_context(user.base / "ctx", dockerfile, files)
        (ctx / "key").chmod(0o600)
        (ctx / "private").chmod(0o700)
        shutil.copy(busybox_image, user.base / "base.tar")
        user.give()
        env = {"LAMINA_CACHE": str(user.base / "cache")}
        assert user.lamina("load", str(user.base / "base.tar"), env=env).returncode == 0
        root_cache = make_cache(user.base / "root", busybox_image)
        for n, change in enumerate(("cold", "one file changed")):
            if n:
                (ctx / "src/f100").write_text("changed\n")
            rootless = user.base / f"rootless-{n}.tar"
            args = ["build", "--progress", "plain", "--build-arg", "SOURCE_DATE_EPOCH=1700000000"]
            done = user.lamina(*args, "-o", f"type=oci,dest={rootless}", str(ctx), env=env)
            assert done.returncode == 0, done.stderr
            as_root = user.base / f"root-{n}.tar"
            build(root_cache, ctx, build_args=epoch, outputs=[f"type=oci,dest={as_root}"])
            assert rootless.read_bytes() == as_root.read_bytes(), change
