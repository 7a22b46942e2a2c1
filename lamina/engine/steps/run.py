"""RUN: a command in a fresh sandbox over the stage's layers; its upper dir is the layer.

The command line is built as BuildKit builds it: exec form as given; shell
form wrapped in SHELL (default `/bin/sh -c`); a lone heredoc runs its body
with the shell, or, when the body starts with `#!`, as a script file
mounted read-only at /dev/pipes/NAME; other heredocs are appended to the
command text for the shell to read.

The key holds what the command can see: argv, the environment (ENV and
the stage's ARGs; never proxy values or secrets), user, working dir,
network, the mounts' specs, and the content of bind-mounted sources.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.cachekey import copy_from_key, make_inputs
from lamina.engine.steps import metadata as md
from lamina.engine.steps.layerstep import file_system_full, layer_step, step_env
from lamina.engine.steps.missfacts import bind_files, pending_mount
from lamina.errors import BuildError, SandboxError

if TYPE_CHECKING:
    from lamina.engine.model import StageState, StepHost
    from lamina.engine.plan import PlannedStage
    from lamina.oci.image import Platform

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_TAIL = 20  # lines of a failing step's output kept for the error
SANDBOX_HOSTNAME = "buildkitsandbox"  # BuildKit's default, so `hostname` output matches


def command_line(state: StageState, instruction: Any, pipes_dir: Path | None) -> tuple[list[str], str | None]:
    """(argv, script) for a RUN; `script` is a heredoc body to mount as an executable."""
    from lamina.engine.dockerfile.parser import parse_heredoc_marker

    args = list(instruction.command)
    script = None
    if instruction.heredocs and not instruction.exec_form:
        first = instruction.heredocs[0]
        if (
            len(args) == 1
            and parse_heredoc_marker(args[0].strip()) is not None
            and len(instruction.heredocs) == 1
        ):
            data = first.chomped()
            if data.startswith("#!"):
                script = data
                args = [f"/dev/pipes/{first.name}"]
            else:
                args = [data]
        else:
            full = args[0] if args else ""
            for heredoc in instruction.heredocs:
                full += "\n" + heredoc.content + heredoc.name
            args = [full]
    if instruction.exec_form:
        return args, script
    return list(md.with_shell(state.config, args)), script


def proxy_env(build_args: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables a RUN sees from `--build-arg`: each in upper and lower case."""
    from lamina.engine.plan import PROXY_ARGS  # the front end's: proxy ARGs stay out of keys there

    chosen: dict[str, str] = {}
    for name in sorted(build_args):  # BuildKit walks the args sorted: the last spelling wins
        if name.upper() in PROXY_ARGS:  # strings.EqualFold: any case
            chosen[name.upper()] = build_args[name]
    env: dict[str, str] = {}
    for upper, value in chosen.items():
        if value:  # an empty proxy value is not passed on
            env[upper] = env[upper.lower()] = value
    return env


def sandbox_hostname(build_args: Mapping[str, str]) -> str:
    """The RUN sandbox's hostname (also in /etc/hosts and $HOSTNAME): BuildKit's dockerui
    takes `--build-arg BUILDKIT_SANDBOX_HOSTNAME`, else `buildkitsandbox`."""
    return build_args.get("BUILDKIT_SANDBOX_HOSTNAME") or SANDBOX_HOSTNAME


def run_step(executor: StepHost, state: StageState, plan: PlannedStage, instruction: Any) -> None:

    insecure = instruction.security == "insecure"
    _check_allowed(executor, instruction, insecure)
    argv, script = command_line(state, instruction, None)
    env = step_env(state)
    env.setdefault("PATH", DEFAULT_PATH)
    declared = set(state.args)
    # Proxies reach RUN undeclared, but never the key or history. As BuildKit's
    # proxyEnvFromBuildArgs + proxyEnvList: a build arg of either case sets both
    # spellings (HTTP_PROXY and http_proxy), after ENV and ARG, so it wins.
    run_env = {**env, **proxy_env(executor.plan.build_args)}
    agent_sock = ssh_auth_sock(instruction, env, state.config.config.working_dir or "/")
    if agent_sock is not None:
        run_env["SSH_AUTH_SOCK"] = agent_sock
    network = (
        instruction.network if instruction.network not in (None, "default") else executor.options.network
    )
    config = state.config.config
    workdir = config.working_dir or "/"
    pending = pending_mount(executor, instruction)
    if pending:  # --dry-run: the stage it mounts will run first, so its files are not known
        inputs = make_inputs(state.key, "RUN " + json.dumps(argv), {}, state.platform, "pending")
        layer_step(executor, state, instruction, inputs, lambda upper: None, pending=pending)
        return
    mounts, mount_keys, content, secret_env, defined_content = _mounts(executor, state, instruction)
    devices = _devices(executor, instruction, run_env, mounts)
    # What the command sees: ENV and declared ARGs. An undeclared proxy value
    # never gets here (it is added to run_env only); a declared one counts.
    key_env = {k: v for k, v in env.items() if k in declared or k in md.env_dict(config)}
    described = {
        "argv": argv,
        "user": config.user,
        "cwd": workdir,
        "network": network,
        "mounts": mount_keys,
        "script": hashlib.sha256(script.encode()).hexdigest() if script is not None else "",
    }
    _describe_sandbox(executor, described, insecure)
    if devices:  # in the exec op's key in BuildKit
        described["devices"] = devices
    inputs = make_inputs(
        state.key, "RUN " + json.dumps(described, sort_keys=True), key_env, state.platform, content
    )

    def produce(upper: Path) -> None:
        full_env = {**run_env, **secret_env}  # secrets reach the command, never the key
        _sandbox_run(executor, state, instruction, argv, script, full_env, network, mounts, upper, insecure)

    binds = any(mount.type.value == "bind" for mount in instruction.mounts)
    files = (lambda: bind_files(executor, instruction)) if binds else None  # a miss names mounted files
    # Bound from a stage: its key may match a --cache-from entry the files' digest misses.
    defined = dataclasses.replace(inputs, content=defined_content) if defined_content else None
    has_layer = layer_step(executor, state, instruction, inputs, produce, files=files, defined=defined)
    build_args = [(name, value or "") for name, value in state.args.items()]
    created_by = md.run_created_by(argv, _history_args(state, build_args))
    state.config = md.add_history(
        state.config, created_by, created=executor.created(state), empty_layer=not has_layer, ran=True
    )


def _platform(state: StageState) -> Platform | None:
    """The stage's platform for the sandbox when it is not the host's (run emulated)."""
    from lamina.engine.model import PLATFORM

    if state.platform == PLATFORM:
        return None
    from lamina.engine.plan import parse_platform

    return parse_platform(state.platform)


def _check_allowed(executor: StepHost, instruction: Any, insecure: bool) -> None:
    """Refuse --security=insecure and --network=host without their entitlement, and --device."""
    for needed, asked in (("security.insecure", insecure), ("network.host", instruction.network == "host")):
        if asked and needed not in executor.options.allow:
            flag = "--security=insecure" if needed == "security.insecure" else "--network=host"
            why = f"RUN {flag} needs the {needed} entitlement: lamina build --allow {needed}"
            raise BuildError(f"{instruction.location}: {why}")


def _devices(executor: StepHost, instruction: Any, run_env: dict[str, str], mounts: list[Any]) -> list[str]:
    """RUN --device: the CDI devices it gets (engine.cdi), their env and binds added; their names."""
    if not instruction.devices:
        return []
    from lamina.engine import cdi
    from lamina.engine.dockerfile.instructions import parse_device
    from lamina.engine.sandbox.spec import BindMount

    known = cdi.load(executor.options.cdi_dirs)
    wanted = [parse_device(text) for text in instruction.devices]
    names = cdi.resolve(wanted, known, "device" in executor.options.allow, str(instruction.location))
    found = cdi.edits(names, known)
    run_env.update(entry.split("=", 1) for entry in found.env if "=" in entry)  # type: ignore[arg-type]
    mounts += [BindMount(Path(node), node, readonly=False) for node in found.nodes]
    mounts += [BindMount(Path(host), target, readonly=ro) for host, target, ro in found.mounts]
    return names


def _describe_sandbox(executor: StepHost, described: dict[str, Any], insecure: bool) -> None:
    """Add to a RUN's key text what of the sandbox is not the default: hostname, security, hosts..."""
    hostname = sandbox_hostname(executor.plan.build_args)
    if hostname != SANDBOX_HOSTNAME:  # the exec op's key holds it in BuildKit
        described["hostname"] = hostname
    if insecure:
        described["security"] = "insecure"
    options = executor.options
    for field, value in (  # in the exec op's meta, and so its key, in BuildKit; only when set
        ("hosts", [f"{name}={ip}" for name, ip in options.add_hosts]),
        ("ulimits", [f"{u.name}={u.soft}:{u.hard}" for u in options.ulimits]),
        ("shm", options.shm_size),
        ("cgroup_parent", options.cgroup_parent),
        ("memory", options.memory),
    ):
        if value:
            described[field] = value


def _history_args(state: StageState, build_args: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """BuildKit takes each ARG's value from the environment, where ENV wins."""
    env = md.env_dict(state.config.config)
    return [(name, env.get(name, value)) for name, value in build_args]


def _sandbox_run(
    executor: StepHost,
    state: StageState,
    instruction: Any,
    argv: list[str],
    script: str | None,
    env: dict[str, str],
    network: str,
    mounts: list[Any],
    upper: Path,
    insecure: bool,
) -> None:
    from lamina.engine.sandbox.runner import run
    from lamina.engine.sandbox.spec import Network, SandboxSpec

    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=executor.store.root / "tmp"))
    relays = contextlib.ExitStack()  # ssh-agent relays live as long as the command
    try:
        mounts = relays.enter_context(_ssh_relays(mounts, scratch, instruction.location))
        if script is not None:
            mounts = _with_script(mounts, scratch, argv, script)
        index = state.index
        spec = SandboxSpec(
            argv=tuple(argv),
            lower_dirs=tuple(layer.path for layer in reversed(state.layers)),
            upper_dir=upper,
            env=tuple(env.items()),
            cwd=state.config.config.working_dir or "/",
            user=state.config.config.user,
            hostname=sandbox_hostname(executor.plan.build_args),
            network=Network(network),
            insecure=insecure,
            mounts=tuple(mounts),
            scratch_dir=scratch,
            extra_hosts=executor.options.add_hosts,
            ulimits=executor.options.ulimits,
            shm_size=executor.options.shm_size,
            cgroup_parent=executor.options.cgroup_parent,
            memory=executor.options.memory,
            isolation=executor.options.isolation,
            platform=_platform(state),
        )
        with captured_output(lambda line: executor.sink.log(state.shown, index, line)) as (fd, tail):
            spec = _with_output(spec, fd)
            code = run(spec, on_warning=executor.warn_once)
        if code != 0:
            raise _run_failed(executor, state, instruction, argv, code, tail, spec)
    finally:
        relays.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _with_script(mounts: list[Any], scratch: Path, argv: list[str], script: str) -> list[Any]:
    """`mounts` and a read-only /dev/pipes holding the heredoc script, executable, argv's last."""
    from lamina.engine.sandbox.spec import BindMount

    pipes = scratch / "pipes"
    pipes.mkdir()
    name = posixpath.basename(argv[-1])
    (pipes / name).write_text(script)
    os.chmod(pipes / name, 0o755)
    os.chmod(pipes, 0o755)
    return [*mounts, BindMount(pipes, "/dev/pipes", readonly=True)]


def _run_failed(
    executor: StepHost,
    state: StageState,
    instruction: Any,
    argv: list[str],
    code: int,
    tail: collections.deque[str],
    spec: Any,
) -> Exception:
    """The error for a command that exited non-zero, with its output's tail and a debug id."""
    from lamina.engine.failures import RunFailed, keep_step

    err = RunFailed(
        f"{instruction.location}: stage {state.in_errors}: "
        # BuildKit's exec op: the argv joined by spaces, quoted (Go's %q)
        f"process {json.dumps(' '.join(argv))} did not complete successfully: "
        f"exit code {code}{_signal_note(code)}",
        tuple(tail),
    )
    # `lamina debug ID` enters it; not kept on a full file system, which it would keep full
    if not file_system_full(spec.upper_dir):
        err.debug_id = keep_step(executor, state, instruction, spec)
    return err


def _signal_note(code: int) -> str:
    """` (128+SIGKILL)` for an exit code that says a signal killed the command (a shell's 128+N)."""
    import signal

    if code <= 128:
        return ""
    try:
        return f" (128+{signal.Signals(code - 128).name})"
    except ValueError:
        return ""


def _with_output(spec: Any, fd: int) -> Any:
    import dataclasses

    return dataclasses.replace(spec, stdout=fd, stderr=fd)


def _mounts(
    executor: StepHost, state: StageState, instruction: Any
) -> tuple[list[Any], list[str], str, dict[str, str], str]:
    """Sandbox mounts for RUN --mount, their key text, the digest of bound content, secret env,
    and the digest with each stage's key for its files' (stepcache.fetch_defined; "" when no
    bind mount is from a stage)."""
    from lamina.engine.dockerfile.instructions import MountType

    mounts: list[Any] = []
    if not instruction.mounts:
        return mounts, [], "", {}, ""  # the common case, without importing the sandbox's types
    from lamina.engine.sandbox.spec import TmpfsMount

    keys: list[str] = []
    content, defined = hashlib.sha256(), hashlib.sha256()
    secrets = {secret.id: secret for secret in executor.options.secrets}
    workdir = state.config.config.working_dir or "/"
    secret_env: dict[str, str] = {}
    agents = {agent.id: agent for agent in executor.options.ssh}
    ssh_index = 0
    for mount in instruction.mounts:
        target = _mount_target(mount, workdir, instruction.location)
        if mount.type is MountType.BIND:
            _add_bind(executor, mount, target, mounts, keys, content, defined)
        elif mount.type is MountType.CACHE:
            _add_cache(executor, state, mount, target, mounts, keys)
        elif mount.type is MountType.TMPFS:
            mounts.append(TmpfsMount(target, mount.size or 0, readonly=mount.read_only))
            keys.append(f"tmpfs:{target}:{mount.size or 0}" + (":ro" if mount.read_only else ""))
        elif mount.type is MountType.SECRET:
            _add_secret(executor, mount, target, secrets, mounts, keys, secret_env)
        else:  # SSH: llb.AddSSHSocket numbers the default targets per ssh mount
            target = _ssh_target(mount, workdir, ssh_index)
            ssh_index += 1
            _add_ssh(instruction, mount, target, agents, mounts, keys)
    from_stage = any(m.type is MountType.BIND and m.from_ for m in instruction.mounts)
    bound = content.hexdigest() if keys else ""
    return mounts, keys, bound, secret_env, defined.hexdigest() if from_stage else ""


def _mount_target(mount: Any, workdir: str, location: Any) -> str:
    """A mount's absolute target; "/" refused for the mounts that would cover the root."""
    from lamina.engine.dockerfile.instructions import MountType

    target = mount.target
    if not target.startswith("/"):  # none or relative: under WORKDIR, as BuildKit's dispatchRunMounts
        target = posixpath.normpath(posixpath.join(workdir, target))
    if target == "/" and mount.type in (MountType.BIND, MountType.CACHE, MountType.TMPFS):
        raise BuildError(f'{location}: invalid mount target "/"')
    return target


def _add_bind(
    executor: StepHost,
    mount: Any,
    target: str,
    mounts: list[Any],
    keys: list[str],
    content: Any,
    defined: Any,
) -> None:
    """A bind mount: its source read-only or with writes discarded; its digest into `content`,
    and into `defined` the stage's key in its place (BuildKit's definition of the mount)."""
    from lamina.engine.sandbox.spec import BindMount
    from lamina.engine.steps.base import source_stage

    source_root, digest = _bind_source(executor, mount)
    source = _inside(source_root, mount.source, mount)
    mounts.append(BindMount(source, target, readonly=mount.read_only, discard_writes=not mount.read_only))
    keys.append(f"bind:{mount.from_}:{mount.source}:{target}:{mount.read_only}")
    content.update(f"{target}\0{digest}\n".encode())
    made = f"from:{source_stage(executor, mount.from_, None).key}:{mount.source}" if mount.from_ else digest
    defined.update(f"{target}\0{made}\n".encode())


def _add_cache(
    executor: StepHost, state: StageState, mount: Any, target: str, mounts: list[Any], keys: list[str]
) -> None:
    """A cache mount: a directory of the store named by its id and the ref it starts from
    (steps.cachemount), seeded from `from=` when new."""
    from lamina.engine.sandbox.spec import CacheMount, Sharing
    from lamina.engine.steps.base import source_stage
    from lamina.engine.steps.cachemount import cache_dir as cache_mount_dir
    from lamina.engine.steps.cachemount import mode_ref, namespace

    subpath = mount.source.strip("/") if not mount.from_ else ""
    if mount.from_:
        start = f"{source_stage(executor, mount.from_, None).key}:/{mount.source.strip('/')}"
    else:
        start = "" if subpath else mode_ref(mount)
    cache_dir = cache_mount_dir(executor, state, mount, start)
    # A dry run seeds nothing: the next build seeds from the stage as it then is.
    if mount.from_ and not cache_dir.exists() and not executor.options.dry_run:
        _seed_cache(executor, mount, cache_dir)
    source_dir = cache_dir
    if subpath:
        # BuildKit's SourcePath on the cache: that directory of it, never a way out of it.
        cache_dir.mkdir(exist_ok=True)
        source_dir = _inside(cache_dir, subpath, mount)
    mounts.append(
        CacheMount(
            source_dir,
            target,
            sharing=Sharing(mount.sharing.value),
            uid=mount.uid or 0,
            gid=mount.gid or 0,
            mode=mount.mode if mount.mode is not None else 0o755,
            readonly=mount.read_only,
        )
    )
    # The ref it starts from is an input of the RUN, as a mount's source is in BuildKit's key.
    keys.append(
        f"cache:{mount.id}:{target}"
        + (f":{subpath}" if subpath else "")
        + (f":{start}" if start else "")
        + (":ro" if mount.read_only else "")  # BuildKit's Mount.Readonly is in its op's digest
        + (f":ns={ns}" if (ns := namespace(executor.plan.build_args)) else "")  # its NS/ID too
    )


def _add_secret(
    executor: StepHost,
    mount: Any,
    target: str,
    secrets: Mapping[str, Any],
    mounts: list[Any],
    keys: list[str],
    secret_env: dict[str, str],
) -> None:
    """A secret mount: a file at `target` and/or an env variable; missing and optional, nothing."""
    from lamina.engine.sandbox.spec import SecretMount

    # The key holds the mount as written, never the value: given or not, the same.
    keys.append(f"secret:{mount.id}:{target}:{mount.env or ''}")
    secret = secrets.get(mount.id)
    if secret is None:
        if mount.required:
            raise BuildError(
                f"secret {mount.id} is required but was not given (--secret id={mount.id},src=...)"
            )
        return
    path = _secret_file(executor, secret)
    if mount.env:
        secret_env[mount.env] = path.read_text()
    if mount.target:
        mounts.append(
            SecretMount(
                mount.id,
                path,
                target,
                uid=mount.uid or 0,
                gid=mount.gid or 0,
                mode=mount.mode if mount.mode is not None else 0o400,
            )
        )


def _add_ssh(
    instruction: Any, mount: Any, target: str, agents: Mapping[str, Any], mounts: list[Any], keys: list[str]
) -> None:
    """An ssh mount: a relay to the forwarded agent; missing and optional, nothing."""
    uid, gid = mount.uid or 0, mount.gid or 0
    mode = mount.mode if mount.mode is not None else DEFAULT_SSH_MODE
    # The key holds the mount as written, never the socket: forwarded or not, the same.
    keys.append(f"ssh:{mount.id}:{target}:{uid}:{gid}:{mode:o}:{mount.required}")
    agent = agents.get(mount.id)
    if agent is None:
        if mount.required:
            why = (
                f"unset ssh forward key {mount.id}"
                if agents
                else f"no SSH key {json.dumps(mount.id)} forwarded from the client"
            )
            raise BuildError(f"{instruction.location}: {why} (lamina build --ssh {mount.id}=...)")
        return  # as BuildKit: an optional ssh mount with nothing forwarded is skipped
    mounts.append(SshMount(agent.socket, target, uid, gid, mode))


DEFAULT_SSH_MODE = 0o600


@dataclasses.dataclass(frozen=True, slots=True)
class SshMount:
    """An ssh mount still to be made: a relay to `upstream` at `target` while the step runs."""

    upstream: Path
    target: str
    uid: int
    gid: int
    mode: int


def _ssh_target(mount: Any, workdir: str, index: int) -> str:
    if not mount.target:
        return f"/run/buildkit/ssh_agent.{index}"
    return mount.target if mount.target.startswith("/") else posixpath.join(workdir, mount.target)


def ssh_auth_sock(instruction: Any, env: Mapping[str, str], workdir: str) -> str | None:
    """$SSH_AUTH_SOCK for a RUN with ssh mounts: the first one's target, unless ENV or ARG set it
    (llb's ExecState sets it so); None without ssh mounts."""
    from lamina.engine.dockerfile.instructions import MountType

    for mount in instruction.mounts:
        if mount.type is MountType.SSH:
            return None if "SSH_AUTH_SOCK" in env else _ssh_target(mount, workdir, 0)
    return None


@contextlib.contextmanager
def _ssh_relays(mounts: list[Any], scratch: Path, location: Any) -> Iterator[list[Any]]:
    """`mounts` with each SshMount made a bind mount of a relay socket of the step's own."""
    if not any(isinstance(m, SshMount) for m in mounts):
        yield mounts
        return
    from lamina.engine.sandbox.runner import set_owners
    from lamina.engine.sandbox.spec import BindMount
    from lamina.engine.sshforward import Relay

    out: list[Any] = []
    with contextlib.ExitStack() as stack:
        for i, mount in enumerate(mounts):
            if not isinstance(mount, SshMount):
                out.append(mount)
                continue
            path = scratch / f"ssh-{i}"
            stack.enter_context(Relay(mount.upstream, path))
            os.chmod(path, mount.mode)
            try:
                set_owners([(path, mount.uid, mount.gid)])
            except SandboxError as err:  # proot isolation: a socket's owner cannot be recorded
                why = str(err).rpartition(": ")[2]
                where = f"{location}: RUN --mount=type=ssh,uid={mount.uid},gid={mount.gid}"
                raise BuildError(f"{where}: {why}") from None
            # Read-only: connect(2) needs no write access to the file system, only to the socket.
            out.append(BindMount(path, mount.target, readonly=True))
        yield out


def _seed_cache(executor: StepHost, mount: Any, cache_dir: Path) -> None:
    """A new cache mount with `from=` starts as a copy of that stage's (or image's) `source`."""
    from lamina.engine.steps.base import source_stage
    from lamina.engine.steps.cachemount import seed

    outcome = source_stage(executor, mount.from_, None)
    source = "/" + mount.source.strip("/")
    root = executor.stage_rootfs(outcome, [source])
    seed(cache_dir, _inside(root, mount.source, mount), executor.store.root / "tmp")


def _secret_file(executor: StepHost, secret: Any) -> Path:
    source, secret_id = secret.source, secret.id
    text = str(source)
    if text.startswith("env:"):
        value = secret.value  # the build's environment (api.build's environ=)
        if value is None:
            value = os.environ.get(text[4:], "")  # unset is empty, as BuildKit's os.Getenv
        fd, name = tempfile.mkstemp(prefix="secret-", dir=executor.store.root / "tmp")
        executor.temp_files.append(Path(name))  # removed when the build ends
        with os.fdopen(fd, "w") as f:
            f.write(value)
        return Path(name)
    if not source.is_file():
        raise BuildError(f"secret {secret_id}: {source} is not a readable file")
    return source.resolve()


def _bind_source(executor: StepHost, mount: Any) -> tuple[Path, str]:
    """The host directory a bind mount reads from and a digest of what it holds."""
    if not mount.from_:
        context = executor.context()
        rel = context.resolve(mount.source.strip("/"))
        return executor.options.context.resolve(), str(context.checksum(rel))
    from lamina.engine.context import open_rootfs
    from lamina.engine.steps.base import source_stage

    outcome = source_stage(executor, mount.from_, None)
    root = executor.stage_rootfs(outcome, ["/" + mount.source.strip("/")])
    # BuildKit keys a mount with no output (a bind's writes are discarded) by the content of
    # its source path (the exec op's ContentBasedHash), not by how the stage was made. The
    # digest is memoised under what the stage made (its key and layer dirs), as COPY --from's.
    made = ",".join(layer.dir_id or str(layer.diff_id) for layer in outcome.layers)
    memo_key = copy_from_key(json.dumps(["mount", outcome.key, made, mount.source.strip("/")]))
    digest = executor.store.cache_get(memo_key)
    if digest is None:
        digest = str(open_rootfs(root, executor.stat_cache()).checksum(mount.source.strip("/")))
        executor.store.cache_put(memo_key, digest)
    return root, digest


def _inside(root: Path, source: str, mount: Any) -> Path:
    path = (root / source.lstrip("/")).resolve() if source else root
    if path != root and root not in path.parents:
        raise BuildError(f"--mount source {source!r} is outside of its root")
    if not path.exists():
        raise BuildError(f"--mount source {source!r} not found")
    return path


# --- output capture ---------------------------------------------------------------------------


@contextlib.contextmanager
def captured_output(on_line: Callable[[str], None]) -> Iterator[tuple[int, collections.deque[str]]]:
    """A pipe whose write end a sandbox gets as stdout/stderr; lines go to `on_line`.

    Yields (write fd, tail); the tail keeps the last OUTPUT_TAIL lines.
    """
    read_fd, write_fd = os.pipe()
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                tail.append(line)
                on_line(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    closed = False
    try:
        yield write_fd, tail
        os.close(write_fd)
        closed = True
        thread.join()
    finally:
        if not closed:
            os.close(write_fd)
            thread.join(timeout=5)
