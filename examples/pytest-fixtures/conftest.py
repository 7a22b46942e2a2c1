"""The images this suite tests, built once per session by lamina's pytest plugin."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def base(lamina_build, tmp_path_factory):
    """A busybox base image made FROM scratch with the host's static busybox."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    context = tmp_path_factory.mktemp("base")
    shutil.copytree(HERE / "base", context, dirs_exist_ok=True)
    shutil.copy2(busybox, context / "busybox")
    return lamina_build(context, tag="pytest-fixtures-example/busybox:latest")


@pytest.fixture(scope="session")
def web(lamina_build, base):
    return lamina_build(HERE / "app", target="web", build_args={"BASE": base.name})


@pytest.fixture(scope="session")
def tool(lamina_build, base):
    return lamina_build(HERE / "app", target="tool", build_args={"BASE": base.name})
