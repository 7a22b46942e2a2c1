"""BuildKit source policies: `EXPERIMENTAL_BUILDKIT_SOURCE_POLICY=FILE`, as buildx reads it.

The file is the JSON of BuildKit's `sourcepolicy.Policy`: `{"rules": [{"action":
"ALLOW|DENY|CONVERT", "selector": {"identifier": ..., "match_type":
"WILDCARD|EXACT|REGEX", "constraints": [{"key", "value", "condition":
"EQUAL|NOTEQUAL|MATCHES"}]}, "updates": {"identifier": ..., "attrs": {...}}}]}`
(enum values may also be their numbers). Every source a build reads is named
as BuildKit names it (`docker-image://docker.io/library/alpine:latest`,
`https://host/file` with its `http.checksum` attribute, `git://host/path#ref`,
`local://context`) and evaluated as BuildKit's sourcepolicy engine does:
the rules in order, the last matching ALLOW/DENY decides, a matching CONVERT
rewrites the source and the rules run again on the result (at most 20
times); a source still denied at the end fails the build.

This module is pure: it names and evaluates; where a source is read
(steps/base, namedcontext, steps/copyadd/fetch) the caller applies the result
or refuses a conversion to a kind of source it cannot take there.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping
from typing import TypeVar

from lamina.errors import BuildError, PlanError

ENV_VAR = "EXPERIMENTAL_BUILDKIT_SOURCE_POLICY"
_MAX_CONVERSIONS = 20  # BuildKit's maxIterr: a CONVERT loop is an error, not a hang
_MAX_FILE = 1 << 20


class Action(enum.Enum):
    ALLOW = 0
    DENY = 1
    CONVERT = 2


class MatchType(enum.Enum):
    WILDCARD = 0
    EXACT = 1
    REGEX = 2


class Condition(enum.Enum):
    EQUAL = 0
    NOTEQUAL = 1
    MATCHES = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A source as a policy sees it: BuildKit's source op identifier and attributes."""

    identifier: str
    attrs: tuple[tuple[str, str], ...] = ()

    def attr(self, key: str) -> str:
        return dict(self.attrs).get(key, "")


@dataclasses.dataclass(frozen=True, slots=True)
class Constraint:
    key: str
    value: str
    condition: Condition


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    identifier: str  # the selector's
    match_type: MatchType
    constraints: tuple[Constraint, ...] = ()
    update_identifier: str | None = None  # CONVERT's updates; None: the rule has no updates
    update_attrs: tuple[tuple[str, str], ...] = ()

    def matches(self, source: Source) -> re.Match[str] | bool:
        """Whether the rule selects `source`: the match (for formatting a CONVERT) or a bool."""
        for constraint in self.constraints:
            value = source.attr(constraint.key)
            if constraint.condition is Condition.EQUAL and value != constraint.value:
                return False
            if constraint.condition is Condition.NOTEQUAL and value == constraint.value:
                return False
            if constraint.condition is Condition.MATCHES and not _regex(constraint.value).search(value):
                return False
        if self.identifier == source.identifier:
            return True
        if self.match_type is MatchType.REGEX:
            return _regex(self.identifier).search(source.identifier) or False
        if self.match_type is MatchType.WILDCARD:
            return _wildcard(self.identifier).fullmatch(source.identifier) or False
        return False

    def convert(self, source: Source) -> Source:
        """BuildKit's mutate: the destination formatted from the match, the attributes set."""
        if self.update_identifier is None:
            raise BuildError(
                f"source policy: CONVERT {self.identifier}: missing destination for convert rule"
            )
        dest = self.update_identifier or self.identifier
        if self.match_type is MatchType.REGEX:
            pattern = _regex(self.identifier)
            dest = pattern.sub(lambda found: _expand(found, dest), source.identifier)
        elif self.match_type is MatchType.WILDCARD:
            found = _wildcard(self.identifier).fullmatch(source.identifier)
            dest = _expand(found, dest) if found else source.identifier
        attrs = dict(source.attrs)
        attrs.update(self.update_attrs)
        return Source(dest or source.identifier, tuple(sorted(attrs.items())))


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    path: str  # the file, for messages

    def evaluate(self, source: Source) -> Source:
        """`source` after the policy's conversions; BuildError when the policy denies it."""
        for _ in range(_MAX_CONVERSIONS + 1):
            converted = self._once(source)
            if converted is None:
                return source
            source = converted
        raise BuildError(f"source policy {self.path}: too many mutations on a single source")

    def _once(self, source: Source) -> Source | None:
        """One pass over the rules: the source a CONVERT made of it, or None when none changed it."""
        deny = False
        for rule in self.rules:
            if not rule.matches(source):
                continue
            if rule.action is Action.CONVERT:
                converted = rule.convert(source)
                if converted != source:
                    return converted
            else:
                deny = rule.action is Action.DENY
        if deny:
            raise BuildError(f"source {source.identifier!r} denied by policy (source policy {self.path})")
        return None


def load(environ: Mapping[str, str]) -> Policy | None:
    """The policy `$EXPERIMENTAL_BUILDKIT_SOURCE_POLICY` names, or None when it is unset or empty."""
    path = environ.get(ENV_VAR, "")
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE + 1)
    except OSError as err:
        raise PlanError(f"{ENV_VAR}={path}: cannot read the source policy: {err.strerror}") from None
    if len(data) > _MAX_FILE:
        raise PlanError(f"{ENV_VAR}={path}: the source policy is over {_MAX_FILE} bytes")
    return parse(data, path)


def parse(data: bytes, path: str) -> Policy:
    """A policy from its JSON (BuildKit's field names; enum values by name or number)."""
    try:
        document = json.loads(data)
    except ValueError as err:
        raise PlanError(f"source policy {path}: failed to parse source policy: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("rules", []), list):
        raise PlanError(f"source policy {path}: expected an object with a list of rules")
    rules = tuple(
        _rule(raw, f"source policy {path}: rule {n}") for n, raw in enumerate(document.get("rules", []))
    )
    return Policy(rules, path)


def image_source(ref: str) -> Source:
    """An image reference as BuildKit names its source: `docker-image://` and the full name."""
    from lamina.oci.reference import parse_reference

    return Source("docker-image://" + str(parse_reference(ref)))


def image_ref(source: Source, what: str) -> str:
    """The image reference a converted image source names; other kinds are refused at `what`."""
    if not source.identifier.startswith("docker-image://"):
        raise BuildError(
            f"{what}: the source policy converts the image to {source.identifier!r}; "
            "lamina takes only another docker-image:// there"
        )
    return source.identifier.removeprefix("docker-image://")


def http_source(url: str, checksum: str = "") -> Source:
    """An ADD <url> as BuildKit names it: the URL, and `http.checksum` for --checksum."""
    return Source(url, (("http.checksum", checksum),) if checksum else ())


def local_source(name: str) -> Source:
    """A local directory of the client: `local://context`, `local://dockerfile`, `local://NAME`."""
    return Source(f"local://{name}")


def git_source(url: str) -> Source:
    """A git URL as BuildKit's llb.Git names it: `git://HOST/PATH#REF:SUBDIR`."""
    import urllib.parse

    from lamina.engine.gitsource import parse_git_url

    ref = parse_git_url(url)
    if "://" in ref.remote:
        parts = urllib.parse.urlsplit(ref.remote)
        host, path = parts.hostname or "", parts.path
    else:  # scp-like: git@host:path
        host, _, path = ref.remote.partition("@")[2].partition(":")
    identifier = host + "/" + path.lstrip("/")
    if ref.ref:
        identifier += "#" + ref.ref + (":" + ref.subdir if ref.subdir else "")
    return Source("git://" + identifier)


def context_sources(context: str, local: bool) -> list[Source]:
    """The sources of a build's main context and Dockerfile, as BuildKit's dockerui names them
    (`local`: a context directory and Dockerfile of the client, engine.contextsource.is_local)."""
    from lamina.engine.gitsource import is_git_url

    if local:
        return [local_source("context"), local_source("dockerfile")]
    if is_git_url(context):
        return [git_source(context)]
    if context.startswith(("http://", "https://")):
        return [Source(context)]
    return [local_source("context")]  # `-`: a tar or a Dockerfile the client uploads


def require_kept(policy: Policy, source: Source, what: str) -> None:
    """Judge a source lamina cannot exchange at `what`: denied is an error, converted is refused."""
    try:
        converted = policy.evaluate(source)
    except BuildError as err:
        raise BuildError(f"{what}: {err}") from None
    if converted.identifier != source.identifier:
        raise PlanError(
            f"{what}: the source policy converts {source.identifier!r} to {converted.identifier!r}; "
            "lamina converts only images (docker-image://), ADD <url> and named contexts"
        )


def _rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: not an object")
    raw = _lower_keys(raw)
    selector = _lower_keys(raw.get("selector") or {})
    if not isinstance(selector, dict) or not isinstance(selector.get("identifier", ""), str):
        raise PlanError(f"{where}: selector needs an identifier")
    constraints = tuple(
        Constraint(
            str(c.get("key", "")), str(c.get("value", "")), _enum(Condition, c.get("condition"), where)
        )
        for c in (_lower_keys(item) for item in selector.get("constraints") or [])
    )
    updates = raw.get("updates")
    update_identifier = update_attrs = None
    if isinstance(updates, dict):
        updates = _lower_keys(updates)
        update_identifier = str(updates.get("identifier") or "")
        attrs = updates.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise PlanError(f"{where}: updates.attrs must be an object")
        update_attrs = tuple(sorted((str(k), str(v)) for k, v in attrs.items()))
    rule = Rule(
        _enum(Action, raw.get("action"), where),
        selector.get("identifier", ""),
        _enum(MatchType, selector.get("match_type", selector.get("matchtype")), where),
        constraints,
        update_identifier,
        update_attrs or (),
    )
    for text in [c.value for c in constraints if c.condition is Condition.MATCHES] + (
        [rule.identifier] if rule.match_type is MatchType.REGEX else []
    ):
        try:
            _regex(text)
        except re.error as err:
            raise PlanError(f"{where}: invalid regex {text!r}: {err}") from None
    if rule.match_type is MatchType.WILDCARD and "**" in rule.identifier:
        raise PlanError(f'{where}: invalid wildcard: "**" in {rule.identifier!r}')
    return rule


def _lower_keys(raw: object) -> dict[str, object]:
    """Go's encoding/json matches field names case-insensitively, as buildx decodes the file."""
    return {str(k).lower(): v for k, v in raw.items()} if isinstance(raw, dict) else {}


_E = TypeVar("_E", Action, MatchType, Condition)


def _enum(kind: type[_E], value: object, where: str) -> _E:
    """A proto enum in JSON: its name, its number, or absent (the zero value)."""
    if value is None:
        return kind(0)
    try:
        return kind[value] if isinstance(value, str) else kind(value)
    except (KeyError, ValueError):
        names = "|".join(member.name for member in kind)
        raise PlanError(f"{where}: invalid {kind.__name__} value {value!r} (one of {names})") from None


def _regex(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _wildcard(text: str) -> re.Pattern[str]:
    """BuildKit's util/wildcard: `*` matches anything (a group each), the rest literally."""
    return re.compile(re.escape(text).replace(r"\*", "(.*)"))


_TEMPLATE = re.compile(r"\$(?:\$|\{(\w+)\}|(\w+))")


def _expand(found: re.Match[str], template: str) -> str:
    """Go's Regexp.Expand: `$1`, `${1}`, `$name`, `${name}` (unknown ones empty), `$$` a dollar."""

    def group(ref: re.Match[str]) -> str:
        name = ref.group(1) or ref.group(2)
        if name is None:
            return "$"
        try:
            value = found.group(int(name) if name.isdigit() else name)
        except IndexError:  # no such group: Go expands it to nothing
            return ""
        return value or ""

    return _TEMPLATE.sub(group, template)
