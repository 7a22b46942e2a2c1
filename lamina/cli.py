"""The `lamina` command: parses flags, calls the API, prints.

Commands import what they need inside their bodies so that `lamina --help`
and a no-op rebuild do not pay for modules they never use.
"""

from __future__ import annotations

import sys

import click

from lamina.errors import LaminaError


class _Group(click.Group):
    """A click group that turns every LaminaError into one line on stderr."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LaminaError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="lamina", prog_name="lamina")
def cli() -> None:
    """lamina: build container images from Dockerfiles, no daemon, no root."""


def main() -> None:
    cli(prog_name="lamina")


# Commands are grouped by the issue that owns them; each section only adds
# `@cli.command` functions. Keep sections in this order.

# --- front end: parse, plan ---------------------------------------------------

# --- images: load, save, images, rmi, cache ----------------------------------

# --- sandbox: run --------------------------------------------------------------

# --- build ---------------------------------------------------------------------

# --- registry: pull, push, login, logout ---------------------------------------

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
