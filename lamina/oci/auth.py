"""Registry credentials, found where docker, podman and skopeo keep them.

Files, first match wins:
  1. `$REGISTRY_AUTH_FILE` (podman/skopeo's auth.json, same format)
  2. `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`

In each file a registry is looked up in `credHelpers` (a per-registry
`docker-credential-<name>` helper), then `auths` (base64 `user:password` in
`auth`, or `username`/`password`, or an `identitytoken`), then `credsStore`
(one helper for every registry). Helpers speak docker's credential-helper
protocol: `get`/`erase` read a server URL on stdin, `store` reads
`{"ServerURL", "Username", "Secret"}`; `get` answers with the same JSON.

This module also parses `WWW-Authenticate` challenges; the HTTP side of the
token flow lives in the registry client. Nothing here reads the environment
on import: every function takes the environment it should use.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

from lamina.errors import CredentialError
from lamina.oci.reference import DOCKER_HUB, DOCKER_HUB_LEGACY_KEYS

_HELPER_TIMEOUT = 30  # seconds; a helper waiting on a locked keychain should not hang a build
_NOT_FOUND = "credentials not found"


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """A user name and secret; `identity_token` is an OAuth2 refresh token (docker's `identitytoken`)."""

    username: str
    password: str
    identity_token: str | None = None

    def __repr__(self) -> str:  # never print a secret by accident
        return f"Credential(username={self.username!r}, password=***)"


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme (lowercase) and its parameters."""

    scheme: str
    params: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        for name, value in self.params:
            if name == key:
                return value
        return None


def auth_files(env: Mapping[str, str]) -> tuple[Path, ...]:
    """The auth files to consult for `env`, in order (they need not exist)."""
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    elif env.get("HOME"):
        files.append(Path(env["HOME"]) / ".docker" / "config.json")
    return tuple(files)


def find_credential(registry: str, env: Mapping[str, str]) -> Credential | None:
    """The credential for `registry` from the first auth file that has one, else None."""
    for path in auth_files(env):
        config = _read_config(path)
        if config is None:
            continue
        credential = _credential_from(config, registry, path, env)
        if credential is not None:
            return credential
    return None


def store_credential(registry: str, credential: Credential, env: Mapping[str, str]) -> Path:
    """Save `credential` for `registry` (helper if configured, else the file); return the file used."""
    files = auth_files(env)
    if not files:
        raise CredentialError(f"login {registry}: set HOME, DOCKER_CONFIG or REGISTRY_AUTH_FILE")
    path = files[0]
    config = _read_config(path) or {}
    helper = _helper_for(config, registry)
    auths = config.setdefault("auths", {})
    if helper is not None:
        payload = {"ServerURL": registry, "Username": credential.username, "Secret": credential.password}
        _run_helper(helper, "store", json.dumps(payload), env)
        # docker records the registry with an empty entry so `docker login` lists it.
        auths[registry] = {}
    else:
        token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
        auths[registry] = {"auth": token}
    _write_config(path, config)
    return path


def erase_credential(registry: str, env: Mapping[str, str]) -> bool:
    """Forget `registry` in every auth file and helper; return whether anything was removed."""
    removed = False
    for path in auth_files(env):
        config = _read_config(path)
        if config is None:
            continue
        helper = _helper_for(config, registry)
        if helper is not None:
            removed |= _run_helper(helper, "erase", registry, env) is not None
        auths = config.get("auths", {})
        for key in _keys_for(registry):
            if key in auths:
                del auths[key]
                removed = True
        _write_config(path, config)
    return removed


def parse_challenges(header: str) -> tuple[Challenge, ...]:
    """Parse a `WWW-Authenticate` value (RFC 7235) into challenges.

    Accepts `Bearer realm="...",service="...",scope="..."` and `Basic realm="..."`,
    several challenges in one header, quoted strings with backslash escapes.
    """
    challenges: list[Challenge] = []
    token = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    pattern = re.compile(rf'\s*,?\s*(?:({token})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({token}))|({token}))')
    pos = 0
    scheme: str | None = None
    params: list[tuple[str, str]] = []
    while pos < len(header):
        match = pattern.match(header, pos)
        if match is None or match.end() == pos:
            break
        pos = match.end()
        key, quoted, bare, word = match.groups()
        if word is not None:  # a bare word starts a new challenge
            if scheme is not None:
                challenges.append(Challenge(scheme, tuple(params)))
            scheme, params = word.lower(), []
        elif scheme is not None and key is not None:
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            params.append((key.lower(), value))
    if scheme is not None:
        challenges.append(Challenge(scheme, tuple(params)))
    return tuple(challenges)


def _keys_for(registry: str) -> tuple[str, ...]:
    """The keys an auth file may use for `registry` (bare host, URL forms, Hub's legacy names)."""
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
    keys.append(f"https://{registry}/v2/")
    if registry == DOCKER_HUB:
        keys.extend(DOCKER_HUB_LEGACY_KEYS)
    return tuple(keys)


def _helper_for(config: Mapping[str, object], registry: str) -> str | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _keys_for(registry):
            if isinstance(helpers.get(key), str) and helpers[key]:
                return helpers[key]
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def _credential_from(
    config: Mapping[str, object], registry: str, path: Path, env: Mapping[str, str]
) -> Credential | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _keys_for(registry):
            if isinstance(helpers.get(key), str) and helpers[key]:
                return _helper_get(helpers[key], registry, env)
    auths = config.get("auths")
    if isinstance(auths, dict):
        for key in _keys_for(registry):
            entry = auths.get(key)
            if isinstance(entry, dict) and entry:
                credential = _decode_entry(entry, registry, path)
                if credential is not None:
                    return credential
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _helper_get(store, registry, env)
    return None


def _decode_entry(entry: Mapping[str, object], registry: str, path: Path) -> Credential | None:
    identity = entry.get("identitytoken")
    identity = identity if isinstance(identity, str) and identity else None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as err:
            raise CredentialError(f"{path}: auths.{registry}.auth is not base64 'user:password'") from err
        if not sep:
            raise CredentialError(f"{path}: auths.{registry}.auth is not base64 'user:password'")
        return Credential(username, password, identity)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(password, str):
        return Credential(username, password, identity)
    if identity is not None:
        return Credential("<token>", "", identity)
    return None


def _helper_get(helper: str, registry: str, env: Mapping[str, str]) -> Credential | None:
    out = _run_helper(helper, "get", registry, env)
    if out is None:
        return None
    try:
        answer = json.loads(out)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError) as err:
        raise CredentialError(f"docker-credential-{helper} get {registry}: unreadable answer") from err
    if not isinstance(username, str) or not isinstance(secret, str):
        raise CredentialError(f"docker-credential-{helper} get {registry}: unreadable answer")
    if username == "<token>":  # docker's convention for an identity token
        return Credential(username, "", secret)
    return Credential(username, secret)


def _run_helper(helper: str, action: str, stdin: str, env: Mapping[str, str]) -> str | None:
    """Run `docker-credential-<helper> <action>`; None when it says it has no credentials."""
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run(
            [program, action],
            input=stdin,
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as err:
        raise CredentialError(f"{program} {action}: helper not found on PATH") from err
    except subprocess.TimeoutExpired as err:
        raise CredentialError(f"{program} {action}: no answer after {_HELPER_TIMEOUT} s") from err
    if done.returncode != 0:
        message = (done.stdout.strip() or done.stderr.strip()).splitlines()
        first = message[0] if message else f"exit status {done.returncode}"
        if _NOT_FOUND in first.lower():
            return None
        raise CredentialError(f"{program} {action}: {first}")
    return done.stdout


def _read_config(path: Path) -> dict[str, object] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CredentialError(f"{path}: {err.strerror}") from err
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except ValueError as err:
        raise CredentialError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CredentialError(f"{path}: not a JSON object")
    return config


def _write_config(path: Path, config: Mapping[str, object]) -> None:
    """Replace `path` atomically, readable only by its owner (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent="\t")
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
