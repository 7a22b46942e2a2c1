"""`--add-host`, `--ulimit` and `--shm-size`: what every RUN of a build gets, parsed as buildx does.

`--add-host NAME:IP` (or `NAME=IP`; an IPv6 address may be in brackets) as
buildx's toBuildkitExtraHosts; `--ulimit NAME=SOFT[:HARD]` as docker's
units.ParseUlimit; `--shm-size` as units.RAMInBytes (`64m`, `1g`, bytes).
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from lamina.engine.sandbox.spec import RLIMITS
from lamina.errors import PlanError

if TYPE_CHECKING:
    from lamina.engine.sandbox.spec import Ulimit


def parse_add_host(text: str) -> tuple[str, str]:
    """(name, ip) from `NAME:IP` or `NAME=IP`."""
    host, sep, ip = text.partition("=")
    if not sep:
        host, sep, ip = text.partition(":")
    if not sep or not host or not ip:
        raise PlanError(f"--add-host {text}: invalid host (expected NAME:IP)")
    if ip == "host-gateway":
        # BuildKit puts its worker's gateway here; a RUN's own network has no route to the host.
        raise PlanError(f"--add-host {text}: host-gateway is not supported (a RUN cannot reach the host)")
    if len(ip) > 2 and ip[0] == "[" and ip[-1] == "]":
        ip = ip[1:-1]
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise PlanError(f"--add-host {text}: invalid host ({ip} is not an IP address)") from None
    return host, str(address)


def parse_ulimit(text: str) -> Ulimit:
    from lamina.engine.sandbox.spec import Ulimit

    name, sep, values = text.partition("=")
    if not sep:
        raise PlanError(f"--ulimit {text}: invalid ulimit argument (expected NAME=SOFT[:HARD])")
    if name not in RLIMITS:
        raise PlanError(f"--ulimit {text}: invalid ulimit type: {name}")
    parts = values.split(":")
    if len(parts) > 2:
        raise PlanError(
            f"--ulimit {text}: too many limit value arguments, can only have up to two, soft[:hard]"
        )
    try:
        soft = int(parts[0])
        hard = int(parts[1]) if len(parts) == 2 else soft
    except ValueError:
        raise PlanError(f"--ulimit {text}: {values} is not a number (-1: unlimited)") from None
    if hard != -1 and (soft > hard or soft == -1):
        raise PlanError(f"--ulimit {text}: ulimit soft limit must be less than or equal to hard limit")
    return Ulimit(name, soft, hard)


_RAM = re.compile(r"^(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$")


def parse_shm_size(value: str | int) -> int:
    """Bytes; 1024-based units as docker's RAMInBytes."""
    if isinstance(value, int):
        size = value
    else:
        match = _RAM.match(value.strip())
        if match is None:
            raise PlanError(f"--shm-size {value}: invalid size (use e.g. 64m, 1g or bytes)")
        unit = (match.group(2) or "").lower()
        size = int(float(match.group(1)) * 1024 ** " kmgtp".index(unit or " "))
    if size <= 0:
        raise PlanError(f"--shm-size {value}: must be more than 0")
    return size
