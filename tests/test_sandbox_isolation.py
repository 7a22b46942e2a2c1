"""Isolation modes (issue 10): which one a process gets, and builds where namespaces are denied.

- `choose()` over probed facts, as data: no namespaces are needed for these.
- chroot isolation at the sandbox level (root only): the layer is the
  command's change and nothing of what was staged for it (/dev, mounts,
  resolv.conf), leftovers are killed, what cannot be given is one line.
- Builds under tests/support/no_namespaces.py (docker's seccomp denials and
  capabilities, or user namespaces off) give the same image, byte for byte,
  as the build with user namespaces.
- proot isolation for a plain uid with no namespaces: owners a RUN gives
  (chown, its USER) and device nodes are recorded in xattrs and come out in
  the layer; the same build as a plain user under docker's seccomp denials
  gives the same image, byte for byte; what cannot be recorded is one line.
- The same build inside `docker run --network=none` with docker's default
  seccomp profile and capabilities, as uid 0 and as uid 1000 (skipped where
  docker is absent).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lamina.engine.sandbox import BindMount, CacheMount, Network, SandboxSpec, SecretMount, TmpfsMount, run
from lamina.engine.sandbox.isolation import CAP_MKNOD, CAP_SYS_CHROOT, Isolation, Probe, choose, probe
from lamina.engine.snapshot import capture
from lamina.errors import SandboxError
from tests.support.busybox import BUSYBOX, make_busybox_rootfs

ROOT = Path(__file__).resolve().parent.parent
NO_NAMESPACES = ROOT / "tests/support/no_namespaces.py"
DOCKER_CAPS = 0xA80425FB  # docker's 14 default capabilities: no CAP_SYS_ADMIN


def _probe(**kw: object) -> Probe:
    facts: dict[str, object] = {
        "uid": 0,
        "userns": "",
        "rootns": "",
        "effective_caps": (1 << 41) - 1,
        "proot": None,
    }
    facts.update(kw)
    return Probe(**facts)  # type: ignore[arg-type]


DENIED = "unshare: Operation not permitted"


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({}, Isolation.USERNS),
        ({"uid": 1000, "effective_caps": 0}, Isolation.USERNS),
        ({"userns": DENIED}, Isolation.ROOTNS),  # a host with user namespaces off, as root
        ({"userns": DENIED, "rootns": DENIED, "effective_caps": DOCKER_CAPS}, Isolation.CHROOT),  # docker
        (
            {"uid": 1000, "userns": DENIED, "rootns": DENIED, "effective_caps": 0, "proot": "/usr/bin/proot"},
            Isolation.PROOT,
        ),  # docker run --user 1000
    ],
    ids=["laptop", "user-laptop", "userns-off-root", "docker-root", "docker-user"],
)
def test_auto_picks_the_strongest_allowed(facts: dict[str, object], expected: Isolation) -> None:
    choice = choose(None, _probe(**facts))
    assert choice.isolation is expected
    # said once per build when weaker
    assert bool(choice.notice()) is (expected in (Isolation.CHROOT, Isolation.PROOT))


def test_chroot_notice_names_what_a_step_lacks() -> None:
    notice = choose(None, _probe(userns=DENIED, rootns=DENIED, effective_caps=DOCKER_CAPS)).notice()
    assert notice.startswith("isolation chroot: ")
    for lack in ("network", "/proc", "--mount", "PID", "read-only cache or tmpfs mount"):
        assert lack in notice


def test_nothing_allowed_is_one_error_naming_each_mode() -> None:
    # A plain user in docker: no namespaces, no capabilities, no proot.
    with pytest.raises(SandboxError) as err:
        choose(None, _probe(uid=1000, userns=DENIED, rootns=DENIED, effective_caps=0))
    message = str(err.value)
    assert "\n" not in message
    for mode in ("userns: unshare", "rootns: needs uid 0", "chroot: needs uid 0", "proot:"):
        assert mode in message


def test_proot_notice_and_refusals_say_what_is_missing() -> None:
    plain = {"uid": 1000, "userns": DENIED, "rootns": DENIED, "effective_caps": 0}
    notice = choose(None, _probe(**plain, proot="/usr/bin/proot")).notice()
    assert notice.startswith("isolation proot: ")
    for lack in ("network", "PID", "su, setuid", "ptrace", "read-only cache or tmpfs mount"):
        assert lack in notice
    with pytest.raises(
        SandboxError, match=r"--isolation proot: proot is not installed \(apt-get install proot\)"
    ):
        choose(Isolation.PROOT, _probe(**plain))
    with pytest.raises(SandboxError, match="--isolation proot: is for a plain uid"):
        choose(Isolation.PROOT, _probe(proot="/usr/bin/proot"))


def test_an_explicit_mode_that_is_not_allowed_says_why() -> None:
    with pytest.raises(SandboxError, match="--isolation chroot: needs CAP_SYS_CHROOT"):
        choose(Isolation.CHROOT, _probe(effective_caps=(1 << CAP_MKNOD)))
    with pytest.raises(SandboxError, match="--isolation userns: unshare: Operation not permitted"):
        choose(Isolation.USERNS, _probe(userns=DENIED))
    assert choose(Isolation.CHROOT, _probe(effective_caps=1 << CAP_SYS_CHROOT)).isolation is Isolation.CHROOT


# --- chroot isolation, sandbox level -------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot isolation needs uid 0 (CAP_SYS_CHROOT)")


@pytest.fixture
def chroot_rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    monkeypatch.setenv("LAMINA_ISOLATION", "chroot")
    root = make_busybox_rootfs(tmp_path / "rootfs")
    (root / "etc/hosts").write_text("from the image\n")
    return root


def _sh(root: Path, script: str, tmp_path: Path, **kw: object) -> tuple[int, str, list[str]]:
    out = tmp_path / f"out-{time.monotonic_ns()}"
    warnings: list[str] = []
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=("/bin/sh", "-c", script),
            lower_dirs=(root,),
            stdout=f,
            stderr=f,
            scratch_dir=tmp_path / "scratch",
            **kw,  # type: ignore[arg-type]
        )
        code = run(spec, on_warning=warnings.append)
    return code, out.read_text(), warnings


@needs_root
def test_chroot_layer_holds_the_change_and_nothing_staged(chroot_rootfs: Path, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src/in").write_text("bound\n")
    (tmp_path / "token").write_text("s3cret\n")
    cache = tmp_path / "cache/dir"
    upper = tmp_path / "upper"
    script = textwrap.dedent(
        """
        cat /src/in; echo dropped > /src/in
        cat /run/secrets/token; stat -c %a /run/secrets/token
        echo one >> /var/cache/x/log
        echo t > /tmp/scratch/t
        echo hi > /etc/new && chown 1000:2000 /etc/new
        ls /dev/null /dev/urandom >/dev/null && echo dev-ok
        grep -q 'from the image' /etc/hosts || echo hosts-staged
        test -e /proc/self || echo no-proc
        """
    )
    mounts = (
        BindMount(tmp_path / "src", "/src"),
        SecretMount("token", tmp_path / "token"),
        CacheMount(cache, "/var/cache/x"),
        TmpfsMount("/tmp/scratch"),
    )
    code, out, warnings = _sh(
        chroot_rootfs, script, tmp_path, mounts=mounts, upper_dir=upper, network=Network.HOST
    )
    assert code == 0, out
    assert out.split() == ["bound", "s3cret", "400", "dev-ok", "hosts-staged", "no-proc"]
    assert any(w.startswith("isolation chroot:") for w in warnings)
    entries = {e.path: (e.uid, e.gid) for e in capture(upper)}
    assert entries == {"etc": (0, 0), "etc/new": (1000, 2000)}, entries
    assert (tmp_path / "src/in").read_text() == "bound\n"  # a bind is a copy: writes are dropped
    assert (cache / "log").read_text() == "one\n"  # the cache dir went in and came back
    assert (chroot_rootfs / "etc/hosts").read_text() == "from the image\n"
    assert list((tmp_path / "scratch").iterdir()) == []


@needs_root
def test_chroot_writable_bind_is_written_back(chroot_rootfs: Path, tmp_path: Path) -> None:
    # `lamina run --mount type=bind,source=S,target=/src` (writable): no mount namespace,
    # so a copy goes in and is mirrored back; nothing of it reaches the layer.
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep/same").write_text("same\n")
    (src / "edit").write_text("old\n")
    (src / "gone").write_text("bye\n")
    outside = tmp_path / "outside"
    outside.write_text("host\n")
    script = (
        "echo new > /src/edit && rm /src/gone && "
        f"mkdir /src/made && echo m > /src/made/f && ln -s {outside} /src/l"
    )
    upper = tmp_path / "upper"
    code, out, _ = _sh(
        chroot_rootfs, script, tmp_path, mounts=(BindMount(src, "/src", readonly=False),), upper_dir=upper
    )
    assert code == 0, out
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == [
        "edit",
        "keep",
        "keep/same",
        "l",
        "made",
        "made/f",
    ]
    assert (src / "edit").read_text() == "new\n" and (src / "made/f").read_text() == "m\n"
    assert os.readlink(src / "l") == str(outside) and outside.read_text() == "host\n"  # a link, not followed
    assert [e.path for e in capture(upper)] == []


@needs_root
def test_chroot_network_none_is_one_line_naming_what_is_missing(chroot_rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as err:
        _sh(chroot_rootfs, "true", tmp_path, network=Network.NONE)
    assert str(err.value).startswith(
        "--network=none needs a network namespace, which chroot isolation cannot make"
    )
    assert "\n" not in str(err.value)


@needs_root
def test_chroot_applies_ulimit_and_refuses_shm_size(chroot_rootfs: Path, tmp_path: Path) -> None:
    """--ulimit reaches the command as under namespaces; --shm-size, which a chroot cannot give
    (no tmpfs), is one line (both were silently ignored)."""
    from lamina.engine.sandbox.spec import Ulimit

    code, out, _ = _sh(
        chroot_rootfs, "ulimit -Sn; ulimit -Hn", tmp_path, ulimits=(Ulimit("nofile", 99, 123),)
    )
    assert (code, out) == (0, "99\n123\n")
    with pytest.raises(SandboxError) as err:
        _sh(chroot_rootfs, "true", tmp_path, shm_size=8 << 20)
    assert str(err.value).startswith("--shm-size needs a mount namespace for /dev/shm's tmpfs, which chroot")
    if not probe().userns:  # asked for, by the flag or the variable (was: '$LAMINA_ISOLATION' alone)
        assert str(err.value).endswith("(--isolation or $LAMINA_ISOLATION asks for it)")
    assert "\n" not in str(err.value)


@needs_root
@pytest.mark.parametrize("mode", ["userns", "rootns"])
def test_read_only_cache_mount_refuses_writes_with_erofs(
    mode: str, chroot_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mount=type=cache,ro`, as BuildKit mounts it: readable, and a write fails with EROFS."""
    if mode == "rootns" and probe().rootns:
        pytest.skip(f"rootns isolation is not allowed here: {probe().rootns}")
    monkeypatch.setenv("LAMINA_ISOLATION", mode)
    cache = tmp_path / "cache/dir"
    cache.mkdir(parents=True)
    (cache / "log").write_text("kept\n")
    script = "cat /c/log; echo more >> /c/log || echo refused; touch /c/new || echo refused"
    code, out, _ = _sh(chroot_rootfs, script, tmp_path, mounts=(CacheMount(cache, "/c", readonly=True),))
    assert code == 0, out
    assert out.count("Read-only file system") == 2 and out.split("\n")[0] == "kept", out
    assert sorted(p.name for p in cache.iterdir()) == ["log"] and (cache / "log").read_text() == "kept\n"


@needs_root
@pytest.mark.parametrize("mode", ["userns", "rootns"])
def test_read_only_tmpfs_mount_refuses_writes_with_erofs(
    mode: str, chroot_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mount=type=tmpfs,ro`, as BuildKit mounts it: an empty tmpfs, read-only."""
    if mode == "rootns" and probe().rootns:
        pytest.skip(f"rootns isolation is not allowed here: {probe().rootns}")
    monkeypatch.setenv("LAMINA_ISOLATION", mode)
    script = "ls -A /t; touch /t/x || echo refused; grep -c ' /t tmpfs ro,' /proc/mounts"
    code, out, _ = _sh(chroot_rootfs, script, tmp_path, mounts=(TmpfsMount("/t", readonly=True),))
    assert code == 0, out
    assert "Read-only file system" in out and out.endswith("refused\n1\n"), out


@needs_root
@pytest.mark.parametrize("kind", ["cache", "tmpfs"])
def test_chroot_read_only_cache_mount_is_one_line(kind: str, chroot_rootfs: Path, tmp_path: Path) -> None:
    """chroot isolation can mount nothing and its root writes any file: refused, not pretended."""
    mount = CacheMount(tmp_path / "cache/dir", "/c", readonly=True) if kind == "cache" else None
    mount = mount or TmpfsMount("/c", readonly=True)
    with pytest.raises(SandboxError) as err:
        _sh(chroot_rootfs, "true", tmp_path, mounts=(mount,))
    assert str(err.value).startswith(
        f"--mount=type={kind},readonly needs a read-only mount, which chroot isolation cannot make"
    )
    assert "\n" not in str(err.value)


def test_proot_read_only_cache_mount_is_one_line(tmp_path: Path) -> None:
    from lamina.engine.sandbox.isolation import Choice
    from lamina.engine.sandbox.runner import _without_namespaces

    spec = SandboxSpec(argv=("true",), mounts=(CacheMount(tmp_path, "/c", readonly=True),))
    with pytest.raises(SandboxError, match=r"^--mount=type=cache,readonly needs .* which proot isolation"):
        _without_namespaces(spec, Choice(Isolation.PROOT, "", ""))
    writable = SandboxSpec(argv=("true",), mounts=(CacheMount(tmp_path, "/c"),))
    assert _without_namespaces(writable, Choice(Isolation.PROOT, "", "")).network is Network.HOST


@needs_root
def test_chroot_step_cannot_chroot_out(chroot_rootfs: Path, tmp_path: Path) -> None:
    # Root holding CAP_SYS_CHROOT leaves a chroot with mkdir x; chroot x; cd ../..
    script = "mkdir -p /x/bin && cp /bin/busybox /x/bin/true && chroot /x /bin/true && echo escaped"
    code, out, _ = _sh(chroot_rootfs, script, tmp_path)
    assert code != 0 and "Operation not permitted" in out and "escaped" not in out, out


@needs_root
def test_chroot_no_process_outlives_the_step(chroot_rootfs: Path, tmp_path: Path) -> None:
    seconds = 4000 + time.monotonic_ns() % 1000
    code, _, _ = _sh(chroot_rootfs, f"(setsid sleep {seconds} &) ; sleep {seconds + 1} & echo ok", tmp_path)
    assert code == 0
    found = subprocess.run(["pgrep", "-f", f"sleep {seconds}"], capture_output=True, text=True)
    assert found.stdout == ""


@needs_root
def test_chroot_staged_dir_swapped_for_a_symlink_does_not_reach_the_host(
    chroot_rootfs: Path, tmp_path: Path
) -> None:
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "keep").write_text("mine\n")
    (tmp_path / "token").write_text("s3cret\n")
    # The step swaps the secret's directory for a symlink to a host path
    # (absolute: the undo runs outside the chroot) and plants the same name.
    script = f"rm -rf /run/secrets && ln -s {host} /run/secrets && echo ok"
    code, out, _ = _sh(chroot_rootfs, script, tmp_path, mounts=(SecretMount("token", tmp_path / "token"),))
    assert (code, out) == (0, "ok\n")
    assert sorted(p.name for p in host.iterdir()) == ["keep"]


# --- builds where namespaces are denied -------------------------------------------------

DOCKERFILE = """\
FROM lamina-test/busybox:1.35 AS builder
WORKDIR /src
COPY app.txt .
RUN --mount=type=cache,target=/cache --mount=type=secret,id=tok \\
    mkdir -p /out && cat app.txt /run/secrets/tok | wc -c > /out/size && echo run >> /cache/log \\
    && cp /cache/log /out/cachelog && chown -R 1000:1000 /out && chmod 750 /out
RUN <<EOT
echo heredoc > /out/here
ln -s here /out/link
rm -f /etc/motd /etc/group- && ls /dev > /out/devlist
EOT

FROM lamina-test/busybox:1.35
COPY --from=builder /out /app
RUN chown nobody:nogroup /app/here && mkdir -p /var/empty2 && echo "$(id -u)" > /app/uid
USER nobody
CMD ["cat", "/app/here"]
"""


def _context(where: Path, busybox_image: Path) -> Path:
    where.mkdir(parents=True)
    (where / "ctx").mkdir()
    (where / "ctx/Dockerfile").write_text(DOCKERFILE)
    (where / "ctx/app.txt").write_text("hello\n")
    (where / "tok").write_text("s3cret\n")
    shutil.copy(busybox_image, where / "base.tar")
    return where


def _build_args(where: Path, out: Path) -> list[str]:
    return [
        "build",
        "--progress",
        "plain",
        "--secret",
        f"id=tok,src={where}/tok",
        "-o",
        f"type=oci,dest={out}",
        f"{where}/ctx",
    ]


def _lamina(where: Path, args: list[str], wrap: list[str] = ()) -> subprocess.CompletedProcess[str]:  # type: ignore[assignment]
    env = {**os.environ, "LAMINA_CACHE": str(where / "cache"), "SOURCE_DATE_EPOCH": "0"}
    env.pop("LAMINA_ISOLATION", None)
    return subprocess.run(
        [*wrap, sys.executable, "-m", "lamina", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def host_image(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> Path:
    """The image as a build with user namespaces makes it."""
    where = _context(tmp_path_factory.mktemp("host") / "w", busybox_image)
    assert _lamina(where, ["load", str(where / "base.tar")]).returncode == 0
    done = _lamina(where, _build_args(where, where / "image.tar"))
    assert done.returncode == 0, done.stderr
    assert "isolation" not in done.stderr
    return where / "image.tar"


@needs_root
@pytest.mark.parametrize(("denial", "isolation"), [("docker", "chroot"), ("nouserns", "rootns")])
def test_build_without_namespaces_makes_the_same_image(
    denial: str, isolation: str, host_image: Path, busybox_image: Path, tmp_path: Path
) -> None:
    where = _context(tmp_path / "w", busybox_image)
    wrap = [sys.executable, str(NO_NAMESPACES), denial, "--"]
    info = _lamina(where, ["info"], wrap)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"isolation:       {isolation} ")
    assert _lamina(where, ["load", str(where / "base.tar")], wrap).returncode == 0
    done = _lamina(where, _build_args(where, where / "image.tar"), wrap)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "isolation" in line]
    assert len(said) == (1 if isolation == "chroot" else 0), said
    assert _digest(where / "image.tar") == _digest(host_image)


@needs_root
@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--network=none", "--network=none needs a network namespace"),
        ("--mount=type=cache,target=/c,ro", "--mount=type=cache,readonly needs a read-only mount"),
    ],
)
def test_build_network_none_without_namespaces_names_the_line(
    flag: str, said: str, busybox_image: Path, tmp_path: Path
) -> None:
    where = _context(tmp_path / "w", busybox_image)
    (where / "ctx/Dockerfile").write_text(f"FROM lamina-test/busybox:1.35\nRUN true\nRUN {flag} true\n")
    wrap = [sys.executable, str(NO_NAMESPACES), "docker", "--"]
    assert _lamina(where, ["load", str(where / "base.tar")], wrap).returncode == 0
    done = _lamina(where, ["build", "--progress", "quiet", f"{where}/ctx"], wrap)
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert "Dockerfile:3" in error and said in error, done.stderr


# --- inside docker ------------------------------------------------------------------

DOCKER = shutil.which("docker")


def _docker_ready() -> str:
    """Why the docker test cannot run here, or ""."""
    if os.geteuid() != 0:
        return "the docker test runs as root (it talks to dockerd's socket)"
    if DOCKER is None:
        return "docker is not installed (.ci/run: apt-get install docker.io, start dockerd)"
    done = subprocess.run([DOCKER, "info"], capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        return "dockerd is not answering (.ci/run: start it as ../shared/bench/peers-setup.sh does)"
    return ""


@pytest.mark.skipif(bool(_docker_ready()), reason=_docker_ready() or "ready")
@pytest.mark.parametrize(("user", "isolation"), [("0", "chroot"), ("1000", "proot")], ids=["root", "uid1000"])
def test_build_in_an_unprivileged_docker_container(
    user: str, isolation: str, host_image: Path, busybox_image: Path, tmp_path: Path
) -> None:
    assert DOCKER is not None
    image = "lamina-test/busybox:1.35"
    if subprocess.run([DOCKER, "image", "inspect", image], capture_output=True, check=False).returncode != 0:
        subprocess.run([DOCKER, "load", "-i", str(busybox_image)], check=True, capture_output=True)
    where = _context(tmp_path / "w", busybox_image)
    if user != "0" and shutil.which("proot") is None:
        pytest.skip("uid 1000 builds under proot: apt-get install proot")
    subprocess.run(["chown", "-R", f"{user}:{user}", str(where)], check=True)
    python = Path(sys.executable)
    # lamina without an image build: the host's /usr (python, libseccomp) read-only over busybox,
    # the project and its venv at the same paths.
    binds = ["/usr:/usr:ro", "/usr/lib:/lib:ro", "/usr/lib64:/lib64:ro", f"{ROOT}:{ROOT}:ro", f"{where}:/w"]
    venv = Path(sys.prefix)
    if not str(venv).startswith(str(ROOT) + "/") and venv != Path("/usr"):
        binds.append(f"{venv}:{venv}:ro")
    script = (
        f"cd {ROOT} && {python} -m lamina load /w/base.tar >/dev/null && "
        f"{python} -m lamina {' '.join(_build_args(Path('/w'), Path('/w/image.tar')))}"
    )
    done = subprocess.run(
        [DOCKER, "run", "--rm", "--network=none", "--user", user, *(a for b in binds for a in ("-v", b)),
         "-e", "LAMINA_CACHE=/w/cache", "-e", "TMPDIR=/w", "-e", "SOURCE_DATE_EPOCH=0",
         image, "sh", "-c", script],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"isolation {isolation}:" in done.stderr
    assert _digest(where / "image.tar") == _digest(host_image)


# --- proot isolation: owners recorded where nothing may be chowned ----------------------


def test_recorded_owners_survive_unpack_and_come_out_in_the_layer(tmp_path: Path) -> None:
    # What `lamina load` + unpack does for a plain uid with no user namespace:
    # no chown, no mknod; the owners and the device are in xattrs, and the
    # layer written from that dir has them back (and no lamina xattrs).
    import io
    import tarfile

    from lamina.oci.extract import Whiteouts, extract_layer

    members = [("d", "d", 5, 6), ("d/f", "f", 0, 0), ("d/g", "f", 1000, 1000), ("dev-null", "c", 0, 0)]
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, kind, uid, gid in members:
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.mode = uid, gid, 0o750 if kind == "d" else 0o640
            if kind == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "c":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"hi\n"))
    data.seek(0)
    dest = tmp_path / "layer"
    extract_layer(data, dest, whiteouts=Whiteouts.OVERLAY, userxattr=True, record_owners=True)
    me = (os.stat(dest / "d/f").st_uid, os.stat(dest / "d/f").st_gid)
    assert all((os.lstat(p).st_uid, os.lstat(p).st_gid) == me for p in dest.rglob("*"))  # nothing chowned
    assert (dest / "dev-null").is_file()  # a placeholder, not a node
    got = {
        e.path: (e.type.value, e.uid, e.gid, e.mode, e.devmajor, e.devminor, e.xattrs) for e in capture(dest)
    }
    assert got == {
        "d": ("dir", 5, 6, 0o750, 0, 0, ()),
        "d/f": (
            "file",
            *me,
            0o640,
            0,
            0,
            (),
        ),  # no record: the caller's, which a layer shows through its id map
        "d/g": ("file", 1000, 1000, 0o640, 0, 0, ()),
        "dev-null": ("char", *me, 0o640, 1, 3, ()),
    }


def test_an_owner_a_symlink_cannot_record_is_an_error(tmp_path: Path) -> None:
    import io
    import tarfile

    from lamina.errors import LayerError
    from lamina.oci.extract import extract_layer

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname, info.uid, info.gid = tarfile.SYMTYPE, "x", 7, 7
        tar.addfile(info)
    data.seek(0)
    with pytest.raises(LayerError, match="link: cannot record owner 7:7 of a symlink"):
        extract_layer(data, tmp_path / "layer", record_owners=True)


PLAIN_USER = "lamina-sb-nosub"


def _plain_user_ready() -> str:
    if os.geteuid() != 0:
        return "runs lamina as the plain user lamina-sb-nosub through runuser, as root"
    if shutil.which("runuser") is None:
        return "runuser is not installed"
    if shutil.which("proot") is None:
        return "proot is not installed (apt-get install proot)"
    return ""


@pytest.fixture
def plain_user_dir(busybox_image: Path) -> Path:
    """A context dir owned by lamina-sb-nosub (pytest's tmp is root's, 0700)."""
    import pwd
    import tempfile

    from tests.support.sandbox import ensure_user

    ensure_user(PLAIN_USER)
    entry = pwd.getpwnam(PLAIN_USER)
    base = Path(tempfile.mkdtemp(prefix="lamina-proot-"))
    base.chmod(0o755)
    where = _context(base / "w", busybox_image)
    subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(where)], check=True)
    probe = subprocess.run(
        ["runuser", "-u", PLAIN_USER, "--", sys.executable, "-c", "import lamina"], cwd=ROOT
    )
    if probe.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"{PLAIN_USER} cannot run {sys.executable} with lamina importable")
    yield where
    shutil.rmtree(base, ignore_errors=True)


def _as_plain_user(where: Path, args: list[str], denial: str = "docker") -> subprocess.CompletedProcess[str]:
    deny = [sys.executable, str(NO_NAMESPACES), denial, "--"]
    return _lamina(where, args, ["runuser", "-u", PLAIN_USER, "--", *deny])


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
@pytest.mark.parametrize("denial", ["docker", "nouserns"])
def test_build_as_a_plain_user_without_namespaces_makes_the_same_image(
    denial: str, host_image: Path, plain_user_dir: Path
) -> None:
    # docker's seccomp denials as uid != 0 (no namespace, no chown, no mknod), or a
    # host with user namespaces off (user.max_user_namespaces=0).
    where = plain_user_dir
    info = _as_plain_user(where, ["info"], denial)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith("isolation:       proot "), info.stdout
    assert _as_plain_user(where, ["load", str(where / "base.tar")], denial).returncode == 0
    done = _as_plain_user(where, _build_args(where, where / "image.tar"), denial)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "isolation proot" in line]
    assert len(said) == 1, done.stderr
    assert _digest(where / "image.tar") == _digest(host_image)


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (
            "USER nobody\nRUN ln -s /etc /tmp/etc",
            "/tmp/etc is a symlink or special file made as user 65534:65534",
        ),
        ("RUN su nobody -s /bin/sh -c true", "the step switches to group id 65534 (setgid)"),
    ],
    ids=["symlink-owner", "switch-user"],
)
def test_what_proot_cannot_record_fails_the_step_in_one_line(
    plain_user_dir: Path, step: str, reason: str
) -> None:
    where = plain_user_dir
    (where / "ctx/Dockerfile").write_text(f"FROM lamina-test/busybox:1.35\n{step}\n")
    assert _as_plain_user(where, ["load", str(where / "base.tar")]).returncode == 0
    done = _as_plain_user(where, ["build", "--progress", "quiet", f"{where}/ctx"])
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert "Dockerfile:" in errors[0] and reason in errors[0], done.stderr
    assert "proot isolation cannot record in the layer" in errors[0], done.stderr


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
def test_proot_copy_from_key_sees_a_changed_owner(plain_user_dir: Path) -> None:
    # The source stage changes only an owner (recorded in an xattr): the COPY
    # --from must miss, giving the image a fresh cache gives.
    where = plain_user_dir
    assert _as_plain_user(where, ["load", str(where / "base.tar")]).returncode == 0
    dockerfile = "FROM lamina-test/busybox:1.35 AS a\nRUN echo x > /f && chown {0}:{0} /f\n" + (
        "FROM lamina-test/busybox:1.35\nCOPY --from=a /f /f\n"
    )
    digests = []
    for owner, cache in ((5, "cache"), (6, "cache"), (6, "fresh")):
        (where / "ctx/Dockerfile").write_text(dockerfile.format(owner))
        if cache == "fresh":
            shutil.rmtree(where / "cache")
            assert _as_plain_user(where, ["load", str(where / "base.tar")]).returncode == 0
        out = where / f"image-{owner}-{cache}.tar"
        done = _as_plain_user(
            where, ["build", "--progress", "quiet", "-o", f"type=oci,dest={out}", f"{where}/ctx"]
        )
        assert done.returncode == 0, done.stderr
        digests.append(_digest(out))
    assert digests[0] != digests[1]
    assert digests[1] == digests[2]


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
@pytest.mark.parametrize(
    "steps",
    [
        "RUN mkdir -p /app/sub && chown -R 5:6 /app && chmod 700 /app\nCOPY app.txt /app/sub/x\n",
        "RUN mkdir /data && chown 5:5 /data && ln -s data /l\n"
        "USER nobody\nRUN mkdir /tmp/n && echo x > /tmp/n/f\n",
        # cp -a and ls see the owners the layer will have (root's, not the caller's uid)
        "RUN mkdir /d /e && chown 7:8 /d && cp -a /etc/passwd /d /e/\n"
        "RUN ls -ln /e/passwd /e | cut -c1-30 > /owners\n",
    ],
    ids=["copy-into-chowned-dir", "user-nobody", "cp-a-and-ls"],
)
def test_proot_build_matches_the_host_build(
    plain_user_dir: Path, tmp_path: Path, busybox_image: Path, steps: str
) -> None:
    dockerfile = f"FROM lamina-test/busybox:1.35\n{steps}"
    host = _context(tmp_path / "host", busybox_image)
    (host / "ctx/Dockerfile").write_text(dockerfile)
    assert _lamina(host, ["load", str(host / "base.tar")]).returncode == 0
    done = _lamina(
        host, ["build", "--progress", "quiet", "-o", f"type=oci,dest={host}/image.tar", f"{host}/ctx"]
    )
    assert done.returncode == 0, done.stderr
    where = plain_user_dir
    (where / "ctx/Dockerfile").write_text(dockerfile)
    assert _as_plain_user(where, ["load", str(where / "base.tar")]).returncode == 0
    done = _as_plain_user(
        where, ["build", "--progress", "quiet", "-o", f"type=oci,dest={where}/image.tar", f"{where}/ctx"]
    )
    assert done.returncode == 0, done.stderr
    assert _digest(where / "image.tar") == _digest(host / "image.tar")


BASE = "lamina-test/busybox:1.35"


@needs_root
def test_api_build_takes_a_typed_isolation(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lamina
    from lamina.engine.sandbox.isolation import Isolation

    monkeypatch.delenv("LAMINA_ISOLATION", raising=False)
    where = _context(tmp_path / "w", busybox_image)
    (where / "ctx/Dockerfile").write_text(
        "FROM lamina-test/busybox:1.35\nRUN (test -e /proc/self && echo proc || echo no-proc) > /where\n"
    )
    cache = tmp_path / "cache"
    assert _lamina(where, ["load", str(where / "base.tar")]).returncode == 0
    for value, expected in ((Isolation.CHROOT, "no-proc"), ("userns", "proc")):
        out = tmp_path / f"out-{expected}"
        lamina.build(
            where / "ctx",
            cache_dir=where / "cache",
            output=f"type=local,dest={out}",
            isolation=value,
            no_cache=True,
        )
        assert (out / "where").read_text() == expected + "\n"
    with open(tmp_path / "run-out", "wb") as out:
        script = "test -e /proc/self && echo proc || echo no-proc"
        argv = ["sh", "-c", script]
        code = lamina.run(
            BASE, argv, cache_dir=where / "cache", isolation="chroot", stdout=out, network="host"
        )
    assert (code, (tmp_path / "run-out").read_text()) == (0, "no-proc\n")
    with pytest.raises(SandboxError, match="--isolation proot: is for a plain uid"):
        lamina.build(where / "ctx", cache_dir=cache, isolation="proot")
    with pytest.raises(SandboxError, match=r"isolation 'jail': expected auto\|userns"):
        lamina.build(where / "ctx", cache_dir=cache, isolation="jail")


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
def test_a_cache_keeps_owners_one_way(plain_user_dir: Path) -> None:
    # Layer dirs made with a user namespace hold owners on disk; proot's hold them in
    # xattrs. Reading a cache the other way would give wrong owners: one line instead.
    where = plain_user_dir
    user = ["runuser", "-u", PLAIN_USER, "--"]
    (where / "ctx/Dockerfile").write_text("FROM lamina-test/busybox:1.35\nRUN true\n")
    assert _lamina(where, ["load", str(where / "base.tar")], user).returncode == 0
    assert _lamina(where, ["build", "--progress", "quiet", f"{where}/ctx"], user).returncode == 0
    (where / "ctx/Dockerfile").write_text("FROM lamina-test/busybox:1.35\nRUN true\nRUN echo more\n")
    done = _lamina(
        where, ["build", "--progress", "quiet", f"{where}/ctx"], [*user, "env", "LAMINA_ISOLATION=proot"]
    )
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert "keeps layer owners on disk" in error and "use another cache" in error, done.stderr


def _archive_with_a_device(path: Path) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        node = tarfile.TarInfo("dev/null")
        node.type, node.devmajor, node.devminor, node.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(node)
        owned = tarfile.TarInfo("data/f")
        owned.uid, owned.gid, owned.size, owned.mode = 5, 6, 3, 0o640
        tar.addfile(owned, io.BytesIO(b"hi\n"))


@pytest.mark.skipif(bool(_plain_user_ready()), reason=_plain_user_ready() or "ready")
def test_proot_add_of_an_archive_keeps_devices_and_owners(
    plain_user_dir: Path, tmp_path: Path, busybox_image: Path
) -> None:
    dockerfile = "FROM lamina-test/busybox:1.35\nADD dev.tar /x/\n"
    host = _context(tmp_path / "host", busybox_image)
    digests = []
    for where, lamina_as in ((host, _lamina), (plain_user_dir, _as_plain_user)):
        (where / "ctx/Dockerfile").write_text(dockerfile)
        _archive_with_a_device(where / "ctx/dev.tar")
        os.chmod(where / "ctx/dev.tar", 0o644)
        assert lamina_as(where, ["load", str(where / "base.tar")]).returncode == 0
        done = lamina_as(
            where, ["build", "--progress", "quiet", "-o", f"type=oci,dest={where}/image.tar", f"{where}/ctx"]
        )
        assert done.returncode == 0, done.stderr
        digests.append(_digest(where / "image.tar"))
    assert digests[0] == digests[1]


@needs_root
def test_cli_isolation_proot_as_root_is_refused_before_the_build(tmp_path: Path) -> None:
    from tests.support.build import run_cli, write_context

    # No RUN step: the refusal must come from the option itself, not from a first RUN.
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY Dockerfile /\n")
    proc = run_cli("build", "--isolation", "proot", str(ctx), cache=tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "built " not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --isolation proot: is for a plain uid (uid 0 uses chroot)"
    ]
