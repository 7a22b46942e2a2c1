"""Metadata steps: instructions that change the image config, not the files.

Each function takes the config before the step and returns the config after
it, with the history entry BuildKit's Dockerfile frontend appends
(`dockerfile2llb`'s `commitToHistory`): `created_by` text formatted the way
Go's `fmt` prints the values BuildKit passes (`%q` of a []string for CMD,
`%v` of a map for EXPOSE, ...), comment `buildkit.dockerfile.v0`, and
`empty_layer` for steps without a layer. Steps that run something (RUN,
COPY, ADD) get ` # buildkit` appended to their `created_by`.

Everything here is a pure function over `ImageConfig` values; expansion of
the instruction's words happened before (the executor passes final values).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence

from lamina.engine.dockerfile.instructions import check_signal, parse_ports
from lamina.errors import InstructionError
from lamina.oci.image import ContainerConfig, Healthcheck, History, ImageConfig

HISTORY_COMMENT = "buildkit.dockerfile.v0"
DEFAULT_SHELL = ("/bin/sh", "-c")


# --- Go formatting -------------------------------------------------------------------


def go_quote(text: str) -> str:
    """Go's strconv.Quote: double-quoted, printable runes kept, others escaped."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable() or char == " ":
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote_list(items: Sequence[str]) -> str:
    """`fmt.Sprintf("%q", []string{...})`: `["a" "b"]`."""
    return "[" + " ".join(go_quote(item) for item in items) + "]"


def go_list(items: Sequence[str]) -> str:
    """`fmt.Sprintf("%v", []string{...})`: `[a b]`."""
    return "[" + " ".join(items) + "]"


def go_duration(nanoseconds: int) -> str:
    """Go's time.Duration.String(): 0s, 1.5s, 1m30s, 500ms, 2h0m0s."""
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    ns = abs(nanoseconds)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _decimal(ns, size) + unit
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    seconds = _decimal(rest, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def _go_quote_rune(value: int) -> str:
    """`%q` of an int: a quoted rune literal, as Go prints HealthcheckConfig.Retries.

    A value that is no Unicode scalar (above U+10FFFF, a surrogate, negative:
    --retries goes up to 2**31-1) prints as U+FFFD, as Go's fmt and strconv do.
    """
    if not 0 <= value <= 0x10FFFF or 0xD800 <= value <= 0xDFFF:
        value = 0xFFFD
    char = chr(value)
    if char == "'":
        return "'\\''"
    if char == "\\":
        return "'\\\\'"
    if char in _GO_ESCAPES:
        return f"'{_GO_ESCAPES[char]}'"
    if char.isprintable():
        return f"'{char}'"
    if value < 0x80:
        return f"'\\x{value:02x}'"
    return f"'\\u{value:04x}'" if value <= 0xFFFF else f"'\\U{value:08x}'"


# --- history -----------------------------------------------------------------------


def add_history(
    config: ImageConfig, created_by: str, *, created: str | None, empty_layer: bool, ran: bool = False
) -> ImageConfig:
    """Append one history entry; `ran` marks steps BuildKit executes (RUN, COPY, ADD)."""
    if ran:
        created_by += " # buildkit"
    entry = History(created=created, created_by=created_by, comment=HISTORY_COMMENT, empty_layer=empty_layer)
    return dataclasses.replace(config, history=(*config.history, entry))


def _with(config: ImageConfig, **changes: object) -> ImageConfig:
    return dataclasses.replace(config, config=dataclasses.replace(config.config, **changes))


# --- environment ---------------------------------------------------------------------


def env_dict(container: ContainerConfig) -> dict[str, str]:
    """The config's Env as an ordered dict (later entries win, as in a shell)."""
    out: dict[str, str] = {}
    for entry in container.env:
        name, _, value = entry.partition("=")
        out[name] = value
    return out


def add_env(env: Sequence[str], name: str, value: str) -> tuple[str, ...]:
    """Set `name` in a Docker Env list in place, or append it (BuildKit's addEnv)."""
    out = list(env)
    for i, entry in enumerate(out):
        if entry.partition("=")[0] == name:
            out[i] = f"{name}={value}"
            return tuple(out)
    out.append(f"{name}={value}")
    return tuple(out)


def ensure_path(config: ImageConfig) -> ImageConfig:
    """BuildKit makes sure PATH is always set in a stage's config."""
    if any(entry.partition("=")[0] == "PATH" for entry in config.config.env):
        return config
    default = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return _with(config, env=(*config.config.env, default))


def apply_env(config: ImageConfig, pairs: Sequence[tuple[str, str]], created: str | None) -> ImageConfig:
    env = config.config.env
    for name, value in pairs:
        env = add_env(env, name, value)
    message = "ENV" + "".join(f" {name}={value}" for name, value in pairs)
    return add_history(_with(config, env=env), message, created=created, empty_layer=True)


def apply_label(config: ImageConfig, pairs: Sequence[tuple[str, str]], created: str | None) -> ImageConfig:
    labels = dict(config.config.labels)
    labels.update(pairs)
    message = "LABEL" + "".join(f" {name}={value}" for name, value in pairs)
    new = _with(config, labels=tuple(sorted(labels.items())))
    return add_history(new, message, created=created, empty_layer=True)


def merge_labels(config: ImageConfig, labels: Sequence[tuple[str, str]]) -> ImageConfig:
    """`--label` values: set on the target's config with no history entry, as BuildKit does."""
    if not labels:
        return config
    merged = dict(config.config.labels)
    merged.update(labels)
    return _with(config, labels=tuple(sorted(merged.items())))


def arg_history(
    config: ImageConfig, pairs: Sequence[tuple[str, str | None]], created: str | None
) -> ImageConfig:
    """ARG leaves the config alone but gets a history entry with the effective values."""
    parts = [name if value is None else f"{name}={value}" for name, value in pairs]
    return add_history(config, "ARG " + " ".join(parts), created=created, empty_layer=True)


# --- ports, volumes, user, workdir ----------------------------------------------------
# parse_ports and check_signal are the front end's (the planner checks literal
# values before anything runs); they are used here on the expanded words.


def apply_expose(config: ImageConfig, specs: Sequence[str], created: str | None) -> ImageConfig:
    ports = parse_ports(specs)
    exposed = tuple(sorted(set(config.config.exposed_ports) | set(ports)))
    # BuildKit's dispatchExpose prints the parsed ports in order (the words were
    # sorted when parsed): `EXPOSE [1234/udp 2375/tcp 5000/tcp]`.
    message = "EXPOSE [" + " ".join(ports) + "]"
    return add_history(_with(config, exposed_ports=exposed), message, created=created, empty_layer=True)


def apply_volume(config: ImageConfig, volumes: Sequence[str], created: str | None) -> ImageConfig:
    if any(volume == "" for volume in volumes):
        raise InstructionError("VOLUME specified can not be an empty string")
    merged = tuple(sorted(set(config.config.volumes) | set(volumes)))
    return add_history(
        _with(config, volumes=merged), f"VOLUME {go_list(volumes)}", created=created, empty_layer=True
    )


def apply_user(config: ImageConfig, user: str, created: str | None) -> ImageConfig:
    return add_history(_with(config, user=user), f"USER {user}", created=created, empty_layer=True)


def resolve_workdir(current: str, path: str) -> str:
    """The working directory the config records after `WORKDIR path`, as BuildKit's
    NormalizeWorkdir: an absolute path exactly as written (`/app/` stays `/app/`),
    a relative one joined to the current directory and cleaned."""
    if path.startswith("/"):
        return path
    return clean_path(posixpath.join("/", current or "/", path))


def clean_path(path: str) -> str:
    """`path` cleaned like Go's path.Clean: the directory WORKDIR makes."""
    cleaned = posixpath.normpath(path)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def apply_workdir(config: ImageConfig, path: str, created: str | None, *, has_layer: bool) -> ImageConfig:
    """WORKDIR sets the directory; the executor creates it (a layer unless it is `/`)."""
    workdir = resolve_workdir(config.config.working_dir, path)
    new = _with(config, working_dir=workdir)
    return add_history(new, f"WORKDIR {workdir}", created=created, empty_layer=not has_layer)


# --- commands ----------------------------------------------------------------------------


def with_shell(config: ImageConfig, args: Sequence[str]) -> tuple[str, ...]:
    """Shell form: the stage's SHELL (default /bin/sh -c) followed by the joined words."""
    shell = config.config.shell or DEFAULT_SHELL
    return (*shell, " ".join(args))


def apply_cmd(
    config: ImageConfig, args: Sequence[str], *, shell_form: bool, created: str | None
) -> ImageConfig:
    cmd = with_shell(config, args) if shell_form else tuple(args)
    new = _with(config, cmd=cmd, args_escaped=True)
    return add_history(new, f"CMD {go_quote_list(cmd)}", created=created, empty_layer=True)


def apply_entrypoint(
    config: ImageConfig, args: Sequence[str], *, shell_form: bool, cmd_set: bool, created: str | None
) -> ImageConfig:
    """ENTRYPOINT; an inherited CMD is dropped unless CMD was set earlier in this stage."""
    entrypoint = with_shell(config, args) if shell_form else tuple(args)
    changes: dict[str, object] = {"entrypoint": entrypoint}
    if not cmd_set:
        changes["cmd"] = None
    new = _with(config, **changes)
    return add_history(new, f"ENTRYPOINT {go_quote_list(entrypoint)}", created=created, empty_layer=True)


def apply_shell(config: ImageConfig, shell: Sequence[str], created: str | None) -> ImageConfig:
    return add_history(
        _with(config, shell=tuple(shell)), f"SHELL {go_list(shell)}", created=created, empty_layer=True
    )


def apply_healthcheck(config: ImageConfig, check: Healthcheck, created: str | None) -> ImageConfig:
    """HEALTHCHECK; `HEALTHCHECK NONE` arrives as test ("NONE",)."""
    fields = [
        go_quote_list(check.test),
        go_quote(go_duration(check.interval)),
        go_quote(go_duration(check.timeout)),
        go_quote(go_duration(check.start_period)),
        go_quote(go_duration(check.start_interval)),
        _go_quote_rune(check.retries),
    ]
    message = "HEALTHCHECK &{" + " ".join(fields) + "}"
    return add_history(_with(config, healthcheck=check), message, created=created, empty_layer=True)


def apply_stopsignal(config: ImageConfig, signal: str, created: str | None) -> ImageConfig:
    check_signal(signal)
    return add_history(
        _with(config, stop_signal=signal), f"STOPSIGNAL {signal}", created=created, empty_layer=True
    )


def apply_maintainer(config: ImageConfig, maintainer: str, created: str | None) -> ImageConfig:
    new = dataclasses.replace(config, author=maintainer)
    return add_history(new, f"MAINTAINER {maintainer}", created=created, empty_layer=True)


def apply_onbuild(config: ImageConfig, expression: str) -> ImageConfig:
    """ONBUILD records its trigger in the config; BuildKit writes no history entry for it."""
    return _with(config, on_build=(*config.config.on_build, expression))


def clear_onbuild(config: ImageConfig) -> ImageConfig:
    """A stage that ran its base's triggers does not pass them on."""
    return _with(config, on_build=())


# --- RUN / COPY / ADD history text --------------------------------------------------------


def run_created_by(argv: Sequence[str], build_args: Sequence[tuple[str, str]]) -> str:
    """`RUN |2 A=1 B=2 /bin/sh -c make`: the stage's ARGs, then the command line."""
    args: dict[str, str] = {}
    for name, value in build_args:
        args[name] = value  # a redeclared ARG keeps its first position
    words = [f"{name}={value}" for name, value in args.items()]
    if words:
        words.insert(0, f"|{len(words)}")
    return "RUN " + " ".join([*words, *argv])


def copy_created_by(
    keyword: str,
    sources: Sequence[str],
    dest: str,
    *,
    chown: str = "",
    chmod: str = "",
    parents: bool = False,
    heredoc_names: Sequence[str] = (),
) -> str:
    """`COPY --chown=x src dest`; --from, --link and --exclude are not recorded (as BuildKit)."""
    parts = [keyword]
    if parents:
        parts.append("--parents")
    if chown:
        parts.append(f"--chown={chown}")
    if chmod:
        parts.append(f"--chmod={chmod}")
    parts.extend(sources)
    parts.extend(f"<<{name}" for name in heredoc_names)
    parts.append(dest)
    return " ".join(parts)
