"""Git sources: a build context given as a git URL, checked out with `git` from a local `git daemon`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.engine.gitsource import GitRef, is_git_url, parse_git_url
from tests.support.build import BASE, cached_steps, make_cache, rootfs, run_cli, write_context
from tests.support.gitdaemon import git_daemon
from tests.support.servers import serve_directory

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://example.com/org/repo.git", True),
        ("https://example.com/org/repo.git#v1:sub/dir", True),
        ("http://example.com/repo.git#main", True),
        ("git@github.com:org/repo.git", True),
        ("git://example.com/repo", True),
        ("github.com/org/repo", True),
        ("ssh://git@example.com/repo.git", True),
        ("https://example.com/context.tar.gz", False),
        ("https://example.com/repo", False),
        ("./repo.git", False),
    ],
)
def test_git_urls_as_docker_tells_them(text: str, expected: bool) -> None:
    assert is_git_url(text) is expected


def test_git_url_fragment() -> None:
    assert parse_git_url("https://h/r.git#v1:a/b") == GitRef("https://h/r.git", "v1", "a/b")
    assert parse_git_url("git@h:r.git") == GitRef("git@h:r.git")
    assert parse_git_url("github.com/o/r#main") == GitRef("https://github.com/o/r", "main")


def test_git_url_query_as_buildkit() -> None:
    """BuildKit's dfgitutil query form: ref/tag/branch, subdir, checksum/commit, keep-git-dir, submodules."""
    assert parse_git_url("https://h/r.git?tag=v1&subdir=app") == GitRef(
        "https://h/r.git", "refs/tags/v1", "app"
    )
    assert parse_git_url("https://h/r.git?branch=dev").ref == "refs/heads/dev"
    got = parse_git_url("git@h:r.git?ref=main&commit=abc123&keep-git-dir&submodules=false")
    assert (got.ref, got.checksum, got.keep_git_dir, got.submodules) == ("main", "abc123", True, False)
    assert parse_git_url("https://h/r.git?ref=main#main:app") == GitRef("https://h/r.git", "main", "app")
    assert is_git_url("https://h/r.git?ref=main") and not is_git_url("https://h/r?x=.git")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://h/r.git?depth=1", "unexpected query 'depth'"),
        ("https://h/r.git?ref=a#b", "ref conflicts: 'b' vs 'a'"),
        ("https://h/r.git?tag=v1&branch=main", "branch conflicts with tag"),
        ("https://h/r.git?ref=", "query 'ref' has no value"),
        ("https://h/r.git?submodules=maybe", "invalid submodules value: 'maybe'"),
        ("https://h/r.git?subdir=../x", "leaves the repository"),
    ],
)
def test_git_url_query_refusals(text: str, message: str) -> None:
    from lamina.errors import ContextError

    with pytest.raises(ContextError, match=re.escape(message)):
        parse_git_url(text)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """git://127.0.0.1:PORT/repo.git: tag v1 and branch main (one commit later), with the
    commit of v1; the Dockerfile and files live in app/."""
    if shutil.which("git") is None:
        pytest.skip("git is missing (apt-get install git)")
    base = tmp_path / "served"
    repo = base / "repo.git"
    work = tmp_path / "work"
    (work / "app").mkdir(parents=True)
    _git(work, "init", "-q", "-b", "main")
    (work / "app/Dockerfile").write_text(f"FROM {BASE}\nCOPY . /ctx/\n")
    (work / "app/version.txt").write_text("one\n")
    (work / "top.txt").write_text("outside app\n")
    # BuildKit applies no .dockerignore to a git context (only to a local upload): both stay.
    (work / ".dockerignore").write_text("top.txt\n")
    (work / "app/.dockerignore").write_text("version.txt\n")
    _git(work, "add", ".")
    _git(work, "commit", "-q", "-m", "one")
    _git(work, "tag", "v1")
    first = _git(work, "rev-parse", "HEAD").strip()
    (work / "app/version.txt").write_text("two\n")
    _git(work, "commit", "-q", "-am", "two")
    base.mkdir()
    _git(base, "clone", "-q", "--bare", str(work), str(repo))
    _git(repo, "update-server-info")  # for git's dumb HTTP protocol (the http:// test)
    with git_daemon(base, {**os.environ, **GIT_ENV}) as served_at:
        yield f"{served_at}/repo.git", {"first": first, "work": str(work), "base": str(base)}


@pytest.mark.sandbox
def test_context_from_git_refs_and_subdir(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    url, facts = served
    cache = make_cache(tmp_path, busybox_image)
    for ref, version in (("main", "two"), ("v1", "one"), (facts["first"], "one"), ("", "two")):
        out = tmp_path / f"out-{ref or 'head'}"
        fragment = f"#{ref}:app" if ref else "#:app"
        run_cli("build", "-o", f"type=local,dest={out}", url + fragment, cache=cache)
        assert (out / "ctx/version.txt").read_text() == f"{version}\n", ref  # .dockerignore: not applied
        assert not (out / "ctx/.git").exists(), "the .git directory is not part of the context"
        assert not (out / "ctx/top.txt").exists(), "the subdir is the context"


@pytest.mark.sandbox
def test_git_context_keep_git_dir_and_dockerfile_path(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    url, _ = served
    cache = make_cache(tmp_path, busybox_image)
    out = tmp_path / "out"
    args = ("--build-arg", "BUILDKIT_CONTEXT_KEEP_GIT_DIR=1", "-f", "app/Dockerfile")
    run_cli("build", *args, "-o", f"type=local,dest={out}", url + "#v1", cache=cache)
    assert (out / "ctx/.git/HEAD").is_file(), "BUILDKIT_CONTEXT_KEEP_GIT_DIR keeps .git, as BuildKit"
    assert (out / "ctx/top.txt").read_text() == "outside app\n", (
        "a git context's .dockerignore filters nothing"
    )


@pytest.mark.sandbox
def test_git_query_form_context_and_add(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    url, facts = served
    cache = make_cache(tmp_path, busybox_image)
    out = tmp_path / "out"
    run_cli("build", "-o", f"type=local,dest={out}", f"{url}?tag=v1&subdir=app", cache=cache)
    assert (out / "ctx/version.txt").read_text() == "one\n"
    text = f"FROM {BASE}\nADD {url}?branch=main&subdir=app&checksum={facts['first'][:12]} /x\n"
    ctx = write_context(tmp_path / "ctx", text)
    proc = run_cli("build", str(ctx), cache=cache, check=False)
    assert "expected checksum to match" in proc.stderr, "main is not the pinned commit"
    ctx = write_context(tmp_path / "ctx2", f"FROM {BASE}\nADD {url}?tag=v1&keep-git-dir=true /x\n")
    out2 = tmp_path / "out2"
    rootfs(cache, ctx, out2)
    assert (out2 / "x/app/version.txt").read_text() == "one\n"
    assert (out2 / "x/.git").is_dir(), "?keep-git-dir keeps .git"


@pytest.mark.sandbox
def test_build_context_from_git(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    url, _ = served
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY --from=src /top.txt /app/version.txt /got/\n")
    out = tmp_path / "out"
    run_cli(
        "build", "--build-context", f"src={url}#v1", "-o", f"type=local,dest={out}", str(ctx), cache=cache
    )
    assert (out / "got/version.txt").read_text() == "one\n"
    assert (out / "got/top.txt").read_text() == "outside app\n", (
        "a git context's .dockerignore filters nothing"
    )


def test_git_context_errors_in_one_line(served: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, _ = served
    proc = run_cli("build", url + "#nosuchref", cache=tmp_path / "cache", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {url}: git fetch nosuchref: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("build", url + "#main:../..", cache=tmp_path / "cache", check=False)
    assert proc.stderr.strip() == f"error: {url}#main:../..: subdir '../..' leaves the repository"


# --- ADD of a git URL ------------------------------------------------------------------------


@pytest.mark.sandbox
def test_add_git_url_clones(served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path) -> None:
    url, facts = served
    cache = make_cache(tmp_path, busybox_image)
    first = facts["first"]
    text = f"""\
FROM {BASE}
ADD {url}#v1:app /v1
ADD --keep-git-dir=true {url}#main /main/
ADD --checksum={first} {url}#v1 /pinned
ADD --chown=7:8 {url}#main:app /owned
"""
    ctx = write_context(tmp_path / "ctx", text)
    out = tmp_path / "out"
    result = rootfs(cache, ctx, out)
    assert (out / "v1/version.txt").read_text() == "one\n"
    assert (out / "v1/Dockerfile").is_file() and not (out / "v1/.git").exists()
    assert (out / "main/app/version.txt").read_text() == "two\n"
    assert (out / "main/top.txt").read_text() == "outside app\n"
    assert (out / "main/.git/HEAD").is_file(), "--keep-git-dir keeps .git, as BuildKit"
    assert (out / "pinned/app/version.txt").read_text() == "one\n"
    st = (out / "owned/version.txt").stat()
    if os.geteuid() == 0:  # an unprivileged local export is owned by whoever wrote it
        assert (st.st_uid, st.st_gid) == (7, 8)
    assert not any(cached_steps(result))
    # Keyed by the commit the ref names: nothing changed, all cached; a new commit on main re-runs
    # what names main, and only that.
    assert all(cached_steps(rootfs(cache, ctx, tmp_path / "again")))
    work = Path(facts["work"])
    (work / "app/version.txt").write_text("three\n")
    _git(work, "commit", "-q", "-am", "three")
    _git(work, "push", "-q", str(Path(facts["base"]) / "repo.git"), "main")
    out3 = tmp_path / "out3"
    result = rootfs(cache, ctx, out3)
    assert cached_steps(result) == [True, False, False, False]
    assert (out3 / "owned/version.txt").read_text() == "three\n"
    assert (out3 / "v1/version.txt").read_text() == "one\n"


@pytest.mark.sandbox
def test_add_git_checksum_mismatch_fails(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    url, facts = served
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD --checksum={facts['first']} {url}#main /x\n")
    proc = run_cli("build", str(ctx), cache=cache, check=False)
    assert proc.returncode == 1
    # One line after the progress lines (`[1/2] FROM ...`).
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: {ctx / 'Dockerfile'}:2: ADD {url}#main: expected checksum to match {facts['first']}"
    )


@pytest.mark.sandbox
def test_add_http_git_url_clones_not_the_page(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path
) -> None:
    """`ADD http://host/repo.git` is a git source (was: the server's page saved as a file)."""
    _, facts = served
    with serve_directory(facts["base"]) as served_at:
        url = f"{served_at}/repo.git"
        cache = make_cache(tmp_path, busybox_image)
        ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD {url}#v1:app /src\n")
        out = tmp_path / "out"
        rootfs(cache, ctx, out)
        assert (out / "src/version.txt").read_text() == "one\n"


@pytest.mark.sandbox
def test_add_git_over_ssh_uses_the_forwarded_agent(
    served: tuple[str, dict[str, str]], tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ADD git@...` authenticates with the `--ssh default` agent, as BuildKit's git source mounts
    it (a deploy key handed as --ssh default=KEY); without --ssh, with the caller's own. A fake
    `ssh` (GIT_SSH_COMMAND) records the agent it was given and serves the repository locally."""
    if shutil.which("ssh-keygen") is None or shutil.which("ssh-agent") is None:
        pytest.skip("ssh-keygen/ssh-agent missing (apt-get install openssh-client)")
    _, facts = served
    record = tmp_path / "agents"
    fake = tmp_path / "fake-ssh"
    # git runs: $GIT_SSH_COMMAND [options] HOST "git-upload-pack '/path'"; the last word is the command.
    fake.write_text(
        f'#!/bin/sh\necho "$SSH_AUTH_SOCK" >> {record}\nfor last; do :; done\neval "exec $last"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(fake))
    monkeypatch.setenv("SSH_AUTH_SOCK", "/the/callers/agent")
    key = tmp_path / "deploy"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    url = f"ssh://git@127.0.0.1{facts['base']}/repo.git#v1:app"
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD {url} /src\n")
    out = tmp_path / "out"
    rootfs(cache, ctx, out, ssh=[f"default={key}"])
    assert (out / "src/version.txt").read_text() == "one\n"
    agents = set(record.read_text().split())
    assert len(agents) == 1 and "/the/callers/agent" not in agents, agents
    assert Path(agents.pop()).name == "agent", "lamina's own agent holding the deploy key"
    record.unlink()
    rootfs(cache, write_context(tmp_path / "ctx2", f"FROM {BASE}\nADD {url} /other\n"), tmp_path / "out2")
    assert set(record.read_text().split()) == {"/the/callers/agent"}, "no --ssh: the caller's own"
