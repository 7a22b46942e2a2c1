"""--cache-to mode=min read back into an empty store: the builder stage is not in the cache and
runs again, with other output; what the target takes from it still hits, by the builder's key
(BuildKit matches a step through its inputs' definitions), so the image is the exported one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, make_cache, rootfs, write_context

pytestmark = pytest.mark.sandbox

BUILDER = f"FROM {BASE} AS builder\nRUN head -c 16 /dev/urandom | od -x > /random\n\nFROM {BASE}\n"


@pytest.mark.parametrize(
    "takes",
    [
        "COPY --from=builder /random /copied",
        "RUN --mount=type=bind,from=builder,source=/random,target=/r cp /r /copied",
    ],
    ids=["copy-from", "bind-mount-from"],
)
def test_a_min_cache_gives_the_exported_image_though_the_builder_runs_again(
    tmp_path: Path, busybox_image: Path, takes: str
) -> None:
    ctx = write_context(tmp_path / "ctx", BUILDER + takes + "\n")
    cache = tmp_path / "cache"
    first = rootfs(
        make_cache(tmp_path / "a", busybox_image),
        ctx,
        tmp_path / "one",
        cache_to=[f"type=local,dest={cache}"],
    )
    second = rootfs(
        make_cache(tmp_path / "b", busybox_image),
        ctx,
        tmp_path / "two",
        cache_from=[f"type=local,src={cache}"],
    )
    assert [(s.stage, s.cached) for s in second.steps] == [("builder", False), ("stage-1", True)]
    assert (tmp_path / "two/copied").read_text() == (tmp_path / "one/copied").read_text()
    assert second.image_digest == first.image_digest
