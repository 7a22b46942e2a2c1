"""A full disk, on a small tmpfs: one line naming the step or output and the path being written.

The cache, or the output, lives on a tmpfs of a few MB (mounting one needs
root). Each case checks the message, that nothing partial is left under the
output's name, that `lamina cache verify` finds the cache clean while the
disk is still full, and that once there is room again the next build
succeeds with the digest a build in a roomy cache gives.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}  # the same bytes from any cache
NO_SPACE = "no space left on device"
INTACT = "; cache intact"  # what the line ends with: the cache is as it was
Mount = Callable[[str, str], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """mount(name, size) -> a fresh tmpfs of `size` (`4m`) at tmp_path/name; unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str = "64m") -> None:
    """Free space: as good as deleting other files, and certain."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command: the last line, the only one saying `error:`."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def intact(cache: Path) -> None:
    """`lamina cache verify` finds the cache clean: every blob's digest, every index entry's
    references (run while the disk is still full: checking needs no room)."""
    check = run_cli("cache", "verify", cache=cache, check=False)
    assert check.returncode == 0 and check.stdout.strip().endswith("; clean"), check.stdout + check.stderr


def built_digest(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip().splitlines()[-1]


def load_base(cache: Path, busybox_image: Path) -> None:
    run_cli("load", "-q", str(busybox_image), cache=cache)


def clean_digest(tmp_path: Path, busybox_image: Path, context: Path, *args: str) -> str:
    """The digest of the build in a cache with room to spare."""
    cache = tmp_path / "roomy"
    load_base(cache, busybox_image)
    return built_digest(run_cli("build", "-q", *args, str(context), cache=cache, env=EPOCH))


# --- the cache fills up during a build ---------------------------------------------------


def _warm_cache(tmpfs: Mount, busybox_image: Path, tmp_path: Path) -> Path:
    """A 5 MB cache holding the base image, unpacked by a first build."""
    cache = tmpfs("cache", "5m")
    load_base(cache, busybox_image)
    run_cli("build", "-q", str(write_context(tmp_path / "warm", f"FROM {BASE}\n")), cache=cache)
    return cache


def test_copy_larger_than_the_free_space(tmpfs: Mount, busybox_image: Path, tmp_path: Path) -> None:
    cache = _warm_cache(tmpfs, busybox_image, tmp_path)
    data = os.urandom(free_bytes(cache) + 512 * 1024)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY r.bin /r.bin\n", {"r.bin": data})

    line = one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {ctx}/Dockerfile:2: stage stage-0: COPY r.bin /r.bin: write {cache}/")
    assert line.lower().endswith(f"/r.bin: {NO_SPACE}{INTACT}")

    intact(cache)
    grow(cache)
    again = run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)
    assert built_digest(again) == clean_digest(tmp_path, busybox_image, ctx)


def test_layer_compression_on_a_full_cache(tmpfs: Mount, busybox_image: Path, tmp_path: Path) -> None:
    cache = _warm_cache(tmpfs, busybox_image, tmp_path)
    # Room for the file once (the step's layer) but not twice (its compressed blob).
    data = os.urandom(free_bytes(cache) * 2 // 3)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY r.bin /r.bin\n", {"r.bin": data})

    line = one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(
        f"error: {ctx}/Dockerfile:2: stage stage-0: COPY r.bin /r.bin: "
        "write the layer tar (uncompressed until the image is first read): "
    )
    assert f"write {cache}/blobs/sha256/.tmp-" in line and line.lower().endswith(NO_SPACE + INTACT)
    assert not [name for name in os.listdir(cache / "blobs" / "sha256") if name.startswith(".tmp-")]

    intact(cache)
    grow(cache)
    again = run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)
    assert built_digest(again) == clean_digest(tmp_path, busybox_image, ctx)


@pytest.mark.sandbox
@pytest.mark.parametrize(
    ("command", "said"),
    [
        # busybox head says "standard output: I/O error": lamina sees the file system is full
        ("head -c 20000000 /dev/zero > /big", ""),
        ("dd if=/dev/zero of=/big bs=1M count=20", "; the command said: dd: error writing '/big': "),
    ],
)
def test_run_that_fills_the_cache(
    tmpfs: Mount, busybox_image: Path, tmp_path: Path, command: str, said: str
) -> None:
    cache = _warm_cache(tmpfs, busybox_image, tmp_path)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN {command}\n")

    line = one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {ctx}/Dockerfile:2: stage stage-0: process ")
    assert f"exit code 1: write {cache}/unpacked/.tmp-" in line
    assert f"{NO_SPACE} (its file system is full){said}" in line.lower() and line.endswith(INTACT)
    assert not [name for name in os.listdir(cache / "unpacked") if name.startswith(".tmp-")]

    intact(cache)
    grow(cache)
    run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)


def test_base_image_unpacked_into_a_full_cache(tmpfs: Mount, busybox_image: Path, tmp_path: Path) -> None:
    cache = tmpfs("cache", "2m")  # the blob fits, its 1.9 MB unpacked beside it does not
    load_base(cache, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY Dockerfile /\n")

    line = one_error_line(run_cli("build", str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {ctx}/Dockerfile:1: FROM {BASE}: unpack sha256:")
    assert f": write {cache}/unpacked/.tmp-" in line and line.lower().endswith(
        f"/bin/busybox: {NO_SPACE}{INTACT}"
    )
    assert os.listdir(cache / "unpacked") == []  # no half-unpacked layer

    intact(cache)
    grow(cache)
    again = run_cli("build", "-q", str(ctx), cache=cache, env=EPOCH)
    assert built_digest(again) == clean_digest(tmp_path, busybox_image, ctx)


def test_load_into_a_full_cache(tmpfs: Mount, busybox_image: Path) -> None:
    cache = tmpfs("cache", "1m")

    line = one_error_line(run_cli("load", str(busybox_image), cache=cache, check=False))
    assert line.startswith(f"error: load {busybox_image}: write {cache}/blobs/sha256/.tmp-")
    assert line.lower().endswith(NO_SPACE + INTACT)
    assert os.listdir(cache / "blobs" / "sha256") == []

    intact(cache)
    grow(cache)
    run_cli("load", str(busybox_image), cache=cache)
    assert run_cli("images", cache=cache).stdout.splitlines()[1].startswith(BASE)


# --- the output's file system fills up -------------------------------------------------------


@pytest.fixture
def built(tmp_path: Path, busybox_image: Path) -> tuple[Path, Path]:
    """(cache, context): an image of about 3 MB built in a roomy cache, tagged `big:1`."""
    cache = tmp_path / "cache"
    load_base(cache, busybox_image)
    ctx = write_context(
        tmp_path / "ctx", f"FROM {BASE}\nCOPY r.bin /r.bin\n", {"r.bin": os.urandom(1_500_000)}
    )
    run_cli("build", "-q", "-t", "big:1", str(ctx), cache=cache, env=EPOCH)
    return cache, ctx


@pytest.mark.parametrize(
    ("spec", "written"),
    [
        ("type=local,dest={out}/root", "{out}/root/"),
        ("type=local,dest={out}", "{out}/"),  # into an existing directory (a mount point)
        ("type=tar,dest={out}/rootfs.tar", "{out}/rootfs.tar:"),
        ("type=oci,dest={out}/image.tar", "{out}/image.tar:"),
        ("type=oci,tar=false,dest={out}/layout", "{out}/layout/blobs/sha256/"),
        ("type=docker,dest={out}/image.tar", "{out}/image.tar:"),
    ],
)
def test_export_to_a_full_disk(tmpfs: Mount, built: tuple[Path, Path], spec: str, written: str) -> None:
    cache, ctx = built
    out = tmpfs("out", "2m")
    (out / "keep.txt").write_text("the user's\n")
    spec, written = spec.format(out=out), written.format(out=out)
    kind = spec.split(",")[0]

    line = one_error_line(run_cli("build", "-o", spec, str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: --output {kind},"), line
    assert f"write {written}" in line and line.lower().endswith(NO_SPACE + INTACT), line
    assert sorted(os.listdir(out)) == ["keep.txt"]  # nothing partial, not even a temporary name
    intact(cache)

    grow(out)
    run_cli("build", "-o", spec, str(ctx), cache=cache, env=EPOCH)
    assert (out / "keep.txt").read_text() == "the user's\n"
    if spec.endswith(f"dest={out}"):
        assert (out / "bin" / "busybox").is_file() and (out / "r.bin").stat().st_size == 1_500_000
    else:
        assert len(os.listdir(out)) == 2


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_save_to_a_full_disk(tmpfs: Mount, built: tuple[Path, Path], fmt: str) -> None:
    cache, _ = built
    out = tmpfs("out", "2m")
    target = out / "image.tar"

    line = one_error_line(
        run_cli("save", "big:1", "--format", fmt, "-o", str(target), cache=cache, check=False)
    )
    assert line.startswith(f"error: save big:1 to {target}: write {target}: ")
    assert line.lower().endswith(NO_SPACE + INTACT)
    assert os.listdir(out) == []
    intact(cache)

    grow(out)
    run_cli("save", "big:1", "--format", fmt, "-o", str(target), cache=cache)
    assert os.listdir(out) == ["image.tar"]


def _fill(directory: Path) -> None:
    """Take every free byte of `directory`'s file system."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 1):  # then the last partial block, byte by byte
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("flag", ["--iidfile", "--metadata-file"])
def test_result_file_on_a_full_disk_keeps_the_old_one(
    tmpfs: Mount, built: tuple[Path, Path], flag: str
) -> None:
    """As buildx writes them (a temporary file renamed over): the last build's file stays whole."""
    cache, ctx = built
    out = tmpfs("out", "1m")
    dest = out / "result"
    dest.write_text("the last build's\n")
    _fill(out)

    line = one_error_line(run_cli("build", flag, str(dest), str(ctx), cache=cache, env=EPOCH, check=False))
    assert line.startswith(f"error: {flag}: write {dest}: "), line
    assert line.lower().endswith(NO_SPACE + INTACT), line
    assert dest.read_text() == "the last build's\n"  # was: emptied, then nothing written
    assert sorted(os.listdir(out)) == ["filler", "result"]  # no temporary name left

    (out / "filler").unlink()
    run_cli("build", flag, str(dest), str(ctx), cache=cache, env=EPOCH)
    assert dest.read_text().startswith("sha256:" if flag == "--iidfile" else "{")
