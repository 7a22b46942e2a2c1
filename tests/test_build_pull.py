"""FROM an image the store lacks: the build pulls it from a registry (and again with --pull)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import registry_server
from tests.support.build import build, write_context

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(registry_server.REGISTRY is None, reason="docker-registry is not installed"),
    pytest.mark.skipif(registry_server.SKOPEO is None, reason="skopeo is not installed"),
]


def push(archive: Path, ref: str) -> None:
    assert registry_server.SKOPEO is not None
    subprocess.run(
        [
            registry_server.SKOPEO,
            "copy",
            "-q",
            "--dest-tls-verify=false",
            f"oci-archive:{archive}",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
    )


def test_from_pulls_a_missing_base_image(
    registry: registry_server.Registry, busybox_image: Path, tmp_path: Path
) -> None:
    ref = f"{registry.host}/base/busybox:1.35"
    push(busybox_image, ref)
    cache = tmp_path / "cache"  # empty: the base must come from the registry
    ctx = write_context(tmp_path / "ctx", f"FROM {ref}\nRUN echo pulled > /pulled\n")
    out = tmp_path / "out"
    result = build(cache, ctx, outputs=[f"type=local,dest={out}"])
    assert (out / "pulled").read_text() == "pulled\n"
    assert (out / "bin/busybox").is_file()
    # Now in the store: a second build needs no registry, and --pull fetches it again.
    assert all(step.cached for step in build(cache, ctx).steps)
    again = build(cache, ctx, pull=True)
    assert again.image_digest == result.image_digest
