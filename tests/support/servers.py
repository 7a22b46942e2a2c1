"""Small servers on the host's loopback for tests and benchmarks: files over HTTP, a TCP echo."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _NoLastModified(_Quiet):
    """A server that does not say when a file changed (no Last-Modified header)."""

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() != "last-modified":
            super().send_header(keyword, value)


@contextlib.contextmanager
def serve_directory(root: str | os.PathLike[str], last_modified: bool = True) -> Iterator[str]:
    """The files under `root` over HTTP on 127.0.0.1 until the block ends; yields
    http://127.0.0.1:PORT (no trailing slash). `last_modified=False`: no Last-Modified header."""
    handler = functools.partial(_Quiet if last_modified else _NoLastModified, directory=os.fspath(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def loopback_server(reply: bytes = b"") -> Iterator[int]:
    """A TCP server on 127.0.0.1 that writes `reply` to each connection and hangs up; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # the 0.2 s timeout: look at `stop` again
                continue
            with conn:
                if reply:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()
