"""A RUN cannot forge lamina's own records (`user.lamina.*`, lamina.oci.recorded).

Any process may set `user.*` xattrs on a file it may write. lamina turns its
records into a file's owner, device type and privileged xattrs when it writes
a layer, so a step running as USER 1000 (an untrusted package install) could
otherwise put a root-owned setuid binary, a block device or file capabilities
into the image, which BuildKit never allows. Each forgery fails the build with
one line naming the Dockerfile line and the path, as root, rootless (user
namespaces with a subordinate id range) and under proot isolation; records
lamina itself makes (RUN mknod, chown under proot, a lower layer's) still work.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, needs_id_range, write_context
from tests.support.layers import image_layers
from tests.support.plainuser import PlainUser, plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox

needs_x86_64 = pytest.mark.skipif(
    os.uname().machine != "x86_64", reason="the test's setxattr program is x86_64 machine code"
)

# setxattr(argv[1], argv[2], argv[3], strlen(argv[3]), 0); exit(result != 0): x86_64, no libc.
# busybox has no setfattr, and the base image has nothing else that sets an xattr.
_CODE = bytes.fromhex(
    "488b7c2410"  # mov rdi, [rsp+16]   path
    "488b742418"  # mov rsi, [rsp+24]   name
    "488b542420"  # mov rdx, [rsp+32]   value
    "4d31d2"  # xor r10, r10        size
    "42803c1200"  # cmp byte [rdx+r10], 0
    "7405"  # je +5
    "49ffc2"  # inc r10
    "ebf4"  # jmp back to the cmp
    "4531c0"  # xor r8d, r8d        flags
    "b8bc000000"  # mov eax, 188 (setxattr)
    "0f05"  # syscall
    "4885c0"  # test rax, rax
    "400f95c7"  # setne dil
    "400fb6ff"  # movzx edi, dil
    "b83c000000"  # mov eax, 60 (exit)
    "0f05"  # syscall
)


# n = getxattr(argv[1], argv[3], buf, 256); setxattr(argv[2], argv[3], buf, n, 0): what `cp -a`
# (coreutils, --preserve=all) does with each xattr of a file it copies.
_COPY_CODE = bytes.fromhex(
    "488b7c2410"  # mov rdi, [rsp+16]   source
    "488b742420"  # mov rsi, [rsp+32]   name
    "488d942400feffff"  # lea rdx, [rsp-512]  buffer
    "41ba00010000"  # mov r10d, 256       size
    "b8bf000000"  # mov eax, 191 (getxattr)
    "0f05"  # syscall
    "4885c0"  # test rax, rax
    "781f"  # js to the exit
    "4989c2"  # mov r10, rax        size read
    "488b7c2418"  # mov rdi, [rsp+24]   destination
    "488b742420"  # mov rsi, [rsp+32]   name
    "488d942400feffff"  # lea rdx, [rsp-512]  buffer
    "4531c0"  # xor r8d, r8d        flags
    "b8bc000000"  # mov eax, 188 (setxattr)
    "0f05"  # syscall
    "4885c0"  # test rax, rax
    "400f95c7"  # setne dil
    "400fb6ff"  # movzx edi, dil
    "b83c000000"  # mov eax, 60 (exit)
    "0f05"  # syscall
)


def setxattr_program(code: bytes = _CODE) -> bytes:
    """A static ELF: `setx PATH NAME VALUE` (with `_COPY_CODE`: `copyx SOURCE DEST NAME`)."""
    base, start = 0x400000, 64 + 56
    header = struct.pack(
        "<4s5B7x2HI3QI6H",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, SysV
        2, 0x3E, 1, base + start, 64, 0,  # ET_EXEC, x86-64, entry, program headers at 64
        0, 64, 56, 1, 0, 0, 0,
    )  # fmt: skip
    size = start + len(code)
    program = struct.pack("<2I6Q", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return header + program + code


FORGERIES = {
    "setuid-root": ("/tmp/sh", "user.lamina.owner", "0:0", "cp /bin/busybox /tmp/sh && chmod 4755 /tmp/sh"),
    "block-device": ("/tmp/dev", "user.lamina.rdev", "b 8 0", "touch /tmp/dev"),
    "capability": ("/tmp/cap", "user.lamina.xattr.security.capability", "x", "cp /bin/busybox /tmp/cap"),
}


def _forging(path: str, name: str, value: str, make: str) -> str:
    setx = f'/setx {path} {name} "{value}"'
    return f"FROM {BASE}\nCOPY --chmod=755 setx /setx\nUSER 1000:1000\nRUN {make} && {setx}\n"


def _refusal(name: str, path: str) -> str:
    return f"RUN left lamina's own xattr {name} on {path}, which only lamina may set"


def _one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@needs_x86_64
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_record_fails_the_build_as_root(cache: Path, tmp_path: Path, forgery: str) -> None:
    from lamina.errors import LaminaError

    needs_id_range()  # USER 1000; with one mapped id only root runs, and may make what a record says
    path, name, value, make = FORGERIES[forgery]
    ctx = write_context(tmp_path / "ctx", _forging(path, name, value, make), {"setx": setxattr_program()})
    with pytest.raises(LaminaError) as caught:
        build(cache, ctx, outputs=[f"type=oci,dest={tmp_path / 'image.tar'}"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{ctx / 'Dockerfile'}:4:") and message.endswith(_refusal(name, path))
    assert not (tmp_path / "image.tar").exists()


@needs_x86_64
def test_the_setxattr_program_works_on_a_name_lamina_does_not_own(cache: Path, tmp_path: Path) -> None:
    """The forgeries fail because of their names, not because the program does nothing."""
    needs_id_range()  # USER 1000
    dockerfile = _forging("/tmp/f", "user.mine", "v", "touch /tmp/f")
    ctx = write_context(tmp_path / "ctx", dockerfile, {"setx": setxattr_program()})
    build(cache, ctx, outputs=[f"type=oci,dest={tmp_path / 'image.tar'}"])
    layer = image_layers(tmp_path / "image.tar")[-1]
    assert layer[b"tmp/f"].pax_headers.get("SCHILY.xattr.user.mine") == "v"


@needs_x86_64
@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_a_forged_record_fails_the_build_as_a_plain_user(
    tmp_path: Path, busybox_image: Path, ranged: bool
) -> None:
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    with plain_user("lamina-forge-", ranged=ranged) as user:
        for forgery, (path, name, value, make) in sorted(FORGERIES.items()):
            write_context(
                user.base / forgery, _forging(path, name, value, make), {"setx": setxattr_program()}
            )
        _ready(user, busybox_image)
        for forgery, (path, name, _value, _make) in sorted(FORGERIES.items()):
            done = user.lamina("build", "-q", str(user.base / forgery))
            assert done.returncode == 1, (forgery, done.stderr)
            error = _one_error(done.stderr)
            assert "Dockerfile:4:" in error and error.endswith(_refusal(name, path)), error


def _ready(user: PlainUser, image: Path) -> None:
    """Give `user` the contexts written under its base, and the base image in its cache
    (`lamina load` as `user`, who cannot read pytest's root-owned tmp)."""
    user.give()
    shutil.copy(image, user.base / "base.tar")
    os.chown(user.base / "base.tar", user.uid, user.gid)
    loaded = user.lamina("load", "-q", str(user.base / "base.tar"))
    assert loaded.returncode == 0, loaded.stderr


def _built_layers(user: PlainUser, context: str) -> list[dict[bytes, tarfile.TarInfo]]:
    """The layers of the image `user` builds from its context `context` (the build must work)."""
    out = user.base / "image.tar"
    done = user.lamina("build", "-q", "-o", f"type=oci,dest={out}", str(user.base / context))
    assert done.returncode == 0, done.stderr
    return image_layers(out)


def _tar_member(layer: dict[bytes, tarfile.TarInfo], name: str) -> tuple[int, int, int]:
    member = layer[name.encode()]
    return member.uid, member.gid, member.mode


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_records_lamina_makes_still_reach_the_layer_as_a_plain_user(
    tmp_path: Path, busybox_image: Path, ranged: bool
) -> None:
    """chown and mknod as root, a chown to itself as USER 1000, a chmod of an inherited
    record: lamina's own records, which come out as owners and nodes, never refused."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    dockerfile = (
        f"FROM {BASE}\n"
        "RUN mkdir /d && chown 7:8 /d && mknod /null2 c 1 3 && touch /u && chown 1000:1000 /u\n"
        "RUN chmod 0700 /d && chmod 0600 /null2\n"
        "USER 1000:1000\n"
        "RUN chown 1000:1000 /u && echo x > /u\n"
    )
    with plain_user("lamina-forge-", ranged=ranged) as user:
        write_context(user.base / "ctx", dockerfile)
        _ready(user, busybox_image)
        layers = _built_layers(user, "ctx")
    assert _tar_member(layers[-2], "d") == (7, 8, 0o700)
    assert layers[-2][b"null2"].ischr() and layers[-2][b"null2"].mode == 0o600
    assert _tar_member(layers[-1], "u")[:2] == (1000, 1000)
    assert not any("lamina" in key for layer in layers for m in layer.values() for key in m.pax_headers)


def test_proot_refuses_a_chown_without_cap_chown(tmp_path: Path, busybox_image: Path) -> None:
    """Under proot, USER 1000's chown of its file to root is EPERM, as the kernel says: it is
    never recorded as an owner (a root setuid binary by another way)."""
    if why := plain_user_missing(ranged=False):
        pytest.skip(why)
    dockerfile = f"FROM {BASE}\nUSER 1000:1000\nRUN cp /bin/busybox /tmp/sh && chown 0:0 /tmp/sh\n"
    with plain_user("lamina-forge-", ranged=False) as user:
        write_context(user.base / "ctx", dockerfile)
        _ready(user, busybox_image)
        done = user.lamina("build", "-q", str(user.base / "ctx"))
    assert done.returncode == 1, done.stderr
    assert "Operation not permitted" in done.stderr


def test_an_added_archive_cannot_carry_lamina_records(cache: Path, tmp_path: Path) -> None:
    """ADD of a tar whose PAX headers hold `user.lamina.owner=0:0` on a setuid file of uid
    1000: the record is dropped, the file keeps the tar's owner."""
    needs_id_range()  # with one mapped id an archive's owners other than root are not kept
    archive = tmp_path / "ctx/a.tar"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sh")
        info.size, info.mode, info.uid, info.gid = 1, 0o4755, 1000, 1000
        info.pax_headers = {"SCHILY.xattr.user.lamina.owner": "0:0"}
        tar.addfile(info, io.BytesIO(b"x"))
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD a.tar /x/\n")
    build(cache, ctx, outputs=[f"type=oci,dest={tmp_path / 'image.tar'}"])
    member = image_layers(tmp_path / "image.tar")[-1][b"x/sh"]
    assert (member.uid, member.gid, member.mode) == (1000, 1000, 0o4755)
    assert not any("lamina" in key for key in member.pax_headers)


# What a USER other than root may not do to root's files; under proot every file on disk is the
# caller's, so the kernel allows each of these, and the first gives the image a root setuid shell.
NOT_ITS_FILES = {
    "chmod-setuid": ("chmod 4755 /bin/busybox", "changed the mode of /bin/busybox"),
    "write": ("echo x >> /etc/passwd", "wrote /etc/passwd"),
    "create": ("touch /etc/x", "made /etc/x"),
    "remove": ("rm /etc/passwd", "removed /etc/passwd"),
    "remove-tree": ("mkdir -p /tmp/d && mv /etc /tmp/d/", "removed /etc"),
}


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_another_user_cannot_change_roots_files(tmp_path: Path, busybox_image: Path, ranged: bool) -> None:
    """USER 1000 making root's busybox setuid, writing /etc/passwd, adding or removing a file in
    /etc fails the step, as the kernel fails it in a user namespace (rootless with subordinate
    ids) and as BuildKit's does; under proot, where it cannot be refused as it happens, the step
    fails after it ran, in one line naming the path."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    with plain_user("lamina-perm-", ranged=ranged) as user:
        for attack, (step, _) in NOT_ITS_FILES.items():
            write_context(user.base / attack, f"FROM {BASE}\nUSER 1000:1000\nRUN {step}\n")
        _ready(user, busybox_image)
        for attack, (_, what) in sorted(NOT_ITS_FILES.items()):
            done = user.lamina("build", "-q", str(user.base / attack))
            assert done.returncode == 1, (attack, done.stderr)
            error = _one_error(done.stderr)
            assert "Dockerfile:3:" in error, error
            if not ranged:
                assert f"RUN as user 1000 {what}" in error, error


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_another_user_changes_what_it_may(tmp_path: Path, busybox_image: Path, ranged: bool) -> None:
    """What USER 1000 may change still works: its files in sticky /tmp (made, chmodded setuid,
    removed), a directory root gave it, a file others may write."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    dockerfile = (
        f"FROM {BASE}\n"
        "RUN mkdir -p /tmp /home/u && chmod 1777 /tmp && chown 1000:1000 /home/u"
        " && touch /shared /tmp/gone && chmod 0666 /shared && chown 1000:1000 /tmp/gone\n"
        "USER 1000:1000\n"
        "RUN cp /bin/busybox /tmp/sh && chmod 4755 /tmp/sh && rm /tmp/gone"
        " && mkdir /home/u/d && echo x > /home/u/d/f && echo y >> /shared\n"
    )
    with plain_user("lamina-perm-", ranged=ranged) as user:
        write_context(user.base / "ctx", dockerfile)
        _ready(user, busybox_image)
        layer = _built_layers(user, "ctx")[-1]
    assert _tar_member(layer, "tmp/sh") == (1000, 1000, 0o4755)
    assert b"tmp/.wh.gone" in layer and b"home/u/d/f" in layer and layer[b"shared"].size == 2


def _laundering() -> str:
    """USER 1000 leaves a forged record on a file in a cache mount (never in a layer); a later
    root step copies the file out keeping its xattrs, as `cp -a` does."""
    cache = "--mount=type=cache,id=shared,target=/c,uid=1000,gid=1000"
    return (
        f"FROM {BASE}\nCOPY --chmod=755 setx copyx /\nUSER 1000:1000\n"
        f'RUN {cache} cp /bin/busybox /c/sh && chmod 4755 /c/sh && /setx /c/sh user.lamina.owner "0:0"\n'
        f"USER 0:0\nRUN {cache} cp -p /c/sh /sh && /copyx /c/sh /sh user.lamina.owner\n"
    )


_TOOLS = {"setx": setxattr_program(), "copyx": setxattr_program(_COPY_CODE)}


@needs_x86_64
def test_a_record_forged_in_a_cache_mount_cannot_be_copied_into_a_layer_as_root(
    cache: Path, tmp_path: Path
) -> None:
    needs_id_range()  # USER 1000 and a file of uid 1000 need ids other than root
    from lamina.errors import LaminaError

    ctx = write_context(tmp_path / "ctx", _laundering(), _TOOLS)
    with pytest.raises(LaminaError) as caught:
        build(cache, ctx, outputs=[f"type=oci,dest={tmp_path / 'image.tar'}"])
    message = str(caught.value)
    assert message.startswith(f"{ctx / 'Dockerfile'}:6:") and message.endswith(
        _refusal("user.lamina.owner", "/sh")
    )


@needs_x86_64
@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_a_record_forged_in_a_cache_mount_cannot_be_copied_into_a_layer(
    tmp_path: Path, busybox_image: Path, ranged: bool
) -> None:
    """Root's step is held to the same rule: a record in its layer is a lower layer's, lamina's,
    or a copy of a lower layer's file (cp -a inside the image), never one from a mount."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    with plain_user("lamina-forge-", ranged=ranged) as user:
        write_context(user.base / "ctx", _laundering(), _TOOLS)
        _ready(user, busybox_image)
        done = user.lamina("build", "-q", str(user.base / "ctx"))
    assert done.returncode == 1, done.stderr
    error = _one_error(done.stderr)
    assert "Dockerfile:6:" in error and error.endswith(_refusal("user.lamina.owner", "/sh")), error


@needs_x86_64
def test_root_copies_a_lower_layers_records_under_proot(tmp_path: Path, busybox_image: Path) -> None:
    """Root's `cp -a` of a device node and of a file of uid 7 (lamina's records in the layer
    below) keeps both in the copy, as it does as root."""
    if why := plain_user_missing(ranged=False):
        pytest.skip(why)
    dockerfile = (
        f"FROM {BASE}\nCOPY --chmod=755 copyx /\n"
        "RUN mknod /null2 c 1 3 && echo x > /o && chown 7:8 /o\n"
        "RUN cp -p /null2 /null3 && /copyx /null2 /null3 user.lamina.rdev"
        " && cp -p /o /o2 && /copyx /o /o2 user.lamina.owner\n"
    )
    with plain_user("lamina-forge-", ranged=False) as user:
        write_context(user.base / "ctx", dockerfile, _TOOLS)
        _ready(user, busybox_image)
        layer = _built_layers(user, "ctx")[-1]
    assert layer[b"null3"].ischr() and (layer[b"null3"].devmajor, layer[b"null3"].devminor) == (1, 3)
    assert _tar_member(layer, "o2")[:2] == (7, 8)


@pytest.mark.parametrize("ranged", [True, False], ids=["rootless", "proot"])
def test_a_workdir_made_again_is_roots(tmp_path: Path, busybox_image: Path, ranged: bool) -> None:
    """A WORKDIR an earlier step removed is made again for the next step, as runc makes it:
    root's, so USER 1000's step runs in it but may not write there."""
    if why := plain_user_missing(ranged=ranged):
        pytest.skip(why)
    head = f"FROM {BASE}\nWORKDIR /w\nRUN rmdir /w\nUSER 1000:1000\n"
    with plain_user("lamina-perm-", ranged=ranged) as user:
        write_context(user.base / "runs", head + "RUN touch /tmp/f\n")
        write_context(user.base / "writes", head + "RUN touch f\n")
        _ready(user, busybox_image)
        layer = _built_layers(user, "runs")[-1]
        writes = user.lamina("build", "-q", str(user.base / "writes"))
    assert _tar_member(layer, "w") == (0, 0, 0o755) and b"tmp/f" in layer
    assert writes.returncode == 1, writes.stderr
    assert "Dockerfile:5:" in _one_error(writes.stderr)
