"""End-to-end builds on the busybox base: root filesystems and configs as the reference says."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.build import (
    BASE,
    build,
    cached_steps,
    image_entries,
    needs_id_range,
    rootfs,
    run_cli,
    write_context,
)

pytestmark = pytest.mark.sandbox

MULTISTAGE = f"""\
ARG BASE={BASE}
FROM $BASE AS builder
ARG FLAVOUR=plain
WORKDIR /src
COPY app/ ./app/
COPY --chmod=750 tool.sh /usr/local/bin/tool
RUN mkdir -p /out && cat app/*.txt > /out/all.txt && echo "$FLAVOUR" > /out/flavour \\
    && ln -s all.txt /out/link && tool > /out/tool.out

FROM {BASE} AS unused
RUN exit 42

FROM {BASE}
LABEL org.example.title="demo app" version=1
ENV APP_HOME=/opt/app MODE=prod
WORKDIR $APP_HOME
COPY --from=builder /out/ ./
COPY --from=0 --chown=nobody:nogroup /src/app/a.txt owned.txt
RUN mkdir -p var && chown nobody:nogroup var && echo "$MODE" > mode
EXPOSE 8080 53/udp
VOLUME /data
STOPSIGNAL SIGINT
MAINTAINER someone@example.com
HEALTHCHECK --interval=30s --retries=2 CMD true
SHELL ["/bin/sh", "-ec"]
USER nobody
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /opt/app/all.txt"]
"""

FILES = {
    "app/a.txt": "alpha\n",
    "app/b.txt": "beta\n",
    "tool.sh": "#!/bin/sh\necho tool ran\n",
    "ignored.txt": "not copied\n",
}


def test_multistage_rootfs(cache: Path, tmp_path: Path) -> None:
    needs_id_range()
    ctx = write_context(tmp_path / "ctx", MULTISTAGE, FILES)
    out, archive = tmp_path / "out", tmp_path / "image.tar"
    result = build(cache, ctx, outputs=[f"type=local,dest={out}", f"type=oci,dest={archive}"])
    app = out / "opt/app"
    assert (app / "all.txt").read_text() == "alpha\nbeta\n"
    assert (app / "flavour").read_text() == "plain\n"
    assert (app / "tool.out").read_text() == "tool ran\n"
    assert os.readlink(app / "link") == "all.txt"
    assert (app / "mode").read_text() == "prod\n"
    # Owners as the image records them (a local export is owned by its writer when unprivileged).
    entries = image_entries(archive)
    owned = entries["opt/app/owned.txt"]
    assert (owned.uid, owned.gid) == (65534, 65534)
    assert entries["opt/app/var"].isdir() and entries["opt/app/var"].uid == 65534
    assert entries["opt/app/all.txt"].uid == 0
    assert not (out / "src").exists(), "only the final stage is exported"
    assert (out / "bin/busybox").is_file()
    # The unused stage (RUN exit 42) is never run.
    assert {step.stage for step in result.steps} == {"builder", "stage-2"}


def test_multistage_config_and_history(cache: Path, tmp_path: Path) -> None:
    needs_id_range()
    ctx = write_context(tmp_path / "ctx", MULTISTAGE, FILES)
    result = build(cache, ctx, tags=["demo:1"])
    config = result.config.config
    assert config.user == "nobody"
    assert config.working_dir == "/opt/app"
    assert config.entrypoint == ("/bin/sh", "-c")
    assert config.cmd == ("cat /opt/app/all.txt",)
    assert "APP_HOME=/opt/app" in config.env and "MODE=prod" in config.env
    assert any(e.startswith("PATH=") for e in config.env)
    assert "FLAVOUR=plain" not in " ".join(config.env), "ARGs never reach the config"
    assert dict(config.labels) == {"org.example.title": "demo app", "version": "1"}
    assert config.exposed_ports == ("53/udp", "8080/tcp")
    assert config.volumes == ("/data",)
    assert config.stop_signal == "SIGINT"
    assert config.shell == ("/bin/sh", "-ec")
    assert config.healthcheck is not None and config.healthcheck.retries == 2
    assert config.healthcheck.interval == 30_000_000_000
    assert result.config.author == "someone@example.com"
    history = [h.created_by for h in result.config.history]
    assert "COPY --from=builder" not in " ".join(history)
    assert "COPY /out/ ./ # buildkit" in history
    assert "COPY --chown=nobody:nogroup /src/app/a.txt owned.txt # buildkit" in history
    assert "ENV APP_HOME=/opt/app MODE=prod" in history
    assert "WORKDIR /opt/app" in history
    assert any(h.startswith("RUN /bin/sh -c mkdir -p var") and h.endswith("# buildkit") for h in history)
    assert 'CMD ["cat /opt/app/all.txt"]' in history
    non_empty = [h for h in result.config.history if not h.empty_layer]
    assert len(non_empty) == len(result.config.diff_ids)
    assert result.names == ("docker.io/library/demo:1",)


def test_run_sees_stage_args_in_history(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nARG A=1\nARG B\nRUN echo $A > /a\n")
    result = build(cache, ctx, build_args={"B": "two"})
    runs = [h.created_by for h in result.config.history if h.created_by.startswith("RUN")]
    assert runs == ["RUN |2 A=1 B=two /bin/sh -c echo $A > /a # buildkit"]
    args = [h.created_by for h in result.config.history if h.created_by.startswith("ARG")]
    assert args == ["ARG A=1", "ARG B=two"]


def test_exec_form_heredoc_and_shell(cache: Path, tmp_path: Path) -> None:
    text = f"""\
FROM {BASE}
RUN ["/bin/sh", "-c", "echo exec > /exec"]
RUN <<EOF
echo one > /heredoc
echo two >> /heredoc
EOF
RUN <<EOF
#!/bin/sh
echo script > /script
EOF
COPY <<EOF /etc/inline.conf
key=value
EOF
SHELL ["/bin/sh", "-c"]
RUN echo "$0" > /shell
"""
    ctx = write_context(tmp_path / "ctx", text)
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert (out / "exec").read_text() == "exec\n"
    assert (out / "heredoc").read_text() == "one\ntwo\n"
    assert (out / "script").read_text() == "script\n"
    assert (out / "etc/inline.conf").read_text() == "key=value\n"
    assert ((out / "etc/inline.conf").stat().st_mode & 0o777) == 0o644


def test_onbuild_triggers_run_in_child_stage(cache: Path, tmp_path: Path) -> None:
    text = f"""\
FROM {BASE} AS parent
ONBUILD RUN echo triggered > /onbuild
ONBUILD COPY marker.txt /marker.txt

FROM parent
RUN cat /onbuild > /seen
"""
    ctx = write_context(tmp_path / "ctx", text, {"marker.txt": "m\n"})
    out = tmp_path / "out"
    result = rootfs(cache, ctx, out)
    assert (out / "seen").read_text() == "triggered\n"
    assert (out / "marker.txt").read_text() == "m\n"
    assert result.config.config.on_build == (), "triggers are not passed on"


def test_workdir_is_created_owned_by_user(cache: Path, tmp_path: Path) -> None:
    needs_id_range()
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nUSER nobody\nWORKDIR /srv/data\n")
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    assert entries["srv/data"].isdir() and entries["srv/data"].uid == 65534
    assert entries["srv"].uid == 65534, "missing parents are made as the user too"
    assert entries["tmp"].mode & 0o7777 == 0o1777, "existing dirs keep their mode"


def test_scratch_stage_and_copy_from_image(cache: Path, tmp_path: Path) -> None:
    text = f"FROM scratch\nCOPY --from={BASE} /bin/busybox /busybox\nCOPY hello /hello\n"
    ctx = write_context(tmp_path / "ctx", text, {"hello": "hi\n"})
    out = tmp_path / "out"
    result = rootfs(cache, ctx, out)
    assert sorted(p.name for p in out.iterdir()) == ["busybox", "hello"]
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert result.config.config.env == (path,)


def test_add_unpacks_local_archives(cache: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    def archive(mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
            data = b"inside\n"
            info = tarfile.TarInfo("pkg/file.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    files = {"a.tar.gz": archive("w:gz"), "b.tar.bz2": archive("w:bz2"), "c.tar.xz": archive("w:xz")}
    files["dir/inner.tar.gz"] = files["a.tar.gz"]
    text = (
        f"FROM {BASE}\nADD a.tar.gz /gz/\nADD b.tar.bz2 /bz2\nADD c.tar.xz /xz/\nCOPY a.tar.gz /copied/\n"
        "ADD dir/ /dir/\nADD *.tar.gz /glob/\n"
    )
    ctx = write_context(tmp_path / "ctx", text, files)
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    for name in ("gz", "bz2", "xz"):
        assert (out / name / "pkg/file.txt").read_text() == "inside\n"
    assert (out / "copied/a.tar.gz").is_file(), "COPY never unpacks"
    assert (out / "dir/inner.tar.gz").is_file(), "an archive inside an added directory stays packed"
    assert (out / "glob/pkg/file.txt").read_text() == "inside\n", "a wildcard match is a named source"


@contextlib.contextmanager
def _served(payload: bytes) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering every GET with `payload`; yields its port."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def test_add_url_unpack_true(cache: Path, tmp_path: Path) -> None:
    """BuildKit's ADD --unpack=true of an HTTP source unpacks a tar; without it the file is kept."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("inner/hello.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    payload = buf.getvalue()

    with _served(payload) as port:
        url = f"http://127.0.0.1:{port}/a.tar.gz"
        text = f"FROM {BASE}\nADD --unpack=true {url} /unpacked/\nADD {url} /kept/\n"
        out = tmp_path / "out"
        rootfs(cache, write_context(tmp_path / "ctx", text), out)
        assert (out / "unpacked/inner/hello.txt").read_bytes() == b"hello\n"
        assert (out / "kept/a.tar.gz").read_bytes() == payload


def test_add_url_with_checksum(cache: Path, tmp_path: Path) -> None:
    import hashlib

    from lamina.errors import BuildError

    payload = b"remote file\n"

    with _served(payload) as port:
        url = f"http://127.0.0.1:{port}/files/data.txt"
        good = "sha256:" + hashlib.sha256(payload).hexdigest()
        ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nADD --checksum={good} {url} /dl/\n")
        out = tmp_path / "out"
        rootfs(cache, ctx, out)
        assert (out / "dl/data.txt").read_bytes() == payload
        assert (out / "dl/data.txt").stat().st_mode & 0o777 == 0o600
        bad = "sha256:" + "0" * 64
        ctx2 = write_context(tmp_path / "ctx2", f"FROM {BASE}\nADD --checksum={bad} {url} /dl/\n")
        with pytest.raises(BuildError, match="digest mismatch"):
            build(cache, ctx2)


def test_run_mounts_secret_cache_bind_tmpfs(cache: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret")
    text = f"""\
FROM {BASE}
RUN --mount=type=secret,id=token cat /run/secrets/token > /got-secret
RUN --mount=type=secret,id=envtok,env=TOKEN sh -c 'printf %s "$TOKEN" > /env-secret'
RUN --mount=type=cache,target=/cache sh -c 'echo x >> /cache/log; wc -l < /cache/log > /cache-lines'
RUN --mount=type=bind,source=data,target=/mnt cat /mnt/d.txt > /from-bind
RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && test ! -e /x
RUN --mount=type=cache,target=/seeded,from={BASE},source=/etc cat /seeded/group > /seeded-group
"""
    ctx = write_context(tmp_path / "ctx", text, {"data/d.txt": "bound\n"})
    out = tmp_path / "out"
    os.environ["LAMINA_TEST_SECRET"] = "from-env"
    try:
        rootfs(cache, ctx, out, secrets=[f"id=token,src={secret}", "id=envtok,env=LAMINA_TEST_SECRET"])
    finally:
        del os.environ["LAMINA_TEST_SECRET"]
    assert (out / "got-secret").read_text() == "s3cret"
    assert (out / "env-secret").read_text() == "from-env"
    assert not list((cache / "tmp").glob("secret-*")), "a secret from the environment is not left behind"
    assert not (out / "run/secrets/token").exists(), "a secret never lands in a layer"
    assert (out / "from-bind").read_text() == "bound\n"
    assert (out / "cache-lines").read_text().strip() == "1"
    assert not (out / "cache/log").exists(), "cache mounts stay out of the layer"
    assert not (out / "scratch/x").exists()
    assert "nogroup" in (out / "seeded-group").read_text(), "a cache mount from= starts with that content"


def test_run_bind_mounts_a_single_file_and_keys_on_its_content(cache: Path, tmp_path: Path) -> None:
    # The pip idiom: RUN --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt
    text = f"FROM {BASE}\nRUN --mount=type=bind,source=req.txt,target=/tmp/req.txt cp /tmp/req.txt /copied\n"
    ctx = write_context(tmp_path / "ctx", text, {"req.txt": "v1\n"})
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert (out / "copied").read_text() == "v1\n"
    assert not (out / "tmp/req.txt").exists(), "the mount point stays out of the layer"
    (ctx / "req.txt").write_text("v2\n")
    rootfs(cache, ctx, tmp_path / "out2")
    assert (tmp_path / "out2/copied").read_text() == "v2\n"


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ("type=cache,target=/etc/passwd", "--mount target /etc/passwd: the image has a file there"),
        ("type=tmpfs,target=/etc/group", "--mount target /etc/group: the image has a file there"),
        ("type=bind,source=f,target=/bin", "--mount target /bin: the image has a directory there"),
    ],
)
def test_mount_onto_the_wrong_kind_of_target_names_it(
    cache: Path, tmp_path: Path, mount: str, message: str
) -> None:
    from lamina.errors import BuildError

    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN --mount={mount} true\n", {"f": "x\n"})
    with pytest.raises(BuildError, match=re.escape(message)):
        build(cache, ctx)


def test_heredoc_and_archive_destinations_follow_an_image_symlink(cache: Path, tmp_path: Path) -> None:
    # As COPY of a file does (and BuildKit): /lnk/f lands in /tmp, /lnk stays a symlink.
    import io
    import tarfile

    text = f"FROM {BASE}\nRUN ln -s /tmp /lnk\nCOPY <<EOF /lnk/f\nhello\nEOF\nADD a.tar /lnk/\n"
    ctx = write_context(tmp_path / "ctx", text)
    with tarfile.open(ctx / "a.tar", "w") as tar:
        info = tarfile.TarInfo("from-archive")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"ar\n"))
    out = tmp_path / "out"
    rootfs(cache, ctx, out)
    assert os.readlink(out / "lnk") == "/tmp"
    assert (out / "tmp/f").read_text() == "hello\n"
    assert (out / "tmp/from-archive").read_text() == "ar\n"


def test_failing_run_names_line_stage_and_output(cache: Path, tmp_path: Path) -> None:
    text = f"FROM {BASE} AS broken\nRUN echo first line && echo oops >&2 && exit 3\n"
    ctx = write_context(tmp_path / "ctx", text)
    proc = run_cli("build", "--progress", "plain", str(ctx), cache=cache, check=False)
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    assert "Dockerfile:2" in error[0] and "broken" in error[0] and "exit code 3" in error[0]
    assert "oops" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_outputs_iidfile_metadata(cache: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import tarfile

    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY f /f\n", {"f": "x\n"})
    iid, meta = tmp_path / "iid", tmp_path / "meta.json"
    oci, docker, tar = tmp_path / "img.tar", tmp_path / "docker.tar", tmp_path / "rootfs.tar"
    run_cli(
        "build", "-t", "cli:1", "--iidfile", str(iid), "--metadata-file", str(meta),
        "-o", f"type=oci,dest={oci}", "-o", f"type=docker,dest={docker}", "-o", f"type=tar,dest={tar}",
        "--progress", "json", str(ctx), cache=cache,
    )  # fmt: skip
    data = json.loads(meta.read_text())
    assert data["containerimage.config.digest"] == iid.read_text()
    assert data["containerimage.digest"].startswith("sha256:")
    assert [s["cache"] for s in data["lamina.build.steps"]] == ["run"]
    with tarfile.open(tar) as t:
        assert "f" in t.getnames() and "bin/busybox" in t.getnames()
    with tarfile.open(docker) as t:
        member = t.extractfile("manifest.json")
        assert member is not None
        assert json.loads(member.read())[0]["RepoTags"] == ["cli:1"]
    checker = Path("/work/shared/bench/oci_check.py")
    if checker.exists():
        proc = subprocess.run([sys.executable, str(checker), str(oci)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_progress_json_events(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN true\n")
    proc = run_cli("build", "--progress", "json", str(ctx), cache=cache)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["type"] == "step"]
    # As BuildKit numbers them, the FROM of an image is the stage's step 1.
    assert [(e["step"], e["instruction"], e["status"]) for e in steps] == [
        (1, f"FROM {BASE}", "done"),
        (2, "RUN true", "running"),
        (2, "RUN true", "done"),
    ]
    assert events[-1]["type"] == "summary"
    again = run_cli("build", "--progress", "json", str(ctx), cache=cache)
    statuses = [json.loads(x)["status"] for x in again.stderr.splitlines() if '"type": "step"' in x]
    assert statuses == ["cached", "cached"]


def test_built_line_shows_the_image_id_that_quiet_prints(cache: Path, tmp_path: Path) -> None:
    # docker build -q prints the image ID (config digest); the plain summary must show that same
    # digest as the image, on a build and on a no-op replay. Only the store takes the image, so
    # its manifest is made on first use (cache.store), as docker's image store names only the ID;
    # with --metadata-file (whose containerimage.digest names it) the manifest digest is shown.
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN echo new > /new\n")
    first = run_cli("build", "--progress", "plain", str(ctx), cache=cache)
    again = run_cli("build", "--progress", "plain", str(ctx), cache=cache)
    image_id = run_cli("build", "-q", str(ctx), cache=cache).stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id)
    for proc in (first, again):
        assert re.search(rf"^built image {image_id} \(manifest made on first use\) in ", proc.stderr, re.M)
    meta = tmp_path / "meta.json"
    named = run_cli("build", "--progress", "plain", "--metadata-file", str(meta), str(ctx), cache=cache)
    manifest = json.loads(meta.read_text())["containerimage.digest"]
    assert re.search(rf"^built image {image_id} \(manifest {manifest}\) in ", named.stderr, re.M)


def test_source_date_epoch_gives_byte_identical_tarballs(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nRUN echo hi > /hi\nCOPY f /f\n", {"f": "x\n"})
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={first}"], build_args={"SOURCE_DATE_EPOCH": "1700000000"})
    result = build(
        cache, ctx, outputs=[f"type=oci,dest={second}"], no_cache=True, source_date_epoch=1700000000
    )
    assert cached_steps(result) == [False, False]
    assert first.read_bytes() == second.read_bytes()
    assert result.config.created == "2023-11-14T22:13:20Z"
    assert all(h.created == "2023-11-14T22:13:20Z" for h in result.config.history[-2:])


def test_missing_base_image_is_one_line_error(cache: Path, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "ctx", "FROM 127.0.0.1:9/nosuch/image:1\nRUN true\n")
    proc = run_cli("build", str(ctx), cache=cache, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nosuch/image" in proc.stderr


def test_from_platform_base_of_another_platform(cache: Path, tmp_path: Path) -> None:
    from lamina.engine.model import PLATFORM

    ok = write_context(tmp_path / "ok", f"FROM --platform=$BUILDPLATFORM {BASE}\nRUN true\n")
    assert build(cache, ok).config.architecture == PLATFORM.split("/")[1]
    other = "linux/s390x" if not PLATFORM.endswith("s390x") else "linux/amd64"
    # The base holds the host's image only: BuildKit builds on it and warns, and so does lamina.
    odd = write_context(tmp_path / "odd", f"FROM --platform={other} {BASE}\nCOPY Dockerfile /d\n")
    result = build(cache, odd)
    (warning,) = [w for w in result.checks if w.rule == "InvalidBaseImagePlatform"]
    assert warning.detail == (
        f'Base image {BASE} was pulled with platform "{PLATFORM}", expected "{other}" for current build'
    )
    assert warning.start_line == 1


def test_copy_flags_link_exclude_parents_chmod(cache: Path, tmp_path: Path) -> None:
    text = f"""\
FROM {BASE} AS src
RUN mkdir -p /stage/x && echo s > /stage/x/s.txt

FROM {BASE}
COPY --link files/ /linked/
COPY --exclude=*.log files/ /filtered/
COPY --parents tree/./a/b/c.txt /parents/
COPY --chmod=600 files/keep.txt /etc/private.txt
COPY --from=0 /stage/x /fromindex/
ADD --chown=nobody:nogroup --chmod=604 files/keep.txt /added.txt
"""
    files = {"files/keep.txt": "k\n", "files/drop.log": "d\n", "tree/a/b/c.txt": "c\n"}
    ctx = write_context(tmp_path / "ctx", text, files)
    out, archive = tmp_path / "out", tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=local,dest={out}", f"type=oci,dest={archive}"])
    assert sorted(p.name for p in (out / "linked").iterdir()) == ["drop.log", "keep.txt"]
    assert sorted(p.name for p in (out / "filtered").iterdir()) == ["keep.txt"]
    assert (out / "parents/a/b/c.txt").read_text() == "c\n"
    # (into /etc, which exists: a /modes COPY made would be 0600 itself, which an
    # unprivileged local export cannot enter)
    assert (out / "etc/private.txt").stat().st_mode & 0o777 == 0o600
    assert (out / "fromindex/s.txt").read_text() == "s\n"
    added = image_entries(archive)["added.txt"]
    assert added.mode & 0o777 == 0o604
    if os.geteuid() == 0 or _has_id_range():
        assert (added.uid, added.gid) == (65534, 65534)


def _has_id_range() -> bool:
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    return detect_ids().mode is IdMode.SUBORDINATE


def test_run_network_none_user_and_target(cache: Path, tmp_path: Path) -> None:
    # Without subordinate ids only root exists in the sandbox: USER root then.
    user = "nobody" if _has_id_range() or os.geteuid() == 0 else "root"
    text = f"""\
FROM {BASE} AS first
RUN --network=none sh -c 'ip route 2>/dev/null | grep -q default && echo route || echo isolated' > /net
USER {user}
RUN id -u > /tmp/uid

FROM first AS second
RUN exit 1
"""
    ctx = write_context(tmp_path / "ctx", text)
    out = tmp_path / "out"
    result = build(cache, ctx, target="first", outputs=[f"type=local,dest={out}"], labels={"k": "v"})
    assert (out / "net").read_text() == "isolated\n"
    assert (out / "tmp/uid").read_text() == ("65534\n" if user == "nobody" else "0\n")
    assert dict(result.config.config.labels)["k"] == "v", "--label lands on the target"
    assert all(step.stage == "first" for step in result.steps), "the target's dependents never run"


def test_zstd_compression_and_jobs(cache: Path, tmp_path: Path) -> None:
    import tarfile

    ctx = write_context(tmp_path / "ctx", f"FROM {BASE}\nCOPY f /f\n", {"f": "z\n"})
    archive = tmp_path / "img.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"], compression="zstd", jobs=1)
    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(tar.extractfile(f"blobs/sha256/{digest}").read())  # type: ignore[union-attr]
    assert manifest["layers"][-1]["mediaType"].endswith("+zstd")
    assert image_entries(archive)["f"].size == 2


def test_copy_from_keeps_the_stage_owners(cache: Path, tmp_path: Path) -> None:
    needs_id_range()
    text = f"""\
FROM {BASE} AS owner
RUN mkdir -p /out/sub && echo x > /out/sub/f && chown -R nobody:nogroup /out/sub

FROM {BASE}
COPY --from=owner /out/ /copied/
"""
    ctx = write_context(tmp_path / "ctx", text)
    archive = tmp_path / "image.tar"
    build(cache, ctx, outputs=[f"type=oci,dest={archive}"])
    entries = image_entries(archive)
    assert (entries["copied/sub/f"].uid, entries["copied/sub/f"].gid) == (65534, 65534)
    assert entries["copied/sub"].uid == 65534
    assert entries["copied"].uid == 0


def test_independent_stages_run_at_the_same_time(cache: Path, tmp_path: Path) -> None:
    # Each stage leaves a mark in a shared cache mount and waits for the other's:
    # run one after the other, the first would give up after 60 s and fail.
    wait = (
        "touch /meet/{me}; i=0; while [ ! -e /meet/{other} ]; do "
        "i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done"
    )
    mount = "--mount=type=cache,id=meet,target=/meet,sharing=shared"
    text = f"""\
FROM {BASE} AS left
RUN {mount} {wait.format(me="left", other="right")}

FROM {BASE} AS right
RUN {mount} {wait.format(me="right", other="left")}

FROM {BASE}
COPY --from=left /etc/passwd /left
COPY --from=right /etc/passwd /right
"""
    ctx = write_context(tmp_path / "ctx", text)
    result = build(cache, ctx, jobs=2)
    assert {s.stage for s in result.steps} == {"left", "right", "stage-2"}
