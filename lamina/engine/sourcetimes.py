"""The time of a source, for SOURCE_DATE_EPOCH: a git commit's, an HTTP response's
Last-Modified, an archive's newest file; and the download of an HTTP context, timed.

A leaf module: the context and named-context loaders time what they fetch with it, and
sourceepoch (which plans the Dockerfile to find a stage's source) builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from lamina.errors import BuildError, ContextError

NAME = "SOURCE_DATE_EPOCH"
_MAX_DOWNLOAD = 8 << 30  # a context or an archive timed by its newest file: more is refused, not spooled


def commit_time(repo: Path) -> int:
    """The committer time of HEAD in a checked-out repository (its .git still there)."""
    import subprocess

    done = subprocess.run(
        ["git", "-C", str(repo), "show", "-s", "--format=%ct", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"{NAME}: the commit time of {repo}: {done.stderr.strip() or 'git show failed'}")
    return int(done.stdout.strip())


def http_epoch(url: str, checksum: str | None = None) -> int | None:
    """An HTTP source's time: its Last-Modified, else the newest regular file of the archive it
    serves (None when it serves no archive)."""
    import tempfile

    import httpx

    with tempfile.TemporaryFile() as spool:
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
                if response.status_code != 200:
                    raise BuildError(f"{NAME}: {url}: HTTP {response.status_code}")
                modified = response.headers.get("last-modified")
                if modified:
                    return http_date(modified, url)
                _copy_capped(response, spool, BuildError, f"{NAME}: {url}")
        except httpx.HTTPError as err:
            raise BuildError(f"{NAME}: {url}: {err}") from None
        if checksum:
            _check(spool, checksum, url)
        spool.seek(0)
        return newest_file_time(spool)


def http_date(text: str, url: str) -> int:
    from email.utils import parsedate_to_datetime

    try:
        return int(parsedate_to_datetime(text).timestamp())
    except (TypeError, ValueError):
        raise BuildError(f"{NAME}: {url}: a Last-Modified that is no date: {text!r}") from None


def _check(spool: IO[bytes], checksum: str, url: str) -> None:
    """ADD --checksum of the stage's source, as the ADD itself would check it."""
    import hashlib

    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ("sha256", "sha384", "sha512") or not expected:
        raise BuildError(f"{NAME}: {url}: invalid checksum {checksum}")
    digest = hashlib.new(algorithm)
    spool.seek(0)
    while block := spool.read(1 << 20):
        digest.update(block)
    if digest.hexdigest() != expected:
        raise BuildError(f"{NAME}: {url}: digest mismatch {algorithm}:{digest.hexdigest()}: {checksum}")


def newest_file_time(stream: IO[bytes]) -> int | None:
    """The newest mtime among the regular files of a tar (plain, gzip, bzip2, xz or zstd); None
    when the stream is no archive."""
    import bz2
    import lzma
    import tarfile

    from lamina.errors import LaminaError
    from lamina.oci.compression import open_decompressed

    head = stream.read(6)
    stream.seek(0)
    try:
        if head.startswith(b"BZh"):
            opened: IO[bytes] = bz2.open(stream, "rb")  # noqa: SIM115 (read through below)
        elif head.startswith(b"\xfd7zXZ\x00"):
            opened = lzma.open(stream, "rb")  # noqa: SIM115 (read through below)
        else:
            opened = open_decompressed(stream)  # type: ignore[arg-type]
        newest: int | None = None
        from lamina.oci.extract import BoundedTarInfo

        with tarfile.open(fileobj=opened, mode="r|", tarinfo=BoundedTarInfo) as tar:
            for member in tar:
                # Go's FileInfo counts a hard link as a regular file too.
                if member.isreg() or member.islnk():
                    newest = member.mtime if newest is None else max(newest, int(member.mtime))
        return None if newest is None else int(newest)
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, LaminaError):
        return None


def download(url: str, dest: Path) -> int | None:
    """Fetch `url` into `dest`; its Last-Modified time, if the server gives one."""
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response, open(dest, "wb") as out:
            if response.status_code != 200:
                raise ContextError(f"build context {url}: HTTP {response.status_code}")
            modified = response.headers.get("last-modified")
            _copy_capped(response, out, ContextError, f"build context {url}")
    except httpx.HTTPError as err:
        raise ContextError(f"build context {url}: {err}") from None
    return http_date(modified, url) if modified else None


def _copy_capped(response: Any, out: IO[bytes], error: type[Exception], what: str) -> None:
    """Copy an HTTP response's body to `out`; `error` naming `what` once it passes _MAX_DOWNLOAD."""
    count = 0
    for chunk in response.iter_bytes(1 << 20):
        count += len(chunk)
        if count > _MAX_DOWNLOAD:
            raise error(f"{what}: more than {_MAX_DOWNLOAD >> 30} GiB")
        out.write(chunk)
