"""Built images open in real tools: skopeo, umoci, podman (each skipped when absent)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.build import BASE, build, make_cache, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE} AS builder
RUN mkdir -p /out && echo tool-built > /out/made.txt && rm /etc/group

FROM {BASE}
COPY --from=builder /out/made.txt /opt/made.txt
RUN rm -rf /var && mkdir /var && echo replaced > /var/note
CMD ["cat", "/opt/made.txt"]
"""


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, busybox_image: Path) -> Path:
    tmp = tmp_path_factory.mktemp("tools")
    cache = make_cache(tmp, busybox_image)
    ctx = write_context(tmp / "ctx", DOCKERFILE)
    out = tmp / "image.tar"
    build(cache, ctx, tags=["tools/test:1"], outputs=[f"type=oci,dest={out}"])
    return out


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_skopeo_inspects_and_copies(archive: Path, tmp_path: Path) -> None:
    skopeo = tool("skopeo")
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci-archive:{archive}"], check=True,
                                     capture_output=True, text=True).stdout)  # fmt: skip
    assert info["Os"] == "linux" and len(info["Layers"]) == 3
    # skopeo copy re-verifies every digest.
    subprocess.run(
        [skopeo, "copy", "-q", f"oci-archive:{archive}", f"oci:{tmp_path / 'layout'}:x"], check=True
    )


def test_umoci_unpacks_the_root_filesystem(archive: Path, tmp_path: Path) -> None:
    umoci = tool("umoci")
    layout = tmp_path / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(layout)], check=True)
    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run([umoci, "unpack", *rootless, "--image", f"{layout}:1", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    rootfs = bundle / "rootfs"
    assert (rootfs / "opt/made.txt").read_text() == "tool-built\n"
    assert (rootfs / "var/note").read_text() == "replaced\n"
    assert not (rootfs / "var/tmp").exists(), "the opaque /var hides the base's contents"
    assert (rootfs / "etc/group").exists(), "the builder's deletion stays in the builder"


def test_podman_loads_it(archive: Path, tmp_path: Path) -> None:
    podman = tool("podman")
    if os.geteuid() != 0:
        pytest.skip("podman with a private store is run as root here")
    import tempfile

    # podman wants a short runroot path.
    with tempfile.TemporaryDirectory(prefix="lp-", dir="/tmp") as short:
        root, runroot = tmp_path / "root", Path(short) / "run"
        args = [podman, "--root", str(root), "--runroot", str(runroot), "load", "-i", str(archive)]
        done = subprocess.run(args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "tools/test:1" in done.stdout + done.stderr
