"""`lamina plan --cache` tells, for every step, whether it would hit and why not."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lamina import api
from lamina.cli import cli

DOCKERFILE = """\
FROM scratch AS files
COPY a.txt /a.txt
COPY b.txt /b.txt

FROM scratch
COPY --from=files /a.txt /out/a.txt
"""


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "a.txt").write_text("a\n")
    (context / "b.txt").write_text("b\n")
    return context


def _plan_cache(context: Path, cache: Path) -> str:
    result = CliRunner().invoke(cli, ["plan", "--cache", str(context)], env={"LAMINA_CACHE": str(cache)})
    assert result.exit_code == 0, result.output
    return result.output.split("\ncache:\n", 1)[1]


def test_plan_cache_names_the_step_whose_input_changed(tmp_path: Path) -> None:
    context, cache = _context(tmp_path), tmp_path / "cache"
    cold = _plan_cache(context, cache)
    assert cold.count("will run: first build of this step") == 2
    assert "will run: stage files will run first" in cold

    api.build(context, cache_dir=cache, tags=["plan-cache:1"])
    assert _plan_cache(context, cache).count("cached") == 3

    (context / "b.txt").write_text("changed\n")
    lines = _plan_cache(context, cache).splitlines()
    by_step = {line.split("]")[0] + "]": line for line in lines}
    assert by_step["[files 1]"].endswith("cached")
    assert by_step["[files 2]"].endswith("will run: file content changed: b.txt")
    # Whether the final stage's COPY --from hits depends on the files it selects
    # once `files` has run again: the forecast says so rather than guess.
    assert "will run: stage files will run first" in by_step["[stage-1 1]"]


def test_plan_without_cache_flag_reads_no_context(tmp_path: Path) -> None:
    context = _context(tmp_path)
    (context / "a.txt").chmod(0)  # hashing it would fail for a user; plan must not read it
    result = CliRunner().invoke(cli, ["plan", str(context)], env={"LAMINA_CACHE": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    assert "cache:" not in result.output


def test_plan_reads_stdin_and_remote_contexts_as_build_does(tmp_path: Path) -> None:
    """`lamina plan -` and `-f -` read the Dockerfile from stdin, and errors name it as the build
    does (was: 'cannot read Dockerfile -/Dockerfile'); --cache, which would read stdin again, is refused."""
    env = {"LAMINA_CACHE": str(tmp_path / "c")}
    result = CliRunner().invoke(cli, ["plan", "-"], input="FROM scratch AS a\nFROM a\n", env=env)
    assert result.exit_code == 0, result.output
    assert "target: stage-1 (stage 1)" in result.output
    result = CliRunner().invoke(
        cli, ["plan", "-f", "-", str(tmp_path)], input="FROM scratch\nFROOM x\n", env=env
    )
    assert result.exit_code == 1
    assert "Dockerfile:2: unknown instruction: FROOM" in result.output
    result = CliRunner().invoke(cli, ["plan", "--cache", "-"], input="FROM scratch\n", env=env)
    assert result.exit_code == 2
    assert "--cache needs a Dockerfile and context it can read again, not stdin" in result.output
