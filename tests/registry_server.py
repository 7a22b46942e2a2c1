"""Start Debian's `docker-registry` on 127.0.0.1 for tests: open, htpasswd basic auth, or token auth.

Each instance gets a free port, a temporary storage directory and its own
config file, and is stopped (by its pid) when the context exits. Token auth
runs a tiny token service in a thread that checks a user and password and
signs RS256 JWTs with `openssl`, trusted by the registry through the
certificate it is given (`rootcertbundle`) and the token's `x5c` header.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.support.servers import free_port

REGISTRY = shutil.which("docker-registry")
HTPASSWD = shutil.which("htpasswd")
OPENSSL = shutil.which("openssl")
SKOPEO = shutil.which("skopeo")
USER, PASSWORD = "lamina", "s3cret-pass"
SERVICE = "lamina-test-registry"
ISSUER = "lamina-test-issuer"


@dataclasses.dataclass(frozen=True, slots=True)
class Registry:
    host: str  # "127.0.0.1:PORT"
    storage: Path
    auth: str  # "none", "basic" or "token"


@contextlib.contextmanager
def running_registry(workdir: Path, auth: str = "none") -> Iterator[Registry]:
    """Run a registry under `workdir` until the context exits."""
    assert REGISTRY is not None, "docker-registry is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        auth_config = ""
        if auth == "basic":
            htpasswd = workdir / "htpasswd"
            subprocess.run([HTPASSWD or "htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True,
                           capture_output=True)  # fmt: skip
            auth_config = f"auth:\n  htpasswd:\n    realm: lamina-test\n    path: {htpasswd}\n"
        elif auth == "token":
            token_url, cert = stack.enter_context(_token_service(workdir))
            auth_config = (
                f"auth:\n  token:\n    realm: {token_url}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {cert}\n"
            )
        for _ in range(5):  # the free port can be taken between our probe and the registry's bind
            port = free_port()
            config = workdir / "config.yml"
            config.write_text(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n{auth_config}"
            )
            log = open(workdir / "registry.log", "ab")  # noqa: SIM115 - closed with the process below
            process = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log, stderr=log)
            if _wait_ready(port, process):
                break
            process.kill()
            process.wait()
            log.close()
        else:
            raise RuntimeError(f"docker-registry did not start; see {workdir / 'registry.log'}")
        try:
            yield Registry(f"127.0.0.1:{port}", storage, auth)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            return True
        except urllib.error.HTTPError:  # 401 from an auth-enabled registry: it is serving
            return True
        except OSError:
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def _token_service(workdir: Path) -> Iterator[tuple[str, Path]]:
    assert OPENSSL is not None, "openssl is not installed"
    key, cert = workdir / "token.key", workdir / "token.crt"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=lamina-test-token"],
        check=True, capture_output=True,
    )  # fmt: skip
    der = subprocess.run([OPENSSL, "x509", "-in", str(cert), "-outform", "DER"], check=True,
                         capture_output=True).stdout  # fmt: skip
    x5c = base64.b64encode(der).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            header = self.headers.get("Authorization", "")
            user = None
            if header.startswith("Basic "):
                name, _, secret = base64.b64decode(header[6:]).decode().partition(":")
                if (name, secret) != (USER, PASSWORD):
                    self.send_response(401)
                    self.end_headers()
                    return
                user = name
            access = []
            for scope in (one for value in query.get("scope", []) for one in value.split()):
                kind, rest = scope.split(":", 1)
                name, actions = rest.rsplit(":", 1)
                # Anonymous users may pull; only the known user may push.
                allowed = [a for a in actions.split(",") if user is not None or a == "pull"]
                access.append({"type": kind, "name": name, "actions": allowed})
            token = _jwt(key, x5c, user or "", access)
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", cert
    finally:
        server.shutdown()
        server.server_close()


def _jwt(key: Path, x5c: str, subject: str, access: list[dict[str, object]]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
    claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
              "iat": now, "jti": os.urandom(8).hex(), "access": access}  # fmt: skip
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sign = [OPENSSL or "openssl", "dgst", "-sha256", "-sign", str(key)]
    signature = subprocess.run(sign, input=signing_input.encode(), check=True, capture_output=True).stdout
    return f"{signing_input}.{b64(signature)}"
