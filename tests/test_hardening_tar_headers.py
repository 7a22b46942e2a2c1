"""Hostile tar headers: tarfile reads a PAX or GNU long-name header whole into memory, so a
gzip bomb of one (a 300 MB header of zeros is 1.3 MB compressed) took 879 MB before lamina
bounded them. Every tar lamina reads from a user or a registry (image layers, `lamina load`
archives, ADD archives, `lamina diff`, the image validator) refuses such a header over 1 MiB
unread, as Go's archive/tar does for BuildKit and containerd."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lamina.oci.extract import MAX_SPECIAL_HEADER
from tests.support.build import BASE, run_cli, write_context

LIMIT = f"(lamina's limit, as Go's archive/tar: {MAX_SPECIAL_HEADER} bytes)"


def bomb(size: int, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A gzipped tar that starts with a special header (`kind`) of `size` zero bytes."""
    header = tarfile.TarInfo("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink")
    header.type, header.size = kind, size
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(header.tobuf(tarfile.USTAR_FORMAT))
        chunk = bytes(1 << 20)
        for start in range(0, size, len(chunk)):
            gz.write(chunk[: min(len(chunk), size - start)])
        gz.write(bytes(512 - size % 512 if size % 512 else 0) + bytes(1024))
    return out.getvalue()


@pytest.mark.parametrize(
    ("kind", "what"),
    [(tarfile.XHDTYPE, "PAX"), (tarfile.GNUTYPE_LONGNAME, "GNU long name")],
    ids=["pax", "gnu_long_name"],
)
def test_an_oversized_special_header_is_refused_unread(tmp_path: Path, kind: bytes, what: str) -> None:
    from lamina.errors import LayerError
    from lamina.oci.extract import extract_layer

    data = bomb(MAX_SPECIAL_HEADER + 512, kind)
    with pytest.raises(LayerError) as caught:
        extract_layer(io.BytesIO(data), tmp_path / "root")
    assert (
        str(caught.value)
        == f"unpack layer: a {what} header of {MAX_SPECIAL_HEADER + 512} bytes at byte 0 {LIMIT}"
    )


def test_a_header_within_the_limit_still_works(tmp_path: Path) -> None:
    """Long PAX records (a 200,000-character comment, a 2 KiB xattr) are read as before."""
    from lamina.oci.extract import extract_layer

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("d/" + "x" * 200)
        info.size = 1
        info.pax_headers = {"SCHILY.xattr.user.big": "v" * 2048, "comment": "c" * 200_000}
        tar.addfile(info, io.BytesIO(b"x"))
    data.seek(0)
    result = extract_layer(data, tmp_path / "root")
    assert result.entries == 1 and (tmp_path / "root" / "d" / ("x" * 200)).read_bytes() == b"x"


_MEASURE = """
import io, sys
from pathlib import Path
from lamina.errors import LayerError
from lamina.oci.extract import extract_layer
data = open(sys.argv[1], "rb").read()
try:
    extract_layer(io.BytesIO(data), Path(sys.argv[2]))
except LayerError as err:
    print(err)
# VmHWM is this program's own peak: ru_maxrss would carry over the peak of the process that
# started it (Linux keeps it across execve, and a vfork child execs from its parent's memory).
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


def test_a_gzip_bomb_of_a_header_takes_no_memory(tmp_path: Path) -> None:
    """512 MB of PAX header (2 MB compressed): refused with the process's peak memory far
    below the header's size (it was read whole before: about three times its size)."""
    layer = tmp_path / "bomb.tar.gz"
    layer.write_bytes(bomb(512 << 20))
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(layer), str(tmp_path / "root")],
        capture_output=True,
        text=True,
        check=True,
    )
    said, peak_mb = done.stdout.splitlines()
    assert said.startswith("unpack layer: a PAX header of 536870912 bytes"), said
    assert int(peak_mb) < 256, f"peak {peak_mb} MB"


def _docker_archive(path: Path, layer: bytes) -> Path:
    import hashlib

    diff_id = hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()
    manifest = [{"Config": "config.json", "RepoTags": ["hostile:1"], "Layers": ["l0/layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("config.json", config),
            ("l0/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line (the failed step's progress line may come before it)."""
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_base_image_layer_with_an_oversized_header_fails_its_from_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    archive = _docker_archive(tmp_path / "hostile.tar", bomb(MAX_SPECIAL_HEADER + 512))
    run_cli("load", "-q", str(archive), cache=cache)
    ctx = write_context(tmp_path / "ctx", "FROM hostile:1\nRUN true\n")
    line = _one_error(run_cli("build", "-q", str(ctx), cache=cache, check=False))
    assert line.startswith(f"error: {ctx / 'Dockerfile'}:1: FROM hostile:1: unpack sha256:"), line
    assert line.endswith(f": a PAX header of {MAX_SPECIAL_HEADER + 512} bytes at byte 0 {LIMIT}"), line
    verify = run_cli("cache", "verify", cache=cache)
    assert verify.stdout.strip().endswith("; clean")


_PEAK_OF_CHILD = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(done.stderr.strip())
"""


def test_a_load_of_a_header_bomb_is_refused_with_no_memory(tmp_path: Path) -> None:
    """`lamina load` of a gzipped archive that starts with 512 MB of PAX header: one line
    naming the archive, the process's peak memory far below the header's size."""
    archive = tmp_path / "hostile.tar.gz"
    archive.write_bytes(bomb(512 << 20))
    command = [sys.executable, "-m", "lamina", "load", str(archive)]
    env = {**os.environ, "LAMINA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CHILD, *command], capture_output=True, text=True, env=env, check=True
    )
    status, said = done.stdout.split("\n", 1)
    code, peak_mb = (int(n) for n in status.split())
    assert (
        code == 1
        and said.strip()
        == f"error: {archive}: not a readable tar archive: not a tar, tar.gz, tar.bz2 or tar.xz"
    )
    assert peak_mb < 256, f"peak {peak_mb} MB"


def test_an_add_archive_with_an_oversized_header_fails_its_line(tmp_path: Path, cache: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD evil.tar.gz /x/\n")
    (ctx / "evil.tar.gz").write_bytes(bomb(MAX_SPECIAL_HEADER + 512))
    line = _one_error(run_cli("build", "-q", str(ctx), cache=cache, check=False))
    assert line.startswith(f"error: {ctx / 'Dockerfile'}:2: "), line
    assert f"a PAX header of {MAX_SPECIAL_HEADER + 512} bytes at byte 0 {LIMIT}" in line, line


def test_an_xattr_too_large_for_the_file_system_is_named_not_a_full_disk(tmp_path: Path) -> None:
    """ext4 answers ENOSPC for an xattr value larger than its block on a roomy disk: the error
    names the xattr and its size and is no DiskFull (which would say the disk is full)."""
    from lamina.errors import DiskFull, LayerError
    from lamina.oci.extract import extract_layer

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        info.pax_headers = {"SCHILY.xattr.user.big": "v" * 60000}
        tar.addfile(info, io.BytesIO(b"x"))
    data.seek(0)
    try:
        extract_layer(data, tmp_path / "root")
    except LayerError as err:
        assert not isinstance(err, DiskFull)
        assert str(err).startswith("unpack layer: f: xattr user.big of 60000 bytes: "), err
        assert str(err).endswith("(this file system is full, or takes no xattr that large)"), err
    else:  # this file system takes it (tmpfs, xfs, ext4 with ea_inode)
        assert os.getxattr(tmp_path / "root" / "f", "user.big") == b"v" * 60000
