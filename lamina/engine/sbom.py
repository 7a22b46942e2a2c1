"""`--sbom` / `--attest type=sbom`: an SBOM of the image, made by a generator image as BuildKit's.

The generator (`generator=REF`, else BuildKit's default docker/buildkit-syft-scanner:stable-1,
pulled as a base image is) runs once over the finished image: its ENTRYPOINT and CMD,
its ENV, WORKDIR, with the image's files read-only at `/run/src/core/sbom`
(`$BUILDKIT_SCAN_SOURCE`), an empty `/run/out` (`$BUILDKIT_SCAN_DESTINATION`), a
tmpfs `/tmp`, and every other attribute given as `$BUILDKIT_SCAN_<KEY>`. Each
`*.json` it leaves in /run/out is an in-toto statement whose predicate is attached
to the image (an attestation manifest in an index, as BuildKit's; a type=local or
type=tar output gets it as a file of the same name).

More sources, as BuildKit's dockerfile2llb picks them: where the target stage declares
`ARG BUILDKIT_SBOM_SCAN_CONTEXT` (globally or in the stage) true, or naming the stage,
the build context; and each stage the target is built from or copies from that declares
`ARG BUILDKIT_SBOM_SCAN_STAGE` so. They are mounted read-only under `/run/src/extras/`
as `sbom-context` and `sbom-<stage>`, and `$BUILDKIT_SCAN_SOURCE_EXTRAS` names that
directory. A `--build-arg` of either name counts only where the Dockerfile declares it.
FIXME: the context is mounted whole, its .dockerignore not applied (BuildKit's llb.Local
filters it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import BuildError, PlanError

if TYPE_CHECKING:
    from lamina.engine.model import StepHost

DEFAULT_GENERATOR = "docker/buildkit-syft-scanner:stable-1"
SOURCE = "/run/src/core/sbom"
DESTINATION = "/run/out/"
_MAX_STATEMENT = 64 << 20


def parse(text: str) -> tuple[tuple[str, str], ...] | None:
    """The `--sbom` value's attributes (`generator` first), or None when it turns SBOMs off."""
    value = text.strip()
    if value.lower() in ("false", "0", "f"):
        return None
    fields: dict[str, str] = {}
    if value.lower() not in ("true", "1", "t", ""):
        for field in value.split(","):
            key, _, val = field.partition("=")
            fields[key.strip()] = val
    fields.pop("type", None)  # --attest type=sbom,...
    if fields.pop("disabled", "").lower() in ("true", "1"):
        return None
    generator = fields.pop("generator", DEFAULT_GENERATOR)
    if not generator:
        raise PlanError("--sbom: sbom scanner cannot be empty")
    from lamina.oci.reference import parse_reference

    try:
        parse_reference(generator)
    except Exception as err:
        raise PlanError(f"--sbom: failed to parse sbom scanner {generator}: {err}") from None
    return (("generator", generator), *sorted(fields.items()))


SCAN_CONTEXT, SCAN_STAGE = "BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"
EXTRAS = "/run/src/extras"


def extras(host: StepHost, target: int) -> dict[str, Path]:
    """The more sources to scan for the target stage (name -> tree), as dockerfile2llb's SBOM extras."""
    plan = host.plan
    stage = plan.stages[target]
    found: dict[str, Path] = {}
    if _enabled(plan, stage, SCAN_CONTEXT):
        found["context"] = host.options.context
    seen: set[int] = set()
    todo = [target]
    while todo:  # the stages reachable from the target: its base chain and what it copies from
        index = todo.pop()
        if index in seen:
            continue
        seen.add(index)
        here = plan.stages[index]
        todo += [*here.deps, *([here.base_stage] if here.base_stage is not None else [])]
        if index != target and _enabled(plan, here, SCAN_STAGE):
            found[here.display_name] = host.stage_rootfs(host.outcome(index))
    return found


def _enabled(plan: Any, stage: Any, name: str) -> bool:
    """BuildKit's isEnabledForStage over the declared value: the stage's ARG, else the global one."""
    value = dict((kv.key, kv.value) for kv in stage.args).get(name, plan.global_args.get(name))
    if not value:  # undeclared, or declared without a value
        return False
    if value.lower() in ("1", "t", "true"):
        return True
    if value.lower() in ("0", "f", "false"):
        return False
    return (stage.name or "") in value.split(",")


def statements(
    host: StepHost, attrs: tuple[tuple[str, str], ...], rootfs: Path, more: dict[str, Path] | None = None
) -> list[Any]:
    """Run the generator over `rootfs` (and `more`, by name); its statements, as `imageexport.Statement`s."""
    from lamina.engine.imageexport import Statement
    from lamina.engine.sandbox.runner import run
    from lamina.engine.sandbox.spec import BindMount, Network, SandboxSpec, TmpfsMount
    from lamina.engine.steps.base import load_image

    fields = dict(attrs)
    generator = fields.pop("generator")
    scanner = load_image(host, generator, None)
    config = scanner.config.config
    argv = [*(config.entrypoint or ()), *(config.cmd or ())]
    if not argv:
        raise BuildError(f"--sbom: scanner {generator} does not have cmd")
    env = dict(entry.split("=", 1) for entry in config.env if "=" in entry)
    env.update({"BUILDKIT_SCAN_DESTINATION": DESTINATION, "BUILDKIT_SCAN_SOURCE": SOURCE})
    env.update({f"BUILDKIT_SCAN_{key}": value for key, value in fields.items()})
    more = more or {}
    if more:
        env["BUILDKIT_SCAN_SOURCE_EXTRAS"] = EXTRAS + "/"
    scratch = Path(tempfile.mkdtemp(prefix="sbom-", dir=host.store.root / "tmp"))
    try:
        out, upper = scratch / "out", scratch / "upper"
        out.mkdir()
        upper.mkdir()
        spec = SandboxSpec(
            argv=tuple(argv),
            lower_dirs=tuple(layer.path for layer in reversed(scanner.layers)),
            upper_dir=upper,
            env=tuple(env.items()),
            cwd=config.working_dir or "/",
            user=config.user,
            network=Network(host.options.network),
            mounts=(
                BindMount(rootfs, SOURCE),
                BindMount(out, DESTINATION.rstrip("/"), readonly=False),
                TmpfsMount("/tmp"),
                *(BindMount(tree, f"{EXTRAS}/sbom-{name}") for name, tree in sorted(more.items())),
            ),
            scratch_dir=scratch,
            isolation=host.options.isolation,
        )
        code = run(spec, on_warning=host.warn_once)
        if code != 0:
            raise BuildError(f"--sbom: generator {generator} exited with status {code}")
        return [_statement(path, Statement) for path in sorted(out.glob("*.json"))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _statement(path: Path, statement: Any) -> Any:
    if path.stat().st_size > _MAX_STATEMENT:
        raise BuildError(f"--sbom: {path.name}: larger than {_MAX_STATEMENT} bytes")
    try:
        body = json.loads(path.read_bytes())
    except ValueError as err:
        raise BuildError(f"--sbom: {path.name}: not an in-toto statement: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("predicateType"), str):
        raise BuildError(f"--sbom: {path.name}: an in-toto statement needs a predicateType")
    return statement(body["predicateType"], body.get("predicate") or {}, path.name)
