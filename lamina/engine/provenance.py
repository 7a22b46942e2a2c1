"""`--provenance`: an SLSA v1 provenance statement, attached as buildx and BuildKit attach it.

buildx's `--provenance` takes `false`/`0` (none), `true`/`1` (BuildKit's
default, mode=max) or attributes: `mode=min|max`, `builder-id=URI`,
`reproducible=true|false`, `version=v1`. The predicate follows BuildKit's
(solver/llbsolver/provenance): buildType, externalParameters (the frontend
request: `dockerfile.v0`, its args, the locals `context` and `dockerfile`,
the Dockerfile as configSource.path), internalParameters.builderPlatform,
resolvedDependencies (each base image as a `pkg:docker/...` purl with its
manifest digest) and runDetails (builder id, invocation id, start and
finish times, completeness). mode=min drops `build-arg:*` and `label:*`
from the request and says so (completeness.request false), as BuildKit's
scrubMinRequest; mode=max keeps them and adds the Dockerfile's text as
buildkit_metadata.source. BuildKit's max also carries its LLB definition
and layer map: lamina has no LLB, so those are absent (README: differences).

The statement goes into the image index as BuildKit's attestation manifest
(lamina.engine.imageexport).
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

from lamina.errors import LaminaError, PlanError

PREDICATE_SLSA1 = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/moby/buildkit/blob/master/docs/attestations/slsa-definitions.md"
_KEYS = ("mode", "builder-id", "reproducible", "version")
_REFUSED = {
    "version": "only SLSA v1 provenance is written",
    "capture-usage": "resource usage is not sampled",
    "complete-materials": "a local context is never a complete material",
    "inline-only": "attestations are attached to every image output",
    "filename": "provenance is not written into a filesystem output",
}


def _bool(value: str, what: str) -> bool:
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise PlanError(f"invalid --provenance {what}: {value!r} is not a bool")


def parse_provenance(text: str | None) -> tuple[tuple[str, str], ...] | None:
    """`--provenance` as buildx reads it; None for no attestation."""
    if text is None:
        return None
    value = text.strip()
    if value.lower() in ("true", "1", "false", "0", "t", "f"):
        return (("mode", "max"),) if _bool(value, value) else None
    attrs: dict[str, str] = {"mode": "max"}  # BuildKit's default when no mode is given
    for field in value.split(","):
        key, sep, item = field.partition("=")
        key = key.strip().lower()
        if not sep:
            raise PlanError(f"invalid --provenance {text!r}: {field!r} is not key=value")
        if key == "type":
            if item != "provenance":
                raise PlanError(f"invalid --provenance {text!r}: type must be provenance")
            continue
        if key == "disabled":
            if _bool(item, "disabled"):
                return None
            continue
        if key == "version" and item == "v1":
            continue
        if key in _REFUSED:
            raise PlanError(f"--provenance {key}= is not supported: {_REFUSED[key]}")
        if key not in _KEYS:
            raise PlanError(f"invalid --provenance {text!r}: unknown key {key!r}")
        attrs[key] = item
    if attrs["mode"] == "full":
        attrs["mode"] = "max"
    if attrs["mode"] not in ("min", "max"):
        raise PlanError(f'invalid --provenance mode "{attrs["mode"]}": use min or max')
    if "reproducible" in attrs:
        attrs["reproducible"] = str(_bool(attrs["reproducible"], "reproducible")).lower()
    return tuple(sorted(attrs.items()))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def provenance_statement(host: Any, config: Any) -> Any:
    """The provenance of the build `host` (the executor) ran, for the image whose config is `config`."""
    import secrets

    from lamina.engine.imageexport import Statement

    options = host.options
    attrs = dict(options.provenance or ())
    mode = attrs.get("mode", "max")
    platform = str(config.platform)
    args, incomplete_request = _request_args(options, mode)
    request: dict[str, Any] = {"frontend": "dockerfile.v0"}
    if args:
        request["args"] = dict(sorted(args.items()))
    request["locals"] = [{"name": "context"}, {"name": "dockerfile"}]
    dockerfile = options.dockerfile or options.context / "Dockerfile"
    dependencies = _dependencies(host, platform)
    metadata: dict[str, Any] = {
        "invocationID": secrets.token_hex(13),
        "startedOn": host.started_on if getattr(host, "started_on", "") else _now(),
        "finishedOn": _now(),
        "buildkit_metadata": {},
        "buildkit_completeness": {"request": not incomplete_request, "resolvedDependencies": False},
    }
    if attrs.get("reproducible") == "true":
        metadata["buildkit_reproducible"] = True
    if mode == "max":
        try:
            text = dockerfile.read_bytes()
        except OSError:
            text = b""
        metadata["buildkit_metadata"] = {
            "source": {
                "infos": [
                    {
                        "filename": dockerfile.name,
                        "language": "Dockerfile",
                        "data": base64.b64encode(text).decode(),
                    }
                ]
            }
        }
    if not metadata["buildkit_metadata"]:
        del metadata["buildkit_metadata"]
    predicate: dict[str, Any] = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"configSource": {"path": dockerfile.name}, "request": request},
            "internalParameters": {"builderPlatform": platform},
        },
        "runDetails": {"builder": {"id": attrs.get("builder-id", "")}, "metadata": metadata},
    }
    if dependencies:
        predicate["buildDefinition"]["resolvedDependencies"] = dependencies
    return Statement(PREDICATE_SLSA1, predicate)


def _request_args(options: Any, mode: str) -> tuple[dict[str, str], bool]:
    """The build request's args (build args, labels, target); with mode=min, without the
    build args and labels, and whether that left some out."""
    args: dict[str, str] = {}
    for key, value in options.build_args:
        args[f"build-arg:{key}"] = value
    for key, value in options.labels:
        args[f"label:{key}"] = value
    if options.target:
        args["target"] = options.target
    if mode != "min":
        return args, False
    kept = {k: v for k, v in args.items() if not k.startswith(("build-arg:", "label:"))}
    return kept, kept != args


def _dependencies(host: Any, platform: str) -> list[dict[str, Any]]:
    """The base images the build used, as purls with their manifest digests."""
    from lamina.engine.imageexport import image_purl
    from lamina.oci.reference import store_name

    dependencies: list[dict[str, Any]] = []
    for ref in sorted({ref for ref, _platform in host.images}):
        if ref == "scratch":
            continue
        try:
            record = host.store.resolve(store_name(ref, pinned=True))
        except LaminaError:  # a base that went away: listed without a digest
            dependencies.append({"uri": image_purl(ref, platform)})
            continue
        digest = record.manifest
        dependencies.append({"uri": image_purl(ref, platform), "digest": {digest.algorithm: digest.hex}})
    return dependencies


def attest_kind(text: str) -> str:
    """The type of a buildx `--attest` value (`type=provenance,...` or `type=sbom,...`)."""
    fields = dict(field.partition("=")[::2] for field in text.split(","))
    kind = fields.get("type", "")
    if not kind:
        raise PlanError(f"invalid --attest {text!r}: attestation type not specified")
    if kind not in ("provenance", "sbom"):
        raise PlanError(f'unknown attestation type "{kind}"')
    return kind
