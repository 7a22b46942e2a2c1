"""The example's tests: they use only lamina's pytest plugin (lamina_build, lamina_run, lamina_service)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"


def test_the_site_is_served(web, lamina_service):
    server = lamina_service(web)  # publishes the image's EXPOSE 80 on a free port of 127.0.0.1
    with urllib.request.urlopen(server.url("/"), timeout=10) as response:
        body = response.read().decode()
    assert "version 1.2.3" in body
    assert "GET /" in server.logs() or "response:200" in server.logs()


def test_a_mirror_reaches_the_site_by_name(web, base, lamina_service):
    # Services given a name reach each other by it (as a podman pod's do), and nothing else of the host.
    lamina_service(web, name="site")
    mirror = lamina_service(
        base,
        "mkdir /m; until wget -q -O /m/index.html http://site/; do sleep 0.05; done; "
        "exec httpd -f -p 8080 -h /m",
        ports=[8080],
        ready="http:/",
        name="mirror",
    )
    with urllib.request.urlopen(mirror.url("/"), timeout=10) as response:
        assert "version 1.2.3" in response.read().decode()


def test_the_version_file(web, lamina_run):
    result = lamina_run(web, ["cat", "/www/version.txt"], check=True)
    assert result.stdout == "1.2.3\n"


def test_env_and_workdir(web, lamina_run):
    result = lamina_run(web, 'echo "$GREETING from $(pwd)"', env={"GREETING": "hello"}, workdir="/www")
    assert result.exit_code == 0
    assert result.stdout == "hello from /www\n"


def test_the_checker_accepts_the_pages(tool, lamina_run):
    result = lamina_run(tool, ["/data/index.html", "/data/version.txt"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["ok /data/index.html 74", "ok /data/version.txt 6"]


def test_the_checker_rejects_an_empty_file(tool, lamina_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = lamina_run(tool, ["/in/empty.txt"], mounts=[(tmp_path, "/in")])
    assert result.exit_code == 1
    assert result.stderr == "empty or missing: /in/empty.txt\n"


def test_builds_are_reproducible(web, lamina_build, base):
    # The same inputs under another name: the same bytes, so the same digest.
    again = lamina_build(
        APP, target="web", build_args={"BASE": base.name}, tag="pytest-fixtures-example/web:again"
    )
    assert again.digest == web.digest
    assert web.config.config.exposed_ports == ("80/tcp",)
