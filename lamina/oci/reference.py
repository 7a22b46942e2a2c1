"""Image references: `name`, `name:tag`, `name@sha256:...`, `host:port/path:tag`.

Parsing follows the grammar of distribution/reference (the one docker,
podman and skopeo share) and Docker Hub's normalisation: a name with no
registry part lives on `docker.io`, and a one-component Hub name lives
under `library/` (`alpine` -> `docker.io/library/alpine:latest`).
"""

from __future__ import annotations

import dataclasses
import re

from lamina.errors import InvalidReference
from lamina.oci.digest import Digest, InvalidDigest

DOCKER_HUB = "docker.io"
# Where Docker Hub's API really answers, and the key old clients used for it
# in ~/.docker/config.json.
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_LEGACY_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")

_MAX_NAME = 255
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


@dataclasses.dataclass(frozen=True, slots=True)
class Reference:
    """A normalised image reference.

    `tag` is None only when the reference is pinned by digest alone; a bare
    name gets the tag `latest` as docker does.
    """

    registry: str
    repository: str
    tag: str | None = "latest"
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What the registry API takes in /manifests/<identifier>: digest if pinned, else tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None  # parse() never builds a reference with neither
        return self.tag

    def with_digest(self, digest: Digest) -> Reference:
        return dataclasses.replace(self, digest=digest)

    def with_tag(self, tag: str) -> Reference:
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return dataclasses.replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse and normalise `text`; raise InvalidReference naming it on any error."""
    if not text or text != text.strip():
        raise InvalidReference(f"invalid reference {text!r}: empty or surrounded by spaces")
    rest = text
    digest: Digest | None = None
    if "@" in rest:
        rest, _, digest_text = rest.partition("@")
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as err:
            raise InvalidReference(f"invalid reference {text!r}: {err}") from err
    tag: str | None = None
    # A ':' after the last '/' starts a tag; one before it is a registry port.
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid reference {text!r}: invalid tag {tag!r}")
    registry, repository = _split_registry(rest, text)
    if len(repository) + len(registry) + 1 > _MAX_NAME:
        raise InvalidReference(f"invalid reference {text!r}: name longer than {_MAX_NAME} characters")
    for component in repository.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"invalid reference {text!r}: repository {repository!r} must be lowercase "
                "letters, digits and separators (. _ __ -)"
            )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def store_name(name: str, *, pinned: bool = False) -> str:
    """The form of an image name in the local store (`app` -> `docker.io/library/app:latest`).

    A name must carry a tag; with `pinned`, a reference with a digest
    (`FROM app@sha256:...`) keeps it instead, as a pull names it.
    """
    ref = parse_reference(name)
    if pinned and ref.digest is not None:
        return str(ref)
    if ref.tag is None:
        raise InvalidReference(f"image name {name!r} needs a tag, not only a digest")
    return str(dataclasses.replace(ref, digest=None))


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    # docker's rule: the first component is a registry if it has a '.' or ':',
    # is `localhost`, or has an uppercase letter (which a repository cannot).
    if slash and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        if not _DOMAIN.fullmatch(first):
            raise InvalidReference(f"invalid reference {text!r}: invalid registry {first!r}")
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository:
        raise InvalidReference(f"invalid reference {text!r}: no repository")
    return registry, repository
