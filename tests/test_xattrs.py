"""Extended attributes through every path: COPY, COPY --from, ADD of an archive, RUN, base unpack.

An image carries xattrs as PAX `SCHILY.xattr.NAME` records, as BuildKit and
containerd write them. The issue's case first: `setcap cap_net_raw+ep` on a
copy of busybox in a build stage, `COPY --from` into the final stage, and
the capability is in the final layer (and, as root, `getcap` shows it).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lamina.oci import xattrs
from tests.support.build import BASE, build, rootfs, run_cli, write_context
from tests.support.layers import image_layers, needs_user_xattrs, pax_xattrs, top_layer
from tests.support.plainuser import plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox

# cap_net_raw+ep as `setcap` stores it: v2, effective, permitted bit 13.
NET_RAW_V2 = bytes.fromhex("01000002" + "00200000" + "00000000" + "00000000" + "00000000")


def _setcap_bundle(dest: Path) -> None:
    """The host's setcap with its libraries and loader, to run in a busybox stage."""
    setcap = shutil.which("setcap") or shutil.which("setcap", path="/usr/sbin:/sbin")
    if setcap is None or shutil.which("ldd") is None:
        pytest.skip("setcap (libcap2-bin) or ldd is not installed")
    dest.mkdir(parents=True)
    shutil.copy(setcap, dest / "setcap")
    out = subprocess.run(["ldd", setcap], capture_output=True, text=True, check=True).stdout
    loader = None
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            shutil.copy(os.path.realpath(path), dest / os.path.basename(path))
            if "ld-linux" in path:
                loader = os.path.basename(path)
    if loader is None:
        pytest.skip("setcap's dynamic loader was not found by ldd")
    (dest / "loader").write_text(loader)


def _recorded_mode() -> bool:
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    return detect_ids().mode is IdMode.RECORDED


def test_setcap_in_a_build_stage_survives_copy_from(cache: Path, tmp_path: Path) -> None:
    if _recorded_mode():
        pytest.skip("no user namespace: a RUN step cannot set a file capability (no CAP_SETFCAP)")
    ctx = tmp_path / "ctx"
    _setcap_bundle(ctx / "sc")
    loader = (ctx / "sc" / "loader").read_text()
    write_context(
        ctx,
        f"FROM {BASE} AS build\n"
        "COPY sc /sc\n"
        f"RUN cp /bin/busybox /ping && /sc/{loader} --library-path /sc /sc/setcap cap_net_raw+ep /ping\n"
        f"FROM {BASE}\n"
        "COPY --from=build /ping /usr/local/bin/ping\n",
    )
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    member = top_layer(archive)["usr/local/bin/ping"]
    assert pax_xattrs(member) == {"security.capability": NET_RAW_V2}
    assert oct(member.mode) == "0o755"
    # The root filesystem as one tar (type=tar) carries it too.
    rootfs_tar = tmp_path / "rootfs.tar"
    build(cache, ctx, outputs=[f"type=tar,dest={rootfs_tar}"])
    with tarfile.open(rootfs_tar) as tar:
        assert pax_xattrs(tar.getmember("usr/local/bin/ping")) == {"security.capability": NET_RAW_V2}
    if os.geteuid() == 0:
        getcap = shutil.which("getcap") or shutil.which("getcap", path="/usr/sbin:/sbin")
        assert getcap is not None
        out = tmp_path / "out"
        rootfs(cache, ctx, out)
        shown = subprocess.run([getcap, str(out / "usr/local/bin/ping")], capture_output=True, text=True)
        assert "cap_net_raw=ep" in shown.stdout, shown


def test_context_file_user_xattr_is_copied_and_keys_the_step(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nCOPY tagged /tagged\n", {"tagged": "data\n"})
    needs_user_xattrs(ctx)
    os.setxattr(ctx / "tagged", "user.origin", b"first")
    archive = tmp_path / "one.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    assert pax_xattrs(top_layer(archive)["tagged"]) == {"user.origin": b"first"}
    # Only the xattr changes: the COPY is not a cache hit of the old one.
    os.setxattr(ctx / "tagged", "user.origin", b"second")
    archive2 = tmp_path / "two.tar"
    result = build(cache, ctx, outputs=[f"type=oci,dest={archive2}"])
    assert not result.steps[-1].cached
    assert pax_xattrs(top_layer(archive2)["tagged"]) == {"user.origin": b"second"}


def test_add_of_an_archive_keeps_its_xattrs(cache: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nADD files.tar /unpacked/\n")
    needs_user_xattrs(ctx)
    with tarfile.open(ctx / "files.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("tool")
        info.size, info.mode, info.mtime = 4, 0o755, 1_700_000_000
        info.pax_headers = {"SCHILY.xattr.user.kind": "tool"}
        tar.addfile(info, io.BytesIO(b"abc\n"))
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    assert pax_xattrs(top_layer(archive)["unpacked/tool"]) == {"user.kind": b"tool"}


def test_base_image_xattrs_round_trip_through_unpack_and_run(
    cache: Path, tmp_path: Path, busybox_image: Path
) -> None:
    """A pulled/loaded image's xattrs are restored on unpack: a RUN that copies the file up keeps them."""
    from lamina.cache.images import load_image_file
    from lamina.cache.store import Store
    from tests.support.build import make_cache

    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nADD files.tar /\n")
    needs_user_xattrs(ctx)
    with tarfile.open(ctx / "files.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("tagged")
        info.size, info.mode = 5, 0o755
        info.pax_headers = {
            "SCHILY.xattr.user.origin": "base",
            "SCHILY.xattr.security.capability": NET_RAW_V2.decode("utf-8", "surrogateescape"),
        }
        tar.addfile(info, io.BytesIO(b"data\n"))
    archive = tmp_path / "base.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive},name=lamina-test/tagged:1"])
    fresh = make_cache(tmp_path / "fresh", busybox_image)
    with Store(fresh) as store:
        load_image_file(store, archive, "lamina-test/tagged:1")
    ctx2 = tmp_path / "ctx2"
    write_context(ctx2, "FROM lamina-test/tagged:1\nRUN chmod 4711 /tagged\n")
    archive2 = tmp_path / "run.tar"
    build(fresh, ctx2, outputs=[f"type=oci,dest={archive2}"])
    member = top_layer(archive2)["tagged"]
    assert pax_xattrs(member) == {"security.capability": NET_RAW_V2, "user.origin": b"base"}
    assert member.mode == 0o4711


def test_lamina_records_never_reach_a_layer(tmp_path: Path) -> None:
    """What a plain uid could not set is kept as user.lamina.xattr.NAME and leaves as NAME."""
    from lamina.engine.snapshot import capture

    upper = tmp_path / "upper"
    upper.mkdir()
    needs_user_xattrs(upper)
    (upper / "ping").write_bytes(b"x")
    os.setxattr(upper / "ping", xattrs.RECORDED_PREFIX + "security.capability", NET_RAW_V2)
    os.setxattr(upper / "ping", "user.lamina.owner", b"5:6")
    os.setxattr(upper / "ping", "user.keep", b"1")
    (entry,) = capture(upper)
    assert entry.xattrs == (("security.capability", NET_RAW_V2), ("user.keep", b"1"))
    assert (entry.uid, entry.gid) == (5, 6)


def test_write_records_what_cannot_be_set(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"")
    needs_user_xattrs(tmp_path)
    xattrs.write(str(target), [("security.capability", NET_RAW_V2), ("user.a", b"1")])
    if os.geteuid() == 0:
        assert os.getxattr(target, "security.capability") == NET_RAW_V2
    else:  # a plain uid has no CAP_SETFCAP
        assert os.getxattr(target, xattrs.RECORDED_PREFIX + "security.capability") == NET_RAW_V2
    assert xattrs.read(str(target)) == (("security.capability", NET_RAW_V2), ("user.a", b"1"))


def test_namespaced_capability_reads_as_v2() -> None:
    v3 = bytes.fromhex("01000003") + NET_RAW_V2[4:] + (100000).to_bytes(4, "little")
    assert xattrs.as_v2(v3) == NET_RAW_V2
    assert xattrs.as_v2(NET_RAW_V2) == NET_RAW_V2
    recorded_label = (xattrs.RECORDED_PREFIX + "security.selinux", b"host_t")
    assert xattrs.from_disk([("security.capability", v3), ("user.overlay.opaque", b"y"), recorded_label]) == (
        ("security.capability", NET_RAW_V2),
    )


def test_unpack_keeps_capabilities_and_drops_lamina_records_from_a_layer(tmp_path: Path) -> None:
    """A layer's file capability is restored (recorded where a plain uid cannot set it); a layer's
    own `user.lamina.*` xattrs are dropped: they would fake the owners lamina records."""
    from lamina.oci.extract import extract_layer

    needs_user_xattrs(tmp_path)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("ping")
        info.size, info.mode = 1, 0o755
        info.pax_headers = {
            "SCHILY.xattr.security.capability": NET_RAW_V2.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.lamina.owner": "7:7",
        }
        tar.addfile(info, io.BytesIO(b"x"))
    data.seek(0)
    result = extract_layer(data, tmp_path / "root", record_owners=True)
    path = str(tmp_path / "root" / "ping")
    assert xattrs.read(path) == (("security.capability", NET_RAW_V2),)
    assert "user.lamina.owner" not in os.listxattr(path)
    assert any("lamina's own xattrs" in warning for warning in result.warnings)


@pytest.mark.skipif(bool(plain_user_missing()), reason=plain_user_missing() or "ready")
def test_capability_survives_proot_isolation_as_a_plain_user(busybox_image: Path) -> None:
    """No user namespace (docker's seccomp denials, a plain uid): the capability cannot be set
    on disk, so it is recorded, and the image still has it, with none of lamina's records."""
    with plain_user("lamina-xattr-proot-") as user:
        ctx = user.base / "ctx"
        write_context(
            ctx,
            f"FROM {BASE} AS build\nCOPY ping /ping\nRUN chmod 750 /ping\n"
            f"FROM {BASE}\nCOPY --from=build /ping /usr/local/bin/ping\n",
        )
        shutil.copy("/bin/busybox", ctx / "ping")
        shutil.copy(busybox_image, user.base / "base.tar")
        user.give()
        os.setxattr(ctx / "ping", "security.capability", NET_RAW_V2)  # after chown, which clears it
        loaded = user.lamina("load", str(user.base / "base.tar"))
        assert loaded.returncode == 0, loaded.stderr
        archive = user.base / "image.tar"
        done = user.lamina("build", "--progress", "quiet", "-o", f"type=oci,dest={archive}", str(ctx))
        assert done.returncode == 0, done.stderr
        assert any("proot" in line for line in done.stderr.splitlines()), done.stderr
        member = top_layer(archive)["usr/local/bin/ping"]
        assert pax_xattrs(member) == {"security.capability": NET_RAW_V2}
        assert member.mode == 0o750
        # Exported as a directory: no user namespace to set it in, so one line says so.
        out = user.base / "out"
        done = user.lamina("build", "--progress", "quiet", "-o", f"type=local,dest={out}", str(ctx))
        assert done.returncode == 0, done.stderr
        said = [line for line in done.stderr.splitlines() if "capabilit" in line]
        assert said == [
            f"warning: --output type=local,dest={out}: file capabilities (security.capability) not kept: "
            "1 file (first: /usr/local/bin/ping): no user namespace to set them in"
        ], done.stderr
        assert (out / "usr/local/bin/ping").read_bytes() == (ctx / "ping").read_bytes()
        for layer in image_layers(archive):
            for found in layer.values():
                assert not any("user.lamina" in key for key in found.pax_headers), found.name


def test_add_chown_of_an_archive_keeps_setuid_and_capabilities(cache: Path, tmp_path: Path) -> None:
    """chown clears setuid/setgid and security.capability; BuildKit chowns while unpacking, so an
    archive's privileged binary stays privileged under ADD --chown."""
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nADD --chown=5:6 files.tar /u/\n")
    needs_user_xattrs(ctx)
    with tarfile.open(ctx / "files.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, records in (
            (
                "ping",
                0o755,
                {"SCHILY.xattr.security.capability": NET_RAW_V2.decode("utf-8", "surrogateescape")},
            ),
            ("su", 0o4755, {}),
            ("wall", 0o2755, {}),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.pax_headers = 1, mode, records
            tar.addfile(info, io.BytesIO(b"x"))
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    layer = top_layer(archive)
    assert pax_xattrs(layer["u/ping"]) == {"security.capability": NET_RAW_V2}
    modes = {name: layer[f"u/{name}"].mode for name in ("ping", "su", "wall")}
    assert modes == {"ping": 0o755, "su": 0o4755, "wall": 0o2755}
    # With a single-id map only root exists in the sandbox (IdMap.warning says so).
    owner = 0 if detect_ids().mode is IdMode.SINGLE else 5
    assert {layer[f"u/{name}"].uid for name in modes} == {owner}


def test_a_context_file_cannot_pass_for_lamina_records(cache: Path, tmp_path: Path) -> None:
    """`user.lamina.*` is lamina's: on a build-context file it is nobody's record, so it is not
    copied (it would become a file capability or an owner in the image)."""
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nCOPY f /f\n", {"f": "x"})
    needs_user_xattrs(ctx)
    os.setxattr(ctx / "f", xattrs.RECORDED_PREFIX + "security.capability", NET_RAW_V2)
    os.setxattr(ctx / "f", "user.lamina.owner", b"5:5")
    os.setxattr(ctx / "f", "user.kept", b"1")
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    member = top_layer(archive)["f"]
    assert pax_xattrs(member) == {"user.kept": b"1"}
    assert (member.uid, member.gid) == (0, 0)


def test_a_copied_directory_keeps_its_xattrs(cache: Path, tmp_path: Path) -> None:
    """The directories below a copied directory keep their xattrs (the destination itself is
    made as BuildKit's MkdirAll makes it: mode 0755, the --chown owner, no source metadata)."""
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nCOPY app /opt/app/\n", {"app/sub/f": "x"})
    needs_user_xattrs(ctx)
    os.setxattr(ctx / "app/sub", "user.sub", b"2")
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    assert pax_xattrs(top_layer(archive)["opt/app/sub"]) == {"user.sub": b"2"}


def _capability_archive(path: Path) -> None:
    """A tar holding `ping` with cap_net_raw+ep and a user xattr, as an image layer carries them."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("ping")
        info.size, info.mode = 1, 0o755
        info.pax_headers = {
            "SCHILY.xattr.security.capability": NET_RAW_V2.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.kind": "tool",
            "SCHILY.xattr.trusted.origin": "layer",
        }
        tar.addfile(info, io.BytesIO(b"x"))


def test_a_type_local_export_keeps_file_capabilities(cache: Path, tmp_path: Path) -> None:
    """As root the exported file has the capability as the image does (v2). Rootless, a plain
    uid may not set one, so lamina sets it inside a user namespace whose root is the caller:
    the kernel keeps it as v3 naming the caller (it works in that user's rootless containers),
    and nothing is said of it, as nothing was lost; an xattr no namespace's root may set
    (trusted.*) is named in one line."""
    ctx = tmp_path / "ctx"
    write_context(ctx, f"FROM {BASE}\nADD files.tar /bin/\n")
    needs_user_xattrs(ctx)
    _capability_archive(ctx / "files.tar")
    out = tmp_path / "out"
    done = run_cli("build", "-q", "-o", f"type=local,dest={out}", str(ctx), cache=cache)
    assert "capabilit" not in done.stderr, done.stderr
    found = os.getxattr(out / "bin/ping", "security.capability")
    kept = [("security.capability", NET_RAW_V2), ("user.kind", b"tool")]
    if os.geteuid() == 0:
        assert found == NET_RAW_V2
        kept.insert(1, ("trusted.origin", b"layer"))
    else:
        rootid = os.geteuid().to_bytes(4, "little")
        assert found == bytes.fromhex("01000003") + NET_RAW_V2[4:] + rootid, found.hex()
        # trusted.* needs root in the first user namespace: not kept, and said in one line.
        said = [line for line in done.stderr.splitlines() if "trusted.origin" in line]
        assert said == [
            f"warning: --output type=local,dest={out}: xattr trusted.origin not kept (setting it needs "
            "root): 1 file (first: /bin/ping)"
        ], done.stderr
    assert xattrs.read(str(out / "bin/ping")) == tuple(kept)
    assert os.stat(out / "bin/ping").st_mode & 0o7777 == 0o755
