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
