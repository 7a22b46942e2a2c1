"""Multi-platform images in the store: load, images, save, run and pull/push with --platform.

The image is lamina-test/busybox-multi:1.35 (tests/support/multiplatform.py): the amd64
busybox test image and its arm64 twin, made from Debian's busybox-static:arm64, under one
OCI index. A RUN of the arm64 image needs an emulator (qemu-user-static, which CI installs).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lamina import api
from lamina.cache.store import Store
from lamina.cli import cli
from lamina.errors import SandboxError
from lamina.oci.digest import Digest
from lamina.oci.image import ImageConfig, Index, Manifest, Platform
from tests.support.multiplatform import MULTI_NAME
from tests.support.registry import client_env, skopeo

ARM64 = "linux/arm64"
AMD64 = "linux/amd64"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return client_env(tmp_path)


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def needs_emulation(want: str = ARM64) -> None:
    from lamina.engine.sandbox.emulation import emulator
    from lamina.engine.sandbox.isolation import choose, requested

    try:
        emulator(Platform.parse(want), choose(requested()).isolation.value)
    except SandboxError as err:
        pytest.skip(f"{err} (CI installs qemu-user-static and registers it: tests/support/binfmt.sh)")


def host_is_amd64() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the arm64 image is the foreign one on an x86_64 host only")


# --- load, images --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["archive", "layout"])
def test_load_keeps_every_platform_under_the_index(
    multiplatform_image: Any, env: dict[str, str], form: str
) -> None:
    (record,) = api.load(getattr(multiplatform_image, form), environ=env)
    assert record.name == MULTI_NAME
    assert str(record.manifest) == multiplatform_image.index
    for wanted in (AMD64, ARM64):
        (listed,) = api.images(platform=wanted, environ=env)
        assert str(listed.manifest) == multiplatform_image.manifests[wanted]
    assert api.images(platform="linux/s390x", environ=env) == ()
    code, out = run_cli(env, "images", "--platform", ARM64, "--digests")
    assert code == 0 and multiplatform_image.manifests[ARM64] in out, out
    assert out.splitlines()[1].split()[2] == ARM64
    code, out = run_cli(env, "images")  # the index's digest, and every platform it holds
    assert out.splitlines()[0].split()[:3] == ["NAME", "DIGEST", "PLATFORMS"]
    assert out.splitlines()[1].split()[2] == f"{AMD64},{ARM64},linux/arm/v7", out


def test_load_platform_takes_only_that_image(multiplatform_image: Any, env: dict[str, str]) -> None:
    (record,) = api.load(multiplatform_image.archive, platform="linux/arm64/v8", environ=env)
    assert str(record.manifest) == multiplatform_image.manifests[ARM64]
    with Store(env["LAMINA_CACHE"]) as store:
        manifest = Manifest.from_bytes(store.read_blob(record.manifest, 1 << 20))
        assert (
            ImageConfig.from_bytes(store.read_blob(manifest.config.digest, 1 << 20)).architecture == "arm64"
        )
    code, out = run_cli(env, "load", "--platform", "linux/s390x", str(multiplatform_image.archive))
    assert code == 1
    assert out.endswith("has no image for linux/s390x (it has linux/amd64, linux/arm/v7, linux/arm64)\n"), out


# --- save ----------------------------------------------------------------------------------


def test_save_writes_the_index_whole_and_skopeo_reads_it(
    multiplatform_image: Any, env: dict[str, str], tmp_path: Path
) -> None:
    api.load(multiplatform_image.archive, environ=env)
    out = tmp_path / "saved.tar"
    descriptor = api.save(MULTI_NAME, out, environ=env)
    assert str(descriptor.digest) == multiplatform_image.index  # nothing rewritten on the way through
    assert out.read_bytes() == multiplatform_image.archive.read_bytes()  # the very archive, byte for byte
    raw = skopeo("inspect", "--raw", f"oci-archive:{out}")
    assert [m["digest"] for m in json.loads(raw)["manifests"]] == list(multiplatform_image.manifests.values())
    for wanted, arch in ((AMD64, "amd64"), (ARM64, "arm64")):
        config = json.loads(skopeo("inspect", "--config", "--override-arch", arch, f"oci-archive:{out}"))
        assert (config["os"], config["architecture"]) == ("linux", arch), wanted


def test_save_platform_and_the_docker_format(
    multiplatform_image: Any, env: dict[str, str], tmp_path: Path
) -> None:
    api.load(multiplatform_image.archive, environ=env)
    one = api.save(MULTI_NAME, tmp_path / "arm64.tar", platform=ARM64, environ=env)
    assert str(one.digest) == multiplatform_image.manifests[ARM64]
    code, out = run_cli(env, "save", MULTI_NAME, "-o", str(tmp_path / "d.tar"), "--format", "docker")
    assert code == 1
    assert "a docker-archive holds one platform: add --platform" in out
    code, out = run_cli(env, "save", MULTI_NAME, "-o", str(tmp_path / "d.tar"), "--format", "docker",
                        "--platform", ARM64)  # fmt: skip
    assert code == 0, out


# --- run -----------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_run_platform_picks_the_image_and_emulates_it(multiplatform_image: Any, env: dict[str, str]) -> None:
    host_is_amd64()
    needs_emulation()
    api.load(multiplatform_image.archive, environ=env)
    assert _run(env, MULTI_NAME, "uname", "-m")[:2] == (0, "x86_64\n")
    # A shell starting another program: the child is emulated too.
    script = "uname -m; /bin/busybox uname -m"
    assert _run(env, "--platform", ARM64, MULTI_NAME, "sh", "-c", script)[:2] == (0, "aarch64\naarch64\n")
    needs_emulation("linux/arm/v7")
    assert _run(env, "--platform", "linux/arm/v7", MULTI_NAME, "uname", "-m")[:2] == (0, "armv7l\n")
    code, out, err = _run(env, "--platform", "linux/s390x", MULTI_NAME, "true")
    assert (code, out) == (1, "")
    assert err.endswith(
        f"error: {MULTI_NAME}: no image for linux/s390x (it has linux/amd64, linux/arm/v7, linux/arm64)\n"
    )


def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`lamina run --network none` in a process of its own (the command writes to real file
    descriptors): (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "run", "--network", "none", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


# --- registry ------------------------------------------------------------------------------


@pytest.fixture
def loaded(multiplatform_image: Any, env: dict[str, str]) -> Iterator[Any]:
    api.load(multiplatform_image.archive, environ=env)
    yield multiplatform_image


def check_index_in_registry(ref: str, index_digest: str, manifests: dict[str, str]) -> None:
    """`ref` serves the index `index_digest` over `manifests` (platform -> digest), each
    manifest's config naming its platform: what skopeo, and so docker and podman, see."""
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
    assert str(Digest.of_bytes(raw.encode())) == index_digest
    index = Index.from_bytes(raw.encode())
    assert {str(m.platform): str(m.digest) for m in index.manifests} == manifests
    repository = ref.rsplit(":", 1)[0]
    for wanted, digest in manifests.items():
        config = json.loads(
            skopeo("inspect", "--config", "--tls-verify=false", f"docker://{repository}@{digest}")
        )
        assert "/".join(filter(None, [config["os"], config["architecture"], config.get("variant")])) == wanted


def test_push_sends_the_index_and_every_manifest_and_skopeo_copies_it_all(
    loaded: Any, env: dict[str, str], registry: Any, tmp_path: Path
) -> None:
    dest = f"{registry.host}/multi:1"
    result = api.push(MULTI_NAME, dest, environ=env)
    assert str(result.digest) == loaded.index
    check_index_in_registry(dest, loaded.index, loaded.manifests)
    # skopeo copy --all out to a layout and back into another repository: the same index.
    layout = tmp_path / "copied"
    skopeo("copy", "--all", "--quiet", "--src-tls-verify=false", f"docker://{dest}", f"oci:{layout}:1")
    again = f"{registry.host}/multi-again:1"
    skopeo("copy", "--all", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{again}")
    check_index_in_registry(again, loaded.index, loaded.manifests)
    # --platform pushes that platform's image alone, as a single-platform image.
    single = f"{registry.host}/multi-arm64:1"
    code, out = run_cli(env, "push", "--platform", ARM64, "-q", MULTI_NAME, single)
    assert (code, out) == (0, loaded.manifests[ARM64] + "\n")
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{single}")
    assert str(Digest.of_bytes(raw.encode())) == loaded.manifests[ARM64]
    code, out = run_cli(env, "push", "--platform", "linux/s390x", MULTI_NAME, single)
    assert (code, out) == (
        1,
        f"error: push {single}: no image for linux/s390x (it has linux/amd64, linux/arm/v7, linux/arm64)\n",
    )


def test_pull_keeps_the_index_and_adds_each_platform_asked_for(
    loaded: Any, env: dict[str, str], registry: Any, tmp_path: Path
) -> None:
    dest = f"{registry.host}/pulled:1"
    api.push(MULTI_NAME, dest, environ=env)
    host_is_amd64()
    default = api.pull(dest, environ={**env, "LAMINA_CACHE": str(tmp_path / "default")})
    assert str(default.manifest) == loaded.manifests[AMD64]  # no --platform: this host's image
    assert str(default.record.manifest) == loaded.index
    fresh = {**env, "LAMINA_CACHE": str(tmp_path / "fresh")}
    arm = api.pull(dest, platform=ARM64, environ=fresh)
    assert (str(arm.record.manifest), str(arm.manifest)) == (loaded.index, loaded.manifests[ARM64])
    assert [str(r.manifest) for r in api.images(platform=ARM64, environ=fresh)] == [loaded.manifests[ARM64]]
    assert api.images(platform=AMD64, environ=fresh) == ()  # listed in the index, never pulled
    code, out = run_cli(fresh, "save", dest, "-o", str(tmp_path / "x.tar"))
    assert code == 1 and "never pulled: linux/amd64 image, linux/arm/v7 image; pull it" in out, out
    code, out = run_cli(fresh, "cache", "verify")
    assert code == 0, out  # a partly pulled index is not a damaged one
    code, out = run_cli(fresh, "push", dest, f"{registry.host}/partial:1")
    assert code == 1
    assert out == (
        f"error: push {registry.host}/partial:1: never pulled: linux/amd64 image, linux/arm/v7 image "
        "(pull them, or push one --platform)\n"
    )
    api.pull(dest, platform="linux/arm/v7", environ=fresh)
    api.pull(dest, platform=AMD64, environ=fresh)
    assert [str(r.manifest) for r in api.images(platform=AMD64, environ=fresh)] == [loaded.manifests[AMD64]]
