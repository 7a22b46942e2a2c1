"""`lamina diff`: the last two builds of a context (or two --metadata-file documents), step by step;
two images: config, layer by layer, file by file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.build import BASE, run_cli, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE} AS build
COPY src/ /src/
RUN cat /src/* > /all

FROM {BASE}
COPY --from=build /all /all
RUN echo done > /done
"""


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", DOCKERFILE, {"src/a.txt": "a\n", "src/b.txt": "b\n"})


def _normal(text: str) -> str:
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "TIME", text)
    return re.sub(r"sha256:[0-9a-f]{12}", "sha256:DIGEST", text)


def test_diff_names_each_step_that_ran_again_and_why(cache: Path, ctx: Path) -> None:
    one = run_cli("diff", str(ctx), cache=cache, check=False)
    assert one.returncode == 1
    assert "no build recorded yet; `lamina diff` compares the last two" in one.stderr
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    (ctx / "src/b.txt").write_text("B\n")
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    text = _normal(run_cli("diff", str(ctx), cache=cache).stdout)
    assert text.splitlines() == [
        "before: TIME  image sha256:DIGEST  (4 of 4 steps ran)",
        "after:  TIME  image sha256:DIGEST  (4 of 4 steps ran)",
        "[build 2] COPY src/ /src/                changed, ran: file content changed: src/b.txt",
        "[build 3] RUN cat /src/* > /all          changed, ran: the previous step changed: "
        "step 2 (COPY src/ /src/) ran",
        "[stage-1 2] COPY --from=build /all /all  changed, ran: stage build: file content changed: all",
        "[stage-1 3] RUN echo done > /done        changed, ran: the previous step changed: "
        "step 2 (COPY --from=build /all /all) ran",
    ]
    said = json.loads(run_cli("diff", "--format", "json", str(ctx), cache=cache).stdout)
    assert [(s["stage"], s["step"], s["change"], s["before"], s["after"]) for s in said["steps"]] == [
        ("build", 2, "changed", "run", "run"),
        ("build", 3, "changed", "run", "run"),
        ("stage-1", 2, "changed", "run", "run"),
        ("stage-1", 3, "changed", "run", "run"),
    ]
    assert said["before"]["ran"] == 4 and said["after"]["ran"] == 4

    # A no-op rebuild: every step unchanged and cached.
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    again = json.loads(run_cli("diff", "--format", "json", str(ctx), cache=cache).stdout)
    assert {(s["change"], s["after"]) for s in again["steps"]} == {("unchanged", "cached")}
    assert run_cli("diff", str(ctx), cache=cache).stdout.count("unchanged (cached)") == 4


def test_diff_of_two_metadata_files_and_a_changed_instruction(cache: Path, ctx: Path) -> None:
    old, new = ctx.parent / "old.json", ctx.parent / "new.json"
    run_cli("build", "--progress", "quiet", "--metadata-file", str(old), str(ctx), cache=cache)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("echo done", "echo finished"))
    run_cli("build", "--progress", "quiet", "--metadata-file", str(new), str(ctx), cache=cache)
    lines = run_cli("diff", str(old), str(new), cache=cache).stdout.splitlines()
    assert lines[2].endswith("unchanged (cached)")
    assert lines[-1] == (
        "[stage-1 3] RUN echo finished > /done    changed, ran: instruction was: RUN echo done > /done; "
        "instruction text changed (line 7: the command)"
    )
    history = json.loads(run_cli("diff", "--format", "json", str(ctx), cache=cache).stdout)
    assert [s["change"] for s in history["steps"]] == ["unchanged", "unchanged", "unchanged", "changed"]
    refused = run_cli("diff", str(old), cache=cache, check=False)
    assert refused.returncode == 1 and f"diff {old}: not a directory" in refused.stderr
    missing = run_cli("diff", str(old), str(old.parent / "missing.json"), cache=cache, check=False)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == f"error: diff {old.parent / 'missing.json'}: cannot read: No such file or directory"
    )
    gone = run_cli("diff", str(old.parent / "nonexistent"), cache=cache, check=False)
    assert gone.returncode == 1
    assert gone.stderr.strip() == f"error: diff {old.parent / 'nonexistent'}: no such build context directory"


def test_diff_of_two_images_config_layers_and_files(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE}\nCOPY src/ /src/\nRUN rm /bin/true && chmod 700 /src/b\nENV A=1\n"
    ctx = write_context(tmp_path / "img", text, {"src/a": "a\n", "src/b": "b\n", "src/gone": "x\n"})
    run_cli("build", "--progress", "quiet", "-t", "one:1", str(ctx), cache=cache)
    (ctx / "src/a").write_text("A2\n")
    (ctx / "src/c").write_text("c\n")
    (ctx / "src/gone").unlink()
    (ctx / "Dockerfile").write_text(text.replace("A=1", "A=2").replace("chmod 700", "chmod 750"))
    run_cli("build", "--progress", "quiet", "-t", "one:2", str(ctx), cache=cache)
    lines = _normal(run_cli("diff", "one:1", "one:2", cache=cache).stdout).splitlines()
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[2] == f'config: Env: ["PATH={path}", "A=1"] -> ["PATH={path}", "A=2"]'
    assert lines[3].startswith("layer 1: same  sha256:DIGEST ")
    assert lines[4] == (
        "layer 2: changed  sha256:DIGEST COPY src/ /src/ # buildkit  ->  "
        "sha256:DIGEST COPY src/ /src/ # buildkit"
    )
    assert lines[5].startswith("layer 3: changed  sha256:DIGEST RUN /bin/sh -c rm /bin/true && chmod 700")
    assert lines[6:] == [
        "changed  /src/a     content (2 -> 3 bytes), layer 2",
        "changed  /src/b     mode 700 -> 750, layer 3",
        "added    /src/c     file, layer 2",
        "removed  /src/gone  file, was in layer 2",
    ]
    said = json.loads(run_cli("diff", "--format", "json", "one:1", "one:2", cache=cache).stdout)
    assert [(f["path"], f["change"]) for f in said["files"]] == [
        ("src/a", "changed"),
        ("src/b", "changed"),
        ("src/c", "added"),
        ("src/gone", "removed"),
    ]
    assert [layer["change"] for layer in said["layers"]] == ["same", "changed", "changed"]
    # busybox's /bin/true, removed by a whiteout in layer 3 of both, is in neither.
    base = run_cli("diff", BASE, "one:2", cache=cache).stdout
    assert "removed  /bin/true" in base and "layer 2: only in b" in base


def test_build_name_build_arg_names_the_build_lamina_diff_shows(cache: Path, ctx: Path) -> None:
    """BUILDKIT_BUILD_NAME names a build as buildx history shows it; lamina's record of it is what
    `lamina diff` reads (was: the build arg refused)."""
    run_cli(
        "build", "--progress", "quiet", "--build-arg", "BUILDKIT_BUILD_NAME=nightly", str(ctx), cache=cache
    )
    (ctx / "src/a.txt").write_text("A\n")
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    text = run_cli("diff", str(ctx), cache=cache).stdout.splitlines()
    assert re.match(r"before: \S+ \S+ UTC  nightly  image sha256:", text[0]), text[0]
    assert re.match(r"after:  \S+ \S+ UTC  image sha256:", text[1]), text[1]
    doc = json.loads(run_cli("diff", "--format", "json", str(ctx), cache=cache).stdout)
    assert doc["before"]["name"] == "nightly" and "name" not in doc["after"]
