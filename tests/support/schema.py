"""Validate OCI documents against ../shared/conformance/oci-image-spec/schema.

    check_document(data, "application/vnd.oci.image.manifest.v1+json")

raises jsonschema.ValidationError. The registry setup (Draft 4, every
schema also under the URLs upstream's Go validator aliases it to) follows
the conformance README, section 3.2.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path("/work/shared/conformance/oci-image-spec/schema")

_ALIASES = {
    "config-schema.json": ["https://opencontainers.org/schema/image/config"],
    "content-descriptor.json": [
        "https://opencontainers.org/schema/descriptor",
        "https://opencontainers.org/schema/image/content-descriptor.json",
    ],
    "defs-descriptor.json": [
        "https://opencontainers.org/schema/image/descriptor/mediaType",
        "https://opencontainers.org/schema/defs-descriptor.json",
        "https://opencontainers.org/schema/image/defs-descriptor.json",
    ],
    "defs.json": [
        "https://opencontainers.org/schema/defs.json",
        "https://opencontainers.org/schema/image/defs.json",
        "https://opencontainers.org/schema/image/descriptor/defs.json",
    ],
    "image-index-schema.json": ["https://opencontainers.org/schema/image/index"],
    "image-layout-schema.json": ["https://opencontainers.org/schema/image/layout"],
    "image-manifest-schema.json": ["https://opencontainers.org/schema/image/manifest"],
}

SCHEMA_FOR = {
    "application/vnd.oci.image.index.v1+json": "image-index-schema.json",
    "application/vnd.oci.image.manifest.v1+json": "image-manifest-schema.json",
    "application/vnd.oci.image.config.v1+json": "config-schema.json",
    "application/vnd.oci.descriptor.v1+json": "content-descriptor.json",
    "application/vnd.oci.layout.header.v1+json": "image-layout-schema.json",
}


def available() -> bool:
    return SCHEMA_DIR.is_dir()


@functools.cache
def _registry() -> Any:
    import referencing
    import referencing.jsonschema

    resources = []
    for name, aliases in _ALIASES.items():
        contents = json.loads((SCHEMA_DIR / name).read_text())
        resource = referencing.Resource.from_contents(
            contents, default_specification=referencing.jsonschema.DRAFT4
        )
        resources += [(uri, resource) for uri in [name, *aliases]]
    return referencing.Registry().with_resources(resources)


def check_document(data: bytes | dict[str, Any], media_type: str) -> None:
    """Raise jsonschema.ValidationError unless `data` is valid for `media_type`."""
    import jsonschema

    schema = json.loads((SCHEMA_DIR / SCHEMA_FOR[media_type]).read_text())
    instance = json.loads(data) if isinstance(data, bytes) else data
    jsonschema.Draft4Validator(schema, registry=_registry()).validate(instance)
