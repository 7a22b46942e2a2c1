"""Where a build's context and Dockerfile come from when they are not a local directory and file.

As buildx reads its positional context and `-f`:
- `-f -`: the Dockerfile is read from stdin; the context is the directory given;
- a context of `-`: stdin is a tar archive (plain, gzip, bzip2, xz or zstd), which is
  the context, with `-f` naming a file inside it; or else it is a Dockerfile, and the
  context is empty (`-f` is then ambiguous and refused);
- a git URL (`https://host/repo.git#ref:subdir`, `git@host:repo.git`, `git://...`,
  `github.com/...`): the repository checked out by `git` (engine.gitsource), `subdir`
  of it the context, `-f` a path inside it.

With a remote context (git, HTTP, a tar on stdin), an absolute `-f` names a file of
the client, as buildx sends it beside a URL context (`dockerfilekey`); and
`subdir` (BuildKit's frontend attribute `contextsubdir`, lamina.build's
`context_subdir`) makes a directory of the fetched context the build context,
while the Dockerfile is still named from the context's top (dockerui scopes the
context, not the Dockerfile's source). A local context has no such attribute:
the subdirectory is given as the context itself.

A git or tar context is taken whole, as BuildKit takes one it fetches itself: its
`.dockerignore` filters nothing (moby/buildkit: the ignore file applies to the upload of
a local directory only; docker/buildx#2353).

`resolved()` yields the local directory and Dockerfile the build reads, and removes
whatever it made when the build ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lamina.errors import ContextError

if TYPE_CHECKING:
    from lamina.engine.model import BuildOptions

STDIN = "-"
_MAX_STDIN_DOCKERFILE = 16 * 1024 * 1024  # read into memory by the parser anyway


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    context: Path
    dockerfile: Path | None  # None: the context's default Dockerfile
    dockerfile_outside: bool = False  # read from stdin, not from the context
    epoch: int | None = None  # SOURCE_DATE_EPOCH=context: a git commit's or an HTTP source's time


def is_local(context: str, dockerfile: str | None) -> bool:
    """The common case, cheaply: a local context directory and Dockerfile (or none)."""
    return context != STDIN and dockerfile != STDIN and (os.path.exists(context) or not is_remote(context))


@contextlib.contextmanager
def local_options(
    options: BuildOptions, context: str, dockerfile: str | None, environ: Mapping[str, str], subdir: str = ""
) -> Iterator[BuildOptions]:
    """`options` with the context and Dockerfile made local, for the length of the build."""
    from lamina.engine.buildfiles import default_dockerfile

    # BuildKit's dockerui takes this build arg for a git context.
    keep = dict(options.build_args).get("BUILDKIT_CONTEXT_KEEP_GIT_DIR", "") in ("1", "true")
    with resolved(context, dockerfile, environ, keep_git_dir=keep, subdir=subdir) as found:
        chosen = found.dockerfile or default_dockerfile(found.context)
        remote = context == STDIN or is_remote(context)  # `-f -` alone keeps a local context's ignore
        if remote and not found.dockerfile_outside:
            _within(found.context, chosen)
        yield dataclasses.replace(
            options,
            context=found.context,
            dockerfile=chosen,
            remote_context=remote,
            context_epoch=found.epoch,
        )


def is_remote(context: str) -> bool:
    """True for a context that is not a local path: stdin or a git URL."""
    from lamina.engine.gitsource import is_git_url

    return context == STDIN or (not os.path.exists(context) and (is_git_url(context) or _is_http(context)))


def _is_http(context: str) -> bool:
    return context.startswith(("http://", "https://"))


@contextlib.contextmanager
def resolved(
    context: str,
    dockerfile: str | None,
    environ: Mapping[str, str],
    stdin: BinaryIO | None = None,
    *,
    keep_git_dir: bool = False,
    subdir: str = "",
) -> Iterator[Resolved]:
    """The local context directory and Dockerfile for `context` and `-f` as given (and `subdir`
    of a remote context as the context)."""
    if context == STDIN and dockerfile == STDIN:
        raise ContextError("invalid argument: can't use stdin for both build context and dockerfile")
    if context != STDIN and not is_remote(context):
        if subdir:
            raise ContextError(
                f"context subdirectory {subdir}: only a remote context (git, HTTP, a tar on stdin) "
                f"takes one; give {os.path.join(context, subdir)} as the context"
            )
        if dockerfile != STDIN:
            yield Resolved(Path(context), Path(dockerfile) if dockerfile is not None else None)
            return
    work = Path(tempfile.mkdtemp(prefix="lamina-context-"))
    try:
        found = _resolve(context, dockerfile, environ, stdin, work, keep_git_dir)
        yield _scoped(found, subdir) if subdir else found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _resolve(
    context: str,
    dockerfile: str | None,
    environ: Mapping[str, str],
    stdin: BinaryIO | None,
    work: Path,
    keep_git_dir: bool,
) -> Resolved:
    import sys

    source = stdin if stdin is not None else sys.stdin.buffer
    if dockerfile == STDIN:
        path = work / "stdin" / "Dockerfile"
        path.parent.mkdir()
        path.write_bytes(_read_bounded(source, "-f -"))
        if is_remote(context):
            root, epoch = _remote_context(context, environ, work, keep_git_dir)
            return Resolved(root, path, True, epoch)
        return Resolved(Path(context), path, True)
    if context == STDIN:
        spooled = work / "stdin.bin"
        with open(spooled, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        if dockerfile is not None and not _is_tar(spooled):
            raise ContextError("ambiguous Dockerfile source: both stdin and flag correspond to Dockerfiles")
        return _tar_or_dockerfile(spooled, dockerfile, work, "stdin")
    from lamina.engine.gitsource import is_git_url
    from lamina.engine.sourcetimes import download

    external = dockerfile is not None and os.path.isabs(dockerfile)  # buildx: -f /abs is the client's
    if _is_http(context) and not is_git_url(context):
        # BuildKit's HTTP context: a tar (any compression) is the context; any other file is
        # the Dockerfile, whatever -f names (buildx's "bogus" filename), with an empty context.
        spooled = work / "http.bin"
        modified = download(context, spooled)
        epoch = modified if modified is not None else _newest_file_time(spooled)
        found = _tar_or_dockerfile(
            spooled, dockerfile if _is_tar(spooled) and not external else None, work, context
        )
        if external and not found.dockerfile_outside:
            return Resolved(found.context, Path(dockerfile or ""), True, epoch)
        return dataclasses.replace(found, epoch=epoch)
    root, epoch = _remote_context(context, environ, work, keep_git_dir)
    if external:
        return Resolved(root, Path(dockerfile or ""), True, epoch)
    return Resolved(root, _inside(root, dockerfile) if dockerfile else None, epoch=epoch)


def _scoped(found: Resolved, subdir: str) -> Resolved:
    """BuildKit's contextsubdir: `subdir` of the fetched context is the context; the Dockerfile
    is still the one named from the top (checked to be a file of it, then read from there)."""
    from lamina.engine.buildfiles import default_dockerfile

    context = _inside(found.context, subdir)
    if not context.is_dir():
        raise ContextError(f"context subdirectory {subdir}: not a directory of the build context")
    if found.dockerfile_outside:
        return dataclasses.replace(found, context=context)
    dockerfile = found.dockerfile or default_dockerfile(found.context)
    _within(found.context, dockerfile)
    return Resolved(context, dockerfile, True, found.epoch)


def _is_tar(path: Path) -> bool:
    from lamina.engine.steps.copyadd.archive import is_archive

    return is_archive(str(path))


def _tar_or_dockerfile(spooled: Path, dockerfile: str | None, work: Path, what: str) -> Resolved:
    """A spooled context: a tar unpacked as the context, else the Dockerfile of an empty one."""
    if _is_tar(spooled):
        root = work / "context"
        _unpack(spooled, root)
        spooled.unlink()
        return Resolved(root, _inside(root, dockerfile) if dockerfile else None)
    if spooled.stat().st_size > _MAX_STDIN_DOCKERFILE:
        raise ContextError(f"{what}: a Dockerfile of more than 16 MiB")
    (work / "empty").mkdir(mode=0o755)
    path = work / "stdin" / "Dockerfile"
    path.parent.mkdir()
    spooled.rename(path)
    return Resolved(work / "empty", path, True)


def _newest_file_time(path: Path) -> int | None:
    from lamina.engine.sourcetimes import newest_file_time

    with open(path, "rb") as stream:
        return newest_file_time(stream)


def _remote_context(
    context: str, environ: Mapping[str, str], work: Path, keep_git_dir: bool
) -> tuple[Path, int]:
    """A git context checked out, and its commit's time (SOURCE_DATE_EPOCH=context)."""
    from lamina.engine.gitsource import check_commit, checkout, parse_git_url
    from lamina.engine.sourcetimes import commit_time

    ref = parse_git_url(context)
    repo = work / "git"
    keep = ref.keep_git_dir if ref.keep_git_dir is not None else keep_git_dir
    check_commit(ref, checkout(ref, repo, environ, keep_git_dir=True))
    epoch = commit_time(repo)
    if not keep:
        shutil.rmtree(repo / ".git")
    return (_inside(repo, ref.subdir) if ref.subdir else repo), epoch


def _inside(root: Path, rel: str) -> Path:
    """`rel` under `root`, never outside it (a hostile subdir or -f of a remote context)."""
    path = Path(os.path.normpath(root / rel.lstrip("/")))
    if path != root and root not in path.parents:
        raise ContextError(f"{rel}: path is outside of the build context")
    return path


def _within(root: Path, dockerfile: Path) -> None:
    """A fetched context's Dockerfile must be a file of it: a symlink in a hostile tar or
    repository may not make the build read a file of this host."""
    real_root, real = os.path.realpath(root), os.path.realpath(dockerfile)
    if os.path.commonpath([real_root, real]) != real_root:
        rel = os.path.relpath(dockerfile, root)
        raise ContextError(f"Dockerfile {rel}: a symlink that points outside of the build context")


def _read_bounded(source: BinaryIO, what: str) -> bytes:
    data = source.read(_MAX_STDIN_DOCKERFILE + 1)
    if len(data) > _MAX_STDIN_DOCKERFILE:
        raise ContextError(f"{what}: a Dockerfile of more than 16 MiB on stdin")
    return data


def _unpack(archive: Path, dest: Path) -> None:
    """The tar context, every path hostile (the layer extractor's checks), owners not kept."""
    import bz2
    import lzma

    from lamina.errors import LaminaError
    from lamina.oci.compression import open_decompressed
    from lamina.oci.extract import Whiteouts, extract_layer

    with open(archive, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        stream: BinaryIO
        if head.startswith(b"BZh"):
            stream = bz2.open(raw, "rb")  # type: ignore[assignment]  # noqa: SIM115 (closes with raw)
        elif head.startswith(b"\xfd7zXZ\x00"):
            stream = lzma.open(raw, "rb")  # type: ignore[assignment]  # noqa: SIM115 (closes with raw)
        else:
            stream = open_decompressed(raw)
        try:
            extract_layer(stream, dest, whiteouts=Whiteouts.APPLY, ignore_owners=True)
        except LaminaError as err:
            raise ContextError(f"build context from stdin: {err}") from err
    os.chmod(dest, 0o755)
