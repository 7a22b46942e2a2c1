"""File metadata kept exactly in the exported image: hard links inside a layer, setuid/setgid/sticky
bits, names that are not UTF-8 or hold a newline, sparse files (not inflated on disk), nanosecond
PAX mtimes, FIFOs and device nodes (rootless too: recorded where mknod is refused). Extended
attributes and file capabilities are tests/test_xattrs.py."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, run_cli, write_context
from tests.support.layers import busybox_entries, commit_image_of, image_layers, layer_digests
from tests.support.plainuser import plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox


def _export(
    cache: Path, ctx: Path, tmp_path: Path, name: str = "image.tar"
) -> list[dict[bytes, tarfile.TarInfo]]:
    archive = tmp_path / name
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    return image_layers(archive)


def test_hard_links_stay_links_in_copy_copy_from_and_run(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM {BASE} AS build\n"
        "RUN mkdir /made && echo one > /made/a && ln /made/a /made/b\n"
        f"FROM {BASE}\n"
        "COPY linked /linked/\n"
        "COPY --from=build /made /made/\n"
        "RUN echo two > /ran && ln /ran /ran-too\n",
        {"linked/a": "shared\n"},
    )
    os.link(ctx / "linked/a", ctx / "linked/b")
    copied, from_stage, ran = _export(cache, ctx, tmp_path)[-3:]
    for layer, first, second in (
        (copied, b"linked/a", b"linked/b"),
        (from_stage, b"made/a", b"made/b"),
        (ran, b"ran", b"ran-too"),
    ):
        assert layer[first].isfile() and layer[first].size > 0, sorted(layer)
        assert layer[second].islnk() and layer[second].linkname == first.decode(), sorted(layer)


def test_setuid_setgid_and_sticky_bits_are_kept(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM {BASE}\nCOPY tool /tool\nCOPY shared /shared/\nRUN chmod 2755 /tool && mkdir -m 1777 /drop\n",
        {"tool": "#!/bin/sh\n", "shared/drop/f": "f"},
    )
    os.chmod(ctx / "tool", 0o4755)
    os.chmod(ctx / "shared/drop", 0o1777)
    copied, copied_dir, ran = _export(cache, ctx, tmp_path)[-3:]
    assert copied[b"tool"].mode == 0o4755
    assert copied_dir[b"shared/drop"].mode == 0o1777
    assert ran[b"tool"].mode == 0o2755
    assert ran[b"drop"].mode == 0o1777


def test_names_not_utf8_or_with_a_newline_are_kept_byte_for_byte(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM {BASE} AS build\n"
        "RUN mkdir /made && touch \"/made/$(printf 'a\\nb')\" \"/made/$(printf 'caf\\351')\"\n"
        f"FROM {BASE}\nCOPY names /names/\nRUN touch \"/ran-$(printf 'a\\nb')\" \"/ran-$(printf '\\377')\"\n"
        "COPY --from=build /made /from-stage/\n",
    )
    (ctx / "names").mkdir()
    (ctx / os.fsdecode(b"names/caf\xe9")).write_bytes(b"latin-1\n")
    (ctx / "names/two\nlines").write_bytes(b"newline\n")
    copied, ran, from_stage = _export(cache, ctx, tmp_path)[-3:]
    assert {b"names/caf\xe9", b"names/two\nlines"} <= copied.keys(), sorted(copied)
    assert copied[b"names/caf\xe9"].size == len(b"latin-1\n")
    assert {b"ran-a\nb", b"ran-\xff"} <= ran.keys(), sorted(ran)
    assert {b"from-stage/a\nb", b"from-stage/caf\xe9"} <= from_stage.keys(), sorted(from_stage)


def _allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_sparse_files_are_not_inflated(cache: Path, tmp_path: Path, busybox_image: Path) -> None:
    """A 64 MiB file of one byte and holes: the layer holds its 64 MiB (tar has no holes, gzip
    makes them small); copied from the context, copied from a stage and unpacked from the image,
    it stays sparse on disk."""
    from lamina.cache.images import load_image_file
    from lamina.cache.store import Store
    from tests.support.build import make_cache

    size = 64 << 20
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM {BASE} AS build\nRUN truncate -s 64M /made\n"
        f"FROM {BASE}\nCOPY sparse /sparse\nCOPY --from=build /made /from-stage\n",
    )
    with open(ctx / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"x")
    if _allocated(ctx / "sparse") >= size // 2:
        pytest.skip(f"the file system of {ctx} does not keep holes")
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive},name=lamina-test/sparse:1"])
    copied, from_stage = image_layers(archive)[-2:]
    assert copied[b"sparse"].size == size and from_stage[b"from-stage"].size == size
    # The COPY layers' directories in the cache: not inflated.
    for name in ("sparse", "from-stage"):
        copies = [p for p in (cache / "unpacked").glob(f"*/{name}") if p.stat().st_size == size]
        assert copies and all(_allocated(p) < size // 2 for p in copies), (name, copies)
    # Exported as a directory (type=local): not inflated.
    out = tmp_path / "out"
    build(cache, ctx, outputs=[f"type=local,dest={out}"])
    assert _allocated(out / "sparse") < size // 2 and _allocated(out / "from-stage") < size // 2
    # Loaded into a fresh cache and unpacked for a step: not inflated either.
    fresh = make_cache(tmp_path / "fresh", busybox_image)
    with Store(fresh) as store:
        load_image_file(store, archive, "lamina-test/sparse:1")
    ctx2 = tmp_path / "ctx2"
    write_context(ctx2, "FROM lamina-test/sparse:1\nRUN test -s /sparse\n")
    build(fresh, ctx2)
    unpacked = [p for p in (fresh / "unpacked").glob("*/sparse") if p.stat().st_size == size]
    assert unpacked and all(_allocated(p) < size // 2 for p in unpacked), unpacked


def test_pax_mtimes_are_restored_to_the_nanosecond(cache: Path, tmp_path: Path) -> None:
    """A layer or ADD archive with sub-second PAX mtimes unpacks with exactly them; a layer lamina
    writes keeps whole seconds, as BuildKit's differ (containerd's ChangeWriter) truncates them."""
    from lamina.oci.extract import extract_layer

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mtime in (("exact", "1700000000.123456789"), ("short", "1700000000.5"), ("old", "-1.25")):
            info = tarfile.TarInfo(name)
            info.size = 1
            info.pax_headers = {"mtime": mtime}
            tar.addfile(info, io.BytesIO(b"x"))
    layer = data.getvalue()
    extract_layer(io.BytesIO(layer), tmp_path / "root", ignore_owners=os.geteuid() != 0)
    times = {name: os.lstat(tmp_path / "root" / name).st_mtime_ns for name in ("exact", "short", "old")}
    assert times == {"exact": 1700000000123456789, "short": 1700000000500000000, "old": -1250000000}
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nADD times.tar /t/\nRUN stat -c %y /t/exact > /seen\n")
    (ctx / "times.tar").write_bytes(layer)
    added = _export(cache, ctx, tmp_path)[-2]
    assert added[b"t/exact"].mtime == 1700000000
    assert "mtime" not in added[b"t/exact"].pax_headers
    out = tmp_path / "out"
    build(cache, ctx, outputs=[f"type=local,dest={out}"])
    assert "22:13:20.123456789" in (out / "seen").read_text()
    assert os.lstat(out / "t/exact").st_mtime_ns == 1700000000123456789  # exported from the layer dir


def test_fifos_and_device_nodes_are_copied_from_stages_and_the_context(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    devices = os.geteuid() == 0  # a device node in the context needs root to make (and to copy)
    write_context(
        ctx,
        f"FROM {BASE} AS build\n"
        "RUN mkdir /made && mkfifo /made/pipe\n"
        + ("COPY null /made/null\n" if devices else "")
        + f"FROM {BASE}\n"
        "COPY --from=build /made /made/\n",
    )
    if devices:
        os.mknod(ctx / "null", 0o600 | 0o020000, os.makedev(1, 3))
        os.chmod(ctx / "null", 0o666)
    (layer,) = _export(cache, ctx, tmp_path)[-1:]
    assert layer[b"made/pipe"].isfifo() and layer[b"made/pipe"].mode == 0o644
    if devices:
        null = layer[b"made/null"]
        assert null.ischr() and (null.devmajor, null.devminor, null.mode) == (1, 3, 0o666)


def _node(path: str, kind: str, major: int, minor: int, mode: int, gid: int = 0) -> object:
    from lamina.oci.entry import EntryType, LayerEntry

    which = EntryType.CHAR if kind == "c" else EntryType.BLOCK
    return LayerEntry(path, which, mode, gid=gid, devmajor=major, devminor=minor, mtime=1_700_000_000)


def _dir(path: str) -> object:
    from lamina.oci.entry import EntryType, LayerEntry

    return LayerEntry(path, EntryType.DIR, 0o755, mtime=1_700_000_000)


def test_device_nodes_of_a_base_image_reach_stages_and_exports(cache: Path, tmp_path: Path) -> None:
    """A base image with /dev/null, a block device and a node outside /dev: rootless, mknod is
    refused, so the unpacked layer records them (lamina.oci.recorded) and every layer lamina
    writes holds the very device nodes a root build writes: COPY --from a stage (after a RUN),
    ADD of an archive holding one, and the type=tar export. type=local makes them as
    root; rootless it cannot, and says so in one line."""
    from lamina.cache.store import Store
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    devices = [
        _dir("dev"),
        _node("dev/null", "c", 1, 3, 0o666),
        _node("dev/sda", "b", 8, 0, 0o660, gid=6),
        _dir("opt"),
        _dir("opt/nodes"),
        _node("opt/nodes/zero", "c", 1, 5, 0o666),
    ]
    with Store(cache) as store:
        base_layers = commit_image_of(
            store, "lamina-test/devices:1", [busybox_entries(tmp_path / "bb"), devices]
        )  # type: ignore[list-item]
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        "FROM lamina-test/devices:1 AS base\n"
        "RUN test -e /opt/nodes/zero && touch /ran\n"
        f"FROM {BASE}\n"
        "COPY --from=base /dev/ /devs/\n"
        "COPY --from=base /opt/nodes/ /nodes/\n"
        "ADD nodes.tar /added/\n",
    )
    with tarfile.open(ctx / "nodes.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("tty")
        info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 5, 0, 0o620
        tar.addfile(info)
    group = 0 if detect_ids().mode is IdMode.SINGLE else 6  # one mapped id: only root exists

    def node(member: tarfile.TarInfo) -> tuple[str, int, int, int, int]:
        kind = "c" if member.ischr() else "b" if member.isblk() else member.type.decode()
        return kind, member.devmajor, member.devminor, member.mode, member.gid

    stage = tmp_path / "stage.tar"
    build(cache, ctx, target="base", outputs=[f"type=oci,dest={stage}"])
    assert layer_digests(stage)[:2] == base_layers  # the base's own blobs, byte for byte
    (ran,) = image_layers(stage)[-1:]
    assert sorted(ran) == [b"ran"]  # a RUN above the nodes leaves them as they were

    final = tmp_path / "final.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={final}"])
    devs, nodes, added = image_layers(final)[-3:]
    assert node(devs[b"devs/null"]) == ("c", 1, 3, 0o666, 0)
    assert node(devs[b"devs/sda"]) == ("b", 8, 0, 0o660, group)
    assert node(nodes[b"nodes/zero"]) == ("c", 1, 5, 0o666, 0)
    assert node(added[b"added/tty"]) == ("c", 5, 0, 0o620, 0)
    for layer in (devs, nodes, added):  # lamina's records never reach a layer
        assert not any("lamina" in key for m in layer.values() for key in m.pax_headers), layer

    rootfs_tar = tmp_path / "rootfs.tar"
    build(cache, ctx, outputs=[f"type=tar,dest={rootfs_tar}"])
    with tarfile.open(rootfs_tar) as tar:
        assert node(tar.getmember("devs/null")) == ("c", 1, 3, 0o666, 0)
        assert node(tar.getmember("devs/sda")) == ("b", 8, 0, 0o660, group)
        assert node(tar.getmember("added/tty")) == ("c", 5, 0, 0o620, 0)

    out = tmp_path / "out"
    done = run_cli("build", "-q", "-o", f"type=local,dest={out}", str(ctx), cache=cache)
    said = [line for line in done.stderr.splitlines() if "device nodes" in line]
    if os.geteuid() == 0:
        assert os.major((out / "devs/null").lstat().st_rdev) == 1 and not said
        assert (out / "nodes/zero").lstat().st_mode == 0o20666
    else:
        assert not os.path.lexists(out / "devs/null")  # never an empty file in its place
        assert said == [
            f"warning: --output type=local,dest={out}: device nodes not made (creating them needs root): "
            "4 files (first: /devs/null)"
        ], done.stderr


SPARSE = 8 << 20  # a file of zeros but its last byte: layers carry the zeros, disks need not
ODD_NAMES = (b"caf\xe9", b"two\nlines")


def _meta_entries(prefix: str) -> list[object]:
    """Setuid, setgid and sticky modes, a hard-linked pair, names that are not UTF-8 or hold a
    newline and a sparse file, under `prefix`, as layer entries."""
    from lamina.oci.entry import EntryType, LayerEntry

    def file(name: str, data: bytes, mode: int = 0o644) -> LayerEntry:
        return LayerEntry(
            f"{prefix}/{name}", EntryType.FILE, mode, size=len(data), open=lambda: io.BytesIO(data)
        )

    sparse = bytes(SPARSE - 1) + b"x"
    return [
        LayerEntry(prefix, EntryType.DIR, 0o755),
        file("tool", b"#!/bin/sh\n", 0o4755),
        file("wall", b"#!/bin/sh\n", 0o2755),
        LayerEntry(f"{prefix}/drop", EntryType.DIR, 0o1777),
        file("a", b"shared\n"),
        LayerEntry(f"{prefix}/b", EntryType.HARDLINK, 0o644, linkname=f"{prefix}/a"),
        *(file(os.fsdecode(name), name) for name in ODD_NAMES),
        LayerEntry(f"{prefix}/sparse", EntryType.FILE, 0o644, size=SPARSE, open=lambda: io.BytesIO(sparse)),
    ]


def _check_layer(layer: dict[bytes, tarfile.TarInfo], prefix: bytes) -> None:
    modes = {name: layer[prefix + b"/" + name].mode for name in (b"tool", b"wall", b"drop")}
    assert modes == {b"tool": 0o4755, b"wall": 0o2755, b"drop": 0o1777}, sorted(layer)
    first, second = layer[prefix + b"/a"], layer[prefix + b"/b"]
    assert first.isfile() and second.islnk() and os.fsencode(second.linkname) == prefix + b"/a"
    for name in ODD_NAMES:
        assert layer[prefix + b"/" + name].size == len(name)
    assert layer[prefix + b"/sparse"].size == SPARSE


def _check_tree(root: Path, prefix: str, holes: bool) -> None:
    here = root / prefix
    modes = {name: os.lstat(here / name).st_mode & 0o7777 for name in ("tool", "wall", "drop")}
    assert modes == {"tool": 0o4755, "wall": 0o2755, "drop": 0o1777}
    assert os.lstat(here / "a").st_ino == os.lstat(here / "b").st_ino  # still one file
    for name in ODD_NAMES:
        assert (here / os.fsdecode(name)).read_bytes() == name
    sparse = here / "sparse"
    assert sparse.stat().st_size == SPARSE
    if holes:
        assert _allocated(sparse) < SPARSE // 2, sparse


def test_metadata_of_a_base_image_and_an_added_archive_reach_layers_and_exports(
    cache: Path, tmp_path: Path
) -> None:
    """The same odd files in a base image's layer (unpacked, then COPY --from) and in an ADD
    archive: setuid/setgid/sticky modes, a hard link, non-UTF-8 and newline names and a sparse
    file are in the layers lamina writes as they came, and in a type=local export (linked,
    not inflated)."""
    from lamina.cache.store import Store
    from lamina.oci.layer import Compression, sorted_entries, write_layer

    with Store(cache) as store:
        commit_image_of(
            store, "lamina-test/meta:1", [busybox_entries(tmp_path / "bb"), _meta_entries("meta")]
        )  # type: ignore[list-item]
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        "FROM lamina-test/meta:1 AS base\n"
        "RUN ls /meta > /seen\n"
        f"FROM {BASE}\n"
        "COPY --from=base /meta/ /meta/\n"
        "ADD meta.tar /\n",
    )
    with open(ctx / "meta.tar", "wb") as f:
        write_layer(sorted_entries(_meta_entries("added")), f, Compression.NONE)  # type: ignore[arg-type]
    with open(tmp_path / "probe", "wb") as f:
        f.truncate(SPARSE)
    holes = _allocated(tmp_path / "probe") < SPARSE // 2

    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    copied, added = image_layers(archive)[-2:]
    _check_layer(copied, b"meta")
    _check_layer(added, b"added")
    if holes:  # the layer dirs in the cache: the base's, the COPY's, the ADD's
        for name in ("meta/sparse", "added/sparse"):
            found = [p for p in (cache / "unpacked").glob(f"*/{name}")]
            assert found and all(_allocated(p) < SPARSE // 2 for p in found), found

    out = tmp_path / "out"
    build(cache, ctx, outputs=[f"type=local,dest={out}"])
    _check_tree(out, "meta", holes)
    _check_tree(out, "added", holes)
    stage = tmp_path / "stage"
    build(cache, ctx, target="base", outputs=[f"type=local,dest={stage}"])
    _check_tree(stage, "meta", holes)
    assert (stage / "seen").read_bytes().split(b"\n")[0] == b"a"  # RUN saw the unpacked files


@pytest.mark.skipif(bool(plain_user_missing()), reason=plain_user_missing() or "ready")
def test_device_nodes_are_recorded_with_no_user_namespace(busybox_image: Path, tmp_path: Path) -> None:
    """A plain uid where no user namespace can be made (proot isolation): a base image's device
    nodes and their owners are recorded in xattrs and reach COPY --from's layer and a type=tar
    export as the devices; type=local says in one line it could not make them."""
    with plain_user("lamina-devices-proot-") as user:
        _devices_image(tmp_path, user.base / "devices.tar")
        shutil.copy(busybox_image, user.base / "base.tar")
        ctx = user.base / "ctx"
        write_context(
            ctx,
            "FROM lamina-test/devices:1 AS base\nRUN touch /ran\n"
            f"FROM {BASE}\nCOPY --from=base /dev/ /devs/\n",
        )
        user.give()
        for image in ("base.tar", "devices.tar"):
            loaded = user.lamina("load", str(user.base / image))
            assert loaded.returncode == 0, loaded.stderr
        archive = user.base / "image.tar"
        done = user.lamina("build", "--progress", "quiet", "-o", f"type=oci,dest={archive}", str(ctx))
        assert done.returncode == 0, done.stderr
        assert any("proot" in line for line in done.stderr.splitlines()), done.stderr
        (devs,) = image_layers(archive)[-1:]
        null, sda = devs[b"devs/null"], devs[b"devs/sda"]
        assert null.ischr() and (null.devmajor, null.devminor, null.mode, null.gid) == (1, 3, 0o666, 0)
        assert sda.isblk() and (sda.devmajor, sda.devminor, sda.mode, sda.gid) == (8, 0, 0o660, 6)
        assert not any("lamina" in key for m in devs.values() for key in m.pax_headers)
        rootfs_tar = user.base / "rootfs.tar"
        done = user.lamina("build", "--progress", "quiet", "-o", f"type=tar,dest={rootfs_tar}", str(ctx))
        assert done.returncode == 0, done.stderr
        with tarfile.open(rootfs_tar) as tar:
            sda = tar.getmember("devs/sda")
            assert sda.isblk() and (sda.devmajor, sda.devminor, sda.gid) == (8, 0, 6)
        out = user.base / "out"
        done = user.lamina("build", "--progress", "quiet", "-o", f"type=local,dest={out}", str(ctx))
        assert done.returncode == 0, done.stderr
        said = [line for line in done.stderr.splitlines() if "device nodes" in line]
        assert said == [
            f"warning: --output type=local,dest={out}: device nodes not made (creating them needs root): "
            "2 files (first: /devs/null)"
        ], done.stderr
        assert not os.path.lexists(out / "devs/null")


def test_type_tar_carries_the_image_owners(cache: Path, tmp_path: Path) -> None:
    """Every member of a type=tar export has the owner the image gives that path, rootless too
    (the merged tree there is all the caller's: the owners are kept aside), symlinks and FIFOs
    included."""
    from tests.support.build import image_entries, needs_id_range

    needs_id_range()
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM {BASE}\n"
        "RUN mkdir /d && echo x > /d/f && ln /d/f /d/hard && ln -s f /d/l && mkfifo /d/p && chown -R 5:6 /d"
        " && chown -h 7:8 /d/l\n",
    )
    archive, rootfs_tar = tmp_path / "image.tar", tmp_path / "rootfs.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}", f"type=tar,dest={rootfs_tar}"])
    wanted = {name: (m.uid, m.gid) for name, m in image_entries(archive).items()}
    with tarfile.open(rootfs_tar) as tar:
        found = {m.name.rstrip("/"): (m.uid, m.gid) for m in tar}
    assert {name: found[name] for name in ("d", "d/f", "d/hard", "d/l", "d/p")} == {
        "d": (5, 6),
        "d/f": (5, 6),
        "d/hard": (5, 6),
        "d/l": (7, 8),
        "d/p": (5, 6),
    }
    assert {name: owner for name, owner in found.items() if name in wanted} == wanted


def _devices_image(tmp_path: Path, dest: Path) -> Path:
    """An OCI archive of lamina-test/devices:1: busybox, and a layer of device nodes."""
    from lamina.cache.images import save_image
    from lamina.cache.store import Store

    with Store(tmp_path / "made") as store:
        devices = [_dir("dev"), _node("dev/null", "c", 1, 3, 0o666), _node("dev/sda", "b", 8, 0, 0o660, 6)]
        commit_image_of(store, "lamina-test/devices:1", [busybox_entries(tmp_path / "bb"), devices])  # type: ignore[list-item]
        save_image(store, "lamina-test/devices:1", dest)
    return dest


@pytest.mark.skipif(bool(plain_user_missing(ranged=True)), reason=plain_user_missing(ranged=True) or "ready")
def test_a_rootless_build_writes_device_nodes_byte_for_byte_as_root(
    busybox_image: Path, tmp_path: Path
) -> None:
    """The same build FROM an image with device nodes, COPY --from its /dev and ADD of an archive
    holding one, as root and as a user with a subordinate id range (mknod refused, the nodes
    recorded): the same image ID."""
    with plain_user("lamina-devices-rootless-", ranged=True) as user:
        _devices_image(tmp_path, user.base / "devices.tar")
        shutil.copy(busybox_image, user.base / "base.tar")
        ctx = user.base / "ctx"
        write_context(
            ctx,
            "FROM lamina-test/devices:1 AS base\nRUN touch /ran\n"
            f"FROM {BASE}\nCOPY --from=base /dev/ /devs/\nADD nodes.tar /added/\n",
        )
        with tarfile.open(ctx / "nodes.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("tty")
            info.type, info.devmajor, info.devminor, info.mode, info.gid = tarfile.CHRTYPE, 5, 0, 0o620, 5
            tar.addfile(info)
        epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
        root_cache = tmp_path / "root-cache"
        for image in ("base.tar", "devices.tar"):
            run_cli("load", "-q", str(user.base / image), cache=root_cache)
        as_root = run_cli("build", "-q", str(ctx), cache=root_cache, env=epoch).stdout.split()[-1]
        user.give()
        for image in ("base.tar", "devices.tar"):
            loaded = user.lamina("load", "-q", str(user.base / image))
            assert loaded.returncode == 0, loaded.stderr
        done = user.lamina("build", "-q", str(ctx), env=epoch)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == as_root


def test_a_layer_cannot_fake_a_device_node_through_lamina_records(cache: Path, tmp_path: Path) -> None:
    """`user.lamina.rdev` is lamina's own record: an image layer or an ADD archive that carries
    it on an empty file gets a plain empty file (the record dropped on unpack), never a device
    node in the layers lamina writes."""
    from lamina.cache.store import Store
    from lamina.oci.entry import EntryType, LayerEntry
    from lamina.oci.layer import Compression, write_layer

    record = (("user.lamina.rdev", b"b 8 0"),)
    fake = [_dir("x"), LayerEntry("x/fake", EntryType.FILE, 0o600, xattrs=record, open=lambda: io.BytesIO())]
    with Store(cache) as store:
        commit_image_of(store, "lamina-test/fake:1", [busybox_entries(tmp_path / "bb"), fake])  # type: ignore[list-item]
    ctx = tmp_path / "ctx"
    write_context(
        ctx,
        f"FROM lamina-test/fake:1 AS base\nFROM {BASE}\n"
        "COPY --from=base /x/fake /copied\nADD fake.tar /added/\n",
    )
    with open(ctx / "fake.tar", "wb") as f:
        write_layer(fake, f, Compression.NONE)  # type: ignore[arg-type]
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}", f"type=tar,dest={tmp_path / 'rootfs.tar'}"])
    copied, added = image_layers(archive)[-2:]
    for member in (copied[b"copied"], added[b"added/x/fake"]):
        assert member.isfile() and member.size == 0 and not member.pax_headers, member.pax_headers
    with tarfile.open(tmp_path / "rootfs.tar") as tar:
        assert tar.getmember("copied").isfile() and tar.getmember("added/x/fake").isfile()
