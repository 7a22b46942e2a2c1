"""The build cache: what hits, what re-runs, and sharing one cache between builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.build import BASE, ROOT, build, cached_steps, write_context

pytestmark = pytest.mark.sandbox

DOCKERFILE = f"""\
FROM {BASE} AS builder
ARG VERSION=1
WORKDIR /src
COPY src/ ./
RUN cat *.txt | sort > /combined && echo "version $VERSION" > /version
RUN echo untouched-by-arg > /stable

FROM {BASE}
COPY --from=builder /combined /app/combined
RUN echo built > /app/built
ARG LATE=a
RUN echo "$LATE" > /app/late
"""
FILES = {"src/a.txt": "a\n", "src/b.txt": "b\n", "unrelated.md": "not copied\n"}


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(tmp_path / "ctx", DOCKERFILE, FILES)


def steps(result) -> dict[str, bool]:
    return {f"{s.stage}:{s.instruction}": s.cached for s in result.steps}


def test_noop_rebuild_hits_every_step_with_the_same_digest(cache: Path, ctx: Path) -> None:
    first = build(cache, ctx)
    assert not any(cached_steps(first))
    second = build(cache, ctx)
    assert all(cached_steps(second)) and len(second.steps) == len(first.steps)
    assert second.image_digest == first.image_digest


def test_touching_mtime_hits(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    os.utime(ctx / "src/a.txt", (1, 1))
    assert all(cached_steps(build(cache, ctx)))


def test_changing_an_unselected_file_hits(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    (ctx / "unrelated.md").write_text("changed\n")
    (ctx / "new-file").write_text("new\n")
    assert all(cached_steps(build(cache, ctx)))


def test_changed_input_reruns_from_that_step(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    (ctx / "src/b.txt").write_text("B\n")
    result = steps(build(cache, ctx))
    assert result["builder:WORKDIR /src"] is True
    assert result["builder:COPY src/ ./"] is False
    assert result["stage-1:COPY --from=builder /combined /app/combined"] is False


def test_builder_rebuilt_to_identical_output_keeps_copy_from_cached(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    # Same lines, other order: the builder re-runs, /combined (sorted) comes out identical.
    (ctx / "src/a.txt").write_text("b\n")
    (ctx / "src/b.txt").write_text("a\n")
    result = steps(build(cache, ctx))
    assert result["builder:COPY src/ ./"] is False
    assert result["stage-1:COPY --from=builder /combined /app/combined"] is True
    assert result["stage-1:RUN echo built > /app/built"] is True


def test_changing_an_arg_reruns_only_the_steps_that_see_it(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    # A RUN sees every ARG declared before it (in its environment); others do not.
    result = steps(build(cache, ctx, build_args={"LATE": "b"}))
    assert [name for name, hit in result.items() if not hit] == ['stage-1:RUN echo "$LATE" > /app/late']
    result = steps(build(cache, ctx, build_args={"VERSION": "2"}))
    assert result["builder:COPY src/ ./"] is True, "COPY does not read VERSION"
    assert result['builder:RUN cat *.txt | sort > /combined && echo "version $VERSION" > /version'] is False
    assert result["stage-1:COPY --from=builder /combined /app/combined"] is True


def test_no_cache_runs_everything(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    assert not any(cached_steps(build(cache, ctx, no_cache=True)))
    # and the cache still serves a normal build afterwards
    assert all(cached_steps(build(cache, ctx)))


def test_no_cache_filter_reruns_one_stage(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    result = build(cache, ctx, no_cache_filter=["builder"])
    by_stage = {(s.stage, s.cached) for s in result.steps}
    assert ("builder", True) not in by_stage
    assert ("stage-1", True) in by_stage


def test_env_change_reruns_run(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "c2", f"FROM {BASE}\nENV X=1\nRUN echo $X > /x\n")
    build(cache, ctx)
    write_context(ctx, f"FROM {BASE}\nENV X=2\nRUN echo $X > /x\n")
    assert cached_steps(build(cache, ctx)) == [False]


def test_proxy_args_stay_out_of_the_key(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "c3", f'FROM {BASE}\nRUN echo "$HTTP_PROXY" > /proxy\n')
    build(cache, ctx, build_args={"HTTP_PROXY": "http://one:3128"})
    result = build(cache, ctx, build_args={"HTTP_PROXY": "http://two:3128"})
    assert cached_steps(result) == [True]
    assert "one:3128" not in str(result.config.history)


def test_cache_index_keeps_the_key_inputs(cache: Path, ctx: Path) -> None:
    import json

    from lamina.cache.store import Store
    from lamina.engine.cachekey import KeyInputs

    result = build(cache, ctx)
    with Store(cache) as store:
        for step in result.steps:
            record = json.loads(store.cache_get(step.key) or "{}")
            assert KeyInputs.from_json(record["inputs"]).key() == step.key


def test_two_builds_at_once_on_one_cache(cache: Path, ctx: Path, tmp_path: Path) -> None:
    script = (
        "import sys, lamina.api as api\n"
        "r = api.build(sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(r.image_digest)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SOURCE_DATE_EPOCH", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ctx), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    digests = {out.strip() for out, _ in outputs}
    assert len(digests) == 1, digests
    assert build(cache, ctx).image_digest in digests


def test_unchanged_build_is_replayed_and_a_retagged_base_is_not(
    cache: Path, ctx: Path, tmp_path: Path, busybox_image: Path
) -> None:
    from lamina.cache.store import Store

    first = build(cache, ctx, tags=["replay:1"])
    replayed = build(cache, ctx, tags=["replay:2"])
    assert replayed.image_digest == first.image_digest and all(cached_steps(replayed))
    assert [s.key for s in replayed.steps] == [s.key for s in first.steps]
    with Store(cache) as store:
        assert (
            store.resolve("docker.io/library/replay:2").manifest
            == store.resolve("docker.io/library/replay:1").manifest
        )
        # Point the base name at another image: the memo must not be trusted.
        store.tag("docker.io/lamina-test/busybox:1.35", store.resolve("docker.io/library/replay:1").manifest,
                  size=1)  # fmt: skip
    rebuilt = build(cache, ctx)
    assert not all(cached_steps(rebuilt)), "steps on a new base run again"


def test_unchanged_build_with_an_oci_output_is_replayed_to_the_same_archive(
    cache: Path, ctx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build(cache, ctx, tags=["oci:1"], outputs=[f"type=oci,dest={tmp_path / 'a.tar'}"])
    from lamina.engine.steps import dispatch

    def planned(*args: object, **kwargs: object) -> None:
        raise AssertionError("the unchanged build was planned again, not replayed")

    monkeypatch.setattr(dispatch, "make_plans", planned)
    build(cache, ctx, tags=["oci:1"])  # the memo serves a build without the output as well
    again = build(cache, ctx, tags=["oci:1"], outputs=[f"type=oci,dest={tmp_path / 'b.tar'}"])
    assert again.image_digest == first.image_digest and all(cached_steps(again))
    assert (tmp_path / "b.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()
    # docker's media types make another image: that output is built, never replayed
    with pytest.raises(AssertionError, match="planned again"):
        build(cache, ctx, tags=["oci:1"], outputs=[f"type=docker,dest={tmp_path / 'c.tar'}"])


def test_a_declared_proxy_arg_is_an_ordinary_arg(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "c4", f'FROM {BASE}\nARG HTTP_PROXY\nRUN echo "$HTTP_PROXY" > /proxy\n')
    build(cache, ctx, build_args={"HTTP_PROXY": "http://one:3128"})
    result = build(cache, ctx, build_args={"HTTP_PROXY": "http://two:3128"})
    assert cached_steps(result) == [False]
    assert "HTTP_PROXY=http://two:3128" in str(result.config.history)


def test_dry_run_says_what_would_run_and_why(cache: Path, ctx: Path) -> None:
    first = build(cache, ctx)
    (ctx / "src/b.txt").write_text("B\n")
    plan = build(cache, ctx, dry_run=True, build_args={"LATE": "z"})
    reasons = {s.instruction: (s.cached, s.reason) for s in plan.steps}
    assert reasons["WORKDIR /src"] == (True, "")
    assert reasons["COPY src/ ./"] == (False, "file content changed: src/b.txt")
    assert reasons['RUN echo "$LATE" > /app/late'][0] is False
    assert "will run first" in reasons["COPY --from=builder /combined /app/combined"][1]
    assert plan.image_digest == "", "a dry run makes no image"
    # Nothing ran: the real build still has everything to do for the changed file.
    assert not all(cached_steps(build(cache, ctx)))
    assert first.image_digest


def test_dry_run_names_a_changed_arg(cache: Path, ctx: Path) -> None:
    build(cache, ctx)
    plan = build(cache, ctx, dry_run=True, build_args={"VERSION": "9"})
    reasons = {s.instruction: s.reason for s in plan.steps if not s.cached}
    first_run = 'RUN cat *.txt | sort > /combined && echo "version $VERSION" > /version'
    assert reasons[first_run] == 'build arg VERSION changed: "1" -> "9"'
    assert reasons["RUN echo untouched-by-arg > /stable"] == (
        f'the previous step changed: step 4 ({first_run}) will run; build arg VERSION changed: "1" -> "9"'
    )
    assert "COPY src/ ./" not in reasons, "COPY does not see VERSION"
