"""BuildKit source policies (EXPERIMENTAL_BUILDKIT_SOURCE_POLICY): the rules as BuildKit's
sourcepolicy engine evaluates them, and a build that honours them (lamina.engine.sourcepolicy)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lamina.engine.sourcepolicy import ENV_VAR, Source, git_source, http_source, image_source, parse
from lamina.errors import BuildError, LaminaError, PlanError
from tests.support.build import BASE, build, make_cache, write_context

ALPINE = "docker-image://docker.io/library/alpine:latest"


def _policy(*rules: dict[str, Any]) -> Any:
    return parse(json.dumps({"rules": list(rules)}).encode(), "policy.json")


def test_last_matching_allow_or_deny_decides() -> None:
    policy = _policy(
        {"action": "DENY", "selector": {"identifier": "docker-image://*"}},
        {"action": "ALLOW", "selector": {"identifier": ALPINE, "match_type": "EXACT"}},
    )
    assert policy.evaluate(image_source("alpine")) == image_source("alpine")
    with pytest.raises(BuildError, match=r"source 'docker-image://docker.io/library/busybox:latest' denied"):
        policy.evaluate(image_source("busybox"))


def test_wildcard_convert_formats_the_destination_from_the_match() -> None:
    """A pin for every tag of a repository: `*` is group 1 in the destination."""
    policy = _policy(
        {
            "action": "CONVERT",
            "selector": {"identifier": "docker-image://docker.io/library/alpine:*"},
            "updates": {"identifier": "docker-image://mirror.example/alpine:$1"},
        }
    )
    assert (
        policy.evaluate(image_source("alpine:3.19")).identifier == "docker-image://mirror.example/alpine:3.19"
    )


def test_regex_convert_replaces_the_match_and_keeps_the_rest() -> None:
    policy = _policy(
        {
            "action": 2,  # enum values by number, as Go's JSON takes them
            "selector": {"identifier": r"https://old\.example/(\w+)", "match_type": "REGEX"},
            "updates": {"identifier": "https://new.example/${1}-v2", "attrs": {"http.checksum": "sha256:ab"}},
        }
    )
    converted = policy.evaluate(http_source("https://old.example/file.tar"))
    assert converted == Source("https://new.example/file-v2.tar", (("http.checksum", "sha256:ab"),))


def test_attribute_constraints_select_the_source() -> None:
    """DENY an ADD <url> without a checksum: `http.checksum` EQUAL to nothing."""
    policy = _policy(
        {
            "action": "DENY",
            "selector": {
                "identifier": "https://*",
                "constraints": [{"key": "http.checksum", "value": "", "condition": "EQUAL"}],
            },
        }
    )
    assert (
        policy.evaluate(http_source("https://x.example/a", "sha256:00")).identifier == "https://x.example/a"
    )
    with pytest.raises(BuildError, match="denied by policy"):
        policy.evaluate(http_source("https://x.example/a"))


def test_a_conversion_loop_is_an_error_not_a_hang() -> None:
    policy = _policy(
        {"action": "CONVERT", "selector": {"identifier": "a://x"}, "updates": {"identifier": "a://y"}},
        {"action": "CONVERT", "selector": {"identifier": "a://y"}, "updates": {"identifier": "a://x"}},
    )
    with pytest.raises(BuildError, match="too many mutations"):
        policy.evaluate(Source("a://x"))


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"action": "REWRITE"}, "invalid Action value 'REWRITE'"),
        ({"selector": {"identifier": "(", "match_type": "REGEX"}}, r"invalid regex '\('"),
        ({"selector": {"identifier": "docker-image://**"}}, 'invalid wildcard: "\\*\\*"'),
        ({"selector": {"identifier": "x", "constraints": [{"condition": "LIKE"}]}}, "invalid Condition"),
    ],
)
def test_a_malformed_policy_is_refused_naming_the_rule(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=f"policy.json: rule 0: {message}"):
        _policy(rule)


def _with_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *rules: dict[str, Any]) -> None:
    (tmp_path / "policy.json").write_text(json.dumps({"rules": list(rules)}))
    monkeypatch.setenv(ENV_VAR, os.fspath(tmp_path / "policy.json"))


def test_from_an_image_the_policy_converts_builds_from_the_other(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FROM alpine pinned to another image (here the test base, already in the store)."""
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", "FROM alpine\nCOPY --from=alpine /bin/busybox /copied\n")
    _with_policy(
        tmp_path,
        monkeypatch,
        {
            "action": "CONVERT",
            "selector": {"identifier": ALPINE},
            "updates": {"identifier": f"docker-image://{BASE}"},
        },
    )
    out = tmp_path / "out"
    build(cache, ctx, outputs=[f"type=local,dest={out}"])
    assert (out / "copied").read_bytes() == (out / "bin" / "busybox").read_bytes()


def test_a_denied_base_image_fails_the_build_naming_the_line(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\n")
    _with_policy(tmp_path, monkeypatch, {"action": "DENY", "selector": {"identifier": "docker-image://*"}})
    with pytest.raises(LaminaError, match=rf"Dockerfile:1: FROM {BASE}: source .* denied by policy"):
        build(cache, ctx)


def test_a_policy_denying_everything_denies_the_local_context(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in BuildKit, `*` selects local://context too: a build must ALLOW it."""
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\n")
    deny = {"action": "DENY", "selector": {"identifier": "*"}}
    _with_policy(tmp_path, monkeypatch, deny)
    with pytest.raises(LaminaError, match="source 'local://context' denied by policy"):
        build(cache, ctx)
    _with_policy(
        tmp_path,
        monkeypatch,
        deny,
        *({"action": "ALLOW", "selector": {"identifier": i}} for i in ("local://*", "docker-image://*")),
    )
    build(cache, ctx)


def test_add_of_a_denied_url_fails_before_any_download(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD http://127.0.0.1:9/file /file\n")
    _with_policy(
        tmp_path, monkeypatch, {"action": "DENY", "selector": {"identifier": "http://127.0.0.1:9/*"}}
    )
    with pytest.raises(LaminaError, match=r"ADD http://127.0.0.1:9/file: source .* denied by policy"):
        build(cache, ctx)


@pytest.mark.parametrize(
    "url, identifier",
    [
        ("https://github.com/moby/buildkit.git#v0.1:docs", "git://github.com/moby/buildkit.git#v0.1:docs"),
        ("git@github.com:moby/buildkit.git", "git://github.com/moby/buildkit.git"),
        ("https://host.example/repo.git?ref=main", "git://host.example/repo.git#main"),
    ],
)
def test_a_git_url_is_named_as_buildkits_git_source(url: str, identifier: str) -> None:
    assert git_source(url).identifier == identifier


def test_add_of_a_denied_git_url_fails_naming_the_line(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD https://git.invalid/repo.git#main /src\n")
    _with_policy(tmp_path, monkeypatch, {"action": "DENY", "selector": {"identifier": "git://git.invalid/*"}})
    with pytest.raises(
        LaminaError, match=r"Dockerfile:2: ADD https://git.invalid/repo.git#main: source .* denied"
    ):
        build(cache, ctx)
