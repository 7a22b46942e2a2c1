"""The build checks' rules and findings, apart from the walk that finds them (checks.py).

BuildKit's rule table (names, descriptions, links), a finding (`CheckWarning`)
and the check configuration (`# check=` / BUILDKIT_DOCKERFILE_CHECK). Light on
purpose: a no-op rebuild replays remembered findings with this module alone
(engine/buildchecks), without the instruction parser the walk needs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lamina.errors import DockerfileError, Location

URL = "https://docs.docker.com/go/dockerfile/rule/"


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    name: str
    description: str
    slug: str = ""  # the page under URL; "" when BuildKit gives none
    experimental: bool = False

    @property
    def url(self) -> str:
        return URL + self.slug + "/" if self.slug else ""


RULES: Mapping[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("StageNameCasing", "Stage names should be lowercase", "stage-name-casing"),
        Rule(
            "FromAsCasing", "The 'as' keyword should match the case of the 'from' keyword", "from-as-casing"
        ),
        Rule(
            "NoEmptyContinuation",
            "Empty continuation lines will become errors in a future release",
            "no-empty-continuation",
        ),
        Rule(
            "ConsistentInstructionCasing",
            "All commands within the Dockerfile should use the same casing (either upper or lower)",
            "consistent-instruction-casing",
        ),
        Rule("DuplicateStageName", "Stage names should be unique", "duplicate-stage-name"),
        Rule("ReservedStageName", "Reserved words should not be used as stage names", "reserved-stage-name"),
        Rule(
            "JSONArgsRecommended",
            "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS"
            " signals",
            "json-args-recommended",
        ),
        Rule(
            "MaintainerDeprecated",
            "The MAINTAINER instruction is deprecated, use a label instead to define an image author",
            "maintainer-deprecated",
        ),
        Rule("UndefinedArgInFrom", "FROM command must use declared ARGs", "undefined-arg-in-from"),
        Rule(
            "WorkdirRelativePath",
            "Relative workdir without an absolute workdir declared within the build can have unexpected"
            " results if the base image changes",
            "workdir-relative-path",
        ),
        Rule("UndefinedVar", "Variables should be defined before their use", "undefined-var"),
        Rule(
            "MultipleInstructionsDisallowed",
            "Multiple instructions of the same type should not be used in the same stage",
            "multiple-instructions-disallowed",
        ),
        Rule(
            "LegacyKeyValueFormat",
            "Legacy key/value format with whitespace separator should not be used",
            "legacy-key-value-format",
        ),
        Rule("InvalidBaseImagePlatform", "Base image platform does not match expected target platform"),
        Rule(
            "RedundantTargetPlatform",
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default"
            " behavior",
            "redundant-target-platform",
        ),
        Rule(
            "SecretsUsedInArgOrEnv",
            "Sensitive data should not be used in the ARG or ENV commands",
            "secrets-used-in-arg-or-env",
        ),
        Rule(
            "InvalidDefaultArgInFrom",
            "Default value for global ARG results in an empty or invalid base image name",
            "invalid-default-arg-in-from",
        ),
        Rule(
            "FromPlatformFlagConstDisallowed",
            "FROM --platform flag should not use a constant value",
            "from-platform-flag-const-disallowed",
        ),
        Rule(
            "CopyIgnoredFile",
            "Attempting to Copy file that is excluded by .dockerignore",
            "copy-ignored-file",
        ),
        Rule(
            "InvalidDefinitionDescription",
            "Comment for build stage or argument should follow the format:"
            " `# <arg/stage name> <description>`. If this is not intended to be a description comment,"
            " add an empty line or comment between the instruction and the comment.",
            "invalid-definition-description",
            experimental=True,
        ),
        Rule(
            "ExposeProtoCasing", "Protocol in EXPOSE instruction should be lowercase", "expose-proto-casing"
        ),
        Rule(
            "ExposeInvalidFormat",
            "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an"
            " error in a future release",
            "expose-invalid-format",
        ),
    )
}


@dataclasses.dataclass(frozen=True, slots=True)
class CheckWarning:
    """One finding: the rule, BuildKit's message for it, and the lines it points at."""

    rule: str
    detail: str
    start_line: int  # 0 when the warning has no place in the file
    end_line: int

    @property
    def description(self) -> str:
        return RULES[self.rule].description

    @property
    def url(self) -> str:
        return RULES[self.rule].url

    def short(self) -> str:
        """BuildKit's `LintFormatShort`: `Rule: message (line N)`."""
        text = f"{self.rule}: {self.detail}"
        return f"{text} (line {self.start_line})" if self.start_line > 0 else text

    def to_dict(self) -> dict[str, Any]:
        """What the replay memo keeps (engine/buildchecks); `from_dict` reads it back."""
        return {"rule": self.rule, "detail": self.detail, "start": self.start_line, "end": self.end_line}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> CheckWarning:
        if value["rule"] not in RULES:
            raise ValueError(f"unknown rule {value['rule']!r}")
        return cls(str(value["rule"]), str(value["detail"]), int(value["start"]), int(value["end"]))

    def to_json(self) -> dict[str, object]:
        return {
            "ruleName": self.rule,
            "description": self.description,
            **({"url": self.url} if self.url else {}),
            "detail": self.detail,
            "location": {"start": self.start_line, "end": self.end_line},
        }


@dataclasses.dataclass(frozen=True, slots=True)
class CheckConfig:
    """BuildKit's linter.Config: which rules to leave out, and whether a warning fails the build."""

    skip: frozenset[str] = frozenset()
    skip_all: bool = False
    experimental: frozenset[str] = frozenset()
    experimental_all: bool = False
    error: bool = False

    def enabled(self, rule: Rule) -> bool:
        # An experimental rule runs only when asked for, and `skip` does not reach it.
        if rule.experimental:
            return self.experimental_all or rule.name in self.experimental
        return not (self.skip_all or rule.name in self.skip)

    def merged(self, other: CheckConfig) -> CheckConfig:
        """A `# check=` comment on one instruction: more skips and experiments; `error` stays."""
        return dataclasses.replace(
            self,
            skip=self.skip | other.skip,
            skip_all=self.skip_all or other.skip_all,
            experimental=self.experimental | other.experimental,
            experimental_all=self.experimental_all or other.experimental_all,
        )


GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_check_options(text: str) -> CheckConfig:
    """`skip=A,B|all;experimental=…;error=true`, as BuildKit's ParseLintOptions; ValueError names the part."""
    text = text.strip()
    if not text:
        return CheckConfig()
    config = CheckConfig()
    parts = text.split(";", 2)  # Go's SplitN(…, 3): a fourth part stays in the third
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"invalid check option {_go_quote(part)}")
        key, value = key.strip(), value.strip()
        if key in ("skip", "experimental"):
            every = value == "all"
            names = frozenset() if every else frozenset(name.strip() for name in value.split(","))
            if key == "skip":
                config = dataclasses.replace(config, skip_all=every, skip=names)
            else:
                config = dataclasses.replace(config, experimental_all=every, experimental=names)
        elif key == "error":
            if value not in GO_TRUE and value not in GO_FALSE:
                raise ValueError(
                    f"failed to parse check option {_go_quote(part)}:"
                    f" strconv.ParseBool: parsing {_go_quote(value)}: invalid syntax"
                )
            config = dataclasses.replace(config, error=value in GO_TRUE)
        else:
            raise ValueError(f"invalid check option {_go_quote(key)}")
    return config


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_COMMENT_DIRECTIVE = re.compile(r"\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*\Z", re.DOTALL)


def comment_config(config: CheckConfig, comments: Iterable[str]) -> CheckConfig:
    """The config for one instruction: the first `check=` comment above it merged in; a bad one is ignored."""
    for comment in comments:
        found = _COMMENT_DIRECTIVE.match(comment)
        if found is None or found.group(1).lower() != "check":
            continue
        value = found.group(2).split(" ", 1)[0]
        try:
            return config.merged(parse_check_options(value))
        except ValueError:
            return config
    return config


def violation(warnings: Sequence[CheckWarning], error: bool, path: str) -> DockerfileError | None:
    """`error=true` with warnings: BuildKit's `lint violation found for rules: …` error."""
    if not error or not warnings:
        return None
    rules = ", ".join(dict.fromkeys(w.rule for w in warnings))
    first = min((w.start_line for w in warnings if w.start_line > 0), default=0)
    return DockerfileError(f"lint violation found for rules: {rules}", Location(path, first))
