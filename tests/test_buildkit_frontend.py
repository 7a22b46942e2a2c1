"""BuildKit's frontend integration tests, ported as data (tests/conformance/buildkit/).

Each case is a TOML file named after the upstream Go test (and a suffix when
one Go test makes several cases): the Dockerfile, the context, the build
args and what the Go test asserts, as `expect_*` tables. The runner builds
with a local export and checks those facts; `expect_error` cases must fail
with every listed fragment in the message (the information BuildKit gives,
not its exact wording). See the directory's README for the format and the
upstream commit.
"""

from __future__ import annotations

import os
import socket
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_build_helpers import BASE, make_cache, needs_id_range, rootfs

CASES = Path(__file__).parent / "conformance" / "buildkit" / "cases"


def _cases() -> list[Any]:
    params = []
    for path in sorted(CASES.glob("*.toml")):
        case = tomllib.loads(path.read_text())
        marks = [pytest.mark.sandbox] if case.get("sandbox") else []
        params.append(pytest.param(case, id=path.stem, marks=marks))
    return params


def _write_context(ctx: Path, case: dict[str, Any]) -> None:
    ctx.mkdir()
    if "dockerfile" in case:
        name = case.get("dockerfile_name", "Dockerfile")
        (ctx / name).write_text(case["dockerfile"].replace("{BASE}", BASE))
    for name, data in case.get("files", {}).items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(data.replace("{BASE}", BASE))
    for name, target in case.get("symlinks", {}).items():
        os.symlink(target, ctx / name)
    for name in case.get("sockets", []):
        with socket.socket(socket.AF_UNIX) as sock:  # closing leaves the socket file behind
            sock.bind(os.fspath(ctx / name))


@pytest.mark.parametrize("case", _cases())
def test_buildkit_case(case: dict[str, Any], tmp_path: Path, busybox_image: Path) -> None:
    if case.get("needs_id_range"):
        needs_id_range()
    cache = make_cache(tmp_path, busybox_image)
    ctx, out = tmp_path / "ctx", tmp_path / "out"
    _write_context(ctx, case)
    kwargs: dict[str, Any] = {"build_args": case.get("build_args", {})}
    if "target" in case:
        kwargs["target"] = case["target"]
    if "expect_error" in case:
        with pytest.raises(Exception) as caught:
            rootfs(cache, ctx, out, **kwargs)
        for fragment in case["expect_error"]:
            assert fragment in str(caught.value)
        return
    rootfs(cache, ctx, out, **kwargs)
    for name, content in case.get("expect_files", {}).items():
        path = out / name
        assert path.is_file() and not path.is_symlink(), f"{name}: not a regular file"
        assert path.read_text() == content, name
    for name in case.get("expect_dirs", []):
        assert (out / name).is_dir(), f"{name}: not a directory"
    for name, target in case.get("expect_links", {}).items():
        assert os.readlink(out / name) == target, name
    for name in case.get("expect_empty_dirs", []):
        assert (out / name).is_dir() and not any((out / name).iterdir()), f"{name}: not an empty directory"
    for name in case.get("expect_absent", []):
        assert not os.path.lexists(out / name), f"{name}: exists"
    for name, mode in case.get("expect_modes", {}).items():
        assert stat.S_IMODE((out / name).lstat().st_mode) == int(mode, 8), name
    for name, lines in case.get("expect_lines", {}).items():
        text = (out / name).read_text()
        for line in lines:
            assert line in text.splitlines(), f"{name}: no line {line!r} in {text!r}"


def test_buildkit_skips_are_counted() -> None:
    """Every case file names its upstream test; the skip list gives each skipped test a reason."""
    skips = (CASES.parent / "skipped.tsv").read_text().splitlines()[1:]
    for line in skips:
        name, reason = line.split("\t")
        assert name.startswith("test") and reason
    for path in CASES.glob("*.toml"):
        assert tomllib.loads(path.read_text())["upstream"].startswith("test"), path.name


def test_proxy_env_from_build_args_deterministic_order() -> None:
    """BuildKit's TestProxyEnvFromBuildArgsDeterministicOrder: args sorted, the later spelling wins."""
    from lamina.engine.steps.run import proxy_env

    args = {"ALL_PROXY": "all-upper", "all_proxy": "all-lower", "HTTP_PROXY": "http-upper"}
    got = proxy_env(args | {"http_proxy": "http-lower", "NO_PROXY": "no-proxy", "FOO": "bar"})
    assert got == {
        "HTTP_PROXY": "http-lower",
        "http_proxy": "http-lower",
        "ALL_PROXY": "all-lower",
        "all_proxy": "all-lower",
        "NO_PROXY": "no-proxy",
        "no_proxy": "no-proxy",
    }
    assert proxy_env({"FOO": "bar"}) == {}
