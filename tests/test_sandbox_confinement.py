"""A step is held at least as tightly as runc's default spec holds a BuildKit RUN.

The attacks of issue "Sandbox escape and secret leak", each as a step would
try it: write host sysctls, read the builder's environment through PID 1,
reach the host's loopback, and the defence in depth around them (seccomp,
the capability bounding set, runc's masked and read-only paths, default
signal dispositions). Marked `sandbox`: tests/test_unprivileged.py runs
them again as unprivileged users, with and without subordinate ids.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.engine.sandbox import (
    BindMount,
    IdMode,
    Network,
    PublishedPort,
    SandboxSpec,
    Started,
    detect_ids,
    network,
    remove_tree,
    run,
)
from lamina.errors import SandboxError
from tests.support.busybox import BUSYBOX, make_busybox_rootfs

pytestmark = pytest.mark.sandbox

if not BUSYBOX.exists():
    pytest.skip(f"{BUSYBOX} is missing (apt-get install busybox-static)", allow_module_level=True)
if subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode != 0:
    pytest.skip("user namespaces are not available here", allow_module_level=True)

needs_slirp = pytest.mark.skipif(bool(network.unavailable()), reason=network.unavailable())

# runc's default spec (what Docker and BuildKit give a RUN), kept here as data:
# the module under test has its own copy, and the two must agree with runc, not with each other.
RUNC_MASKED = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
RUNC_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DOCKER_CAPS = 0xA80425FB  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_busybox_rootfs(tmp_path_factory.mktemp("confine") / "rootfs")
    with open(root / "etc/passwd", "a") as f:
        f.write("app:x:1000:1000:app:/:/bin/sh\n")
    return root


@pytest.fixture(autouse=True)
def _remove_files_of_other_ids(tmp_path: Path) -> Iterator[None]:
    yield
    remove_tree(tmp_path, keep_root=True)


def run_in(rootfs: Path, tmp_path: Path, argv: tuple[str, ...], **kw: object) -> tuple[int, str]:
    out = tmp_path / f"out-{time.monotonic_ns()}"
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=argv,
            lower_dirs=(rootfs,),
            stdout=f,
            stderr=f,
            scratch_dir=tmp_path / "scratch",
            **kw,  # type: ignore[arg-type]
        )
        code = run(spec)
    return code, out.read_text(errors="replace")


def sh(rootfs: Path, tmp_path: Path, script: str, **kw: object) -> tuple[int, str]:
    kw.setdefault("network", Network.NONE)
    return run_in(rootfs, tmp_path, ("/bin/sh", "-c", script), **kw)


def status(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


# --- host kernel interfaces ----------------------------------------------------


def test_host_sysctls_are_not_writable(rootfs: Path, tmp_path: Path) -> None:
    # As root the step's root is the host's uid 0: only a read-only /proc/sys stops
    # `echo '|/layer/prog' > core_pattern`, a program of the Dockerfile's run as host root.
    paths = ["/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sys/kernel/hostname"]
    paths += [p for p in ("/proc/sysrq-trigger",) if os.path.exists(p)]  # not on every kernel
    for path in paths:
        _, out = sh(rootfs, tmp_path, f"( exec 3>>{path} ) && echo WRITABLE")
        assert "WRITABLE" not in out, path
        assert "Read-only file system" in out or "Permission denied" in out, (path, out)


def test_readonly_paths_are_runc_s(rootfs: Path, tmp_path: Path) -> None:
    _, out = sh(rootfs, tmp_path, "cat /proc/self/mountinfo")
    options = {}
    for line in out.splitlines():
        fields = line.split()
        options[fields[4]] = fields[5].split(",")
    for path in RUNC_READONLY:
        if os.path.exists(path):
            assert "ro" in options.get(path, []), f"{path} is not a read-only mount: {options.get(path)}"


def test_masked_paths_show_nothing(rootfs: Path, tmp_path: Path) -> None:
    present = [p for p in RUNC_MASKED if os.path.exists(p)]
    assert "/proc/keys" in present and "/proc/timer_list" in present  # this kernel has both
    script = "".join(
        f"if [ -d {p} ]; then ls -A {p}; touch {p}/x 2>/dev/null && echo W; else cat {p}; fi; echo =; "
        for p in present
    )
    _, out = sh(rootfs, tmp_path, script)
    # Each empty: a directory under a read-only tmpfs, a file under /dev/null (as runc does).
    assert out.split() == ["="] * len(present)


# --- nothing of the builder --------------------------------------------------------


def test_builder_environment_and_arguments_are_not_readable(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = "lamina-marker-" + "7" * 12
    monkeypatch.setenv("LAMINA_CI_TOKEN", marker)
    script = (
        "env; echo =1; cat /proc/1/environ; echo =2; tr '\\0' ' ' < /proc/1/cmdline; echo =3; "
        "for p in /proc/[0-9]*; do cat $p/environ $p/cmdline; done 2>/dev/null; "
        "grep -a -r -l lamina-marker- /proc/1/ 2>/dev/null | head -3"
    )
    _, out = sh(rootfs, tmp_path, script, env=(("STEP", "own"),))
    assert marker not in out
    assert "LAMINA_CI_TOKEN" not in out
    assert "helper.py" not in out and "python" not in out  # PID 1's arguments are blanked
    assert "STEP=own" in out  # the step's own environment is there
    environ_of_pid1 = out.split("=1\n", 1)[1].split("=2\n", 1)[0]
    assert "Permission denied" in environ_of_pid1 or not environ_of_pid1.strip()


def test_only_standard_streams_are_open(rootfs: Path, tmp_path: Path) -> None:
    # The exec form: no shell in between, the process lamina starts looks at itself.
    code, out = run_in(rootfs, tmp_path, ("/bin/ls", "/proc/self/fd"), network=Network.NONE)
    assert (code, out.split()) == (0, ["0", "1", "2", "3"])  # 3: ls's own directory handle


def test_signals_and_umask_as_runc_starts_a_process(rootfs: Path, tmp_path: Path) -> None:
    code, out = run_in(rootfs, tmp_path, ("/bin/grep", "-E", "^(Sig|Umask)", "/proc/self/status"))
    fields = status(out)
    assert code == 0
    assert fields["SigIgn"] == "0000000000000000"  # Python ignores SIGPIPE and SIGXFSZ
    assert fields["SigBlk"] == "0000000000000000"
    assert fields["Umask"] == "0022"


def test_a_pipe_into_head_finishes(rootfs: Path, tmp_path: Path) -> None:
    script = "timeout 20 sh -c '(while true; do echo x; done) | head -1'; yes abcdefgh | head -c 100 | wc -c"
    started = time.monotonic()
    code, out = sh(rootfs, tmp_path, script)
    assert (code, out.split()) == (0, ["x", "100"])
    assert time.monotonic() - started < 15  # SIGPIPE ends the producer at once, not the timeout


# --- capabilities and seccomp ------------------------------------------------------


def test_capabilities_are_docker_s_fourteen(rootfs: Path, tmp_path: Path) -> None:
    _, out = run_in(rootfs, tmp_path, ("/bin/grep", "^Cap", "/proc/self/status"))
    fields = status(out)
    assert int(fields["CapBnd"], 16) == DOCKER_CAPS
    assert int(fields["CapEff"], 16) == DOCKER_CAPS  # root keeps exactly the bounding set
    if detect_ids().mode is IdMode.SINGLE:
        return  # only root exists in the sandbox: no other user to switch to
    _, out = run_in(rootfs, tmp_path, ("/bin/grep", "^Cap", "/proc/self/status"), user="app")
    fields = status(out)
    assert int(fields["CapBnd"], 16) == DOCKER_CAPS
    assert int(fields["CapEff"], 16) == 0


def test_seccomp_filter_refuses_what_docker_s_profile_refuses(rootfs: Path, tmp_path: Path) -> None:
    _, out = run_in(rootfs, tmp_path, ("/bin/grep", "-E", "^(Seccomp|NoNewPrivs)", "/proc/self/status"))
    fields = status(out)
    assert fields["Seccomp"] == "2"
    assert fields["NoNewPrivs"] == "0"  # as Docker: setuid programs keep working
    # unshare -U needs no capability at all: only the filter stops it.
    for attempt in ("unshare -U true", "unshare -m true", "linux32 -R true"):
        code, out = sh(rootfs, tmp_path, attempt)
        assert code != 0, attempt
        assert "Operation not permitted" in out, (attempt, out)
    code, out = sh(rootfs, tmp_path, "linux32 true && echo personality-ok")
    assert "personality-ok" in out  # PER_LINUX32 is one Docker allows


def test_a_device_node_made_is_never_the_device(rootfs: Path, tmp_path: Path) -> None:
    """mknod is answered with a placeholder the layer turns into the node (tests/test_run_mknod.py),
    never the device itself: not one byte of the disk is read through it."""
    script = "mknod /tmp/sda b 8 0 && test ! -b /tmp/sda && head -c 1 /tmp/sda | wc -c"
    code, out = sh(rootfs, tmp_path, script)
    assert code == 0, out
    assert out.split()[-1] == "0"


def test_insecure_lifts_the_filter_and_the_bounding_set(rootfs: Path, tmp_path: Path) -> None:
    argv = ("/bin/grep", "-E", "^(Seccomp|CapBnd)", "/proc/self/status")
    _, out = run_in(rootfs, tmp_path, argv, insecure=True, network=Network.NONE)
    fields = status(out)
    assert fields["Seccomp"] == "0"
    assert int(fields["CapBnd"], 16) & ~DOCKER_CAPS  # CAP_SYS_ADMIN and the rest
    script = "grep -c -E ' /proc/(keys|sys) ' /proc/self/mountinfo"
    _, out = sh(rootfs, tmp_path, script)
    assert out.strip() == "2"  # masked and read-only by default ...
    _, out = sh(rootfs, tmp_path, script, insecure=True)
    assert out.strip() == "0"  # ... and neither with insecure


# --- the default network -----------------------------------------------------------


class _Listener:
    """A TCP server on the host that records whether anyone connected."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.sendall(b"hello-from-host\n")
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def host_loopback_server() -> Iterator[_Listener]:
    server = _Listener("127.0.0.1")
    yield server
    server.close()


def test_default_network_cannot_reach_host_loopback(
    rootfs: Path, tmp_path: Path, host_loopback_server: _Listener
) -> None:
    port = host_loopback_server.port
    script = f"for a in 127.0.0.1 10.0.2.2; do nc -w 2 $a {port} < /dev/null; done; echo done"
    _, out = sh(rootfs, tmp_path, script, network=Network.DEFAULT)
    assert "hello-from-host" not in out
    assert host_loopback_server.connections == 0
    assert out.strip().endswith("done")


@needs_slirp
def test_host_network_is_the_opt_in_that_reaches_it(
    rootfs: Path, tmp_path: Path, host_loopback_server: _Listener
) -> None:
    script = f"nc -w 2 127.0.0.1 {host_loopback_server.port} < /dev/null"
    _, out = sh(rootfs, tmp_path, script, network=Network.HOST)
    assert "hello-from-host" in out


def _host_address() -> str | None:
    """An address of this host outside loopback (no packet is sent), or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@needs_slirp
def test_default_network_has_outbound_access(rootfs: Path, tmp_path: Path) -> None:
    address = _host_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to serve on")
    server = _Listener(address)
    try:
        script = f"ip route; cat /etc/hosts; nc -w 5 {address} {server.port} < /dev/null"
        _, out = sh(rootfs, tmp_path, script, network=Network.DEFAULT)
    finally:
        server.close()
    assert "default via 10.0.2.2" in out
    assert "127.0.0.1\tlocalhost" in out
    assert "hello-from-host" in out  # an ordinary outbound connection, made by slirp4netns for the step


def test_without_slirp_the_default_network_is_isolated_and_says_so(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "_TUN", str(tmp_path / "no-tun-device"))
    warnings: list[str] = []
    out = tmp_path / "out"
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=("/bin/sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"),
            lower_dirs=(rootfs,),
            stdout=f,
            stderr=f,
            scratch_dir=tmp_path / "scratch",
        )
        assert run(spec, on_warning=warnings.append) == 0
    assert out.read_text().split() == ["lo"]
    said = [w for w in warnings if "network" in w]  # not the single-id map's own warning
    assert len(said) == 1 and "no-tun-device" in said[0] and "--network=none" in said[0]


@pytest.mark.parametrize("user", ["²", "99999999999", "app:²"])
def test_user_that_is_not_a_number_is_a_name(rootfs: Path, tmp_path: Path, user: str) -> None:
    # `²`.isdigit() is True in Python; runc reads ASCII digits only, so these are names, not found.
    with pytest.raises(SandboxError, match=r"unable to find (user|group)"):
        run_in(rootfs, tmp_path, ("/bin/true",), user=user, network=Network.NONE)


@needs_slirp
def test_published_port_reaches_the_command_and_stop_ends_it(
    rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where slirp4netns's API dir is made
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    host_port = probe.getsockname()[1]
    probe.close()
    (tmp_path / "www").mkdir()
    (tmp_path / "www/index.html").write_text("served-from-the-sandbox\n")
    started: list[Started] = []
    spec = SandboxSpec(
        argv=("/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"),
        lower_dirs=(rootfs,),
        mounts=(BindMount(tmp_path / "www", "/www"),),
        publish=(PublishedPort(host_port, 8080),),
        scratch_dir=tmp_path / "scratch",
    )
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(run(spec, on_started=started.append)))
    runner.start()
    body = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and b"served-from-the-sandbox" not in body:
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=2) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                body = b"".join(iter(lambda: conn.recv(4096), b""))
        except OSError:
            time.sleep(0.05)
    assert len(started) == 1
    # Its API dir went once the port was forwarded: a lamina killed while serving leaves none.
    assert list(scratch.glob("lamina-slirp-*")) == []
    started[0].stop()
    runner.join(10)
    assert not runner.is_alive() and codes  # stopped: the run returned
    assert b"served-from-the-sandbox" in body


def test_publishing_needs_the_default_network(rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="needs the default network"):
        run_in(rootfs, tmp_path, ("/bin/true",), network=Network.NONE, publish=(PublishedPort(1, 2),))
