"""`--cache-to type=local,dest=DIR` / `--cache-from type=local,src=DIR`: the build cache in an OCI layout;
`--cache-to type=inline`: the target's entries in the image config, read back from the pushed image.

As with the registry cache (tests/test_registry_build.py), sharing is shown
the way a second machine sees it: export from one store, import into an
empty one, and check that no step ran and the image digest is the same.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lamina.cache.remote import parse_cache_spec
from lamina.errors import PlanError
from lamina.oci.digest import Digest
from tests.support.build import build, run_cli, write_context

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
    tags = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    # Each step's key, and the COPY --from's definition key (the stage's key, not the files').
    assert {f"cache-{step.key.split(':')[1]}" for step in first.steps} < tags and len(tags) == 4
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    second = build(tmp_path / "b", ctx, cache_from=[f"type=local,src={dest}"])
    assert [step.cached for step in second.steps] == [True] * 3
    assert second.image_digest == first.image_digest
    if shutil.which("skopeo"):  # each entry is a plain OCI image manifest in a plain layout
        done = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{dest}:{min(tags)}"],
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
    # The builder stage's step is not in the target's chain; the COPY --from is there twice: by
    # the files it copies and by the builder's key (what an importer matches before building it).
    assert len(names) == 3
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
        ("type=inline,mode=max", "--cache-to", "an inline cache is mode=min only"),
        ("type=inline", "--cache-from", "read an inline cache with type=registry,ref=IMAGE"),
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


def test_inline_cache_rides_in_the_pushed_image_and_is_read_back(registry: Any, tmp_path: Path) -> None:
    from lamina.cache.store import Store
    from lamina.oci.image import ImageConfig, Manifest

    ctx = context(tmp_path / "ctx")
    image = f"{registry.host}/inline/app:1"
    first = build(tmp_path / "a", ctx, tags=[image], push=True, cache_to=["type=inline"])
    with Store(tmp_path / "a") as store:
        manifest = Manifest.from_bytes(store.read_blob(Digest.parse(first.image_digest), 1 << 20))
        config = json.loads(store.read_blob(manifest.config.digest, 1 << 20))
    entries = config["dev.lamina.cache.v1"]["entries"]
    final = [s.key for s in first.steps if s.stage != "builder"]
    keys = [e["key"] for e in entries]  # mode=min: the target's chain only, the COPY --from twice
    assert [keys[0], keys[2]] == final and keys[1] not in final
    assert [e["layer"] for e in entries] == [0, 0, 1]
    assert ImageConfig.from_bytes(json.dumps(config).encode()).diff_ids == tuple(
        Digest.parse(d) for d in config["rootfs"]["diff_ids"]
    )
    second = build(tmp_path / "b", ctx, cache_from=[f"type=registry,ref={image}"])
    assert [(s.stage, s.cached) for s in second.steps] == [
        ("builder", False),
        ("stage-1", True),
        ("stage-1", True),
    ]
    assert second.config.diff_ids == first.config.diff_ids


def test_build_help_names_the_local_cache() -> None:
    """`lamina build --help` lists type=local for --cache-to/--cache-from (was: type=registry alone)."""
    from click.testing import CliRunner

    from lamina.cli import cli

    text = " ".join(CliRunner().invoke(cli, ["build", "--help"], terminal_width=200).output.split())
    assert "--cache-to SPEC type=registry,ref=REF or type=local,dest=DIR" in text
    assert "--cache-from SPEC type=registry,ref=REF or type=local,src=DIR" in text


def test_local_cache_to_that_cannot_be_written_honours_ignore_error(tmp_path: Path) -> None:
    """ignore-error=true: a cache directory that cannot be written is a warning and the build
    succeeds (was: the build failed anyway); without it, one line naming --cache-to."""
    ctx = context(tmp_path / "ctx")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory\n")
    spec = f"type=local,dest={blocked}/cache"
    proc = run_cli("build", "--cache-to", spec + ",ignore-error=true", str(ctx), cache=tmp_path / "a")
    assert f"warning: --cache-to {spec}: " in proc.stderr and "(ignored: ignore-error=true)" in proc.stderr
    proc = run_cli("build", "--cache-to", spec, str(ctx), cache=tmp_path / "a", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --cache-to {spec}: ")
