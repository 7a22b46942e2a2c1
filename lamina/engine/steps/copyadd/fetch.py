"""ADD of an http(s) URL: the download, and the file it becomes.

A URL is downloaded (redirects followed) into a file named after the
URL's last path component, mode 0600 as BuildKit writes it, with the
server's Last-Modified time; it is unpacked only with `--unpack=true`
(`archive.unpack_into`). `--checksum=sha256:...` is verified before
anything is written. The download's content digest is what keys the step,
so a changed remote file re-runs it.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import os
import posixpath
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.steps.copyadd.archive import is_archive, unpack_into
from lamina.engine.steps.copyadd.placement import one_file_target
from lamina.engine.steps.owners import set_owner_and_mode
from lamina.errors import BuildError, DiskFull, LaminaError, is_disk_full

if TYPE_CHECKING:
    from lamina.engine.model import StepHost

_MAX_DOWNLOAD = 8 << 30  # refuse anything larger than 8 GiB


@dataclasses.dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    path: Path  # the downloaded bytes, in the store's scratch dir
    digest: str
    name: str  # the file name BuildKit gives it
    mtime: int | None


def _filename(url: str) -> str:
    # Go's path.Base: trailing slashes do not count (`.../dir/` is named `dir`).
    base = posixpath.basename(urllib.parse.urlparse(url).path.rstrip("/"))
    return base if base not in ("", ".", "/") else "__unnamed__"


def fetch_url(executor: StepHost, url: str, checksum: str | None) -> Fetched:
    """Download `url` once per build (memoised on the executor), verifying `checksum`."""
    url, checksum = _policy(executor, url, checksum)
    memo: dict[str, Fetched] = executor.fetched
    found = memo.get(url)
    if found is not None:
        _check(found, checksum)
        return found
    import httpx  # here: a second or so of start-up, needed only for a URL

    scratch = executor.store.root / "tmp"
    fd, name = tempfile.mkstemp(prefix="add-", dir=scratch)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, follow_redirects=True, timeout=60) as reply:
            if reply.status_code != 200:
                raise BuildError(f"ADD {url}: the server answered {reply.status_code}")
            for chunk in reply.iter_bytes(1 << 20):
                size += len(chunk)
                if size > _MAX_DOWNLOAD:
                    raise BuildError(f"ADD {url}: larger than {_MAX_DOWNLOAD} bytes")
                h.update(chunk)
                out.write(chunk)
            modified = reply.headers.get("last-modified")
    except httpx.HTTPError as err:
        os.unlink(name)
        raise BuildError(f"ADD {url}: {err}") from None
    except LaminaError:
        os.unlink(name)
        raise
    except OSError as err:
        os.unlink(name)
        if is_disk_full(err):  # the download's write names no file: say which
            raise DiskFull.writing(name, err).within(f"ADD {url}") from err
        raise
    mtime = None
    if modified:
        try:
            mtime = int(email.utils.parsedate_to_datetime(modified).timestamp())
        except (TypeError, ValueError):
            mtime = None
    fetched = Fetched(url, Path(name), "sha256:" + h.hexdigest(), _filename(url), mtime)
    memo[url] = fetched
    _check(fetched, checksum)
    return fetched


def _policy(executor: StepHost, url: str, checksum: str | None) -> tuple[str, str | None]:
    """The URL and checksum the source policy makes of them (BuildKit's http source op)."""
    policy = executor.options.source_policy
    if policy is None:
        return url, checksum
    from lamina.engine.sourcepolicy import http_source

    try:
        source = policy.evaluate(http_source(url, checksum or ""))
    except BuildError as err:
        raise BuildError(f"ADD {url}: {err}") from None
    if not source.identifier.startswith(("http://", "https://")):
        raise BuildError(
            f"ADD {url}: the source policy converts it to {source.identifier!r}; only a URL is taken"
        )
    return source.identifier, source.attr("http.checksum") or None


def _check(fetched: Fetched, checksum: str | None) -> None:
    if checksum and checksum != fetched.digest:
        raise BuildError(f"ADD {fetched.url}: digest mismatch: want {checksum}, got {fetched.digest}")


def write_fetched(
    fetched: Fetched,
    upper: Path,
    dest: str,
    owner: Any,
    chmod: Any,
    image: Any,
    late: list[tuple[Path, int, int]] | None = None,
    unpack: bool = False,
) -> None:
    """Put a downloaded file at `dest` (or `dest/NAME` when dest is a directory).

    With `ADD --unpack=true` a downloaded tar archive is unpacked at dest
    instead, as BuildKit's AttemptUnpack does for an HTTP source.
    """
    if unpack and is_archive(str(fetched.path)):
        unpack_into(str(fetched.path), fetched.url, upper, dest, owner, image, late)
        return

    target = one_file_target(upper, dest, fetched.name, image, owner, late)
    shutil.copyfile(fetched.path, target)
    uid, gid = owner if owner else (0, 0)
    if fetched.mtime is not None:
        os.utime(target, (fetched.mtime, fetched.mtime))
    set_owner_and_mode(target, uid, gid, chmod.apply(0o600, False) if chmod is not None else 0o600)
