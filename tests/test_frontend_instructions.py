"""Typed instructions: flag validation (cases as data), values, expansion rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lamina.engine.dockerfile.instructions import (
    AddInstruction,
    ArgDecl,
    CopyInstruction,
    EnvInstruction,
    ExposeInstruction,
    HealthcheckInstruction,
    KeyValue,
    LabelInstruction,
    MountType,
    OnbuildInstruction,
    RunInstruction,
    Sharing,
    SourceContent,
    parse_go_duration,
    parse_mount,
    parse_stages,
)
from lamina.engine.dockerfile.parser import parse
from lamina.engine.dockerfile.shell import expand_word
from lamina.errors import InstructionError

ERRORS_TSV = Path(__file__).with_name("frontend_instruction_errors.tsv")


def _error_rows() -> list[tuple[str, str, int, str]]:
    rows = []
    for line in ERRORS_TSV.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#") or line.startswith("id\t"):
            continue
        case_id, text, number, message = line.split("\t")
        rows.append((case_id, json.loads(text), int(number), message))
    return rows


@pytest.mark.parametrize(
    ("case_id", "text", "line", "message"),
    _error_rows(),
    ids=lambda v: v if isinstance(v, str) and "\n" not in v and " " not in v else "",
)
def test_instruction_error(case_id: str, text: str, line: int, message: str) -> None:
    with pytest.raises(InstructionError) as info:
        parse_stages(parse(text + "\n", "Dockerfile"))
    assert message in str(info.value)
    assert info.value.location is not None
    assert info.value.location.line == line
    assert str(info.value).startswith(f"Dockerfile:{line}: " if line else "Dockerfile: ")


def _only(text: str, index: int = 0) -> object:
    stages = parse_stages(parse("FROM base\n" + text))
    return stages.stages[0].instructions[index]


def test_env_keeps_order_and_both_forms() -> None:
    env = _only('ENV b=2 a="x y"')
    assert isinstance(env, EnvInstruction)
    assert env.env == (KeyValue("b", "2"), KeyValue("a", '"x y"'))
    legacy = _only("ENV PATH /a b")
    assert isinstance(legacy, EnvInstruction) and legacy.env == (KeyValue("PATH", "/a b"),)


def test_env_values_see_only_the_environment_before_the_instruction() -> None:
    env = _only("ENV abc=bye def=$abc")
    assert isinstance(env, EnvInstruction)
    before = {"abc": "hi"}
    expanded = env.expand(lambda w: expand_word(w, before))
    assert expanded.env == (KeyValue("abc", "bye"), KeyValue("def", "hi"))


def test_label_values_lose_their_quotes_when_expanded() -> None:
    label = _only('LABEL "com.x"="a b" v=$V')
    assert isinstance(label, LabelInstruction)
    assert label.expand(lambda w: expand_word(w, {"V": "1"})).labels == (
        KeyValue("com.x", "a b"),
        KeyValue("v", "1"),
    )


def test_run_is_never_expanded() -> None:
    run = _only("RUN --mount=type=cache,target=$DIR echo $HOME")
    assert isinstance(run, RunInstruction)
    expanded = run.expand(lambda w: expand_word(w, {"DIR": "/cache", "HOME": "/root"}))
    assert expanded.command == ("echo $HOME",)
    assert expanded.mounts[0].target == "/cache"


def test_run_exec_and_shell_forms() -> None:
    run = _only('RUN ["echo", "$HOME"]')
    assert isinstance(run, RunInstruction) and run.exec_form and run.command == ("echo", "$HOME")
    shell = _only("RUN echo a &&   b")
    assert isinstance(shell, RunInstruction) and not shell.exec_form and shell.command == ("echo a &&   b",)


def test_run_heredoc_is_kept() -> None:
    run = _only("RUN <<EOF\necho hi\nEOF")
    assert isinstance(run, RunInstruction) and run.heredocs[0].content == "echo hi\n"


def test_copy_flags_and_heredoc_sources() -> None:
    copy = _only(
        "COPY --from=build --chown=1:2 --chmod=0755 --link --parents --exclude=*.o --exclude=x"
        " a <<EOF /d/\nbody\nEOF"
    )
    assert isinstance(copy, CopyInstruction)
    assert copy.from_ == "build" and copy.chown == "1:2" and copy.chmod == "0755"
    assert copy.link and copy.parents and copy.excludes == ("*.o", "x")
    assert copy.sources == ("a",) and copy.dest == "/d/"
    assert copy.contents == (SourceContent(path="EOF", data="body\n", expand=True),)


def test_copy_json_form_has_no_heredocs() -> None:
    copy = _only('COPY ["<<EOF", "/d"]')
    assert isinstance(copy, CopyInstruction) and copy.sources == ("<<EOF",) and copy.contents == ()


def test_copy_symbolic_chmod_and_variable_chmod_checked_after_expansion() -> None:
    assert isinstance(_only("COPY --chmod=u+x,g-w a b"), CopyInstruction)
    copy = _only("COPY --chmod=$MODE a b")
    assert isinstance(copy, CopyInstruction)
    with pytest.raises(InstructionError, match="invalid chmod"):
        copy.expand(lambda w: expand_word(w, {"MODE": "888"}))


def test_add_flags() -> None:
    add = _only("ADD --keep-git-dir --checksum=sha256:ab --unpack=false --link=TRUE https://x/y.tar /y")
    assert isinstance(add, AddInstruction)
    assert add.keep_git_dir and add.link and add.unpack is False and add.checksum == "sha256:ab"


def test_healthcheck_values() -> None:
    health = _only("HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=0s --retries=3 CMD curl -f x")
    assert isinstance(health, HealthcheckInstruction)
    assert health.test == ("CMD-SHELL", "curl -f x")
    assert (health.interval, health.timeout, health.start_period, health.retries) == (
        90 * 10**9,
        5 * 10**8,
        0,
        3,
    )
    assert isinstance(none := _only("HEALTHCHECK NONE"), HealthcheckInstruction) and none.test == ("NONE",)
    exec_form = _only('HEALTHCHECK CMD ["a", "b"]')
    assert isinstance(exec_form, HealthcheckInstruction) and exec_form.test == ("CMD", "a", "b")


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("0", 0),
        ("1s", 10**9),
        ("1.5h", 5400 * 10**9),
        ("1m30s", 90 * 10**9),
        ("300ms", 3 * 10**8),
        ("2us", 2000),
    ],
)
def test_go_durations(text: str, nanoseconds: int) -> None:
    assert parse_go_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1.s.", "--1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_mount_defaults_per_type() -> None:
    bind = parse_mount("target=/src")
    assert bind.type is MountType.BIND and bind.read_only
    assert not parse_mount("target=/src,rw").read_only
    cache = parse_mount("type=cache,target=/root/.cache,sharing=locked,mode=0700,uid=1000")
    assert (cache.id, cache.sharing, cache.mode, cache.uid, cache.read_only) == (
        "/root/.cache",
        Sharing.LOCKED,
        0o700,
        1000,
        False,
    )
    secret = parse_mount("type=secret,id=token")
    assert (secret.target, secret.required) == ("/run/secrets/token", False)
    by_target = parse_mount("type=secret,target=/etc/key,required")
    assert (by_target.id, by_target.required) == ("key", True)
    assert parse_mount("type=secret,id=t,env=TOKEN").target == ""
    assert parse_mount("type=ssh").id == "default"
    assert parse_mount("type=tmpfs,dst=/t,size=64m").size == 64 * 1024 * 1024
    assert parse_mount("type=tmpfs,dst=/t,ro").read_only and not parse_mount("type=tmpfs,dst=/t").read_only
    assert parse_mount("type=bind,from=build,source=/out,target=/in").from_ == "build"


def test_secret_mount_source_is_its_id() -> None:
    """BuildKit's dispatchSecret: `source`/`src` names the secret (was: an unexpected key); the
    default target is /run/secrets/ and the id's last element (path.Base)."""
    assert (parse_mount("type=secret,src=npmrc").id, parse_mount("type=secret,src=npmrc").target) == (
        "npmrc",
        "/run/secrets/npmrc",
    )
    assert parse_mount("type=secret,source=ci/token").target == "/run/secrets/token"
    assert parse_mount("type=secret,id=ci/token").target == "/run/secrets/token"
    with pytest.raises(InstructionError, match="both source and id can't be set"):
        parse_mount("type=secret,id=a,source=b")


@pytest.mark.parametrize(
    ("spec", "inert"),
    [
        ("type=bind,target=/m", ",id=x,env=E"),
        ("type=cache,target=/c", ",env=E"),
        ("type=tmpfs,target=/t", ",id=x,env=E,source=s"),
        ("type=secret,id=s", ",ro"),
        ("type=secret,id=s", ",readwrite=true"),
        ("type=ssh", ",rw,env=E"),
    ],
)
def test_mount_keys_buildkit_takes_and_never_reads_change_nothing(spec: str, inert: str) -> None:
    """BuildKit's parseMount takes every key for every type; those its dispatch never reads for
    that type (an id on a bind, ro on a secret, which is read-only anyway) build the same here
    (was: refused as unexpected keys). A key with an effect elsewhere is still refused."""
    assert parse_mount(spec + inert) == parse_mount(spec)


def test_mount_keys_with_an_effect_buildkit_gives_are_still_refused() -> None:
    with pytest.raises(InstructionError, match="unexpected key 'from' for mount type 'tmpfs'"):
        parse_mount("type=tmpfs,target=/t,from=stage")  # BuildKit resolves that stage first
    with pytest.raises(InstructionError, match="expecting true or false"):
        parse_mount("type=secret,id=s,ro=maybe")


def test_mount_type_from_a_variable_is_expanded() -> None:
    """BuildKit's testMountArg: every --mount value is expanded, `type` too; parsing waits for the values."""
    assert parse_mount("type=$MNT_TYPE,target=/c").type is MountType.BIND  # a placeholder until expanded
    env = {"MNT_TYPE": "cache", "ID": "mine"}
    mount = parse_mount("type=$MNT_TYPE,id=${ID},target=/c", lambda word: expand_word(word, env))
    assert (mount.type, mount.id) == (MountType.CACHE, "mine")


def test_mount_from_a_variable_is_refused() -> None:
    """BuildKit's testMountFromError: `from` is a literal stage or image name."""
    with pytest.raises(InstructionError, match="'from' doesn't support variable expansion, define alias"):
        parse_mount("from=$ttt,type=cache,target=/tmp")


def test_onbuild_trigger_is_parsed_and_kept_as_written() -> None:
    onbuild = _only("ONBUILD COPY --from=x a b")
    assert isinstance(onbuild, OnbuildInstruction)
    assert onbuild.expression == "COPY --from=x a b"
    assert isinstance(onbuild.trigger, CopyInstruction) and onbuild.trigger.from_ == "x"


def test_onbuild_heredoc_trigger_keeps_its_body() -> None:
    """BuildKit's testOnBuildHeredoc: the trigger in the image parses again in the child."""
    onbuild = _only("ONBUILD RUN <<EOF\necho hi > /f\nEOF\n")
    assert isinstance(onbuild, OnbuildInstruction)
    assert onbuild.expression == "RUN <<EOF\necho hi > /f\nEOF"
    again = parse_stages(parse("FROM base\n" + onbuild.expression + "\n")).stages[0].instructions[0]
    assert isinstance(again, RunInstruction) and again.heredocs[0].content == "echo hi > /f\n"


def test_expose_expansion_can_split() -> None:
    expose = _only("EXPOSE $PORTS 53/udp")
    assert isinstance(expose, ExposeInstruction)
    assert expose.expand(lambda w: expand_word(w, {"PORTS": "80 443"})).ports == ("80", "443", "53/udp")


def test_stages_and_meta_args() -> None:
    parsed = parse_stages(parse("ARG A=1\nARG B\nFROM x AS One\nRUN a\nFROM one\nARG C=3\n"))
    assert [a.args for a in parsed.meta_args] == [(ArgDecl("A", "1"),), (ArgDecl("B", None),)]
    assert [(s.index, s.name, len(s.instructions)) for s in parsed.stages] == [(0, "one", 1), (1, None, 1)]
    assert parsed.stages[1].display_name() == "stage-1"
    assert all(i.location.path == "Dockerfile" for s in parsed.stages for i in s.instructions)
    assert type(parsed.stages[0].instructions[0]).__name__ == "RunInstruction"


def test_parse_trigger_from_base_image_config() -> None:
    from lamina.engine.dockerfile.instructions import parse_trigger
    from lamina.errors import Location

    where = Location("Dockerfile", 3)
    trigger = parse_trigger("COPY --from=x a b", where)
    assert isinstance(trigger, CopyInstruction) and trigger.location == where
    with pytest.raises(InstructionError, match="Dockerfile:3: ONBUILD trigger 'SET x': unknown instruction"):
        parse_trigger("SET x", where)
    with pytest.raises(InstructionError, match="FROM isn't allowed"):
        parse_trigger("FROM y", where)
