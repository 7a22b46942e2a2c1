"""`--build-context NAME=VALUE`: a named context that stands in for an image or a stage, as buildx's.

NAME is matched as BuildKit's dockerui.NamedContext matches it: the image
reference in docker's short form without `:latest` (`alpine`, `alpine:3.19`,
`ghcr.io/o/app:1`), so `--build-context alpine=...` replaces `FROM alpine`,
`FROM docker.io/library/alpine:latest`, `COPY --from=alpine` and
`RUN --mount=from=alpine`; a stage of that name is replaced whole (its
instructions do not run), and stages built FROM it or copying from it get
the context instead.

VALUE is, as buildx takes it:
- `docker-image://REF`: that image instead (pulled as any base is);
- `oci-layout://PATH[:TAG|@DIGEST]`: an image of a local OCI layout (tag
  `latest` by default), imported into the store;
- a local directory, or a git URL (engine.gitsource): an image of one layer
  holding its files as a COPY from a context holds them (its .dockerignore
  applied, owners 0:0), as BuildKit's llb.Local of that directory;
- an http(s) URL: an image of the one file it serves, `/context` (mode 0600,
  its time the Last-Modified), as dockerui's llb.HTTP with that file name.
Other values (`target:`, `input:`) are refused. A git or HTTP context's time
(commit time; Last-Modified, else its archive's newest file) is what
SOURCE_DATE_EPOCH=NAME takes (engine.sourceepoch).

Under a source policy (engine.sourcepolicy) each value is judged as BuildKit
names it (`docker-image://FULLNAME`, `local://NAME`, `oci-layout://...`, its git
source): denied fails the build; converted to `docker-image://REF` or to
`local://NAME` (the directory of `--build-context NAME=DIR`, `context` the
build's own) it stands in as that; another conversion is refused.

Images made or imported for a build are named `lamina-build-context/...`
in the store while the build runs, and untagged afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError, PlanError

if TYPE_CHECKING:
    from lamina.engine.sourcepolicy import Policy, Source

INTERNAL_REPO = "lamina-build-context"


@dataclasses.dataclass(frozen=True, slots=True)
class NamedContext:
    name: str  # the key it replaces (`key_of`)
    ref: str  # the image reference used instead
    local: bool = False  # only in the local store: never pulled, even with --pull
    digest: str = ""  # the manifest of an image made or imported here (the replay memo's)
    epoch: int | None = None  # SOURCE_DATE_EPOCH=NAME: a git commit's or an HTTP source's time


def key_of(name: str) -> str:
    """dockerui's key: docker's short form of the reference, without `:latest`."""
    from lamina.oci.layout import familiar_name
    from lamina.oci.reference import parse_reference

    try:
        full = str(parse_reference(name))
    except LaminaError:
        return name.lower()
    return familiar_name(full).removesuffix(":latest")


def lookup(contexts: tuple[NamedContext, ...], name: str) -> NamedContext | None:
    """The named context (of BuildOptions.build_contexts) that replaces the image or stage `name`."""
    if not contexts:
        return None
    key = key_of(name)
    for context in contexts:
        if context.name == key:
            return context
    return None


def parse_flag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise PlanError(f"--build-context {text}: expected NAME=VALUE")
    return key_of(name), value


@contextlib.contextmanager
def prepared(
    flags: Iterable[str],
    store_root: Path,
    environ: Mapping[str, str],
    build_dir: Callable[[Path, str, bool], str],
    policy: Policy | None = None,
    main_context: Path | None = None,
) -> Iterator[tuple[NamedContext, ...]]:
    """The named contexts of `--build-context` flags, images made or imported as needed.

    `build_dir(directory, name, ignore)` builds the one-layer image of a directory under `name`
    (its .dockerignore applied when `ignore`)
    and returns its manifest digest (api.build, run on its own: no nested store).
    `policy` judges each value (`main_context` is what `local://context` names).
    """
    made: list[str] = []
    try:
        with contextlib.ExitStack() as temporary:
            found: dict[str, NamedContext] = {}
            flags = tuple(flags)
            parsed = [parse_flag(flag) for flag in flags]
            for flag, (key, value) in zip(flags, parsed, strict=True):
                if key in found:
                    raise PlanError(f"--build-context {flag}: {key} is given twice")
                if policy is not None:
                    value = _judged(policy, key, value, dict(parsed), main_context)
                found[key] = _context(key, value, store_root, environ, build_dir, made, temporary)
            yield tuple(found.values())
    finally:
        if made:
            _untag(store_root, made)


def _context(
    key: str,
    value: str,
    store_root: Path,
    environ: Mapping[str, str],
    build_dir: Callable[[Path, str, bool], str],
    made: list[str],
    temporary: contextlib.ExitStack,
) -> NamedContext:
    from lamina.engine.gitsource import check_commit, checkout, is_git_url, parse_git_url

    flag = f"--build-context {key}={value}"
    internal = f"{INTERNAL_REPO}/{hashlib.sha256(f'{key}={value}'.encode()).hexdigest()[:16]}:{os.getpid()}"
    if value.startswith("docker-image://"):
        ref = value.removeprefix("docker-image://")
        _check_reference(ref, flag)
        return NamedContext(key, ref)
    if value.startswith("oci-layout://"):
        made.append(internal)
        digest = _import_layout(value.removeprefix("oci-layout://"), store_root, internal, flag)
        return NamedContext(key, internal, local=True, digest=digest)
    directory = Path(value)
    fetched = not directory.is_dir() and is_git_url(value)
    epoch = None
    if fetched:
        from lamina.engine.sourcetimes import commit_time

        work = Path(temporary.enter_context(tempfile.TemporaryDirectory(prefix="lamina-context-")))
        ref = parse_git_url(value)
        try:
            check_commit(ref, checkout(ref, work / "git", environ, keep_git_dir=True))
            epoch = commit_time(work / "git")
        except LaminaError as err:
            raise PlanError(f"{flag}: {err}") from None
        if not ref.keep_git_dir:
            shutil.rmtree(work / "git" / ".git")
        directory = work / "git" / ref.subdir if ref.subdir else work / "git"
    elif value.startswith(("http://", "https://")) and not directory.is_dir():
        return _http_context(key, value, internal, build_dir, made, temporary)
    if value.startswith(("target:", "input:")) and not directory.is_dir():
        raise PlanError(
            f"{flag}: only a directory, a git or http(s) URL, docker-image:// or oci-layout:// is supported"
        )
    if not directory.is_dir():
        raise PlanError(f"{flag}: {value} is not a directory")
    made.append(internal)
    # A git context is taken whole (no .dockerignore), a directory as its upload is.
    digest = build_dir(directory, internal, not fetched)
    return NamedContext(key, internal, local=True, digest=digest, epoch=epoch)


def _http_context(
    key: str,
    url: str,
    internal: str,
    build_dir: Callable[[Path, str, bool], str],
    made: list[str],
    temporary: contextlib.ExitStack,
) -> NamedContext:
    """dockerui's HTTP context: the one file the URL serves, named `context` (llb.HTTP's
    Filename), mode 0600, its time the Last-Modified; its SOURCE_DATE_EPOCH is that time, else
    the newest file of the archive it is."""
    from lamina.engine.sourcetimes import download, newest_file_time

    work = Path(temporary.enter_context(tempfile.TemporaryDirectory(prefix="lamina-context-")))
    directory = work / "http"
    directory.mkdir(mode=0o755)
    path = directory / "context"
    try:
        modified = download(url, path)
    except LaminaError as err:
        raise PlanError(f"--build-context {key}={url}: {err}") from None
    os.chmod(path, 0o600)
    if modified is not None:
        os.utime(path, (modified, modified))
    with open(path, "rb") as stream:
        epoch = modified if modified is not None else newest_file_time(stream)
    made.append(internal)
    return NamedContext(key, internal, local=True, digest=build_dir(directory, internal, False), epoch=epoch)


def _judged(policy: Policy, key: str, value: str, values: dict[str, str], main_context: Path | None) -> str:
    """`value` as the source policy leaves it: the same, another image, or a directory."""
    flag = f"--build-context {key}={value}"
    if value.lower() == "docker-image://scratch":  # the empty image: no source to judge
        return value
    try:
        source = _source_of(key, value)
        converted = policy.evaluate(source)
    except LaminaError as err:
        raise PlanError(f"{flag}: {err}") from None
    if converted.identifier == source.identifier:
        return value
    new = converted.identifier
    if new.startswith("docker-image://"):
        return new
    name = new.removeprefix("local://")
    directory = main_context if name == "context" else Path(values.get(name, ""))
    if new.startswith("local://") and directory is not None and directory.is_dir():
        return os.fspath(directory)
    raise PlanError(
        f"{flag}: the source policy converts it to {new!r}; lamina takes docker-image://REF or "
        "local://NAME (a --build-context NAME=DIR, or context) there"
    )


def _source_of(key: str, value: str) -> Source:
    """A --build-context value as BuildKit's dockerui makes its source."""
    from lamina.engine.gitsource import is_git_url
    from lamina.engine.sourcepolicy import Source, git_source, image_source, local_source

    if value.startswith("docker-image://"):
        return image_source(value.removeprefix("docker-image://"))
    if value.startswith("oci-layout://"):
        return Source(value)
    if not Path(value).is_dir() and is_git_url(value):
        return git_source(value)
    return local_source(key)


def _check_reference(ref: str, flag: str) -> None:
    from lamina.oci.reference import parse_reference

    try:
        parse_reference(ref)
    except LaminaError as err:
        raise PlanError(f"{flag}: {err}") from None


def _import_layout(text: str, store_root: Path, internal: str, flag: str) -> str:
    """The image of a layout that `PATH[:TAG|@DIGEST]` names, imported as `internal`; its digest."""
    from lamina.cache.images import import_image, import_index
    from lamina.cache.store import Store
    from lamina.oci.archive import open_image_source
    from lamina.oci.layout import SourceIndex

    path, at, digest = text.partition("@")
    tag = "latest"
    if not at:
        path, colon, tag = path.rpartition(":") if ":" in Path(path).name else (path, "", "latest")
        if not colon:
            path, tag = text, "latest"
    try:
        with open_image_source(Path(path)) as source, Store(store_root) as store:
            image = _pick(source, Path(path), tag, digest)
            if image is None:
                what = f"digest {digest}" if digest else f"tag {tag}"
                raise PlanError(f"{flag}: the layout has no image of {what}")
            if isinstance(image, SourceIndex):  # multi-platform: each build platform picks its image
                import_index(store, source, image, [internal])
                return str(image.index.digest)
            import_image(store, source, image, [internal])
            return str(image.manifest.digest)
    except PlanError:
        raise
    except LaminaError as err:
        raise PlanError(f"{flag}: {err}") from None


def _pick(source: Any, path: Path, tag: str, digest: str) -> Any:
    """The image (SourceImage, or a multi-platform SourceIndex) of `source` whose index entry has
    ref.name `tag`, or whose digest is `digest` (an index's, or one of its platform images')."""
    import json

    from lamina.oci.layout import LayoutReader, SourceIndex

    entries = source.entries() if isinstance(source, LayoutReader) else source.images()

    def top(entry: Any) -> str:
        return str(entry.index.digest if isinstance(entry, SourceIndex) else entry.manifest.digest)

    if digest:
        inner = [i for e in entries if isinstance(e, SourceIndex) for i in e.images]
        return next((e for e in (*entries, *inner) if top(e) == digest), None)
    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return None
    for entry in index.get("manifests", []):
        if not isinstance(entry, dict):
            continue
        names = (entry.get("annotations") or {}).values()
        if any(name == tag or str(name).endswith(":" + tag) for name in names):
            return next((e for e in entries if top(e) == entry.get("digest")), None)
    return None


def _untag(store_root: Path, names: list[str]) -> None:
    from lamina.cache.images import normalize_name
    from lamina.cache.store import Store

    with Store(store_root) as store:
        for name in names:
            with contextlib.suppress(LaminaError):
                store.untag(normalize_name(name))
