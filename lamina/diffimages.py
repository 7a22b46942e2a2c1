"""`lamina diff IMAGE_A IMAGE_B`: two stored images compared config, layer by layer and file by file.

Layers are compared by position (diff_id): the layers both images share at
the bottom are "same"; from the first that differs, each is named with the
step that made it (its history entry). Files are compared in the merged
filesystems (whiteouts and opaque directories applied): added, removed,
content changed (sha256 of the bytes), or kind/mode/owner/link changed, each
with the layer of the newer image that wrote it. Layer bytes are read as
tar streams straight from the store, counted against their headers; nothing
is unpacked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from lamina.errors import LayerError

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True, slots=True)
class FileFacts:
    kind: str  # file, dir, symlink, hardlink, char, block, fifo
    mode: int
    owner: str  # uid:gid
    size: int
    content: str  # sha256 hex of a file's bytes, a link's target, "" otherwise
    layer: int  # 1-based position of the layer that wrote it last


@dataclasses.dataclass(frozen=True, slots=True)
class ImageFacts:
    name: str
    digest: str  # manifest digest
    config: Any  # oci.image.ImageConfig
    layers: tuple[str, ...]  # diff_ids, bottom first
    made_by: tuple[str, ...]  # per layer: the history entry's created_by that made it


@dataclasses.dataclass(frozen=True, slots=True)
class ImageDiff:
    a: ImageFacts
    b: ImageFacts
    config: tuple[str, ...]  # "Env: ... -> ..." lines
    layers: tuple[tuple[int, str, str, str], ...]  # (position, "same"/"changed"/"added"/"removed", a, b)
    files: tuple[tuple[str, str, str], ...]  # (path, change, detail)

    def to_json(self) -> dict[str, Any]:
        def image(facts: ImageFacts) -> dict[str, Any]:
            return {"name": facts.name, "digest": facts.digest, "layers": list(facts.layers)}

        return {
            "a": image(self.a),
            "b": image(self.b),
            "config": list(self.config),
            "layers": [{"layer": n, "change": c, "a": a, "b": b} for n, c, a, b in self.layers],
            "files": [{"path": p, "change": c, "detail": d} for p, c, d in self.files],
        }


def image_facts(store: Any, name: str) -> tuple[ImageFacts, Any]:
    from lamina.cache.images import display_name, stored_image

    record, source = stored_image(store, name)
    config = source.config
    made_by = [h.created_by for h in config.history if not h.empty_layer]
    made_by += [""] * (len(source.diff_ids) - len(made_by))
    facts = ImageFacts(
        display_name(record.name),
        str(record.manifest),
        config,
        tuple(str(d) for d in source.diff_ids),
        tuple(made_by[: len(source.diff_ids)]),
    )
    return facts, source


def compare(store: Any, name_a: str, name_b: str) -> ImageDiff:
    a, source_a = image_facts(store, name_a)
    b, source_b = image_facts(store, name_b)
    files_a = merged_files(store, source_a)
    files_b = merged_files(store, source_b)
    return ImageDiff(
        a, b, tuple(_config_changes(a.config, b.config)), _layers(a, b), _files(files_a, files_b)
    )


def _layers(a: ImageFacts, b: ImageFacts) -> tuple[tuple[int, str, str, str], ...]:
    out = []
    diverged = False
    for i in range(max(len(a.layers), len(b.layers))):
        la = a.layers[i] if i < len(a.layers) else ""
        lb = b.layers[i] if i < len(b.layers) else ""
        diverged = diverged or la != lb
        what_a = f"{la} {a.made_by[i]}".strip() if la else ""
        what_b = f"{lb} {b.made_by[i]}".strip() if lb else ""
        change = "same" if not diverged else "added" if not la else "removed" if not lb else "changed"
        out.append((i + 1, change, what_a, what_b))
    return tuple(out)


def _config_changes(a: Any, b: Any) -> list[str]:
    before, after = a.config.to_json(), b.config.to_json()
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old != new:
            changes.append(f"{key}: {_show(old)} -> {_show(new)}")
    if (a.os, a.architecture, a.variant) != (b.os, b.architecture, b.variant):
        changes.append(f"platform: {a.os}/{a.architecture} -> {b.os}/{b.architecture}")
    return changes


def _show(value: Any) -> str:
    import json

    return "(unset)" if value is None else json.dumps(value, sort_keys=True)


def _files(a: dict[str, FileFacts], b: dict[str, FileFacts]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for path in sorted(a.keys() | b.keys()):
        old, new = a.get(path), b.get(path)
        if old is None and new is not None:
            out.append((path, "added", f"{new.kind}, layer {new.layer}"))
        elif new is None and old is not None:
            out.append((path, "removed", f"{old.kind}, was in layer {old.layer}"))
        elif old is not None and new is not None:
            detail = []
            if old.kind != new.kind:
                detail.append(f"{old.kind} -> {new.kind}")
            elif old.content != new.content and new.kind in ("symlink", "hardlink"):
                detail.append(f"link {old.content} -> {new.content}")
            elif old.content != new.content:
                detail.append(f"content ({old.size} -> {new.size} bytes)")
            if old.mode != new.mode:
                detail.append(f"mode {old.mode:o} -> {new.mode:o}")
            if old.owner != new.owner:
                detail.append(f"owner {old.owner} -> {new.owner}")
            if detail:
                out.append((path, "changed", ", ".join(detail) + f", layer {new.layer}"))
    return tuple(out)


def merged_files(store: Any, source: Any) -> dict[str, FileFacts]:
    """Every path of an image's filesystem (no leading /), its layers applied in order."""
    from lamina.oci.digest import Digest

    files: dict[str, FileFacts] = {}
    for index, layer in enumerate(source.layers, start=1):
        digest = layer.digest if isinstance(layer.digest, Digest) else Digest.parse(str(layer.digest))
        with store.open_blob(digest) as blob:
            _apply(files, _entries(blob, str(digest)), index)
    return files


def _apply(files: dict[str, FileFacts], entries: Iterator[tuple[str, FileFacts | None]], index: int) -> None:
    for path, facts in entries:
        parent, _, base = path.rpartition("/")
        if base == _OPAQUE:
            prefix = f"{parent}/" if parent else ""
            for name in [p for p in files if p.startswith(prefix) and files[p].layer < index]:
                del files[name]
            continue
        if base.startswith(_WHITEOUT):
            gone = f"{parent}/{base[len(_WHITEOUT) :]}" if parent else base[len(_WHITEOUT) :]
            for name in [p for p in files if p == gone or p.startswith(gone + "/")]:
                del files[name]
            continue
        if facts is not None:
            below = files.get(path)
            if facts.kind != "dir" and below is not None and below.kind == "dir":
                for name in [p for p in files if p.startswith(path + "/")]:
                    del files[name]  # a file replacing a directory hides what was below it
            files[path] = dataclasses.replace(facts, layer=index)


_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def _entries(blob: BinaryIO, label: str) -> Iterator[tuple[str, FileFacts | None]]:
    """(cleaned path, facts) per tar member; facts None for whiteout markers."""
    from lamina.oci.compression import open_decompressed, sniff_stream
    from lamina.oci.extract import BoundedTarInfo
    from lamina.oci.safepath import clean

    try:
        compression, raw = sniff_stream(blob)
        tar = tarfile.open(  # noqa: SIM115
            fileobj=open_decompressed(raw, compression), mode="r|", bufsize=_CHUNK, tarinfo=BoundedTarInfo
        )
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LayerError(f"diff {label}: not a tar stream: {err}") from err
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise LayerError(f"diff {label}: broken tar stream: {err}") from err
            if member is None:
                return
            tar.members.clear()
            path = clean(member.name)
            if not path:
                continue
            base = path.rpartition("/")[2]
            if base.startswith(_WHITEOUT):
                yield path, None
                continue
            kind = _KINDS.get(member.type, "other")
            content = member.linkname if kind in ("symlink", "hardlink") else ""
            if kind == "file":
                content = _hash(tar, member, label)
            owner = f"{member.uid}:{member.gid}"
            yield (
                path,
                FileFacts(
                    kind, member.mode & 0o7777, owner, member.size if kind == "file" else 0, content, 0
                ),
            )


def _hash(tar: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> str:
    """sha256 of a member's bytes, read in fixed chunks and counted against its header."""
    reader = tar.extractfile(member)
    digest = hashlib.sha256()
    count = 0
    if reader is not None:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            count += len(chunk)
    if count != member.size:
        raise LayerError(f"diff {label}: {member.name}: short read, {count} of {member.size} bytes")
    return digest.hexdigest()


def to_text(diff: ImageDiff, limit: int = 200) -> str:
    lines = [f"a: {diff.a.name} {_short(diff.a.digest)}", f"b: {diff.b.name} {_short(diff.b.digest)}"]
    lines += [f"config: {change}" for change in diff.config] or ["config: same"]
    for position, change, a, b in diff.layers:
        if change == "same":
            lines.append(f"layer {position}: same  {_layer(a)}")
        elif change == "changed":
            lines.append(f"layer {position}: changed  {_layer(a)}  ->  {_layer(b)}")
        elif change == "added":
            lines.append(f"layer {position}: only in b  {_layer(b)}")
        else:
            lines.append(f"layer {position}: only in a  {_layer(a)}")
    width = max((len(path) for path, _, _ in diff.files[:limit]), default=0) + 1
    for path, change, detail in diff.files[:limit]:
        lines.append(f"{change:<8} /{path:<{width}} {detail}")
    if len(diff.files) > limit:
        lines.append(f"... and {len(diff.files) - limit} more files (--format json lists them all)")
    if not diff.files:
        lines.append("files: same")
    return "\n".join(lines) + "\n"


def _short(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}:{hexdigest[:12]}" if hexdigest else digest


def _layer(text: str) -> str:
    digest, _, made_by = text.partition(" ")
    made_by = " ".join(made_by.split())
    made_by = made_by if len(made_by) <= 60 else made_by[:57] + "..."
    return f"{_short(digest)} {made_by}".rstrip()
