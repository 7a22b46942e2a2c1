"""lamina's filesystem exporters against BuildKit's: `-o type=tar` and `-o type=local`, entry by entry.

    .venv/bin/python benchmarks/differential_outputs.py [CASE_DIR ...] [--keep DIR]

benchmarks/differential.py compares lamina's tree with a BuildKit image as
`docker export` shows it; this script compares what the two exporters
write themselves. Each case (default: every examples/*/Dockerfile and
benchmarks/diffcases/*/Dockerfile without a `base/`, `served/`, `ssh` or
git context) is built by lamina and by docker 20.10's BuildKit
(`DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none -o ...`) with

- `type=tar,dest=F`: the members of both archives are compared by path:
  type, mode, owner (uid/gid), size, sha256 of content, link target
  (mtimes are build times and are not compared);
- `type=local,dest=DIR`: the trees are compared with differential.describe_tree.
  BuildKit's local exporter makes every file the caller's (its filesync
  receiver sets uid/gid to os.Getuid()/Getgid()); lamina as root keeps the
  image's owners (README: deliberate), so an owner-only difference where
  BuildKit shows the caller's ids is reported as explained;
- `type=tar,platform-split=true`: BuildKit 0.8 predates platform-split and
  ignores the attribute (its archive has no `linux_amd64/` directory);
  current BuildKit puts the tree under the platform's directory for an
  explicit `true`, as lamina does. The script prints what each wrote.

Docker 20.10's daemon has only the local and tar exporters (`exporter "oci"
could not be found`), so the image exporters' attributes (compression,
oci-mediatypes, annotations) have no peer here: tests/test_output_attrs.py
checks them against BuildKit's documented behaviour and source.

Differences the README explains for the image comparison (differential.EXPLAINED)
apply here too and are reported as explained; any other makes the exit
status 1. Without docker the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import differential as diff  # noqa: E402  (a sibling script)

Entry = tuple[Any, ...]


def tar_entries(path: Path) -> dict[str, Entry]:
    """Path -> (type, mode, uid, gid, size, sha256, link) of every member of a tar."""
    out: dict[str, Entry] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            name = member.name.lstrip("./").rstrip("/")
            if not name:
                continue
            digest = ""
            if member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                digest = hashlib.sha256(data.read()).hexdigest()
            kind = "hardlink" if member.islnk() else member.type.decode(errors="replace")
            out[name] = (kind, oct(member.mode), member.uid, member.gid, member.size, digest, member.linkname)
    return out


def buildkit(ctx: Path, output: str) -> None:
    diff.drop_syntax_directive(ctx / "Dockerfile")
    args = diff.read_build_args(ctx)
    flags = [part for key, value in args.items() for part in ("--build-arg", f"{key}={value}")]
    flags += [part for spec in diff.read_secrets(ctx) for part in ("--secret", spec)]
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    diff.run(diff.DOCKER, "build", "--network=none", "-q", *flags, "-o", output, str(ctx), env=env)


def lamina(ctx: Path, output: str) -> None:
    from lamina import api

    api.build(
        ctx,
        build_args=diff.read_build_args(ctx),
        secrets=diff.read_secrets(ctx),
        outputs=[output],
        no_cache=True,
    )


LOCAL_OWNERS = (
    "type=local: BuildKit's local exporter gives every file the caller's uid/gid (session/filesync "
    "syncTargetDiffCopy); lamina keeps the image's owners where it can (as root), README: deliberate"
)


def owner_only(ours: Entry | None, theirs: Entry | None) -> bool:
    """Same entry but for its owner, and BuildKit's owner is the caller's (its local exporter's rule)."""
    if ours is None or theirs is None or ours[0] != theirs[0]:
        return False
    caller = (os.getuid(), os.getgid())
    if ours[0] == "link":  # describe_tree: (kind, uid, gid, target)
        return ours[3:] == theirs[3:] and tuple(theirs[1:3]) == caller
    return ours[1] == theirs[1] and ours[4:] == theirs[4:] and tuple(theirs[2:4]) == caller


HARDLINK_ORDER = (
    "a hard-linked pair: a tar carries the data under the first of the paths it writes and links "
    "the other to it; the two writers order a directory's entries differently (same files extracted)"
)


def hardlink_order(ours: Entry | None, theirs: Entry | None) -> bool:
    """One side wrote the path as the pair's data, the other as a link to its twin: same mode, owner."""
    if ours is None or theirs is None:
        return False
    return {ours[0], theirs[0]} == {"0", "hardlink"} and ours[1:4] == theirs[1:4]


def compare_entries(
    name: str, what: str, ours: dict[str, Entry], theirs: dict[str, Entry], stubs: set[str] = frozenset()
) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    explained: list[str] = []
    for path in sorted(set(ours) | set(theirs)):
        a, b = ours.get(path), theirs.get(path)
        if a == b:
            continue
        reason = diff.EXPLAINED.get(f"{name}:/{path}") or next(
            (
                text
                for key, text in diff.EXPLAINED.items()
                if key.endswith("/") and f"{name}:/{path}".startswith(key)
            ),
            None,
        )
        if reason is None and what == "type=local" and owner_only(a, b):
            reason = LOCAL_OWNERS
        if reason is None and what == "type=tar" and hardlink_order(a, b):
            reason = HARDLINK_ORDER
        empty_dir = b in (("5", "0o755", 0, 0, 0, "", ""), ("dir", "0o755", 0, 0))
        if reason is None and a is None and path in stubs and empty_dir:
            reason = diff.EXPLAINED["tree:mount-stub"]
        line = f"{name} {what}: /{path}: lamina {a} != buildkit {b}"
        (explained if reason else problems).append(line + (f" ({reason})" if reason else ""))
    return problems, explained


def usable(case: Path) -> bool:
    """Cases whose build needs nothing but their directory (no base image build, server, agent, git)."""
    return not any((case / extra).exists() for extra in ("base", "served", "ssh", "git"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cases", nargs="*", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the outputs here instead of a temp dir")
    args = parser.parse_args()
    if (
        not Path(diff.DOCKER).exists()
        or subprocess.run([diff.DOCKER, "info"], capture_output=True).returncode
    ):
        print(
            "differential_outputs: skipped, no working dockerd (run ../shared/bench/peers-setup.sh as root)"
        )
        return
    cases = args.cases or sorted(
        path.parent
        for folder in ("examples", "benchmarks/diffcases")
        for path in (diff.ROOT / folder).glob("*/Dockerfile")
        if usable(path.parent)
    )
    all_problems: list[str] = []
    for case in cases:
        work = Path(tempfile.mkdtemp(prefix=f"diffout-{case.name}-", dir=args.keep))
        try:
            ctx_l = diff.stage_context(case, work / "lamina")
            ctx_b = diff.stage_context(case, work / "buildkit")
            lamina(ctx_l, f"type=tar,dest={work / 'lamina.tar'}")
            buildkit(ctx_b, f"type=tar,dest={work / 'buildkit.tar'}")
            stubs = diff.mount_stubs(case / "Dockerfile")
            problems, explained = compare_entries(
                case.name,
                "type=tar",
                tar_entries(work / "lamina.tar"),
                tar_entries(work / "buildkit.tar"),
                stubs,
            )
            lamina(ctx_l, f"type=local,dest={work / 'lamina-local'}")
            buildkit(ctx_b, f"type=local,dest={work / 'buildkit-local'}")
            more, more_explained = compare_entries(
                case.name,
                "type=local",
                diff.describe_tree(work / "lamina-local"),
                diff.describe_tree(work / "buildkit-local"),
                stubs,
            )
            problems += more
            explained += more_explained
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        diff.print_case(case.name, problems, explained, " (type=tar, type=local)")
        all_problems += problems
    split = Path(tempfile.mkdtemp(prefix="diffout-split-", dir=args.keep))
    try:
        ctx = diff.stage_context(cases[0], split / "ctx") if cases else None
        if ctx is not None:
            lamina(ctx, f"type=tar,dest={split / 'l.tar'},platform-split=true")
            buildkit(ctx, f"type=tar,dest={split / 'b.tar'},platform-split=true")
            tops_l = sorted({n.split("/")[0] for n in tar_entries(split / "l.tar")})[:3]
            tops_b = sorted({n.split("/")[0] for n in tar_entries(split / "b.tar")})[:3]
            print(f"platform-split=true: lamina's top level {tops_l}; BuildKit 0.8's {tops_b}")
    finally:
        if args.keep is None:
            shutil.rmtree(split, ignore_errors=True)
    sys.exit(1 if all_problems else 0)


if __name__ == "__main__":
    main()
