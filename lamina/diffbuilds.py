"""`lamina diff`: what changed between two builds of one Dockerfile and target, step by step.

Every build that finishes (not a dry run) writes a small record to
`<cache>/builds/<hex>.json`, named by the build's context, Dockerfile and
--target: the last two builds, each with its image digest and, per step, the
stage, instruction, cache key, whether it ran and why. `compare()` reads two
records (or two `--metadata-file` documents, which carry no keys) and says
for each step: unchanged, changed (and why it ran), added or removed.

A plain file, not the cache index: writing it costs a no-op rebuild one
small write, and no database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lamina.errors import LaminaError

KEPT = 2  # builds kept per context/Dockerfile/target


class NoBuilds(LaminaError):
    pass


def history_path(
    cache_root: Path, context: Path, dockerfile: str | os.PathLike[str] | None, target: str | None
) -> Path:
    """Where the builds of (context, Dockerfile, target) are recorded."""
    context = Path(os.path.abspath(context))
    dockerfile_path = Path(os.path.abspath(dockerfile)) if dockerfile else context / "Dockerfile"
    name = f"{context}\0{dockerfile_path}\0{target or ''}"
    return Path(cache_root) / "builds" / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".json")


def record(result: Any, when: float | None = None, name: str = "") -> dict[str, Any]:
    """A build (model.BuildResult) as `compare` reads it; `name` is BUILDKIT_BUILD_NAME's (the
    name buildx history shows), kept only when given."""
    return {
        **({"name": name} if name else {}),
        "time": time.time() if when is None else when,
        # a manifest made on first use (cache.store pending) is not known yet: the image ID
        "image": result.image_digest or result.config_digest,
        "target": result.target,
        "steps": [
            {
                "stage": step.stage,
                "step": step.index,
                "instruction": step.instruction,
                "cache": "cached" if step.cached else "run",
                "key": step.key,
                **({"reason": step.reason} if step.reason else {}),
            }
            for step in result.steps
        ],
    }


def remember(path: Path, result: Any, name: str = "") -> None:
    """Append a build to its history file, keeping the last KEPT (written whole, then renamed)."""
    builds = load_history(path)[-(KEPT - 1) :] if KEPT > 1 else []
    builds.append(record(result, name=name))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"builds": builds}, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a build that made its image is not failed by its history


def load_history(path: Path) -> list[dict[str, Any]]:
    try:
        builds = json.loads(path.read_text())["builds"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [b for b in builds if isinstance(b, dict) and isinstance(b.get("steps"), list)]


def from_metadata(path: Path) -> dict[str, Any]:
    """A `--metadata-file` document (or a history record) as `compare` reads it."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise NoBuilds(f"diff {path}: cannot read: {err.strerror}") from None
    except ValueError as err:
        raise NoBuilds(f"diff {path}: not JSON: {err}") from None
    if isinstance(doc, dict) and isinstance(doc.get("lamina.build.steps"), list):
        return {
            "time": None,
            "image": doc.get("containerimage.digest", ""),
            "target": doc.get("lamina.build.target", ""),
            "steps": doc["lamina.build.steps"],
        }
    if isinstance(doc, dict) and isinstance(doc.get("steps"), list):
        return doc
    raise NoBuilds(f"diff {path}: not a lamina --metadata-file (no lamina.build.steps)")


@dataclasses.dataclass(frozen=True, slots=True)
class StepDiff:
    stage: str
    step: int
    instruction: str  # the newer build's (the older's when removed)
    change: str  # unchanged, changed, added, removed
    before: str  # "cached", "run" or "" (absent)
    after: str
    reason: str  # why the newer build ran it ("" when cached)
    old_instruction: str = ""  # set when the text differs

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.old_instruction:
            del out["old_instruction"]
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class BuildDiff:
    before: dict[str, Any]
    after: dict[str, Any]
    steps: tuple[StepDiff, ...]

    def to_json(self) -> dict[str, Any]:
        def summary(build: dict[str, Any]) -> dict[str, Any]:
            ran = sum(1 for s in build["steps"] if s.get("cache") == "run")
            named = {"name": build["name"]} if build.get("name") else {}
            return {**named, "time": build.get("time"), "image": build.get("image", ""), "ran": ran}

        return {
            "before": summary(self.before),
            "after": summary(self.after),
            "steps": [s.to_json() for s in self.steps],
        }


def compare(before: dict[str, Any], after: dict[str, Any]) -> BuildDiff:
    """Step by step (matched by stage and position): what the newer build did differently."""
    old = {(s["stage"], s["step"]): s for s in before["steps"]}
    new = {(s["stage"], s["step"]): s for s in after["steps"]}
    order = [(s["stage"], s["step"]) for s in after["steps"]]
    order += [k for k in ((s["stage"], s["step"]) for s in before["steps"]) if k not in new]
    steps = []
    for where in order:
        a, b = old.get(where), new.get(where)
        if b is None:
            assert a is not None
            steps.append(StepDiff(*where, a["instruction"], "removed", a.get("cache", ""), "", ""))
            continue
        reason = b.get("reason", "") if b.get("cache") == "run" else ""
        if a is None:
            steps.append(StepDiff(*where, b["instruction"], "added", "", b.get("cache", ""), reason))
            continue
        same_key = bool(a.get("key")) and a.get("key") == b.get("key")
        unchanged = same_key or (not a.get("key") and b.get("cache") == "cached")
        text = a["instruction"] if a["instruction"] != b["instruction"] else ""
        change = "unchanged" if unchanged and not text else "changed"
        steps.append(
            StepDiff(*where, b["instruction"], change, a.get("cache", ""), b.get("cache", ""), reason, text)
        )
    return BuildDiff(before, after, tuple(steps))


def to_text(diff: BuildDiff) -> str:
    lines = []
    for label, build in (("before:", diff.before), ("after: ", diff.after)):
        when = build.get("time")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)) + " UTC" if when else "-"
        ran = sum(1 for s in build["steps"] if s.get("cache") == "run")
        steps = len(build["steps"])
        name = f"  {build['name']}" if build.get("name") else ""
        lines.append(
            f"{label} {stamp}{name}  image {_short(build.get('image', ''))}  ({ran} of {steps} steps ran)"
        )
    labels = [f"[{s.stage} {s.step}] {s.instruction}" for s in diff.steps]
    width = max((len(label) for label in labels), default=0)
    for step, label in zip(diff.steps, labels, strict=True):
        lines.append(f"{label:<{width}}  {_fate(step)}")
    return "\n".join(lines) + "\n"


def _fate(step: StepDiff) -> str:
    if step.change == "removed":
        return "removed (not in the newer build)"
    if step.change == "added":
        return "added: ran: " + step.reason if step.after == "run" else "added: cached"
    if step.change == "unchanged":
        if step.after == "run":
            return f"same inputs, ran again: {step.reason}"
        return "unchanged (cached)"
    what = f"instruction was: {step.old_instruction}; " if step.old_instruction else ""
    if step.after == "run":
        return f"changed, ran: {what}{step.reason}"
    return f"changed, cached: {what}an earlier result of these inputs"


def _short(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}:{hexdigest[:12]}" if hexdigest else (digest or "-")


def last_two(path: Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    builds = load_history(path)
    if len(builds) < 2:
        said = "one build" if builds else "no build"
        raise NoBuilds(f"diff {what}: {said} recorded yet; `lamina diff` compares the last two")
    return builds[-2], builds[-1]


def diff_paths(paths: Sequence[Path]) -> BuildDiff:
    """Two metadata files (older first)."""
    before, after = (from_metadata(p) for p in paths)
    return compare(before, after)
