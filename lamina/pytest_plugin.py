"""lamina's pytest plugin: images as test fixtures, with no daemon and no root.

Registered by the `pytest11` entry point `lamina` (`-p no:lamina` turns it
off). Fixtures:

    lamina_cache    (session) Path of the store every build and run uses:
                    --lamina-cache DIR, else $LAMINA_CACHE, else
                    $XDG_CACHE_HOME/lamina (shared by every run on the machine,
                    so a second pytest rebuilds nothing)
    lamina_build    (session) build(context, dockerfile=None, *, target=None,
                    build_args=None, secrets=(), tag=None, network="default")
                    -> lamina.fixtures.images.Image; once per session, with
                    SOURCE_DATE_EPOCH (--lamina-source-date-epoch, else the
                    environment's, else 0); a build error fails the test with
                    the Dockerfile line
    lamina_run      run(image, command=(), *, env=, workdir=, user=, mounts=,
                    network="default", input=None, timeout=60, check=False,
                    name=None) -> RunResult (exit_code, stdout, stderr);
                    check=True fails the test on a non-zero exit; a timeout
                    always fails it. It reaches the test's and the session's
                    named services by name
    lamina_service  service(image, command=(), *, ports=EXPOSEd, ready="tcp",
                    timeout=30, stop_timeout=0, env=, workdir=, user=,
                    mounts=, name=None) -> Service (port(80), url(path),
                    logs(), exec(command)); stopped at the test's end.
                    ready: "tcp", "http:/PATH", "log:REGEX", "exec:COMMAND"
                    or an argv (run inside it until it exits 0), a callable,
                    None. Services given a `name` reach each other by it
                    (name:PORT for each port the peer publishes;
                    lamina.fixtures.peers)
    lamina_session_service
                    (session) the same, stopped at the session's end: for a
                    session fixture of your own that many tests share

Marker: `@pytest.mark.lamina_sandbox` skips a test, with the reason, where
no isolation for a RUN step is possible here (the sandbox's own probe:
no namespaces, and not root for chroot); `lamina_sandbox(ports=True)` also
where no port can be published (no network namespace, no slirp4netns,
/dev/net/tun closed).
`--lamina-require-sandbox` turns those skips (and lamina_service's own)
into failures, for a CI that must not pass by skipping.

A failing test's report carries the output of every command it ran and the
log of every service it started. Services left by a killed pytest are
killed at the next start (the cache's pytest/services directory).

Importing this module must stay cheap: pytest imports it in every session
of an environment where lamina is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lamina.fixtures.images import Builder, Image
    from lamina.fixtures.peers import Group
    from lamina.fixtures.runs import RunResult
    from lamina.fixtures.services import Service

_REPORTS = pytest.StashKey[list[Callable[[], tuple[str, str]]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lamina", "lamina: images as test fixtures")
    group.addoption(
        "--lamina-cache",
        metavar="DIR",
        help="lamina's store for builds and runs (default: $LAMINA_CACHE, else $XDG_CACHE_HOME/lamina)",
    )
    group.addoption(
        "--lamina-source-date-epoch",
        metavar="N",
        type=int,
        help="SOURCE_DATE_EPOCH for fixture builds (default: the environment's, else 0)",
    )
    group.addoption(
        "--lamina-require-sandbox",
        action="store_true",
        help="fail, rather than skip, a test that needs a sandbox (or a port) this host cannot give",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lamina_sandbox(ports=False): skip (with the reason) where this host cannot make a lamina "
        "sandbox, or with ports=True publish a port; --lamina-require-sandbox fails instead",
    )


_NO_SANDBOX = pytest.StashKey[str]()


def _cannot(config: pytest.Config, ports: bool) -> str:
    """Why this host cannot run a sandbox (or publish a port with `ports`), or ""."""
    if _NO_SANDBOX not in config.stash:
        from lamina.fixtures.probe import why_no_sandbox

        config.stash[_NO_SANDBOX] = why_no_sandbox()
    why = config.stash[_NO_SANDBOX]
    if not why and ports:
        from lamina.fixtures.probe import why_no_port

        why = why_no_port()
    return why


def _skip(config: pytest.Config, why: str, *, at_item: bool = False) -> None:
    if config.getoption("--lamina-require-sandbox", False):
        pytest.fail(f"{why} (--lamina-require-sandbox)", pytrace=False)
    # at_item: the skip summary names the test, as skipif's does, not this file.
    raise pytest.skip.Exception(why, _use_item_location=at_item)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("lamina_sandbox")
    if marker is not None:
        why = _cannot(item.config, bool(marker.kwargs.get("ports", False)))
        if why:
            _skip(item.config, why, at_item=True)


def _cache_dir(config: pytest.Config) -> Path:
    chosen = config.getoption("--lamina-cache", None)
    if chosen:
        return Path(chosen).absolute()
    from lamina.cache.store import default_cache_root

    return Path(default_cache_root(os.environ)).absolute()


def pytest_sessionstart(session: pytest.Session) -> None:
    services = _cache_dir(session.config) / "pytest" / "services"
    if not services.is_dir():
        return  # no service ever ran with this cache: nothing to import or sweep
    from lamina.fixtures.services import sweep

    swept = sweep(services)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if swept and reporter is not None:
        reporter.write_line(f"lamina: stopped {len(swept)} service(s) a previous pytest left running")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for section in item.stash.get(_REPORTS, []):
            report.sections.append(section())
        if "lamina_session_service" in getattr(item, "fixturenames", ()):
            for svc in item.config.stash.get(_SESSION_SERVICES, []):
                report.sections.append((f"lamina session service {svc.name} log", _service_report(svc)))


_TEST_GROUP = pytest.StashKey[list["Group"]]()  # a test's named services (and runs), once it has one


def _test_group(request: pytest.FixtureRequest) -> list[Group]:
    """The test's group of named services, shared by lamina_service and lamina_run: [] or [group]."""
    node = request.node
    if _TEST_GROUP not in node.stash:
        node.stash[_TEST_GROUP] = []
    return node.stash[_TEST_GROUP]


def _reports(request: pytest.FixtureRequest) -> list[Callable[[], tuple[str, str]]]:
    node = request.node
    if _REPORTS not in node.stash:
        node.stash[_REPORTS] = []
    return node.stash[_REPORTS]


@pytest.fixture(scope="session")
def lamina_cache(pytestconfig: pytest.Config) -> Path:
    """The lamina store the fixtures build into and run from."""
    path = _cache_dir(pytestconfig)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def lamina_build(
    lamina_cache: Path, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Image]:
    """build(context, dockerfile=None, *, target, build_args, secrets, tag, network) -> Image."""
    from lamina.fixtures.images import Builder, BuildFailed

    epoch = pytestconfig.getoption("--lamina-source-date-epoch", None)
    if epoch is None:
        text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        epoch = int(text) if text.isdigit() else 0
    builder: Builder = Builder(lamina_cache, tmp_path_factory.mktemp("lamina"), source_date_epoch=epoch)

    def build(context: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Image:
        try:
            return builder(context, *args, **kwargs)
        except BuildFailed as err:
            pytest.fail(f"lamina build {context}: {err}", pytrace=False)

    return build


@pytest.fixture
def lamina_run(lamina_cache: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunResult]]:
    """run(image, command=(), *, env, workdir, user, mounts, network, input, timeout=60, check=False,
    name=None).

    On the default network the command reaches the test's (and the
    session's) named services by name, as a service does; `name` is its
    own host name then.
    """
    from lamina.errors import LaminaError
    from lamina.fixtures.runs import RunTimeout, run_command

    reports = _reports(request)
    group = _test_group(request)
    count = iter(range(1, 1 << 30))

    def run(
        image: Image | str, command: Any = (), *, check: bool = False, name: str | None = None, **kwargs: Any
    ) -> RunResult:
        if isinstance(command, str):
            command = ["/bin/sh", "-c", command]
        member = None
        if name is not None and kwargs.get("network", "default") != "default":
            pytest.fail(f"lamina run {image}: name= needs the default network", pytrace=False)
        try:
            if kwargs.get("network", "default") == "default" and (
                group or request.config.stash.get(_SESSION_GROUP, []) or name
            ):
                # Named services to reach: the command joins their group, publishing nothing.
                if not group:
                    group.append(_group(lamina_cache / "pytest" / "services", request.config))
                member = name or f"run-{next(count)}"
                kwargs["mounts"] = [*kwargs.get("mounts", ()), group[0].reserve(member)]
                kwargs.setdefault("hostname", member)
                peers = group[0]
                kwargs["on_running"] = lambda pid: peers.join(member, pid, {})
            result = run_command(str(image), command, cache_dir=lamina_cache, **kwargs)
        except RunTimeout as err:
            pytest.fail(f"{err}\n{err.result.describe()}", pytrace=False)
        except LaminaError as err:
            pytest.fail(f"lamina run {image}: {err}", pytrace=False)
        finally:
            if member is not None:
                group[0].leave(member)
        reports.append(lambda: (f"lamina run {' '.join(result.argv)}"[:120], result.describe()))
        if check and result.exit_code != 0:
            pytest.fail(f"command failed:\n{result.describe()}", pytrace=False)
        return result

    try:
        yield run
    finally:
        _stop_all([], group)


@pytest.fixture
def lamina_service(lamina_cache: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Service]]:
    """service(image, command=(), *, ports, ready, timeout, stop_timeout, env, workdir, user, mounts)

    -> Service, stopped at the end of the test.
    """
    started: list[Service] = []
    group = _test_group(request)
    reports = _reports(request)
    try:
        yield _service_factory(lamina_cache, request.config, started, reports.append, group, test=True)
    finally:
        _stop_all(started, group)


_SESSION_SERVICES = pytest.StashKey[list["Service"]]()
_SESSION_GROUP = pytest.StashKey[list["Group"]]()  # empty until a session service has a name


@pytest.fixture(scope="session")
def lamina_session_service(
    lamina_cache: Path, pytestconfig: pytest.Config
) -> Iterator[Callable[..., Service]]:
    """As lamina_service, but each service runs until the session ends (one per xdist worker).

    A failing test that depends on this fixture gets the log of every
    session service in its report.
    """
    started: list[Service] = []
    group: list[Group] = []
    pytestconfig.stash[_SESSION_SERVICES] = started
    pytestconfig.stash[_SESSION_GROUP] = group
    try:
        yield _service_factory(lamina_cache, pytestconfig, started, lambda section: None, group)
    finally:
        _stop_all(started, group)
        del pytestconfig.stash[_SESSION_SERVICES], pytestconfig.stash[_SESSION_GROUP]


def _stop_all(started: list[Service], group: list[Group]) -> None:
    import shutil

    for svc in reversed(started):
        svc.stop()
    for g in group:
        shutil.rmtree(g.directory, ignore_errors=True)


def _service_factory(
    lamina_cache: Path,
    config: pytest.Config,
    started: list[Service],
    report: Callable[[Callable[[], tuple[str, str]]], None],
    group: list[Group],  # its named services' group, made on the first
    *,
    test: bool = False,  # a test's factory: its services reach the session's by name
) -> Callable[..., Service]:
    from lamina.errors import LaminaError
    from lamina.fixtures import services

    def service(image: Image | str, command: Any = (), *, name: str | None = None, **kwargs: Any) -> Service:
        if isinstance(command, str):
            command = ["/bin/sh", "-c", command]
        if "ports" not in kwargs:  # as `docker run -P`: every TCP port the image EXPOSEs
            exposed = image.config.config.exposed_ports if not isinstance(image, str) else ()
            kwargs["ports"] = [int(p.split("/")[0]) for p in exposed if p.partition("/")[2] in ("", "tcp")]
        env = kwargs.pop("env", ())
        if isinstance(env, dict):
            env = [f"{k}={v}" for k, v in env.items()]
        services_dir = lamina_cache / "pytest" / "services"
        try:
            if name is not None:
                if kwargs.get("network", "default") != "default":
                    pytest.fail(f"lamina service {image}: name= needs the default network", pytrace=False)
                if not group:
                    group.append(_group(services_dir, config if test else None))
                kwargs["mounts"] = [*kwargs.get("mounts", ()), group[0].reserve(name)]
                kwargs.setdefault("hostname", name)
                kwargs["on_running"] = lambda svc: _join(group[0], name, svc)
            svc = services.start(
                str(image),
                services_dir=services_dir,
                cache_dir=lamina_cache,
                command=command,
                env=env,
                **kwargs,
            )
        except services.Unavailable as err:
            _skip(config, f"lamina service {image}: {err}")
        except LaminaError as err:
            pytest.fail(f"lamina service {image}: {err}", pytrace=False)
        started.append(svc)
        report(lambda: (f"lamina service {svc.name} log", _service_report(svc)))
        return svc

    return service


def _service_report(svc: Service) -> str:
    """Its log, then each command exec'd in it with its output."""
    return "\n".join([svc.logs().rstrip("\n"), *(f"--- exec ---\n{r.describe()}" for r in svc.execs)])


def _group(services_dir: Path, test_of: pytest.Config | None) -> Group:
    """A group of named services, its hosts files in a directory swept as a service's is.

    A test's (`test_of` its config) has the session's group, if any, as parent.
    """
    import uuid

    from lamina.fixtures import peers, services

    directory = services_dir / f"peers-{uuid.uuid4().hex[:12]}"
    directory.mkdir(parents=True)
    services.write_owner(directory, os.getpid())
    if test_of is None:
        return peers.Group(directory)

    def parent() -> Group | None:
        session = test_of.stash.get(_SESSION_GROUP, [])
        return session[0] if session else None

    return peers.Group(directory, prefix=peers.TEST_PREFIX, parent=parent)


def _join(group: Group, name: str, svc: Service) -> None:
    group.join(name, svc.sandbox_pid, svc.ports)
    svc.on_stop.append(lambda: group.leave(name))
