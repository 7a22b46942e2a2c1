"""The build plan: stage graph, ARG scoping, target pruning, waves, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamina import api
from lamina.cli import cli
from lamina.engine.dockerfile.instructions import ArgDecl
from lamina.engine.dockerfile.parser import parse
from lamina.engine.plan import (
    BaseKind,
    DependencyKind,
    Plan,
    make_plan,
    parse_build_args,
    to_dot,
    to_json,
)
from lamina.errors import DockerfileError, InstructionError, PlanError
from lamina.oci.image import Platform, host_platform

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "multistage"
AMD64 = Platform(architecture="amd64", os="linux")


def _plan(text: str, **kwargs: object) -> Plan:
    kwargs.setdefault("build_platform", AMD64)
    return make_plan(parse(text), **kwargs)  # type: ignore[arg-type]


def _names(plan: Plan, indices: tuple[int, ...]) -> list[str]:
    return [plan.stages[i].display_name for i in indices]


def test_default_target_is_last_stage_and_unreached_stages_are_skipped() -> None:
    plan = _plan("FROM a AS one\nFROM b AS two\nFROM c AS three\nCOPY --from=one /x /y\n")
    assert plan.target == 2
    assert _names(plan, plan.order) == ["one", "three"]
    assert _names(plan, plan.skipped) == ["two"]


def test_target_by_name_is_case_insensitive() -> None:
    plan = _plan("FROM a AS Builder\nFROM b\n", target="BUILDER")
    assert plan.target == 0 and plan.order == (0,) and plan.skipped == (1,)


def test_unknown_target_names_the_stages() -> None:
    with pytest.raises(PlanError, match=r"target stage 'nope' could not be found.*named stages: one"):
        _plan("FROM a AS one\nFROM b\n", target="nope")


def test_from_earlier_stage_by_name_any_case() -> None:
    plan = _plan("FROM busybox AS Base\nRUN x\nFROM BASE\n")
    base = plan.stages[1].base
    assert base.kind is BaseKind.STAGE and base.stage == 0
    assert plan.stages[1].dependencies[0].kind is DependencyKind.FROM


def test_from_later_stage_name_is_an_image() -> None:
    plan = _plan("FROM later\nFROM busybox AS later\n", target="0")
    assert plan.stages[0].base.kind is BaseKind.IMAGE and plan.stages[0].base.image == "later"


def test_scratch_base() -> None:
    assert _plan("FROM scratch\n").stages[0].base.kind is BaseKind.SCRATCH


def test_copy_from_index_name_and_image() -> None:
    plan = _plan(
        "FROM a AS first\nFROM b AS second\n"
        "FROM c\nCOPY --from=0 /a /a\nCOPY --from=SECOND /b /b\nCOPY --from=nginx:1.25 /c /c\n"
    )
    final = plan.stages[2]
    assert final.deps == (0, 1)
    assert final.images == ("nginx:1.25",)
    assert [d.kind for d in final.dependencies] == [DependencyKind.COPY_FROM] * 2
    assert plan.waves == ((0, 1), (2,))


def test_copy_from_a_later_stage_is_refused() -> None:
    """BuildKit's testOutOfOrderStage: stages are dispatched in file order."""
    with pytest.raises(
        PlanError, match="cannot copy from stage late, it needs to be defined before current stage 0"
    ):
        _plan("FROM a\nCOPY --from=late /x /x\nFROM b AS late\n", target="0")
    with pytest.raises(PlanError, match="needs to be defined before current stage"):
        _plan("FROM a\nCOPY --from=1 /x /x\nFROM b\n", target="0")
    _plan("FROM a\nCOPY --from=late /x /x\nFROM b AS late\nFROM c\n")  # unless the target never needs it


def test_run_mount_from_a_later_stage_is_a_dependency() -> None:
    plan = _plan("FROM a\nRUN --mount=from=late,target=/d true\nFROM b AS late\n", target="0")
    assert plan.order == (1, 0)


def test_run_mount_from_is_a_dependency() -> None:
    plan = _plan("FROM a AS deps\nFROM b\nRUN --mount=type=bind,from=deps,target=/d true\n")
    assert plan.stages[1].dependencies[0].kind is DependencyKind.MOUNT_FROM
    assert plan.order == (0, 1)


def test_targetstage_defaults_to_the_last_stage_name() -> None:
    """BuildKit's testTargetStageNameArg: --target, else the last stage's name, else default."""
    text = "FROM a AS base\nARG TARGETSTAGE\nFROM base AS {last}\nARG TARGETSTAGE\n"
    for last, target, want in (("final", None, "final"), ("final", "base", "base"), ("", None, "default")):
        dockerfile = text.format(last=last).replace(" AS \n", "\n")
        plan = _plan(dockerfile, target=target)
        stage = plan.stages[0 if target == "base" else 1]
        assert dict((kv.key, kv.value) for kv in stage.args) == {"TARGETSTAGE": want}


def test_copy_from_variable_is_refused() -> None:
    """BuildKit's testDockerfileCopyFromArgs: --from is not expanded, and says what to do instead."""
    with pytest.raises(
        InstructionError, match="variable expansion is not supported for --from, define a new stage"
    ):
        _plan("FROM a AS src\nFROM b\nARG FROM_STAGE=src\nCOPY --from=${FROM_STAGE} /x /x\n")


def test_copy_from_missing_index() -> None:
    with pytest.raises(PlanError, match="there is no stage 5"):
        _plan("FROM a\nCOPY --from=5 /x /x\n")


def test_self_dependency_and_cycles_are_errors() -> None:
    with pytest.raises(PlanError, match="cannot depend on itself"):
        _plan("FROM a AS x\nCOPY --from=x /a /a\n")
    with pytest.raises(PlanError, match="circular dependency between stages: a -> b -> a"):
        _plan("FROM x AS a\nCOPY --from=b /1 /1\nFROM y AS b\nCOPY --from=a /2 /2\n", target="a")


def test_bad_image_reference_is_located() -> None:
    with pytest.raises(DockerfileError, match="Dockerfile:1: FROM: invalid reference"):
        _plan("FROM UPPER CASE\n".replace(" CASE", ""))


def test_waves_group_independent_stages() -> None:
    plan = _plan("FROM a AS x\nFROM a AS y\nFROM x AS z\nFROM a\nCOPY --from=y /1 /1\nCOPY --from=z /2 /2\n")
    assert [_names(plan, w) for w in plan.waves] == [["x", "y"], ["z"], ["stage-3"]]
    assert plan.order == (0, 1, 2, 3)


# --- ARG scoping ----------------------------------------------------------------------


def test_global_args_expand_from_lines_only() -> None:
    plan = _plan("ARG IMG=busybox\nARG TAG=1.35\nFROM ${IMG}:${TAG}\nRUN echo $IMG\n")
    assert plan.stages[0].base.image == "busybox:1.35"
    assert plan.stages[0].args == ()  # not redeclared: invisible in the stage


def test_redeclared_global_arg_takes_global_value() -> None:
    plan = _plan("ARG V=1\nFROM a\nARG V\n", build_args={})
    assert plan.stages[0].args[0].value == "1"
    assert plan.resolve_arg(ArgDecl("V", None), lambda w: w) == "1"


def test_build_arg_overrides_global_and_stage_defaults() -> None:
    plan = _plan("ARG IMG=busybox\nFROM $IMG\nARG X=default\n", build_args={"IMG": "alpine", "X": "given"})
    assert plan.stages[0].base.image == "alpine"
    assert plan.stages[0].args[0].value == "given"
    assert plan.resolve_arg(ArgDecl("X", "default"), lambda w: w) == "given"
    assert plan.resolve_arg(ArgDecl("Y", "$Z"), lambda w: w.replace("$Z", "z")) == "z"


def test_global_args_see_earlier_global_args() -> None:
    plan = _plan("ARG A=x\nARG B=${A}y\nFROM ${B}\n")
    assert plan.stages[0].base.image == "xy"


def test_unused_build_args_warn_but_proxy_and_builtin_do_not() -> None:
    plan = _plan(
        "ARG USED=1\nFROM a\nFROM b\nARG ONLY_IN_SKIPPED\n",
        target="0",
        build_args={
            "USED": "2",
            "UNUSED": "3",
            "ONLY_IN_SKIPPED": "4",
            "HTTP_PROXY": "p",
            "BUILDKIT_INLINE_CACHE": "1",
        },
    )
    assert plan.warnings == (
        "build args not consumed by any stage the target needs: ONLY_IN_SKIPPED, UNUSED",
    )


def test_platform_args_come_from_the_host() -> None:
    plan = make_plan(parse("FROM --platform=$BUILDPLATFORM a\nARG TARGETARCH\n"))
    host = host_platform()
    assert plan.stages[0].platform == str(host)
    assert dict((kv.key, kv.value) for kv in plan.stages[0].args) == {"TARGETARCH": host.architecture}
    globals_ = dict(plan.global_args)
    assert globals_["BUILDOS"] == "linux" and globals_["TARGETPLATFORM"] == str(host)


def test_host_platform_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    # As BuildKit's TARGETPLATFORM: arm64 without its implied v8, arm with its variant.
    cases = (("aarch64", "linux/arm64"), ("x86_64", "linux/amd64"), ("armv7l", "linux/arm/v7"))
    for machine, expected in cases:
        monkeypatch.setattr("platform.machine", lambda m=machine: m)
        assert str(host_platform()) == expected


def test_parse_build_args() -> None:
    assert parse_build_args(["A=1", "B=", "C=x=y", "FROM_ENV", "MISSING"], {"FROM_ENV": "e"}) == {
        "A": "1",
        "B": "",
        "C": "x=y",
        "FROM_ENV": "e",
    }
    with pytest.raises(PlanError):
        parse_build_args(["=1"])


def test_unknown_instruction_fails_planning() -> None:
    with pytest.raises(DockerfileError, match="Dockerfile:2: unknown instruction: SET"):
        _plan("FROM a\nSET x\n")


# --- the example, the API and the CLI ----------------------------------------------------


def test_example_plan() -> None:
    plan = api.plan(EXAMPLE)
    assert plan.stages[plan.target].name is None
    assert _names(plan, plan.order) == ["build-app", "build-docs", "stage-3"]
    assert [_names(plan, w) for w in plan.waves] == [["build-app", "build-docs"], ["stage-3"]]
    assert _names(plan, plan.skipped) == ["test"]
    assert plan.stages[0].base.image == "lamina-test/busybox:1.35"
    assert plan.syntax == "docker/dockerfile:1"


def test_cli_plan_text_and_warning() -> None:
    result = CliRunner().invoke(cli, ["plan", "--target", "test", "--build-arg", "NOPE=1", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "run order: build-app -> test" in result.output
    assert "skipped: build-docs, stage-3" in result.output
    assert "warning: build args not consumed by any stage the target needs: NOPE" in result.output


def test_cli_plan_json_and_dot() -> None:
    result = CliRunner().invoke(cli, ["plan", "--format", "json", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["order"] == [0, 1, 3] and doc["skipped"] == [2]
    assert doc["stages"][3]["deps"] == [0, 1]
    dot = CliRunner().invoke(cli, ["plan", "--format", "dot", str(EXAMPLE)]).output
    assert dot.startswith("digraph stages {") and "s0 -> s3" in dot and "s1 -> s3" in dot


def test_cli_plan_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM a\nRUN x\n\nSET y\n")
    result = CliRunner().invoke(cli, ["plan", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == f"error: {tmp_path}/Dockerfile:4: unknown instruction: SET (did you mean USER?)\n"


def test_cli_plan_dash_f(tmp_path: Path) -> None:
    (tmp_path / "app.Dockerfile").write_text("FROM a AS x\nFROM b\n")
    result = CliRunner().invoke(
        cli, ["plan", "-f", str(tmp_path / "app.Dockerfile"), "--target", "x", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "target: x (stage 0)" in result.output


def test_json_and_dot_renderers_cover_images() -> None:
    plan = _plan("FROM a\nCOPY --from=nginx /x /y\n")
    assert to_json(plan)["stages"][0]["images"] == ["nginx"]  # type: ignore[index]
    assert '"nginx"' in to_dot(plan)


def test_proxy_args_are_available_without_declaration() -> None:
    plan = _plan("FROM a\nRUN env\n", build_args={"https_proxy": "http://p:3128", "X": "1"})
    assert [(kv.key, kv.value) for kv in plan.proxy_args] == [("https_proxy", "http://p:3128")]
    assert plan.warnings == ("build args not consumed by any stage the target needs: X",)
