"""The pytest plugin (lamina.pytest_plugin), driven as a user drives it: pytest in a subprocess.

Each test writes a small project (or uses examples/pytest-fixtures), runs
pytest on it with a cache of this module's, and reads the outcome and the
report. Most runs load the plugin with `-p lamina.pytest_plugin` and no
other plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD: fast start); the example's
run goes through the installed `pytest11` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pytest-fixtures"

pytestmark = pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="needs /bin/busybox")

CONFTEST = f"""
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bb(lamina_build, tmp_path_factory):
    context = tmp_path_factory.mktemp("base")
    shutil.copytree({str(EXAMPLE / "base")!r}, context, dirs_exist_ok=True)
    shutil.copy2("/bin/busybox", context / "busybox")
    return lamina_build(context, tag="plugin-test/busybox:latest")
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("plugin-cache")
    yield path
    # The example's Debian layers are big: not left for pytest's basetemp rotation to remove.
    from lamina import api

    api.cache_prune(all=True, cache_dir=path)
    shutil.rmtree(path, ignore_errors=True)


def _project(root: Path, tests: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(CONFTEST)
    (root / "test_it.py").write_text(textwrap.dedent(tests))
    for name, text in (files or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _pytest(
    project: Path,
    cache: Path,
    *args: str,
    autoload: bool = False,
    timeout: float = 300,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(extra_env or {})}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--lamina-cache={cache}", *args]
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        argv[3:3] = ["-p", "lamina.pytest_plugin"]
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def _skip_where_no_port(output: str) -> None:
    """Skip as the inner run did where no port can be published here, with its reason."""
    if "publishing a port needs" in output:
        pytest.skip("publishing a port needs" + output.split("publishing a port needs", 1)[1].splitlines()[0])


def test_the_entry_point_registers_the_plugin() -> None:
    from importlib.metadata import entry_points

    found = {e.name: e.value for e in entry_points(group="pytest11")}
    assert found.get("lamina") == "lamina.pytest_plugin"


# Why the example's tests may skip here, and nothing else: no port can be published
# (/dev/net/tun closed to this user), or no Debian root can be made (not root, no debootstrap).
EXAMPLE_SKIPS = ("publishing a port needs", "debootstrap needs root", "needs debootstrap")


@pytest.mark.sandbox
def test_the_example_suite_passes_twice(cache: Path) -> None:
    import re

    for _ in ("first", "second"):
        done = _pytest(EXAMPLE, cache, "-q", "-rs", autoload=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        found = re.search(r"(\d+) passed", done.stdout)
        passed = int(found.group(1)) if found else 0
        skips = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", done.stdout, re.MULTILINE)
        assert passed + sum(int(n) for n, _ in skips) == 10, done.stdout
        assert all(any(why in text for why in EXAMPLE_SKIPS) for _, text in skips), done.stdout
        assert passed >= 5, done.stdout  # the busybox images' builds and runs, everywhere


@pytest.mark.sandbox
def test_a_second_session_builds_nothing_and_digests_are_reproducible(tmp_path: Path, cache: Path) -> None:
    tests = """
        import json, os
        def test_build(lamina_build, bb):
            image = lamina_build("app", build_args={"BASE": bb.name})
            with open(os.environ["OUT"], "w") as f:
                json.dump({"digest": image.digest, "run": image.result.steps_run}, f)
    """
    files = {"app/Dockerfile": "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /\nRUN wc -c /hello.txt > /size\n"}
    files["app/hello.txt"] = "hello\n"
    project = _project(tmp_path / "p", tests, files)
    seen = []
    for run_cache in (cache, cache, tmp_path / "other-cache"):
        out = tmp_path / "out.json"
        done = _pytest(project, run_cache, "-q", extra_env={"OUT": str(out)})
        assert done.returncode == 0, done.stdout + done.stderr
        seen.append(json.loads(out.read_text()))
    assert seen[1]["run"] == 0  # the second session found every step cached
    # SOURCE_DATE_EPOCH is applied by default: another cache, the same bytes.
    assert seen[0]["digest"] == seen[1]["digest"] == seen[2]["digest"]


def test_a_build_error_names_the_dockerfile_line(tmp_path: Path, cache: Path) -> None:
    tests = """
        def test_build(lamina_build):
            lamina_build("app")
    """
    files = {"app/Dockerfile": "FROM scratch\nCOPY missing.txt /\n"}
    done = _pytest(_project(tmp_path / "p", tests, files), cache, "-q")
    assert done.returncode == 1, done.stdout
    assert "lamina build app: " in done.stdout
    assert "Dockerfile:2" in done.stdout
    assert "Traceback" not in done.stdout


@pytest.mark.sandbox
def test_a_failing_command_shows_its_output_in_the_report(tmp_path: Path, cache: Path) -> None:
    tests = """
        def test_checked(bb, lamina_run):
            lamina_run(bb, "echo to-out; echo to-err >&2; exit 3", check=True)

        def test_asserted(bb, lamina_run):
            result = lamina_run(bb, ["sh", "-c", "echo some-output; exit 4"])
            assert result.exit_code == 0

        def test_env_workdir_input(bb, lamina_run, tmp_path):
            (tmp_path / "f.txt").write_text("mounted")
            result = lamina_run(
                bb, 'echo "$A $(pwd) $(cat /m/f.txt) $(cat)"', env={"A": "a"}, workdir="/tmp",
                mounts=[(tmp_path, "/m")], input="from-stdin",
            )
            assert result.stdout == "a /tmp mounted from-stdin\\n"
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q")
    out = done.stdout
    assert "2 failed, 1 passed" in out, out
    assert "exit code 3" in out and "to-out" in out and "to-err" in out
    assert "lamina run sh -c echo some-output; exit 4" in out  # the report section
    assert "some-output" in out


@pytest.mark.sandbox
def test_a_command_that_runs_too_long_is_stopped(tmp_path: Path, cache: Path) -> None:
    tests = """
        def test_slow(bb, lamina_run):
            lamina_run(bb, "echo started; sleep 60", timeout=1)
    """
    started = time.monotonic()
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q")
    assert done.returncode == 1
    assert "timed out after 1 s" in done.stdout and "started" in done.stdout
    assert time.monotonic() - started < 30


@pytest.mark.sandbox
def test_a_service_that_never_gets_ready_fails_in_time_with_its_log(tmp_path: Path, cache: Path) -> None:
    tests = """
        def test_never_ready(bb, lamina_service):
            lamina_service(bb, "echo waiting-forever; sleep 60", ports=[80], timeout=2)

        def test_fails_later(bb, lamina_service):
            svc = lamina_service(bb, "echo served-and-logged; exec httpd -f -p 80 -h /tmp", ports=[80])
            assert svc.port(80) != 80
            assert False, "the test fails"
    """
    started = time.monotonic()
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    assert time.monotonic() - started < 60
    out = done.stdout
    _skip_where_no_port(out)
    assert "2 failed" in out, out + done.stderr
    assert "was not ready (tcp) within 2 s" in out
    assert "waiting-forever" in out
    assert "lamina service" in out and "served-and-logged" in out  # the failing test's report section
    assert not list((cache / "pytest" / "services").iterdir())


@pytest.mark.sandbox
def test_a_service_is_reachable_and_stopped_at_teardown(tmp_path: Path, cache: Path) -> None:
    tests = """
        import os, urllib.request
        def test_serve(bb, lamina_service):
            svc = lamina_service(
                bb, "mkdir /w; echo hi > /w/index.html; sleep 0.3; exec httpd -f -v -p 8080 -h /w",
                ports=[8080], ready="http:/",
            )
            assert urllib.request.urlopen(svc.url("/"), timeout=5).read() == b"hi\\n"
            with open(os.environ["OUT"], "w") as f:
                f.write(str(svc.sandbox_pid))
    """
    out = tmp_path / "pid"
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs", extra_env={"OUT": str(out)})
    _skip_where_no_port(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not Path(f"/proc/{out.read_text()}").exists()


@pytest.mark.sandbox
def test_a_killed_pytest_leaves_no_service_behind(tmp_path: Path, cache: Path) -> None:
    tests = """
        import os, time
        def test_hang(bb, lamina_service):
            svc = lamina_service(bb, "exec httpd -f -p 80 -h /tmp", ports=[80])
            with open(os.environ["OUT"] + ".tmp", "w") as f:
                f.write(str(svc.sandbox_pid))
            os.rename(os.environ["OUT"] + ".tmp", os.environ["OUT"])
            time.sleep(120)
    """
    out = tmp_path / "pid"
    project = _project(tmp_path / "p", tests)
    env = dict(os.environ, OUT=str(out), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    argv = [sys.executable, "-m", "pytest", "-p", "lamina.pytest_plugin", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(
        [*argv, f"--lamina-cache={cache}", "-q", "-rs"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not out.exists():
        proc.kill()
        output = proc.communicate()[0]
        _skip_where_no_port(output)
        raise AssertionError(output)
    helper = int(out.read_text())
    proc.kill()  # SIGKILL: no teardown runs
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{helper}").exists()  # the sandbox died with its owner
    # Its mounts were in its own mount namespace: none is left in ours.
    assert str(cache) not in Path("/proc/self/mountinfo").read_text()
    # Its directory stays until the next session sweeps it.
    assert list((cache / "pytest" / "services").iterdir())
    again = _pytest(_project(tmp_path / "q", "def test_nothing():\n    pass\n"), cache, "-q")
    assert again.returncode == 0, again.stdout
    assert not list((cache / "pytest" / "services").iterdir())  # its scratch (upper dir) with it
    scratch = cache / "tmp"
    assert not (list(scratch.glob("lamina-sandbox-*")) if scratch.is_dir() else [])


def test_the_next_session_kills_what_a_dead_pytest_left(tmp_path: Path, cache: Path) -> None:
    # A process that survived its owner (the sandbox helper dies with its
    # parent; this stands for one that did not): a process group of its own,
    # and an owner.json naming a pytest that is gone.
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    from lamina.fixtures.services import _start_time

    directory = cache / "pytest" / "services" / "leftover"
    directory.mkdir(parents=True)
    owner = {"pid": leftover.pid, "start": _start_time(leftover.pid), "owner": gone.pid, "owner_start": 1}
    (directory / "owner.json").write_text(json.dumps(owner))
    try:
        done = _pytest(_project(tmp_path / "p", "def test_nothing():\n    pass\n"), cache, "-q")
        assert done.returncode == 0, done.stdout
        assert "lamina: stopped 1 service(s) a previous pytest left running" in done.stdout
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert not directory.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_build_lock_is_keyed_by_content_not_by_path(tmp_path: Path) -> None:
    from lamina.fixtures.images import _Request

    def request(context: Path, **changes: object) -> _Request:
        fields: dict[str, object] = dict(
            context=str(context),
            dockerfile=None,
            target="web",
            build_args=(("A", "1"),),
            secrets=(),
            tag=None,
            network="default",
        )
        fields.update(changes)
        return _Request(**fields)  # type: ignore[arg-type]

    one = tmp_path / "one"
    shutil.copytree(EXAMPLE / "app", one)
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(EXAMPLE / "app", two)
    # Two copies (as xdist workers make of a context): one lock, one default name.
    assert request(one).key() == request(two).key()
    assert request(one).key() != request(one, target="tool").key()
    assert request(one).key() != request(one, build_args=(("A", "2"),)).key()
    (two / "check.sh").chmod(0o700)
    assert request(one).key() != request(two).key()
    (two / "check.sh").chmod((one / "check.sh").stat().st_mode)
    (two / "site" / "VERSION").write_text("1.2.4\n")
    assert request(one).key() != request(two).key()


@pytest.mark.sandbox
def test_an_image_as_an_oci_archive_and_a_root_filesystem(tmp_path: Path, cache: Path) -> None:
    tests = f"""
        import hashlib, json, tarfile
        from pathlib import Path

        PASSWD = Path({str(EXAMPLE / "base" / "etc" / "passwd")!r}).read_text()

        def test_oci_archive(bb):
            path = bb.oci_archive()
            assert bb.oci_archive() == path  # written once per session
            with tarfile.open(path) as tar:
                names = tar.getnames()
                assert {{"oci-layout", "index.json", "manifest.json"}} <= set(names)
                index = json.load(tar.extractfile("index.json"))
                assert index["manifests"][0]["digest"] == bb.digest
                # Every blob is what its name says.
                for name in names:
                    if name.startswith("blobs/sha256/") and tar.getmember(name).isfile():
                        data = tar.extractfile(name).read()
                        assert "blobs/sha256/" + hashlib.sha256(data).hexdigest() == name
                manifest = json.load(tar.extractfile("blobs/sha256/" + bb.digest.split(":")[1]))
                assert manifest["config"]["digest"] == bb.config_digest

        def test_rootfs(bb):
            root = bb.rootfs()
            assert bb.rootfs() == root
            assert (root / "bin" / "busybox").is_file()
            assert (root / "bin" / "sh").is_symlink()
            assert (root / "etc" / "passwd").read_text() == PASSWD
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_marker_skips_with_the_reason_or_fails_when_required(tmp_path: Path, cache: Path) -> None:
    tests = """
        import pytest

        @pytest.mark.lamina_sandbox
        def test_needs_a_sandbox():
            pass

        @pytest.mark.lamina_sandbox(ports=True)
        def test_needs_a_port():
            pass

        def test_needs_nothing():
            pass
    """
    # This host can sandbox: the marked tests run.
    project = _project(tmp_path / "p", tests)
    done = _pytest(project, cache, "-q", "-rs")
    assert done.returncode == 0, done.stdout
    assert "3 passed" in done.stdout or "publishing a port needs" in done.stdout, done.stdout
    if os.geteuid() == 0:
        # Root in chroot isolation (a container's root): a sandbox, but no network namespace.
        os.environ["LAMINA_ISOLATION"] = "chroot"
        try:
            done = _pytest(project, cache, "-q", "-rs")
        finally:
            del os.environ["LAMINA_ISOLATION"]
        assert "2 passed, 1 skipped" in done.stdout, done.stdout
        assert "a network namespace, which isolation chroot does not make" in done.stdout
    # A host that cannot (as the probe says): skipped, with the reason; required: failed.
    conftest = project / "conftest.py"
    conftest.write_text(
        "import lamina.fixtures.probe as probe\n"
        "probe.why_no_sandbox = lambda: 'lamina cannot sandbox here: no namespaces (test)'\n"
    )
    done = _pytest(project, cache, "-q", "-rs")
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout
    assert done.stdout.count("SKIPPED [1] test_it.py:") == 2  # at the tests, as skipif says it
    assert "lamina cannot sandbox here: no namespaces (test)" in done.stdout
    done = _pytest(project, cache, "-q", "--lamina-require-sandbox")
    assert done.returncode == 1, done.stdout
    assert "1 passed, 2 errors" in done.stdout  # failed in setup, where the marker is read
    assert "no namespaces (test) (--lamina-require-sandbox)" in done.stdout


@pytest.mark.sandbox
def test_a_session_service_is_shared_reached_by_name_and_stopped_at_the_session_end(
    tmp_path: Path, cache: Path
) -> None:
    tests = """
        import os, urllib.request
        import pytest

        @pytest.fixture(scope="session")
        def web(bb, lamina_session_service):
            return lamina_session_service(
                bb, "mkdir /w; echo hi > /w/index.html; exec httpd -f -v -p 80 -h /w", ports=[80], name="site"
            )

        @pytest.mark.parametrize("n", [1, 2])
        def test_uses(web, n):
            assert urllib.request.urlopen(web.url("/"), timeout=5).read() == b"hi\\n"
            with open(os.environ["OUT"], "a") as f:
                f.write(f"{web.sandbox_pid}\\n")

        def test_fails(web):
            urllib.request.urlopen(web.url("/missing"), timeout=5)

        def test_a_test_service_reaches_it_by_name(web, bb, lamina_service):
            fetch = "until wget -q -O /tmp/r http://site/; do sleep 0.05; done; echo got-$(cat /tmp/r)"
            client = lamina_service(bb, fetch + "; exec sleep 60", ports=[], ready="log:got-", name="client")
            assert "got-hi" in client.logs()
    """
    out = tmp_path / "pids"
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs", extra_env={"OUT": str(out)})
    _skip_where_no_port(done.stdout)
    assert "1 failed, 3 passed" in done.stdout, done.stdout + done.stderr
    pids = set(out.read_text().split())
    assert len(pids) == 1  # one service for the session
    assert not Path(f"/proc/{pids.pop()}").exists()
    assert "lamina session service" in done.stdout and "/missing" in done.stdout  # its log, in the report


@pytest.mark.sandbox
def test_a_service_stops_at_once_or_gets_stop_timeout_to_exit(tmp_path: Path, cache: Path) -> None:
    tests = """
        import time

        COMMAND = "trap 'echo got-term; exit 0' TERM; echo trap-set; sleep 60 & wait"

        def test_killed_at_once(bb, lamina_service):
            svc = lamina_service(bb, COMMAND, ports=[], ready="log:^trap-set$")
            started = time.monotonic()
            svc.stop()
            assert time.monotonic() - started < 1.0
            assert svc.exit_code == 137 and "got-term" not in svc.logs()

        def test_given_time(bb, lamina_service):
            svc = lamina_service(bb, COMMAND, ports=[], ready="log:^trap-set$", stop_timeout=10)
            started = time.monotonic()
            svc.stop()
            assert time.monotonic() - started < 5.0
            assert svc.exit_code == 0 and "got-term" in svc.logs()
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


@pytest.mark.sandbox
def test_two_services_of_a_test_reach_each_other_by_name(tmp_path: Path, cache: Path) -> None:
    tests = """
        import time

        def serve(text, port, peer, peer_port):
            return (
                f"mkdir /w; echo {text} > /w/index.html; httpd -p {port} -h /w; cat /etc/hosts; "
                "wget -q -O- http://10.0.2.2:$ELSEWHERE/ 2>&1 | grep -q unreachable "
                "&& echo host-loopback-unreachable; "
                f"until wget -q -O- http://{peer}:{peer_port}/ > /tmp/r 2>/dev/null; do sleep 0.05; done; "
                f'echo "got: $(cat /tmp/r) from {peer}"; exec sleep 60'
            )

        def test_by_name(bb, lamina_service):
            api = lamina_service(bb, serve("from-api", 8080, "web", 80), ports=[8080], name="api",
                                 env={"ELSEWHERE": "1"})
            web = lamina_service(bb, serve("from-web", 80, "api", 8080), ports=[80], name="web",
                                 env={"ELSEWHERE": str(api.port(8080))})
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not all("got:" in s.logs() for s in (api, web)):
                time.sleep(0.05)
            assert "got: from-web from web" in api.logs(), api.logs()
            assert "got: from-api from api" in web.logs(), web.logs()
            assert "127.0.2.1\\tapi" in web.logs()  # its /etc/hosts
            # The host's loopback stays out of reach: api's published port is not, by its host port.
            assert "host-loopback-unreachable" in web.logs()
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    _skip_where_no_port(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list((cache / "pytest" / "services").iterdir())  # the group's directory too


@pytest.mark.sandbox
def test_a_service_on_the_host_network_listens_on_the_host(tmp_path: Path, cache: Path) -> None:
    tests = """
        import socket, urllib.request

        def test_host(bb, lamina_service):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            svc = lamina_service(
                bb, f"mkdir /w; echo on-host > /w/index.html; exec httpd -f -p 127.0.0.1:{port} -h /w",
                ports=[port], network="host",
            )
            assert svc.port() == port
            assert urllib.request.urlopen(svc.url("/"), timeout=5).read() == b"on-host\\n"
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


@pytest.mark.sandbox
def test_xdist_workers_build_a_copied_context_once(tmp_path: Path, cache: Path) -> None:
    pytest.importorskip("xdist")
    tests = """
        import json, os, shutil
        import pytest

        @pytest.fixture(scope="session")
        def image(lamina_build, bb, tmp_path_factory):
            # Each worker copies the context to a directory of its own: another path, the same content.
            context = tmp_path_factory.mktemp("ctx")
            shutil.copytree(os.environ["SRC"], context, dirs_exist_ok=True)
            return lamina_build(context, build_args={"BASE": bb.name})

        @pytest.mark.parametrize("n", [1, 2])
        def test_build(image, n):
            with open(os.environ["OUT"] + f".{os.environ['PYTEST_XDIST_WORKER']}", "w") as f:
                json.dump({"digest": image.digest, "run": image.result.steps_run, "name": image.name}, f)
    """
    src = tmp_path / "src"
    src.mkdir()
    (src / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN sleep 0.5; echo built > /built\n")
    out = tmp_path / "out"
    project = _project(tmp_path / "p", tests)
    extra = {"SRC": str(src), "OUT": str(out)}
    done = _pytest(project, cache, "-q", "-p", "xdist.plugin", "-n", "2", extra_env=extra)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("out.gw*"))]
    assert len(seen) == 2
    assert seen[0]["digest"] == seen[1]["digest"] and seen[0]["name"] == seen[1]["name"]
    assert sorted(s["run"] for s in seen)[0] == 0  # one built it, the other waited and found it cached


@pytest.mark.sandbox
def test_a_command_runs_inside_a_running_service_and_can_be_its_readiness(
    tmp_path: Path, cache: Path
) -> None:
    tests = """
        import pytest
        from lamina.engine.sandbox.idmap import IdMode, detect_ids
        from lamina.fixtures.runs import RunTimeout

        SERVE = "echo started; sleep 0.3; echo up > /tmp/ready; exec sleep 60"

        def test_exec(bb, lamina_service):
            ready = "exec:test -e /tmp/ready"
            svc = lamina_service(bb, SERVE, ports=[], ready=ready, env={"A": "from-service"}, workdir="/tmp")
            # The service's environment, directory, host name, files and processes.
            result = svc.exec('echo "$A $B $(pwd) $(hostname) $(cat /tmp/ready)"', env={"B": "added"})
            assert (result.exit_code, result.stdout) == (0, "from-service added /tmp lamina up\\n")
            assert "sleep 60" in svc.exec(["ps", "-o", "args"]).stdout
            assert svc.exec(["cat"], input="in").stdout == "in"
            assert svc.exec("echo out; echo err >&2; exit 3").exit_code == 3
            if detect_ids().mode is not IdMode.SINGLE:
                assert svc.exec(["id", "-u"], user="65534").stdout == "65534\\n"
            else:  # only root is mapped: said so, as for a RUN step's USER
                with pytest.raises(Exception, match="is not mapped: this sandbox maps only root"):
                    svc.exec(["id", "-u"], user="65534")
            assert svc.exec(["pwd"], workdir="/").stdout == "/\\n"
            with pytest.raises(RunTimeout):
                svc.exec("sleep 30 & sleep 31", timeout=0.5)
            assert "sleep 3" not in svc.exec(["ps", "-o", "args"]).stdout  # killed, with what it started
            svc.stop()
            with pytest.raises(Exception, match="not running"):
                svc.exec("true")

        def test_ready_by_an_argv(bb, lamina_service):
            svc = lamina_service(bb, SERVE, ports=[], ready=["test", "-e", "/tmp/ready"])
            assert svc.exec(["cat", "/tmp/ready"]).stdout == "up\\n"

        def test_never_ready(bb, lamina_service):
            never = "exec:test -e /no"
            lamina_service(bb, "echo waiting-for-nothing; exec sleep 60", ports=[], ready=never, timeout=2)

        def test_exec_output_in_the_report(bb, lamina_service):
            svc = lamina_service(bb, SERVE, ports=[], ready="log:^started$")
            svc.exec("echo exec-said-this")
            assert False, "the test fails"
    """
    started = time.monotonic()
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    assert time.monotonic() - started < 120
    out = done.stdout
    assert "2 failed, 2 passed" in out, out + done.stderr
    assert "was not ready (exec:test -e /no) within 2 s" in out and "waiting-for-nothing" in out
    assert "exec-said-this" in out  # the exec'd command, in the failing test's service section
    assert not list((cache / "pytest" / "services").iterdir())


@pytest.mark.sandbox
def test_a_one_shot_command_reaches_named_services_by_name(tmp_path: Path, cache: Path) -> None:
    tests = """
        import pytest

        SITE = "mkdir /w; echo {} > /w/index.html; exec httpd -f -p {} -h /w"

        @pytest.fixture(scope="session")
        def shared(bb, lamina_session_service):
            return lamina_session_service(bb, SITE.format("from-session", 8080), ports=[8080], name="shared")

        def test_run(bb, shared, lamina_service, lamina_run):
            lamina_service(bb, SITE.format("from-test", 80), ports=[80], name="site")
            result = lamina_run(bb, "wget -q -O- http://site/; wget -q -O- http://shared:8080/", check=True)
            assert result.stdout == "from-test\\nfrom-session\\n"
            # Its own name, in its /etc/hosts as the services' are.
            result = lamina_run(bb, "hostname; grep -c site /etc/hosts", name="client", check=True)
            assert result.stdout == "client\\n1\\n"

        def test_run_reaches_the_session_service_alone(bb, shared, lamina_run):
            assert lamina_run(bb, "wget -q -O- http://shared:8080/", check=True).stdout == "from-session\\n"

        def test_two_services_on_one_port(bb, shared, lamina_service):
            with pytest.raises(pytest.fail.Exception, match="publishes port 8080, as its peer shared does"):
                lamina_service(bb, SITE.format("clash", 8080), ports=[8080], name="clash")
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs")
    _skip_where_no_port(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    assert not list((cache / "pytest" / "services").iterdir())


@pytest.mark.sandbox
def test_ports_are_relayed_where_slirp4netns_cannot_be_had(tmp_path: Path, cache: Path) -> None:
    tests = """
        import urllib.request
        import lamina.engine.sandbox.network as network

        # As on a host without slirp4netns, or with /dev/net/tun closed to the user.
        network.unavailable = lambda: "the default network needs slirp4netns, which is not installed (test)"

        SITE = "mkdir /w; echo {} > /w/index.html; exec httpd -f -v -p {} -h /w"

        def test_relayed(bb, lamina_service, lamina_run):
            site = lamina_service(bb, SITE.format("from-site", 80), ports=[80], name="site")
            assert urllib.request.urlopen(site.url("/"), timeout=5).read() == b"from-site\\n"
            # Listening on its loopback alone is enough: that is where the relay connects.
            local = lamina_service(bb, SITE.format("local", "127.0.0.1:8080"), ports=[8080], name="local")
            assert urllib.request.urlopen(local.url("/"), timeout=5).read() == b"local\\n"
            assert "loopback only" in site.logs()  # the sandbox says what it has
            result = lamina_run(bb, "wget -q -O- http://site/; wget -q -O- http://local:8080/", check=True)
            assert result.stdout == "from-site\\nlocal\\n"
            assert site.exec("wget -q -O- http://127.0.0.1/").stdout == "from-site\\n"
    """
    done = _pytest(_project(tmp_path / "p", tests), cache, "-q", "-rs", "--lamina-require-sandbox")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert not list((cache / "pytest" / "services").iterdir())
