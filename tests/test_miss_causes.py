"""Every step that runs says why, exactly: in plain and json progress, in --metadata-file, in --dry-run.

One scenario per cause kind: a first build, a file's content / mode changed,
added, removed; a build arg and an ENV changed (proxy and secret values
masked); RUN options changed; a bind mount's files; the base image's tag
moved; an upstream stage changed; --no-cache. `explain` and `plan --cache`
take the build's flags and agree with the next build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.build import BASE, build, needs_id_range, run_cli, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE}
ARG MODE=debug
ARG HTTP_PROXY
ENV LEVEL=1
COPY src/ /src/
RUN echo "$MODE $LEVEL" > /mode
"""
FILES = {"src/a.txt": "a\n", "src/b.txt": "b\n", "src/c.txt": "c\n"}


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", DOCKERFILE, FILES)


def reasons(result) -> dict[str, str]:
    return {s.instruction: s.reason for s in result.steps if not s.cached}


def test_first_build_then_each_kind_of_file_change(cache: Path, ctx: Path) -> None:
    first = build(cache, ctx)
    assert set(reasons(first).values()) == {"first build of this step"}
    (ctx / "src/a.txt").write_text("A\n")
    (ctx / "src/b.txt").chmod(0o755)
    (ctx / "src/c.txt").unlink()
    (ctx / "src/d.txt").write_text("d\n")
    told = reasons(build(cache, ctx))
    assert told["COPY src/ /src/"] == (
        "file content changed: src/a.txt; mode or owner changed: src/b.txt; "
        "file added: src/d.txt; file removed: src/c.txt"
    )
    assert (
        told['RUN echo "$MODE $LEVEL" > /mode'] == "the previous step changed: step 2 (COPY src/ /src/) ran"
    )


def test_many_changed_files_are_a_few_names_then_a_count(cache: Path, ctx: Path) -> None:
    for i in range(6):
        (ctx / f"src/n{i}.txt").write_text("1")
    build(cache, ctx)
    for i in range(6):
        (ctx / f"src/n{i}.txt").write_text("2")
    told = reasons(build(cache, ctx, dry_run=True))
    assert told["COPY src/ /src/"] == "file content changed: src/n0.txt, src/n1.txt, src/n2.txt and 3 more"


def test_build_arg_and_env_changes_name_old_and_new_with_proxies_masked(cache: Path, ctx: Path) -> None:
    build(cache, ctx, build_args={"HTTP_PROXY": "http://user:pw@one:3128"})
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("LEVEL=1", "LEVEL=2"))
    told = reasons(build(cache, ctx, build_args={"MODE": "release", "HTTP_PROXY": "http://user:pw@two:3128"}))
    assert told == {
        'RUN echo "$MODE $LEVEL" > /mode': (
            'build arg HTTP_PROXY changed: (value masked); ENV LEVEL changed: "1" -> "2"; '
            'build arg MODE changed: "debug" -> "release"'
        )
    }
    assert "pw@" not in json.dumps(told)


def test_run_options_changed_are_named(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    text = DOCKERFILE.replace("RUN echo", "RUN --network=none --mount=type=tmpfs,target=/scratch echo")
    (ctx / "Dockerfile").write_text(text)
    told = reasons(build(cache, ctx))
    assert list(told.values()) == ["RUN options changed: network default -> none, mounts (+tmpfs:/scratch:0)"]


def test_a_moved_base_tag_names_the_reference_and_both_digests(
    cache: Path, ctx: Path, tmp_path: Path
) -> None:
    first = build(cache, ctx)
    from lamina.cache.store import Store

    with Store(cache) as store:
        old = str(store.resolve(f"docker.io/{BASE}").manifest)
    other = write_context(tmp_path / "other", f"FROM {BASE}\nRUN echo new > /new\n")
    build(cache, other, tags=[BASE])
    with Store(cache) as store:
        new = str(store.resolve(f"docker.io/{BASE}").manifest)
    assert old != new and first.image_digest
    told = reasons(build(cache, ctx))
    expected = f"base image changed: {BASE} {old[:19]} -> {new[:19]}"
    assert told["COPY src/ /src/"] == expected
    assert told['RUN echo "$MODE $LEVEL" > /mode'] == expected


def test_no_cache_and_no_cache_filter_are_the_cause(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    assert set(reasons(build(cache, ctx, no_cache=True)).values()) == {"--no-cache"}
    filtered = reasons(build(cache, ctx, no_cache_filter=["stage-0"]))
    assert set(filtered.values()) == {"--no-cache-filter stage-0"}


def test_plain_json_and_metadata_file_carry_the_cause(cache: Path, ctx: Path, tmp_path: Path) -> None:
    run_cli("build", "--progress", "plain", str(ctx), cache=cache)
    (ctx / "src/a.txt").write_text("A\n")
    plain = run_cli("build", "--progress", "plain", str(ctx), cache=cache).stderr
    assert "[2/3] COPY src/ /src/  (file content changed: src/a.txt)" in plain.splitlines()

    (ctx / "src/a.txt").write_text("AA\n")
    forecast = run_cli("build", "--dry-run", "--progress", "json", str(ctx), cache=cache).stdout
    events = [json.loads(line) for line in forecast.splitlines()]
    assert events[0] == {
        "type": "forecast", "stage": "stage-0", "step": 2, "instruction": "COPY src/ /src/",
        "cache": "run", "reason": "file content changed: src/a.txt",
    }  # fmt: skip

    meta = tmp_path / "meta.json"
    proc = run_cli("build", "--progress", "json", "--metadata-file", str(meta), str(ctx), cache=cache)
    running = [json.loads(line) for line in proc.stderr.splitlines() if '"running"' in line]
    assert running[0]["reason"] == "file content changed: src/a.txt"
    steps = json.loads(meta.read_text())["lamina.build.steps"]
    assert steps[0]["reason"] == "file content changed: src/a.txt"
    assert steps[1]["reason"] == "the previous step changed: step 2 (COPY src/ /src/) ran"


def test_an_upstream_stage_names_the_files_this_step_takes_from_it(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS build\nCOPY src/ /out/\nRUN echo x > /out/made\n\n"
    text += f"FROM {BASE}\nCOPY --from=build /out/ /app/\n"
    ctx = write_context(tmp_path / "two", text, {"src/a.txt": "a\n", "src/b.txt": "b\n"})
    build(cache, ctx)
    assert all(s.cached for s in build(cache, ctx).steps)  # a hit keeps the files listed by the run
    (ctx / "src/b.txt").write_text("B\n")
    told = reasons(build(cache, ctx))
    assert told["COPY --from=build /out/ /app/"] == "stage build: file content changed: out/b.txt"
    assert told["RUN echo x > /out/made"] == "the previous step changed: step 2 (COPY src/ /out/) ran"


def test_changed_instruction_text_names_its_line(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("> /mode", "> /mode2"))
    told = reasons(build(cache, ctx))
    assert told == {'RUN echo "$MODE $LEVEL" > /mode2': "instruction text changed (line 6: the command)"}


def test_dry_run_says_may_run_after_a_step_it_cannot_know(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS build\nCOPY src/ /out/\n\n"
    text += f"FROM {BASE}\nCOPY --from=build /out/ /app/\nRUN echo 1 > /one\n"
    ctx = write_context(tmp_path / "may", text, {"src/a.txt": "a\n"})
    build(cache, ctx)
    (ctx / "src/a.txt").write_text("A\n")
    told = reasons(build(cache, ctx, dry_run=True))
    assert told["COPY --from=build /out/ /app/"] == "stage build will run first; the files it selects decide"
    assert told["RUN echo 1 > /one"] == "may run: depends on step 2 (COPY --from=build /out/ /app/)"
    lines = run_cli("explain", str(ctx), cache=cache).stdout.splitlines()
    assert lines[-1].endswith("  may run: depends on step 2 (COPY --from=build /out/ /app/)")
    said = run_cli("explain", "--format", "json", str(ctx), cache=cache).stdout.splitlines()
    assert json.loads(said[-1])["cache"] == "maybe"


def test_explain_takes_the_build_flags_and_agrees_with_the_next_build(cache: Path, ctx: Path) -> None:
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    (ctx / "src/a.txt").write_text("A\n")
    flags = ("--build-arg", "MODE=release", "--network", "none", str(ctx))
    text = run_cli("explain", *flags, cache=cache).stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in text if "will run" in line] == [
        "[stage-0 2] COPY src/ /src/",
        '[stage-0 3] RUN echo "$MODE $LEVEL" > /mode',
    ]
    assert text[0].endswith("will run: file content changed: src/a.txt")
    said = [
        json.loads(line)
        for line in run_cli("explain", "--format", "json", *flags, cache=cache).stdout.splitlines()
    ]
    assert said[1]["reason"] == (
        "the previous step changed: step 2 (COPY src/ /src/) will run; "
        "RUN options changed: network default -> none; "
        'build arg MODE changed: "debug" -> "release"'
    )
    meta = ctx.parent / "meta.json"
    run_cli("build", "--progress", "quiet", "--metadata-file", str(meta), *flags, cache=cache)
    ran = [step for step in json.loads(meta.read_text())["lamina.build.steps"] if step["cache"] == "run"]
    forecast = [
        (s["step"], s["reason"].replace(") will run;", ") ran;")) for s in said if s["cache"] == "run"
    ]
    assert [(s["step"], s["reason"]) for s in ran] == forecast


def test_add_url_names_the_url_whose_content_changed(cache: Path, tmp_path: Path) -> None:
    import http.server
    import threading

    payload = [b"one\n"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload[0])))
            self.end_headers()
            self.wfile.write(payload[0])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/data.txt"
        ctx = write_context(tmp_path / "url", f"FROM {BASE}\nADD {url} /dl/\n")
        build(cache, ctx)
        payload[0] = b"two\n"
        assert reasons(build(cache, ctx)) == {f"ADD {url} /dl/": f"file content changed: {url}"}
    finally:
        server.shutdown()


def test_a_line_inserted_above_does_not_shift_the_comparison(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("COPY src/", "RUN echo new > /new\nCOPY src/"))
    told = reasons(build(cache, ctx))
    assert told["COPY src/ /src/"] == "the previous step changed: step 2 (RUN echo new > /new) ran"
    assert told['RUN echo "$MODE $LEVEL" > /mode'] == (
        "the previous step changed: step 3 (COPY src/ /src/) ran"
    )


def test_a_bind_mount_names_the_mounted_files_that_changed(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE}\nRUN --mount=type=bind,source=conf,target=/conf cat /conf/* > /all\n"
    ctx = write_context(tmp_path / "bind", text, {"conf/a.ini": "a\n", "conf/b.ini": "b\n"})
    build(cache, ctx)
    (ctx / "conf/a.ini").write_text("A\n")
    (ctx / "conf/c.ini").write_text("c\n")
    step = "RUN --mount=type=bind,source=conf,target=/conf cat /conf/* > /all"
    expected = "mounted file content changed: conf/a.ini; mounted file added: conf/c.ini"
    assert reasons(build(cache, ctx, dry_run=True)) == {step: expected}
    assert reasons(build(cache, ctx)) == {step: expected}


def test_a_stage_built_from_an_upstream_stage_names_its_step_and_files(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS build\nCOPY src/ /out/\nRUN echo x > /out/made\n\n"
    text += "FROM build\nRUN cat /out/* > /all\n"
    ctx = write_context(tmp_path / "from", text, {"src/a.txt": "a\n", "src/b.txt": "b\n"})
    build(cache, ctx)
    (ctx / "src/b.txt").write_text("B\n")
    (ctx / "src/c.txt").write_text("c\n")
    forecast = reasons(build(cache, ctx, dry_run=True))
    assert forecast["RUN cat /out/* > /all"] == (
        "upstream stage build changed: step 2 (COPY src/ /out/) will run and 1 more"
    )
    told = reasons(build(cache, ctx))
    assert told["RUN cat /out/* > /all"] == (
        "upstream stage build changed: step 2 (COPY src/ /out/) ran and 1 more; "
        "file content changed: out/b.txt; file added: out/c.txt"
    )


def test_plan_cache_takes_the_build_flags_and_agrees_with_the_next_build(cache: Path, ctx: Path) -> None:
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    flags = ("--network", "none", "--build-arg", "MODE=release", str(ctx))
    lines = run_cli("plan", "--cache", *flags, cache=cache).stdout.split("\ncache:\n", 1)[1].splitlines()
    assert lines == [
        "[stage-0 2] COPY src/ /src/                  cached",
        '[stage-0 3] RUN echo "$MODE $LEVEL" > /mode  will run: '
        'RUN options changed: network default -> none; build arg MODE changed: "debug" -> "release"',
    ]
    filtered = run_cli("plan", "--cache", "--no-cache-filter", "stage-0", *flags, cache=cache).stdout
    assert filtered.count("will run: --no-cache-filter stage-0") == 2
    doc = json.loads(run_cli("plan", "--cache", "--format", "json", *flags, cache=cache).stdout)
    assert [(s["step"], s["cache"]) for s in doc["cache"]] == [(2, "cached"), (3, "run")]
    assert doc["cache"][1]["reason"] == lines[1].split("will run: ", 1)[1]
    refused = run_cli("plan", "--network", "none", str(ctx), cache=cache, check=False)
    assert refused.returncode == 2
    assert "--network changes only the answer of `lamina plan --cache`: add --cache" in refused.stderr

    meta = ctx.parent / "meta.json"
    run_cli("build", "--progress", "quiet", "--metadata-file", str(meta), *flags, cache=cache)
    ran = [s["step"] for s in json.loads(meta.read_text())["lamina.build.steps"] if s["cache"] == "run"]
    assert ran == [int(line.split()[1].rstrip("]")) for line in lines if "will run" in line]


def test_two_causes_at_once_are_both_named_everywhere(cache: Path, tmp_path: Path) -> None:
    needs_id_range()  # the first build runs as nobody
    text = f"FROM {BASE}\nARG V=1\nUSER nobody\nRUN echo $V > /tmp/v\n"
    ctx = write_context(tmp_path / "two", text)
    run_cli("build", "--progress", "quiet", str(ctx), cache=cache)
    (ctx / "Dockerfile").write_text(text.replace("USER nobody", "USER root"))
    flags = ("--build-arg", "V=2", str(ctx))
    expected = 'USER changed: nobody -> root; build arg V changed: "1" -> "2"'
    said = run_cli("explain", "--format", "json", *flags, cache=cache).stdout.splitlines()
    assert [json.loads(line)["reason"] for line in said] == [expected]
    meta = tmp_path / "two.json"
    proc = run_cli("build", "--progress", "json", "--metadata-file", str(meta), *flags, cache=cache)
    running = [json.loads(line) for line in proc.stderr.splitlines() if '"running"' in line]
    assert [event["reason"] for event in running] == [expected]
    assert [s["reason"] for s in json.loads(meta.read_text())["lamina.build.steps"]] == [expected]


class _Tee:
    """One build's events to the plain, json and tty sinks at once."""

    def __init__(self) -> None:
        import io

        from lamina.engine.progress import JsonProgress, PlainProgress, TtyProgress

        self.streams = {"plain": io.StringIO(), "json": io.StringIO(), "tty": io.StringIO()}
        self.sinks = [
            PlainProgress(self.streams["plain"]),
            JsonProgress(self.streams["json"]),
            TtyProgress(self.streams["tty"]),
        ]

    def step(self, event: object) -> None:
        for sink in self.sinks:
            sink.step(event)  # type: ignore[arg-type]

    def log(self, stage: str, index: int, line: str) -> None:
        for sink in self.sinks:
            sink.log(stage, index, line)

    def warn(self, message: str) -> None:
        for sink in self.sinks:
            sink.warn(message)

    def finish(self, summary: object) -> None:
        for sink in self.sinks:
            sink.finish(summary)  # type: ignore[arg-type]


_SCENARIOS = {
    "file": (
        f"FROM {BASE}\nCOPY src/ /src/\nRUN cat /src/* > /all\n",
        lambda ctx: (ctx / "src/a.txt").write_text("A\n"),
        {},
    ),
    "bind-mount": (
        f"FROM {BASE}\nRUN --mount=type=bind,source=src,target=/s cat /s/* > /all\n",
        lambda ctx: (ctx / "src/b.txt").unlink(),
        {},
    ),
    "arg-and-proxy": (
        f"FROM {BASE}\nARG MODE=a\nARG HTTPS_PROXY\nRUN echo $MODE > /m\n",
        lambda ctx: None,
        {"MODE": "b", "HTTPS_PROXY": "http://u:secret@proxy:1"},
    ),
    "run-options": (
        f"FROM {BASE}\nRUN echo x > /x\n",
        lambda ctx: (ctx / "Dockerfile").write_text(f"FROM {BASE}\nRUN --network=none echo x > /x\n"),
        {},
    ),
    "upstream-stage": (
        f"FROM {BASE} AS base\nCOPY src/ /src/\n\nFROM base\nRUN cat /src/* > /all\n",
        lambda ctx: (ctx / "src/b.txt").write_text("B\n"),
        {},
    ),
}


@pytest.mark.parametrize("scenario", list(_SCENARIOS))
def test_every_channel_says_the_same_cause_and_explain_agrees(
    cache: Path, tmp_path: Path, scenario: str
) -> None:
    text, change, args = _SCENARIOS[scenario]
    ctx = write_context(tmp_path / scenario, text, {"src/a.txt": "a\n", "src/b.txt": "b\n"})
    build(cache, ctx)
    change(ctx)
    forecast = build(cache, ctx, build_args=args, dry_run=True)
    tee = _Tee()
    result = build(cache, ctx, build_args=args, progress=tee)
    ran = {(s.stage, s.index): s.reason for s in result.steps if not s.cached}
    told = {(s.stage, s.index): s.reason.replace(" will run", " ran") for s in forecast.steps if not s.cached}
    if scenario == "upstream-stage":  # the files an upstream step makes are known once it ran
        assert ran.pop(("stage-1", 1)) == told.pop(("stage-1", 1)) + "; file content changed: src/b.txt"
    assert ran == told
    assert "secret" not in json.dumps(list(ran.values()))
    events = [json.loads(line) for line in tee.streams["json"].getvalue().splitlines()]
    meta = {s["stage"] + str(s["step"]): s.get("reason", "") for s in result.metadata()["lamina.build.steps"]}
    for step in (s for s in result.steps if not s.cached):
        assert f"{step.instruction}  ({step.reason})" in tee.streams["plain"].getvalue()
        assert any(e.get("reason") == step.reason and e["step"] == step.index for e in events)
        assert f"({step.reason})" in " ".join(tee.streams["tty"].getvalue().split())
        assert meta[step.stage + str(step.index)] == step.reason


def test_a_bind_mount_from_a_stage_that_will_run_is_not_guessed(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS b\nCOPY src/ /out/\n\nFROM {BASE}\n"
    text += "RUN --mount=type=bind,from=b,source=/out,target=/in cat /in/* > /all\nRUN echo 1 > /one\n"
    ctx = write_context(tmp_path / "bindstage", text, {"src/a.txt": "a\n"})
    build(cache, ctx)
    (ctx / "src/a.txt").write_text("A\n")
    mounted = "RUN --mount=type=bind,from=b,source=/out,target=/in cat /in/* > /all"
    assert reasons(build(cache, ctx, dry_run=True)) == {
        "COPY src/ /out/": "file content changed: src/a.txt",
        mounted: "stage b will run first; the files it mounts decide",
        "RUN echo 1 > /one": f"may run: depends on step 2 ({mounted})",
    }
    told = reasons(build(cache, ctx))
    assert told[mounted] == "mounted file content changed: b:/out/a.txt"


def test_a_dry_run_seeds_no_cache_mount(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS seed\nCOPY src/ /seed/\n\nFROM {BASE}\n"
    text += "RUN --mount=type=cache,id=c1,from=seed,source=/seed,target=/c cat /c/a.txt > /got\n"
    ctx = write_context(tmp_path / "seed", text, {"src/a.txt": "old\n"})
    build(cache, ctx, dry_run=True)
    (ctx / "src/a.txt").write_text("new\n")
    out = tmp_path / "out"
    build(cache, ctx, outputs=[f"type=local,dest={out}"])
    assert (out / "got").read_text() == "new\n"
