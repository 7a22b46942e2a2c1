"""`lamina save IMAGE-ID`: as docker save, an image ID (its config digest, `sha256:` with
all or a prefix of the hex, or 12+ hex digits alone) names the stored image."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina.cache.store import Store
from lamina.cli import cli
from tests.support.build import BASE, build, make_cache, write_context


def _index(archive: Path) -> bytes:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        return member.read()


@pytest.fixture
def image_id(tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    cache = make_cache(tmp_path, busybox_image)
    monkeypatch.setenv("LAMINA_CACHE", str(cache))
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY f /f\n", {"f": "by id\n"})
    result = build(cache, ctx, tags=["byid:1"], lazy_image=True)  # pending: made by the save
    build(cache, write_context(tmp_path / "other", f"FROM {BASE}\n"), tags=["other:1"])
    return str(result.config_digest)


def _save(name: str, out: Path) -> str:
    result = CliRunner().invoke(cli, ["save", name, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("form", ["full", "sha256-prefix", "short"])
def test_save_takes_an_image_id(image_id: str, tmp_path: Path, form: str) -> None:
    by_name = tmp_path / "name.tar"
    _save("byid:1", by_name)
    given = {"full": image_id, "sha256-prefix": image_id[:19], "short": image_id[7:19]}[form]
    by_id = tmp_path / "id.tar"
    _save(given, by_id)
    assert _index(by_id) == _index(by_name)


def test_an_unknown_image_id_is_not_in_the_store(image_id: str, tmp_path: Path) -> None:
    unknown = "sha256:" + ("0" if image_id[7] != "0" else "1") * 12
    result = CliRunner().invoke(cli, ["save", unknown, "-o", str(tmp_path / "x.tar")])
    assert result.exit_code != 0
    assert f"image {unknown} is not in the store" in result.output
    assert not (tmp_path / "x.tar").exists()


def test_rmi_takes_the_id_of_an_image_with_one_name(image_id: str) -> None:
    result = CliRunner().invoke(cli, ["rmi", image_id[7:19]])
    assert result.exit_code == 0, result.output
    assert result.output == "Untagged: byid:1\n"
    assert "byid" not in CliRunner().invoke(cli, ["images"]).output


def test_rmi_of_an_id_with_two_names_asks_for_a_name(image_id: str) -> None:
    with Store(Path(os.environ["LAMINA_CACHE"])) as store:
        record = store.lookup("docker.io/library/byid:1")
        store.tag("docker.io/library/byid:2", record.manifest, size=record.size)
    result = CliRunner().invoke(cli, ["rmi", image_id])
    assert result.exit_code != 0
    assert "the image has several names (byid:1, byid:2): remove them by name" in result.output
    assert "byid:1" in CliRunner().invoke(cli, ["images"]).output
