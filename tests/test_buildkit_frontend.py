"""BuildKit's frontend integration tests, ported as data (tests/conformance/buildkit/).

Each case is a TOML file named after the upstream Go test (and a suffix when
one Go test makes several cases): the Dockerfile, the context, the build
args and what the Go test asserts, as `expect_*` tables. The runner builds
with a local export and checks those facts; `expect_error` cases must fail
with every listed fragment in the message (the information BuildKit gives,
not its exact wording). See the directory's README for the format and the
upstream commit; `count.py` there prints how much of the suite is ported.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
import time
import tomllib
import unittest.mock
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.build import BASE, build, image_entries, make_cache, needs_id_range, oci_manifest
from tests.support.servers import loopback_server, serve_directory

BUILDKIT = Path(__file__).parent / "conformance" / "buildkit"
CASES = BUILDKIT / "cases"

# /etc/passwd and /etc/group of docker.io/library/busybox, for cases whose
# Dockerfile names its users and groups ({ETC} copies them in).
ETC_PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
ETC_GROUP = """root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nobody:x:65534:
"""


def xfails() -> dict[str, str]:
    """skipped.tsv's expected failures: upstream test -> what differs (reason `fails: ...`)."""
    out = {}
    for line in (BUILDKIT / "skipped.tsv").read_text().splitlines()[1:]:
        name, reason = line.split("\t")
        if reason.startswith("fails: "):
            out[name] = reason.removeprefix("fails: ")
    return out


def _cases() -> list[Any]:
    params = []
    for path in sorted(CASES.glob("*.toml")):
        case = tomllib.loads(path.read_text())
        marks = [pytest.mark.sandbox] if case.get("sandbox") else []
        if "xfail" in case:
            marks.append(pytest.mark.xfail(reason=case["xfail"], strict=True))
        if "xfail_unprivileged" in case:
            unprivileged = os.geteuid() != 0
            marks.append(pytest.mark.xfail(unprivileged, reason=case["xfail_unprivileged"], strict=True))
        params.append(pytest.param(case, id=path.stem, marks=marks))
    return params


def _text(data: str) -> str:
    etc = "COPY --chmod=644 .etc/passwd .etc/group /etc/"
    return data.replace("{BASE}", BASE).replace("{ETC}", etc)


class _Steps:
    """A progress sink that keeps each step's label as BuildKit names its vertex, and the warnings."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.warnings: list[str] = []

    def step(self, event: Any) -> None:
        from lamina.engine.progress import step_label

        self.labels.append(step_label(event))

    def log(self, stage: str, index: int, line: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def finish(self, summary: Any) -> None:
        pass


def _write_tar(path: Path, members: list[dict[str, Any]]) -> None:
    """A tar archive of `members` (name, and data, or type = "dir" / "symlink" with linkname)."""
    with open(path, "wb") as out:
        _write_tar_to(out, members, gzip=path.name.endswith("gz"))


def _write_tar_to(out: Any, members: list[dict[str, Any]], gzip: bool = False) -> None:
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for member in members:
            info = tarfile.TarInfo(member["name"])
            info.mode = int(member.get("mode", "644"), 8)
            info.mtime = member.get("mtime", 0)
            data = _text(member.get("data", "")).encode()
            kind = member.get("type", "file")
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, member["linkname"]
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, member["linkname"]
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)


HTTP_MTIME = 1700000000  # Last-Modified of every served file: 2023-11-14T22:13:20Z


def _git_repo(repo: Path, commits: list[dict[str, Any]], object_format: str) -> None:
    """A git repository served by plain HTTP (`update-server-info`): each commit writes its
    `files`, and `branch` names the commit made so far."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (apt-get install git)")
    repo.mkdir()

    def git(*args: str) -> None:
        env = {
            **os.environ,
            "GIT_AUTHOR_DATE": "2023-11-14T22:13:20Z",
            "GIT_COMMITTER_DATE": "2023-11-14T22:13:20Z",
        }
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)

    git("init", "-q", "-b", "main", f"--object-format={object_format}")
    git("config", "--local", "user.email", "test@example.com")
    git("config", "--local", "user.name", "test")
    for commit in commits:
        if "from" in commit:  # a branch off an earlier commit: main restarts there
            git("checkout", "-q", "-B", "main", commit["from"])
        for name, data in commit.get("files", {}).items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(_text(data))
        git("add", "-A")
        git("commit", "-q", "-m", commit.get("message", "commit"))
        if "branch" in commit:
            git("branch", commit["branch"])
        if "tag" in commit:
            git("tag", commit["tag"])
    git("update-server-info")


def _rev_parse(repo: Path, rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", rev], cwd=repo, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@contextlib.contextmanager
def _http_server(root: Path, case: dict[str, Any]) -> Iterator[str]:
    """Serve `http` (path -> text; `/` is index.html) and `http_tars` on loopback; yields the base URL."""
    root.mkdir()
    for name, data in case.get("http", {}).items():
        (root / (name.strip("/") or "index.html")).write_text(_text(data))
    for name, members in case.get("http_tars", {}).items():
        _write_tar(root / name.strip("/"), members)
    for path in root.iterdir():
        os.utime(path, (HTTP_MTIME, HTTP_MTIME))
    if "git_commits" in case:
        _git_repo(root / "repo", case["git_commits"], case.get("git_object_format", "sha1"))
    with serve_directory(root, last_modified=case.get("http_last_modified", True)) as url:
        yield url


def _write_files(ctx: Path, case: dict[str, Any]) -> None:
    for name in case.get("remove", []):
        if (ctx / name).is_dir() and not (ctx / name).is_symlink():
            shutil.rmtree(ctx / name)
        else:
            (ctx / name).unlink()
    for name, data in case.get("files", {}).items():
        path = ctx / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(_text(data))
    for name, target in case.get("symlinks", {}).items():
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ctx / name)
    for name in case.get("sockets", []):
        with socket.socket(socket.AF_UNIX) as sock:  # closing leaves the socket file behind
            sock.bind(os.fspath(ctx / name))
    for name, members in case.get("tar_files", {}).items():
        _write_tar(ctx / name, members)
    for name, mode in case.get("file_modes", {}).items():
        os.chmod(ctx / name, int(mode, 8))


def _write_files_in(root: Path, files: dict[str, str]) -> None:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(data)


def _write_context(ctx: Path, case: dict[str, Any]) -> None:
    ctx.mkdir()
    if "dockerfile" in case:
        name = ctx / case.get("dockerfile_name", "Dockerfile")
        name.parent.mkdir(parents=True, exist_ok=True)
        name.write_text(_text(case["dockerfile"]))
        if "{ETC}" in case["dockerfile"]:
            (ctx / ".etc").mkdir()
            (ctx / ".etc/passwd").write_text(ETC_PASSWD)
            (ctx / ".etc/group").write_text(ETC_GROUP)
    _write_files(ctx, case)


def _check_tree(out: Path, case: dict[str, Any]) -> None:
    for name, content in case.get("expect_files", {}).items():
        path = out / name
        assert path.is_file() and not path.is_symlink(), f"{name}: not a regular file"
        assert path.read_text() == content, name
    for name in case.get("expect_dirs", []):
        assert (out / name).is_dir(), f"{name}: not a directory"
    for name, target in case.get("expect_links", {}).items():
        assert os.readlink(out / name) == target, name
    for name in case.get("expect_empty_dirs", []):
        assert (out / name).is_dir() and not any((out / name).iterdir()), f"{name}: not an empty directory"
    for name in case.get("expect_absent", []):
        assert not os.path.lexists(out / name), f"{name}: exists"
    for name, mode in case.get("expect_modes", {}).items():
        assert stat.S_IMODE((out / name).lstat().st_mode) == int(mode, 8), name
    for name, mtime in case.get("expect_mtimes", {}).items():
        assert (out / name).lstat().st_mtime == mtime, f"{name}: mtime {(out / name).lstat().st_mtime}"
    for first, second in case.get("expect_hardlinks", []):
        assert os.path.samefile(out / first, out / second), f"{first} and {second}: not one file"
    for name, lines in case.get("expect_lines", {}).items():
        text = (out / name).read_text()
        for line in lines:
            assert line in text.splitlines(), f"{name}: no line {line!r} in {text!r}"
    for name, fragments in case.get("expect_in", {}).items():
        text = (out / name).read_text()
        for fragment in fragments:
            assert fragment in text, f"{name}: no {fragment!r} in {text!r}"
    for name, fragments in case.get("expect_not_in", {}).items():
        text = (out / name).read_text()
        for fragment in fragments:
            assert fragment not in text, f"{name}: {fragment!r} in {text!r}"


def _check_config(result: Any, case: dict[str, Any]) -> None:
    config = result.config.config.to_json()
    for key, value in case.get("expect_config", {}).items():
        assert config.get(key) == value, f"config {key}: {config.get(key)!r}"
    for key in case.get("expect_config_unset", []):
        assert key not in config, f"config {key}: {config[key]!r}, expected unset"
    for entry in case.get("expect_env", []):
        assert entry in config.get("Env", []), f"no {entry} in Env {config.get('Env')}"
    history = [h.to_json() for h in result.config.history]
    for index, fields in case.get("expect_history", {}).items():
        for key, value in fields.items():  # a text is a fragment of the field, as upstream's Contains
            got = history[int(index)].get(key, False if isinstance(value, bool) else "")
            assert value in got if isinstance(value, str) else got == value, f"history[{index}]: {history}"


def _index_digest(text: str, tmp: Path) -> str:
    """{INDEX_DIGEST:dir}: the digest of the one manifest in the OCI layout `dir` under {TMP}."""

    def digest(found: re.Match[str]) -> str:
        manifests = json.loads((tmp / found.group(1) / "index.json").read_text())["manifests"]
        assert len(manifests) == 1, manifests
        return str(manifests[0]["digest"])

    return re.sub(r"\{INDEX_DIGEST:([^}]+)\}", digest, text)


# Keys of a case (and of a rebuild, which may change them) that are lamina.build's own arguments.
_BUILD_KEYS = frozenset(
    (
        *("build_args", "target", "no_cache", "no_cache_filter", "labels", "network", "allow"),
        *("cache_to", "cache_from", "ulimits", "shm_size", "add_hosts", "context_subdir", "ssh", "sbom"),
        "platforms",  # --platform (issue 17): a type=local output is then split per platform
        *("cgroup_parent", "memory"),  # --cgroup-parent, the frontend attribute memory=
    )
)


def _build(
    cache: Path, ctx: Path, out: Path, case: dict[str, Any], archive: Path | None = None, sink: Any = None
) -> Any:
    kwargs: dict[str, Any] = {"build_args": case.get("build_args", {}), "progress": sink}
    for key in _BUILD_KEYS - {"build_args"}:
        if key in case:
            kwargs[key] = case[key]
    for key in ("cache_to", "cache_from"):
        if key in case:
            kwargs[key] = [spec.replace("{TMP}", os.fspath(out.parent)) for spec in case[key]]
    if "secrets" in case:
        kwargs["secrets"] = [f"id={key},src={out.parent / 'secrets' / key}" for key in case["secrets"]]
    if "build_contexts" in case:  # {DIR:name} is a directory of `context_dirs`
        dirs = out.parent / "context-dirs"
        kwargs["build_contexts"] = [
            _index_digest(f"{name}={value}", out.parent)
            .replace("{DIR:", f"{dirs}/")
            .replace("}", "")
            .replace("{TMP", os.fspath(out.parent))
            for name, value in case["build_contexts"].items()
        ]
    if case.get("ssh_key"):  # --ssh default=KEYFILE: an RSA key made for the case (ssh-keygen)
        key = out.parent / "ssh-key"
        if not key.exists():
            if shutil.which("ssh-keygen") is None:
                pytest.skip("ssh-keygen is not installed (apt-get install openssh-client)")
            subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", key], check=True)
        kwargs["ssh"] = [f"default={key}"]
    if "external_dockerfile" in case:  # -f of an absolute path beside a URL context: the client's file
        external = out.parent / "external" / "Dockerfile"
        external.parent.mkdir(exist_ok=True)
        external.write_text(_text(case["external_dockerfile"]))
        kwargs["dockerfile"] = external
    if "dockerfile_path" in case:  # a remote context's is a name inside it
        kwargs["dockerfile"] = (
            case["dockerfile_path"] if "context_url" in case else ctx / case["dockerfile_path"]
        )
    outputs = [] if case.get("no_local_output") else [f"type=local,dest={out}"]
    outputs += [f"type=oci,dest={archive}{case.get('oci_output_attrs', '')}"] if archive else []
    outputs += [spec.replace("{TMP}", os.fspath(out.parent)) for spec in case.get("outputs", [])]
    if "context_url" in case:  # a remote context (git, HTTP) instead of the directory
        return build(cache, case["context_url"], outputs=outputs, **kwargs)
    if "stdin_tar" in case:  # the context is `-`: a tar of it on stdin
        buffer = io.BytesIO()
        _write_tar_to(buffer, case["stdin_tar"])
        buffer.seek(0)
        stdin = type("Stdin", (), {"buffer": buffer})()
        with unittest.mock.patch("sys.stdin", stdin):
            return build(cache, "-", outputs=outputs, **kwargs)
    return build(cache, ctx, outputs=outputs, **kwargs)


@pytest.mark.parametrize("case", _cases())
def test_buildkit_case(
    case: dict[str, Any], tmp_path: Path, busybox_image: Path, request: pytest.FixtureRequest
) -> None:
    if case.get("needs_id_range"):
        needs_id_range()
    if case.get("needs_default_network"):  # a build here falls back to an isolated one, with a warning
        from lamina.engine.sandbox.network import unavailable

        if why := unavailable():
            pytest.skip(why)
    if case.get("needs_root") and os.geteuid() != 0:  # upstream skips these rootless too
        pytest.skip("as BuildKit's test, root only (a rootless build has no such devices to give)")
    cache = make_cache(tmp_path, busybox_image)
    ctx, out = tmp_path / "ctx", tmp_path / "out"
    if case.get("registry"):  # {REGISTRY}: an open registry on loopback (tests/conftest.py)
        case = _with_registry(case, request.getfixturevalue("registry").host)
    with contextlib.ExitStack() as stack:
        if case.get("echo_server"):
            port = stack.enter_context(loopback_server(b"foo\n"))  # BuildKit's echoserver
            case = {**case, "dockerfile": case["dockerfile"].replace("{ECHO_PORT}", str(port))}
        if "http" in case or "http_tars" in case or "git_commits" in case:
            url = stack.enter_context(_http_server(tmp_path / "http", case))
            repo = tmp_path / "http" / "repo"

            def served(text: str) -> str:  # {COMMIT:rev} / {SHORT:rev}: a commit's hash, or 8 digits of it
                text = text.replace("{URL}", url)
                text = re.sub(r"\{COMMIT:([^}]+)\}", lambda m: _rev_parse(repo, m.group(1)), text)
                return re.sub(r"\{SHORT:([^}]+)\}", lambda m: _rev_parse(repo, m.group(1))[:8], text)

            case = {**case, "dockerfile": served(case.get("dockerfile", ""))}
            case["rebuilds"] = [
                {**again, "files": {k: served(v) for k, v in again.get("files", {}).items()}}
                for again in case.get("rebuilds", [])
            ]
            if "context_url" in case:
                case["context_url"] = served(case["context_url"])
            if "build_contexts" in case:
                case["build_contexts"] = {k: served(v) for k, v in case["build_contexts"].items()}
            case["expect_files"] = {k: served(v) for k, v in case.get("expect_files", {}).items()}
            if "expect_error" in case:
                case["expect_error"] = [served(fragment) for fragment in case["expect_error"]]
            if not case["dockerfile"]:
                del case["dockerfile"]
        _write_context(ctx, case)
        for name, files in case.get("context_dirs", {}).items():
            _write_files_in(tmp_path / "context-dirs" / name, files)
        for key, value in case.get("secrets", {}).items():
            (tmp_path / "secrets").mkdir(exist_ok=True)
            (tmp_path / "secrets" / key).write_text(value)
        if case.get("minbase"):  # a Debian root (tests/support/minbase), ADDed as minbase.tar
            from tests.support.minbase import minbase_tar, why_unavailable

            if (why := why_unavailable()) is not None:
                pytest.skip(why)
            shutil.copy(minbase_tar(), ctx / "minbase.tar")
        if case.get("ssh_agent"):  # an ssh-agent of the test's own, its debug log kept
            case = {**case, "ssh": [f"default={stack.enter_context(_ssh_agent(tmp_path / 'agent.log'))}"]}
        if "cdi_specs" in case:  # RUN --device's CDI specs, in a directory of their own
            (tmp_path / "cdi").mkdir()
            for name, text in case["cdi_specs"].items():
                (tmp_path / "cdi" / name).write_text(text)
            specs = {"LAMINA_CDI_SPEC_DIRS": os.fspath(tmp_path / "cdi")}
            stack.enter_context(unittest.mock.patch.dict(os.environ, specs))
        if "cgroup_parent" in case or "memory" in case:  # {CGROUP}: a parent cgroup made for the case
            case = stack.enter_context(_cgroup_case(case))
        if "source_policy" in case:  # buildx reads the file this variable names
            (tmp_path / "policy.json").write_text(case["source_policy"])
            variable = {"EXPERIMENTAL_BUILDKIT_SOURCE_POLICY": os.fspath(tmp_path / "policy.json")}
            stack.enter_context(unittest.mock.patch.dict(os.environ, variable))
        _run_case(case, cache, ctx, out, tmp_path, busybox_image)
        for name, served in case.get("expect_same_as_http", {}).items():
            data = (tmp_path / "http" / served.strip("/")).read_bytes()
            assert (out / name).read_bytes() == data, f"{name}: not the bytes served at {served}"
    if case.get("ssh_agent"):  # the agent has stopped: its whole log is there
        log = (tmp_path / "agent.log").read_text()
        for fragment in case.get("expect_agent_log_in", []):
            assert fragment in log, f"no {fragment!r} in the agent's log:\n{log}"
        for fragment in case.get("expect_agent_log_not_in", []):
            assert fragment not in log, f"{fragment!r} in the agent's log:\n{log}"


@contextlib.contextmanager
def _cgroup_case(case: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The case with {CGROUP} a new cgroup (`cgroup_pids_max` its pids.max) where the build may
    give a RUN a cgroup (root); where it cannot, the case expects lamina's one-line refusal."""
    from lamina.engine.sandbox import cgroups

    name = f"lamina-test.{os.getpid()}.{time.monotonic_ns()}"
    case = json.loads(json.dumps(case).replace("{CGROUP}", name))
    if why := cgroups.why_not(os.geteuid() != 0):  # rootless on cgroup v1: refused, never ignored
        flags = [
            flag for key, flag in (("cgroup_parent", "--cgroup-parent"), ("memory", "memory=")) if key in case
        ]
        yield {**case, "expect_error": [" and ".join(flags), why]}
        return
    if os.geteuid() != 0:
        pytest.skip("as BuildKit's test, root only (the parent cgroup is made at the hierarchy's top)")
    found = cgroups.hierarchies()
    v2 = any(h.version == 2 and h.mount == "/sys/fs/cgroup" for h in found)
    pids = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/pids"
    os.mkdir(f"{pids}/{name}")
    try:
        if "cgroup_pids_max" in case:
            Path(f"{pids}/{name}/pids.max").write_text(str(case["cgroup_pids_max"]))
        yield case
    finally:
        for h in found:  # the step's cgroup is gone; BuildKit leaves <parent>/buildkit, the test removes it
            for left in (f"{h.mount}/{name}/buildkit", f"{h.mount}/{name}"):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(left)


@contextlib.contextmanager
def _ssh_agent(log: Path) -> Iterator[str]:
    """`ssh-agent -d` on a socket of a short path (a unix socket's is limited), its stderr to `log`."""
    import tempfile

    if shutil.which("ssh-agent") is None:
        pytest.skip("ssh-agent is not installed (apt-get install openssh-client)")
    home = tempfile.mkdtemp(prefix="lamina-agent-")
    sock = os.path.join(home, "agent.sock")
    with open(log, "wb") as err:
        agent = subprocess.Popen(["ssh-agent", "-s", "-d", "-a", sock], stdout=subprocess.DEVNULL, stderr=err)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        assert os.path.exists(sock), log.read_text()
        yield sock
    finally:
        agent.terminate()
        agent.wait()
        shutil.rmtree(home, ignore_errors=True)


def _check_attestations(archive: Path, predicates: dict[str, Any]) -> None:
    """Of each predicate type among the archive's statements, the predicate `predicates` gives (a subset)."""
    by_type = {statement["predicateType"]: statement for statement in _statements(archive)}
    for predicate_type, predicate in predicates.items():
        statement = by_type.get(predicate_type)
        assert statement is not None, f"no {predicate_type} statement among {sorted(by_type)}"
        assert statement["_type"] == "https://in-toto.io/Statement/v1", statement
        _subset(predicate, statement["predicate"], predicate_type)


def _check_attestation_names(archive: Path, counts: dict[str, int]) -> None:
    """The archive's statements, counted by their predicate's `name`: exactly `counts`."""
    import collections

    found = collections.Counter(str(s["predicate"].get("name")) for s in _statements(archive))
    assert dict(found) == counts, f"{archive.name}: statements by name {dict(found)}"


def _statements(archive: Path) -> list[Any]:
    """An OCI archive's index holds the image and one attestation manifest (unknown/unknown):
    the in-toto statements that are its layers."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            found = tar.extractfile("blobs/" + digest.replace(":", "/"))
            assert found is not None, digest
            return json.loads(found.read())

        listing = tar.extractfile("index.json")
        assert listing is not None
        top = blob(json.loads(listing.read())["manifests"][0]["digest"])
        platforms = [entry.get("platform", {}) for entry in top["manifests"]]
        assert len(platforms) == 2 and platforms[1] == {"architecture": "unknown", "os": "unknown"}, platforms
        return [blob(layer["digest"]) for layer in blob(top["manifests"][1]["digest"])["layers"]]


def _with_registry(case: dict[str, Any], host: str) -> dict[str, Any]:
    """The case with every {REGISTRY} (cache specs, outputs, Dockerfiles, expectations) as `host`."""
    return dict(json.loads(json.dumps(case).replace("{REGISTRY}", host)))


def _pulled(ref: str) -> tuple[str, list[dict[str, Any]]]:
    """What a plain-HTTP registry holds at `ref` (host/name:tag): the digest it names and, per image,
    its platform, config and the files of each layer (path -> bytes), as upstream's ReadImages."""
    import gzip
    import hashlib

    import httpx

    host, rest = ref.split("/", 1)
    name, tag = rest.rsplit(":", 1)
    accept = ", ".join(
        f"application/vnd.{kind}+json"
        for kind in (
            "oci.image.index.v1",
            "oci.image.manifest.v1",
            "docker.distribution.manifest.list.v2",
            "docker.distribution.manifest.v2",
        )
    )
    with httpx.Client(base_url=f"http://{host}/v2/{name}") as client:

        def get(kind: str, digest: str) -> bytes:
            response = client.get(f"/{kind}/{digest}", headers={"Accept": accept})
            response.raise_for_status()
            return response.content

        top = get("manifests", tag)
        digest = "sha256:" + hashlib.sha256(top).hexdigest()
        entries = json.loads(top).get("manifests", [{"digest": digest}])
        images = []
        for entry in entries:
            manifest = json.loads(get("manifests", entry["digest"]))
            if entry.get("platform", {}).get("os") == "unknown":  # an attestation manifest
                continue
            layers = []
            for layer in manifest["layers"]:
                data = get("blobs", layer["digest"])
                with tarfile.open(
                    fileobj=io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
                ) as tar:
                    layers.append({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})  # type: ignore[union-attr]
            config = json.loads(get("blobs", manifest["config"]["digest"]))
            # An image alone (no index) has its platform in its config, as ReadImages reads it.
            keys = ("os", "architecture", "variant", "os.version")
            platform = entry.get("platform") or {key: config[key] for key in keys if key in config}
            images.append({"platform": platform, "config": config, "layers": layers})
    return digest, images


def _platform_text(platform: dict[str, Any]) -> str:
    """os[(os.version)]/arch[/variant], as containerd's FormatAll."""
    version = f"({platform['os.version']})" if platform.get("os.version") else ""
    tail = f"/{platform['variant']}" if platform.get("variant") else ""
    return f"{platform.get('os')}{version}/{platform.get('architecture')}{tail}"


def _check_pushed(case: dict[str, Any], earlier: dict[str, str]) -> dict[str, str]:
    """`expect_pushed`: ref -> its images, by platform, each a JSON subset of its `config` and the
    `files` (path -> text) of its layer `layer`; `expect_pushed_count`, `expect_pushed_distinct`
    (ref -> a file that differs between its platforms) and `expect_same_pushed` (refs whose digest is
    the one the build before pushed). Returns ref -> digest for the next build."""
    refs = {*case.get("expect_pushed", {}), *case.get("expect_pushed_count", {})}
    refs |= {*case.get("expect_pushed_distinct", {}), *case.get("expect_same_pushed", [])}
    digests = {}
    for ref in sorted(refs):
        digest, images = _pulled(ref)
        digests[ref] = digest
        by_platform = {_platform_text(image["platform"]): image for image in images}
        if ref in case.get("expect_pushed_count", {}):
            assert len(images) == case["expect_pushed_count"][ref], f"{ref}: {sorted(by_platform)}"
        for platform, want in case.get("expect_pushed", {}).get(ref, {}).items():
            assert platform in by_platform, f"{ref}: no {platform} among {sorted(by_platform)}"
            image = by_platform[platform]
            _subset(want.get("config", {}), image["config"], f"{ref} {platform} config")
            for name, text in want.get("files", {}).items():
                layer = image["layers"][want.get("layer", -1)]
                assert layer.get(name, b"").decode().strip() == text, f"{ref} {platform}: {name}"
        if ref in case.get("expect_pushed_distinct", {}):
            name = case["expect_pushed_distinct"][ref]
            found = [next(la[name] for la in i["layers"] if name in la) for i in images]
            assert len(set(found)) == len(found) > 1, f"{ref}: {name} the same for every platform"
        if ref in case.get("expect_same_pushed", []):
            assert digest == earlier.get(ref), f"{ref}: {digest}, the build before pushed {earlier.get(ref)}"
    return digests


def _subset(expected: Any, actual: Any, where: str = "") -> None:
    """`expected` is within `actual`: dict keys recursively, lists item by item and of equal length."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key}: missing in {actual!r}"
            _subset(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            _subset(want, got, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: {actual!r}, expected {expected!r}"


def _run_call(case: dict[str, Any], cache: Path, ctx: Path) -> None:
    """A frontend method (buildx --call) instead of a build: its JSON against `expect_call`."""
    from lamina import api

    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    out, error, _ = api.call(
        case["call"] + ",format=json",
        ctx,
        target=case.get("target"),
        build_args=case.get("build_args", {}),
        cache_dir=cache,
        environ=env,
    )
    assert not error, error
    _subset(case["expect_call"], json.loads(out))


def _run_case(
    case: dict[str, Any], cache: Path, ctx: Path, out: Path, tmp_path: Path, busybox_image: Path
) -> None:
    if "call" in case:
        _run_call(case, cache, ctx)
        return
    base_created = ""
    for number, image in enumerate(case.get("images", [])):
        # An image upstream pushes to a registry and builds FROM: here it goes into the store.
        image_ctx = tmp_path / f"image{number}"
        _write_context(image_ctx, image)
        outputs = [spec.replace("{TMP}", os.fspath(tmp_path)) for spec in image.get("outputs", [])]
        tags = [image["tag"]] if "tag" in image else []
        made = build(cache, image_ctx, tags=tags, outputs=outputs, build_args=image.get("build_args", {}))
        if "expect_newer_than" in case:
            base_created = made.config.created
            time.sleep(1.1)  # image times have whole seconds: the next build's must be later
    if "expect_error" in case:
        with pytest.raises(Exception) as caught:
            _build(cache, ctx, out, case)
        for fragment in case["expect_error"]:
            assert fragment in str(caught.value)
        return
    wants_archive = {
        "expect_owners",
        "expect_last_layer_annotations",
        "expect_first_layer_annotations",
    } & set(case)
    archive = tmp_path / "image.tar" if wants_archive else None
    sink = _Steps()
    result = _build(cache, ctx, out, case, archive, sink)
    _check_tree(out, case)
    for name, source in case.get("expect_same_as_context", {}).items():
        assert (out / name).read_bytes() == (ctx / source).read_bytes(), f"{name}: not the bytes of {source}"
    _check_config(result, case)
    for name, members in case.get("expect_tar_members", {}).items():
        with tarfile.open(tmp_path / name) as tar:
            for member, data in members.items():
                found = tar.extractfile(member)
                assert found is not None and found.read().decode() == data, f"{name}: {member}"
    for name, predicates in case.get("expect_attestations", {}).items():
        _check_attestations(tmp_path / name, predicates)
    for name, counts in case.get("expect_attestation_names", {}).items():
        _check_attestation_names(tmp_path / name, counts)
    for name, expected in case.get("expect_json_files", {}).items():
        _subset(expected, json.loads((tmp_path / name).read_text()), name)
    image = result.config.to_json()
    if "expect_newer_than" in case:  # not the base image's time: the build's own
        assert image["created"] > base_created, (image["created"], base_created)
    if "expect_image_created" in case:  # the image's own time (a base image's history keeps its own)
        assert image["created"] == case["expect_image_created"], image["created"]
    if "expect_created" in case:  # the image's and every history entry's time
        times = [image.get("created")] + [h.get("created") for h in image.get("history", [])]
        assert set(times) == {case["expect_created"]}, times
    if "expect_layer_count" in case:
        assert len(image["rootfs"]["diff_ids"]) == case["expect_layer_count"], image["rootfs"]
    if "expect_history_count" in case:
        assert len(image.get("history", [])) == case["expect_history_count"], image.get("history")
    for key in case.get("expect_config_set", []):
        assert image["config"].get(key), f"config {key} unset"
    for label in case.get("expect_steps", []):
        assert label in sink.labels, f"no step {label!r} among {sink.labels}"
    for fragment in case.get("expect_warnings", []):
        assert any(fragment in warning for warning in sink.warnings), (
            f"no warning {fragment!r}: {sink.warnings}"
        )
    for which, position in (("first", 0), ("last", -1)):
        for key, value in case.get(f"expect_{which}_layer_annotations", {}).items():  # "": not there
            assert archive is not None
            layer = oci_manifest(archive)["layers"][position]
            assert layer.get("annotations", {}).get(key, "") == value, f"{which} layer: {key}"
    if archive is not None and "expect_owners" in case:
        entries = image_entries(archive)
        for name, owner in case["expect_owners"].items():
            info = entries[name]
            assert f"{info.uid}:{info.gid}" == owner, name
    pushed = _check_pushed(case, {})
    for number, again in enumerate(case.get("rebuilds", [])):
        # A later build of the same context, changed: which outputs must stay and which must change.
        _write_files(ctx, again)
        out2 = tmp_path / f"out{number + 2}"
        overrides = {k: v for k, v in again.items() if k in _BUILD_KEYS or k == "outputs"}
        if again.get("fresh_cache"):  # upstream prunes the daemon's cache: a store with the base only
            cache = make_cache(tmp_path / f"fresh{number + 2}", busybox_image)
        if "expect_error" in again:
            with pytest.raises(Exception) as caught:
                _build(cache, ctx, out2, {**case, **overrides})
            assert all(fragment in str(caught.value) for fragment in again["expect_error"]), caught.value
            continue
        result2 = _build(cache, ctx, out2, {**case, **overrides})
        if "expect_same_image" in again:
            assert (result2.image_digest == result.image_digest) is again["expect_same_image"], "image digest"
        for name in again.get("expect_same", []):
            assert (out2 / name).read_bytes() == (out / name).read_bytes(), (
                f"build {number + 2}: {name} changed"
            )
        for name in again.get("expect_changed", []):
            assert (out2 / name).read_bytes() != (out / name).read_bytes(), (
                f"build {number + 2}: {name} is the same"
            )
        _check_tree(out2, again)
        for name, counts in again.get("expect_attestation_names", {}).items():
            _check_attestation_names(tmp_path / name, counts)
        pushed = _check_pushed(again, pushed)
        out, result = out2, result2


def test_buildkit_skips_are_counted() -> None:
    """Every case names its upstream test; every skip has a reason; an xfail case is listed as failing."""
    names = {line.split("\t")[0] for line in (BUILDKIT / "upstream.tsv").read_text().splitlines()[1:]}
    listed = xfails()
    failing: set[str] = set()
    for line in (BUILDKIT / "skipped.tsv").read_text().splitlines()[1:]:
        name, reason = line.split("\t")
        assert name in names and reason, line
    for path in CASES.glob("*.toml"):
        case = tomllib.loads(path.read_text())
        assert case["upstream"] in names, path.name
        if "xfail" in case:
            assert case["upstream"] in listed, f"{path.name}: xfail but not in skipped.tsv as fails:"
        failing.update([case["upstream"]] if "xfail" in case else [])
    assert set(listed) <= failing, "skipped.tsv lists as failing a test with no xfail case"


_RUN = re.compile(r"^\s*(?:ONBUILD\s+)?RUN\b", re.MULTILINE | re.IGNORECASE)


def test_every_case_that_runs_a_command_is_a_sandbox_case() -> None:
    """`sandbox = true` is what puts a case in the rootless runs (tests/test_unprivileged.py):
    a case whose build runs a RUN (its own Dockerfile, an image's, a served one) must say so."""
    for path in sorted(CASES.glob("*.toml")):
        case = tomllib.loads(path.read_text())
        texts = [case.get("dockerfile", ""), case.get("external_dockerfile", "")]
        texts += [image.get("dockerfile", "") for image in case.get("images", [])]
        texts += [*case.get("http", {}).values()]
        texts += [text for commit in case.get("git_commits", []) for text in commit.get("files", {}).values()]
        # Refused before any step runs, or a --call (no build): nothing runs.
        no_step = ("expect_error" in case and not case.get("images")) or "call" in case
        if any(_RUN.search(text) for text in texts) and not no_step:
            assert case.get("sandbox"), f"{path.name}: runs RUN but is not marked sandbox = true"


def test_readme_states_the_current_count() -> None:
    """README.md's count and table of differences are what count.py makes of these files
    (after porting or skipping a test: python tests/conformance/buildkit/count.py --readme)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("buildkit_count", BUILDKIT / "count.py")
    assert spec is not None and spec.loader is not None
    count = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count)
    assert count.readme_text_block() == count.file_block(), (
        "stale: run tests/conformance/buildkit/count.py --readme"
    )


def test_proxy_env_from_build_args_deterministic_order() -> None:
    """BuildKit's TestProxyEnvFromBuildArgsDeterministicOrder: args sorted, the later spelling wins."""
    from lamina.engine.steps.run import proxy_env

    args = {"ALL_PROXY": "all-upper", "all_proxy": "all-lower", "HTTP_PROXY": "http-upper"}
    got = proxy_env(args | {"http_proxy": "http-lower", "NO_PROXY": "no-proxy", "FOO": "bar"})
    assert got == {
        "HTTP_PROXY": "http-lower",
        "http_proxy": "http-lower",
        "ALL_PROXY": "all-lower",
        "all_proxy": "all-lower",
        "NO_PROXY": "no-proxy",
        "no_proxy": "no-proxy",
    }
    assert proxy_env({"FOO": "bar"}) == {}


def test_plan_finds_a_lower_case_dockerfile(tmp_path: Path) -> None:
    """testDockerfileLowercase for `lamina plan`: with no -f, `dockerfile` when there is no `Dockerfile`."""
    from click.testing import CliRunner

    from lamina.cli import cli

    (tmp_path / "dockerfile").write_text("FROM scratch AS only\nCOPY dockerfile /found\n")
    result = CliRunner().invoke(cli, ["plan", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"Dockerfile: {tmp_path}/dockerfile" in result.output
    assert "target: only" in result.output


def test_a_windows_os_version_picks_as_containerd() -> None:
    """testPlatformWithOSVersion's pull: an index entry runs where --platform asks when its
    os.version has the same major.minor and build (from LTSC 2022 on, a build since the LTSC
    before); an unset version either side matches; other systems' versions are not compared."""
    from lamina.oci.image import Platform, platform_matches

    def runs(have: str, want: str, os: str = "windows") -> bool:
        return platform_matches(Platform("amd64", os, "", have), Platform("amd64", os, "", want))

    assert runs("1.1.0", "1.1.0") and not runs("1.2.3", "1.1.0") and not runs("1.1.0", "1.2.3")
    assert runs("10.0.20348.1006", "") and runs("", "10.0.17763")
    assert runs("10.0.17763.1", "10.0.17763") and not runs("10.0.17763", "10.0.19041")
    assert runs("10.0.20348", "10.0.26100") and not runs("10.0.17763", "10.0.26100")
    assert not runs("10.0.26100", "10.0.20348")
    assert runs("1.1.0", "1.2.3", os="linux")


@pytest.mark.parametrize("value", ["0", "-1", "64m", "1.5"])
def test_memory_is_a_number_of_bytes_above_zero(value: str, tmp_path: Path) -> None:
    """memory= as BuildKit's dockerui parses it: an integer of bytes, above 0; else refused."""
    from lamina import api
    from lamina.errors import PlanError

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(PlanError, match=f"invalid memory value: {re.escape(value)}: must be"):
        api.build(tmp_path, memory=value, cache_dir=tmp_path / "cache", dry_run=True)
