"""ADD of a git URL: the repository's files at the destination, as BuildKit's llb.Git and a copy.

`ADD https://host/repo.git#ref:subdir /dest` puts the files of that ref
(of `subdir`) into /dest, owned by 0:0 unless `--chown`; `.git` only with
`--keep-git-dir`. The step is keyed by the commit the ref names now (asked
with `git ls-remote`, so a cache hit fetches nothing), never by the
checkout's bytes. `--checksum=COMMIT` pins it: a ref naming another commit
fails the step, as BuildKit's git source checksum does. An ssh URL
(`git@host:repo.git`) authenticates with the agent forwarded as `--ssh
default` when there is one (as llb.Git mounts that socket for it; `--ssh
default=KEYFILE` is how CI hands a deploy key), else with the caller's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.context import SourceTree
from lamina.engine.gitsource import check_commit, checkout, is_git_url, parse_git_url, remote_commit
from lamina.errors import BuildError, ContextError

if TYPE_CHECKING:
    from lamina.engine.model import StepHost

__all__ = ["commit_of", "git_environ", "git_tree", "is_git_url"]


def git_environ(options: Any) -> dict[str, str]:
    """The environment `git` runs in for ADD: ours, SSH_AUTH_SOCK the `--ssh default` agent's."""
    env = dict(os.environ)
    for agent in options.ssh:
        if agent.id == "default":
            env["SSH_AUTH_SOCK"] = str(agent.socket)
    return env


def commit_of(
    source: str, checksum: str | None, location: Any, environ: Mapping[str, str] | None = None
) -> str:
    """The commit `source` names on its remote now, checked against `--checksum`."""
    ref = parse_git_url(source)
    try:
        commit = remote_commit(ref, os.environ if environ is None else environ)
    except ContextError as err:
        raise BuildError(f"{location}: ADD {err}") from None
    if commit is None:
        raise BuildError(f"{location}: ADD {source}: the remote has no ref {ref.ref or 'HEAD'}")
    try:
        check_commit(ref, commit, checksum or "")  # --checksum and the URL's ?checksum= both hold
    except ContextError as err:
        raise BuildError(f"{location}: ADD {source}: {str(err).partition(': ')[2]}") from None
    return commit


@contextlib.contextmanager
def git_tree(executor: StepHost, source: str, commit: str, keep_git_dir: bool) -> Iterator[SourceTree]:
    """The checkout of `commit` (its subdir) as a source tree, removed afterwards."""
    ref = parse_git_url(source)
    scratch = Path(tempfile.mkdtemp(prefix="git-", dir=executor.store.root / "tmp"))
    try:
        try:
            keep = ref.keep_git_dir if ref.keep_git_dir is not None else keep_git_dir  # ?keep-git-dir wins
            pinned = dataclasses.replace(ref, ref=commit, subdir="")
            checkout(pinned, scratch / "repo", git_environ(executor.options), keep_git_dir=keep)
        except ContextError as err:
            raise BuildError(f"ADD {err}") from None
        root = scratch / "repo" / ref.subdir if ref.subdir else scratch / "repo"
        if not root.is_dir():
            raise BuildError(f"ADD {source}: no directory {ref.subdir} at {commit[:12]}")
        yield SourceTree(root, executor.stat_cache())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
