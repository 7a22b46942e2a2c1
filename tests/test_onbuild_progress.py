"""A base's ONBUILD triggers in progress output: named as BuildKit names their steps
(dockerfile2llb prefixCommand puts `ONBUILD ` after the step number)."""

from __future__ import annotations

from pathlib import Path

from tests.support.build import BASE, run_cli, write_context

DOCKERFILE = f"""\
FROM {BASE} AS parent
ONBUILD RUN echo triggered > /onbuild
ONBUILD COPY marker.txt /marker.txt

FROM parent
RUN cat /onbuild > /seen
"""


def test_trigger_steps_are_labelled_onbuild_as_buildkit_does(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", DOCKERFILE, {"marker.txt": "m\n"})
    args = ("build", "--progress", "plain", "-o", f"type=local,dest={tmp_path / 'out'}", str(ctx))
    first = run_cli(*args, cache=cache).stderr
    assert "[stage-1 1/3] ONBUILD RUN echo triggered > /onbuild" in first, first
    assert "[stage-1 2/3] ONBUILD COPY marker.txt /marker.txt" in first, first
    assert "[stage-1 3/3] RUN cat /onbuild > /seen" in first, first
    assert "ONBUILD ONBUILD" not in first
    # Cached, and replayed from the build memo: the same names.
    again = run_cli(*args, cache=cache).stderr
    assert "[stage-1 1/3] ONBUILD RUN echo triggered > /onbuild" in again, again
    assert (tmp_path / "out" / "seen").read_text() == "triggered\n"


def test_every_trigger_counts_in_the_total_as_buildkit_counts(cache: Path, tmp_path: Path) -> None:
    # initOnBuildTriggers adds every trigger to cmdTotal, an ENV as much as a RUN; only the
    # steps that make a vertex get a number.
    text = f"FROM {BASE} AS parent\nONBUILD ENV X=1\nONBUILD RUN echo $X > /x\n\nFROM parent\nRUN cat /x\n"
    ctx = write_context(tmp_path / "ctx", text)
    err = run_cli("build", "--progress", "plain", str(ctx), cache=cache).stderr
    assert "[stage-1 1/3] ONBUILD RUN echo $X > /x" in err, err
    assert "[stage-1 2/3] RUN cat /x" in err, err


def test_a_failing_trigger_is_located_at_the_from_that_ran_it(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS parent\nONBUILD RUN exit 3\n\nFROM parent\nRUN true\n"
    ctx = write_context(tmp_path / "ctx", text)
    done = run_cli("build", "--progress", "plain", str(ctx), cache=cache, check=False)
    assert done.returncode != 0
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    # Located at the FROM that ran it, as BuildKit locates a trigger (not line 1 of its text).
    assert error.startswith(f"error: {ctx / 'Dockerfile'}:4: stage stage-1: "), done.stderr
    assert "[stage-1 1/2] ONBUILD RUN exit 3  ERROR" in done.stderr
