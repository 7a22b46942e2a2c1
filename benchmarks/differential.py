"""Build the example Dockerfiles with lamina and with BuildKit; diff root filesystems and configs.

    .venv/bin/python benchmarks/differential.py [examples/NAME ...] [--keep DIR]

Needs dockerd (../shared/bench/peers-setup.sh starts one) and the base image
lamina-test/busybox:1.35 loaded into both lamina's store and docker. For each
example directory (default: every examples/*/Dockerfile):

- lamina: `lamina build -o type=local,dest=...` and the image config;
- BuildKit: `DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none`, then
  `docker create` + `docker export` for the root filesystem (extracted as
  root so owners survive) and `docker image inspect` for the config.

Trees are compared path by path: type, mode, owner, size and sha256 of
files, symlink targets (mtimes are not compared: they are build times).
Paths that `docker create` itself adds to a container are skipped. Configs
are compared field by field (Env, Cmd, Entrypoint, WorkingDir, User, Labels,
ExposedPorts, Volumes, StopSignal, Healthcheck, Shell, OnBuild) and by the
history's created_by lines. Differences listed in EXPLAINED are reported as
explained (see the README's "Differences from BuildKit"); any other makes
the exit status 1. Without docker the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker"
BASE = "lamina-test/busybox:1.35"
# What `docker create`/`docker export` put into every container's filesystem.
CONTAINER_ARTIFACTS = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab"}
CONTAINER_DIRS = ("dev", "proc", "sys")
CONFIG_FIELDS = (
    "Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "Volumes",
    "StopSignal", "Healthcheck", "Shell", "OnBuild",
)  # fmt: skip
# (example, what) pairs whose difference is deliberate; see README.
EXPLAINED: dict[str, str] = {
    "history:empty-layer": "lamina drops a step's layer when the step changed nothing (BuildKit keeps "
    "an empty tar); the history line is the same, only empty_layer differs",
}


def run(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def describe_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for base, dirs, files in os.walk(root):
        rel_base = os.path.relpath(base, root)
        for name in sorted(dirs + files):
            rel = os.path.normpath(os.path.join(rel_base, name))
            if rel in CONTAINER_ARTIFACTS or rel.split("/")[0] in CONTAINER_DIRS:
                continue
            st = os.lstat(os.path.join(base, name))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_uid, st.st_gid, os.readlink(os.path.join(base, name)))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(mode), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                with open(os.path.join(base, name), "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                out[rel] = ("file", oct(mode), st.st_uid, st.st_gid, st.st_size, digest)
            else:
                out[rel] = ("other", oct(st.st_mode), st.st_uid, st.st_gid, st.st_rdev)
    return out


Result = tuple[dict[str, tuple[Any, ...]], dict[str, Any], list[tuple[str, bool]]]


def lamina_build(example: Path, work: Path) -> Result:
    sys.path.insert(0, str(ROOT))
    from lamina import api

    dest = work / "lamina-root"
    result = api.build(example, outputs=[f"type=local,dest={dest}"])
    config = json.loads(result.config.to_bytes())
    history = [(h.get("created_by", ""), h.get("empty_layer", False)) for h in config.get("history", [])]
    return describe_tree(dest), config.get("config", {}), history


def buildkit_build(example: Path, work: Path) -> Result:
    tag = f"lamina-diff/{example.name}:bk"
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    run(DOCKER, "build", "--network=none", "-q", "-t", tag, str(example), env=env)
    container = run(DOCKER, "create", tag).strip()
    archive = work / "bk.tar"
    try:
        run(DOCKER, "export", "-o", str(archive), container)
    finally:
        run(DOCKER, "rm", container)
    dest = work / "bk-root"
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest, numeric_owner=True, filter="tar")
    inspect = json.loads(run(DOCKER, "image", "inspect", tag))[0]
    lines = run(DOCKER, "image", "history", "--no-trunc", "--format", "{{.CreatedBy}}\t{{.Size}}", tag)
    history = []
    for line in reversed(lines.strip().splitlines()):
        created_by, _, size = line.partition("\t")
        history.append((created_by, size in ("0B", "0")))
    return describe_tree(dest), inspect.get("Config", {}), history


def compare(name: str, lamina: Result, buildkit: Result) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    explained: list[str] = []
    tree_l, config_l, history_l = lamina
    tree_b, config_b, history_b = buildkit
    for path in sorted(set(tree_l) | set(tree_b)):
        if tree_l.get(path) != tree_b.get(path):
            problems.append(f"{name}: /{path}: lamina {tree_l.get(path)} != buildkit {tree_b.get(path)}")
    for field in CONFIG_FIELDS:
        left, right = config_l.get(field) or None, config_b.get(field) or None
        if left != right:
            problems.append(f"{name}: config {field}: lamina {left!r} != buildkit {right!r}")
    lines_l = [line for line, _ in history_l]
    lines_b = [line for line, _ in history_b]
    if lines_l[-len(lines_b) :] != lines_b[-len(lines_l) :]:
        problems.append(f"{name}: history: lamina {lines_l} != buildkit {lines_b}")
    elif [e for _, e in history_l] != [e for _, e in history_b]:
        explained.append(f"{name}: history empty_layer flags differ ({EXPLAINED['history:empty-layer']})")
    return problems, explained


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("examples", nargs="*", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the trees here instead of a temp dir")
    args = parser.parse_args()
    if not Path(DOCKER).exists() or subprocess.run([DOCKER, "info"], capture_output=True).returncode:
        print("differential: skipped, no working dockerd (run ../shared/bench/peers-setup.sh as root)")
        return
    examples = args.examples or sorted(p.parent for p in (ROOT / "examples").glob("*/Dockerfile"))
    all_problems: list[str] = []
    for example in examples:
        work = Path(tempfile.mkdtemp(prefix=f"diff-{example.name}-", dir=args.keep))
        try:
            problems, explained = compare(
                example.name, lamina_build(example, work), buildkit_build(example, work)
            )
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        for line in explained:
            print(f"explained  {line}")
        for line in problems:
            print(f"DIFFERENT  {line}")
        print(f"{example.name}: {'identical' if not problems else f'{len(problems)} difference(s)'}")
        all_problems += problems
    sys.exit(1 if all_problems else 0)


if __name__ == "__main__":
    main()
