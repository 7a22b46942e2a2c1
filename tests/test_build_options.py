"""Build options that need no sandbox: secrets specs, SOURCE_DATE_EPOCH, tags, metadata, plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.engine.model import BuildResult, StepRecord, parse_secret
from lamina.errors import LaminaError, PlanError
from lamina.oci.image import default_config
from lamina.oci.reference import store_name


def test_parse_secret_forms() -> None:
    assert parse_secret("id=tok,src=/run/tok").source == Path("/run/tok")
    assert parse_secret("id=tok,source=/x,type=file").id == "tok"
    assert str(parse_secret("id=tok,env=TOKEN").source) == "env:TOKEN"
    assert str(parse_secret("id=tok,type=env,src=TOKEN").source) == "env:TOKEN"
    assert str(parse_secret('"id=tok","src=/a,b"').source) == "/a,b", "CSV, as buildx"
    # An id alone: the variable of that name when set, else the file of that name (buildx).
    assert str(parse_secret("id=TOK", {"TOK": "x"}).source) == "env:TOK"
    assert str(parse_secret("id=tok.txt", {}).source) == "tok.txt"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("src=/x", "missing id"),
        ("id", "key=value"),
        ("id=a,type=vault", "unsupported secret type"),
        ("id=a,path=/x", "unexpected key 'path'"),
    ],
)
def test_parse_secret_errors(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_secret(spec)


def test_store_names_are_normalised() -> None:
    assert store_name("app:dev") == "docker.io/library/app:dev"
    assert store_name("app") == "docker.io/library/app:latest"
    assert store_name("127.0.0.1:5000/x/y:1") == "127.0.0.1:5000/x/y:1"
    with pytest.raises(LaminaError):
        store_name("Bad Name")


def test_metadata_document_like_buildx() -> None:
    steps = (StepRecord("build", 1, "RUN make", True, 0.01), StepRecord("build", 2, "COPY . /", False, 1.5))
    digest, image_id, name = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "docker.io/library/x:1"
    result = BuildResult(digest, image_id, default_config(), (name,), steps, 2.0, "build")
    meta = result.metadata()
    assert meta["containerimage.digest"] == "sha256:" + "a" * 64
    assert meta["containerimage.config.digest"] == "sha256:" + "b" * 64
    assert meta["image.name"] == "docker.io/library/x:1"
    assert [s["cache"] for s in meta["lamina.build.steps"]] == ["cached", "run"]
    assert (result.steps_cached, result.steps_run) == (1, 1)


def test_bad_source_date_epoch_is_one_error(tmp_path: Path) -> None:
    from lamina import api

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(PlanError, match="SOURCE_DATE_EPOCH"):
        api.build(tmp_path, cache_dir=tmp_path / "cache", environ={"SOURCE_DATE_EPOCH": "yesterday"})


def test_unknown_target_and_bad_tag_fail_before_building(tmp_path: Path) -> None:
    from lamina import api

    (tmp_path / "Dockerfile").write_text("FROM scratch AS only\nCOPY missing /x\n")
    with pytest.raises(PlanError, match="nope"):
        api.build(tmp_path, cache_dir=tmp_path / "cache", target="nope", environ={})
    with pytest.raises(LaminaError, match="invalid reference"):
        api.build(tmp_path, cache_dir=tmp_path / "cache", tags=["Not Valid"], environ={})


def test_missing_copy_source_names_the_line(tmp_path: Path) -> None:
    from lamina import api
    from lamina.errors import BuildError

    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY missing.txt /x\n")
    with pytest.raises(BuildError, match=r"Dockerfile:2: .*missing\.txt"):
        api.build(tmp_path, cache_dir=tmp_path / "cache", environ={})


def test_scratch_copy_builds_without_a_sandbox(tmp_path: Path) -> None:
    from lamina import api

    (tmp_path / "Dockerfile").write_text('FROM scratch\nCOPY a.txt /a.txt\nENV X=1\nCMD ["/a"]\n')
    (tmp_path / "a.txt").write_text("a\n")
    out = tmp_path / "out"
    result = api.build(tmp_path, cache_dir=tmp_path / "cache", output=f"type=local,dest={out}", environ={})
    assert (out / "a.txt").read_text() == "a\n"
    assert result.config.config.cmd == ("/a",)
    assert len(result.config.diff_ids) == 1
    again = api.build(tmp_path, cache_dir=tmp_path / "cache", environ={})
    assert again.image_digest == result.image_digest and again.steps_cached == 1
