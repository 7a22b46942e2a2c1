"""`lamina run IMAGE [COMMAND...]` on an image in the local store, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamina import api
from lamina.engine.sandbox import IdMode, detect_ids, parse_mount
from lamina.engine.sandbox.spec import BindMount, TmpfsMount
from lamina.errors import SandboxError
from tests.support.sandbox import userns_available

pytestmark = pytest.mark.sandbox

if not userns_available():
    pytest.skip("user namespaces are not available here", allow_module_level=True)


@pytest.fixture(scope="module")
def cache(busybox_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run-cache") / "cache"
    api.load(busybox_image, name="bb:test", cache_dir=root)
    return root


def lamina(cache: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAMINA_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_streams_output_and_returns_the_exit_code(cache: Path) -> None:
    done = lamina(cache, "run", "--rm", "bb:test", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr.splitlines()[-1]) == (3, "out\n", "err")


def test_run_flags_env_workdir_user_hostname(cache: Path) -> None:
    script = 'echo "$A $B"; pwd; id -u; hostname'
    done = lamina(
        cache,
        "run",
        "-e",
        "A=1",
        "-e",
        "B=two words",
        "-w",
        "/tmp/w",
        "-u",
        "0:0",
        "--hostname",
        "hosty",
        "bb:test",
        "sh",
        "-c",
        script,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["1 two words", "/tmp/w", "0", "hosty"]


def test_run_applies_entrypoint_cmd_env_workdir_user_of_a_built_image(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM bb:test\n"
        "RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd\n"
        "ENV GREETING=hello\n"
        "WORKDIR /srv\n"
        "USER app\n"
        'ENTRYPOINT ["sh", "-c", "echo $GREETING $(pwd) $(id -u) \\"$@\\"", "ep"]\n'
        'CMD ["default"]\n'
    )
    api.build(tmp_path, tags=["ep:test"], cache_dir=cache, environ={**os.environ, "LAMINA_CACHE": str(cache)})
    done = lamina(cache, "run", "ep:test")
    if detect_ids().mode is IdMode.SINGLE:
        assert done.returncode == 1 and "user 'app' (uid 1000, gid 1000) is not mapped" in done.stderr
    else:
        assert (done.returncode, done.stdout) == (0, "hello /srv 1000 default\n"), done.stderr
    done = lamina(cache, "run", "-e", "GREETING=hi", "-w", "/tmp", "-u", "0", "ep:test", "x", "y")
    assert (done.returncode, done.stdout) == (0, "hi /tmp 0 x y\n"), done.stderr


def test_run_stdin_reaches_the_command(cache: Path) -> None:
    done = lamina(cache, "run", "bb:test", "cat", stdin="piped in\n")
    assert (done.returncode, done.stdout) == (0, "piped in\n")


def test_run_without_command_uses_the_image_cmd(cache: Path) -> None:
    done = lamina(cache, "run", "bb:test", stdin="echo from the image cmd; echo $PATH\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "from the image cmd",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]


def test_run_network_none_and_bind_mount(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("host file\n")
    mount = f"type=bind,source={tmp_path},target=/host,ro"
    done = lamina(
        cache,
        "run",
        "--network",
        "none",
        "--mount",
        mount,
        "bb:test",
        "sh",
        "-c",
        "cat /host/in.txt; ip route | wc -l; touch /host/x || echo ro",
    )
    assert done.stdout.split() == ["host", "file", "0", "ro"], done.stderr
    assert not (tmp_path / "x").exists()


def test_run_changes_are_not_kept(cache: Path) -> None:
    assert lamina(cache, "run", "bb:test", "sh", "-c", "echo x > /kept").returncode == 0
    done = lamina(cache, "run", "bb:test", "cat", "/kept")
    assert done.returncode == 1 and "No such file" in done.stderr


def test_run_unknown_image_is_one_line_error(cache: Path) -> None:
    done = lamina(cache, "run", "nope:latest", "true")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ")


def test_run_missing_command_is_one_line_error(cache: Path) -> None:
    done = lamina(cache, "run", "bb:test", "no-such-tool")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors == ['error: exec "no-such-tool": executable file not found in $PATH']


def test_parse_mount_flags() -> None:
    assert parse_mount("type=bind,src=/a,dst=/b,readonly") == BindMount(Path("/a"), "/b", readonly=True)
    assert parse_mount("type=bind,source=/a,target=/b") == BindMount(Path("/a"), "/b", readonly=False)
    assert parse_mount("type=tmpfs,target=/t,tmpfs-size=1024") == TmpfsMount("/t", 1024)
    for bad in ("type=bind,target=/b", "type=volume,target=/v", "type=tmpfs,target=rel", "type=bind,x=1"):
        with pytest.raises(SandboxError, match="--mount"):
            parse_mount(bad)


def test_run_root_of_an_unpacked_image_is_0755(busybox_image: Path, tmp_path: Path) -> None:
    # The store's layer dirs are made with mkdtemp (0700), and a layer dir's root
    # is `/` in the sandbox: unpacked without the chmod, `/` is closed to every
    # user but root. `lamina run` unpacking an image first must open it as a build does.
    cache = tmp_path / "cache"
    api.load(busybox_image, name="bb:fresh", cache_dir=cache)
    done = lamina(cache, "run", "--rm", "bb:fresh", "stat", "-c", "%a", "/")
    assert (done.returncode, done.stdout) == (0, "755\n"), done.stderr
    layers = [path for path in (cache / "unpacked").iterdir() if not path.name.startswith(".")]
    assert layers
    assert all(layer.stat().st_mode & 0o7777 == 0o755 for layer in layers), [
        oct(layer.stat().st_mode) for layer in layers
    ]
