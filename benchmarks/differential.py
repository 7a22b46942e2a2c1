"""Build the example Dockerfiles with lamina and with BuildKit; diff root filesystems and configs.

    .venv/bin/python benchmarks/differential.py [CASE_DIR ...] [--keep DIR]

Needs dockerd (../shared/bench/peers-setup.sh starts one) and the base image
lamina-test/busybox:1.35 loaded into both lamina's store and docker. The
cases (default: every examples/*/Dockerfile and benchmarks/diffcases/*/Dockerfile)
are directories holding a Dockerfile and its context. A case may also hold:

- `base/` (a Dockerfile and context): built first by each tool and tagged
  lamina-diff/CASE-base:latest, for a case that builds FROM an image made by
  the same builder (ONBUILD triggers);
- `build-args`: one K=V per line, passed to both builds;
- `platform`: os/arch[/variant], one a line: the case is built once for each,
  passed to both as `--platform` (lamina: `platforms=`), and the image's
  os/architecture/variant compared too (a case without RUN: no emulation is
  needed);
- `secrets`: one ID=PATH per line, passed to both as `--secret id=ID,src=PATH`;
- `served/`: served over HTTP on 127.0.0.1 while the case builds, its base
  URL passed to both as the build arg URL_BASE (for ADD of a URL);
- `ssh`: an ssh-agent holding a fresh key runs while the case builds, and
  both builds get `--ssh default` (RUN --mount=type=ssh);
- `git-context`: the case is committed to a git repository (tag v1) served
  by `git daemon` on 127.0.0.1, and both build the context
  `git://127.0.0.1:PORT/repo.git#FRAGMENT`, FRAGMENT being the file's text.

Each case is copied to a scratch directory first (examples/base also gets
the host's /bin/busybox, as examples/quickstart.sh does). Then:

- lamina: `lamina.build(...)` with `-o type=local,dest=...` and the config;
- BuildKit: `DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none`, then
  `docker create` + `docker export` for the root filesystem (extracted as
  root so owners survive), `docker image inspect` for the config and
  `skopeo inspect --config` for the history. A `# syntax=` directive is
  dropped for BuildKit: docker 20.10 would pull the named frontend image (no
  network here) and its built-in frontend reads the same Dockerfile
  language, heredocs aside.

Trees are compared path by path: type, mode, owner, size and sha256 of
files, symlink targets (mtimes are not compared: they are build times).
Paths that `docker create` itself adds to a container are skipped. Configs
are compared field by field (Env, Cmd, Entrypoint, WorkingDir, User, Labels,
ExposedPorts, Volumes, StopSignal, Healthcheck, Shell, OnBuild) and by the
history's created_by lines. Differences listed in EXPLAINED are reported as
explained (see the README's "Differences from BuildKit"); any other makes
the exit status 1. Without docker the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"
BASE = "lamina-test/busybox:1.35"
# What `docker create`/`docker export` put into every container's filesystem.
CONTAINER_ARTIFACTS = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab"}
CONTAINER_DIRS = ("dev", "proc", "sys")
CONFIG_FIELDS = (
    "Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "Volumes",
    "StopSignal", "Healthcheck", "Shell", "OnBuild",
    "Platform",  # os/architecture/variant, for a case with a `platform` file
)  # fmt: skip
# Differences that are deliberate or not lamina's (see README "Differences from BuildKit").
EXPLAINED: dict[str, str] = {
    "history:empty-layer": "lamina drops a step's layer when the step changed nothing (BuildKit keeps "
    "an empty tar); the history line is the same, only empty_layer differs",
    # Lines docker 20.10's BuildKit (0.8) writes differently from current BuildKit, which lamina follows.
    "history:copy-flags": "BuildKit 0.8 leaves --chown/--chmod out of COPY/ADD history lines; "
    "current BuildKit writes them (convert_copy.go), as lamina does",
    "history:healthcheck": "BuildKit 0.8 prints HEALTHCHECK's settings without StartInterval "
    "(Docker 25 added it); current BuildKit prints four durations, as lamina does",
    "history:inherited-arg": "for `ARG NAME` that inherits a global default, BuildKit 0.8 writes "
    "`ARG NAME`; current BuildKit writes `ARG NAME=value`, as lamina does",
    "history:arg-value": "BuildKit 0.8 writes an ARG's Dockerfile default in its history line; current "
    "BuildKit writes the value the build uses (a --build-arg overrides it), as lamina does",
    "history:expose": "BuildKit 0.8 writes EXPOSE's history as Go's map (`EXPOSE map[80/tcp:{}]`); "
    "current BuildKit writes the sorted ports as a list (`EXPOSE [80/tcp]`, since 98eab32), as lamina does",
    "tree:mount-stub": "BuildKit 0.8 leaves the empty directories it made as RUN --mount targets in "
    "the image; current BuildKit removes them (executor/stubs.go), as lamina does",
    "history:parent-stage-args": "in a stage built FROM another stage, BuildKit 0.8 leaves the parent's "
    "ARGs out of RUN's `|N K=V` prefix (they are still in the environment); current BuildKit "
    "carries them over (dispatchState.init), as lamina does",
    # Trees where only owners differ, below a path (key ends with "/").
    "archives:/chowned/": "ADD --chown of a local archive: BuildKit 0.8 keeps the owners recorded in "
    "the archive; current BuildKit gives every unpacked entry the --chown owner (its unpack's "
    "ownerMapper), as lamina does",
    "chmod:/etc/suid": "COPY --chmod=4755: BuildKit's copy dropped setuid/setgid/sticky bits "
    "(moby/buildkit#3920); lamina sets the mode asked for",
    # Directories COPY creates: BuildKit 0.8 makes them 0755; current BuildKit's fsutil MkdirAll
    # gives them an octal --chmod (testCopyChmod's parentperm), as lamina does.
    "chmod:/newdir": "COPY --chmod=700 f /newdir/: BuildKit 0.8 makes /newdir 0755; current BuildKit "
    "makes the directories it creates with the octal --chmod, as lamina does",
    "chmod:/tree": "COPY --chmod=640 tree/ /tree/: BuildKit 0.8 makes /tree 0755; current BuildKit "
    "makes the directories it creates with the octal --chmod, as lamina does",
    **dict.fromkeys(
        [f"users:/ids/{name}" for name in ("root", "app", "app-nomem", "1000", "1000-1000", "4242")]
        + ["users:/ids/nobody-extra", "common:/home/app/work/whoami"],
        "`id` in RUN: BuildKit 0.8 sets only the /etc/group memberships of a named user as "
        "supplementary groups; current BuildKit also gives no USER root's memberships and puts the "
        "primary group first among them (GetUser, ensureAdditionalGids: testUserAdditionalGids), "
        "as lamina does",
    ),
    # Files whose content is not a function of the Dockerfile and context.
    "runenv:/dev-list": "the sandbox's /dev: BuildKit (runc) also mounts /dev/mqueue, lamina's "
    "minimal /dev has no POSIX message queue mount",
    "instructions:/srv/app/listing.txt": "`ls -la` output: holds modification times and the host "
    "filesystem's block counts",
}
_HEALTHCHECK_DURATIONS = re.compile(r'^(HEALTHCHECK &\{\[.*\] "[^"]*" "[^"]*" "[^"]*") "[^"]*"')
_RUN_ARGS = re.compile(r"^RUN \|(\d+) ")


def _expose_ports(line: str, prefix: str, suffix: str) -> list[str] | None:
    """The ports of an EXPOSE history line in one of its two forms, else None."""
    if not line.startswith(prefix):
        return None
    return [port.removesuffix(suffix) for port in line.removeprefix(prefix).rstrip("]").split()]


def explain_history_line(ours: str, theirs: str) -> str | None:
    """The EXPLAINED key for a history line BuildKit 0.8 writes differently, else None."""
    if ours.startswith(("COPY ", "ADD ")) and re.sub(r" --ch(own|mod)=\S+", "", ours) == theirs:
        return "history:copy-flags"
    if _HEALTHCHECK_DURATIONS.sub(r"\1", ours) == theirs:
        return "history:healthcheck"
    if ours.startswith("ARG ") and theirs.startswith("ARG "):
        names = [word.partition("=")[0] for word in ours.split()]
        if names == theirs.split():
            return "history:inherited-arg"
        if names == [word.partition("=")[0] for word in theirs.split()]:
            return "history:arg-value"
    if _expose_ports(ours, "EXPOSE [", "") == _expose_ports(theirs, "EXPOSE map[", ":{}") is not None:
        return "history:expose"
    ours_args, ours_cmd = _run_args(ours)
    theirs_args, theirs_cmd = _run_args(theirs)
    if ours_cmd is not None and ours_cmd == theirs_cmd and set(theirs_args) < set(ours_args):
        return "history:parent-stage-args"  # 0.8 lists the stage's own ARGs only, or none
    return None


def _run_args(line: str) -> tuple[list[str], str | None]:
    """A RUN history line's `|N K=V` build args and the command after them."""
    if not line.startswith("RUN "):
        return [], None
    match = _RUN_ARGS.match(line)
    if match is None:
        return [], line[len("RUN ") :]
    words = line[match.end() :].split(" ")
    count = int(match.group(1))
    return words[:count], " ".join(words[count:])


_MOUNT = re.compile(r"--mount=(\S+)")


def mount_stubs(dockerfile: Path) -> set[str]:
    """RUN --mount targets (a secret's default is /run/secrets/ID) and their parents:
    where BuildKit 0.8 leaves empty directories."""
    stubs: set[str] = set()
    for spec in _MOUNT.findall(dockerfile.read_text()):
        fields = dict(part.partition("=")[::2] for part in spec.split(","))
        target = fields.get("target") or fields.get("dst") or fields.get("destination")
        if target is None and fields.get("type") == "secret":
            target = f"/run/secrets/{fields.get('id', '')}"
        if target is None and fields.get("type") == "ssh":
            target = "/run/buildkit/ssh_agent.0"
        path = Path(target or "")
        while path.is_absolute() and str(path) != "/":
            stubs.add(str(path).lstrip("/"))
            path = path.parent
    return stubs


def owners_only(ours: tuple[Any, ...] | None, theirs: tuple[Any, ...] | None) -> bool:
    """Both exist and differ only in uid/gid."""
    if ours is None or theirs is None or ours[0] != theirs[0]:
        return False
    drop = (1, 2) if ours[0] == "link" else (2, 3)
    return [v for i, v in enumerate(ours) if i not in drop] == [
        v for i, v in enumerate(theirs) if i not in drop
    ]


def special_bits_only(ours: tuple[Any, ...] | None, theirs: tuple[Any, ...] | None) -> bool:
    """Both exist and differ only in the setuid/setgid/sticky bits of their mode."""
    if ours is None or theirs is None or ours[0] != theirs[0] or ours[0] == "link":
        return False
    low = (oct(int(ours[1], 8) & 0o777), oct(int(theirs[1], 8) & 0o777))
    return low[0] == low[1] and ours[2:] == theirs[2:]


def made_dir_mode_only(ours: tuple[Any, ...] | None, theirs: tuple[Any, ...] | None) -> bool:
    """Both are directories with the same owners, BuildKit 0.8's made 0755 (a created parent)."""
    return (
        ours is not None
        and theirs is not None
        and ours[0] == theirs[0] == "dir"
        and theirs[1] == "0o755"
        and ours[2:] == theirs[2:]
    )


def same_but_content(ours: tuple[Any, ...] | None, theirs: tuple[Any, ...] | None) -> bool:
    return (
        ours is not None and theirs is not None and ours[0] == theirs[0] == "file" and ours[:4] == theirs[:4]
    )


def run(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def describe_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for base, dirs, files in os.walk(root):
        rel_base = os.path.relpath(base, root)
        for name in sorted(dirs + files):
            rel = os.path.normpath(os.path.join(rel_base, name))
            if rel in CONTAINER_ARTIFACTS or rel.split("/")[0] in CONTAINER_DIRS:
                continue
            st = os.lstat(os.path.join(base, name))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_uid, st.st_gid, os.readlink(os.path.join(base, name)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(mode), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                with open(os.path.join(base, name), "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                out[rel] = ("file", oct(mode), st.st_uid, st.st_gid, st.st_size, digest)
            else:
                out[rel] = ("other", oct(st.st_mode), st.st_uid, st.st_gid, st.st_rdev)
    return out


Result = tuple[dict[str, tuple[Any, ...]], dict[str, Any], list[tuple[str, bool]]]


def stage_context(case: Path, work: Path) -> Path:
    """Copy CASE to a scratch directory (examples/base gets the host's busybox)."""
    ctx = work / "ctx"
    shutil.copytree(case, ctx, symlinks=True)
    if case.resolve() == (ROOT / "examples" / "base").resolve():
        shutil.copy2("/bin/busybox", ctx / "busybox")
    return ctx


@contextlib.contextmanager
def serving(case: Path) -> Iterator[str | None]:
    """Serve CASE/served/ over HTTP on 127.0.0.1 (for ADD of a URL); yield its base URL."""
    if not (case / "served").is_dir():
        yield None
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.servers import serve_directory

    with serve_directory(case / "served") as url:
        yield url


def stage_with_url(case: Path, dest: Path, url: str | None, platform: str | None = None) -> Path:
    """stage_context, plus URL_BASE=url among the build args when the case serves files, and
    `platform` the one this run builds for (of those the case's `platform` file lists)."""
    ctx = stage_context(case, dest)
    if url is not None:
        with open(ctx / "build-args", "a") as f:
            f.write(f"URL_BASE={url}\n")
    if platform is not None:
        (ctx / "platform").write_text(platform + "\n")
    return ctx


def case_platforms(case: Path) -> list[str | None]:
    """The platforms a case is built for, one run each: the lines of its `platform`, or the host's."""
    path = case / "platform"
    lines = path.read_text().splitlines() if path.exists() else []
    listed: list[str | None] = [line.strip() for line in lines if line.strip()]
    return listed or [None]


def read_build_args(ctx: Path) -> dict[str, str]:
    path = ctx / "build-args"
    if not path.exists():
        return {}
    pairs = (line.partition("=") for line in path.read_text().splitlines() if line.strip())
    return {key: value for key, _, value in pairs}


def read_platform(ctx: Path) -> str | None:
    """`platform`: the one target platform of the case (os/arch[/variant]), or None (the host's)."""
    path = ctx / "platform"
    return path.read_text().strip() if path.exists() else None


def with_platform(ctx: Path, container_config: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """The config to compare: for a case with a `platform`, plus the image's own os/arch/variant
    (`top`: the image config, or docker's inspect with Os/Architecture/Variant)."""
    if read_platform(ctx) is None:
        return container_config
    parts = [top.get("os") or top.get("Os"), top.get("architecture") or top.get("Architecture")]
    variant = top.get("variant") or top.get("Variant")
    return {**container_config, "Platform": "/".join([*parts, *([variant] if variant else [])])}


def read_secrets(ctx: Path) -> list[str]:
    """`secrets`: one ID=PATH per line (PATH relative to the case) -> `id=ID,src=ABS` specs."""
    path = ctx / "secrets"
    if not path.exists():
        return []
    pairs = (line.partition("=") for line in path.read_text().splitlines() if line.strip())
    return [f"id={key},src={ctx / value}" for key, _, value in pairs]


@contextlib.contextmanager
def forwarding(case: Path) -> Iterator[None]:
    """For a case with an `ssh` file: an ssh-agent with a fresh key, as $SSH_AUTH_SOCK."""
    if not (case / "ssh").exists():
        yield
        return
    home = Path(tempfile.mkdtemp(prefix="diff-agent-"))
    sock = home / "agent"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    saved = os.environ.get("SSH_AUTH_SOCK")
    try:
        while not _listening(sock):  # the file appears at bind(), before listen()
            if agent.poll() is not None:
                raise SystemExit("differential: ssh-agent did not start")
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "key"))
        run("ssh-add", "-q", str(home / "key"), env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        os.chmod(home, 0o711)  # a throwaway agent: --as-user's lamina may reach it
        os.chmod(sock, 0o666)
        os.environ["SSH_AUTH_SOCK"] = str(sock)
        yield
    finally:
        if saved is None:
            os.environ.pop("SSH_AUTH_SOCK", None)
        else:
            os.environ["SSH_AUTH_SOCK"] = saved
        agent.kill()
        agent.wait()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def git_served(ctx: Path) -> Iterator[str | None]:
    """For a case with a `git-context` file: CTX committed and served by `git daemon`; the
    context URL (else None)."""
    marker = ctx / "git-context"
    if not marker.exists():
        yield None
        return
    sys.path.insert(0, str(ROOT))
    from tests.support.gitdaemon import git_daemon

    fragment = marker.read_text().strip()
    base = Path(tempfile.mkdtemp(prefix="diff-git-"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "d", "GIT_AUTHOR_EMAIL": "d@example.com"}
    env |= {"GIT_COMMITTER_NAME": "d", "GIT_COMMITTER_EMAIL": "d@example.com"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "case"], ["tag", "v1"]):
        run("git", "-c", "safe.directory=*", "-C", str(ctx), *args, env=env)  # --as-user chowns CTX
    run("git", "-c", "safe.directory=*", "clone", "-q", "--bare", str(ctx), str(base / "repo.git"), env=env)
    try:
        with git_daemon(base) as served_at:
            yield f"{served_at}/repo.git#{fragment}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _listening(sock: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        return sock.exists() and probe.connect_ex(str(sock)) == 0


def ssh_flags(ctx: Path) -> list[str]:
    return ["--ssh", "default"] if (ctx / "ssh").exists() else []


def base_tag(case: Path) -> str:
    return f"lamina-diff/{case.name}-base:latest"


def lamina_build(case: Path, ctx: Path, work: Path) -> Result:
    sys.path.insert(0, str(ROOT))
    from lamina import api

    args = read_build_args(ctx)
    if (ctx / "base" / "Dockerfile").exists():
        api.build(ctx / "base", build_args=args, tags=[base_tag(case)], no_cache=True)
    dest = work / "lamina-root"
    # --no-cache: a result cached by an older lamina must not stand in for this one's.
    with git_served(ctx) as url:
        platform = read_platform(ctx)
        result = api.build(
            url or ctx,
            build_args=args,
            secrets=read_secrets(ctx),
            ssh=ssh_flags(ctx)[1:],
            outputs=[f"type=local,dest={dest}"],
            no_cache=True,
            **({"platforms": [platform]} if platform else {}),
        )
    config = json.loads(result.config.to_bytes())
    history = [(h.get("created_by", ""), h.get("empty_layer", False)) for h in config.get("history", [])]
    return describe_tree(dest), with_platform(ctx, config.get("config", {}), config), history


def lamina_build_as(user: str, case: Path, ctx: Path, work: Path) -> Result:
    """lamina run by an unprivileged `user` (its own cache); the tree comes from the
    OCI archive, unpacked here as root, since a rootless local export is the caller's."""
    import pwd

    mine = work / "user"  # the user's HOME, cache and output
    mine.mkdir()
    entry = pwd.getpwnam(user)
    os.chown(mine, entry.pw_uid, entry.pw_gid)
    for path in (work.parent, work):
        os.chmod(path, 0o755)
    for path in (ctx, *ctx.rglob("*")):  # the user's own context, modes untouched
        os.lchown(path, entry.pw_uid, entry.pw_gid)
    archive = mine / "lamina-oci.tar"
    flags = [part for k, v in read_build_args(ctx).items() for part in ("--build-arg", f"{k}={v}")]
    flags += [part for spec in read_secrets(ctx) for part in ("--secret", spec)]
    flags += ["--progress", "quiet", "--no-cache", *ssh_flags(ctx)]
    flags += ["--platform", platform] if (platform := read_platform(ctx)) else []
    # runuser with a plain environment, as ../shared/bench/peers-setup.sh's asuser.sh does
    env = [
        "env",
        "-i",
        f"HOME={mine}",
        f"LAMINA_CACHE={mine / 'cache'}",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        *([f"SSH_AUTH_SOCK={os.environ['SSH_AUTH_SOCK']}"] if ssh_flags(ctx) else []),
    ]
    lamina = ["runuser", "-u", user, "--", *env, sys.executable, "-m", "lamina"]
    base = Path(os.environ.get("LAB", "/tmp/lamina-lab")) / "base" / "busybox-oci.tar"
    run(*lamina, "load", str(base))
    if (ctx / "base" / "Dockerfile").exists():
        run(*lamina, "build", *flags, "-t", base_tag(case), str(ctx / "base"))
    with git_served(ctx) as url:
        run(*lamina, "build", *flags, "-o", f"type=oci,dest={archive}", url or str(ctx))
    dest = work / "lamina-root"
    config = unpack_oci(archive, dest)
    history = [(h.get("created_by", ""), h.get("empty_layer", False)) for h in config.get("history", [])]
    return describe_tree(dest), with_platform(ctx, config.get("config", {}), config), history


def unpack_oci(archive: Path, dest: Path) -> dict[str, Any]:
    """Apply an OCI archive's layers (our own output: trusted) onto `dest`; return its config."""
    with tarfile.open(archive) as outer:

        def blob(digest: str) -> bytes:
            return read_member(outer, "blobs/sha256/" + digest.split(":")[1])

        index = json.loads(read_member(outer, "index.json"))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        dest.mkdir(parents=True)
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as tar:
                for member in tar:
                    parent, _, name = member.name.rstrip("/").rpartition("/")
                    if name == ".wh..wh..opq":
                        for child in (dest / parent).iterdir():
                            remove(child)
                    elif name.startswith(".wh."):
                        remove(dest / parent / name[4:])
                    else:
                        target = dest / member.name
                        a_real_dir = target.is_dir() and not target.is_symlink()
                        if not (member.isdir() and a_real_dir):
                            remove(target)  # a directory entry keeps a directory below, nothing else
                        tar.extract(member, dest, numeric_owner=True)
        return json.loads(blob(manifest["config"]["digest"]))


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None
    return member.read()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def drop_syntax_directive(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.replace(" ", "").lower().startswith("#syntax=")]
    dockerfile.write_text("".join(kept))


def docker_build(ctx: Path, tag: str, args: dict[str, str]) -> None:
    drop_syntax_directive(ctx / "Dockerfile")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    flags = [part for key, value in args.items() for part in ("--build-arg", f"{key}={value}")]
    flags += [part for spec in read_secrets(ctx) for part in ("--secret", spec)]
    flags += ssh_flags(ctx)
    flags += ["--platform", platform] if (platform := read_platform(ctx)) else []
    with git_served(ctx) as url:
        run(DOCKER, "build", "--network=none", "-q", *flags, "-t", tag, url or str(ctx), env=env)


def buildkit_build(case: Path, ctx: Path, work: Path) -> Result:
    args = read_build_args(ctx)
    if (ctx / "base" / "Dockerfile").exists():
        docker_build(ctx / "base", base_tag(case), args)
    tag = f"lamina-diff/{case.name}:bk"
    try:
        docker_build(ctx, tag, args)
        container = run(DOCKER, "create", tag, "true").strip()  # never started; an image may have no CMD
        archive = work / "bk.tar"
        try:
            run(DOCKER, "export", "-o", str(archive), container)
        finally:
            run(DOCKER, "rm", container)
        dest = work / "bk-root"
        dest.mkdir()
        # GNU tar as root keeps owners, modes and special files (tarfile's filters need 3.11.4+)
        run("tar", "--numeric-owner", "--same-permissions", "-xf", str(archive), "-C", str(dest))
        inspect = json.loads(run(DOCKER, "image", "inspect", tag))[0]
        # The image's own config: `docker image history` shows tabs as spaces.
        config = json.loads(run("skopeo", "inspect", "--config", f"docker-daemon:{tag}"))
    finally:
        # Our images go (docker's shared store would keep each run's as a dangling image).
        subprocess.run([DOCKER, "rmi", "-f", tag, base_tag(case)], capture_output=True)
    history = [(h.get("created_by", ""), h.get("empty_layer", False)) for h in config.get("history", [])]
    return describe_tree(dest), with_platform(ctx, inspect.get("Config", {}), inspect), history


def compare(
    name: str, lamina: Result, buildkit: Result, stubs: set[str] = frozenset()
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    explained: list[str] = []
    tree_l, config_l, history_l = lamina
    tree_b, config_b, history_b = buildkit
    for path in sorted(set(tree_l) | set(tree_b)):
        ours, theirs = tree_l.get(path), tree_b.get(path)
        if ours == theirs or (
            path == "etc" and ours is None and not any(p.startswith("etc/") for p in tree_b)
        ):
            continue  # `docker create` makes /etc for its artifacts in an image that has none
        line = f"{name}: /{path}: lamina {ours} != buildkit {theirs}"
        reason = EXPLAINED.get(f"{name}:/{path}")
        if reason and same_but_content(ours, theirs):
            explained.append(f"{name}: /{path}: content differs ({reason})")
        elif reason and (special_bits_only(ours, theirs) or made_dir_mode_only(ours, theirs)):
            explained.append(f"{name}: /{path}: mode differs ({reason})")
        elif owner_reason := next(
            (
                text
                for key, text in EXPLAINED.items()
                if key.endswith("/") and f"{name}:/{path}".startswith(key)
            ),
            None,
        ):
            if owners_only(ours, theirs):
                explained.append(f"{name}: /{path}: owners differ ({owner_reason})")
            else:
                problems.append(line)
        elif ours is None and path in stubs and theirs == ("dir", "0o755", 0, 0):
            explained.append(f"{name}: /{path}: only in buildkit ({EXPLAINED['tree:mount-stub']})")
        else:
            problems.append(line)
    for field in CONFIG_FIELDS:
        left, right = config_l.get(field) or None, config_b.get(field) or None
        if left != right:
            problems.append(f"{name}: config {field}: lamina {left!r} != buildkit {right!r}")
    # Compare the entries both have: a base made by mkbase.py may carry one line fewer or more.
    count = min(len(history_l), len(history_b))
    pairs = list(zip(history_l[len(history_l) - count :], history_b[len(history_b) - count :], strict=True))
    if len(history_l) != len(history_b):
        problems.append(
            f"{name}: history has {len(history_l)} entries in lamina, {len(history_b)} in buildkit"
        )
    for (ours, _), (theirs, _) in pairs:
        if ours == theirs:
            continue
        key = explain_history_line(ours, theirs)
        if key is None:
            problems.append(f"{name}: history: lamina {ours!r} != buildkit {theirs!r}")
        else:
            explained.append(f"{name}: history {ours!r} ({EXPLAINED[key]})")
    if any(e_l != e_b for (_, e_l), (_, e_b) in pairs):
        explained.append(f"{name}: history empty_layer flags differ ({EXPLAINED['history:empty-layer']})")
    return problems, explained


def print_case(name: str, problems: list[str], explained: list[str], what: str = "") -> None:
    """A case's explained and different lines, then its verdict (`what`: the outputs compared)."""
    for line in explained:
        print(f"explained  {line}")
    for line in problems:
        print(f"DIFFERENT  {line}")
    verdict = "identical" if not problems else f"{len(problems)} difference(s)"
    print(f"{name}: {verdict}{what}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("examples", nargs="*", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the trees here instead of a temp dir")
    parser.add_argument("--as-user", metavar="USER", help="run lamina as this unprivileged user (rootless)")
    args = parser.parse_args()
    if not Path(DOCKER).exists() or subprocess.run([DOCKER, "info"], capture_output=True).returncode:
        print("differential: skipped, no working dockerd (run ../shared/bench/peers-setup.sh as root)")
        return
    cases = args.examples or sorted(
        path.parent
        for folder in ("examples", "benchmarks/diffcases")
        for path in (ROOT / folder).glob("*/Dockerfile")
    )
    all_problems: list[str] = []
    for example, platform in ((case, p) for case in cases for p in case_platforms(case)):
        name = example.name + (f"[{platform}]" if platform is not None else "")
        work = Path(tempfile.mkdtemp(prefix=f"diff-{example.name}-", dir=args.keep))
        try:
            with serving(example) as url, forwarding(example):
                ctx = stage_with_url(example, work / "lamina", url, platform)
                if args.as_user:
                    ours = lamina_build_as(args.as_user, example, ctx, work / "lamina")
                else:
                    ours = lamina_build(example, ctx, work)
                theirs_ctx = stage_with_url(example, work / "buildkit", url, platform)
                theirs = buildkit_build(example, theirs_ctx, work)
            stubs = mount_stubs(example / "Dockerfile")
            problems, explained = compare(name, ours, theirs, stubs)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        print_case(name, problems, explained)
        all_problems += problems
    sys.exit(1 if all_problems else 0)


if __name__ == "__main__":
    main()
