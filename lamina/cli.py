"""The `lamina` command: parses flags, calls the API, prints.

Commands import what they need inside their bodies so that `lamina --help`
and a no-op rebuild do not pay for modules they never use.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import click

from lamina.errors import LaminaError


class _Group(click.Group):
    """A click group that turns every LaminaError into one line on stderr."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (LaminaError, OSError) as err:
            if _stdout_gone(err):
                _die_of_sigpipe()
            if not isinstance(err, LaminaError):
                from lamina.errors import DiskFull, is_disk_full

                if not is_disk_full(err):
                    raise
                # a write no step or output said (a scratch dir made in the store): as one
                err = DiskFull.writing(None, err)
            click.echo(f"error: {_printable(str(err))}{_disk_full_note(err)}", err=True)
            _failed_step(ctx, err)
            ctx.exit(1)
        except click.UsageError as err:
            # One line like every other failure, not click's usage banner.
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            click.echo(f"error: {_printable(err.format_message())}{hint}", err=True)
            ctx.exit(err.exit_code)
        except _Terminated:
            click.echo("error: terminated", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


def _disk_full_note(err: BaseException) -> str:
    """A full disk or quota: say that the cache is as it was. Writes go to temporary names
    that are removed on failure (tests/test_disk_full.py runs `cache verify` after each)."""
    from lamina.errors import DiskFull, is_disk_full

    seen: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in seen:
        if isinstance(cause, DiskFull) or is_disk_full(cause):
            return "; cache intact"
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    # A RUN that filled the cache's file system fails with its words, not an OSError.
    text = str(err).lower()
    return "; cache intact" if "no space left on device" in text or "disk quota exceeded" in text else ""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a CI runner), taken like Ctrl-C so sandboxes and scratch dirs are cleaned up."""


def _stdout_gone(err: BaseException) -> bool:
    """`err` is (or was caused by) a broken pipe, and stdout's reader has gone (`| head`):
    not a pipe of a sandbox or a registry, which is an error like any other."""
    chain: list[BaseException] = [err]
    while not isinstance(chain[-1], BrokenPipeError):
        cause = chain[-1].__cause__ or chain[-1].__context__
        if cause is None or cause in chain:
            return False
        chain.append(cause)
    import select

    poller = select.poll()
    poller.register(1, 0)  # POLLERR is always reported: on a pipe, its last reader closed it
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _die_of_sigpipe() -> None:
    """End as tar and docker do when their reader goes: killed by SIGPIPE (status 141 in a
    shell), saying nothing. The exception has unwound by now: temporary files are gone."""
    import os
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the interpreter's last flush must not fail either
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # not reached where SIGPIPE kills


def _failed_step(ctx: click.Context, err: LaminaError) -> None:
    """A failed RUN keeps its filesystem: name the command that enters it, or enter it (--on-error=shell)."""
    from lamina.engine.failures import debug_id_of

    ident = debug_id_of(err)
    if not ident:
        return
    if ctx.meta.get("lamina.on_error") != "shell":
        click.echo(f"debug: lamina debug {ident}  (a shell in the failed step's filesystem)", err=True)
        return
    from lamina import api

    click.echo(f"debug: a shell in the failed step's filesystem ({ident}); exit to end the build", err=True)
    try:
        api.debug(ident, on_warning=lambda message: click.echo(f"warning: {message}", err=True))
    except LaminaError as failed:
        click.echo(f"error: {_printable(str(failed))}", err=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _printable(text: str) -> str:
    """`text` on one line, control characters escaped: a hostile Dockerfile or tar
    name must not move the cursor or recolour the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@click.group(cls=_Group)
@click.version_option(package_name="lamina", prog_name="lamina")
def cli() -> None:
    """lamina: build container images from Dockerfiles, no daemon, no root."""


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli(prog_name="lamina")
    finally:
        _leave_heap_to_exit()


def _leave_heap_to_exit() -> None:
    """The process ends next: move every object into the collector's permanent generation,
    so that the interpreter's shutdown collections (full passes over the heap of click, the
    engine and the cache: ~8 ms of a 70 ms `lamina save`) have nothing to scan. Shutdown
    still runs atexit hooks and clears every module, so whatever only references hold (open
    files, connections) is closed as before; objects left in unreachable cycles go with the
    process, which Python never promised to finalize (the data model, `__del__`)."""
    import gc

    gc.freeze()


# Commands are grouped by the issue that owns them; each section only adds
# `@cli.command` functions. Keep sections in this order.

# --- front end: parse, plan ---------------------------------------------------


def _dockerfile_path(path: str | None, dockerfile: str | None) -> str:
    """-f wins; else PATH when it is a file; else PATH/Dockerfile, or PATH/dockerfile as a build finds it."""
    import os
    from pathlib import Path

    from lamina.engine.buildfiles import default_dockerfile

    if dockerfile is not None:
        return dockerfile  # like docker: -f is relative to the working directory
    if path is not None and not os.path.isdir(path):
        return path
    return str(default_dockerfile(Path(path or ".")))


@cli.command()
@click.option("-f", "--file", "dockerfile", help="Dockerfile to read (default: PATH/Dockerfile).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["buildkit", "json"]),
    default="buildkit",
    show_default=True,
    help="buildkit: BuildKit's AST dump; json: instructions with flags, args, heredocs and lines.",
)
@click.argument("path", required=False)
def parse(dockerfile: str | None, fmt: str, path: str | None) -> None:
    """Print the parsed Dockerfile (PATH is a Dockerfile or a context directory)."""
    from lamina import api

    parsed = api.parse_dockerfile(_dockerfile_path(path, dockerfile))
    if fmt == "buildkit":
        # Bytes, so that invalid UTF-8 in a keyword comes out as BuildKit prints it.
        click.echo(parsed.dump().encode("utf-8", "surrogateescape"), nl=False)
    else:
        import json

        from lamina.engine.dockerfile.parser import to_json

        # An invalid UTF-8 byte (kept as a lone surrogate) becomes a JSON \udcXX escape.
        text = json.dumps(to_json(parsed), indent=2, ensure_ascii=False) + "\n"
        click.echo(text.encode("utf-8", "backslashreplace"), nl=False)


@cli.command()
@click.option("-f", "--file", "dockerfile", help="Dockerfile to read (default: CONTEXT/Dockerfile).")
@click.option("--target", help="Stage to build (default: the last one).")
@click.option(
    "--build-arg", "build_args", multiple=True, metavar="K=V", help="Set a build argument (repeatable)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "dot"]),
    default="text",
    show_default=True,
    help="text for people, json for programs, dot for Graphviz.",
)
@click.option(
    "--cache",
    "show_cache",
    is_flag=True,
    help="Also say, for every step, whether it would hit the cache and why not (hashes the context).",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT],...",
    help="Plan for these target platforms (default: the host's); shared stages say so.",
)
@click.argument("context", default=".", required=False)
def plan(
    dockerfile: str | None,
    target: str | None,
    build_args: tuple[str, ...],
    fmt: str,
    show_cache: bool,
    platforms: tuple[str, ...],
    context: str,
    **cache_flags: Any,
) -> None:
    """Show the stage graph: bases, dependencies, run order, concurrency, skipped stages.

    With --cache, every build flag that changes a cache key (--network, --secret,
    --no-cache-filter, ...) is taken as `lamina build` takes it, so the answer is the build's.
    """
    from lamina import api
    from lamina.engine import plan as planning

    given = [name for name, value in cache_flags.items() if value not in (None, False, (), "default")]
    if given and not show_cache:
        flag = next(p.opts[0] for p in build.params if p.name == given[0])
        raise click.UsageError(f"{flag} changes only the answer of `lamina plan --cache`: add --cache")
    if show_cache and fmt == "dot":
        raise click.UsageError("--cache adds to the text or json plan, not to --format dot")
    if show_cache and "-" in (context, dockerfile):  # the forecast would read stdin a second time
        raise click.UsageError("--cache needs a Dockerfile and context it can read again, not stdin")
    args = planning.parse_build_args(build_args)
    wanted = [str(p) for p in planning.parse_platforms(platforms)]
    if len(wanted) > 1:
        _plan_platforms(context, dockerfile, target, args, wanted, fmt, show_cache)
        return
    one = wanted[0] if wanted else None
    result = api.plan(context=context, dockerfile=dockerfile, target=target, build_args=args, platform=one)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    forecast = None
    if show_cache:
        forecast = api.build(
            context, dockerfile, target=target, build_args=args, dry_run=True, platforms=wanted, **cache_flags
        )
    if fmt == "json":
        import json

        doc = planning.to_json(result)
        if forecast is not None:  # one document: the steps as `--dry-run --progress json` prints them
            doc["cache"] = [_forecast_record(step) for step in forecast.steps]
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    elif fmt == "dot":
        click.echo(planning.to_dot(result), nl=False)
    else:
        click.echo(planning.to_text(result), nl=False)
    if forecast is not None and fmt == "text":
        click.echo("\ncache:")
        _print_forecast(forecast.steps)


def _print_forecast(steps: Sequence[Any]) -> None:
    """One line per step: cached, or why it would run (from a dry-run build)."""
    width = max((len(f"[{s.stage} {s.index}] {s.instruction}") for s in steps), default=0)
    for step in steps:
        label = f"[{step.stage} {step.index}] {step.instruction}"
        fate = "cached" if step.cached else f"will run: {step.reason}"
        if step.reason.startswith("may run:"):  # its parent is not known before an earlier step runs
            fate = step.reason
        click.echo(f"{label:<{width}}  " + fate)


def _print_forecast_json(steps: Sequence[Any]) -> None:
    """`--dry-run --progress json`: one JSON object per step on stdout, as the progress events are."""
    import json

    for step in steps:
        click.echo(json.dumps(_forecast_record(step), sort_keys=True))


def _plan_platforms(
    context: str,
    dockerfile: str | None,
    target: str | None,
    args: dict[str, str],
    platforms: list[str],
    fmt: str,
    show_cache: bool,
) -> None:
    """`lamina plan --platform a,b`: each target platform's plan, stages built once for all
    of them named (engine.multiplatform.plans_text); json: one document per platform."""
    from lamina import api
    from lamina.engine import multiplatform
    from lamina.engine import plan as planning

    if fmt == "dot" or show_cache:
        raise click.UsageError("several --platform values take the text or json plan, without --cache")
    plans = [api.plan(context, dockerfile, target, args, platform=p) for p in platforms]
    for warning in dict.fromkeys(w for p in plans for w in p.warnings):
        click.echo(f"warning: {warning}", err=True)
    if fmt == "json":
        import json

        doc = {"platforms": [planning.to_json(p) for p in plans]}
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    click.echo(multiplatform.plans_text(plans), nl=False)


def _forecast_record(step: Any) -> dict[str, Any]:
    return {
        "type": "forecast",
        "stage": step.stage,
        "step": step.index,
        "instruction": step.instruction,
        "cache": "cached" if step.cached else "maybe" if step.reason.startswith("may run:") else "run",
        **({"reason": step.reason} if step.reason else {}),
    }


# --- images: load, save, images, rmi, cache ----------------------------------


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{n}B"  # pragma: no cover


@cli.command()
@click.argument("file", required=False, type=click.Path(exists=True))
@click.option(
    "-i", "--input", "input_", type=click.Path(exists=True), help="Read FILE (docker's spelling of FILE)."
)
@click.option("-t", "--tag", "name", help="Name the image NAME[:TAG] instead of the name the file gives.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option(
    "--platform", metavar="OS/ARCH[/VARIANT]", help="Load only this platform of a multi-platform image."
)
def load(file: str | None, input_: str | None, name: str | None, quiet: bool, platform: str | None) -> None:
    """Import images from an OCI archive, OCI layout directory or docker-archive: FILE, -i FILE,
    or, as docker load, a tar piped to stdin."""
    from lamina import api
    from lamina.cache.images import display_name

    if file is not None and input_ is not None:
        raise click.UsageError("give the file once: FILE or -i FILE")
    with contextlib.ExitStack() as stack:
        path = file or input_ or stack.enter_context(_stdin_archive())
        try:
            records = api.load(path, name=name, platform=platform)
        except LaminaError as err:
            if path not in (file, input_) and err.args and isinstance(err.args[0], str):
                err.args = (err.args[0].replace(path, "stdin"), *err.args[1:])  # not the spool's name
            raise
        for record in records:
            if not quiet:
                click.echo(f"Loaded image: {display_name(record.name)} ({record.manifest.short})")


@contextlib.contextmanager
def _stdin_archive() -> Iterator[str]:
    """stdin's tar as a file in the store's tmp/ (an archive is read out of order; gc sweeps
    what a killed load leaves), for `load` without a file, as docker load reads stdin."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lamina.cache.store import default_cache_root

    if sys.stdin.isatty():
        raise click.UsageError("no file given and stdin is a terminal: give FILE, -i FILE or pipe a tar")
    scratch = Path(default_cache_root(os.environ)) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix="load-stdin-", suffix=".tar", dir=scratch) as spool:
        try:
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
            spool.flush()
        except OSError as err:  # a full disk, most likely
            raise LaminaError(f"load stdin: write {spool.name}: {err.strerror or err}") from err
        yield spool.name


@cli.command()
@click.option("--digests", is_flag=True, help="Show full manifest digests.")
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="Only images that hold this platform (DIGEST: its manifest).",
)
def images(digests: bool, platform: str | None) -> None:
    """List the images in the store: name, manifest (or multi-platform index) digest, the
    platforms it is for ("(P)": P's image was never pulled), size, created."""
    from lamina import api
    from lamina.cache.images import display_name
    from lamina.cache.store import Store

    rows = [("NAME", "DIGEST", "PLATFORMS", "SIZE", "CREATED")]
    for record, platforms in api.image_platforms(platform=platform):
        digest = str(record.manifest) if digests else record.manifest.short
        if record.unmade:  # pending, and this user or this store cannot make it now
            image_id = record.image_id.short if record.image_id else "?"
            digest = f"- (ID {image_id}; manifest not made)"
            if record.unmade != Store.READ_ONLY:  # damage: say it (a read-only store is no news)
                name = display_name(record.name)
                click.echo(f"warning: {name}: manifest not made: {record.unmade}", err=True)
        size, created = _human_size(record.size), record.created or "-"
        rows.append((display_name(record.name), digest, ",".join(platforms) or "-", size, created))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[4]]))


@cli.command()
@click.argument("names", nargs=-1, required=True)
def rmi(names: tuple[str, ...]) -> None:
    """Remove image names (blobs go with `lamina cache gc` once nothing uses them)."""
    from lamina import api
    from lamina.cache.images import display_name

    for name in names:
        record = api.rmi(name)
        click.echo(f"Untagged: {display_name(record.name)}")


@cli.command()
@click.argument("name")
@click.option(
    "-o",
    "--output",
    "path",
    default="-",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write (default: stdout, as docker save; refused on a terminal).",
)
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci", show_default=True)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "none"]),
    help="Recompress layers (OCI format; default: as stored).",
)
@click.option(
    "--platform", metavar="OS/ARCH[/VARIANT]", help="Save only this platform of a multi-platform image."
)
def save(name: str, path: str, fmt: str, compression: str | None, platform: str | None) -> None:
    """Write an image to a file: an OCI archive (docker and podman load it) or a docker-archive.

    A multi-platform image is written whole (its index and every platform's image) unless
    --platform picks one.
    """
    import os

    from lamina import api

    if path == "-" and os.isatty(1):  # as docker save: never an archive on the terminal
        raise click.UsageError("refusing to write an image archive to a terminal: give -o FILE or redirect")
    descriptor = api.save(name, path, format=fmt, compression=compression, platform=platform)
    click.echo(f"Saved {name} ({descriptor.digest}) to {'stdout' if path == '-' else path}", err=True)


@cli.group()
def cache() -> None:
    """Inspect and clean the local cache ($LAMINA_CACHE, $XDG_CACHE_HOME/lamina, ~/.cache/lamina)."""


@cache.command("du")
def cache_du() -> None:
    """Show the cache's size by kind."""
    from lamina import api

    usage = api.cache_du()
    click.echo(f"{'blobs':<10}{_human_size(usage.blobs):>10}  ({usage.blob_count} blobs)")
    click.echo(f"{'unpacked':<10}{_human_size(usage.unpacked):>10}  ({usage.unpacked_count} layers)")
    click.echo(f"{'index':<10}{_human_size(usage.index):>10}")
    records = f"({usage.derived_count} files: COPY, stat cache)"
    click.echo(f"{'records':<10}{_human_size(usage.derived):>10}  {records}")
    kept = api.failures()
    failed = sum(failure.disk_size() for failure in kept)
    if kept:
        click.echo(f"{'failures':<10}{_human_size(failed):>10}  ({len(kept)} kept for `lamina debug`)")
    click.echo(f"{'total':<10}{_human_size(usage.total + failed):>10}")


@cache.command("prune")
@click.option("-a", "--all", "everything", is_flag=True, help="Drop every build result and unpacked layer.")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="until=DURATION",
    help="Only what was not used for DURATION (24h, 30m, 1h30m, 7d).",
)
@click.option(
    "--keep-storage",
    metavar="SIZE",
    help="Then drop the least recently used until the cache takes at most SIZE (5GB, 512MB, 2GiB).",
)
@click.option("-f", "--force", is_flag=True, help="Accepted for docker compatibility: lamina never prompts.")
@click.option(
    "--older-than", type=click.FloatRange(min=0), hidden=True, help="Like --filter until=DAYS*24h (old gc)."
)
def cache_prune(
    everything: bool,
    filters: tuple[str, ...],
    keep_storage: str | None,
    force: bool,
    older_than: float | None,
) -> None:
    """Remove what no image name needs: unused blobs and unpacked layers, old build results.

    Without options only what nothing uses goes; `--filter until=` also drops build
    results unused for that long, `--all` drops all of them. Images named in
    `lamina images` and their blobs stay (`lamina rmi` first). `cache gc` is the
    same command.
    """
    from lamina import api

    until = _prune_until(filters)
    if older_than is not None:
        if until is not None:
            raise click.BadParameter("give --older-than or --filter until=, not both", param_hint="--filter")
        until = older_than * 86400
    keep = _parse_size(keep_storage) if keep_storage is not None else None
    kept = api.failures()  # failed steps kept for `lamina debug`: a prune removes them all
    failed = sum(failure.disk_size() for failure in kept)
    report = api.cache_prune(all=everything, until=until, keep_storage=keep)
    line = (
        f"removed {report.blobs_removed} blobs, {report.unpacked_removed} unpacked layers, "
        f"{report.cache_entries_removed} build results"
        + (f", {len(kept)} kept failures" if kept else "")
        + f"; freed {_human_size(report.bytes_freed + failed)}"
    )
    if keep is not None and report.size_after is not None:
        line += f"; the cache now takes {_human_size(report.size_after)}"
        if report.size_after > keep:
            line += " (the rest is named images: `lamina rmi` them to go lower)"
    click.echo(line)


cache.add_command(cache_prune, "gc")  # lamina's first word for it; `prune` is docker's and buildah's


@cache.command("verify")
@click.option(
    "--repair", is_flag=True, help="Remove torn and corrupt entries (never what is intact and in use)."
)
def cache_verify(repair: bool) -> None:
    """Check every blob's digest, every image's and build result's references, and the files
    a killed lamina left; exit 1 while a problem remains."""
    from lamina import api
    from lamina.cache.verify import describe

    report = api.cache_verify(repair=repair)
    for line in describe(report):
        click.echo(line)
    if not report.clean:
        raise SystemExit(1)


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def _prune_until(filters: Sequence[str]) -> float | None:
    """Seconds from `--filter until=DURATION` (the only key lamina's cache can filter on)."""
    import re

    until: float | None = None
    for item in filters:
        key, sep, value = item.partition("=")
        if key.strip() != "until" or not sep:
            raise click.BadParameter(
                f"{item!r}: lamina's cache filters only on until=DURATION (e.g. until=24h)",
                param_hint="--filter",
            )
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", value.strip())
        if not parts or "".join(n + u for n, u in parts) != value.strip():
            raise click.BadParameter(
                f"until={value}: not a duration (use e.g. 24h, 30m, 1h30m, 7d)", param_hint="--filter"
            )
        until = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    return until


def _parse_size(text: str) -> int:
    """Bytes from 5GB, 512MB, 2GiB or 1000: kB/MB/GB/TB are powers of 1000, as `cache du` prints."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise click.BadParameter(
            f"{text!r}: not a size (use e.g. 5GB, 512MB, 2GiB or bytes)", param_hint="--keep-storage"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _isolation_option(f: Any) -> Any:
    """`--isolation`: how RUN steps are isolated (it sets $LAMINA_ISOLATION, which the sandbox reads)."""

    def remember(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        import os

        if value is not None:
            os.environ["LAMINA_ISOLATION"] = value

    return click.option(
        "--isolation",
        type=click.Choice(["auto", "userns", "rootns", "chroot", "proot"]),
        default=None,
        expose_value=False,
        callback=remember,
        help="How RUN steps are isolated (default auto: the strongest this process may use; "
        "`lamina info` says which). Also $LAMINA_ISOLATION.",
    )(f)


# The network a RUN step (or `lamina run`'s command) gets: BuildKit's words.
_network_option = click.option(
    "--network",
    type=click.Choice(["default", "host", "none"]),
    default="default",
    show_default=True,
    help="default: a network of its own (slirp4netns), the host's loopback out of reach.",
)


# --- sandbox: run --------------------------------------------------------------


# Options after IMAGE belong to COMMAND, as with docker run.
@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--rm", "remove", is_flag=True, help="Accepted for docker compatibility: nothing is ever kept.")
@click.option("-i", "--interactive", is_flag=True, help="Accepted: stdin is always passed through.")
@click.option("-t", "--tty", is_flag=True, help="Accepted: the command gets lamina's own terminal, if any.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Set a variable (K alone: pass ours).")
@click.option("-w", "--workdir", help="Working directory inside (created if missing).")
@click.option("-u", "--user", help="USER[:GROUP] or UID[:GID], looked up in the image.")
@_network_option
@click.option(
    "-p",
    "--publish",
    "publish",
    multiple=True,
    metavar="[ADDR:]HOST:CONTAINER",
    help="Forward a TCP port of the host (127.0.0.1 unless ADDR) to the command (default network).",
)
@click.option("--hostname", help="Hostname inside (default: lamina).")
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    metavar="SPEC",
    help="type=bind,source=S,target=T[,ro] or type=tmpfs,target=T.",
)
@_isolation_option
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="The image of this platform from a multi-platform one; another platform's runs emulated.",
)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    remove: bool,
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    network: str,
    publish: tuple[str, ...],
    hostname: str | None,
    mounts: tuple[str, ...],
    platform: str | None,
    image: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in IMAGE from the local store, rootless, like `docker run --rm`.

    The image's Entrypoint, Cmd, Env, WorkingDir and User apply; output
    streams through and the exit code is the command's.
    """
    from lamina import api

    def warn(message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    code = api.run(
        image,
        command,
        env=env,
        workdir=workdir,
        user=user,
        network=network,
        mounts=mounts,
        publish=publish,
        hostname=hostname,
        on_warning=warn,
        platform=platform,
    )
    sys.exit(code)


@cli.command()
@_isolation_option
def info() -> None:
    """What a RUN step gets on this host: namespaces, id map, capabilities, seccomp, paths, network."""
    from lamina import api

    for line in api.sandbox_info().lines():
        click.echo(line)


# --- build ---------------------------------------------------------------------


def _pairs(values: tuple[str, ...], flag: str) -> tuple[tuple[str, str], ...]:
    """`K=V` flag values; `--build-arg K` alone takes K from the environment, as docker does."""
    import os

    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not name:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=flag)
        if not sep:
            if flag != "--build-arg":
                raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=flag)
            if name not in os.environ:
                continue
            rest = os.environ[name]
        out.append((name, rest))
    return tuple(out)


def _remember_on_error(ctx: click.Context, _param: click.Parameter, value: str) -> None:
    ctx.meta["lamina.on_error"] = value  # read where the error is printed (_Group.invoke)


_on_error_option = click.option(
    "--on-error",
    type=click.Choice(["fail", "shell"]),
    default="fail",
    show_default=True,
    expose_value=False,
    callback=_remember_on_error,
    help="shell: when a RUN fails, open a shell in its filesystem (env, workdir, user, mounts) at once.",
)


def _usage(
    ctx: click.Context, param: click.Parameter, value: Any, module: str, name: str, each: bool = False
) -> Any:
    """A click callback: a flag value lamina's parser refuses is a usage error (exit 2, in
    click's words: "Invalid value for '--output': ..."), as every other bad flag value is."""
    import importlib

    if not value:
        return value
    parse = getattr(importlib.import_module(f"lamina.engine.{module}"), name)
    try:
        for item in value if each else [value]:
            parse(item)
    except LaminaError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return value


@cli.command()
@click.argument("context", default=".", type=click.Path(file_okay=False))
@click.option("-f", "--file", "dockerfile", type=click.Path(dir_okay=False), help="Dockerfile path.")
@click.option("-t", "--tag", "tags", multiple=True, help="Name the image NAME[:TAG] (repeatable).")
@click.option("--target", help="Build this stage (default: the last one).")
@click.option("--build-arg", "build_args", multiple=True, help="Set a build-time ARG: KEY=VALUE.")
@click.option("--no-cache", is_flag=True, help="Run every step, ignoring the cache.")
@click.option("--no-cache-filter", "no_cache_filter", multiple=True, help="Run this stage's steps uncached.")
@click.option("--label", "labels", multiple=True, help="Set a label on the image: KEY=VALUE.")
@click.option(
    "--secret", "secrets", multiple=True, help="Expose a secret to RUN --mount: id=ID[,src=PATH|env=VAR]."
)
@click.option(
    "--ssh",
    "ssh",
    multiple=True,
    metavar="default|ID[=SOCKET|KEY[,KEY]]",
    help="Forward an ssh-agent (default: $SSH_AUTH_SOCK) to RUN --mount=type=ssh.",
)
@click.option("--add-host", "add_hosts", multiple=True, metavar="HOST:IP", help="A line of RUN's /etc/hosts.")
@click.option("--ulimit", "ulimits", multiple=True, metavar="NAME=SOFT[:HARD]", help="RUN's limit.")
@click.option("--shm-size", metavar="SIZE", help="Size of RUN's /dev/shm (default 64m).")
@click.option("--cgroup-parent", metavar="PATH", help="Run each RUN in a cgroup below PATH.")
@click.option(
    "--build-context",
    "build_contexts",
    multiple=True,
    metavar="NAME=DIR|docker-image://REF|oci-layout://PATH|GIT_URL",
    help="Use this instead of the image or stage NAME (repeatable).",
)
@_network_option
@click.option(
    "--allow",
    "allow",
    multiple=True,
    type=click.Choice(["network.host", "security.insecure", "device"]),
    help="Entitlement for RUN --network=host, RUN --security=insecure or RUN --device (repeatable).",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "tty", "plain", "json", "rawjson", "quiet"]),
    default="auto",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    "outputs",
    multiple=True,
    callback=lambda ctx, param, value: _usage(ctx, param, value, "outputspec", "parse_output", each=True),
    help="type=oci|docker|image|registry|local|tar,dest=PATH[,ATTR=...]; DIR; -",
)
@click.option(
    "--annotation",
    "annotations",
    multiple=True,
    metavar="[TYPE:]KEY=VALUE",
    callback=lambda ctx, param, value: _usage(ctx, param, value, "outputspec", "parse_annotation_flags"),
    help="Annotate the image (TYPE: manifest, manifest-descriptor, index, index-descriptor).",
)
@click.option(
    "--provenance",
    metavar="true|false|mode=min|max",
    callback=lambda ctx, param, value: _usage(ctx, param, value, "provenance", "parse_provenance"),
    help="Attach SLSA provenance (OCI index).",
)
@click.option("--sbom", metavar="false", help="SBOM attestation: refused unless false (no generator).")
@click.option(
    "--attest",
    "attests",
    multiple=True,
    metavar="type=provenance|sbom[,K=V]",
    callback=lambda ctx, param, value: _usage(ctx, param, value, "provenance", "attest_kind", each=True),
    help="Attestation as buildx takes it (type=provenance,mode=max is --provenance mode=max).",
)
@click.option(
    "--call",
    "call_method",
    default="build",
    show_default=True,
    metavar="build|check|outline|targets[,format=json]",
    help="Run a frontend method instead of the build: build checks, the target's args, the targets.",
)
@click.option("--check", is_flag=True, help="Shorthand for --call=check: build checks only, no build.")
@click.option("--iidfile", type=click.Path(dir_okay=False), help="Write the image ID (config digest) here.")
@click.option("--metadata-file", type=click.Path(dir_okay=False), help="Write build metadata JSON here.")
@click.option("--compression", type=click.Choice(["gzip", "zstd"]), default="gzip", show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), help="Stages to build at once (default: CPU count).")
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT],...",
    help="Target platforms (default: the host's); several make one image index.",
)
@click.option("--pull", is_flag=True, help="Pull base images even when the store has them.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
@click.option("--dry-run", is_flag=True, help="Run nothing: say which steps would run, and why.")
@click.option("--push", is_flag=True, help="Push the image to every -t reference after the build.")
@click.option(
    "--cache-to",
    "cache_to",
    multiple=True,
    metavar="SPEC",
    help="type=registry,ref=REF or type=local,dest=DIR[,mode=min|max]",
)
@click.option(
    "--cache-from",
    "cache_from",
    multiple=True,
    metavar="SPEC",
    help="type=registry,ref=REF or type=local,src=DIR",
)
@click.option(
    "--insecure-registry",
    "insecure_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Talk plain HTTP to this registry (loopback hosts always are). Repeatable.",
)
@_isolation_option
@_on_error_option
# Long for its parameters and the api.build call, one line per flag (a flat table).
def build(
    context: str,
    dockerfile: str | None,
    tags: tuple[str, ...],
    target: str | None,
    build_args: tuple[str, ...],
    no_cache: bool,
    no_cache_filter: tuple[str, ...],
    labels: tuple[str, ...],
    secrets: tuple[str, ...],
    ssh: tuple[str, ...],
    add_hosts: tuple[str, ...],
    ulimits: tuple[str, ...],
    shm_size: str | None,
    cgroup_parent: str | None,
    build_contexts: tuple[str, ...],
    network: str,
    allow: tuple[str, ...],
    progress: str,
    outputs: tuple[str, ...],
    annotations: tuple[str, ...],
    provenance: str | None,
    sbom: str | None,
    attests: tuple[str, ...],
    call_method: str,
    check: bool,
    iidfile: str | None,
    metadata_file: str | None,
    compression: str,
    jobs: int | None,
    platforms: tuple[str, ...],
    pull: bool,
    quiet: bool,
    dry_run: bool,
    push: bool,
    cache_to: tuple[str, ...],
    cache_from: tuple[str, ...],
    insecure_registries: tuple[str, ...],
) -> None:
    """Build an image from a Dockerfile and a context directory."""
    from lamina import api
    from lamina.engine.progress import make_progress

    if check or call_method != "build":
        _call("check" if check else call_method, context, dockerfile, target, build_args, platforms)
        return
    for path, flag in ((iidfile, "--iidfile"), (metadata_file, "--metadata-file")):
        if path:
            _check_file_dest(path, flag)  # before the build, not after it
    sink = make_progress("quiet" if quiet or dry_run else progress)
    result = api.build(
        context,
        dockerfile=dockerfile,
        target=target,
        build_args=dict(_pairs(build_args, "--build-arg")),
        tags=tags,
        outputs=outputs,
        annotations=annotations,
        provenance=provenance,
        sbom=sbom,
        attests=attests,
        no_cache=no_cache,
        no_cache_filter=no_cache_filter,
        labels=dict(_pairs(labels, "--label")),
        secrets=secrets,
        ssh=ssh,
        add_hosts=add_hosts,
        ulimits=ulimits,
        shm_size=shm_size,
        cgroup_parent=cgroup_parent,
        build_contexts=build_contexts,
        network=network,
        allow=allow,
        progress=sink,
        compression=compression,
        jobs=jobs,
        platforms=platforms,
        pull=pull,
        dry_run=dry_run,
        push=push,
        cache_to=cache_to,
        cache_from=cache_from,
        insecure_registries=insecure_registries,
        lazy_image=not metadata_file,  # its containerimage.digest names the manifest
    )
    if dry_run:
        if progress == "json":
            _print_forecast_json(result.steps)
        else:
            _print_forecast(result.steps)
        return
    if iidfile:
        _write_text(iidfile, "--iidfile", result.config_digest)
    if metadata_file:
        import json

        _write_text(
            metadata_file, "--metadata-file", json.dumps(result.metadata(), indent=2, sort_keys=True) + "\n"
        )
    if not quiet:
        for ref, digest in result.pushed:
            click.echo(f"pushed {ref}@{digest}", err=True)
    if quiet:
        # never after a tar on stdout (-o -, dest=/dev/stdout): the image ID goes to stderr then
        click.echo(result.config_digest, err=_output_on_stdout(outputs))


def _output_on_stdout(outputs: Sequence[str]) -> bool:
    """An output is written to stdout: `-`, or a dest that is the file stdout is (/dev/stdout)."""
    if not outputs:
        return False
    import os

    from lamina.engine.outputspec import parse_outputs

    for output in parse_outputs(outputs):
        if output.to_stdout:
            return True
        try:
            if output.dest and os.path.samestat(os.stat(output.dest), os.fstat(1)):
                return True
        except OSError:
            continue
    return False


def _call(
    method: str,
    context: str,
    dockerfile: str | None,
    target: str | None,
    args: tuple[str, ...],
    platforms: tuple[str, ...] = (),
) -> None:
    """`--call`/`--check`: print what the frontend method gives; exit 1 when a check finds something."""
    from lamina import api

    build_args = dict(_pairs(args, "--build-arg"))
    out, error, status = api.call(
        method, context, dockerfile, target=target, build_args=build_args, platforms=platforms
    )
    click.echo(out, nl=False)
    if error:
        click.echo(f"error: {error}", err=True, nl=False)
    if status:
        sys.exit(status)


def _explain(fmt: str, **flags: Any) -> None:
    """Which steps of the target a build with these flags would run, and exactly why; runs nothing.

    Every step that would run is compared with the inputs the last build of
    that step had (`lamina build --dry-run`). It takes exactly the build's
    flags, so its answer is the build's: paste a build command line after
    `lamina explain`.
    """
    flags.update(dry_run=True, push=False, quiet=False, progress="json" if fmt == "json" else "plain")
    click.get_current_context().invoke(build, **flags)


# `lamina explain` shares `lamina build`'s option set (one list, never two that drift)
# and adds --format; --dry-run is implied.
explain = click.Command(
    "explain",
    callback=_explain,
    params=[
        *(
            param
            for param in build.params
            if param.name not in ("dry_run", "on_error", "call_method", "check")
        ),
        click.Option(
            ["--format", "fmt"],
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="json: one object per step (stage, step, instruction, cache, reason).",
        ),
    ],
    help=_explain.__doc__,
    short_help="Say which steps a build would run, and exactly why; run nothing.",
)
cli.add_command(explain)


def _check_file_dest(path: str, flag: str) -> None:
    import os

    from lamina.engine.outputspec import missing_dir

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise click.BadParameter(missing_dir(parent), param_hint=flag)


def _write_text(path: str, flag: str, text: str) -> None:
    """`text` at `path` as buildx writes it: a file beside it renamed over it, so a failed write
    (a full disk) leaves the old file or none, never half of one; a FIFO or device is written
    through. `-` is a file named -, as for buildx, not stdout."""
    from pathlib import Path

    from lamina.errors import DiskFull, OutputError
    from lamina.oci.layout import atomic_output

    try:
        with atomic_output(Path.cwd() / path if path == "-" else Path(path)) as out:
            out.write(text.encode())
    except DiskFull as err:
        raise err.within(flag) from err.__cause__
    except OSError as err:
        raise OutputError(f"{flag} {path}: {err.strerror}") from err


# `lamina plan --cache` takes the build's flags that change a cache key or decide a hit
# (the build's own option objects, so the two never drift).
_PLAN_CACHE_FLAGS = (
    *("no_cache", "no_cache_filter", "secrets", "network", "allow", "pull", "cache_from"),
    *("insecure_registries", "isolation"),
    *("ssh", "add_hosts", "ulimits", "shm_size", "build_contexts", "cgroup_parent"),
)
plan.params.extend(param for param in build.params if param.name in _PLAN_CACHE_FLAGS)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("failure", required=False)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def debug(failure: str | None, command: tuple[str, ...]) -> None:
    """Enter a failed RUN step's filesystem: FAILURE is the id its error named, or `last`.

    Runs COMMAND (default: the stage's shell) with the step's env, workdir,
    user and mounts over what the command left; nothing it changes is kept.
    With no FAILURE, lists the kept failures (`lamina cache prune` removes them).
    """
    import datetime

    from lamina import api

    if failure is None:
        failures = api.failures()
        if not failures:  # said on stderr: the (empty) listing on stdout stays parseable
            click.echo("no failed step is kept (a failed RUN step is kept until a prune)", err=True)
        for kept in failures:
            when = datetime.datetime.fromtimestamp(kept.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{kept.id}  {when}  stage {kept.stage}  {_printable(kept.step)}")
        return
    command = command[1:] if command[:1] == ("--",) else command  # `lamina debug ID -- CMD...`
    sys.exit(
        api.debug(failure, command, on_warning=lambda message: click.echo(f"warning: {message}", err=True))
    )


@cli.command("diff")
@click.argument("paths", nargs=-1, type=click.Path(), metavar="[CONTEXT | OLD.json NEW.json | IMG_A IMG_B]")
@click.option("-f", "--file", "dockerfile", type=click.Path(dir_okay=False), help="Dockerfile path.")
@click.option("--target", help="The stage the builds were for (default: the last one).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def diff_command(paths: tuple[str, ...], dockerfile: str | None, target: str | None, fmt: str) -> None:
    """Compare the last two builds of CONTEXT (default .), step by step: which steps ran, why,
    and what differs. With two files, compare two --metadata-file documents (older first);
    with two image names, two images in the store: config, layer by layer, file by file."""
    import os

    from lamina import api
    from lamina.diffbuilds import to_text

    images = len(paths) == 2 and not any(os.path.exists(p) for p in paths)
    # Two paths, one of them on disk: metadata files (a missing one is named by diffbuilds).
    if len(paths) > 2 or (len(paths) == 2 and not images and any(os.path.isdir(p) for p in paths)):
        raise click.UsageError("give a build context, two --metadata-file documents or two image names")
    if images:
        from lamina import diffimages

        if dockerfile or target:
            raise click.UsageError("-f and --target choose a context's builds, not images")
        compared = api.diff_images(*paths)
        text = diffimages.to_text(compared) if fmt == "text" else ""
        click.echo(_printable_lines(text) if text else _json(compared.to_json()), nl=not text)
        return
    if len(paths) == 2:
        if dockerfile or target:
            raise click.UsageError("-f and --target choose a context's builds, not metadata files")
        found = api.diff_builds(metadata_files=paths)
    else:
        found = api.diff_builds(paths[0] if paths else ".", dockerfile, target=target)
    if fmt == "json":
        import json

        click.echo(json.dumps(found.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(_printable_lines(to_text(found)), nl=False)


def _json(doc: Any) -> str:
    import json

    return json.dumps(doc, indent=2, ensure_ascii=False)


def _printable_lines(text: str) -> str:
    return "".join(_printable(line) + "\n" for line in text.splitlines())


# --- registry: pull, push, login, logout ---------------------------------------

_insecure_option = click.option(
    "--insecure-registry",
    "insecure_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Talk plain HTTP to this registry (loopback hosts always are). Repeatable.",
)


@cli.command()
@click.argument("reference")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Pick this platform from an index.")
@_insecure_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
def pull(reference: str, platform: str | None, insecure_registries: tuple[str, ...], quiet: bool) -> None:
    """Pull an image from a registry into the local store."""
    from lamina import api

    log = None if quiet else lambda line: click.echo(line, err=True)
    result = api.pull(reference, platform=platform, insecure_registries=insecure_registries, log=log)
    if quiet:
        click.echo(str(result.record.manifest))
        return
    fetched = f"{result.fetched} blobs, {result.fetched_bytes / 1e6:.1f} MB fetched"
    if result.index is not None:  # the name is the index; say which platform's image came
        fetched = f"image {result.manifest}, {fetched}"
    click.echo(f"{result.record.name}: {result.record.manifest} ({fetched})")


@cli.command()
@click.argument("name")
@click.argument("reference", required=False)
@_insecure_option
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    metavar="BYTES",
    help="Upload blobs in PATCH chunks of this size (default: one request per blob).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the pushed digest.")
@click.option(
    "--platform", metavar="OS/ARCH[/VARIANT]", help="Push only this platform's image of a multi-platform one."
)
def push(
    name: str,
    reference: str | None,
    insecure_registries: tuple[str, ...],
    chunk_size: int | None,
    quiet: bool,
    platform: str | None,
) -> None:
    """Push the stored image NAME to REFERENCE (default: NAME); a multi-platform image whole."""
    from lamina import api

    log = None if quiet else lambda line: click.echo(line, err=True)
    result = api.push(
        name,
        reference,
        insecure_registries=insecure_registries,
        chunk_size=chunk_size,
        log=log,
        platform=platform,
    )
    if quiet:
        click.echo(str(result.digest))
        return
    counts = f"{result.uploaded} uploaded, {result.mounted} mounted, {result.existing} already there"
    click.echo(f"{result.reference.name}@{result.digest} ({counts})")


@cli.command()
@click.argument("registry")
@click.option("-u", "--username", help="User name (prompted for when missing).")
@click.option("-p", "--password", help="Password; prefer --password-stdin, this one shows up in `ps`.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_insecure_option
def login(
    registry: str,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    insecure_registries: tuple[str, ...],
) -> None:
    """Check credentials for REGISTRY and save them (docker's config.json or $REGISTRY_AUTH_FILE)."""
    from lamina import api

    if password_stdin:
        if password is not None:
            raise click.UsageError("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\r\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    path = api.login(registry, username, password, insecure_registries=insecure_registries)
    click.echo(f"Login succeeded (saved in {path})")


@cli.command()
@click.argument("registry")
def logout(registry: str) -> None:
    """Forget the saved credentials for REGISTRY."""
    from lamina import api

    if api.logout(registry):
        click.echo(f"Removed login credentials for {registry}")
    else:
        click.echo(f"Not logged in to {registry}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
