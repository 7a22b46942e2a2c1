"""Helper side of `runner.extract_layer`: unpack a layer blob inside the user namespace.

Inside, the namespace's root may chown to every mapped id, so a layer's
owners land as the subordinate ids that the sandbox will show as the
layer's own; whiteouts are written in overlay form for use as a lower dir.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamina.oci.digest import Digest
from lamina.oci.extract import Whiteouts, extract_layer


def extract(spec: dict) -> str:
    """Unpack spec["blob"] into spec["dest"]; the result as one JSON line."""
    digest = Digest.parse(spec["digest"]) if spec["digest"] else None
    with open(spec["blob"], "rb") as stream:
        result = extract_layer(
            stream,
            Path(spec["dest"]),
            whiteouts=Whiteouts.OVERLAY,
            userxattr=True,
            ignore_owners=spec["ignore_owners"],
            digest=digest,
            record_devices=True,  # mknod is refused in a user namespace: a placeholder (oci.recorded)
        )
    return json.dumps(
        {
            "digest": str(result.digest),
            "diff_id": str(result.diff_id),
            "size": result.size,
            "entries": result.entries,
            "warnings": list(result.warnings),
        }
    )
