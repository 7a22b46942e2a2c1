"""SOURCE_DATE_EPOCH given as a source (engine.sourceepoch): what each source's time is, and which
stages may name one. BuildKit's own cases are in tests/conformance/buildkit (testSourceDateEpoch*)."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import re
import tarfile
from pathlib import Path

import pytest

from lamina.engine.sourcetimes import http_date, newest_file_time
from lamina.errors import LaminaError
from tests.support.build import BASE, build, write_context


def _tar(members: dict[str, int], links: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mtime in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(b""))
        for name, mtime in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "a", mtime
            tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "pack",
    [lambda b: b, lambda b: __import__("gzip").compress(b), bz2.compress, lzma.compress],
    ids=["plain", "gzip", "bzip2", "xz"],
)
def test_the_newest_regular_file_of_an_archive(pack: object) -> None:
    # A symlink newer than every file does not count, as in BuildKit (regular files only).
    data = pack(_tar({"a": 100, "dir/b": 300, "c": 200}, links={"l": 900}))  # type: ignore[operator]
    assert newest_file_time(io.BytesIO(data)) == 300


def test_a_file_that_is_no_archive_has_no_time() -> None:
    assert newest_file_time(io.BytesIO(b"FROM scratch\n")) is None
    assert newest_file_time(io.BytesIO(b"")) is None


def test_last_modified_is_an_http_date() -> None:
    assert http_date("Tue, 14 Nov 2023 22:13:20 GMT", "u") == 1700000000
    with pytest.raises(LaminaError, match="no date"):
        http_date("yesterday", "u")


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("FROM busybox AS src\nADD http://127.0.0.1:9/x /\n", "stage must use FROM scratch"),
        ("FROM scratch AS src\nARG X\n", "must contain exactly one remote ADD"),
        ("FROM scratch AS src\nADD a b /\n", "exactly one remote ADD source"),
        (
            "FROM scratch AS src\nADD http://127.0.0.1:9/x /\nADD http://127.0.0.1:9/y /\n",
            "exactly one remote ADD",
        ),
        ("FROM scratch AS src\nADD local.tar /\n", "must be a single HTTP(S) or Git ADD"),
        ("FROM scratch AS src\nRUN true\n", "unsupported run instruction"),
    ],
)
def test_a_stage_that_is_not_only_its_source_is_refused(
    cache: Path, tmp_path: Path, stage: str, message: str
) -> None:
    text = f"ARG SOURCE_DATE_EPOCH=src\n{stage}FROM scratch\nCOPY Dockerfile /\n"
    with pytest.raises(LaminaError, match=re.escape(message)) as caught:
        build(cache, write_context(tmp_path / "ctx", text))
    assert "Dockerfile:2" in str(caught.value), "the error names the stage's line"


def test_an_unknown_source_is_invalid(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY Dockerfile /\n")
    with pytest.raises(LaminaError, match="invalid SOURCE_DATE_EPOCH: nowhere"):
        build(cache, ctx, build_args={"SOURCE_DATE_EPOCH": "nowhere"})


def test_the_environment_names_a_source_as_the_build_arg_does(cache: Path, tmp_path: Path) -> None:
    # buildx passes $SOURCE_DATE_EPOCH as the build arg; `context` of a local context is none.
    from lamina import api

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY Dockerfile /\n")
    made = api.build(ctx, cache_dir=cache, environ={"SOURCE_DATE_EPOCH": "context"})
    assert made.config.created != "1970-01-01T00:00:00Z"
    with pytest.raises(LaminaError, match="invalid SOURCE_DATE_EPOCH: nowhere"):
        api.build(ctx, cache_dir=cache, environ={"SOURCE_DATE_EPOCH": "nowhere"})


def test_an_http_build_context_is_the_file_it_serves_and_its_time(cache: Path, tmp_path: Path) -> None:
    # dockerui: llb.HTTP(url, Filename("context")): one file, 0600, timed by Last-Modified.
    from tests.support.servers import serve_directory

    served = tmp_path / "http"
    served.mkdir()
    (served / "src.tar").write_bytes(_tar({"foo": 1700000602}))
    os.utime(served / "src.tar", (1700000601, 1700000601))
    text = "ARG SOURCE_DATE_EPOCH=mysource\nFROM mysource\nLABEL x=y\n"
    out = tmp_path / "out"
    with serve_directory(served) as url:
        made = build(
            cache,
            write_context(tmp_path / "ctx", text),
            build_contexts=[f"mysource={url}/src.tar"],
            outputs=[f"type=local,dest={out}"],
        )
    assert (out / "context").read_bytes() == (served / "src.tar").read_bytes()
    assert (out / "context").stat().st_mode & 0o777 == 0o600
    assert made.config.created == "2023-11-14T22:23:21Z", "the Last-Modified, not the archive's newest file"


def test_an_output_takes_its_own_source_date_epoch(cache: Path, tmp_path: Path) -> None:
    # BuildKit's exporter attribute: its layers written again with that epoch (or none), the
    # image's times clamped to it; another output of the same build keeps the build's.
    from tests.support.build import oci_config, oci_manifest

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY a /a\n", {"a": "x"})
    os.utime(ctx / "a", (1800000000, 1800000000))
    outs = {name: tmp_path / f"{name}.tar" for name in ("build", "earlier", "none")}
    build(
        cache,
        ctx,
        build_args={"SOURCE_DATE_EPOCH": "1700000000"},
        outputs=[
            f"type=oci,dest={outs['build']}",
            f"type=oci,dest={outs['earlier']},source-date-epoch=1600000000",
            f"type=oci,dest={outs['none']},source-date-epoch=",
        ],
    )

    def stamped(name: str) -> tuple[str, str, int]:
        layer = oci_manifest(outs[name])["layers"][0]
        with tarfile.open(outs[name]) as tar:
            blob = tar.extractfile("blobs/sha256/" + layer["digest"].split(":")[1])
            assert blob is not None
            with tarfile.open(fileobj=io.BytesIO(blob.read())) as inner:
                mtime = int(inner.getmember("a").mtime)
        annotation = layer.get("annotations", {}).get("buildkit/rewritten-timestamp", "")
        return annotation, oci_config(outs[name])["created"], mtime

    assert stamped("build") == ("1700000000", "2023-11-14T22:13:20Z", 1700000000)
    assert stamped("earlier") == ("1600000000", "2020-09-13T12:26:40Z", 1600000000)
    assert stamped("none") == ("", "2023-11-14T22:13:20Z", 1800000000)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("type=oci,dest=x.tar,source-date-epoch=soon", "invalid SOURCE_DATE_EPOCH: soon"),
        ("type=local,dest=d,source-date-epoch=1", "not supported for type=local"),
    ],
)
def test_a_bad_output_source_date_epoch_is_refused(spec: str, message: str) -> None:
    from lamina.engine.outputspec import parse_output

    with pytest.raises(LaminaError, match=message):
        parse_output(spec)


def test_local_and_tar_outputs_time_every_file_by_the_epoch(cache: Path, tmp_path: Path) -> None:
    # BuildKit's local and tar exporters: each file's time is SOURCE_DATE_EPOCH, older or newer.
    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY . /in/\n", {"old": "o", "new": "n"})
    os.utime(ctx / "old", (1000000000, 1000000000))
    os.utime(ctx / "new", (1900000000, 1900000000))
    local, archive = tmp_path / "local", tmp_path / "root.tar"
    build(
        cache,
        ctx,
        build_args={"SOURCE_DATE_EPOCH": "1700000000"},
        outputs=[f"type=local,dest={local}", f"type=tar,dest={archive}"],
    )
    assert {int(p.lstat().st_mtime) for p in [local, *local.rglob("*")]} == {1700000000}
    with tarfile.open(archive) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1700000000}


@pytest.mark.sandbox
def test_the_environments_epoch_is_the_build_arg_a_stage_declares(cache: Path, tmp_path: Path) -> None:
    # buildx: $SOURCE_DATE_EPOCH becomes the build arg unless --build-arg gives one.
    from lamina import api

    ctx = write_context(
        tmp_path / "ctx", f"FROM {BASE}\nARG SOURCE_DATE_EPOCH\nRUN echo $SOURCE_DATE_EPOCH > /e\n"
    )
    for args, wanted in (({}, "1000\n"), ({"SOURCE_DATE_EPOCH": "2000"}, "2000\n")):
        out = tmp_path / f"out{len(args)}"
        api.build(
            ctx, cache_dir=cache, build_args=args, outputs=[f"type=local,dest={out}"],
            environ={"SOURCE_DATE_EPOCH": "1000"},
        )  # fmt: skip
        assert (out / "e").read_text() == wanted
