"""Credentials found as docker and podman find them; WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from lamina.errors import CredentialError
from lamina.oci.auth import (
    Challenge,
    Credential,
    erase_credential,
    find_credential,
    parse_challenges,
    store_credential,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_docker_config(home: Path, config: dict[str, object]) -> Path:
    path = home / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def fake_helper(bindir: Path, name: str, store_file: Path) -> None:
    """A docker-credential-<name> that keeps one JSON file of {server: [user, secret]}."""
    script = bindir / f"docker-credential-{name}"
    script.write_text(
        f"""#!/usr/bin/env python3
import json, sys
path = {str(store_file)!r}
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {{}}
action = sys.argv[1]
if action == "get":
    server = sys.stdin.read().strip()
    if server not in data:
        print("credentials not found in native keychain")
        sys.exit(1)
    user, secret = data[server]
    print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
elif action == "store":
    req = json.load(sys.stdin)
    data[req["ServerURL"]] = [req["Username"], req["Secret"]]
    json.dump(data, open(path, "w"))
elif action == "erase":
    data.pop(sys.stdin.read().strip(), None)
    json.dump(data, open(path, "w"))
"""
    )
    script.chmod(0o755)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    return {"HOME": str(home), "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_docker_config_auth_field(env: dict[str, str]) -> None:
    write_docker_config(Path(env["HOME"]), {"auths": {"ghcr.io": {"auth": b64("me:pa:ss")}}})
    assert find_credential("ghcr.io", env) == Credential("me", "pa:ss")
    assert find_credential("quay.io", env) is None


def test_docker_hub_legacy_key(env: dict[str, str]) -> None:
    write_docker_config(
        Path(env["HOME"]), {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}}
    )
    assert find_credential("docker.io", env) == Credential("hub", "pw")


def test_url_keys_and_username_password_fields(env: dict[str, str]) -> None:
    auths = {"https://reg.example:5000": {"username": "u", "password": "p"}}
    write_docker_config(Path(env["HOME"]), {"auths": auths})
    assert find_credential("reg.example:5000", env) == Credential("u", "p")


def test_identity_token(env: dict[str, str]) -> None:
    write_docker_config(Path(env["HOME"]), {"auths": {"r.io": {"identitytoken": "refresh"}}})
    credential = find_credential("r.io", env)
    assert credential is not None and credential.identity_token == "refresh"


def test_registry_auth_file_comes_first(env: dict[str, str], tmp_path: Path) -> None:
    write_docker_config(Path(env["HOME"]), {"auths": {"r.io": {"auth": b64("docker:1")}}})
    podman = tmp_path / "auth.json"
    podman.write_text(json.dumps({"auths": {"r.io": {"auth": b64("podman:2")}}}))
    assert find_credential("r.io", {**env, "REGISTRY_AUTH_FILE": str(podman)}) == Credential("podman", "2")
    # and a registry only the docker file knows still resolves
    assert find_credential("r.io", env) == Credential("docker", "1")


def test_docker_config_env_var(env: dict[str, str], tmp_path: Path) -> None:
    config_dir = tmp_path / "dc"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": b64("dc:3")}}}))
    assert find_credential("r.io", {**env, "DOCKER_CONFIG": str(config_dir)}) == Credential("dc", "3")


def test_cred_helpers_per_registry(env: dict[str, str], tmp_path: Path) -> None:
    bindir = Path(env["PATH"].split(":")[0])
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"r.io": ["helped", "s3"]}))
    fake_helper(bindir, "fake", secrets)
    write_docker_config(
        Path(env["HOME"]), {"credHelpers": {"r.io": "fake"}, "auths": {"r.io": {"auth": b64("file:x")}}}
    )
    assert find_credential("r.io", env) == Credential("helped", "s3")


def test_creds_store_and_not_found(env: dict[str, str], tmp_path: Path) -> None:
    bindir = Path(env["PATH"].split(":")[0])
    fake_helper(bindir, "store", tmp_path / "secrets.json")
    write_docker_config(Path(env["HOME"]), {"credsStore": "store"})
    assert find_credential("r.io", env) is None


def test_missing_helper_is_one_line_error(env: dict[str, str]) -> None:
    write_docker_config(Path(env["HOME"]), {"credsStore": "does-not-exist"})
    with pytest.raises(CredentialError) as info:
        find_credential("r.io", env)
    assert str(info.value) == "docker-credential-does-not-exist get: helper not found on PATH"


def test_corrupt_config_names_the_file(env: dict[str, str]) -> None:
    path = Path(env["HOME"]) / ".docker" / "config.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(CredentialError) as info:
        find_credential("r.io", env)
    assert str(info.value).startswith(f"{path}: not valid JSON")


def test_bad_base64_auth(env: dict[str, str]) -> None:
    write_docker_config(Path(env["HOME"]), {"auths": {"r.io": {"auth": "!!!"}}})
    with pytest.raises(CredentialError, match="not base64"):
        find_credential("r.io", env)


def test_store_writes_private_file_and_round_trips(env: dict[str, str]) -> None:
    path = store_credential("r.io:5000", Credential("u", "p"), env)
    assert path == Path(env["HOME"]) / ".docker" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert find_credential("r.io:5000", env) == Credential("u", "p")
    assert erase_credential("r.io:5000", env) is True
    assert find_credential("r.io:5000", env) is None
    assert erase_credential("r.io:5000", env) is False


def test_store_keeps_other_entries(env: dict[str, str]) -> None:
    write_docker_config(Path(env["HOME"]), {"auths": {"a.io": {"auth": b64("a:1")}}, "psFormat": "x"})
    store_credential("b.io", Credential("b", "2"), env)
    config = json.loads((Path(env["HOME"]) / ".docker" / "config.json").read_text())
    assert config["psFormat"] == "x"
    assert find_credential("a.io", env) == Credential("a", "1")


def test_store_uses_registry_auth_file(env: dict[str, str], tmp_path: Path) -> None:
    auth_file = tmp_path / "containers" / "auth.json"
    assert (
        store_credential("r.io", Credential("u", "p"), {**env, "REGISTRY_AUTH_FILE": str(auth_file)})
        == auth_file
    )
    assert json.loads(auth_file.read_text())["auths"]["r.io"]["auth"] == b64("u:p")


def test_store_and_erase_through_helper(env: dict[str, str], tmp_path: Path) -> None:
    bindir = Path(env["PATH"].split(":")[0])
    secrets = tmp_path / "secrets.json"
    fake_helper(bindir, "fake", secrets)
    write_docker_config(Path(env["HOME"]), {"credsStore": "fake"})
    store_credential("r.io", Credential("u", "p"), env)
    assert json.loads(secrets.read_text()) == {"r.io": ["u", "p"]}
    config = json.loads((Path(env["HOME"]) / ".docker" / "config.json").read_text())
    assert config["auths"]["r.io"] == {}  # the secret lives in the helper only
    assert find_credential("r.io", env) == Credential("u", "p")
    erase_credential("r.io", env)
    assert json.loads(secrets.read_text()) == {}


def test_credential_repr_hides_secret() -> None:
    assert "hunter2" not in repr(Credential("u", "hunter2"))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                Challenge(
                    "bearer",
                    (
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:library/alpine:pull"),
                    ),
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", (("realm", "Registry Realm"),))]),
        (
            'Basic realm="a", Bearer realm="b",scope="x:y:pull,push"',
            [
                Challenge("basic", (("realm", "a"),)),
                Challenge("bearer", (("realm", "b"), ("scope", "x:y:pull,push"))),
            ],
        ),
        (
            'Bearer realm="quo\\"te", error=invalid_token',
            [Challenge("bearer", (("realm", 'quo"te'), ("error", "invalid_token")))],
        ),
        ("", []),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert list(parse_challenges(header)) == expected
