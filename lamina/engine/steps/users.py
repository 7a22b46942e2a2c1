"""Resolve `user[:group]` specs in a stage's /etc/passwd and /etc/group.

COPY/ADD `--chown` and WORKDIR's owner take names as the image knows them,
not as the host does. Numeric ids are taken as they are; a name that the
image does not define is an error naming the instruction's spec.

"Numeric" is BuildKit's `strconv.ParseUint(s, 10, 32)`: ASCII digits only
(str.isdigit also takes `²`, which int() then refuses) and at most 2**32-1;
anything else is looked up as a name.
"""

from __future__ import annotations

from lamina.engine.steps.layerview import LayerView
from lamina.errors import BuildError


def _table(view: LayerView, path: str) -> list[list[str]]:
    text = view.read_text(path) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


MAX_ID = 2**32 - 1  # uid_t and gid_t are 32 bits


def numeric_id(text: str) -> int | None:
    """`text` as a uid or gid when it is one: ASCII digits, within 32 bits."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_ID)) or int(digits) > MAX_ID:
        return None
    return int(digits)


def _table_id(row: list[str], field: int, path: str) -> int:
    """The id in a passwd or group row; a base image's broken file is an error, not a traceback."""
    found = numeric_id(row[field])
    if found is None:
        shown = row[field] if len(row[field]) <= 20 else row[field][:17] + "..."
        raise BuildError(f"{path}: entry {row[0]!r} has an invalid id {shown!r}")
    return found


def resolve_owner(view: LayerView, spec: str) -> tuple[int, int]:
    """`user`, `user:group`, `uid:gid` -> (uid, gid).

    A user without a group gets the same number as gid (the Dockerfile
    reference: "a UID without GID will use the same numeric UID as the GID").
    """
    user, _, group = spec.partition(":")
    passwd = _table(view, "/etc/passwd")
    uid = numeric_id(user)
    if uid is None:
        row = next((row for row in passwd if len(row) > 3 and row[0] == user), None)
        if row is None:
            raise BuildError(f"unable to find user {user}: no matching entries in passwd file")
        uid = _table_id(row, 2, "/etc/passwd")
    if not group:
        return uid, uid
    gid = numeric_id(group)
    if gid is not None:
        return uid, gid
    groups = _table(view, "/etc/group")
    match = next((row for row in groups if len(row) > 2 and row[0] == group), None)
    if match is None:
        raise BuildError(f"unable to find group {group}: no matching entries in group file")
    return uid, _table_id(match, 2, "/etc/group")
