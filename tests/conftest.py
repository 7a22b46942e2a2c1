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
