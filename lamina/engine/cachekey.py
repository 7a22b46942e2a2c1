"""Cache keys for build steps, and why a key missed.

A step's key is sha256 over its `KeyInputs`: the parent step's key, the
instruction after expansion, the ARG/ENV values the step can see, the
platform, and the digest of its inputs' content (COPY sources by content and
metadata, never mtime). Proxy ARGs and secrets never reach a `KeyInputs`:
the caller leaves them out.

The inputs are stored beside each result in the cache index, so that
`lamina plan` can say which part changed when a key misses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

# Bump when the meaning of a key changes, so old cache entries simply miss.
KEY_VERSION = "lamina-step-v1"


@dataclasses.dataclass(frozen=True, slots=True)
class KeyInputs:
    parent: str  # the parent step's key, or the base image's manifest digest, or "scratch"
    instruction: str  # the instruction as it will run, after expansion
    env: tuple[tuple[str, str], ...] = ()  # visible ARG/ENV, sorted by name
    platform: str = ""
    content: str = ""  # digest of the step's input files / mounted stages, "" when none
    # Not in the key: what explain_miss needs to name a cause exactly. Stored
    # under the step's position (step-last:), never beside a result.
    files: tuple[tuple[str, str, str], ...] = ()  # (path, content digest, "type mode uid:gid link")
    env_from: tuple[str, ...] = ()  # names of `env` that ENV set (the others are ARGs)
    base: str = ""  # the stage's base: "image REF@DIGEST", "stage NAME@KEY" or "scratch"
    source: str = ""  # where `files` come from when not the context: "stage NAME", "image REF"

    def key(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        """The keyed fields only: the same JSON (and key) as before the explaining fields."""
        record = {
            "v": KEY_VERSION,
            "parent": self.parent,
            "instruction": self.instruction,
            "env": [list(pair) for pair in self.env],
            "platform": self.platform,
            "content": self.content,
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    def record_json(self) -> str:
        """Every field, for the step's position: what the next miss is explained against."""
        record = json.loads(self.to_json())
        record["files"] = [list(f) for f in self.files]
        record["env_from"] = list(self.env_from)
        record["base"] = self.base
        record["source"] = self.source
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> KeyInputs:
        record = json.loads(text)
        return cls(
            parent=record["parent"],
            instruction=record["instruction"],
            env=tuple((name, value) for name, value in record["env"]),
            platform=record["platform"],
            content=record["content"],
            files=tuple((p, c, m) for p, c, m in record.get("files", ())),
            env_from=tuple(record.get("env_from", ())),
            base=record.get("base", ""),
            source=record.get("source", ""),
        )


def make_inputs(
    parent: str,
    instruction: str,
    env: dict[str, str] | None = None,
    platform: str = "",
    content: str = "",
) -> KeyInputs:
    return KeyInputs(parent, instruction, tuple(sorted((env or {}).items())), platform, content)


FIRST_BUILD = "first build of this step"
_FEW = 3  # paths named before "and N more"
# Values never shown: proxy ARGs may carry credentials, and so may names like these.
_MASKED_WORDS = ("PROXY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "PRIVATE")


def explain_miss(
    previous: KeyInputs | None, current: KeyInputs, parent_ran: str = "", line: str = "", upstream: str = ""
) -> str:
    """One line saying why `current` did not hit where `previous` was cached before.

    `parent_ran` names the earlier step of the stage that ran (or will), when
    one did: a changed parent is then that step's doing. `line` is where the
    instruction is written ("line 7"), named when its text changed. `upstream`
    says what changed in the stage this one is built FROM (missfacts.upstream_change).
    """
    return "; ".join(miss_causes(previous, current, parent_ran, line, upstream)) or "identical inputs"


def miss_causes(
    previous: KeyInputs | None, current: KeyInputs, parent_ran: str = "", line: str = "", upstream: str = ""
) -> list[str]:
    """Every cause of a miss, each with its particulars, in the order a reader checks them."""
    if previous is None:
        return [FIRST_BUILD]
    causes = []
    if previous.base and current.base and previous.base != current.base:
        causes.append(_base_cause(previous.base, current.base, upstream))
    elif previous.parent != current.parent:
        causes.append(
            f"the previous step changed: {parent_ran}" if parent_ran else "the previous step changed"
        )
    if previous.instruction != current.instruction:
        said = _instruction_causes(previous.instruction, current.instruction)
        causes.extend(_at(cause, line) if cause.startswith("instruction text") else cause for cause in said)
    causes.extend(_env_causes(previous, current))
    if previous.platform != current.platform:
        causes.append(f"platform changed: {previous.platform} -> {current.platform}")
    if previous.content != current.content:
        named = file_causes(previous.files, current.files)
        if named and current.instruction.startswith("RUN "):  # a bind mount's files (missfacts.bind_files)
            causes.extend(f"mounted {cause}" for cause in named)
        elif named:
            causes.extend(f"{current.source}: {cause}" if current.source else cause for cause in named)
        elif not current.instruction.startswith("RUN "):
            causes.append("input files changed")
        elif not any(cause.startswith("RUN options changed") and "mounts" in cause for cause in causes):
            causes.append("mounted files changed")  # else: a mount added or removed, said already
    return causes


def _at(cause: str, line: str) -> str:
    """'instruction text changed (the command)' at 'line 7' -> '... (line 7: the command)'."""
    if not line:
        return cause
    if cause.endswith(")"):
        head, _, detail = cause[:-1].partition(" (")
        return f"{head} ({line}: {detail})"
    return f"{cause} ({line})"


def _short(digest: str) -> str:
    algo, _, hexdigest = digest.removeprefix("image:").partition(":")
    return f"{algo}:{hexdigest[:12]}" if hexdigest else digest


def _base_cause(old: str, new: str, upstream: str = "") -> str:
    old_ref, _, old_digest = old.rpartition("@")
    new_ref, _, new_digest = new.rpartition("@")
    kind = "base stage" if new_ref.startswith("stage ") else "base image"
    new_name = new_ref.split(" ", 1)[-1]
    if old_ref == new_ref:
        if kind == "base stage":
            return f"upstream stage {new_name} changed" + (f": {upstream}" if upstream else "")
        return f"{kind} changed: {new_name} {_short(old_digest)} -> {_short(new_digest)}"
    old_name = old_ref.split(" ", 1)[-1]
    return f"base changed: {old_name} -> {new_name}"


def _instruction_causes(old: str, new: str) -> list[str]:
    old_word, _, old_rest = old.partition(" ")
    new_word, _, new_rest = new.partition(" ")
    try:
        before, after = json.loads(old_rest), json.loads(new_rest)
    except ValueError:
        before = after = None
    if old_word != new_word or not isinstance(before, dict) or not isinstance(after, dict):
        return ["instruction text changed"]
    if old_word == "RUN":
        return _run_causes(before, after)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [f"instruction text changed ({', '.join(changed)})"]


_RUN_OPTIONS = ("network", "security", "mounts", "hosts", "ulimits", "shm", "hostname")
# steps.run keys these build flags only when set; a miss names the flag, not the text
_FLAG_NAMES = {"hosts": "--add-host", "ulimits": "--ulimit", "shm": "--shm-size"}


def _option_value(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "default"
    if isinstance(value, int) and not isinstance(value, bool) and value and value % (1 << 20) == 0:
        return f"{value >> 20}m"  # --shm-size in bytes
    return str(value) if value else "default"


def _run_causes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    causes = []
    if before.get("argv") != after.get("argv") or before.get("script") != after.get("script"):
        causes.append("instruction text changed (the command)")
    options = []
    for name in _RUN_OPTIONS:
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if name == "mounts":
            options.append("mounts " + _mounts_change(old, new))
        else:
            options.append(f"{_FLAG_NAMES.get(name, name)} {_option_value(old)} -> {_option_value(new)}")
    if options:
        causes.append("RUN options changed: " + ", ".join(options))
    if before.get("user") != after.get("user"):
        causes.append(f"USER changed: {before.get('user') or 'root'} -> {after.get('user') or 'root'}")
    if before.get("cwd") != after.get("cwd"):
        causes.append(f"WORKDIR changed: {before.get('cwd')} -> {after.get('cwd')}")
    return causes or ["instruction text changed"]


def _mounts_change(old: object, new: object) -> str:
    def targets(mounts: object) -> dict[str, str]:
        found = {}
        for mount in mounts if isinstance(mounts, list) else ():
            text = mount if isinstance(mount, str) else json.dumps(mount, sort_keys=True)
            found[text] = text  # "type:...:target:..." (steps.run): the kind and the target
        return found

    a, b = targets(old), targets(new)
    parts = [f"+{t}" for t in sorted(b.keys() - a.keys())]
    parts += [f"-{t}" for t in sorted(a.keys() - b.keys())]
    return f"({' '.join(parts)})" if parts else "changed"


def masked(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _MASKED_WORDS)


def _env_causes(previous: KeyInputs, current: KeyInputs) -> list[str]:
    old_env, new_env = dict(previous.env), dict(current.env)
    set_by_env = set(previous.env_from) | set(current.env_from)
    causes = []
    for name in sorted(old_env.keys() | new_env.keys()):
        old, new = old_env.get(name), new_env.get(name)
        if old == new:
            continue
        kind = "ENV" if name in set_by_env else "build arg"
        if name == "user" and current.instruction.startswith("WORKDIR "):  # steps.dispatch keys USER so
            causes.append(f"USER changed: {old or 'root'} -> {new or 'root'}")
            continue
        if name == "SOURCE_DATE_EPOCH":
            causes.append(f"SOURCE_DATE_EPOCH changed: {_value(old)} -> {_value(new)}")
            continue
        values = "(value masked)" if masked(name) else f"{_value(old)} -> {_value(new)}"
        causes.append(f"{kind} {name} changed: {values}")
    return causes


def _value(value: str | None) -> str:
    if value is None:
        return "(unset)"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + '..."'


def _few(paths: list[str]) -> str:
    named = ", ".join(paths[:_FEW])
    return named + (f" and {len(paths) - _FEW} more" if len(paths) > _FEW else "")


def file_causes(old: tuple[tuple[str, str, str], ...], new: tuple[tuple[str, str, str], ...]) -> list[str]:
    """Which files changed and how: content, mode or owner, added, removed (a few, then a count)."""
    if not old and not new:
        return []
    before = {path: (content, meta) for path, content, meta in old}
    after = {path: (content, meta) for path, content, meta in new}
    content = sorted(p for p in before.keys() & after.keys() if before[p][0] != after[p][0])
    meta = sorted(
        p for p in before.keys() & after.keys() if before[p][0] == after[p][0] and before[p][1] != after[p][1]
    )
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    causes = []
    for label, paths in (
        ("file content changed", content),
        ("mode or owner changed", meta),
        ("file added", added),
        ("file removed", removed),
    ):
        if paths:
            causes.append(f"{label}: {_few(paths)}")
    return causes


# --- the cache index's key layout ------------------------------------------------------
# Every name the engine writes into the store's cache index (Store.cache_get and
# cache_put) is made here, so the layout can be read in one place:
#   sha256:<hex>                     a step's result (KeyInputs.key())
#   step-last:<hex>                  the KeyInputs a step position had last time (explains a miss)
#   copy-files:step-last:<hex>       the files that position's last COPY wrote (re-linked if unchanged)
#   copy-from:<hex>                  a COPY --from selection's content digest, per (stage key, instruction)
#   build-memo:<hex>                 an unchanged build's replay memo (steps.replay)
#   build-checks:<hex>               what the build checks found, per input (buildchecks)
#   layer-blob:<dir>:<comp>:<epoch>  the compressed blob made from a layer dir


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def step_position_key(text: str) -> str:
    return "step-last:" + _sha256(text)


def copy_files_key(position: str) -> str:
    return "copy-files:" + position


def defines_key(key: str) -> str:
    """Under it, the definition key (stepcache.define) of the step whose key is `key`."""
    return "defines:" + key


def copy_from_key(text: str) -> str:
    return "copy-from:" + _sha256(text)


def build_memo_key(hexdigest: str) -> str:
    return "build-memo:" + hexdigest


def build_checks_key(hexdigest: str) -> str:
    return "build-checks:" + hexdigest


def layer_blob_key(dir_id: str, compression: str, epoch: int | None) -> str:
    return f"layer-blob:{dir_id}:{compression}:{epoch if epoch is not None else ''}"


def layer_donor_key(dir_id: str) -> str:
    """Under it, the layer dir a COPY rerun linked the unchanged files of layer dir `dir_id`
    from (engine.snapshot.Donor: its blob gives those files' bytes)."""
    return "layer-donor:" + dir_id
