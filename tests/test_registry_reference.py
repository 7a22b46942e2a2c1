"""Image reference parsing and Docker Hub normalisation, as docker and skopeo read them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lamina.errors import InvalidReference, LaminaError
from lamina.oci.digest import Digest
from lamina.oci.reference import Reference, parse_reference

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine:1", "docker.io", "library/alpine", "1", None),
        ("registry-1.docker.io/user/app", "docker.io", "user/app", "latest", None),
        ("user/app:v1", "docker.io", "user/app", "v1", None),
        ("ghcr.io/org/base:1", "ghcr.io", "org/base", "1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/x:1", "localhost:5000", "x", "1", None),
        ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000", "a/b/c", "tag", None),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("Registry/x", "Registry", "x", "latest", None),
        (f"alpine@sha256:{HEX}", "docker.io", "library/alpine", None, f"sha256:{HEX}"),
        (f"h:1/a:t@sha256:{HEX}", "h:1", "a", "t", f"sha256:{HEX}"),
        ("a/b__c.d-e--f:T_1.x-y", "docker.io", "a/b__c.d-e--f", "T_1.x-y", None),
    ],
)
def test_parse_normalises(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " alpine",
        "Alpine",
        "alpine:",
        "alpine:-x",
        "alpine@sha256:short",
        "alpine@",
        "a//b",
        "a/",
        "host:5000/",
        "a/b_-c",
        "bad_host!:5000/x",
        "x:" + "t" * 129,
        "a/" + "b" * 260,
    ],
)
def test_invalid_reference_is_one_line_error(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert isinstance(info.value, LaminaError)
    assert "\n" not in str(info.value)
    assert repr(text) in str(info.value)


def test_identifier_prefers_digest() -> None:
    ref = parse_reference(f"x.io/a:1@sha256:{HEX}")
    assert ref.identifier == f"sha256:{HEX}"
    assert parse_reference("x.io/a:1").identifier == "1"


def test_str_is_canonical_and_round_trips() -> None:
    assert str(parse_reference("alpine")) == "docker.io/library/alpine:latest"
    assert str(parse_reference(f"h:1/a@sha256:{HEX}")) == f"h:1/a@sha256:{HEX}"


def test_with_tag_validates() -> None:
    ref = parse_reference("h:1/a:1")
    assert ref.with_tag("2").tag == "2"
    with pytest.raises(InvalidReference):
        ref.with_tag("no/slash")


_component = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(
    host=st.sampled_from(["docker.io", "ghcr.io", "localhost:5000", "127.0.0.1:1234", "my-reg.example:443"]),
    path=st.lists(_component, min_size=2, max_size=4),
    tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
)
def test_round_trip(host: str, path: list[str], tag: str | None) -> None:
    ref = Reference(host, "/".join(path), tag or "latest")
    assert parse_reference(str(ref)) == ref
