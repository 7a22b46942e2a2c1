"""A stage that is not the target keeps its layers unpacked: no blob until an output needs one.

DESIGN: intermediate layers are compressed only when an export needs them,
and a blob once made is reused. Made late, a blob must be the one a cold
build of that stage makes (image digests do not depend on when).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, build, make_cache, oci_manifest, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE} AS build
RUN mkdir /out && seq 1 30000 > /out/numbers && echo built > /out/note

FROM {BASE}
COPY --from=build /out/note /note
"""
EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}


def _blobs(cache: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache / "blobs" / "sha256").iterdir()}


def test_an_intermediate_layer_gets_its_blob_only_when_exported_and_as_a_cold_build_makes_it(
    tmp_path: Path, busybox_image: Path
) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    # The stage exported from an empty cache: the digests a cold build gives.
    cold = make_cache(tmp_path / "cold", busybox_image)
    build(cold, ctx, target="build", build_args=EPOCH, outputs=[f"type=oci,dest={tmp_path / 'cold.tar'}"])
    run_layer = oci_manifest(tmp_path / "cold.tar")["layers"][-1]["digest"]

    cache = make_cache(tmp_path / "warm", busybox_image)
    build(cache, ctx, tags=["final:1"], build_args=EPOCH)
    assert run_layer not in _blobs(cache), "the build stage's layer was compressed, though no output needs it"

    again = build(
        cache, ctx, target="build", build_args=EPOCH, outputs=[f"type=oci,dest={tmp_path / 'late.tar'}"]
    )
    assert all(step.cached for step in again.steps)  # nothing ran again: the blob is made from the layer dir
    assert (tmp_path / "late.tar").read_bytes() == (tmp_path / "cold.tar").read_bytes()
    assert run_layer in _blobs(cache)  # kept, for the next output
