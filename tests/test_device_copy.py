"""A device node a COPY or an ADD put in a layer can be changed by a later RUN, as in BuildKit.

overlayfs copies a real node up by mknod, which a step's user namespace refuses even
to root: a layer dir holds device nodes as placeholders (lamina.oci.recorded), as a
base layer's are unpacked, which overlayfs copies up as files. The RUN's layer then
holds the node with its new mode and owner.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.support.build import BASE, build, write_context
from tests.support.layers import image_layers

pytestmark = pytest.mark.sandbox


def _node(member: tarfile.TarInfo) -> tuple[str, int, int, int]:
    kind = "c" if member.ischr() else "b" if member.isblk() else "?"
    return kind, member.devmajor, member.devminor, member.mode


def test_run_changes_a_device_node_copied_from_a_stage(cache: Path, tmp_path: Path) -> None:
    dockerfile = (
        f"FROM {BASE} AS nodes\n"
        "RUN mkdir /opt && mknod -m 0644 /opt/null2 c 1 3\n"
        f"FROM {BASE}\n"
        "COPY --from=nodes /opt/ /o/\n"
        "RUN chmod 0600 /o/null2\n"
    )
    archive = tmp_path / "image.tar"
    build(cache, write_context(tmp_path / "ctx", dockerfile), outputs=[f"type=oci,dest={archive}"])
    copied, changed = image_layers(archive)[-2:]
    assert _node(copied[b"o/null2"]) == ("c", 1, 3, 0o644)
    assert _node(changed[b"o/null2"]) == ("c", 1, 3, 0o600)


def test_run_changes_a_device_node_an_archive_added(cache: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        node = tarfile.TarInfo("zero2")
        node.type, node.devmajor, node.devminor, node.mode = tarfile.CHRTYPE, 1, 5, 0o666
        tar.addfile(node)
    dockerfile = f"FROM {BASE}\nADD nodes.tar /a/\nRUN chmod 0600 /a/zero2\n"
    ctx = write_context(tmp_path / "ctx", dockerfile, {"nodes.tar": buf.getvalue()})
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    added, changed = image_layers(archive)[-2:]
    assert _node(added[b"a/zero2"]) == ("c", 1, 5, 0o666)
    assert _node(changed[b"a/zero2"]) == ("c", 1, 5, 0o600)
