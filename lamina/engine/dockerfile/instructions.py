"""Parsed `Node`s -> typed, validated instructions, and the file -> stages.

Each instruction is a frozen dataclass carrying its `Location`. Parsers for
single instructions raise a bare InstructionError; `parse_instruction`, the
one dispatcher, adds the node's location. No instruction holds an
environment: those that the builder expands offer `expand(expander)`, which
returns a new instruction with every expandable word passed through
`expander` (BuildKit's SupportsSingleWordExpansion). RUN, CMD and ENTRYPOINT
are never expanded here; the shell does that.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar

from lamina.engine.dockerfile.parser import Dockerfile, Heredoc, Node, parse_heredoc_marker
from lamina.errors import DockerfileError, InstructionError, Location

Expander: TypeAlias = Callable[[str], str]

INSTRUCTIONS = (
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
)

# --- values ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str


@dataclasses.dataclass(frozen=True, slots=True)
class ArgDecl:
    """One `name[=default]` of an ARG; `default` is None without `=`."""

    name: str
    default: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class SourceContent:
    """A COPY/ADD source given inline as a heredoc: the file `path` holding `data`."""

    path: str
    data: str  # already chomped for `<<-`
    expand: bool


class MountType(enum.Enum):
    BIND = "bind"
    CACHE = "cache"
    TMPFS = "tmpfs"
    SECRET = "secret"
    SSH = "ssh"


class Sharing(enum.Enum):
    SHARED = "shared"
    PRIVATE = "private"
    LOCKED = "locked"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """One `RUN --mount=...`, with BuildKit's defaults filled in.

    `from_` empty means the build context (bind) or an empty cache.
    Numbers are None when not given (or still holding an unexpanded `$`).
    """

    type: MountType
    target: str = ""
    source: str = ""
    from_: str = ""
    read_only: bool = False
    id: str = ""
    sharing: Sharing = Sharing.SHARED
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None  # tmpfs upper limit in bytes
    env: str | None = None  # secret exposed as this environment variable
    required: bool = False


# --- instructions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    """Shared by every instruction: where it is and how it was written."""

    location: Location
    original: str

    @property
    def name(self) -> str:
        return _NAMES[type(self)]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FromInstruction(Instruction):
    image: str  # as written; expanded with the global ARGs by the planner
    stage_name: str | None  # lower case; None without `AS name`
    platform: str | None = None

    def expand(self, expander: Expander) -> FromInstruction:
        platform = expander(self.platform) if self.platform is not None else None
        return dataclasses.replace(self, image=expander(self.image), platform=platform)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunInstruction(Instruction):
    command: tuple[str, ...]  # exec form: argv; shell form: one string for SHELL
    exec_form: bool
    heredocs: tuple[Heredoc, ...] = ()
    mounts: tuple[Mount, ...] = ()
    mount_specs: tuple[str, ...] = ()  # the raw --mount values, re-parsed by expand()
    network: str | None = None  # default, none or host
    security: str | None = None  # sandbox or insecure
    devices: tuple[str, ...] = ()

    def expand(self, expander: Expander) -> RunInstruction:
        """Expand the mount options only; the command is left to the shell."""
        return dataclasses.replace(self, mounts=tuple(parse_mount(s, expander) for s in self.mount_specs))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CmdInstruction(Instruction):
    command: tuple[str, ...]
    exec_form: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EntrypointInstruction(Instruction):
    command: tuple[str, ...]
    exec_form: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ShellInstruction(Instruction):
    shell: tuple[str, ...]


def _expand_pairs(pairs: tuple[KeyValue, ...], expander: Expander) -> tuple[KeyValue, ...]:
    # Every pair sees the environment from before the instruction, so that
    # `ENV a=1 b=$a` gives b the old a, as BuildKit does.
    return tuple(KeyValue(expander(p.key), expander(p.value)) for p in pairs)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EnvInstruction(Instruction):
    env: tuple[KeyValue, ...]

    def expand(self, expander: Expander) -> EnvInstruction:
        return dataclasses.replace(self, env=_expand_pairs(self.env, expander))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LabelInstruction(Instruction):
    labels: tuple[KeyValue, ...]

    def expand(self, expander: Expander) -> LabelInstruction:
        return dataclasses.replace(self, labels=_expand_pairs(self.labels, expander))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MaintainerInstruction(Instruction):
    maintainer: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExposeInstruction(Instruction):
    ports: tuple[str, ...]  # `80`, `80/tcp`, `53/udp`, `8000-8010`

    def expand(self, expander: Expander) -> ExposeInstruction:
        ports = tuple(word for port in self.ports for word in expander(port).split())
        return dataclasses.replace(self, ports=ports)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _SourcesAndDest(Instruction):
    sources: tuple[str, ...]  # context (or --from) paths, globs, URLs
    contents: tuple[SourceContent, ...]  # heredoc sources
    dest: str
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    excludes: tuple[str, ...] = ()

    def _expanded(self, expander: Expander) -> dict[str, object]:
        contents = tuple(
            dataclasses.replace(c, path=expander(c.path)) if c.expand else c for c in self.contents
        )
        chmod = expander(self.chmod) if self.chmod is not None else None
        if chmod is not None:
            _check_chmod(chmod)
        return {
            "sources": tuple(expander(s) for s in self.sources),
            "contents": contents,
            "dest": expander(self.dest),
            "chown": expander(self.chown) if self.chown is not None else None,
            "chmod": chmod,
            "excludes": tuple(expander(e) for e in self.excludes),
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CopyInstruction(_SourcesAndDest):
    from_: str | None = None  # stage name, stage index or image reference
    parents: bool = False

    def expand(self, expander: Expander) -> CopyInstruction:
        from_ = expander(self.from_) if self.from_ is not None else None
        return dataclasses.replace(self, from_=from_, **self._expanded(expander))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AddInstruction(_SourcesAndDest):
    keep_git_dir: bool = False
    checksum: str | None = None
    unpack: bool | None = None  # None: BuildKit's default (unpack local tars)

    def expand(self, expander: Expander) -> AddInstruction:
        checksum = expander(self.checksum) if self.checksum is not None else None
        return dataclasses.replace(self, checksum=checksum, **self._expanded(expander))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VolumeInstruction(Instruction):
    volumes: tuple[str, ...]

    def expand(self, expander: Expander) -> VolumeInstruction:
        volumes = tuple(expander(v) for v in self.volumes)
        if any(not v.strip() for v in volumes):
            raise InstructionError("VOLUME specified can not be an empty string", self.location)
        return dataclasses.replace(self, volumes=volumes)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UserInstruction(Instruction):
    user: str

    def expand(self, expander: Expander) -> UserInstruction:
        return dataclasses.replace(self, user=expander(self.user))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkdirInstruction(Instruction):
    path: str

    def expand(self, expander: Expander) -> WorkdirInstruction:
        return dataclasses.replace(self, path=expander(self.path))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ArgInstruction(Instruction):
    args: tuple[ArgDecl, ...]

    def expand(self, expander: Expander) -> ArgInstruction:
        """Expand the defaults (names are never expanded)."""
        args = tuple(
            ArgDecl(a.name, expander(a.default) if a.default is not None else None) for a in self.args
        )
        return dataclasses.replace(self, args=args)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OnbuildInstruction(Instruction):
    expression: str  # the trigger as written, stored in the image config
    trigger: Instruction  # the same, parsed (validated now, run in child builds)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StopsignalInstruction(Instruction):
    signal: str

    def expand(self, expander: Expander) -> StopsignalInstruction:
        return dataclasses.replace(self, signal=expander(self.signal))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HealthcheckInstruction(Instruction):
    """`test` is ("NONE",), ("CMD", argv...) or ("CMD-SHELL", command).

    Durations are nanoseconds (the image config's unit); None = not given.
    """

    test: tuple[str, ...]
    interval: int | None = None
    timeout: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    retries: int | None = None


_NAMES: dict[type, str] = {
    FromInstruction: "FROM",
    RunInstruction: "RUN",
    CmdInstruction: "CMD",
    EntrypointInstruction: "ENTRYPOINT",
    ShellInstruction: "SHELL",
    EnvInstruction: "ENV",
    LabelInstruction: "LABEL",
    MaintainerInstruction: "MAINTAINER",
    ExposeInstruction: "EXPOSE",
    CopyInstruction: "COPY",
    AddInstruction: "ADD",
    VolumeInstruction: "VOLUME",
    UserInstruction: "USER",
    WorkdirInstruction: "WORKDIR",
    ArgInstruction: "ARG",
    OnbuildInstruction: "ONBUILD",
    StopsignalInstruction: "STOPSIGNAL",
    HealthcheckInstruction: "HEALTHCHECK",
}


# --- flags ---------------------------------------------------------------------------


class _Kind(enum.Enum):
    BOOL = "bool"
    STRING = "string"
    STRINGS = "strings"  # repeatable


def _parse_flags(flags: Iterable[str], spec: dict[str, _Kind]) -> dict[str, object]:
    """BuildKit's BFlags: `--name=value`, bare booleans, repeatable lists."""
    values: dict[str, object] = {}
    for flag in flags:
        if flag == "--":
            continue
        if not flag.startswith("--"):
            raise InstructionError(f"argument {flag!r} must start with --")
        name, eq, value = flag[2:].partition("=")
        kind = spec.get(name)
        if kind is None:
            hint = suggest(name, spec)
            raise InstructionError(f"unknown flag: --{name}" + (f" (did you mean {hint}?)" if hint else ""))
        if name in values and kind is not _Kind.STRINGS:
            raise InstructionError(f"duplicate flag specified: --{name}")
        if kind is _Kind.BOOL:
            if not eq:
                values[name] = True
            elif value.lower() in ("true", "false"):
                values[name] = value.lower() == "true"
            else:
                raise InstructionError(f"expecting boolean value for flag --{name}, not: {value!r}")
            continue
        if not eq:
            raise InstructionError(f"missing a value on flag: --{name} (write --{name}=VALUE)")
        if kind is _Kind.STRINGS:
            values.setdefault(name, [])
            values[name].append(value)  # type: ignore[attr-defined]
        else:
            values[name] = value
    return values


def _str(values: dict[str, object], name: str) -> str | None:
    value = values.get(name)
    return value if isinstance(value, str) else None


def _strs(values: dict[str, object], name: str) -> tuple[str, ...]:
    value = values.get(name)
    return tuple(value) if isinstance(value, list) else ()


_OCTAL = re.compile(r"[0-7]+")
_SYMBOLIC_CLAUSE = r"[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+"
_SYMBOLIC = re.compile(rf"{_SYMBOLIC_CLAUSE}(?:,{_SYMBOLIC_CLAUSE})*")


def _check_chmod(value: str) -> None:
    if _OCTAL.fullmatch(value):
        digits = value.lstrip("0")
        if len(digits) <= 4 and int(digits or "0", 8) <= 0o7777:
            return
    elif _SYMBOLIC.fullmatch(value):
        return
    raise InstructionError(
        f"invalid chmod parameter: {value!r}: use an octal mode between 0 and 07777"
        " or a symbolic mode like u+x"
    )


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5
    "μs": 1_000,  # U+03BC
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
MAX_DURATION = 2**63 - 1  # nanoseconds: Go's time.Duration is an int64
_DIGITS = re.compile(r"[0-9]*")
_UNIT = re.compile(r"[^0-9.]*")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # Go's strconv.ParseInt, base 10: ASCII digits only


def _shown(text: str) -> str:
    """A user's value in a message: repr'd (one line), long ones cut."""
    return repr(text) if len(text) <= 40 else repr(text[:32]) + f"... ({len(text)} characters)"


# A step-by-step port of Go's time.ParseDuration, kept whole so it can be read beside Go's.
def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration, in nanoseconds (`1m30s`, `1.5h`, `300ms`, `0`).

    Ported step by step, integer arithmetic included, so the accepted range is
    Go's: up to MAX_DURATION ns (about 292 years) either way.
    """
    invalid = ValueError(f"time: invalid duration {_shown(text)}")
    out_of_range = ValueError(
        f"time: duration {_shown(text)} is out of range"
        " (at most 2562047h47m16.854775807s, Go's time.Duration)"
    )
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise invalid
    total = 0
    pos = 0
    while pos < len(rest):
        if not (rest[pos] == "." or "0" <= rest[pos] <= "9"):
            raise invalid
        digits = _DIGITS.match(rest, pos).group()  # type: ignore[union-attr]
        pos += len(digits)
        significant = digits.lstrip("0")
        if len(significant) > 19 or int(significant or "0") > 2**63:
            raise out_of_range
        whole = int(significant or "0")
        fraction, scale, fraction_digits = 0, 1.0, ""
        if rest[pos : pos + 1] == ".":
            fraction_digits = _DIGITS.match(rest, pos + 1).group()  # type: ignore[union-attr]
            pos += 1 + len(fraction_digits)
            # Go keeps the digits that fit in an int64 and drops the rest.
            for ch in fraction_digits:
                following = fraction * 10 + ord(ch) - 48
                if fraction > (2**63 - 1) // 10 or following > 2**63:
                    break
                fraction, scale = following, scale * 10
        if not digits and not fraction_digits:
            raise invalid  # ".s" or "-.s"
        unit_text = _UNIT.match(rest, pos).group()  # type: ignore[union-attr]
        pos += len(unit_text)
        if not unit_text:
            raise ValueError(f"time: missing unit in duration {_shown(text)}")
        unit = _DURATION_UNITS.get(unit_text)
        if unit is None:
            raise ValueError(f"time: unknown unit {_shown(unit_text)} in duration {_shown(text)}")
        if whole > 2**63 // unit:
            raise out_of_range
        value = whole * unit
        if fraction:
            value += int(float(fraction) * (float(unit) / scale))
            if value > 2**63:
                raise out_of_range
        total += value
        if total > 2**63:
            raise out_of_range
    if negative:
        return -total
    if total > MAX_DURATION:
        raise out_of_range
    return total


_MIN_HEALTH_DURATION = 1_000_000  # 1ms: Docker's container.MinimumDuration


def _health_duration(values: dict[str, object], name: str) -> int | None:
    text = _str(values, name)
    if text is None or text == "":
        return None
    try:
        value = parse_go_duration(text)
    except ValueError as err:
        raise InstructionError(f"invalid value for --{name}: {err}") from None
    if value < 0:
        raise InstructionError(f"--{name} cannot be negative ({text})")
    if 0 < value < _MIN_HEALTH_DURATION:
        raise InstructionError(f"--{name} cannot be less than 1ms ({text})")
    return value


# --- words checked once expanded (EXPOSE, STOPSIGNAL) ----------------------------------
# The executor checks the expanded words at the step; the planner checks literal
# words (no variable) of the stages the target needs before anything runs.


def parse_ports(specs: Iterable[str]) -> tuple[str, ...]:
    """docker's nat.ParsePortSpecs for EXPOSE: `80`, `80/udp`, `8000-8002/tcp` -> `80/tcp`, ..."""
    ports: list[str] = []
    for spec in specs:
        raw = spec
        # An `ip:host:container` form is accepted by nat; only the container part is exposed.
        if spec.count(":") >= 1:
            spec = spec.rsplit(":", 1)[1]
        port, _, proto = spec.partition("/")
        proto = proto.lower() or "tcp"
        if proto not in ("tcp", "udp", "sctp"):
            raise InstructionError(f"invalid proto: {proto}")
        first, _, last = port.partition("-")
        start = _port_number(first)
        end = _port_number(last) if last else start
        if start is None or end is None:
            raise InstructionError(f"invalid containerPort: {raw}")
        if not (0 <= start <= 65535 and 0 <= end <= 65535) or end < start:
            raise InstructionError(f"invalid port range: {raw}")
        ports.extend(f"{number}/{proto}" for number in range(start, end + 1))
    return tuple(dict.fromkeys(ports))


def _port_number(text: str) -> int | None:
    """ASCII digits (Go's strconv.ParseUint), or None; a long one is out of range."""
    if not _ASCII_NUMBER.fullmatch(text):
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= 5 else 65536


_ASCII_NUMBER = re.compile(r"[0-9]+")


_SIGNALS = {
    "ABRT": 6, "ALRM": 14, "BUS": 7, "CHLD": 17, "CLD": 17, "CONT": 18, "FPE": 8, "HUP": 1, "ILL": 4,
    "INT": 2, "IO": 29, "IOT": 6, "KILL": 9, "PIPE": 13, "POLL": 29, "PROF": 27, "PWR": 30, "QUIT": 3,
    "SEGV": 11, "STKFLT": 16, "STOP": 19, "SYS": 31, "TERM": 15, "TRAP": 5, "TSTP": 20, "TTIN": 21,
    "TTOU": 22, "URG": 23, "USR1": 10, "USR2": 12, "VTALRM": 26, "WINCH": 28, "XCPU": 24, "XFSZ": 25,
}  # fmt: skip


_REALTIME_SIGNALS = frozenset(
    ["RTMIN", "RTMAX"] + [f"RTMIN+{n}" for n in range(1, 16)] + [f"RTMAX-{n}" for n in range(1, 15)]
)
_SIGNAL_NUMBER = re.compile(r"[+-]?[0-9]+")  # strconv.Atoi: ASCII digits only (not `²`)


def check_signal(signal: str) -> None:
    """moby's signal.ParseSignal: a non-zero int64, or a NAME or SIGNAME of Linux's map."""
    if _SIGNAL_NUMBER.fullmatch(signal):
        digits = signal.lstrip("+-").lstrip("0")
        if not digits:
            raise InstructionError(f"invalid signal: {signal}")
        limit = 2**63 if signal.startswith("-") else 2**63 - 1
        if len(digits) <= 19 and int(digits) <= limit:  # else Atoi fails: looked up as a name
            return
    name = signal.upper().removeprefix("SIG")
    if name in _SIGNALS or name in _REALTIME_SIGNALS:
        return
    shown = signal if len(signal) <= 80 else signal[:77] + "..."
    raise InstructionError(f"invalid signal: {shown}")


# --- RUN --mount --------------------------------------------------------------------

_MOUNT_KEYS: dict[MountType, frozenset[str]] = {
    MountType.BIND: frozenset({"target", "source", "from", "readonly", "readwrite"}),
    MountType.CACHE: frozenset(
        {"target", "source", "from", "readonly", "readwrite", "id", "sharing", "mode", "uid", "gid"}
    ),
    MountType.TMPFS: frozenset({"target", "size", "readonly", "readwrite"}),
    MountType.SECRET: frozenset({"target", "source", "id", "env", "required", "mode", "uid", "gid"}),
    MountType.SSH: frozenset({"target", "id", "required", "mode", "uid", "gid"}),
}
# Keys BuildKit's parseMount takes for every type that its dispatch never reads for this one
# (an id on a bind, `ro` on a secret, which is read-only anyway): taken and dropped, as there, so a
# Dockerfile BuildKit builds builds the same here. `from` on tmpfs/ssh is not inert (BuildKit
# resolves that stage or image, which must come before the RUN, and mounts nothing of it): refused.
_INERT_MOUNT_KEYS: dict[MountType, frozenset[str]] = {
    MountType.BIND: frozenset({"id", "env"}),
    MountType.CACHE: frozenset({"env"}),
    MountType.TMPFS: frozenset({"id", "env", "source"}),
    MountType.SECRET: frozenset({"readonly", "readwrite"}),
    MountType.SSH: frozenset({"readonly", "readwrite", "env"}),
}
_MOUNT_ALIASES = {
    "dst": "target",
    "destination": "target",
    "src": "source",
    "ro": "readonly",
    "rw": "readwrite",
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) *([kKmMgGtTpP]?)[iI]?[bB]?")


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise InstructionError(f"invalid value {value!r} for mount option {key}: expecting true or false")


_UINT = {8: re.compile(r"[0-7]+"), 10: re.compile(r"[0-9]+")}


def _parse_uint(key: str, value: str, base: int) -> int | None:
    """Go's strconv.ParseUint(value, base, 32): ASCII digits, no sign, below 2**32."""
    if "$" in value:
        return None  # checked again once expanded
    if not _UINT[base].fullmatch(value):
        raise InstructionError(f"invalid value {_shown(value)} for mount option {key}")
    significant = value.lstrip("0")
    if len(significant) > 12 or int(significant or "0", base) >= 2**32:
        raise InstructionError(
            f"invalid value {_shown(value)} for mount option {key}: out of range (at most {2**32 - 1})"
        )
    return int(significant or "0", base)


MAX_TMPFS_SIZE = 2**63 - 1  # bytes: docker/go-units gives an int64


def _parse_size(value: str) -> int | None:
    if "$" in value:
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise InstructionError(f"invalid size {_shown(value)} for tmpfs mount")
    factor = 1024 ** " kmgtp".index(match.group(2).lower() or " ")
    size = float(match.group(1)) * factor  # go-units multiplies a float64 too
    if not size < 2**63:  # also infinity, where Go's ParseFloat fails
        raise InstructionError(
            f"invalid size {_shown(value)} for tmpfs mount: out of range (at most {MAX_TMPFS_SIZE} bytes)"
        )
    return int(size)


def parse_device(spec: str) -> tuple[str, bool]:
    """One `RUN --device` value as BuildKit's ParseDevice reads it: (name, required)."""
    name, required = "", False
    for field in next(csv.reader([spec])) if spec else []:
        key, eq, value = field.partition("=")
        key = key.lower()
        if key == "required":
            if eq and value.lower() not in ("1", "t", "true", "0", "f", "false"):
                raise InstructionError(f"invalid value for required: {value}")
            required = not eq or value.lower() in ("1", "t", "true")
        elif key == "name" and eq:
            if name:
                raise InstructionError(f"device name already set to {name}")
            name = value
        elif not name:
            name = field
        elif not eq:
            raise InstructionError(f"invalid field '{field}' must be a key=value pair")
        else:
            hint = suggest(key, ["name", "required"])
            raise InstructionError(
                f"unexpected key '{key}' in '{field}'" + (f" (did you mean {hint}?)" if hint else "")
            )
    if not name:
        raise InstructionError(f"RUN --device={spec}: no device name")
    return name, required


def parse_mount(spec: str, expander: Expander | None = None) -> Mount:
    """One `--mount` value (CSV of key=value) -> Mount, expanding values if asked."""
    options, deferred = _mount_options(spec, expander)
    if deferred:
        # A placeholder until RunInstruction.expand parses the spec again;
        # only `from` (a literal, checked in _mount_options) is read before that.
        return Mount(type=MountType.BIND, from_=options.get("from", ""))
    mount_type = _mount_type(options)
    read_only = mount_type is MountType.BIND
    if "readonly" in options:
        read_only = _parse_bool("readonly", options["readonly"])
    if "readwrite" in options:
        read_only = not _parse_bool("readwrite", options["readwrite"])
    sharing = Sharing.SHARED
    if options.get("sharing"):
        try:
            sharing = Sharing(options["sharing"].lower())
        except ValueError:
            raise InstructionError(f"unsupported sharing value {options['sharing']!r}") from None
    env = options.get("env")
    mount_id = options.get("id", "")
    if mount_type is MountType.SECRET and options.get("source"):
        # BuildKit's dispatchSecret: a secret's source is its id (the older spelling)
        if mount_id:
            raise InstructionError("secret mount: both source and id can't be set")
        mount_id = options.pop("source")
    mount_id, target = _mount_id_and_target(mount_type, mount_id, options.get("target", ""), env)
    return Mount(
        type=mount_type,
        target=target,
        source=options.get("source", ""),
        from_=options.get("from", ""),
        read_only=read_only,
        id=mount_id,
        sharing=sharing,
        mode=_parse_uint("mode", options["mode"], 8) if "mode" in options else None,
        uid=_parse_uint("uid", options["uid"], 10) if "uid" in options else None,
        gid=_parse_uint("gid", options["gid"], 10) if "gid" in options else None,
        size=_parse_size(options["size"]) if "size" in options else None,
        env=env,
        required=_parse_bool("required", options["required"]) if "required" in options else False,
    )


def _mount_options(spec: str, expander: Expander | None) -> tuple[dict[str, str], bool]:
    """The `--mount` CSV as {key: value} (aliases resolved, values expanded if asked), and
    whether a value holds a variable to expand later (no expander yet)."""
    try:
        fields = next(csv.reader([spec]), [])
    except csv.Error as err:
        raise InstructionError(f"invalid --mount {spec!r}: {err}") from None
    options: dict[str, str] = {}
    deferred = False
    for field in fields:
        key, eq, value = field.partition("=")
        key = _MOUNT_ALIASES.get(key.strip().lower(), key.strip().lower())
        if not eq:
            if key not in ("readonly", "readwrite", "required"):
                raise InstructionError(f"invalid --mount {spec!r}: option {field!r} needs a value")
            value = "true"
        elif expander is not None:
            value = expander(value)  # every value, `type` too (BuildKit's parseMount)
        elif key == "from" and "$" in value[:-1]:
            raise InstructionError(
                f"--mount from={value}: 'from' doesn't support variable expansion, define alias stage instead"
            )
        elif "$" in value:
            deferred = True  # checked when the stage's ARG and ENV are known
        if key in options:
            raise InstructionError(f"invalid --mount {spec!r}: {key} given twice")
        options[key] = value
    return options, deferred


def _mount_type(options: dict[str, str]) -> MountType:
    """The mount's type, taken out of `options`; every other key must be one of that type's."""
    type_text = options.pop("type", "bind").lower()
    try:
        mount_type = MountType(type_text)
    except ValueError:
        hint = suggest(type_text, [t.value for t in MountType])
        raise InstructionError(
            f"unsupported mount type {type_text!r}" + (f" (did you mean {hint}?)" if hint else "")
        ) from None
    allowed = _MOUNT_KEYS[mount_type]
    for key in _INERT_MOUNT_KEYS[mount_type] & options.keys():
        if key in ("readonly", "readwrite"):
            _parse_bool(key, options[key])  # a bad value is still an error, as in BuildKit
        del options[key]
    for key in options:
        if key not in allowed:
            known = set().union(*_MOUNT_KEYS.values()) | {"type"}
            hint = suggest(key, sorted(known)) if key not in known else None
            raise InstructionError(
                f"unexpected key {key!r} for mount type {mount_type.value!r}"
                + (f" (did you mean {hint}?)" if hint else "")
            )
    return mount_type


def _mount_id_and_target(
    mount_type: MountType, mount_id: str, target: str, env: str | None
) -> tuple[str, str]:
    """The id and target a cache, secret or ssh mount gets when they are not given."""
    # No target, or a relative one, is the stage's WORKDIR joined with it, when the step runs
    # (BuildKit's dispatchRunMounts); only a target of `/` is refused there.
    if mount_type is MountType.CACHE and not mount_id:
        mount_id = posixpath.normpath(target) if target else "."  # path.Clean(target), as BuildKit
    if mount_type is MountType.SECRET:
        if not mount_id:
            if not target:
                raise InstructionError("secret mount requires an id or a target")
            mount_id = posixpath.basename(target)
        if not target and env is None:
            target = "/run/secrets/" + posixpath.basename(mount_id)  # path.Base(id), as BuildKit
    if mount_type is MountType.SSH and not mount_id:
        mount_id = "default"
    return mount_id, target


# --- per-instruction parsers ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Request:
    node: Node
    location: Location

    @property
    def args(self) -> tuple[str, ...]:
        return self.node.args

    def flags(self, spec: dict[str, _Kind] | None = None) -> dict[str, object]:
        return _parse_flags(self.node.flags, spec or {})


_I = TypeVar("_I", bound=Instruction)


def _make(cls: type[_I], req: _Request, **fields: Any) -> _I:
    return cls(location=req.location, original=req.node.original, **fields)


def _at_least_one(req: _Request, name: str) -> None:
    if not req.args:
        raise InstructionError(f"{name} requires at least one argument")


def _exactly_one(req: _Request, name: str) -> str:
    if len(req.args) != 1:
        raise InstructionError(f"{name} requires exactly one argument")
    return req.args[0]


def _pairs(req: _Request, name: str) -> tuple[KeyValue, ...]:
    args = req.args
    if not args:
        raise InstructionError(f"{name} requires at least one argument")
    if len(args) % 3:
        raise InstructionError(f"bad input to {name}, too many arguments")
    return tuple(KeyValue(args[i], args[i + 1]) for i in range(0, len(args), 3))


_STAGE_NAME = re.compile(r"[a-z][a-z0-9-_.]*")


def _from(req: _Request) -> FromInstruction:
    values = req.flags({"platform": _Kind.STRING})
    args = req.args
    if not (len(args) == 1 or (len(args) == 3 and args[1].lower() == "as")):
        raise InstructionError("FROM requires either one or three arguments (FROM image [AS name])")
    stage_name = None
    if len(args) == 3:
        stage_name = args[2].lower()
        if not _STAGE_NAME.fullmatch(stage_name):
            raise InstructionError(
                f"invalid name for build stage: {args[2]!r},"
                " name can't start with a number or contain symbols"
            )
    return _make(
        FromInstruction, req, image=args[0], stage_name=stage_name, platform=_str(values, "platform")
    )


def _command(req: _Request) -> tuple[tuple[str, ...], bool]:
    if req.node.json:
        return req.args, True
    return ((" ".join(req.args),) if req.args else ()), False


def _run(req: _Request) -> RunInstruction:
    values = req.flags(
        {"mount": _Kind.STRINGS, "network": _Kind.STRING, "security": _Kind.STRING, "device": _Kind.STRINGS}
    )
    _at_least_one(req, "RUN")
    network = _str(values, "network")
    if network is not None and network not in ("default", "none", "host"):
        raise InstructionError(f"unsupported network mode {network!r} (use default, none or host)")
    security = _str(values, "security")
    if security is not None and security not in ("sandbox", "insecure"):
        raise InstructionError(f"unsupported security mode {security!r} (use sandbox or insecure)")
    for device in _strs(values, "device"):
        parse_device(device)  # refused where it is written; the step reads it again (engine.cdi)
    specs = _strs(values, "mount")
    command, exec_form = _command(req)
    return _make(
        RunInstruction,
        req,
        command=command,
        exec_form=exec_form,
        heredocs=req.node.heredocs,
        mounts=tuple(parse_mount(s) for s in specs),
        mount_specs=specs,
        network=network,
        security=security,
        devices=_strs(values, "device"),
    )


def _cmd(req: _Request) -> CmdInstruction:
    req.flags()
    command, exec_form = _command(req)
    return _make(CmdInstruction, req, command=command, exec_form=exec_form)


def _entrypoint(req: _Request) -> EntrypointInstruction:
    req.flags()
    command, exec_form = _command(req)
    return _make(EntrypointInstruction, req, command=command, exec_form=exec_form)


def _shell(req: _Request) -> ShellInstruction:
    req.flags()
    _at_least_one(req, "SHELL")
    if not req.node.json:
        raise InstructionError(
            'SHELL requires the arguments to be in JSON form, e.g. SHELL ["/bin/sh", "-c"]'
        )
    return _make(ShellInstruction, req, shell=req.args)


def _env(req: _Request) -> EnvInstruction:
    req.flags()
    return _make(EnvInstruction, req, env=_pairs(req, "ENV"))


def _label(req: _Request) -> LabelInstruction:
    req.flags()
    return _make(LabelInstruction, req, labels=_pairs(req, "LABEL"))


def _maintainer(req: _Request) -> MaintainerInstruction:
    req.flags()
    return _make(MaintainerInstruction, req, maintainer=_exactly_one(req, "MAINTAINER"))


def _expose(req: _Request) -> ExposeInstruction:
    req.flags()
    _at_least_one(req, "EXPOSE")
    return _make(ExposeInstruction, req, ports=tuple(sorted(req.args)))  # as BuildKit's parseExpose


def _sources_and_dest(req: _Request, name: str) -> dict[str, object]:
    args = req.args
    if len(args) < 2:
        raise InstructionError(
            f"{name} requires at least two arguments, but only one was provided."
            " Destination could not be determined."
        )
    heredocs = {h.name: h for h in req.node.heredocs}
    sources: list[str] = []
    contents: list[SourceContent] = []
    for src in args[:-1]:
        marker = parse_heredoc_marker(src) if heredocs and not req.node.json else None
        if marker is not None and marker.name in heredocs:
            doc = heredocs[marker.name]
            contents.append(SourceContent(path=doc.name, data=doc.chomped(), expand=doc.expand))
        else:
            sources.append(src)
    dest = args[-1]
    if heredocs and parse_heredoc_marker(dest) is not None:
        raise InstructionError(f"{name} cannot use a heredoc as its destination")
    return {"sources": tuple(sources), "contents": tuple(contents), "dest": dest}


def _file_flags(values: dict[str, object]) -> dict[str, object]:
    chmod = _str(values, "chmod")
    if chmod is not None and "$" not in chmod:
        _check_chmod(chmod)
    return {
        "chown": _str(values, "chown"),
        "chmod": chmod,
        "link": bool(values.get("link", False)),
        "excludes": _strs(values, "exclude"),
    }


_FILE_FLAGS = {"chown": _Kind.STRING, "chmod": _Kind.STRING, "link": _Kind.BOOL, "exclude": _Kind.STRINGS}


def _copy(req: _Request) -> CopyInstruction:
    values = req.flags({**_FILE_FLAGS, "from": _Kind.STRING, "parents": _Kind.BOOL})
    parts = _sources_and_dest(req, "COPY")
    from_ = _str(values, "from")
    if from_ == "":
        raise InstructionError("--from requires a stage name, a stage index or an image")
    return _make(
        CopyInstruction,
        req,
        **parts,
        **_file_flags(values),
        from_=from_,
        parents=bool(values.get("parents", False)),
    )


def _add(req: _Request) -> AddInstruction:
    values = req.flags(
        {**_FILE_FLAGS, "keep-git-dir": _Kind.BOOL, "checksum": _Kind.STRING, "unpack": _Kind.BOOL}
    )
    parts = _sources_and_dest(req, "ADD")
    unpack = values.get("unpack")
    return _make(
        AddInstruction,
        req,
        **parts,
        **_file_flags(values),
        keep_git_dir=bool(values.get("keep-git-dir", False)),
        checksum=_str(values, "checksum"),
        unpack=unpack if isinstance(unpack, bool) else None,
    )


def _volume(req: _Request) -> VolumeInstruction:
    req.flags()
    _at_least_one(req, "VOLUME")
    volumes = tuple(v.strip() for v in req.args)
    if any(not v for v in volumes):
        raise InstructionError("VOLUME specified can not be an empty string")
    return _make(VolumeInstruction, req, volumes=volumes)


def _user(req: _Request) -> UserInstruction:
    req.flags()
    return _make(UserInstruction, req, user=_exactly_one(req, "USER"))


def _workdir(req: _Request) -> WorkdirInstruction:
    req.flags()
    return _make(WorkdirInstruction, req, path=_exactly_one(req, "WORKDIR"))


def _arg(req: _Request) -> ArgInstruction:
    req.flags()
    _at_least_one(req, "ARG")
    decls = []
    for word in req.args:
        name, eq, default = word.partition("=")
        if not name:
            raise InstructionError("ARG names can not be blank")
        decls.append(ArgDecl(name, default if eq else None))
    return _make(ArgInstruction, req, args=tuple(decls))


def _stopsignal(req: _Request) -> StopsignalInstruction:
    req.flags()
    return _make(StopsignalInstruction, req, signal=_exactly_one(req, "STOPSIGNAL"))


def _healthcheck(req: _Request) -> HealthcheckInstruction:
    values = req.flags(
        {
            "interval": _Kind.STRING,
            "timeout": _Kind.STRING,
            "start-period": _Kind.STRING,
            "start-interval": _Kind.STRING,
            "retries": _Kind.STRING,
        }
    )
    _at_least_one(req, "HEALTHCHECK")
    kind = req.args[0].upper()
    rest = req.args[1:]
    if kind == "NONE":
        if rest:
            raise InstructionError("HEALTHCHECK NONE takes no arguments")
        return _make(HealthcheckInstruction, req, test=("NONE",))
    if kind != "CMD":
        raise InstructionError(f"unknown type {req.args[0]!r} in HEALTHCHECK (try CMD)")
    if not rest:
        raise InstructionError("missing command after HEALTHCHECK CMD")
    test = ("CMD", *rest) if req.node.json else ("CMD-SHELL", " ".join(rest))
    retries = None
    text = _str(values, "retries")
    if text:
        # BuildKit: strconv.ParseInt(text, 10, 32), then not negative.
        if not _INTEGER.fullmatch(text):
            raise InstructionError(f"invalid value for --retries: {_shown(text)} is not an integer")
        sign = -1 if text[0] == "-" else 1
        digits = text.lstrip("+-").lstrip("0") or "0"
        if len(digits) > 10 or not -(2**31) <= sign * int(digits) < 2**31:
            raise InstructionError(
                f"invalid value for --retries: {_shown(text)} is out of range (at most {2**31 - 1})"
            )
        retries = sign * int(digits)
        if retries < 0:
            raise InstructionError(f"--retries cannot be negative ({retries})")
    return _make(
        HealthcheckInstruction,
        req,
        test=test,
        interval=_health_duration(values, "interval"),
        timeout=_health_duration(values, "timeout"),
        start_period=_health_duration(values, "start-period"),
        start_interval=_health_duration(values, "start-interval"),
        retries=retries,
    )


def _onbuild(req: _Request) -> OnbuildInstruction:
    req.flags()
    child = req.node.child
    if child is None:
        raise InstructionError("ONBUILD requires at least one argument")
    trigger_name = child.keyword.upper()
    if trigger_name == "ONBUILD":
        raise InstructionError("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger_name in ("FROM", "MAINTAINER"):
        raise InstructionError(f"{trigger_name} isn't allowed as an ONBUILD trigger")
    # Heredocs of the trigger are attached to the ONBUILD node by the parser.
    trigger_node = dataclasses.replace(child, heredocs=req.node.heredocs)
    trigger = _dispatch(_Request(trigger_node, req.location))
    expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", req.node.original)
    # As BuildKit's parseOnBuild: the trigger kept in the image carries its heredoc
    # bodies and terminators, so the child build can parse `RUN <<EOF` again.
    expression += "".join(f"\n{heredoc.content}{heredoc.name}" for heredoc in req.node.heredocs)
    return _make(OnbuildInstruction, req, expression=expression, trigger=trigger)


_PARSERS: dict[str, Callable[[_Request], Instruction]] = {
    "add": _add,
    "arg": _arg,
    "cmd": _cmd,
    "copy": _copy,
    "entrypoint": _entrypoint,
    "env": _env,
    "expose": _expose,
    "from": _from,
    "healthcheck": _healthcheck,
    "label": _label,
    "maintainer": _maintainer,
    "onbuild": _onbuild,
    "run": _run,
    "shell": _shell,
    "stopsignal": _stopsignal,
    "user": _user,
    "volume": _volume,
    "workdir": _workdir,
}


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def suggest(word: str, options: Iterable[str]) -> str | None:
    """The closest option when it is close enough to be a likely typo.

    BuildKit's util/suggest.Search: fewer than 3 edits away, whatever the
    length (`tmp` -> tmpfs), and no suggestion when the word is an option.
    """
    best, best_distance = None, 3
    for option in options:
        distance = _levenshtein(word.lower(), option.lower())
        if distance == 0:
            return None
        if distance < best_distance:
            best, best_distance = option, distance
    return best


def _dispatch(req: _Request) -> Instruction:
    parser = _PARSERS.get(req.node.name)
    if parser is None:
        message = f"unknown instruction: {req.node.keyword}"
        hint = suggest(req.node.keyword, INSTRUCTIONS)
        if hint is not None:
            message += f" (did you mean {hint}?)"
        raise InstructionError(message)
    return parser(req)


def parse_instruction(node: Node, path: str = "Dockerfile") -> Instruction:
    """Node -> typed instruction; every error is located at the node's line."""
    location = Location(path, node.start_line)
    try:
        return _dispatch(_Request(node, location))
    except DockerfileError as err:
        raise err.with_location(location) from None


# --- stages ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Stage:
    """One `FROM` and the instructions up to the next one."""

    index: int
    from_: FromInstruction
    instructions: tuple[Instruction, ...]

    @property
    def name(self) -> str | None:
        return self.from_.stage_name

    @property
    def location(self) -> Location:
        return self.from_.location

    def display_name(self) -> str:
        return self.name if self.name is not None else f"stage-{self.index}"


@dataclasses.dataclass(frozen=True, slots=True)
class Stages:
    """BuildKit's instructions.Parse: the stages and the ARGs before the first FROM."""

    stages: tuple[Stage, ...]
    meta_args: tuple[ArgInstruction, ...]


# lamina's limit (BuildKit has none): planning walks the stage graph depth first, and real
# Dockerfiles have tens of stages.
MAX_STAGES = 512


def parse_stages(dockerfile: Dockerfile) -> Stages:
    """Split a parsed Dockerfile into stages, validating every instruction."""
    meta_args: list[ArgInstruction] = []
    stages: list[Stage] = []
    current: FromInstruction | None = None
    body: list[Instruction] = []
    for node in dockerfile.children:
        instruction = parse_instruction(node, dockerfile.path)
        if isinstance(instruction, FromInstruction):
            # A name given twice is BuildKit's DuplicateStageName warning (engine/dockerfile/checks),
            # not an error: a later reference means the last stage of that name.
            if current is not None:
                stages.append(Stage(len(stages), current, tuple(body)))
                if len(stages) >= MAX_STAGES:
                    raise InstructionError(
                        f"more than {MAX_STAGES} stages (lamina's limit)", instruction.location
                    )
            current, body = instruction, []
        elif current is None:
            if not isinstance(instruction, ArgInstruction):
                raise InstructionError(
                    f"{instruction.name} before the first FROM: only ARG may come before FROM",
                    instruction.location,
                )
            meta_args.append(instruction)
        else:
            body.append(instruction)
    if current is None:
        raise InstructionError(
            "no FROM instruction: the dockerfile contains no stages to build", Location(dockerfile.path, 0)
        )
    stages.append(Stage(len(stages), current, tuple(body)))
    return Stages(tuple(stages), tuple(meta_args))


def parse_trigger(expression: str, location: Location) -> Instruction:
    """An ONBUILD trigger stored in a base image's config, parsed as its own line.

    The executor runs these right after the child's FROM; `location` is that
    FROM line, where any error in the trigger is reported.
    """
    from lamina.engine.dockerfile.parser import parse

    try:
        nodes = parse(expression, location.path).children
    except DockerfileError as err:
        raise InstructionError(f"ONBUILD trigger {expression!r}: {err.message}", location) from None
    if len(nodes) != 1:
        raise InstructionError(f"ONBUILD trigger {expression!r} is not one instruction", location)
    node = nodes[0]
    if node.name in ("onbuild", "from", "maintainer"):
        raise InstructionError(f"{node.keyword.upper()} isn't allowed as an ONBUILD trigger", location)
    try:
        return _dispatch(_Request(node, location))
    except DockerfileError as err:
        raise InstructionError(f"ONBUILD trigger {expression!r}: {err.message}", location) from None
