"""RUN of another platform's programs: how the sandbox emulates them, and its refusals.

lamina/engine/sandbox/emulation.py picks, per platform: the host's binfmt_misc handler
(registered with the F flag, as Debian's qemu-user-static registers it), else a
binfmt_misc of the sandbox's own user namespace holding Debian's rule (Linux 6.7), else
`proot -q` under proot isolation, else a one-line refusal with the remedy. The sandbox
tests run an arm64 busybox (Debian's busybox-static:arm64) each of those ways; they run
again as unprivileged users (tests/test_unprivileged.py), so emulation is tested rootless.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.engine.sandbox import Network, SandboxSpec, emulation, run
from lamina.engine.sandbox import remove_tree as sandbox_remove_tree
from lamina.errors import SandboxError
from lamina.oci.image import Platform, host_platform

ARM64 = Platform.parse("linux/arm64")
HOST = host_platform()


# --- which way, and the refusals (no sandbox) ------------------------------------------


def _handler_dir(tmp_path: Path, flags: str) -> Path:
    """A binfmt_misc directory as the kernel shows one with Debian's qemu-aarch64 entry."""
    directory = tmp_path / "binfmt_misc"
    directory.mkdir()
    (directory / "status").write_text("enabled\n")
    (directory / "qemu-aarch64").write_text(
        "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
        f"flags: {flags}\noffset 0\nmagic 7f454c460201010000000000000000000200b700\n"
        "mask ffffffffffffff00fffffffffffffffffeffffff\n"
    )
    return directory


@pytest.mark.skipif(platform.machine() != "x86_64", reason="arm64 is the foreign platform on x86_64")
def test_a_host_handler_with_the_fix_binary_flag_is_used(tmp_path: Path) -> None:
    handlers = emulation.host_handlers(_handler_dir(tmp_path, "PF"))
    found = emulation.emulator(ARM64, "userns", handlers)
    assert (found.how, found.interpreter) == ("binfmt", "/usr/libexec/qemu-binfmt/aarch64-binfmt-P")
    assert emulation.emulator(Platform.parse("linux/amd64"), "userns", handlers).how == "native"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="arm64 is the foreign platform on x86_64")
def test_a_handler_without_the_fix_binary_flag_is_refused_with_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulation, "private_rule", lambda _platform: None)
    handlers = emulation.host_handlers(_handler_dir(tmp_path, "P"))
    with pytest.raises(SandboxError, match=r"handler qemu-aarch64 lacks the F \(fix-binary\) flag"):
        emulation.emulator(ARM64, "userns", handlers)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="arm64 is the foreign platform on x86_64")
def test_nothing_to_emulate_with_fails_before_the_build_with_the_remedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(emulation, "host_handlers", lambda *a: ())
    monkeypatch.setattr(emulation, "private_rule", lambda _platform: None)
    emulation.check_platforms([HOST])  # the host's own: nothing to check
    with pytest.raises(SandboxError) as info:
        emulation.check_platforms([HOST, ARM64], "userns")
    assert str(info.value) == (
        f"cannot run linux/arm64 programs on this {HOST} host: no emulator (apt-get install qemu-user-static)"
    )
    # Installed but not registered, and chroot isolation cannot have a binfmt_misc of its own.
    monkeypatch.setattr(emulation, "private_rule", lambda _platform: (":x:M::a::/q:PF", "/q"))
    with pytest.raises(
        SandboxError, match="no binfmt_misc handler is registered and chroot isolation cannot"
    ):
        emulation.check_platforms([ARM64], "chroot")


def test_lamina_knows_the_elf_headers_debians_rules_match() -> None:
    """Each platform's ELF header (what the registered-handler check tests) is matched by
    the rule Debian's qemu-user-static ships for it, and by no other architecture's."""
    rules = sorted(emulation.RULES_DIR.glob("qemu-*.conf"))
    if not rules:
        pytest.skip("qemu-user-static is not installed (apt-get install qemu-user-static)")
    handlers = []
    for conf in rules:
        parts = conf.read_text().strip().split(":")
        magic, mask = (
            bytes(p, "ascii").decode("unicode_escape").encode("latin-1") for p in (parts[4], parts[5])
        )
        handlers.append(
            emulation.Handler(parts[1], True, parts[6], parts[7], int(parts[3] or 0), magic, mask)
        )
    for listed in emulation.LISTED:
        header = emulation.elf_header(listed)
        assert header is not None
        matched = [h.name for h in handlers if h.matches(header)]
        name = emulation.qemu_name(listed)
        if name in ("x86_64", "i386") and not matched:
            continue  # Debian registers no handler for the host's own architectures on amd64
        assert matched == [f"qemu-{name}"], (listed, matched)


def test_lamina_info_lists_the_platforms() -> None:
    from lamina import api

    lines = api.sandbox_info().lines()
    first = next(i for i, line in enumerate(lines) if line.startswith("platforms:"))
    listed = [line[17:] for line in lines[first:]]
    assert f"{HOST} (native)" in listed
    assert len(listed) == len(emulation.LISTED)  # one line each: native, emulated and how, or why not


# --- running an arm64 busybox -----------------------------------------------------------


@pytest.fixture(scope="module")
def arm64_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.busybox import make_busybox_rootfs
    from tests.support.multiplatform import arm64_busybox, why_no_arm64

    if platform.machine() != "x86_64":
        pytest.skip("arm64 is the foreign platform on x86_64 only")
    why = why_no_arm64()
    if why is not None:
        pytest.skip(why)
    return make_busybox_rootfs(tmp_path_factory.mktemp("arm64") / "rootfs", arm64_busybox())


@pytest.fixture(autouse=True)
def _remove_files_of_other_ids(tmp_path: Path) -> Iterator[None]:
    yield
    sandbox_remove_tree(tmp_path, keep_root=True)


def arm64_sh(root: Path, script: str, tmp_path: Path, **kw: object) -> tuple[int, str]:
    """Run `sh -c script` in the arm64 root, as a RUN of a linux/arm64 stage; (code, output)."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=("/bin/sh", "-c", script),
            lower_dirs=(root,),
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            scratch_dir=tmp_path / "scratch",
            network=Network.NONE,
            platform=ARM64,
            **kw,  # type: ignore[arg-type]
        )
        code = run(spec)
    return code, out.read_text()


# A shell that starts other programs: each child is an arm64 ELF too.
SCRIPT = "uname -m; /bin/busybox uname -m; ls /bin/busybox"


def _chosen_isolation() -> str:
    from lamina.engine.sandbox.isolation import choose, requested

    try:
        return choose(requested()).isolation.value
    except SandboxError as err:
        pytest.skip(str(err))


@pytest.mark.sandbox
def test_run_through_the_hosts_registered_handler(arm64_root: Path, tmp_path: Path) -> None:
    handler = emulation._host_handler(ARM64, emulation.host_handlers())
    if handler is None or "F" not in handler.flags:
        pytest.skip("no binfmt_misc handler for arm64 with the F flag (tests/support/binfmt.sh registers it)")
    assert emulation.emulator(ARM64, _chosen_isolation()).how == "binfmt"
    assert arm64_sh(arm64_root, SCRIPT, tmp_path) == (0, "aarch64\naarch64\n/bin/busybox\n")


@pytest.mark.sandbox
def test_run_through_the_sandboxs_own_binfmt_misc(
    arm64_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a host where root registered nothing: the rule goes into a binfmt_misc of the
    sandbox's own user namespace (the host's, registered or not, no longer answers there)."""
    if _chosen_isolation() != "userns":
        pytest.skip("a binfmt_misc of its own needs a user namespace")
    if emulation.private_rule(ARM64) is None:
        pytest.skip("qemu-user-static is not installed (apt-get install qemu-user-static)")
    if not emulation.private_binfmt_works():
        pytest.skip("Linux before 6.7 has one binfmt_misc for all")
    monkeypatch.setattr(emulation, "host_handlers", lambda *a: ())
    assert emulation.emulator(ARM64, "userns").how == "private"
    code, out = arm64_sh(arm64_root, SCRIPT + "; cat /proc/sys/fs/binfmt_misc/lamina-aarch64", tmp_path)
    assert code == 0, out
    assert out.startswith(
        "aarch64\naarch64\n/bin/busybox\nenabled\ninterpreter /usr/bin/qemu-aarch64-static\n"
    )
    # The step cannot change it: read-only once filled.
    code, out = arm64_sh(arm64_root, "echo -1 > /proc/sys/fs/binfmt_misc/lamina-aarch64", tmp_path)
    assert code != 0 and "Read-only file system" in out, out


@pytest.mark.unprivileged
def test_run_under_proot_through_qemu(
    arm64_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """proot isolation (a plain uid, no namespaces): proot -q, whether or not the host has a
    handler (proot's loader starts programs itself, so a registered one is never asked)."""
    from lamina.engine.sandbox.isolation import probe

    if os.geteuid() == 0:
        pytest.skip("proot isolation is for a plain uid (tests/test_unprivileged.py runs this as one)")
    if probe().proot is None:
        pytest.skip("proot is not installed (apt-get install proot)")
    if emulation.private_rule(ARM64) is None:
        pytest.skip("qemu-user-static is not installed (apt-get install qemu-user-static)")
    monkeypatch.setenv("LAMINA_ISOLATION", "proot")  # for the whole process, as --isolation sets it
    out = tmp_path / "out"
    with open(out, "wb") as f:
        spec = SandboxSpec(
            argv=("/bin/sh", "-c", SCRIPT),
            lower_dirs=(arm64_root,),
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            scratch_dir=tmp_path / "scratch",
            network=Network.HOST,
            platform=ARM64,
        )
        code = run(spec)
    assert (code, out.read_text()) == (0, "aarch64\naarch64\n/bin/busybox\n")
