"""`lamina load | images | rmi | save | cache du | cache gc` as a user types them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina.cli import cli
from lamina.oci.validate import validate_image


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, list(args))
        return result.exit_code, result.output

    return invoke


def test_load_images_save_rmi(run, busybox_image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = run("load", str(busybox_image))
    assert code == 0, out
    assert out.startswith("Loaded image: lamina-test/busybox:1.35 (sha256:")
    code, out = run("images")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "DIGEST", "PLATFORMS", "SIZE", "CREATED"]
    assert row.split()[0] == "lamina-test/busybox:1.35"
    assert row.split()[2] == "linux/amd64"  # the config's platform
    assert row.split()[4] == "2024-01-01T00:00:00Z"

    for fmt, compression in (("oci", "zstd"), ("docker", None), ("oci", None)):
        target = tmp_path / f"{fmt}-{compression}.tar"
        args = ["save", "lamina-test/busybox:1.35", "-o", str(target), "--format", fmt]
        code, out = run(*args, *(["--compression", compression] if compression else []))
        assert code == 0, out
        validate_image(target)
    assert (tmp_path / "oci-None.tar").read_bytes() == busybox_image.read_bytes()

    code, out = run("load", str(tmp_path / "docker-None.tar"), "-t", "again:2")
    assert code == 0 and "again:2" in out
    code, out = run("rmi", "lamina-test/busybox:1.35")
    assert code == 0 and out.strip() == "Untagged: lamina-test/busybox:1.35"
    code, out = run("images")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["again:2"]


def test_errors_are_one_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = run("rmi", "nothere:1")
    assert code == 1
    assert out == "error: image docker.io/library/nothere:1 is not in the store (see `lamina images`)\n"
    code, out = run("save", "nothere:1", "-o", str(tmp_path / "x.tar"))
    assert code == 1 and out.startswith("error: ") and out.count("\n") == 1
    assert not (tmp_path / "x.tar").exists()
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    code, out = run("load", str(tmp_path / "junk.tar"))
    assert code == 1 and out.startswith("error: ") and out.count("\n") == 1


def test_cache_du_and_gc(run, busybox_image: Path) -> None:  # type: ignore[no-untyped-def]
    run("load", str(busybox_image))
    code, out = run("cache", "du")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {"blobs", "unpacked", "index", "records", "total"}
    assert "(3 blobs)" in lines["blobs"]
    assert "(0 files: COPY, stat cache)" in lines["records"]  # no build yet
    run("rmi", "lamina-test/busybox:1.35")
    code, out = run("cache", "gc")
    assert code == 0 and out.startswith("removed 3 blobs")
    code, out = run("cache", "du")
    assert "(0 blobs)" in out


def test_cache_location_follows_the_environment(
    busybox_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAMINA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = CliRunner().invoke(cli, ["load", str(busybox_image)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "xdg" / "lamina" / "index.db").exists()


def test_save_into_a_missing_directory_is_a_clear_error(run, busybox_image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("load", str(busybox_image))
    code, out = run("save", "lamina-test/busybox:1.35", "-o", str(tmp_path / "no" / "such" / "x.tar"))
    assert code == 1
    assert out.startswith("error: save lamina-test/busybox:1.35 to ") and out.count("\n") == 1
