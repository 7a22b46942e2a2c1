"""Helpers for the build tests: a cache holding the busybox base, and a one-call build.

The `cache` fixture (tests/conftest.py) is `make_cache` over the session's busybox image.

cache = make_cache(tmp_path, busybox_image)      # a store with lamina-test/busybox:1.35
result = build(cache, ctx, dockerfile_text)      # lamina.api.build, quiet
tree = rootfs(cache, ctx, text)                   # -o type=local, returns the dir
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

BASE = "lamina-test/busybox:1.35"
ROOT = Path(__file__).resolve().parent.parent.parent


def needs_id_range() -> None:
    """Skip when the sandbox maps only the caller (no subordinate ids): other owners cannot exist."""
    import pytest

    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    if detect_ids().mode is IdMode.SINGLE:
        pytest.skip("no subordinate id range: only root exists inside the sandbox")


def make_cache(tmp_path: Path, busybox_image: Path) -> Path:
    from lamina.cache.images import load_image_file
    from lamina.cache.store import Store

    cache = tmp_path / "cache"
    with Store(cache) as store:
        load_image_file(store, busybox_image)
    return cache


def write_context(ctx: Path, dockerfile: str, files: dict[str, str | bytes] | None = None) -> Path:
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, data in (files or {}).items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return ctx


def build(cache: Path, ctx: Path, **kwargs: Any) -> Any:
    from lamina import api

    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    return api.build(ctx, cache_dir=cache, environ=env, **kwargs)


def rootfs(cache: Path, ctx: Path, dest: Path, **kwargs: Any) -> Any:
    return build(cache, ctx, outputs=[f"type=local,dest={dest}"], **kwargs)


def cached_steps(result: Any) -> list[bool]:
    return [step.cached for step in result.steps]


def _cli_env(cache: Path, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment with LAMINA_CACHE=cache, no SOURCE_DATE_EPOCH unless `extra` sets it."""
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    env.pop("SOURCE_DATE_EPOCH", None)
    env.update(extra)
    return env


def run_cli(*args: str, cache: Path, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = _cli_env(cache, kwargs.pop("env", {}))
    proc = subprocess.run(
        [sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=env, cwd=ROOT, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lamina {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def start_cli(
    *args: str, cache: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    """`lamina ARGS` started as run_cli runs it, stdout and stderr piped, not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "lamina", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(cache, env or {}),
        cwd=ROOT,
        **kwargs,
    )


def oci_config(archive: Path) -> dict[str, Any]:
    """The image config inside an OCI archive written by `-o type=oci`."""
    with tarfile.open(archive) as tar:
        manifest = _first_manifest(tar)
        return json.loads(_blob(tar, manifest["config"]["digest"]))


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    """The blob `digest` (sha256:HEX) of an OCI archive open as `tar`."""
    member = tar.extractfile("blobs/sha256/" + digest.split(":")[1])
    assert member is not None
    return member.read()


def oci_manifest(archive: Path) -> dict[str, Any]:
    """The image manifest inside an OCI archive written by `-o type=oci`."""
    with tarfile.open(archive) as tar:
        return _first_manifest(tar)


def _first_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    """The manifest the first entry of an OCI archive's index.json names."""
    member = tar.extractfile("index.json")
    assert member is not None
    index = json.loads(member.read())
    return dict(json.loads(_blob(tar, index["manifests"][0]["digest"])))


def image_entries(archive: Path) -> dict[str, tarfile.TarInfo]:
    """The final tree of an OCI archive's image, from its layer tars (whiteouts applied).

    Owners come from the layers, so this is how a test checks them when it
    runs unprivileged (a type=local export is owned by whoever wrote it).
    """
    import io

    from lamina.oci.compression import open_decompressed

    entries: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(archive) as outer:
        for layer in _first_manifest(outer)["layers"]:
            blob = io.BytesIO(_blob(outer, layer["digest"]))
            with tarfile.open(fileobj=open_decompressed(blob), mode="r|") as tar:
                for info in tar:
                    name = info.name.rstrip("/")
                    base = name.rsplit("/", 1)[-1]
                    parent = name.rsplit("/", 1)[0] if "/" in name else ""
                    if base == ".wh..wh..opq":
                        for path in [p for p in entries if p.startswith(parent + "/")]:
                            del entries[path]
                    elif base.startswith(".wh."):
                        gone = (parent + "/" if parent else "") + base[4:]
                        for path in [p for p in entries if p == gone or p.startswith(gone + "/")]:
                            del entries[path]
                    else:
                        entries[name] = info
    return entries
