"""The walk over the lists: nothing lamina accepts goes without a test, nothing else is accepted.

Two lists are walked (tests/feature_lists/features.py reads them):
- buildx's `build` flags (tests/feature_lists/buildx_build_flags.tsv, from its docs), plus
  every flag lamina's own `build` has;
- the Dockerfile feature table in ../shared/conformance/FEATURES.md: parser directives,
  instructions and their flags, `RUN --mount` types and options, BuildKit's build args.

For each, lamina either implements it, and tests/feature_lists/coverage.tsv names the test
that shows it, or refuses it with a one-line error naming it: click's usage error (exit
status 2) for a flag, `Dockerfile:LINE: unknown flag: --x` for an instruction flag, the
mount's key for a mount option. A new flag or option added to lamina without a line in
coverage.tsv fails here, and so does a line naming a test that does not exist.

The tests after the walk cover what no other test did when the walk was written.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from functools import cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "feature_lists"))

import features

from lamina.errors import LaminaError

TESTS = Path(__file__).parent
COVERAGE = features.coverage()


@cache
def _test_names(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _assert_covered(key: str) -> None:
    test = COVERAGE.get(key)
    assert test is not None, (
        f"lamina accepts {key!r} but tests/feature_lists/coverage.tsv names no test showing it is"
        " honoured: add the test's line there, or refuse it with a one-line error"
    )
    path, _, name = test.partition("::")
    assert (TESTS.parent / path).is_file(), f"coverage.tsv: {key}: no file {path}"
    if name:
        assert name in _test_names(TESTS.parent / path), f"coverage.tsv: {key}: {path} has no {name}"


def _build_options() -> dict[str, object]:
    from lamina.cli import cli

    command = cli.commands["build"]
    return {opt: param for param in command.params for opt in param.opts if opt.startswith("-")}


BUILDX_FLAGS = features.buildx_flags()


@pytest.mark.parametrize("flag", BUILDX_FLAGS, ids=lambda f: f.long)
def test_buildx_flag_is_honoured_or_refused(flag: features.Flag, tmp_path: Path) -> None:
    options = _build_options()
    accepted = [name for name in flag.names if name in options]
    if accepted:
        # Every spelling buildx has that lamina takes is the same option.
        assert len({id(options[name]) for name in accepted}) == 1
        _assert_covered(flag.long)
        return
    from click.testing import CliRunner

    from lamina.cli import cli

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    args = [flag.long] if flag.type == "bool" else [f"{flag.long}=x"]
    result = CliRunner().invoke(
        cli, ["build", *args, str(tmp_path)], env={"LAMINA_CACHE": str(tmp_path / "c")}
    )
    assert result.exit_code == 2, result.output  # a usage error, before anything is read
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No such option" in lines[0] and flag.long in lines[0], result.stderr


def test_lamina_own_build_flags_are_covered() -> None:
    """A flag of lamina's `build` that buildx does not have needs its test too."""
    buildx = {name for flag in BUILDX_FLAGS for name in flag.names}
    own = sorted({param.opts[-1] for param in _build_options().values()} - buildx)  # type: ignore[attr-defined]
    missing = [name for name in own if name not in COVERAGE]
    assert not missing, f"lamina build flags with no test in coverage.tsv: {missing}"


def test_coverage_names_only_what_lamina_accepts() -> None:
    options = _build_options()
    stale = [key for key in COVERAGE if key.startswith("-") and key not in options]
    assert not stale, f"coverage.tsv names flags lamina refuses: {stale}"
    if features.FEATURES_MD.is_file():
        keys = {f.key for f in features.dockerfile_features()}
        unknown = [key for key in COVERAGE if not key.startswith("-") and key not in keys]
        assert not unknown, f"coverage.tsv names features not in the lists: {unknown}"
    for key in COVERAGE:
        _assert_covered(key)


# --- the Dockerfile feature table ------------------------------------------------------------

SAMPLES = {
    "FROM": "FROM {flag} scratch",
    "RUN": "RUN {flag} true",
    "ADD": "ADD {flag} a /b",
    "COPY": "COPY {flag} a /b",
    "HEALTHCHECK": "HEALTHCHECK {flag} CMD true",
}


def _instruction_error(line: str) -> LaminaError | None:
    from lamina.engine.dockerfile.instructions import parse_instruction
    from lamina.engine.dockerfile.parser import parse

    node = parse(f"FROM scratch\n{line}\n").children[-1]
    try:
        parse_instruction(node, "Dockerfile")
    except LaminaError as err:
        return err
    return None


REFUSED = ("unknown flag", "unexpected key", "unsupported mount type", "not supported")
BOOLEAN_KEYS = ("ro", "readonly", "rw", "readwrite", "required")


def _refusal(feature: features.Feature) -> LaminaError | None:
    """The one-line error lamina gives for the feature, None when it takes it."""
    error = None
    if feature.kind == "flag":
        error = _instruction_error(SAMPLES[feature.instruction].format(flag=f"{feature.flag}=x"))
    elif feature.kind in ("mount-type", "mount-option"):
        value = "true" if feature.option in BOOLEAN_KEYS else "x"
        option = f",{feature.option}={value}" if feature.option else ""
        error = _instruction_error(f"RUN --mount=type={feature.mount_type},target=/t{option} true")
    elif feature.kind == "build-arg":
        from lamina.engine.buildchecks import refuse_unsupported_build_args

        value = "docker/dockerfile:1" if feature.option == "BUILDKIT_SYNTAX" else "1"
        try:
            refuse_unsupported_build_args({feature.option: value})
        except LaminaError as err:
            error = err
    return error if error is not None and any(r in str(error) for r in REFUSED) else None


DOCKERFILE_FEATURES = features.dockerfile_features() if features.FEATURES_MD.is_file() else []


@pytest.mark.skipif(not features.FEATURES_MD.is_file(), reason="../shared/conformance is not present")
@pytest.mark.parametrize("feature", DOCKERFILE_FEATURES, ids=lambda f: f.key)
def test_dockerfile_feature_is_honoured_or_refused(feature: features.Feature) -> None:
    error = _refusal(feature)
    if error is None:
        _assert_covered(feature.key)
        return
    assert feature.key not in COVERAGE, f"coverage.tsv names {feature.key!r}, which lamina refuses: {error}"
    text = str(error)
    assert "\n" not in text
    if feature.kind == "build-arg":
        assert text.startswith(f"--build-arg {feature.option}=")
    else:
        assert text.startswith("Dockerfile:2: ")
        assert (feature.flag or feature.option or feature.mount_type) in text.replace(
            "readonly", "ro readonly"
        )


@pytest.mark.parametrize(
    "instruction", ["FROM", "RUN", "CMD", "COPY", "ADD", "ENV", "WORKDIR", "ARG", "EXPOSE"]
)
def test_an_unknown_instruction_flag_is_refused_on_its_line(instruction: str) -> None:
    """Any flag outside the table, `RUN --foo` and the like, is refused with file:line, never skipped."""
    line = SAMPLES.get(instruction, instruction + " {flag} a=b").format(flag="--foo=1")
    error = _instruction_error(line)
    assert error is not None
    assert str(error).startswith("Dockerfile:2: unknown flag: --foo")
    assert "\n" not in str(error)


def test_a_malformed_run_device_is_refused_on_its_line() -> None:
    """RUN --device is read as BuildKit's ParseDevice reads it (engine.cdi gives the device)."""
    error = _instruction_error("RUN --device=nvidia.com/gpu=all,requird=true true")
    assert str(error) == ("Dockerfile:2: unexpected key 'requird' in 'requird=true' (did you mean required?)")


# --- what the walk found without a test -------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("type=bind,dst=/t,src=s,readwrite", "type=bind,target=/t,source=s,rw"),
        ("type=bind,destination=/t", "type=bind,target=/t"),
        ("type=cache,dst=/t,id=c", "type=cache,target=/t,id=c"),
        ("type=cache,destination=/t,readwrite", "type=cache,target=/t"),
        ("type=tmpfs,dst=/t,size=1m", "type=tmpfs,target=/t,size=1m"),
        ("type=tmpfs,destination=/t", "type=tmpfs,target=/t"),
        ("type=secret,id=s,dst=/t", "type=secret,id=s,target=/t"),
        ("type=secret,id=s,destination=/t", "type=secret,id=s,target=/t"),
        ("type=ssh,dst=/t", "type=ssh,target=/t"),
        ("type=ssh,destination=/t", "type=ssh,target=/t"),
    ],
)
def test_mount_key_aliases_mean_the_same(alias: str, canonical: str) -> None:
    """BuildKit's aliases (dst, destination, src, readwrite, readonly) mount exactly what the key does."""
    from lamina.engine.dockerfile.instructions import parse_mount

    assert parse_mount(alias) == parse_mount(canonical)
    assert parse_mount(alias) != parse_mount(canonical.replace("/t", "/u"))


def test_healthcheck_start_interval_reaches_the_config(tmp_path: Path) -> None:
    from lamina import api

    (tmp_path / "Dockerfile").write_text(
        'FROM scratch\nHEALTHCHECK --interval=5s --start-interval=2s --start-period=10s CMD ["/probe"]\n'
    )
    result = api.build(tmp_path, cache_dir=tmp_path / "cache", environ={})
    check = result.config.config.healthcheck
    assert check is not None
    assert (check.start_interval, check.start_period, check.interval) == (2 * 10**9, 10 * 10**9, 5 * 10**9)
    assert check.test == ("CMD", "/probe")


def test_buildkit_build_args_lamina_cannot_honour_fail_the_build(tmp_path: Path) -> None:
    from lamina import api

    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY Dockerfile /\n")
    with pytest.raises(LaminaError) as caught:
        api.build(
            tmp_path,
            cache_dir=tmp_path / "cache",
            build_args={"BUILDKIT_SYNTAX": "example.com/frontend:1"},
            environ={},
        )
    assert str(caught.value).startswith("--build-arg BUILDKIT_SYNTAX=example.com/frontend:1: ")


def test_buildkit_syntax_build_arg_as_the_directive(tmp_path: Path) -> None:
    """BUILDKIT_SYNTAX stands for `# syntax=`: docker/dockerfile builds, any other front end is refused."""
    from lamina import api

    (tmp_path / "Dockerfile").write_text("# syntax=example.com/other:1\nFROM scratch\nCOPY Dockerfile /\n")
    with pytest.raises(LaminaError, match="cannot run another frontend image"):
        api.build(tmp_path, cache_dir=tmp_path / "cache", environ={})
    # The build arg wins over the directive, as in BuildKit's dockerui.
    args = {"BUILDKIT_SYNTAX": "docker/dockerfile:1.7"}
    result = api.build(tmp_path, cache_dir=tmp_path / "cache", build_args=args, environ={})
    assert result.image_digest.startswith("sha256:")
    (tmp_path / "Dockerfile").write_text("# syntax=docker/dockerfile:1\nFROM scratch\nCOPY Dockerfile /\n")
    other = {"BUILDKIT_SYNTAX": "example.com/other:1"}
    with pytest.raises(
        LaminaError, match=r"BUILDKIT_SYNTAX=example\.com/other:1: lamina builds with its own"
    ):
        api.build(tmp_path, cache_dir=tmp_path / "cache", build_args=other, environ={})


# --- with a sandbox -------------------------------------------------------------------------------


def _has_id_range() -> bool:
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    return detect_ids().mode is IdMode.SUBORDINATE or os.geteuid() == 0


@pytest.mark.sandbox
def test_secret_file_mode_and_owner(cache: Path, tmp_path: Path) -> None:
    from tests.support.build import BASE, rootfs, write_context

    text = (
        f"FROM {BASE}\n"
        "RUN --mount=type=secret,id=s,mode=0440,uid=7,gid=8 stat -c '%a %u %g' /run/secrets/s > /stat\n"
        "RUN --mount=type=secret,id=s stat -c '%a %u %g' /run/secrets/s > /default\n"
    )
    ctx = write_context(tmp_path / "ctx", text)
    (tmp_path / "s.txt").write_text("value")
    rootfs(cache, ctx, tmp_path / "out", secrets=[f"id=s,src={tmp_path / 's.txt'}"])
    mode, uid, gid = (tmp_path / "out" / "stat").read_text().split()
    assert mode == "440"
    assert (tmp_path / "out" / "default").read_text().split() == ["400", "0", "0"]
    if _has_id_range():
        assert (uid, gid) == ("7", "8")


@pytest.mark.sandbox
def test_required_secret_missing_fails_in_one_line(cache: Path, tmp_path: Path) -> None:
    from tests.support.build import BASE, rootfs, write_context

    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --mount=type=secret,id=absent,required true\n")
    with pytest.raises(LaminaError) as caught:
        rootfs(cache, ctx, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert "absent" in str(caught.value)
    # Not required: the mount is left out, as BuildKit does.
    ctx = write_context(
        tmp_path / "ctx2", f"FROM {BASE}\nRUN --mount=type=secret,id=absent test ! -e /run/secrets/absent\n"
    )
    rootfs(cache, ctx, tmp_path / "out2")


@pytest.mark.sandbox
def test_add_link_writes_an_independent_layer(cache: Path, tmp_path: Path) -> None:
    """ADD --link, as COPY --link: a symlink of the stage below is not followed into its target."""
    from tests.support.build import BASE, rootfs, write_context

    text = f"FROM {BASE}\nRUN mkdir /real && ln -s /real /d\nADD --link f.txt /d/f.txt\nADD g.txt /d/g.txt\n"
    ctx = write_context(tmp_path / "ctx", text, {"f.txt": "f\n", "g.txt": "g\n"})
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert not (out / "real" / "f.txt").exists()
    assert (out / "d" / "f.txt").read_text() == "f\n"


def test_buildkit_inline_cache_build_arg_writes_the_inline_cache(tmp_path: Path) -> None:
    """--build-arg BUILDKIT_INLINE_CACHE=1 is --cache-to type=inline, as in BuildKit."""
    from lamina import api
    from lamina.cache.store import Store
    from lamina.oci.digest import Digest
    from lamina.oci.image import Manifest

    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY Dockerfile /\n")

    def inline_entries(build_args: dict[str, str], cache: str) -> object:
        result = api.build(tmp_path, cache_dir=tmp_path / cache, build_args=build_args, environ={})
        with Store(tmp_path / cache) as store:
            manifest = Manifest.from_bytes(store.read_blob(Digest.parse(result.image_digest), 1 << 20))
            config = json.loads(store.read_blob(manifest.config.digest, 1 << 20))
        return config.get("dev.lamina.cache.v1")

    assert inline_entries({"BUILDKIT_INLINE_CACHE": "1"}, "a") is not None
    assert inline_entries({"BUILDKIT_INLINE_CACHE": "0"}, "b") is None


@pytest.mark.sandbox
def test_a_mount_without_a_target_is_mounted_at_the_workdir(cache: Path, tmp_path: Path) -> None:
    """BuildKit's own Dockerfiles (`RUN --mount=from=binaries`, `--mount=type=bind xx-go build .`):
    no target is WORKDIR, a relative one is under it; only `/` is refused."""
    from tests.support.build import BASE, rootfs, write_context

    text = (
        f"FROM {BASE} AS bin\n"
        "RUN mkdir /out && echo hi > /out/x\n"
        f"FROM {BASE}\n"
        "WORKDIR /w\n"
        "RUN --mount=from=bin,source=/out cat /w/x > /at-workdir\n"
        "RUN --mount=type=bind,from=bin,source=/out,target=sub cat /w/sub/x > /relative\n"
        "RUN --mount=type=cache sh -c 'echo kept > /w/c; cat /w/c > /cached'\n"
        "RUN --mount=type=tmpfs sh -c 'mount | grep -q \" /w \" && echo tmpfs > /tmpfs'\n"
    )
    out = tmp_path / "out"
    rootfs(cache, write_context(tmp_path / "ctx", text), out)
    assert (out / "at-workdir").read_text() == "hi\n"
    assert (out / "relative").read_text() == "hi\n"
    assert (out / "cached").read_text() == "kept\n"
    assert (out / "tmpfs").read_text() == "tmpfs\n"
    assert not (out / "w" / "x").exists() and not (out / "w" / "c").exists()  # mounts reach no layer

    root = write_context(tmp_path / "ctx2", f"FROM {BASE}\nRUN --mount=type=bind,target=/ true\n")
    with pytest.raises(LaminaError, match=r'Dockerfile:2: invalid mount target "/"'):
        rootfs(cache, root, tmp_path / "out2")
