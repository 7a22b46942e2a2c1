"""`git daemon` on a free 127.0.0.1 port, for tests and benchmarks that build from a git URL."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support.servers import free_port


@contextlib.contextmanager
def git_daemon(base: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """The repositories under `base` served read-only by `git daemon` until the block ends;
    yields the URL they are under (git://127.0.0.1:PORT), once the daemon listens."""
    port = free_port()
    daemon = subprocess.Popen(
        [
            "git",
            "daemon",
            "--export-all",
            f"--base-path={base}",
            "--listen=127.0.0.1",
            f"--port={port}",
            str(base),
        ],
        env=None if env is None else dict(env),
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.01)
        yield f"git://127.0.0.1:{port}"
    finally:
        daemon.terminate()
        daemon.wait()
