"""Failed RUN steps, kept so that a user can enter them (`lamina debug ID`).

When a RUN's command fails, its upper directory (everything the command
wrote before it failed) is moved, not removed, to
`<cache>/failures/<id>/upper`, and `failure.json` beside it says how the
step ran: the layer dirs below it, env, workdir, user, hostname, network,
mounts. `debug()` starts a sandbox over those layers with the kept upper dir
on top (as a lower dir: what the shell changes is thrown away) and the same
mounts, so the shell sees the filesystem the command left.

What is not kept: secret values (a secret given by environment variable, or
exposed as an environment variable, is left out and said so); a mount read
from a scratch tree of the build (a stage's files for `--mount=from=`, a
heredoc script) is copied into the failure's directory, as that tree is
removed when the build ends. At most `MAX_KEPT` failures are kept, the
oldest dropped first; `lamina cache prune` drops them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lamina.errors import BuildError, LaminaError

MAX_KEPT = 5
# A mount read from a build's scratch tree is copied into the failure up to this size; a
# failing step must not cost a copy of a whole builder stage.
MAX_COPY = 256 << 20
_DIR = "failures"


class FailureNotFound(LaminaError):
    pass


class RunFailed(BuildError):
    """A RUN's command failed; `debug_id` names its kept filesystem ("" when it could not be kept)."""

    def __init__(self, message: str, output_tail: tuple[str, ...] = (), debug_id: str = "") -> None:
        super().__init__(message, output_tail)
        self.debug_id = debug_id


def debug_id_of(err: BaseException | None) -> str:
    """The kept failure an error (or an error it was raised from) names, if any."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, RunFailed) and err.debug_id:
            return err.debug_id
        err = err.__cause__ or err.__context__
        seen += 1
    return ""


def keep_step(executor: Any, state: Any, instruction: Any, spec: Any) -> str:
    """Keep a failed RUN's upper dir and sandbox spec (steps.run); "" when it cannot be kept."""
    from lamina.engine.dockerfile.instructions import MountType
    from lamina.engine.sandbox.runner import remove_tree

    shell = state.config.config.shell or ("/bin/sh", "-c")
    secret_env = [m.env for m in instruction.mounts if m.type is MountType.SECRET and m.env]
    step = f"line {instruction.location.line}: {' '.join(instruction.original.split())}"
    try:
        return keep(
            executor.store.root,
            spec,
            spec.upper_dir,
            stage=state.name,
            step=step,
            shell=shell[:1],
            secret_env=secret_env,
            remove_tree=remove_tree,
        )
    except (OSError, LaminaError) as err:
        executor.warn_once(f"the failed step's filesystem could not be kept: {err}")
        return ""


@dataclasses.dataclass(frozen=True, slots=True)
class KeptFailure:
    """One failed RUN step as `lamina debug` needs it."""

    id: str
    path: Path  # <cache>/failures/<id>
    stage: str
    step: str  # "line 7: RUN make"
    created: float  # seconds since the epoch
    lower_dirs: tuple[str, ...]  # top-most first, as the step had them
    env: tuple[tuple[str, str], ...]
    cwd: str
    user: str
    hostname: str
    network: str
    insecure: bool
    shell: tuple[str, ...]  # the stage's SHELL: what `lamina debug ID` starts with no command
    mounts: tuple[dict[str, Any], ...]  # sandbox mounts as JSON (see _mount_json)
    left_out: tuple[str, ...]  # what could not be kept (secret values), said on entry
    extra_hosts: tuple[tuple[str, str], ...] = ()  # --add-host
    ulimits: tuple[tuple[str, int, int], ...] = ()  # --ulimit (name, soft, hard)
    shm_size: int = 0  # --shm-size
    platform: str = ""  # the step's platform when not the host's (its programs run emulated)

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    def disk_size(self) -> int:
        """Bytes it takes (lstat sizes; what cannot be read, in a subordinate id's dir, is not counted)."""
        total = 0
        for top, _dirs, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.lstat(os.path.join(top, name)).st_size
                except OSError:
                    continue
        return total


def failures_dir(store_root: Path) -> Path:
    return Path(store_root) / _DIR


def keep(
    store_root: Path,
    spec: Any,
    upper: Path,
    *,
    stage: str,
    step: str,
    shell: Sequence[str] = ("/bin/sh",),
    secret_env: Sequence[str] = (),
    remove_tree: Callable[[Path], None] | None = None,
) -> str:
    """Move a failed step's `upper` dir under the store's failures; return the failure's id.

    `spec` is the step's sandbox.SandboxSpec; `secret_env` names the variables
    that carry secrets (left out). Oldest failures past MAX_KEPT are removed
    with `remove_tree` (rootless: files of subordinate ids need the namespace).
    """
    root = failures_dir(store_root)
    root.mkdir(exist_ok=True)
    now = time.time()
    ident = hashlib.sha256(f"{now}:{os.getpid()}:{stage}:{step}:{upper}".encode()).hexdigest()[:12]
    path = root / ident
    path.mkdir()
    os.rename(upper, path / "upper")  # the same file system: the store's unpack dir
    left_out = [f"secret variable {name}" for name in secret_env]
    mounts = _kept_mounts(spec, path, (Path(store_root) / "tmp").resolve(), left_out)
    env = [(k, v) for k, v in spec.env if k not in secret_env]
    record = {
        "stage": stage,
        "step": step,
        "created": now,
        "lower_dirs": [str(p) for p in spec.lower_dirs],
        "env": env,
        "cwd": spec.cwd,
        "user": spec.user,
        "hostname": spec.hostname,
        "network": spec.network.value,
        "insecure": spec.insecure,
        "shell": list(shell),
        "mounts": mounts,
        "left_out": left_out,
        "extra_hosts": [list(pair) for pair in getattr(spec, "extra_hosts", ())],
        "ulimits": [[u.name, u.soft, u.hard] for u in getattr(spec, "ulimits", ())],
        "shm_size": getattr(spec, "shm_size", 0),
        "platform": str(spec.platform) if getattr(spec, "platform", None) is not None else "",
    }
    (path / "failure.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for old in list_failures(store_root)[:-MAX_KEPT]:
        remove(old, remove_tree)
    return ident


def _kept_mounts(spec: Any, path: Path, scratch: Path, left_out: list[str]) -> list[dict[str, Any]]:
    """The step's mounts as JSON; a source in the store's `scratch` (a build's own: gone after
    it) is copied under `path`. What cannot be kept is said in `left_out`."""
    mounts = []
    for i, mount in enumerate(spec.mounts):
        try:
            record = _mount_json(mount)
        except TypeError:
            left_out.append(f"the mount at {getattr(mount, 'target', '?')}")
            continue
        source = Path(record.get("source", "")).resolve() if record.get("source") else None
        if source is not None and scratch in source.parents:
            if record["type"] == "secret":
                left_out.append(f"secret {record['id']} (given by environment variable)")
                continue
            copy = path / "mounts" / str(i)
            copy.parent.mkdir(exist_ok=True)
            try:
                if _size(source) > MAX_COPY:
                    left_out.append(f"the mount at {record['target']} (over {MAX_COPY >> 20} MiB)")
                    continue
                if source.is_dir():
                    shutil.copytree(source, copy, symlinks=True)
                elif source.is_file():
                    shutil.copy2(source, copy)
                else:  # an ssh agent's relay socket lives only as long as the build
                    left_out.append(f"the mount at {record['target']} (not a file or directory)")
                    continue
            except OSError as err:
                left_out.append(f"the mount at {record['target']} ({err.strerror or err})")
                continue
            record["source"] = str(copy)
        mounts.append(record)
    return mounts


def _size(path: Path) -> int:
    """Bytes below `path` (lstat sizes), counting stops past MAX_COPY."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(top, name)).st_size
            if total > MAX_COPY:
                return total
    return total


def _mount_json(mount: Any) -> dict[str, Any]:
    from lamina.engine.sandbox.spec import BindMount, CacheMount, SecretMount, TmpfsMount

    if isinstance(mount, BindMount):
        return {
            "type": "bind",
            "source": str(mount.source),
            "target": mount.target,
            "readonly": mount.readonly,
            "discard_writes": mount.discard_writes,
        }
    if isinstance(mount, CacheMount):
        return {
            "type": "cache",
            "source": str(mount.source),
            "target": mount.target,
            "sharing": mount.sharing.value,
            "uid": mount.uid,
            "gid": mount.gid,
            "mode": mount.mode,
            "readonly": mount.readonly,
        }
    if isinstance(mount, TmpfsMount):
        return {"type": "tmpfs", "target": mount.target, "size": mount.size, "readonly": mount.readonly}
    if isinstance(mount, SecretMount):
        return {
            "type": "secret",
            "id": mount.id,
            "source": str(mount.source),
            "target": mount.target,
            "uid": mount.uid,
            "gid": mount.gid,
            "mode": mount.mode,
        }
    raise TypeError(f"unknown mount {mount!r}")


def _mount_from_json(record: dict[str, Any]) -> Any:
    from lamina.engine.sandbox.spec import BindMount, CacheMount, SecretMount, Sharing, TmpfsMount

    kind = record["type"]
    if kind == "bind":
        return BindMount(
            Path(record["source"]), record["target"], record["readonly"], record["discard_writes"]
        )
    if kind == "cache":
        sharing = Sharing(record["sharing"])
        return CacheMount(
            Path(record["source"]),
            record["target"],
            sharing,
            record["uid"],
            record["gid"],
            record["mode"],
            record.get("readonly", False),  # failures kept before read-only cache mounts
        )
    if kind == "tmpfs":
        return TmpfsMount(record["target"], record["size"], record.get("readonly", False))
    return SecretMount(
        record["id"], Path(record["source"]), record["target"], record["uid"], record["gid"], record["mode"]
    )


def _load(path: Path) -> KeptFailure | None:
    try:
        record = json.loads((path / "failure.json").read_text())
        return KeptFailure(
            id=path.name,
            path=path,
            stage=record["stage"],
            step=record["step"],
            created=float(record["created"]),
            lower_dirs=tuple(record["lower_dirs"]),
            env=tuple((k, v) for k, v in record["env"]),
            cwd=record["cwd"],
            user=record["user"],
            hostname=record["hostname"],
            network=record["network"],
            insecure=bool(record["insecure"]),
            shell=tuple(record["shell"]),
            mounts=tuple(record["mounts"]),
            left_out=tuple(record["left_out"]),
            extra_hosts=tuple((name, ip) for name, ip in record.get("extra_hosts", ())),
            ulimits=tuple((name, soft, hard) for name, soft, hard in record.get("ulimits", ())),
            shm_size=int(record.get("shm_size", 0)),
            platform=str(record.get("platform", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or by another version of lamina


def list_failures(store_root: Path) -> list[KeptFailure]:
    """The kept failures, oldest first."""
    root = failures_dir(store_root)
    try:
        paths = list(root.iterdir())
    except FileNotFoundError:
        return []
    found = [f for f in (_load(p) for p in paths if p.is_dir()) if f is not None]
    return sorted(found, key=lambda f: (f.created, f.id))


def find(store_root: Path, ident: str) -> KeptFailure:
    """The failure `ident` (or a unique prefix of it); `last` is the newest."""
    kept = list_failures(store_root)
    if not kept:
        raise FailureNotFound("no failed step is kept (a RUN that fails keeps its filesystem)")
    if ident == "last":
        return kept[-1]
    matches = [f for f in kept if f.id.startswith(ident)] if ident else []
    if len(matches) != 1:
        known = ", ".join(f.id for f in kept)
        why = "is ambiguous" if matches else "is not a kept failure"
        raise FailureNotFound(f"debug {ident}: {why} (kept: {known}; `lamina debug` lists them)")
    return matches[0]


def remove(failure: KeptFailure, remove_tree: Callable[[Path], None] | None = None) -> None:
    if remove_tree is not None:
        remove_tree(failure.path)
    else:
        shutil.rmtree(failure.path)


def prune(store_root: Path, remove_tree: Callable[[Path], None] | None = None) -> int:
    """Remove every kept failure (and any half-written one); return how many there were."""
    root = failures_dir(store_root)
    try:
        paths = [p for p in root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return 0
    for path in paths:
        if remove_tree is not None:
            remove_tree(path)
        else:
            shutil.rmtree(path)
    return len(paths)


def spec_for(failure: KeptFailure, argv: Sequence[str], scratch: Path) -> Any:
    """The sandbox spec that enters `failure`: its layers with the kept upper dir on top, its
    env, workdir, user, mounts; stdin, stdout and stderr are the caller's."""
    from lamina.engine.sandbox.spec import Network, SandboxSpec

    lowers = (failure.upper, *(Path(p) for p in failure.lower_dirs))
    missing = [p for p in lowers if not p.is_dir()]
    if missing:
        raise FailureNotFound(
            f"debug {failure.id}: a layer it ran on was removed ({missing[0]}); run the build again"
        )
    from lamina.engine.sandbox.spec import Ulimit

    run_flags: dict[str, Any] = {}  # as the step had them (--add-host, --ulimit, --shm-size)
    if failure.extra_hosts:
        run_flags["extra_hosts"] = failure.extra_hosts
    if failure.ulimits:
        run_flags["ulimits"] = tuple(Ulimit(*limit) for limit in failure.ulimits)
    if failure.shm_size:
        run_flags["shm_size"] = failure.shm_size
    if failure.platform:
        from lamina.oci.image import Platform

        run_flags["platform"] = Platform.parse(failure.platform)
    return SandboxSpec(
        **run_flags,
        argv=tuple(argv or failure.shell),
        lower_dirs=lowers,
        upper_dir=None,
        env=failure.env,
        cwd=failure.cwd,
        user=failure.user,
        hostname=failure.hostname,
        network=Network(failure.network),
        insecure=failure.insecure,
        mounts=tuple(_mount_from_json(m) for m in failure.mounts),
        stdin=None,
        stdout=None,
        stderr=None,
        scratch_dir=scratch,
    )


def enter(
    store_root: Path, ident: str, argv: Sequence[str] = (), on_warning: Callable[[str], None] | None = None
) -> int:
    """Run `argv` (default: the stage's shell) in the kept failure `ident`; return its exit code.

    stdin, stdout and stderr are the caller's: a terminal gets an interactive shell,
    a script on stdin is read by the shell. Nothing it changes is kept.
    """
    from lamina.engine.sandbox import run

    failure = find(store_root, ident)
    scratch = Path(store_root) / "tmp"
    scratch.mkdir(exist_ok=True)
    spec = spec_for(failure, argv, scratch)
    if on_warning is not None:
        for what in failure.left_out:
            on_warning(f"debug {failure.id}: {what} is not kept, so it is not there")
    return run(spec, on_warning=on_warning)
