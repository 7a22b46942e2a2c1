"""A RUN that makes a device node: the node lands in the layer, as BuildKit's as root makes it.

Every RUN runs in a user namespace, where the kernel refuses mknod of a char or block device
even to root. The sandbox's PID 1 answers mknod (a seccomp user notification, nothing else
is filtered) with a placeholder file (lamina.oci.recorded), which the layer writer turns back
into the node: root, rootless (a subordinate id range) and proot isolation give one image.
"""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, needs_id_range, run_cli, write_context
from tests.support.layers import image_layers
from tests.support.plainuser import plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}


def _makes_nodes(group: int) -> str:
    return (
        f"FROM {BASE}\n"
        f"RUN mknod /null2 c 1 3 && chmod 0600 /null2 && mknod -m 0640 /loop7 b 7 7 && chown 0:{group} /loop7"
        " && mkfifo /fifo && test -p /fifo\n"
    )


def _group() -> int:
    """A group to chown to: 6, or 0 where the sandbox maps one id (only root exists)."""
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    return 0 if detect_ids().mode is IdMode.SINGLE else 6


def _node(member: tarfile.TarInfo) -> tuple[str, int, int, int, int, int]:
    kind = "c" if member.ischr() else "b" if member.isblk() else "p" if member.isfifo() else "?"
    return kind, member.devmajor, member.devminor, member.mode, member.uid, member.gid


def test_run_mknod_puts_the_device_node_in_the_layer(cache: Path, tmp_path: Path) -> None:
    """mknod of a char and a block device, then chmod/chown of them in the same RUN: the
    layer holds the nodes with those modes and owners, no lamina record; a FIFO is the kernel's."""
    group = _group()
    ctx = write_context(tmp_path / "ctx", _makes_nodes(group))
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    layer = image_layers(archive)[-1]
    assert _node(layer[b"null2"]) == ("c", 1, 3, 0o600, 0, 0)
    assert _node(layer[b"loop7"]) == ("b", 7, 7, 0o640, 0, group)
    assert _node(layer[b"fifo"])[0] == "p"
    assert not any("lamina" in key for m in layer.values() for key in m.pax_headers)


def test_run_mknod_is_refused_as_the_kernel_would(cache: Path, tmp_path: Path) -> None:
    """An existing name gets EEXIST; a node on a --mount (not the layer) EPERM, as before; a
    node in /dev lands in /dev's tmpfs, out of the layer (BuildKit's /dev is a tmpfs too)."""
    ctx = write_context(
        tmp_path / "ctx",
        f"FROM {BASE}\n"
        "RUN mknod /made c 1 3 && ! mknod /made c 1 3 2>/tmp/err && grep -q exists /tmp/err && rm /tmp/err\n"
        "RUN --mount=type=tmpfs,target=/scratch ! mknod /scratch/x c 1 3\n"
        "RUN mknod /dev/extra c 1 3 && test -e /dev/extra\n",
    )
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    layers = image_layers(archive)[1:]  # above the base: empty layers are left out
    assert _node(layers[0][b"made"])[:3] == ("c", 1, 3)
    names = {name for layer in layers for name in layer}
    assert not {b"dev/extra", b"scratch/x"} & names, names


def test_run_mknod_as_a_user_is_refused(cache: Path, tmp_path: Path) -> None:
    """A USER without CAP_MKNOD gets EPERM, as from the kernel."""
    needs_id_range()
    ctx = write_context(
        tmp_path / "ctx",
        f"FROM {BASE}\nUSER 1000\n"
        "RUN ! mknod /tmp/mine c 1 3 2>/tmp/err && grep -q 'not permitted' /tmp/err && rm /tmp/err\n",
    )
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    assert not any(b"tmp/mine" in layer for layer in image_layers(archive))


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


def _changes_nodes(group: int) -> str:
    return f"FROM lamina-test/nodes:1\nRUN chmod 0600 /opt/zero && chown 0:{group} /opt/sda\n"


def _nodes_image(tmp_path: Path, dest: Path) -> None:
    """An OCI archive of lamina-test/nodes:1: busybox, and a layer with device nodes in /opt
    (out of /dev, which is a tmpfs in a step, as in BuildKit's)."""
    from lamina.cache.images import save_image
    from lamina.cache.store import Store
    from lamina.oci.entry import EntryType, LayerEntry
    from tests.support.layers import busybox_entries, commit_image_of

    nodes = [
        LayerEntry("opt", EntryType.DIR, 0o755, mtime=1_700_000_000),
        LayerEntry("opt/zero", EntryType.CHAR, 0o666, devmajor=1, devminor=5, mtime=1_700_000_000),
        LayerEntry("opt/sda", EntryType.BLOCK, 0o660, devmajor=8, devminor=0, mtime=1_700_000_000),
    ]
    with Store(tmp_path / "made") as store:
        commit_image_of(store, "lamina-test/nodes:1", [busybox_entries(tmp_path / "bb"), nodes])
        save_image(store, "lamina-test/nodes:1", dest)


def test_run_changes_an_inherited_device_node(tmp_path: Path) -> None:
    """chmod and chown of a base image's device nodes: the RUN's layer holds the nodes with
    the new mode and owner (overlayfs copies a node up by mknod, which a user namespace
    refuses: the base's nodes are unpacked as placeholders, which it copies up as files)."""
    _nodes_image(tmp_path, tmp_path / "nodes.tar")
    cache = tmp_path / "cache"
    run_cli("load", "-q", str(tmp_path / "nodes.tar"), cache=cache)
    group = _group()
    ctx = write_context(tmp_path / "ctx", _changes_nodes(group))
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    layer = image_layers(archive)[-1]
    assert _node(layer[b"opt/zero"]) == ("c", 1, 5, 0o600, 0, 0)
    assert _node(layer[b"opt/sda"]) == ("b", 8, 0, 0o660, 0, group)


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_rootless_and_proot_builds_make_and_change_nodes_as_root(tmp_path: Path, ranged: bool) -> None:
    """The same RUNs making and changing device nodes as root and as a plain user (a
    subordinate id range: user namespaces; none and no namespaces: proot isolation): the
    same image ID."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    root_cache = tmp_path / "root-cache"
    with plain_user("lamina-mknod-", ranged=ranged) as user:
        _nodes_image(tmp_path, user.base / "nodes.tar")
        ctx = write_context(user.base / "ctx", _changes_nodes(6) + _makes_nodes(6).split("\n", 1)[1])
        run_cli("load", "-q", str(user.base / "nodes.tar"), cache=root_cache)
        as_root = run_cli("build", "-q", str(ctx), cache=root_cache, env=EPOCH).stdout.split()[-1]
        user.give()
        loaded = user.lamina("load", "-q", str(user.base / "nodes.tar"))
        assert loaded.returncode == 0, loaded.stderr
        done = user.lamina("build", "-q", str(ctx), env=EPOCH)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == as_root
