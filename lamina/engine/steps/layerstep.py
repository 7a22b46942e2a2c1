"""A filesystem step's life: key, look up, on a miss produce an upper dir, commit, record, report.

RUN, COPY, ADD and WORKDIR each describe their inputs (cachekey.KeyInputs)
and a `produce(upper_dir)`; `layer_step` does the rest the same way for all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.cachekey import KeyInputs
from lamina.engine.model import StageState, StepRecord
from lamina.engine.progress import StepEvent, StepStatus
from lamina.engine.steps import metadata as md
from lamina.errors import BuildError, LaminaError

if TYPE_CHECKING:
    from lamina.engine.dockerfile.instructions import Instruction
    from lamina.engine.model import StepHost


def step_env(state: StageState) -> dict[str, str]:
    """What expansion and RUN see: the stage's ARGs, then ENV (which wins)."""
    env = {name: value for name, value in state.args.items() if value is not None}
    env.update(md.env_dict(state.config.config))
    return env


def one_line(instruction: Instruction) -> str:
    text = " ".join(instruction.original.split())
    return text if len(text) <= 80 else text[:77] + "..."


def layer_step(
    executor: StepHost,
    state: StageState,
    instruction: Instruction,
    inputs: KeyInputs,
    produce: Callable[[Path], None],
    pending: str = "",
    files: Callable[[], tuple[tuple[str, str, str], ...]] | None = None,
    defined: KeyInputs | None = None,
) -> bool:
    """Look `inputs` up; on a miss run `produce(upper_dir)` and commit. True when it made a layer.

    A miss carries its cause (cachekey.explain_miss against the inputs this
    step position had last time) on the step's events and its record. With
    `dry_run`, nothing runs: the miss is recorded with that reason; `pending`
    says the inputs are not known yet (a stage it reads will run). `files`
    lists the input files (missfacts) where that costs work a hit would not
    do: called on a real miss only, to name the files that changed. `defined`: a COPY
    --from's inputs keyed by the stage it copies from rather than the files, which a
    --cache-from entry may match instead (stepcache.fetch_defined).
    """
    if not state.base:  # the first filesystem step
        state.base = _base_label(executor, state)
    state.index += 1
    inputs = _explaining(inputs, state)
    named = _Named.of(executor, state, instruction, inputs)
    start = time.monotonic()
    result = None if pending else executor.cache.lookup(inputs, state)
    if executor.options.dry_run:
        return _forecast(executor, state, named, inputs, result, pending, files)
    cached = result is not None
    reason = ""
    if result is None:
        # Another build (or stage) making the same step right now: wait for it
        # and take its result, so that both end with the same layer and digest.
        with executor.cache.step_lock(inputs.key()):
            result = executor.cache.lookup(inputs, state)
            if result is None:
                result = executor.cache.fetch_remote(inputs, state)  # --cache-from
            if result is None and defined is not None:
                found = executor.cache.fetch_defined(defined, state)
                if found is not None:
                    result, inputs = found
            cached = result is not None
            if result is None:
                if files is not None:
                    inputs = dataclasses.replace(inputs, files=files())
                reason = named.explain(executor, state, inputs)
                result = _produce(executor, state, named.text, inputs, produce, start, reason)
                state.ran = f"step {state.index} ({named.text}) ran"
    if cached:
        cached_event = StepEvent(state.shown, state.index, state.total, named.text, StepStatus.CACHED)
        executor.sink.step(dataclasses.replace(cached_event, label=state.in_progress))
    executor.cache.remember_position(named.where, inputs)
    executor.cache.remember_position(named.same_text, inputs)
    seconds = time.monotonic() - start
    executor.record(StepRecord(state.shown, state.index, named.text, cached, seconds, inputs.key(), reason))
    if defined is not None:
        executor.cache.define(defined, inputs)
    return executor.cache.apply_result(state, inputs, result, named.step)


@dataclasses.dataclass(frozen=True, slots=True)
class _Named:
    """How one step is named: in progress lines, in errors, and across builds."""

    text: str  # the instruction on one line
    step: str  # `Dockerfile:N: stage NAME: text`, how errors name it
    line: str  # "line N", or "" when unknown
    where: str  # its place in the stage (the last inputs there explain its next miss)
    same_text: str  # the same instruction text in the stage (a line inserted above does not move it)

    @classmethod
    def of(cls, executor: StepHost, state: StageState, instruction: Instruction, inputs: KeyInputs) -> _Named:
        text = one_line(instruction)
        return cls(
            text,
            f"{instruction.location}: stage {state.in_errors}: {text}",
            f"line {instruction.location.line}" if instruction.location.line else "",
            executor.cache.step_position(state, instruction),
            executor.cache.step_position(state, instruction, inputs.instruction),
        )

    def explain(self, executor: StepHost, state: StageState, inputs: KeyInputs) -> str:
        return executor.cache.explain(self.where, inputs, state, self.line, self.same_text)


def _forecast(
    executor: StepHost,
    state: StageState,
    named: _Named,
    inputs: KeyInputs,
    result: Any,
    pending: str,
    files: Callable[[], tuple[tuple[str, str, str], ...]] | None,
) -> bool:
    """--dry-run: record whether the step would hit and, if not, why; nothing runs."""
    if result is None and files is not None and not pending:
        inputs = dataclasses.replace(inputs, files=files())  # names the files that changed
    reason = pending or ("" if result is not None else named.explain(executor, state, inputs))
    if state.unknown and reason.startswith("the previous step changed") and "; " not in reason:
        # Its parent's key is a guess: the step that decides may make what it made before.
        reason = f"may run: depends on {state.unknown}"
    record = StepRecord(state.shown, state.index, named.text, result is not None, 0.0, inputs.key(), reason)
    executor.record(record)
    if result is None:
        executor.dirty.add(state.name)
        state.ran = f"step {state.index} ({named.text}) will run"
        if pending:
            state.unknown = f"step {state.index} ({named.text})"
        state.key = inputs.key()
        return True
    return executor.cache.apply_result(state, inputs, result, named.step)


def _base_label(executor: StepHost, state: StageState) -> str:
    """The stage's base as a miss names it; called at its first filesystem step (state.key is the base's)."""
    plan = next((p for p in executor.plan.needed.values() if p.display_name == state.name), None)
    if state.key == "scratch" or plan is None:
        return "scratch" if state.key == "scratch" else ""
    if plan.base_stage is not None:
        base = executor.plan.needed.get(plan.base_stage)
        return f"stage {base.display_name if base else plan.base_stage}@{state.key}"
    return f"image {plan.base_image}@{state.key}"


def _explaining(inputs: KeyInputs, state: StageState) -> KeyInputs:
    """`inputs` with what names a later miss's cause (none of it keyed): the base, which names ENV set."""
    env_set = md.env_dict(state.config.config)
    env_from = tuple(name for name, _ in inputs.env if name in env_set)
    return dataclasses.replace(inputs, env_from=env_from, base=state.base)


def _produce(
    executor: StepHost,
    state: StageState,
    text: str,
    inputs: KeyInputs,
    produce: Callable[[Path], None],
    start: float,
    reason: str = "",
) -> Any:
    """Run a step that missed: a fresh upper dir, `produce`, then commit it as the step's layer."""
    sink = executor.sink
    label = state.in_progress
    sink.step(
        StepEvent(state.shown, state.index, state.total, text, StepStatus.RUNNING, reason=reason, label=label)
    )
    upper = executor.cache.new_upper()
    try:
        produce(upper)
    except BaseException as err:
        from lamina.engine.sandbox.runner import remove_tree  # rootless: inside the user namespace

        tail = getattr(err, "output_tail", ())
        seconds = time.monotonic() - start
        sink.step(
            StepEvent(
                state.shown, state.index, state.total, text, StepStatus.ERROR, seconds, tail, reason, label
            )
        )
        why = _disk_full_reason(err, upper) if isinstance(err, BuildError) else ""
        with contextlib.suppress(LaminaError):
            remove_tree(upper)
        if why:
            raise BuildError(f"{err}: {why}", tuple(tail)) from err
        raise
    result = executor.cache.commit_layer(inputs, state, upper)
    seconds = time.monotonic() - start
    sink.step(
        StepEvent(
            state.shown, state.index, state.total, text, StepStatus.DONE, seconds, reason=reason, label=label
        )
    )
    return result


_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded")


_NEARLY_FULL = 1 << 20  # bytes free: nothing a command writes fits in less


def file_system_full(path: Path) -> bool:
    """Whether the file system holding `path` is (nearly) full: a step that failed there filled it."""
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    # Root may use the blocks ext4 reserves; a user namespace may not. A command
    # that met ENOSPC leaves a few blocks at most (its last write was partial).
    blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
    return blocks * fs.f_frsize < _NEARLY_FULL or (fs.f_files > 0 and fs.f_favail == 0)


def _disk_full_reason(err: BuildError, upper: Path) -> str:
    """Why a command failed, when the disk is the reason: its exit code alone does not say.

    The step's files go to `upper`: if that file system is full now (before the
    upper dir is removed), the step filled it. A line of the command's own
    output that says so names the path it was writing.
    """
    if any(word in str(err).lower() for word in _DISK_FULL_WORDS):
        return ""  # said already
    said = next(
        (
            line.strip()
            for line in reversed(err.output_tail)
            if any(w in line.lower() for w in _DISK_FULL_WORDS)
        ),
        "",
    )
    said = said if len(said) <= 200 else said[:197] + "..."
    if file_system_full(upper):
        told = f"; the command said: {said}" if said else ""
        return f"write {upper}: No space left on device (its file system is full){told}"
    if said:
        return said
    from lamina.cache.room import room_refused

    refused = room_refused(upper.parent)
    if refused is not None:
        return f"write {upper}: {refused.strerror} (a write of 1 MiB beside it fails too)"
    return ""
