"""`lamina images` lists a pending image (a lazy build's: tars not yet compressed) it cannot
make now: on a store this user may only read, and when its stored tar is damaged. The
others are listed (and made) as always; the damaged one is named in one line on stderr."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lamina.cache.store import Store
from lamina.oci.digest import Digest
from lamina.oci.image import MAX_DOCUMENT, Manifest
from tests.support.build import BASE, build, make_cache, run_cli, write_context
from tests.support.plainuser import plain_user, plain_user_missing


def _pending(cache: Path, tmp_path: Path, tag: str, text: str) -> str:
    """Build `tag` lazily (left pending); its image ID."""
    ctx = write_context(tmp_path / tag, f"FROM {BASE}\nCOPY f /f\n", {"f": text})
    return str(build(cache, ctx, tags=[f"{tag}:1"], lazy_image=True).config_digest)


def _row(out: str, tag: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"{tag}:1 "))


def _damage_last_tar(cache: Path, tag: str) -> None:
    with Store(cache) as store:
        manifest = store.lookup(f"docker.io/library/{tag}:1").manifest
        layer = Manifest.from_bytes(store.read_blob(manifest, MAX_DOCUMENT)).layers[-1]
        assert layer.media_type.endswith(".tar"), layer.media_type  # still pending
        path = store.blob_path(Digest.parse(str(layer.digest)))
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # in the tar's padding or file bytes: same size, other digest
    path.write_bytes(bytes(data))


def test_a_damaged_pending_image_is_listed_not_made(tmp_path: Path, busybox_image: Path) -> None:
    cache = make_cache(tmp_path, busybox_image)
    damaged = _pending(cache, tmp_path, "damaged", "one\n")
    _pending(cache, tmp_path, "fine", "two\n")
    _damage_last_tar(cache, "damaged")

    done = run_cli("images", cache=cache)
    assert f"- (ID {Digest.parse(damaged).short}; manifest not made)" in _row(done.stdout, "damaged")
    with Store(cache) as store:  # the other one was made (and named) as always
        assert not store.is_pending(store.lookup("docker.io/library/fine:1").manifest)
        assert store.is_pending(store.lookup("docker.io/library/damaged:1").manifest)
    warnings = done.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: damaged:1: manifest not made: ")


def test_a_read_only_store_lists_its_pending_image(tmp_path: Path, busybox_image: Path) -> None:
    if why := plain_user_missing():
        pytest.skip(why)
    with plain_user("lamina-ro-") as user:
        cache = make_cache(user.base, busybox_image)  # root's: the user may only read it
        image_id = _pending(cache, tmp_path, "shared", "three\n")
        subprocess.run(["chmod", "-R", "a+rX", str(cache)], check=True)
        done = user.lamina("images", env={"LAMINA_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr
        assert f"- (ID {Digest.parse(image_id).short}; manifest not made)" in _row(done.stdout, "shared")
        assert done.stderr == ""
        with Store(cache) as store:  # nothing was written: still pending, its owner makes it
            assert store.is_pending(store.lookup("docker.io/library/shared:1").manifest)
