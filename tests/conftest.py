"""Shared fixtures.

- `store`: an open, empty `lamina.cache.store.Store` under tmp_path.
- `busybox_image`: path of an OCI archive of `lamina-test/busybox:1.35`
  built once per session from /bin/busybox (skips when that is missing);
  see tests/support/busybox.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cache.store import Store


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
