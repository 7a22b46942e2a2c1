"""The rootless sandbox: what a command inside sees, and what it cannot reach.

Every test here needs user namespaces (`-m sandbox`); tests/test_unprivileged.py
runs them again as an unprivileged user with and without subordinate ids.
Each runs under both snapshotters (LAMINA_SNAPSHOTTER=overlay|copy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.engine.sandbox import (
    BindMount,
    CacheMount,
    IdMode,
    Network,
    SandboxSpec,
    SecretMount,
    TmpfsMount,
    detect_ids,
    remove_tree,
    run,
    set_owners,
)
from lamina.engine.sandbox import remove_tree as sandbox_remove_tree
from lamina.engine.snapshot import capture
from lamina.errors import SandboxError
from tests.support.busybox import BUSYBOX
from tests.support.sandbox import make_rootfs, userns_available

pytestmark = pytest.mark.sandbox

if not BUSYBOX.exists():
    pytest.skip(f"{BUSYBOX} is missing (apt-get install busybox-static)", allow_module_level=True)
if not userns_available():
    pytest.skip("user namespaces are not available here", allow_module_level=True)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("sandbox") / "rootfs")


@pytest.fixture(params=["overlay", "copy"], autouse=True)
def snapshotter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LAMINA_SNAPSHOTTER", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _remove_files_of_other_ids(tmp_path: Path) -> Iterator[None]:
    # Files a sandbox chowned to subordinate ids: pytest could not delete them.
    yield
    sandbox_remove_tree(tmp_path, keep_root=True)


def sh(rootfs: Path, script: str, tmp_path: Path, **kw: object) -> tuple[int, str]:
    """Run `sh -c script` over `rootfs`; (exit code, stdout+stderr)."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=("/bin/sh", "-c", script),
            lower_dirs=kw.pop("lower_dirs", (rootfs,)),  # type: ignore[arg-type]
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            scratch_dir=tmp_path / "scratch",
            **kw,  # type: ignore[arg-type]
        )
        code = run(spec)
    return code, out.read_text()


def test_command_sees_image_files_and_its_exit_code(rootfs: Path, tmp_path: Path) -> None:
    code, out = sh(rootfs, "cat /etc/marker; exit 7", tmp_path)
    assert (code, out) == (7, "from the image\n")


def test_command_is_in_its_own_pid_namespace(rootfs: Path, tmp_path: Path) -> None:
    code, out = sh(rootfs, "echo $$; ls /proc | grep -c '^[0-9]'", tmp_path)
    shell_pid, processes = out.split()
    assert code == 0
    assert shell_pid == "2"  # PID 1 is the sandbox's init
    assert int(processes) <= 4  # init, sh, ls, grep: nothing of the host


def test_hostname_env_workdir(rootfs: Path, tmp_path: Path) -> None:
    code, out = sh(
        rootfs,
        'hostname; echo "$GREETING"; pwd; echo "$PATH"',
        tmp_path,
        hostname="box1",
        env=(("GREETING", "hello world"),),
        cwd="/work/here",
    )
    assert code == 0, out
    assert out.splitlines() == [
        "box1",
        "hello world",
        "/work/here",  # created because it was missing
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]


def test_user_by_name_gets_its_groups_and_home(rootfs: Path, tmp_path: Path) -> None:
    if detect_ids().mode is IdMode.SINGLE:
        with pytest.raises(SandboxError, match="not mapped"):
            sh(rootfs, "id", tmp_path, user="app")
        return
    script = "id -u; id -g; id -G; echo $HOME; grep Groups: /proc/self/status"
    code, out = sh(rootfs, script, tmp_path, user="app")
    assert code == 0, out
    # As current BuildKit: the primary group, then the memberships.
    assert out.split("\n")[:5] == ["1000", "1000", "1000 2000", "/home/app", "Groups:\t1000 2000 "]


def test_user_additional_gids(rootfs: Path, tmp_path: Path) -> None:
    """BuildKit's testUserAdditionalGids: the primary gid is among the supplementary ones; no USER is root
    with root's memberships; a spec with a group gets that group alone."""
    if detect_ids().mode is IdMode.SINGLE:
        pytest.skip("a single-id map cannot set groups")
    for user, want in (("", "0 10"), ("app:app", "1000"), ("4321", "0"), ("4321:5678", "5678")):
        code, out = sh(rootfs, "grep Groups: /proc/self/status", tmp_path, user=user)
        assert (code, out.split()) == (0, ["Groups:", *want.split()]), user


def test_numeric_user_and_group(rootfs: Path, tmp_path: Path) -> None:
    if detect_ids().mode is IdMode.SINGLE:
        pytest.skip("a single-id map has only root")
    code, out = sh(rootfs, "id -u; id -g", tmp_path, user="4321:5678")
    assert (code, out.split()) == (0, ["4321", "5678"])


def test_unknown_user_is_a_clear_error(rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="unable to find user ghost: no matching entries in passwd file"):
        sh(rootfs, "true", tmp_path, user="ghost")


def test_missing_command_is_a_clear_error(rootfs: Path, tmp_path: Path) -> None:
    spec = SandboxSpec(argv=("no-such-tool",), lower_dirs=(rootfs,), scratch_dir=tmp_path)
    with pytest.raises(SandboxError, match='exec "no-such-tool": executable file not found in'):
        run(spec)


def test_host_paths_are_not_visible(rootfs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host data\n")
    checkout = Path(__file__).resolve().parent.parent
    cache = os.environ.get("LAMINA_CACHE", str(Path.home() / ".cache/lamina"))
    probes = [str(secret), str(checkout / "pyproject.toml"), "/root/.bashrc", "/etc/shadow", cache]
    script = "".join(f"cat {p} /proc/1/root{p} 2>/dev/null && echo LEAK {p}; " for p in probes)
    # The image's /home and /root are empty; the host's must not show through.
    script += "ls -A /home /root; ls /proc/1/root/ >/dev/null 2>&1 || echo PID1-ROOT-DENIED; "
    script += f"mkdir -p {tmp_path}/made-inside; echo x > {secret}"
    code, out = sh(rootfs, script, tmp_path)
    assert "LEAK" not in out and "host data" not in out
    # PID 1 is not dumpable: without CAP_SYS_PTRACE its /proc entries are closed.
    assert out.split() == ["/home:", "/root:", "PID1-ROOT-DENIED"]
    assert not (tmp_path / "made-inside").exists()
    assert secret.read_text() == "host data\n"
    assert code == 0


def test_network_none_has_only_loopback_up(rootfs: Path, tmp_path: Path) -> None:
    script = (
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1; ip link show lo | head -1; "
        "ip route; echo end-of-routes; echo | nc 192.0.2.1 80 2>&1"
    )
    code, out = sh(rootfs, script, tmp_path, network=Network.NONE)
    lines = out.splitlines()
    assert lines[0].strip() == "lo"
    assert "UP" in lines[1]
    assert lines[2] == "end-of-routes"  # no route at all
    assert "unreachable" in out.lower()
    assert code != 0


def test_host_network_sees_host_resolv_conf(rootfs: Path, tmp_path: Path) -> None:
    host = Path("/etc/resolv.conf")
    if not host.is_file():
        pytest.skip("the host has no /etc/resolv.conf")
    script = "cat /etc/resolv.conf; echo x >> /etc/resolv.conf && echo WROTE"
    _, out = sh(rootfs, script, tmp_path, network=Network.HOST)
    assert out.startswith(host.read_text())
    assert "WROTE" not in out  # bound read-only


def test_mounts_bind_tmpfs_secret_cache(rootfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "in.txt").write_text("bound\n")
    rw = tmp_path / "rw"
    rw.mkdir()
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    cache = tmp_path / "cache" / "pip"
    upper = tmp_path / "upper"
    script = textwrap.dedent(
        """
        cat /src/in.txt
        touch /src/nope 2>/dev/null || echo ro-ok
        echo out > /rw/out.txt
        echo scratch > /scratch/t && grep -c tmpfs /proc/mounts >/dev/null && echo tmpfs-ok
        cat /run/secrets/token; stat -c %a /run/secrets/token
        echo cached >> /var/cache/pip/log
        """
    )
    mounts = (
        BindMount(src, "/src"),
        BindMount(rw, "/rw", readonly=False),
        TmpfsMount("/scratch"),
        SecretMount("token", secret),
        CacheMount(cache, "/var/cache/pip"),
    )
    code, out = sh(rootfs, script, tmp_path, mounts=mounts, upper_dir=upper)
    assert code == 0, out
    assert out.split() == ["bound", "ro-ok", "tmpfs-ok", "s3cret", "400"]
    assert (rw / "out.txt").read_text() == "out\n"
    assert not (src / "nope").exists()
    assert (cache / "log").read_text() == "cached\n"
    # Mount points never reach the layer; neither does anything under them.
    paths = {e.path for e in capture(upper, detect_ids())}
    assert paths == set(), paths
    code, out = sh(rootfs, "cat /var/cache/pip/log", tmp_path, mounts=(CacheMount(cache, "/var/cache/pip"),))
    assert out == "cached\n"


def test_bind_with_discarded_writes(rootfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "ctx"
    src.mkdir()
    (src / "f").write_text("orig\n")
    mount = BindMount(src, "/ctx", readonly=False, discard_writes=True)
    code, out = sh(rootfs, "echo changed > /ctx/f; echo new > /ctx/g; cat /ctx/f", tmp_path, mounts=(mount,))
    assert (code, out) == (0, "changed\n")
    assert (src / "f").read_text() == "orig\n"
    assert not (src / "g").exists()


def test_mount_target_symlink_cannot_escape_root(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "evil")
    os.symlink("/../../../../" + str(tmp_path / "outside"), root / "data/link")
    (tmp_path / "outside").mkdir()
    code, out = sh(root, "ls /data/link/", tmp_path, mounts=(TmpfsMount("/data/link/t"),))
    assert code == 0, out
    assert list((tmp_path / "outside").iterdir()) == []


def test_no_process_outlives_the_sandbox(rootfs: Path, tmp_path: Path) -> None:
    # Unique durations: other test runs (other users, other sessions) may share the machine.
    a, b = _unique_seconds(), _unique_seconds()
    code, _ = sh(rootfs, f"sleep {a} & sleep {b} & echo started", tmp_path)
    assert code == 0
    assert _processes_with(f"sleep {a}") == _processes_with(f"sleep {b}") == []


def test_interrupt_stops_everything_and_cleans_up(rootfs: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    a, b = _unique_seconds(), _unique_seconds()
    program = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from lamina.engine.sandbox import SandboxSpec, run
        spec = SandboxSpec(argv=("/bin/sh", "-c", "sleep {a} & sleep {b}; echo done"),
                           lower_dirs=(Path({str(rootfs)!r}),), scratch_dir=Path({str(scratch)!r}))
        try:
            run(spec)
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not _processes_with(f"sleep {b}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(f"sleep {b}"), "the sandboxed command never started"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert b"done" not in proc.stdout.read()  # type: ignore[union-attr]
    assert _processes_with(f"sleep {a}") == _processes_with(f"sleep {b}") == []
    assert list(scratch.iterdir()) == []


def test_scratch_dirs_are_removed(rootfs: Path, tmp_path: Path) -> None:
    code, out = sh(rootfs, "mkdir -p /x/y; chmod 000 /x; echo done", tmp_path)
    assert code == 0, out
    assert list((tmp_path / "scratch").iterdir()) == []


def _unique_seconds() -> int:
    return 100_000 + int.from_bytes(os.urandom(3), "big")


def _processes_with(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and "python" not in cmdline:
            found.append(int(pid))
    return found


def test_set_owners_shows_container_ids_inside(rootfs: Path, tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "srv").mkdir(parents=True)
    (layer / "srv/app.conf").write_text("x\n")
    set_owners([(layer / "srv", 1000, 2000), (layer / "srv/app.conf", 1000, 2000)])
    out_file = tmp_path / "out"
    with open(out_file, "wb") as f:
        spec = SandboxSpec(
            argv=("stat", "-c", "%u:%g", "/srv", "/srv/app.conf"), lower_dirs=(layer, rootfs), stdout=f
        )
        code = run(spec)
    out = out_file.read_text()
    single = detect_ids().mode is IdMode.SINGLE
    assert (code, out.split()) == (0, ["0:0", "0:0"] if single else ["1000:2000", "1000:2000"])


def test_remove_tree_removes_files_of_other_ids(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    script = "mkdir -p /x/y && echo s > /x/y/f && chmod 600 /x/y/f && chmod 500 /x/y"
    if detect_ids().mode is not IdMode.SINGLE:
        script += " && chown -R 1000:1000 /x"
    code, out = sh(rootfs, script, tmp_path, upper_dir=upper)
    assert code == 0, out
    remove_tree(upper)
    assert not upper.exists()


def test_apt_runs_as_root_without_subordinate_ids(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "debianish")
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    upper = tmp_path / "upper"
    code, out = sh(root, "cat /etc/apt/apt.conf.d/* 2>/dev/null; echo end", tmp_path, upper_dir=upper)
    assert code == 0
    if detect_ids().mode is IdMode.SINGLE:
        assert out == 'APT::Sandbox::User "root";\nend\n'
    else:
        assert out == "end\n"
    assert list(capture(upper, detect_ids())) == []  # the setting never reaches a layer


def test_fresh_cache_mount_gets_its_owner_and_mode(rootfs: Path, tmp_path: Path) -> None:
    cache = tmp_path / "caches" / "c1"
    mount = CacheMount(cache, "/cache", uid=1000, gid=1000, mode=0o700)
    code, out = sh(rootfs, "stat -c '%u:%g %a' /cache", tmp_path, mounts=(mount,))
    single = detect_ids().mode is IdMode.SINGLE
    assert (code, out) == (0, "0:0 700\n" if single else "1000:1000 700\n")


def test_root_dir_keeps_the_image_mode_over_a_private_upper_dir(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir(mode=0o700)  # as mkdtemp makes it
    user = "" if detect_ids().mode is IdMode.SINGLE else "app"
    code, out = sh(rootfs, "stat -c %a /; cat /etc/marker", tmp_path, upper_dir=upper, user=user)
    assert (code, out) == (0, "755\nfrom the image\n")


def test_non_empty_upper_dir_is_refused_and_kept(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "precious").write_text("keep me\n")
    with pytest.raises(SandboxError, match="is not empty"):
        sh(rootfs, "true", tmp_path, upper_dir=upper)
    assert (upper / "precious").read_text() == "keep me\n"


@pytest.mark.parametrize("network", [Network.HOST, Network.NONE])
def test_sys_is_read_only(rootfs: Path, tmp_path: Path, network: Network) -> None:
    script = "for f in /sys/x /sys/kernel/x /sys/fs/cgroup/x; do touch $f 2>/dev/null && echo WROTE $f; done"
    script += "; grep ' /sys' /proc/self/mountinfo | grep -v ' ro,' ; ls /sys/class/net 2>/dev/null"
    _, out = sh(rootfs, script, tmp_path, network=network)
    assert "WROTE" not in out
    if network is Network.NONE:
        assert out.split() == ["lo"]  # a sysfs of its own network namespace
    else:
        assert not [line for line in out.splitlines() if " /sys" in line]  # every /sys mount is ro


def test_a_stack_of_many_layers_with_long_paths(rootfs: Path, tmp_path: Path) -> None:
    # Their overlay options exceed one page: the sandbox sets them one by one.
    layers = []
    for i in range(120):
        layer = tmp_path / "layers" / (f"{i:03d}-" + "x" * 60)
        (layer / "stack").mkdir(parents=True)
        (layer / "stack" / f"f{i:03d}").write_text(f"{i}\n")
        layers.append(layer)
    script = "ls /stack | wc -l; cat /stack/f000 /stack/f119"
    code, out = sh(rootfs, script, tmp_path, lower_dirs=(*layers, rootfs))
    assert (code, out.split()) == (0, ["120", "0", "119"])


def test_a_steps_fsync_does_not_wait_for_the_disk(rootfs: Path, tmp_path: Path, snapshotter: str) -> None:
    # overlayfs `volatile`: an apt-get step's dpkg fsyncs every file it unpacks, and a step's
    # upper dir is never fsynced as a layer anyway; waiting for the disk made such steps 2-3x slower.
    if snapshotter != "overlay":
        pytest.skip("the copy snapshotter's root is a copied directory, not an overlay mount")
    code, out = sh(rootfs, "grep '^overlay / ' /proc/mounts", tmp_path)
    assert code == 0, out
    options = out.split()[3].split(",")
    assert "volatile" in options or "fsync=volatile" in options, out  # the spelling of older kernels, of 6.x
