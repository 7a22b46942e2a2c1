"""The site served by a Python app on a Debian base: readiness by a command, exec, a client by name."""

from __future__ import annotations

import json
import urllib.request

# Ready once a request from inside the service gets an answer (python3 is in the image, curl is not).
READY = ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/api/version')"]


def test_the_python_app_serves_the_version(pyweb, lamina_service):
    app = lamina_service(pyweb, ready=READY)  # publishes the image's EXPOSE 8000
    with urllib.request.urlopen(app.url("/api/version"), timeout=10) as response:
        assert json.load(response) == {"version": "1.2.3"}
    with urllib.request.urlopen(app.url("/"), timeout=10) as response:
        assert "version 1.2.3" in response.read().decode()
    # A command inside the running service sees what the app wrote.
    log = app.exec(["cat", "/tmp/requests.log"])
    assert log.exit_code == 0
    assert log.stdout.splitlines()[-2:] == ["/api/version", "/"]


def test_a_one_shot_client_reaches_the_app_by_name(pyweb, base, lamina_service, lamina_run):
    lamina_service(pyweb, ready=READY, name="api")
    result = lamina_run(base, "wget -q -O- http://api:8000/api/version", check=True)
    assert json.loads(result.stdout) == {"version": "1.2.3"}


def test_python_in_the_image(pyweb, lamina_run):
    result = lamina_run(pyweb, ["python3", "-c", "import sys; print(sys.version_info[0])"], check=True)
    assert result.stdout == "3\n"
