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

    def key(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        record = {"v": KEY_VERSION, **dataclasses.asdict(self)}
        record["env"] = [list(pair) for pair in self.env]
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
        )


def make_inputs(
    parent: str,
    instruction: str,
    env: dict[str, str] | None = None,
    platform: str = "",
    content: str = "",
) -> KeyInputs:
    return KeyInputs(parent, instruction, tuple(sorted((env or {}).items())), platform, content)


def explain_miss(previous: KeyInputs | None, current: KeyInputs) -> str:
    """One line saying why `current` did not hit where `previous` was cached before."""
    if previous is None:
        return "never built"
    reasons = []
    if previous.parent != current.parent:
        reasons.append("the previous step changed")
    if previous.instruction != current.instruction:
        reasons.append("the instruction changed")
    old_env, new_env = dict(previous.env), dict(current.env)
    changed = sorted(
        name for name in old_env.keys() | new_env.keys() if old_env.get(name) != new_env.get(name)
    )
    if changed:
        reasons.append("ARG/ENV changed: " + ", ".join(changed))
    if previous.platform != current.platform:
        reasons.append(f"platform changed: {previous.platform} -> {current.platform}")
    if previous.content != current.content:
        reasons.append("input files changed")
    return "; ".join(reasons) or "identical inputs"


# --- the cache index's key layout ------------------------------------------------------
# Every name the engine writes into the store's cache index (Store.cache_get and
# cache_put) is made here, so the layout can be read in one place:
#   sha256:<hex>                     a step's result (KeyInputs.key())
#   step-last:<hex>                  the KeyInputs a step position had last time (explains a miss)
#   copy-files:step-last:<hex>       the files that position's last COPY wrote (re-linked if unchanged)
#   copy-from:<hex>                  a COPY --from selection's content digest, per (stage key, instruction)
#   build-memo:<hex>                 an unchanged build's replay memo (steps.replay)
#   layer-blob:<dir>:<comp>:<epoch>  the compressed blob made from a layer dir


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def step_position_key(text: str) -> str:
    return "step-last:" + _sha256(text)


def copy_files_key(position: str) -> str:
    return "copy-files:" + position


def copy_from_key(text: str) -> str:
    return "copy-from:" + _sha256(text)


def build_memo_key(hexdigest: str) -> str:
    return "build-memo:" + hexdigest


def layer_blob_key(dir_id: str, compression: str, epoch: int | None) -> str:
    return f"layer-blob:{dir_id}:{compression}:{epoch if epoch is not None else ''}"
