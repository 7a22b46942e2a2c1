"""Shared fixtures.

- `store`: an open, empty `lamina.cache.store.Store` under tmp_path.
- `cache`: a cache directory under tmp_path holding `busybox_image` (the
  build tests' store; `tests.support.build` has the helpers that use it).
- `from tests.support import make_busybox_rootfs, make_busybox_image`
  for the base image helpers; `tests.support.schema.check_document` for
  the OCI JSON schemas.
- `busybox_image`: path of an OCI archive of `lamina-test/busybox:1.35`
  built once per session from /bin/busybox (skips when that is missing);
  see tests/support/busybox.py.
- `multiplatform_image`: lamina-test/busybox-multi:1.35 (amd64, arm64, arm/v7 under one
  index) as an OCI archive and layout; see tests/support/multiplatform.py.
- `registry`: Debian's docker-registry on 127.0.0.1, open (no auth), one
  per test module (skips when it is not installed); tests/registry_server.py.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.store import Store

# tests/ is not a package (other tests import their siblings by bare name), so
# put the repository root on the path for `from tests.support import ...`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config: pytest.Config) -> None:
    # A shell starting the suite as a background job (`.ci/run &`, nohup) makes it ignore
    # SIGINT and SIGQUIT, and every program it starts inherits that: lamina would then rightly
    # not stop on the Ctrl-C the interrupt tests send. Give the suite's children the defaults.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session", autouse=True)
def _rootless_tmp_cleanup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Run as a user with subordinate ids, remove what the suite's rootless builds left in
    /tmp/pytest-of-USER, which pytest itself cannot (tests/support/rootlesstmp.py)."""
    yield
    from tests.support.rootlesstmp import remove_leftovers

    passed = request.session.testsfailed == 0
    remove_leftovers(tmp_path_factory.getbasetemp(), this_session=passed)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "cache") as opened:
        yield opened


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI archive of lamina-test/busybox:1.35 (made once per session)."""
    from tests.support.busybox import BUSYBOX, make_busybox_image

    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    return make_busybox_image(tmp_path_factory.mktemp("busybox"))


@pytest.fixture(scope="session")
def multiplatform_image(tmp_path_factory: pytest.TempPathFactory) -> object:
    """lamina-test/busybox-multi:1.35: the amd64 busybox image and its arm64 and arm/v7 twins (Debian's
    busybox-static:arm64/armhf) under one index, as an OCI archive and an OCI layout directory
    (a `tests.support.multiplatform.MultiPlatformImage`, made once per session)."""
    from tests.support.multiplatform import make_multiplatform_image, why_no_arm64

    why = why_no_arm64()
    if why is not None:
        pytest.skip(why)
    return make_multiplatform_image(tmp_path_factory.mktemp("multiplatform"))


@pytest.fixture
def cache(tmp_path: Path, busybox_image: Path) -> Path:
    """A lamina cache under tmp_path holding lamina-test/busybox:1.35 (tests.support.build.make_cache)."""
    from tests.support.build import make_cache

    return make_cache(tmp_path, busybox_image)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """An open docker-registry on 127.0.0.1 for the module's tests (a `registry_server.Registry`)."""
    from tests import registry_server

    if registry_server.REGISTRY is None:
        pytest.skip("docker-registry is not installed")
    with registry_server.running_registry(tmp_path_factory.mktemp("registry"), "none") as running:
        yield running
