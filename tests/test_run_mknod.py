"""A RUN that makes a device node: the node lands in the layer, as BuildKit's as root makes it.

Every RUN runs in a user namespace, where the kernel refuses mknod of a char or block device
even to root. The sandbox's PID 1 answers mknod (a seccomp user notification, nothing else
is filtered) with a placeholder file (lamina.oci.recorded), which the layer writer turns back
into the node: root, rootless (a subordinate id range) and proot isolation give one image.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, run_cli, write_context
from tests.support.layers import image_layers
from tests.support.plainuser import plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}
MAKES_NODES = (
    f"FROM {BASE}\n"
    "RUN mknod /null2 c 1 3 && chmod 0600 /null2 && mknod -m 0640 /loop7 b 7 7 && chown 0:6 /loop7"
    " && mkfifo /fifo && test -p /fifo\n"
)


def _node(member: tarfile.TarInfo) -> tuple[str, int, int, int, int, int]:
    kind = "c" if member.ischr() else "b" if member.isblk() else "p" if member.isfifo() else "?"
    return kind, member.devmajor, member.devminor, member.mode, member.uid, member.gid


def test_run_mknod_puts_the_device_node_in_the_layer(cache: Path, tmp_path: Path) -> None:
    """mknod of a char and a block device, then chmod/chown of them in the same RUN: the
    layer holds the nodes with those modes and owners, no lamina record; a FIFO is the kernel's."""
    ctx = write_context(tmp_path / "ctx", MAKES_NODES)
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    layer = image_layers(archive)[-1]
    assert _node(layer[b"null2"]) == ("c", 1, 3, 0o600, 0, 0)
    assert _node(layer[b"loop7"]) == ("b", 7, 7, 0o640, 0, 6)
    assert _node(layer[b"fifo"])[0] == "p"
    assert not any("lamina" in key for m in layer.values() for key in m.pax_headers)


def test_run_mknod_is_refused_as_the_kernel_would(cache: Path, tmp_path: Path) -> None:
    """A USER without CAP_MKNOD gets EPERM; an existing name EEXIST; a node on a --mount (not
    the layer) EPERM, as before; a node in /dev lands in /dev's tmpfs, out of the layer
    (BuildKit's /dev is a tmpfs too)."""
    ctx = write_context(
        tmp_path / "ctx",
        f"FROM {BASE}\n"
        "RUN mknod /made c 1 3 && ! mknod /made c 1 3 2>/tmp/err && grep -q exists /tmp/err && rm /tmp/err\n"
        "RUN --mount=type=tmpfs,target=/scratch ! mknod /scratch/x c 1 3\n"
        "RUN mknod /dev/extra c 1 3 && test -e /dev/extra\n"
        "USER 1000\n"
        "RUN ! mknod /tmp/mine c 1 3 2>/tmp/err && grep -q 'not permitted' /tmp/err && rm /tmp/err\n",
    )
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    layers = image_layers(archive)[1:]  # above the base: empty layers are left out
    assert _node(layers[0][b"made"])[:3] == ("c", 1, 3)
    names = {name for layer in layers for name in layer}
    assert not {b"dev/extra", b"scratch/x", b"tmp/mine"} & names, names


def test_run_cannot_change_the_hosts_device_nodes(cache: Path, tmp_path: Path) -> None:
    """/dev/null and friends are the host's nodes bound in: as root (mapped to the host's root)
    a step could chmod, chown or touch them for the whole host. They are bound read-only:
    such a change fails, reading and writing them works."""
    before = Path("/dev/null").stat()
    ctx = write_context(
        tmp_path / "ctx",
        f"FROM {BASE}\n"
        "RUN echo x > /dev/null && : > /dev/null && test $(head -c 3 /dev/zero | wc -c) = 3"
        " && ! chmod 0666 /dev/null && ! chown 0:0 /dev/zero && ! touch /dev/null\n",
    )
    build(cache, ctx)
    after = Path("/dev/null").stat()
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
        before.st_mode,
        before.st_uid,
        before.st_mtime_ns,
    )
    assert stat.S_ISCHR(after.st_mode)


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_rootless_and_proot_builds_make_the_same_nodes_as_root(
    busybox_image: Path, tmp_path: Path, ranged: bool
) -> None:
    """The same mknod RUN as root and as a plain user (a subordinate id range: user namespaces;
    none and no namespaces: proot isolation): the same image ID."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    root_cache = tmp_path / "root-cache"
    with plain_user("lamina-mknod-", ranged=ranged) as user:
        shutil.copy(busybox_image, user.base / "base.tar")
        ctx = write_context(user.base / "ctx", MAKES_NODES)
        run_cli("load", "-q", str(user.base / "base.tar"), cache=root_cache)
        as_root = run_cli("build", "-q", str(ctx), cache=root_cache, env=EPOCH).stdout.split()[-1]
        user.give()
        loaded = user.lamina("load", "-q", str(user.base / "base.tar"))
        assert loaded.returncode == 0, loaded.stderr
        done = user.lamina("build", "-q", str(ctx), env=EPOCH)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == as_root
