"""File metadata kept exactly in the exported image: hard links inside a layer, setuid/setgid/sticky
bits, names that are not UTF-8 or hold a newline, and sparse files (not inflated on disk)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, write_context

pytestmark = pytest.mark.sandbox


def _layers(archive: Path) -> list[dict[bytes, tarfile.TarInfo]]:
    """Each layer's entries, by raw name, of the image in an OCI archive (bottom first)."""
    with tarfile.open(archive) as outer:

        def blob(digest: str) -> bytes:
            member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert member is not None
            return member.read()

        index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        found = []
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"])), errors="surrogateescape") as tar:
                found.append({os.fsencode(m.name): m for m in tar})
        return found


def _export(
    cache: Path, ctx: Path, tmp_path: Path, name: str = "image.tar"
) -> list[dict[bytes, tarfile.TarInfo]]:
    archive = tmp_path / name
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    return _layers(archive)


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
    copied, from_stage = _layers(archive)[-2:]
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
