"""A failed RUN keeps its filesystem; `lamina debug ID` enters it with the step's env, workdir,
user and mounts; `lamina build --on-error=shell` does so at once; `lamina cache prune` drops them.

The shell is driven non-interactively: commands on its stdin, or `lamina debug ID CMD...`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE}
ENV STAGE_VAR=from-env
WORKDIR /work
RUN echo kept > /work/before
RUN --mount=type=bind,source=data,target=/data echo partial > /work/made && cat /data/in.txt && false
"""


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", DOCKERFILE, {"data/in.txt": "mounted input\n"})


def _failed_build(cache: Path, ctx: Path, *flags: str, stdin: str = "") -> tuple[str, str]:
    proc = run_cli("build", "--progress", "plain", *flags, str(ctx), cache=cache, check=False, input=stdin)
    assert proc.returncode == 1, proc.stderr
    found = re.search(r"^debug: (?:lamina debug |.*\()([0-9a-f]{12})", proc.stderr, re.M)
    assert found, proc.stderr
    return found.group(1), proc.stdout + proc.stderr


def test_a_failed_run_names_the_command_that_enters_what_it_left(cache: Path, ctx: Path) -> None:
    ident, output = _failed_build(cache, ctx)
    assert f"\ndebug: lamina debug {ident}  (a shell in the failed step's filesystem)\n" in output
    proc = run_cli("debug", ident, "--", "cat", "/work/made", "/work/before", "/data/in.txt", cache=cache)
    assert proc.stdout == "partial\nkept\nmounted input\n"
    # The step's env, workdir and a shell read from stdin, as `--on-error=shell` gets it.
    script = 'echo "$STAGE_VAR in $(pwd)"\nls /work\nexit 3\n'
    shell = run_cli("debug", "last", cache=cache, check=False, input=script)
    assert shell.returncode == 3
    assert shell.stdout == "from-env in /work\nbefore\nmade\n"
    # Nothing the debug shell changes is kept: the failure stays as the step left it.
    run_cli("debug", ident, "rm", "/work/made", cache=cache)
    assert run_cli("debug", ident, "cat", "/work/made", cache=cache).stdout == "partial\n"


def test_on_error_shell_opens_the_shell_at_once(cache: Path, ctx: Path) -> None:
    script = "cat /work/made\necho user=$(id -u)\n"
    ident, output = _failed_build(cache, ctx, "--on-error", "shell", stdin=script)
    assert "partial\nuser=0\n" in output
    assert "did not complete successfully: exit code 1" in output
    assert ident in run_cli("debug", cache=cache).stdout


def test_kept_failures_are_listed_and_pruned(cache: Path, ctx: Path) -> None:
    first, _ = _failed_build(cache, ctx)
    (ctx / "data/in.txt").write_text("other\n")
    second, _ = _failed_build(cache, ctx)
    listed = run_cli("debug", cache=cache).stdout.splitlines()
    assert [line.split()[0] for line in listed] == [first, second]
    assert "stage stage-0  line 5: RUN --mount=type=bind,source=data" in listed[0]
    assert "(2 kept for `lamina debug`)" in run_cli("cache", "du", cache=cache).stdout
    assert ", 2 kept failures; freed " in run_cli("cache", "prune", cache=cache).stdout
    none = run_cli("debug", cache=cache)
    assert none.stdout == "" and none.stderr.startswith("no failed step is kept")
    assert "kept for `lamina debug`" not in run_cli("cache", "du", cache=cache).stdout
    gone = run_cli("debug", first, "true", cache=cache, check=False)
    assert gone.returncode == 1
    assert "no failed step is kept" in gone.stderr
    assert not (cache / "failures").exists() or not any((cache / "failures").iterdir())


def test_at_most_five_failures_are_kept(cache: Path, ctx: Path) -> None:
    made = []
    for i in range(6):
        (ctx / "data/in.txt").write_text(f"{i}\n")
        made.append(_failed_build(cache, ctx)[0])
    listed = [line.split()[0] for line in run_cli("debug", cache=cache).stdout.splitlines()]
    assert listed == made[1:]


def test_secrets_are_not_kept_and_run_flags_are(cache: Path, tmp_path: Path) -> None:
    text = f'FROM {BASE}\nRUN --mount=type=secret,id=tok,env=TOK test -z "$TOK"\n'
    ctx = write_context(tmp_path / "secret", text)
    proc = run_cli(
        "build", "--secret", "id=tok,env=TOKEN_VALUE", "--add-host", "db.test:10.1.2.3", str(ctx),
        cache=cache, check=False, env={"TOKEN_VALUE": "s3cret"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    ident = re.search(r"^debug: lamina debug ([0-9a-f]{12})", proc.stderr, re.M).group(1)  # type: ignore[union-attr]
    kept = (cache / "failures" / ident / "failure.json").read_text()
    assert "s3cret" not in kept
    shell = run_cli("debug", ident, "sh", "-c", 'echo "${TOK:-unset}"; grep db.test /etc/hosts', cache=cache)
    assert shell.stdout.split() == ["unset", "10.1.2.3", "db.test"]
    assert "warning: debug " + ident + ": secret variable TOK is not kept, so it is not there" in shell.stderr


def test_a_mount_from_a_stage_is_kept_after_the_build_ends(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS build\nRUN mkdir /out && echo built > /out/x\n\n"
    text += f"FROM {BASE}\nRUN --mount=type=bind,from=build,source=/out,target=/in false\n"
    ctx = write_context(tmp_path / "stage", text)
    proc = run_cli("build", str(ctx), cache=cache, check=False)
    assert proc.returncode == 1, proc.stderr
    assert run_cli("debug", "last", "cat", "/in/x", cache=cache).stdout == "built\n"
