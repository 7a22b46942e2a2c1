"""The site served by a Python app on a Debian base: readiness by a command, exec, a client by name."""

from __future__ import annotations

import json
import urllib.request

import pytest

# Ready once the app answers an HTTP request made inside the service (bash is in
# the image, curl is not; bash's /dev/tcp costs a few milliseconds, python3 -c a tenth of a second).
READY = [
    "bash",
    "-c",
    "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /api/version HTTP/1.0\\r\\n\\r\\n' >&3 "
    "&& grep -q version <&3",
]


@pytest.fixture(scope="session")
def app(pyweb, lamina_session_service):
    """One app for the session, shared by the tests (and reached by the name `api`)."""
    return lamina_session_service(pyweb, ready=READY, name="api")  # publishes its EXPOSE 8000


def test_the_python_app_serves_the_version(app):
    with urllib.request.urlopen(app.url("/api/version"), timeout=10) as response:
        assert json.load(response) == {"version": "1.2.3"}
    with urllib.request.urlopen(app.url("/"), timeout=10) as response:
        assert "version 1.2.3" in response.read().decode()
    # A command inside the running service sees what the app wrote.
    log = app.exec(["cat", "/tmp/requests.log"])
    assert log.exit_code == 0
    assert {"/api/version", "/"} <= set(log.stdout.splitlines())


def test_a_one_shot_client_reaches_the_app_by_name(app, base, lamina_run):
    result = lamina_run(base, "wget -q -O- http://api:8000/api/version", check=True)
    assert json.loads(result.stdout) == {"version": "1.2.3"}


def test_python_in_the_image(pyweb, lamina_run):
    result = lamina_run(pyweb, ["python3", "-c", "import sys; print(sys.version_info[0])"], check=True)
    assert result.stdout == "3\n"
