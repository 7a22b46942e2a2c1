"""A base image's ENV, as BuildKit sees it: in every expansion made with the stage's environment.

BuildKit's dispatch expands ARG defaults, ENV, WORKDIR, COPY's paths and RUN --mount values
with the stage's environment, which starts as the base image's Env. `--from` (COPY and RUN
--mount) is never expanded, so an image's ENV cannot reach it (tests/test_frontend_plan.py
has those refusals); FROM sees the global ARGs only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.build import BASE, build, rootfs, write_context

pytestmark = pytest.mark.sandbox


def test_an_image_env_reaches_arg_defaults_workdir_copy_and_mount_values(cache: Path, tmp_path: Path) -> None:
    build(cache, write_context(tmp_path / "base", f"FROM {BASE}\nENV CDIR=/c SRC=/etc\n"), tags=["h2/env:1"])
    text = (
        "FROM h2/env:1\n"
        "ARG X=$CDIR\n"
        "ENV Y=${X}y\n"
        "WORKDIR $CDIR/w\n"
        "COPY f $X/\n"
        "RUN --mount=type=tmpfs,target=$SRC/t sh -c 'grep -c \" /etc/t tmpfs \" /proc/mounts > /mounted'\n"
        'RUN echo "$X $Y $(pwd)" > /seen\n'
    )
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", text, {"f": "hi\n"}), out)
    assert (out / "seen").read_text() == "/c /cy /c/w\n"
    assert (out / "c/f").read_text() == "hi\n"
    assert (out / "mounted").read_text() == "1\n"
