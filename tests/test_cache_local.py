"""`--cache-to type=local,dest=DIR` / `--cache-from type=local,src=DIR`: the build cache in an OCI layout.

As with the registry cache (tests/test_registry_build.py), sharing is shown
the way a second machine sees it: export from one store, import into an
empty one, and check that no step ran and the image digest is the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_build_helpers import build, run_cli, write_context

from lamina.cache.remote import parse_cache_spec
from lamina.errors import PlanError

DOCKERFILE = """\
FROM scratch AS builder
COPY src/ /src/
FROM scratch
COPY --from=builder /src/ /app/
COPY top.txt /top.txt
"""


def context(path: Path) -> Path:
    return write_context(path, DOCKERFILE, {"src/a.txt": "a\n", "top.txt": "top\n"})


def test_local_cache_round_trip_into_an_empty_store(tmp_path: Path) -> None:
    ctx = context(tmp_path / "ctx")
    dest = tmp_path / "cachedir"
    first = build(tmp_path / "a", ctx, cache_to=[f"type=local,dest={dest},mode=max"])
    assert first.steps_run == 3
    index = json.loads((dest / "index.json").read_text())
    tags = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert tags == sorted(f"cache-{step.key.split(':')[1]}" for step in first.steps)
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    second = build(tmp_path / "b", ctx, cache_from=[f"type=local,src={dest}"])
    assert [step.cached for step in second.steps] == [True] * 3
    assert second.image_digest == first.image_digest
    if shutil.which("skopeo"):  # each entry is a plain OCI image manifest in a plain layout
        done = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{dest}:{tags[0]}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["config"]["mediaType"] == "application/vnd.lamina.cache.step.v1+json"


def test_local_cache_min_exports_only_the_target_chain_and_tag_names_it(tmp_path: Path) -> None:
    ctx = context(tmp_path / "ctx")
    dest = tmp_path / "cachedir"
    first = build(tmp_path / "a", ctx, cache_to=[f"type=local,dest={dest},tag=main"])
    names = [
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads((dest / "index.json").read_text())["manifests"]
    ]
    assert all(name.startswith("main-") for name in names)
    assert len(names) == 2  # the builder stage's step is not in the target's chain
    second = build(tmp_path / "b", ctx, cache_from=[f"type=local,src={dest},tag=main"])
    assert [step.cached for step in second.steps] == [False, True, True]
    assert second.image_digest == first.image_digest


def test_local_cache_from_a_damaged_directory_warns_and_rebuilds(tmp_path: Path) -> None:
    ctx = context(tmp_path / "ctx")
    dest = tmp_path / "cachedir"
    build(tmp_path / "a", ctx, cache_to=[f"type=local,dest={dest},mode=max"])
    for blob in (dest / "blobs" / "sha256").iterdir():
        if blob.stat().st_size > 1000 or blob.read_bytes()[:2] == b"\x1f\x8b":  # the layer blobs
            blob.write_bytes(b"\x1f\x8b" + b"x" * (blob.stat().st_size - 2))
    proc = run_cli(
        "build",
        "--progress",
        "plain",
        "--cache-from",
        f"type=local,src={dest}",
        str(ctx),
        cache=tmp_path / "b",
    )
    assert "rebuilding the step instead" in proc.stderr
    missing = run_cli(
        "build", "--cache-from", f"type=local,src={tmp_path / 'none'}", str(ctx), cache=tmp_path / "c"
    )
    assert "not a cache directory" in missing.stderr  # a warning; the build went on


@pytest.mark.parametrize(
    ("text", "flag", "message"),
    [
        ("type=inline", "--cache-to", "--cache-to type=inline is not supported"),
        ("type=local,dest=/x,compression=zstd", "--cache-to", "compression= is not supported"),
        ("type=local,dest=/x,oci-mediatypes=false", "--cache-to", "oci-mediatypes=false is not supported"),
        (
            "type=registry,ref=h:1/c,image-manifest=false",
            "--cache-to",
            "image-manifest=false is not supported",
        ),
        ("type=local,dest=/x", "--cache-from", "type=local needs src="),
        ("type=local,src=/x,digest=sha256:" + "a" * 64, "--cache-from", "digest= is not supported"),
    ],
)
def test_cache_attributes_not_honoured_are_refused(text: str, flag: str, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        parse_cache_spec(text, flag)
