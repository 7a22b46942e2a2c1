"""`--secret` as buildx takes it: from a file, from an environment variable, or by id alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.build import BASE, ROOT, write_context

pytestmark = pytest.mark.sandbox


def run_cli(
    *args: str, cache: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`lamina ARGS` in `cwd`: an --secret id alone names a file relative to it."""
    environ = {**os.environ, "LAMINA_CACHE": str(cache), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args], capture_output=True, text=True, env=environ, cwd=cwd
    )


DOCKERFILE = f"""\
FROM {BASE}
RUN --mount=type=secret,id=fromenv cat /run/secrets/fromenv > /fromenv
RUN --mount=type=secret,id=LAMINA_T_TOKEN cat /run/secrets/LAMINA_T_TOKEN > /byid-env
RUN --mount=type=secret,id=token.txt cat /run/secrets/token.txt > /byid-file
RUN --mount=type=secret,id=asenv,env=API_KEY \\
    sh -c 'printf %s "$API_KEY" > /asenv; test ! -e /run/secrets/asenv'
RUN --mount=type=secret,id=both,env=BOTH,target=/both \\
    sh -c 'printf %s "$BOTH" > /both-env; cat /both > /both-file'
"""


def test_secret_sources_as_buildx(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    (tmp_path / "token.txt").write_text("from-a-file")
    out = tmp_path / "out"
    secrets = [
        "id=fromenv,env=LAMINA_T_A",  # env=: the variable's value
        "id=LAMINA_T_TOKEN",  # an id alone, set in the environment: that variable
        "id=token.txt",  # an id alone, no such variable: the file of that name
        "id=asenv,type=env,src=LAMINA_T_A",  # type=env: src names the variable
        "id=both,src=token.txt",
    ]
    flags = [arg for spec in secrets for arg in ("--secret", spec)]
    env = {"LAMINA_T_A": "value-a", "LAMINA_T_TOKEN": "value-token"}
    proc = run_cli(
        "build", "-o", f"type=local,dest={out}", *flags, str(ctx), cache=cache, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "fromenv").read_text() == "value-a"
    assert (out / "byid-env").read_text() == "value-token"
    assert (out / "byid-file").read_text() == "from-a-file"
    assert (out / "asenv").read_text() == "value-a", "RUN --mount=type=secret,env= is a variable, no file"
    assert (out / "both-env").read_text() == "from-a-file"
    assert (out / "both-file").read_text() == "from-a-file"
    for name in ("fromenv", "LAMINA_T_TOKEN", "token.txt"):
        assert not (out / "run/secrets" / name).exists(), "a secret never lands in a layer"


def test_secret_id_alone_with_neither_fails_in_one_line(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    proc = run_cli("build", "--secret", "id=nosuch", str(ctx), cache=cache, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --secret id=nosuch: nosuch is not a readable file"


def test_secret_too_big(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE)
    (tmp_path / "big").write_bytes(b"x" * (500 * 1024 + 1))
    proc = run_cli("build", "--secret", f"id=big,src={tmp_path / 'big'}", str(ctx), cache=cache, cwd=tmp_path)
    assert proc.stderr.strip() == "error: --secret id=big: secret big too big. max size 500KiB"


def test_api_secret_from_the_given_environ(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lamina.build(environ=...)`: an env secret comes from that mapping, not the process's."""
    from lamina import api

    monkeypatch.delenv("LAMINA_T_API", raising=False)
    ctx = write_context(
        tmp_path / "ctx",
        f"FROM {BASE}\nRUN --mount=type=secret,id=LAMINA_T_API,env=V sh -c 'printf %s \"$V\" > /v'\n",
    )
    out = tmp_path / "out"
    api.build(
        ctx,
        cache_dir=cache,
        environ={"LAMINA_T_API": "given"},
        secrets=["id=LAMINA_T_API"],
        outputs=[f"type=local,dest={out}"],
    )
    assert (out / "v").read_text() == "given"


def test_an_optional_secret_given_or_not_keeps_the_cache(cache: Path, tmp_path: Path) -> None:
    """As BuildKit's exec op (and lamina's ssh mounts): the key holds the secret mount as written,
    never whether --secret gave it (was: a build without it reran the RUN)."""
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --mount=type=secret,id=tok true\n")
    first = run_cli("build", "--secret", "id=tok,env=T", str(ctx), cache=cache, cwd=tmp_path, env={"T": "1"})
    assert first.returncode == 0, first.stderr
    again = run_cli("build", "--progress", "plain", str(ctx), cache=cache, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "RUN --mount=type=secret,id=tok true  CACHED" in again.stderr
