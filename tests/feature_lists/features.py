"""The lists tests/test_feature_walk.py walks: buildx's build flags and the Dockerfile feature table.

`buildx_flags()` reads buildx_build_flags.tsv (kept here, from buildx's docs);
`dockerfile_features()` reads the Dockerfile feature table in
../shared/conformance/FEATURES.md: parser directives, each instruction and
its flags, each `RUN --mount` type and its options, and the build args that
mean something to BuildKit. Each feature is a short name used as the key of
coverage.tsv: `--flag`, `directive check`, `RUN --mount`, `RUN --mount type=cache,sharing`,
`build-arg BUILDKIT_SYNTAX`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

HERE = Path(__file__).parent
FEATURES_MD = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "FEATURES.md"


@dataclasses.dataclass(frozen=True, slots=True)
class Flag:
    names: tuple[str, ...]  # `-f --file`: every spelling
    type: str  # buildx's value type: bool, string, stringArray, ...

    @property
    def long(self) -> str:
        return self.names[-1]


def buildx_flags() -> list[Flag]:
    flags = []
    for line in (HERE / "buildx_build_flags.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        names, kind = line.split("\t")[:2]
        flags.append(Flag(tuple(names.split()), kind))
    return flags


@dataclasses.dataclass(frozen=True, slots=True)
class Feature:
    kind: str  # directive, instruction, flag, mount-type, mount-option, build-arg
    key: str  # the name in coverage.tsv
    instruction: str = ""
    flag: str = ""
    mount_type: str = ""
    option: str = ""


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first markdown table after `heading`."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        line = line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


def _ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _mount_options(cell: str) -> list[str]:
    """Option names of a mount row: the backticked words of each `;` clause before any `=`."""
    cell = re.sub(r"\([^)]*\)", "", cell)
    names: list[str] = []
    for clause in cell.split(";"):
        clause = clause.split("=", 1)[0]
        names += [w for w in _ticked(clause) if re.fullmatch(r"[a-z]+", w)]
    return names


def dockerfile_features() -> list[Feature]:
    text = FEATURES_MD.read_text()
    features: list[Feature] = []
    for row in _table(text, "## Parser directives"):
        name = re.match(r"`# (\w+)=", row[0])
        assert name is not None, row
        features.append(Feature("directive", f"directive {name.group(1)}"))
    for row in _table(text, "## Instructions and their flags"):
        instruction = _ticked(row[0])[0]
        features.append(Feature("instruction", instruction, instruction=instruction))
        for flag in dict.fromkeys(re.findall(r"`(--[a-z-]+)", row[2])):
            features.append(Feature("flag", f"{instruction} {flag}", instruction=instruction, flag=flag))
    for row in _table(text, "### `RUN --mount=type=…` options"):
        mount_type = _ticked(row[0])[0]
        features.append(Feature("mount-type", f"RUN --mount type={mount_type}", mount_type=mount_type))
        for option in dict.fromkeys(_mount_options(row[1])):
            key = f"RUN --mount type={mount_type},{option}"
            features.append(Feature("mount-option", key, mount_type=mount_type, option=option))
    for row in _table(text, "- **BuildKit built-in build args:**"):
        for name in _ticked(row[0]):
            features.append(Feature("build-arg", f"build-arg {name}", option=name))
    return features


def coverage() -> dict[str, str]:
    """coverage.tsv: feature -> the test (tests/FILE.py::NAME, or a conformance case file) that covers it."""
    found: dict[str, str] = {}
    for line in (HERE / "coverage.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, test = line.split("\t")[:2]
        assert key not in found, f"coverage.tsv names {key!r} twice"
        found[key] = test
    return found
