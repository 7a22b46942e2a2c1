"""Resolve `user[:group]` specs in a stage's /etc/passwd and /etc/group.

COPY/ADD `--chown` and WORKDIR's owner take names as the image knows them,
not as the host does. Numeric ids are taken as they are; a name that the
image does not define is an error naming the instruction's spec.
"""

from __future__ import annotations

from lamina.engine.steps.layerview import LayerView
from lamina.errors import BuildError


def _table(view: LayerView, path: str) -> list[list[str]]:
    text = view.read_text(path) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_owner(view: LayerView, spec: str) -> tuple[int, int]:
    """`user`, `user:group`, `uid:gid` -> (uid, gid).

    A user without a group gets the same number as gid (the Dockerfile
    reference: "a UID without GID will use the same numeric UID as the GID").
    """
    user, _, group = spec.partition(":")
    passwd = _table(view, "/etc/passwd")
    if user.isdigit():
        uid = int(user)
    else:
        row = next((row for row in passwd if len(row) > 3 and row[0] == user), None)
        if row is None:
            raise BuildError(f"unable to find user {user}: no matching entries in passwd file")
        uid = int(row[2])
    if not group:
        return uid, uid
    if group.isdigit():
        return uid, int(group)
    groups = _table(view, "/etc/group")
    match = next((row for row in groups if len(row) > 2 and row[0] == group), None)
    if match is None:
        raise BuildError(f"unable to find group {group}: no matching entries in group file")
    return uid, int(match[2])
