"""Git sources: a build context (and ADD's source) given as a git URL, fetched with the `git` command.

Which strings are git URLs, as docker's urlutil.IsGitURL (buildx sends those to
BuildKit as a git context): `http(s)://...` whose path ends in `.git` (a
`#fragment` allowed after it), and anything starting with `git://`, `git@` or
`github.com/`; also `ssh://`, as BuildKit's gitutil. The fragment is
`#REF[:SUBDIR]`: a branch, tag, `refs/...` name or commit, and a directory of
the checkout that is the context. BuildKit's query form says the same and more
(dfgitutil.loadQuery): `?ref=`, `?tag=` (refs/tags/), `?branch=` (refs/heads/),
`?subdir=`, `?checksum=` or `?commit=` (the commit the ref must name),
`?keep-git-dir[=BOOL]`, `?submodules=BOOL`; another key, or a value that
conflicts with the fragment's, is refused.

A checkout is BuildKit's git source: a shallow fetch of the one ref (a whole
fetch when the server will not give a single commit), submodules updated
recursively, and `.git` removed unless kept (`BUILDKIT_CONTEXT_KEEP_GIT_DIR=1`,
`ADD --keep-git-dir`). No prompt ever waits for a password.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from lamina.errors import ContextError

_GIT_PREFIXES = ("git://", "git@", "github.com/", "ssh://")
_COMMIT = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


@dataclasses.dataclass(frozen=True, slots=True)
class GitRef:
    remote: str  # what `git fetch` is given
    ref: str = ""  # "" is the remote's HEAD
    subdir: str = ""
    checksum: str = ""  # ?checksum= / ?commit=: the commit `ref` must name (a prefix of it)
    keep_git_dir: bool | None = None  # ?keep-git-dir: None when the URL does not say
    submodules: bool = True  # ?submodules=false: none fetched


def check_commit(ref: GitRef, commit: str, checksum: str = "") -> None:
    """`commit` against the URL's checksum (and an ADD --checksum): BuildKit's git source check."""
    for wanted in {c for c in (ref.checksum, checksum.removeprefix("sha1:")) if c}:
        if not all(ch in "0123456789abcdefABCDEF" for ch in wanted):  # BuildKit's resolveMetadata
            raise ContextError(
                f"{ref.remote}: invalid checksum {wanted} for Git URL, expected hex commit hash"
            )
        if not commit.startswith(wanted):
            raise ContextError(f"{ref.remote}: expected checksum to match {wanted}, got {commit}")


def is_git_url(text: str) -> bool:
    if text.startswith(("http://", "https://")):
        path = text.partition("#")[0].partition("?")[0]
        return path.endswith(".git")
    return text.startswith(_GIT_PREFIXES)


def parse_git_url(text: str) -> GitRef:
    """The remote, ref and subdir of a git URL (`URL#REF:SUBDIR`, `URL?ref=...&subdir=...`)."""
    base, _, fragment = text.partition("#")
    remote, _, query = base.partition("?")
    ref, _, subdir = fragment.partition(":")
    if remote.startswith("github.com/"):
        remote = "https://" + remote
    if not remote or remote.endswith(("://", "@")):
        raise ContextError(f"{text}: not a git URL")
    found = GitRef(remote, ref, subdir)
    if query:
        found = _with_query(found, query, text)
    if any(part == ".." for part in found.subdir.split("/")):
        raise ContextError(f"{text}: subdir {found.subdir!r} leaves the repository")
    return dataclasses.replace(found, subdir=found.subdir.strip("/"))


def _with_query(found: GitRef, query: str, text: str) -> GitRef:
    import urllib.parse

    values = urllib.parse.parse_qs(query, keep_blank_values=True)
    tag = branch = ""
    for key, given in values.items():
        if len(given) > 1:
            raise ContextError(f"{text}: query {key!r} has multiple values")
        value = given[0]
        if not value and key not in ("submodules", "keep-git-dir"):
            raise ContextError(f"{text}: query {key!r} has no value")
        if key in ("ref", "subdir"):
            field = "ref" if key == "ref" else "subdir"
            if getattr(found, field) and getattr(found, field) != value:
                raise ContextError(f"{text}: {field} conflicts: {getattr(found, field)!r} vs {value!r}")
            found = dataclasses.replace(found, **{field: value})
        elif key == "tag":
            tag = value if value.startswith("refs/tags/") else "refs/tags/" + value
        elif key == "branch":
            branch = value if value.startswith("refs/heads/") else "refs/heads/" + value
        elif key in ("checksum", "commit"):
            found = dataclasses.replace(found, checksum=value)
        elif key in ("keep-git-dir", "submodules"):
            flag = _query_bool(value, key, text)
            found = dataclasses.replace(found, **{key.replace("-", "_"): flag})
        else:
            raise ContextError(f"{text}: unexpected query {key!r}")
    if tag and branch:
        raise ContextError(f"{text}: branch conflicts with tag")
    for named in (tag, branch):
        if named:
            if found.ref and found.ref != named:
                raise ContextError(f"{text}: ref conflicts: {found.ref!r} vs {named!r}")
            found = dataclasses.replace(found, ref=named)
    return found


def _query_bool(value: str, key: str, text: str) -> bool:
    """Go's strconv.ParseBool; a key without a value is true."""
    if value in ("", "1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ContextError(f"{text}: invalid {key} value: {value!r}")


def _git_env(remote: str, environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    git = shutil.which("git", path=environ.get("PATH") or os.defpath)
    if git is None:
        raise ContextError(f"{remote}: a git source needs the git command (apt-get install git)")
    env = {
        **environ,
        "GIT_TERMINAL_PROMPT": "0",  # fail, never wait for a password
        "GIT_ASKPASS": "true",
        "GIT_SSH_COMMAND": environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
    }
    return git, env


def remote_commit(ref: GitRef, environ: Mapping[str, str]) -> str | None:
    """The commit `ref` names on the remote, asked with `git ls-remote` (nothing fetched); None when
    the remote does not advertise it (a commit: then only a fetch can tell)."""
    if _COMMIT.match(ref.ref):
        return ref.ref
    git, env = _git_env(ref.remote, environ)
    wanted = ref.ref or "HEAD"
    done = _ls_remote(git, env, ref.remote, wanted)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ContextError(f"{ref.remote}: git ls-remote {wanted}: {lines[-1] if lines else 'failed'}")
    found = dict(reversed(line.split("\t", 1)) for line in done.stdout.splitlines() if "\t" in line)
    # git's own order for a short name: itself, a tag, a branch; an annotated tag's commit
    # (its peeled `^{}` line), never the tag object.
    for name in (wanted, f"refs/tags/{wanted}", f"refs/heads/{wanted}"):
        for candidate in (name + "^{}", name):
            if candidate in found:
                return found[candidate]
    return None


def _ls_remote(git: str, env: Mapping[str, str], remote: str, ref: str) -> subprocess.CompletedProcess[str]:
    """`git ls-remote REMOTE REF`, its output captured, not checked."""
    return subprocess.run(
        [git, "ls-remote", remote, ref],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def _object_format(git: str, env: Mapping[str, str], remote: str) -> tuple[str, ...]:
    """`--object-format=sha256` for a SHA-256 remote (its ls-remote hashes are 64 digits long),
    which a local repository of git's default SHA-1 format cannot fetch from; else nothing."""
    done = _ls_remote(git, env, remote, "HEAD")
    first = done.stdout.split("\t", 1)[0].strip() if done.returncode == 0 else ""
    return ("--object-format=sha256",) if len(first) == 64 else ()


def checkout(ref: GitRef, dest: Path, environ: Mapping[str, str], *, keep_git_dir: bool = False) -> str:
    """Fetch `ref` into the new directory `dest` and check it out; return the commit."""
    git, env = _git_env(ref.remote, environ)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [git, "-C", str(dest), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            verb = next(arg for arg in args if not arg.startswith("-") and "=" not in arg)
            raise ContextError(f"{ref.remote}: git {verb} {ref.ref or 'HEAD'}: {why}")
        return done

    dest.mkdir(parents=True)
    run("init", "-q", *_object_format(git, env, ref.remote))
    run("remote", "add", "origin", ref.remote)
    wanted = ref.ref or "HEAD"
    shallow = run("fetch", "-q", "--depth=1", "--no-tags", "origin", wanted, check=False)
    if shallow.returncode == 0:
        target = "FETCH_HEAD"
    elif _COMMIT.match(wanted):
        # A server that will not send an unadvertised commit, or no shallow fetch (git's dumb
        # HTTP): fetch everything, then pick it.
        run("fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*")
        target = wanted
    elif run("fetch", "-q", "--no-tags", "origin", wanted, check=False).returncode == 0:
        target = "FETCH_HEAD"  # the whole history of the ref, where a shallow fetch is refused
    else:
        lines = shallow.stderr.strip().splitlines()
        raise ContextError(f"{ref.remote}: git fetch {wanted}: {lines[-1] if lines else 'failed'}")
    run("-c", "advice.detachedHead=false", "checkout", "-q", target)
    commit = run("rev-parse", "HEAD").stdout.strip()
    if ref.submodules and (dest / ".gitmodules").exists():
        run("submodule", "update", "-q", "--init", "--recursive", "--depth=1")
    if not keep_git_dir:
        shutil.rmtree(dest / ".git")
    return commit
