"""Run one stage: its base, its ONBUILD triggers, then each instruction.

`run_stage(executor, stage_plan)` is what the executor's thread pool calls.
Instruction handlers live here for the metadata instructions (thin wrappers
over `steps.metadata`) and WORKDIR; RUN is in `steps.run`, COPY/ADD in
`steps.copyadd`, a base image in `steps.base`. Each filesystem step goes
through `steps.layerstep.layer_step()`: key, look up, on a miss produce an
upper dir, commit, record, report; `steps.owners` sets what it wrote.

`make_plan(options, data)` asks the front end's planner, over the
Dockerfile's bytes (read once, by executor.execute), for the stages the
target needs and the order to build them in: a `plan.Plan`, the one plan type.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.model import (
    FILESYSTEM_STEPS,
    BuildOptions,
    StageOutcome,
    StageState,
)
from lamina.engine.namedcontext import lookup
from lamina.engine.steps import metadata as md
from lamina.engine.steps.base import base_image
from lamina.engine.steps.layerstep import layer_step, one_line, step_env
from lamina.engine.steps.owners import chown_all, keep_lower_dir_meta
from lamina.errors import (
    BuildError,
    DiskFull,
    DockerfileError,
    LaminaError,
    is_disk_full,
)

if TYPE_CHECKING:
    from lamina.engine.dockerfile.instructions import Instruction
    from lamina.engine.model import StepHost
    from lamina.engine.plan import Plan, PlannedStage


def make_plan(options: BuildOptions, data: bytes | None) -> Plan:
    """The plan of the first (or only) target platform; see make_plans."""
    return make_plans(options, data)[0]


def make_plans(options: BuildOptions, data: bytes | None) -> tuple[Plan, ...]:
    """Parse the Dockerfile's bytes and let the front end's planner order the stages the target
    needs, once per target platform (`--platform`; none: the host's), as BuildKit converts the
    Dockerfile once per platform; `data` None: it could not be read (said here, naming it)."""
    from lamina.engine.buildchecks import shown_dockerfile
    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.plan import make_plan as plan_stages

    path = options.dockerfile or options.context / "Dockerfile"
    display = shown_dockerfile(path, options.context)  # stdin's, a git context's: as in the context
    if data is None:
        try:
            data = path.read_bytes()  # again, for the reason it failed
        except OSError as err:
            raise DockerfileError(f"cannot read Dockerfile {display}: {err.strerror}") from None
    dockerfile = parse(data, display)
    return tuple(
        plan_stages(
            dockerfile,
            target=options.target,
            build_args=dict(options.build_args),
            context=str(options.context),
            target_platform=platform,
        )
        for platform in (options.platforms or (None,))
    )


# --- running a stage ---------------------------------------------------------------------------


def _expander(state: StageState, escape: str) -> Callable[[str], str]:
    from lamina.engine.dockerfile.shell import expand_word

    env = step_env(state)
    return lambda word: expand_word(word, env, escape)


def _base(executor: StepHost, plan: PlannedStage) -> StageOutcome:
    from lamina.oci.image import default_config

    if plan.base_stage is not None:
        return executor.outcome(plan.base_stage)
    if plan.base_image is None:
        config = default_config(plan.stage_platform)
        return StageOutcome(plan.display_name, config, (), "scratch", None, ())
    return base_image(executor, plan.base_image, plan.location, plan.stage_platform)


def run_stage(executor: StepHost, plan: PlannedStage) -> StageOutcome:
    """Build one stage on top of its base and return its outcome."""
    from lamina.engine.dockerfile.instructions import parse_instruction
    from lamina.engine.dockerfile.parser import parse
    from lamina.engine.plan import format_all

    if plan.name and lookup(executor.options.build_contexts, plan.name):  # a named stage
        # --build-context replaces the stage
        return base_image(executor, plan.name, plan.location, plan.stage_platform)
    started = time.monotonic()
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
                trigger = parse_instruction(node, plan.location.path)
                # As BuildKit: shown as `[stage-1 1/2] ONBUILD RUN ...` (prefixCommand), and located
                # at the stage's FROM (initOnBuildTriggers), not at line 1 of the trigger's text.
                shown = f"ONBUILD {trigger.original}"
                parsed_triggers.append(dataclasses.replace(trigger, original=shown, location=plan.location))
            except (DockerfileError, IndexError) as err:
                raise BuildError(f"{plan.location}: ONBUILD trigger {text!r}: {err}") from None
        instructions = parsed_triggers + instructions
    no_cache = any(name.lower() == plan.display_name.lower() for name in executor.options.no_cache_filter)
    state = StageState(
        name=plan.display_name,
        config=config,
        layers=list(base.layers),
        key=base.key,
        created=base.created,
        args=dict(base.args),
        total=_step_total(plan.instructions, len(instructions) - len(plan.instructions)),
        no_cache=no_cache,
        platform=format_all(plan.stage_platform),  # with its OS version, if any
        label=_label(executor, plan),
        one_stage=len(executor.plan.stages) == 1,
    )
    # BuildKit numbers the FROM of an image as the stage's step 1 ([base 1/3] FROM busybox,
    # [base 3/3] RUN ...); FROM scratch or an earlier stage takes no number.
    if plan.base_stage is None and plan.base_image is not None and base.key != "scratch":
        state.index, state.total = 1, state.total + 1
        if not executor.options.dry_run:
            from lamina.engine.progress import StepEvent, StepStatus

            seconds = time.monotonic() - started
            text = executor.froms[state.shown] = f"FROM {plan.base_image}"
            label = state.in_progress
            executor.sink.step(
                StepEvent(state.shown, 1, state.total, text, StepStatus.DONE, seconds, label=label)
            )
    executor.totals[state.shown] = state.total
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
                f"{instruction.location}: stage {state.in_errors}: {one_line(instruction)}: {err}",
                err.output_tail,
            ) from err
        except LaminaError as err:
            raise BuildError(
                f"{instruction.location}: stage {state.in_errors}: {one_line(instruction)}: {err}"
            ) from err
        except OSError as err:
            # A full disk or a vanished file is still one line naming the step.
            step = f"{instruction.location}: stage {state.in_errors}: {one_line(instruction)}"
            if is_disk_full(err):
                raise BuildError(f"{step}: {DiskFull.writing(None, err)}") from err
            what = f"{err.filename}: " if err.filename else ""
            raise BuildError(f"{step}: {what}{err.strerror or err}") from err
    return state.outcome()


def _step_total(written: Sequence[Instruction], triggers: int) -> int:
    """The steps a stage's progress counts: its filesystem steps, and each of its base's ONBUILD
    triggers, whatever the instruction (BuildKit's initOnBuildTriggers adds them all)."""
    return sum(1 for i in written if i.name in FILESYSTEM_STEPS) + triggers


def _label(executor: StepHost, plan: PlannedStage) -> str:
    """Progress names the platform of a stage in a multi-platform build, or of one built for
    another platform than the host's, as BuildKit does: `linux/arm64 build`."""
    from lamina.engine.plan import format_all
    from lamina.oci.image import host_platform

    platform = plan.stage_platform
    if len(executor.options.platforms) > 1 or platform != host_platform():
        return f"{format_all(platform)} {plan.display_name}"
    return ""


def dispatch(executor: StepHost, state: StageState, plan: PlannedStage, instruction: Instruction) -> None:
    """One instruction of a stage. About 60 lines on purpose: a table, one short branch per
    instruction (the metadata ones inline, RUN and COPY/ADD handed to their modules)."""
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
        from lamina.engine.steps.copyadd.step import copy_step

        copy_step(executor, state, plan, instruction.expand(expand))
    elif isinstance(instruction, ins.FromInstruction):
        raise BuildError("FROM inside a stage")  # parse_stages never gives one
    else:
        raise BuildError(f"{instruction.name} is not supported")


def _arg(executor: StepHost, state: StageState, instruction: Any, expand: Callable[[str], str]) -> None:
    pairs: list[tuple[str, str | None]] = []
    for decl in instruction.args:
        value = executor.plan.resolve_arg(decl, expand)
        # A redeclared ARG keeps its first place with its new value, as BuildKit's
        # runCommandString lists d.buildArgs in the RUN's history (`|2 foo=bar2 bar=123`).
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


def _workdir(executor: StepHost, state: StageState, instruction: Any) -> None:
    from lamina.engine.cachekey import make_inputs
    from lamina.engine.steps.layerview import LayerView

    workdir = md.resolve_workdir(state.config.config.working_dir, instruction.path)
    directory = md.clean_path(workdir)  # the config keeps `/app/` as written; the directory is /app
    if directory == "/":
        state.config = md.apply_workdir(state.config, workdir, executor.created(state), has_layer=False)
        return
    user = state.config.config.user
    inputs = make_inputs(state.key, f"WORKDIR {workdir}", {"user": user} if user else {}, state.platform)

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
