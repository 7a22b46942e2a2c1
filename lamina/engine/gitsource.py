"""Git sources: a build context (and ADD's source) given as a git URL, fetched with the `git` command.

Which strings are git URLs, as docker's urlutil.IsGitURL (buildx sends those to
BuildKit as a git context): `http(s)://...` whose path ends in `.git` (a
`#fragment` allowed after it), and anything starting with `git://`, `git@` or
`github.com/`; also `ssh://`, as BuildKit's gitutil. The fragment is
`#REF[:SUBDIR]`: a branch, tag, `refs/...` name or commit, and a directory of
the checkout that is the context.

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
_URL_GIT_PATH = re.compile(r"\.git(?:#.+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


@dataclasses.dataclass(frozen=True, slots=True)
class GitRef:
    remote: str  # what `git fetch` is given
    ref: str = ""  # "" is the remote's HEAD
    subdir: str = ""


def is_git_url(text: str) -> bool:
    if text.startswith(("http://", "https://")):
        return _URL_GIT_PATH.search(text.split("?", 1)[0] if "#" not in text else text) is not None
    return text.startswith(_GIT_PREFIXES)


def parse_git_url(text: str) -> GitRef:
    """The remote, ref and subdir of a git URL (`URL#REF:SUBDIR`)."""
    remote, _, fragment = text.partition("#")
    ref, _, subdir = fragment.partition(":")
    if remote.startswith("github.com/"):
        remote = "https://" + remote
    if not remote or remote.endswith(("://", "@")):
        raise ContextError(f"{text}: not a git URL")
    if any(part == ".." for part in subdir.split("/")):
        raise ContextError(f"{text}: subdir {subdir!r} leaves the repository")
    return GitRef(remote, ref, subdir.strip("/"))


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
    done = subprocess.run(
        [git, "ls-remote", ref.remote, wanted],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ContextError(f"{ref.remote}: git ls-remote {wanted}: {lines[-1] if lines else 'failed'}")
    found = dict(reversed(line.split("\t", 1)) for line in done.stdout.splitlines() if "\t" in line)
    # git's own order for a short name: itself, a tag (peeled), a branch.
    for name in (wanted, f"refs/tags/{wanted}^{{}}", f"refs/tags/{wanted}", f"refs/heads/{wanted}"):
        if name in found:
            return found[name]
    return None


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
    run("init", "-q")
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
    if (dest / ".gitmodules").exists():
        run("submodule", "update", "-q", "--init", "--recursive", "--depth=1")
    if not keep_git_dir:
        shutil.rmtree(dest / ".git")
    return commit
