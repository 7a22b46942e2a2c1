"""Content digests, parsed once at the edge and passed around as values."""

from __future__ import annotations

import dataclasses
import re

from lamina.errors import LaminaError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


class InvalidDigest(LaminaError):
    pass


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST.match(text)
        if match is None:
            raise InvalidDigest(f"invalid digest {text!r}")
        algorithm, encoded = match.groups()
        want = _HEX_LENGTH.get(algorithm)
        if want is not None and (len(encoded) != want or not re.fullmatch(r"[0-9a-f]+", encoded)):
            raise InvalidDigest(f"invalid {algorithm} digest {text!r}: want {want} lowercase hex digits")
        return cls(algorithm, encoded)

    @classmethod
    def sha256(cls, hexdigest: str) -> Digest:
        return cls.parse(f"sha256:{hexdigest}")

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        import hashlib

        return cls("sha256", hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"
