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
