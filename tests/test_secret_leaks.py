"""Secrets (`--secret`, `--ssh` with a key file) never land anywhere a build writes: the layers
(in the cache and in the -o archive), the cache index, the image history and config, the
progress log (plain and rawjson), the --metadata-file, the build history `lamina diff` reads,
nor, after a failed build, the failure kept for `lamina debug` and what `lamina debug` shows.

Each place is read whole, gzip and zstd blobs decompressed and tar archives opened, and
searched for the secret's bytes (and their base64)."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.build import BASE, make_cache, run_cli, write_context

pytestmark = pytest.mark.sandbox

SECRET = "H16b-s3cret-value-7f3a9c1e"
DOCKERFILE = f"""FROM {BASE}
RUN --mount=type=secret,id=tok wc -c < /run/secrets/tok > /len
RUN --mount=type=secret,id=tok,env=TOK sh -c 'test -n "$TOK" && echo env > /env'
RUN --mount=type=ssh,id=key sh -c 'test -S "$SSH_AUTH_SOCK" && echo ssh > /ssh'
"""
FAILING = f"""FROM {BASE}
RUN --mount=type=secret,id=tok,env=TOK --mount=type=secret,id=tok,target=/s \\
    sh -c 'test -n "$TOK" && cat /s > /dev/null && exit 3'
"""


def _contents(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """`data`, and what it holds: a gzip or zstd stream decoded, a tar's members."""
    yield data
    if depth > 3:
        return
    if data[:2] == b"\x1f\x8b":
        yield from _contents(gzip.decompress(data), depth + 1)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        yield from _contents(zstandard.ZstdDecompressor().decompressobj().decompress(data), depth + 1)
    elif len(data) >= 512 and data[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                yield member.name.encode() + member.linkname.encode()
                yield repr(member.pax_headers).encode()
                if member.isfile():
                    yield from _contents(tar.extractfile(member).read(), depth + 1)  # type: ignore[union-attr]


def leaks(paths: list[Path], needles: list[bytes]) -> list[str]:
    """Every file under `paths` (and the bytes it holds) that contains a needle."""
    found = []
    for root in paths:
        files = [root] if root.is_file() else [Path(t, n) for t, _, names in os.walk(root) for n in names]
        for path in files:
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except PermissionError:
                continue  # a file of a subordinate id, private to it: no build wrote a secret there
            for part in _contents(data):
                if any(needle in part for needle in needles):
                    found.append(str(path))
                    break
    return found


@pytest.fixture
def setup(tmp_path: Path, busybox_image: Path) -> tuple[Path, Path, list[bytes]]:
    if shutil.which("ssh-keygen") is None or shutil.which("ssh-agent") is None:
        pytest.skip("ssh-keygen and ssh-agent missing (apt-get install openssh-client)")
    cache = make_cache(tmp_path, busybox_image)
    (tmp_path / "tok").write_text(SECRET)
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "k", "-f", str(key)], check=True)
    body = "".join(line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line)
    needles = [SECRET.encode(), base64.b64encode(SECRET.encode()), body[20:60].encode()]
    return cache, tmp_path, needles


def test_secrets_are_nowhere_a_build_writes(setup: tuple[Path, Path, list[bytes]]) -> None:
    cache, tmp, needles = setup
    ctx = write_context(tmp / "ctx", DOCKERFILE)
    flags = ["--secret", f"id=tok,src={tmp / 'tok'}", "--ssh", f"key={tmp / 'key'}"]
    written = [tmp / "out.tar", tmp / "meta.json", tmp / "out"]
    logs = []
    for progress, output in (
        ("plain", f"type=oci,dest={tmp / 'out.tar'}"),
        ("rawjson", f"type=local,dest={tmp / 'out'}"),
    ):
        proc = run_cli(
            "build", "--progress", progress, "--metadata-file", str(tmp / "meta.json"), "-t", "app:1",
            "-o", output, *flags, str(ctx), cache=cache,
        )  # fmt: skip
        logs += [proc.stdout, proc.stderr]
    assert (tmp / "out/len").read_text().strip() == str(len(SECRET))  # the step did read it
    assert (tmp / "out/env").exists() and (tmp / "out/ssh").exists()
    (tmp / "progress.log").write_text("\n".join(logs))
    diff = run_cli("diff", str(ctx), cache=cache, check=False)  # the build history, as shown
    (tmp / "shown.log").write_text(diff.stdout + diff.stderr)
    found = leaks([cache, *written, tmp / "progress.log", tmp / "shown.log"], needles)
    assert not found, f"the secret is in {found}"


def test_a_failed_build_and_its_debug_keep_no_secret(setup: tuple[Path, Path, list[bytes]]) -> None:
    cache, tmp, needles = setup
    ctx = write_context(tmp / "ctx", FAILING)
    proc = run_cli(
        "build",
        "--progress",
        "plain",
        "--secret",
        f"id=tok,src={tmp / 'tok'}",
        str(ctx),
        cache=cache,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "lamina debug" in proc.stderr  # the failure is kept
    assert (cache / "failures").is_dir() and any((cache / "failures").iterdir())
    # The kept failure names a file secret's source (debug mounts the user's file again, as the
    # step had it) and never holds its bytes: with the file gone, debug shows no secret.
    (tmp / "tok").unlink()
    shown = run_cli(
        "debug", "last", "--", "sh", "-c", "env; cat /s /run/secrets/* 2>&1; true", cache=cache, check=False
    )
    (tmp / "shown.log").write_text("\n".join([proc.stdout, proc.stderr, shown.stdout, shown.stderr]))
    found = leaks([cache, tmp / "shown.log"], needles)
    assert not found, f"the secret is in {found}"
