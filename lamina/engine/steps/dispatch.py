"""Run one stage: its base, its ONBUILD triggers, then each instruction.

`run_stage(executor, stage_plan)` is what the executor's thread pool calls.
Instruction handlers live here for the metadata instructions (thin wrappers
over `steps.metadata`) and WORKDIR; RUN is in `steps.run`, COPY/ADD in
`steps.copyadd`. Each filesystem step goes through `layer_step()`: key,
look up, on a miss produce an upper dir, commit, record, report.

`make_plan(options)` reads the Dockerfile and asks the front end's planner
for the stages the target needs and the order to build them in.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.cachekey import KeyInputs
from lamina.engine.model import (
    FILESYSTEM_STEPS,
    PLATFORM,
    BuildOptions,
    BuildPlan,
    StageOutcome,
    StagePlan,
    StageState,
    StepRecord,
)
from lamina.engine.output import ImageLayer
from lamina.engine.progress import StepEvent, StepStatus
from lamina.engine.steps import metadata as md
from lamina.errors import (
    BuildError,
    DiskFull,
    DockerfileError,
    ImageNotFound,
    LaminaError,
    PlanError,
    is_disk_full,
)
from lamina.oci.digest import Digest

if TYPE_CHECKING:
    from lamina.engine.dockerfile.instructions import Instruction
    from lamina.engine.executor import Executor


def make_plan(options: BuildOptions) -> BuildPlan:
    """Parse the Dockerfile and let the front end's planner order the stages the target needs."""
    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.plan import BaseKind
    from lamina.engine.plan import make_plan as plan_stages

    path = options.dockerfile or options.context / "Dockerfile"
    display = os.path.relpath(path) if not path.is_absolute() else str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DockerfileError(f"cannot read Dockerfile {display}: {err.strerror}") from None
    dockerfile = parse(data, display)
    plan = plan_stages(
        dockerfile, target=options.target, build_args=dict(options.build_args), context=str(options.context)
    )
    needed = {index for wave in plan.waves for index in wave}
    stages = {}
    unplanned = {}
    for planned in plan.stages:
        base = planned.base
        if planned.index in needed:
            _check_platform(planned)
        (stages if planned.index in needed else unplanned)[planned.index] = StagePlan(
            planned.index,
            planned.display_name,
            planned.instructions,
            planned.location,
            base.image if base.kind is BaseKind.IMAGE else None,
            base.stage if base.kind is BaseKind.STAGE else None,
            planned.deps,
        )
    names = {s.name.lower(): s.index for s in plan.stages if s.name}
    return BuildPlan(
        display,
        plan.escape,
        stages,
        plan.target,
        plan.waves,
        {kv.key: kv.value for kv in plan.global_args},
        {kv.key: kv.value for kv in plan.build_args},
        names,
        plan.warnings,
        unplanned,
    )


def _check_platform(planned: Any) -> None:
    """`FROM --platform=P` is accepted for the host's platform only (no emulation)."""
    if not planned.platform:
        return
    wanted = planned.platform.lower().split("/")
    host = PLATFORM.split("/")
    if wanted[:2] != host[:2]:
        raise PlanError(
            f"{planned.location}: FROM --platform={planned.platform}: only the host platform"
            f" ({PLATFORM}) can be built; lamina does not emulate other platforms"
        )


# --- running a stage ---------------------------------------------------------------------------


def _expander(state: StageState, escape: str) -> Callable[[str], str]:
    from lamina.engine.dockerfile.shell import expand_word

    env = step_env(state)
    return lambda word: expand_word(word, env, escape)


def step_env(state: StageState) -> dict[str, str]:
    """What expansion and RUN see: the stage's ARGs, then ENV (which wins)."""
    env = {name: value for name, value in state.args.items() if value is not None}
    env.update(md.env_dict(state.config.config))
    return env


def _base(executor: Executor, plan: StagePlan) -> StageOutcome:
    from lamina.oci.image import Platform, default_config

    if plan.base_stage is not None:
        return executor.outcome(plan.base_stage)
    if plan.base_image is None:
        os_name, arch = PLATFORM.split("/", 1)
        return StageOutcome(plan.name, default_config(Platform(arch, os_name)), (), "scratch", None, ())
    return base_image(executor, plan.base_image, plan.location)


def base_image(executor: Executor, ref: str, location: Any) -> StageOutcome:
    """An image from the store (pulled first when allowed and needed), unpacked; once per build."""
    with executor.image_lock(ref):
        found = executor.images.get(ref)
        if found is None:
            found = load_image(executor, ref, location)
            executor.images[ref] = found
        return found


def load_image(executor: Executor, ref: str, location: Any) -> StageOutcome:
    from lamina.oci.image import MAX_DOCUMENT, ImageConfig, Manifest

    store = executor.store
    from lamina.oci.reference import store_name

    name = store_name(ref, pinned=True)
    record = None
    if executor.options.pull or not _in_store(store, name):
        record = _pull(executor, ref, location)
    try:
        record = record or store.resolve(name)
    except ImageNotFound:
        raise BuildError(
            f"{_source(location, ref)}: image {name} is not in the store "
            "(lamina load or lamina pull it first)"
        ) from None
    manifest = Manifest.from_bytes(store.read_blob(record.manifest, MAX_DOCUMENT), f"manifest of {ref}")
    config_bytes = store.read_blob(manifest.config.digest, MAX_DOCUMENT)
    config = ImageConfig.from_bytes(config_bytes, f"config of {ref}")
    if len(config.diff_ids) != len(manifest.layers):
        raise BuildError(f"{_source(location, ref)}: the config and the manifest disagree on the layers")
    layers = []
    for blob, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        try:
            path = unpack_layer(executor, blob, diff_id)
        except BuildError:
            raise
        except LaminaError as err:  # a full disk, a broken layer: name the FROM (or mount) needing it
            raise BuildError(f"{_source(location, ref)}: {err}") from err
        layers.append(ImageLayer(path, diff_id=diff_id, blob=blob))
    key = f"image:{record.manifest}"
    return StageOutcome(ref, config, tuple(layers), key, config.created, ())


def _source(location: Any, ref: str) -> str:
    """How an image error starts: `Dockerfile:3: FROM ref`, or `from=ref` for a mount."""
    return f"{location}: FROM {ref}" if location is not None else f"from={ref}"


def _in_store(store: Any, name: str) -> bool:
    try:
        store.resolve(name)
    except LaminaError:
        return False
    return True


def _pull(executor: Executor, ref: str, location: Any) -> Any:
    factory = executor.options.client_factory
    if factory is None:
        if executor.options.pull:
            raise BuildError(f"{_source(location, ref)}: --pull needs a registry client")
        return None
    from lamina.cache.transfer import ensure_image
    from lamina.oci.reference import parse_reference

    policy = "always" if executor.options.pull else "missing"
    try:
        return ensure_image(factory, executor.store, parse_reference(ref), policy)
    except LaminaError as err:
        raise BuildError(f"{_source(location, ref)}: {err}") from err


def unpack_layer(executor: Executor, blob: Any, diff_id: Digest) -> Path:
    """The layer's unpacked dir (overlay form), extracting the blob the first time."""
    store = executor.store
    if store.has_unpacked(diff_id):
        store.touch_unpacked(diff_id)
        return store.unpacked_path(diff_id)
    # The sandbox package unpacks inside the user namespace when rootless, so
    # files owned by subordinate ids stay manageable.
    from lamina.engine.sandbox.runner import extract_layer

    tmp = store.new_unpack_dir()
    # A layer's root is `/`: mkdtemp's 0700 would lock every user but root out
    # (the sandbox copies the top lower's root metadata onto the upper dir).
    os.chmod(tmp, 0o755)
    try:
        extract_layer(store.blob_path(blob.digest), tmp, digest=blob.digest)
    except BaseException:
        from lamina.engine.executor import remove_tree

        remove_tree(tmp)
        raise
    return store.publish_unpacked(tmp, diff_id)


def run_stage(executor: Executor, plan: StagePlan) -> StageOutcome:
    """Build one stage on top of its base and return its outcome."""
    from lamina.engine.dockerfile.instructions import parse_instruction
    from lamina.engine.dockerfile.parser import parse

    base = _base(executor, plan)
    config = md.ensure_path(base.config)
    instructions: list[Instruction] = list(plan.instructions)
    triggers = config.config.on_build
    if triggers:
        config = md.clear_onbuild(config)
        parsed_triggers = []
        for text in triggers:
            try:
                node = parse(text, plan.location.path).children[0]
                parsed_triggers.append(parse_instruction(node, plan.location.path))
            except (DockerfileError, IndexError) as err:
                raise BuildError(f"{plan.location}: ONBUILD trigger {text!r}: {err}") from None
        instructions = parsed_triggers + instructions
    no_cache = any(name.lower() == plan.name.lower() for name in executor.options.no_cache_filter)
    state = StageState(
        name=plan.name,
        config=config,
        layers=list(base.layers),
        key=base.key,
        created=base.created,
        args=dict(base.args),
        total=sum(1 for i in instructions if i.name in FILESYSTEM_STEPS),
        no_cache=no_cache,
    )
    executor.totals[state.name] = state.total
    for instruction in instructions:
        try:
            dispatch(executor, state, plan, instruction)
        except DockerfileError as err:
            # A metadata step's check (a signal, a port, a volume) knows no line.
            raise err.with_location(instruction.location) from None
        except BuildError as err:
            if err.args and str(err).startswith(str(instruction.location)):
                raise
            raise BuildError(
                f"{instruction.location}: stage {plan.name}: {_one_line(instruction)}: {err}", err.output_tail
            ) from err
        except LaminaError as err:
            raise BuildError(
                f"{instruction.location}: stage {plan.name}: {_one_line(instruction)}: {err}"
            ) from err
        except OSError as err:
            # A full disk or a vanished file is still one line naming the step.
            step = f"{instruction.location}: stage {plan.name}: {_one_line(instruction)}"
            if is_disk_full(err):
                raise BuildError(f"{step}: {DiskFull.writing(None, err)}") from err
            what = f"{err.filename}: " if err.filename else ""
            raise BuildError(f"{step}: {what}{err.strerror or err}") from err
    return state.outcome()


def _one_line(instruction: Instruction) -> str:
    text = " ".join(instruction.original.split())
    return text if len(text) <= 80 else text[:77] + "..."


def dispatch(executor: Executor, state: StageState, plan: StagePlan, instruction: Instruction) -> None:
    from lamina.engine.dockerfile import instructions as ins

    created = executor.created(state)
    escape = executor.plan.escape
    expand = _expander(state, escape)
    config = state.config
    if isinstance(instruction, ins.ArgInstruction):
        _arg(executor, state, instruction, expand)
    elif isinstance(instruction, ins.EnvInstruction):
        expanded = instruction.expand(expand)
        state.config = md.apply_env(config, [(kv.key, kv.value) for kv in expanded.env], created)
    elif isinstance(instruction, ins.LabelInstruction):
        expanded_label = instruction.expand(expand)
        pairs = [(kv.key, kv.value) for kv in expanded_label.labels]
        state.config = md.apply_label(config, pairs, created)
    elif isinstance(instruction, ins.ExposeInstruction):
        state.config = md.apply_expose(config, instruction.expand(expand).ports, created)
    elif isinstance(instruction, ins.VolumeInstruction):
        state.config = md.apply_volume(config, instruction.expand(expand).volumes, created)
    elif isinstance(instruction, ins.UserInstruction):
        state.config = md.apply_user(config, instruction.expand(expand).user, created)
    elif isinstance(instruction, ins.StopsignalInstruction):
        state.config = md.apply_stopsignal(config, instruction.expand(expand).signal, created)
    elif isinstance(instruction, ins.MaintainerInstruction):
        state.config = md.apply_maintainer(config, instruction.maintainer, created)
    elif isinstance(instruction, ins.CmdInstruction):
        state.config = md.apply_cmd(
            config, instruction.command, shell_form=not instruction.exec_form, created=created
        )
        state.cmd_set = True
    elif isinstance(instruction, ins.EntrypointInstruction):
        state.config = md.apply_entrypoint(
            config,
            instruction.command,
            shell_form=not instruction.exec_form,
            cmd_set=state.cmd_set,
            created=created,
        )
    elif isinstance(instruction, ins.ShellInstruction):
        state.config = md.apply_shell(config, instruction.shell, created)
    elif isinstance(instruction, ins.HealthcheckInstruction):
        state.config = md.apply_healthcheck(config, _healthcheck(instruction), created)
    elif isinstance(instruction, ins.OnbuildInstruction):
        state.config = md.apply_onbuild(config, instruction.expression)
    elif isinstance(instruction, ins.WorkdirInstruction):
        _workdir(executor, state, instruction.expand(expand))
    elif isinstance(instruction, ins.RunInstruction):
        from lamina.engine.steps.run import run_step

        run_step(executor, state, plan, instruction.expand(expand))
    elif isinstance(instruction, ins.CopyInstruction | ins.AddInstruction):
        from lamina.engine.steps.copyadd import copy_step

        copy_step(executor, state, plan, instruction.expand(expand))
    elif isinstance(instruction, ins.FromInstruction):
        raise BuildError("FROM inside a stage")  # parse_stages never gives one
    else:
        raise BuildError(f"{instruction.name} is not supported")


def _arg(executor: Executor, state: StageState, instruction: Any, expand: Callable[[str], str]) -> None:
    from lamina.engine.plan import arg_value

    pairs: list[tuple[str, str | None]] = []
    for decl in instruction.args:
        value = arg_value(decl, executor.plan.build_args, expand, executor.plan.global_args)
        state.args.pop(decl.name, None)  # a redeclared ARG moves to the end, as in BuildKit's list
        state.args[decl.name] = value
        pairs.append((decl.name, value))
    state.config = md.arg_history(state.config, pairs, executor.created(state))


def _healthcheck(instruction: Any) -> Any:
    from lamina.oci.image import Healthcheck

    if tuple(instruction.test[:1]) == ("NONE",):
        return Healthcheck(test=("NONE",))
    return Healthcheck(
        test=tuple(instruction.test),
        interval=instruction.interval or 0,
        timeout=instruction.timeout or 0,
        start_period=instruction.start_period or 0,
        start_interval=instruction.start_interval or 0,
        retries=instruction.retries or 0,
    )


# --- filesystem steps --------------------------------------------------------------------------


def layer_step(
    executor: Executor,
    state: StageState,
    instruction: Instruction,
    inputs: KeyInputs,
    produce: Callable[[Path], None],
    pending: str = "",
) -> bool:
    """Look `inputs` up; on a miss run `produce(upper_dir)` and commit. True when it made a layer.

    With `dry_run`, nothing runs: a miss is recorded with the reason
    (cachekey.explain_miss against the inputs this step had last time);
    `pending` says the inputs are not known yet (a stage it reads will run).
    """
    state.index += 1
    text = _one_line(instruction)
    step = f"{instruction.location}: stage {state.name}: {text}"  # how errors name it
    start = time.monotonic()
    sink = executor.sink
    where = executor.step_position(state, instruction)
    result = None if pending else executor.lookup(inputs, state)
    if executor.options.dry_run:
        reason = pending or ("" if result is not None else executor.explain(where, inputs, state))
        record = StepRecord(state.name, state.index, text, result is not None, 0.0, inputs.key(), reason)
        executor.record(record)
        if result is None:
            executor.dirty.add(state.name)
            state.key = inputs.key()
            return True
        return executor.apply_result(state, inputs, result, step)
    cached = result is not None
    if result is None:
        # Another build (or stage) making the same step right now: wait for it
        # and take its result, so that both end with the same layer and digest.
        with executor.step_lock(inputs.key()):
            result = executor.lookup(inputs, state)
            if result is None and executor.remote is not None:
                result = executor.remote.fetch(executor, inputs, state)  # --cache-from
            cached = result is not None
            if result is None:
                result = _produce(executor, state, text, inputs, produce, start)
    if cached:
        sink.step(StepEvent(state.name, state.index, state.total, text, StepStatus.CACHED))
    executor.remember_position(where, inputs)
    executor.record(StepRecord(state.name, state.index, text, cached, time.monotonic() - start, inputs.key()))
    return executor.apply_result(state, inputs, result, step)


def _produce(
    executor: Executor,
    state: StageState,
    text: str,
    inputs: KeyInputs,
    produce: Callable[[Path], None],
    start: float,
) -> Any:
    """Run a step that missed: a fresh upper dir, `produce`, then commit it as the step's layer."""
    sink = executor.sink
    sink.step(StepEvent(state.name, state.index, state.total, text, StepStatus.RUNNING))
    upper = executor.new_upper()
    try:
        produce(upper)
    except BaseException as err:
        from lamina.engine.executor import remove_tree

        tail = getattr(err, "output_tail", ())
        seconds = time.monotonic() - start
        sink.step(StepEvent(state.name, state.index, state.total, text, StepStatus.ERROR, seconds, tail))
        why = _disk_full_reason(err, upper) if isinstance(err, BuildError) else ""
        with contextlib.suppress(LaminaError):
            remove_tree(upper)
        if why:
            raise BuildError(f"{err}: {why}", tuple(tail)) from err
        raise
    result = executor.commit_layer(inputs, state, upper)
    seconds = time.monotonic() - start
    sink.step(StepEvent(state.name, state.index, state.total, text, StepStatus.DONE, seconds))
    return result


_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded")
_NEARLY_FULL = 1 << 20  # bytes free: nothing a command writes fits in less


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
    try:
        fs = os.statvfs(upper)
    except OSError:
        full = False
    else:
        # Root may use the blocks ext4 reserves; a user namespace may not. A command
        # that met ENOSPC leaves a few blocks at most (its last write was partial).
        blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
        full = blocks * fs.f_frsize < _NEARLY_FULL or (fs.f_files > 0 and fs.f_favail == 0)
    if full:
        told = f"; the command said: {said}" if said else ""
        return f"write {upper}: No space left on device (its file system is full){told}"
    return said


def _workdir(executor: Executor, state: StageState, instruction: Any) -> None:
    from lamina.engine.cachekey import make_inputs
    from lamina.engine.steps.layerview import LayerView

    workdir = md.resolve_workdir(state.config.config.working_dir, instruction.path)
    directory = md.clean_path(workdir)  # the config keeps `/app/` as written; the directory is /app
    if directory == "/":
        state.config = md.apply_workdir(state.config, workdir, executor.created(state), has_layer=False)
        return
    user = state.config.config.user
    inputs = make_inputs(state.key, f"WORKDIR {workdir}", {"user": user} if user else {}, PLATFORM)

    def produce(upper: Path) -> None:
        view = LayerView([layer.path for layer in state.layers])
        missing = view.missing_dirs(directory)
        # mkdir -p fails on a file where a directory goes, as BuildKit's does.
        last = posixpath.dirname(missing[0]) if missing else directory
        found = view.stat(last)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            where = "" if last == directory else f"mkdir {directory}: "
            raise BuildError(f"{where}{last} exists and is not a directory")
        if not missing:
            return
        uid = gid = 0
        if user:
            from lamina.engine.steps.users import resolve_owner

            uid, gid = resolve_owner(view, user)
        for path in missing:
            target = upper / path.lstrip("/")
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(target, 0o755)
        keep_lower_dir_meta(view, upper, posixpath.dirname(missing[0]))
        chown_all([(upper / path.lstrip("/"), uid, gid) for path in missing])

    has_layer = layer_step(executor, state, instruction, inputs, produce)
    state.config = md.apply_workdir(state.config, workdir, executor.created(state), has_layer=has_layer)


def chown_all(owners: list[tuple[Path, int, int]]) -> None:
    """Give files the build wrote their container owners (call it last: it may lock us out).

    As root that is a plain lchown. Rootless, the sandbox package does it
    inside the user namespace (subordinate ids), or leaves the caller's id,
    which the sandbox shows as root, when there is no id range.
    """
    if os.geteuid() == 0:
        for path, uid, gid in owners:
            os.lchown(path, uid, gid)
        return
    wanted = [(Path(path), uid, gid) for path, uid, gid in owners if (uid, gid) != (0, 0)]
    if wanted:
        from lamina.engine.sandbox.runner import set_owners

        set_owners(wanted)


def chown(path: Path | str, uid: int, gid: int) -> None:
    chown_all([(Path(path), uid, gid)])


def set_owner_and_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    """Owner, then mode (chown clears setuid); rootless the other way round, since
    the caller may not chmod a file it gave to a subordinate id."""
    if os.geteuid() == 0:
        os.lchown(path, uid, gid)
        os.chmod(path, mode)
    else:
        os.chmod(path, mode)
        chown(path, uid, gid)


def container_owner(st: os.stat_result) -> tuple[int, int]:
    """The (uid, gid) the sandbox shows for a file of a layer dir (host ids, rootless)."""
    if os.geteuid() == 0:
        return st.st_uid, st.st_gid
    from lamina.engine.sandbox.idmap import detect_ids

    ids = detect_ids()
    return ids.uid_inside(st.st_uid), ids.gid_inside(st.st_gid)


def keep_lower_dir_meta(
    view: Any, upper: Path, path: str, late_owners: list[tuple[Path, int, int]] | None = None
) -> None:
    """Directories of `path` (and its ancestors) that exist below keep their metadata.

    Writing `a/b/c` into an upper dir creates `a` and `a/b` there, which
    would shadow the lower dirs' mode, owner and times in the merged view;
    BuildKit leaves existing directories alone, so copy theirs over.
    """
    current = ""
    owners: list[tuple[Path, int, int]] = []
    for part in [p for p in path.split("/") if p]:
        current = f"{current}/{part}"
        target = upper / current.lstrip("/")
        if target.is_symlink() or not target.is_dir():
            break
        st = view.stat(current)
        if st is None:
            break
        os.chmod(target, st.st_mode & 0o7777)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        owners.append((target, *container_owner(st)))
    if late_owners is not None:
        # The caller writes into these first: unprivileged, a directory given
        # to another id would no longer be writable.
        late_owners.extend(owners)
    else:
        chown_all(owners)
