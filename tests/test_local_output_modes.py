"""A rootless `-o type=local` tree keeps the image's modes, directories shut to their owner
included (0124, 0000), as BuildKit's rootless local exporter leaves them. lamina's own next
export into that directory must still work (it replaces what the image changed), and the
README's remedy for the user (`chmod -R u+rwX DIR` before `rm -rf DIR`) must too.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.build import BASE, write_context
from tests.support.plainuser import plain_user, plain_user_missing

pytestmark = pytest.mark.sandbox

SHUTS = (
    f"FROM {BASE} AS a\n"
    "RUN mkdir -p /d/e /d/z/y && echo f > /d/e/f && echo g > /d/z/y/g"
    " && chmod 124 /d/e/f /d/e && chmod 0 /d/z/y /d/z\n"
    f"FROM {BASE}\nCOPY --from=a /d /d\n"
)
# The next build: /d/z a file where the shut directory was, /d/e with other content.
REPLACES = f"FROM {BASE} AS a\nRUN mkdir -p /d/e && echo z > /d/z && echo h > /d/e/h && chmod 124 /d/e\n"
REPLACES += f"FROM {BASE}\nCOPY --from=a /d /d\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.skipif(bool(plain_user_missing(ranged=True)), reason=plain_user_missing(ranged=True) or "ready")
def test_rootless_local_output_with_shut_directories_is_exported_over(busybox_image: Path) -> None:
    with plain_user("lamina-localmodes-", ranged=True) as user:
        base = user.base / "base.tar"
        base.write_bytes(busybox_image.read_bytes())
        out = user.base / "out"
        first = write_context(user.base / "first", SHUTS)
        second = write_context(user.base / "second", REPLACES)
        user.give()
        assert user.lamina("load", "-q", str(base)).returncode == 0

        def export(ctx: Path) -> None:
            done = user.lamina("build", "-q", "-o", f"type=local,dest={out}", str(ctx))
            assert done.returncode == 0, done.stderr

        export(first)
        assert (_mode(out / "d/e"), _mode(out / "d/z"), _mode(out / "d/z/y")) == (0o124, 0, 0)  # kept
        export(first)  # the same tree over itself
        export(second)  # a file where a shut directory was, a shut directory's content changed
        assert (out / "d/z").is_file() and _mode(out / "d/e") == 0o124
        as_user = ["runuser", "-u", user.name, "--", "sh", "-c"]
        gone = subprocess.run([*as_user, f"rm -rf {out}"], capture_output=True, text=True)
        assert gone.returncode != 0 and out.exists()  # the modes say so: README's remedy below
        remedy = subprocess.run([*as_user, f"chmod -R u+rwX {out} && rm -rf {out}"], capture_output=True)
        assert remedy.returncode == 0 and not out.exists(), remedy.stderr
