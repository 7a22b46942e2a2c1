"""The public Python surface: `lamina.build()`, `lamina.plan()`.

Functions here join the engine, the cache and the OCI formats; they take
every setting as an argument (no global state) and raise LaminaError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamina.errors import DockerfileError

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import IO

    from lamina.cache.store import GcReport, ImageRecord, Usage
    from lamina.cache.transfer import PullResult, PushResult
    from lamina.engine.dockerfile.parser import Dockerfile
    from lamina.engine.model import BuildResult
    from lamina.engine.plan import Plan
    from lamina.engine.progress import ProgressSink
    from lamina.engine.sandbox.isolation import Isolation
    from lamina.oci.digest import Digest
    from lamina.oci.image import Descriptor, Platform
    from lamina.oci.registry import RegistryClient


# --- front end: parse, plan ---------------------------------------------------


def _display_path(path: str) -> str:
    import os

    return os.path.normpath(path)


def parse_dockerfile(path: str) -> Dockerfile:
    """Read and parse one Dockerfile; errors name `path:line`."""
    from lamina.engine.dockerfile.parser import parse

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DockerfileError(f"cannot read Dockerfile {path}: {err.strerror}") from err
    return parse(data, _display_path(path))


def plan(
    context: str | os.PathLike[str] = ".",
    dockerfile: str | os.PathLike[str] | None = None,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> Plan:
    """Parse CONTEXT/Dockerfile (or `dockerfile`) and plan the build of `target` (for the target
    `platform`, `os/arch[/variant]`, default the host's; `lamina plan --platform a,b` plans each).

    The plan lists every stage with its base and dependencies, the order and
    concurrency waves of the stages the target needs, and the skipped ones;
    `Plan.warnings` reports unused build args.
    """
    import os
    from pathlib import Path

    from lamina.engine.buildfiles import default_dockerfile
    from lamina.engine.contextsource import is_local
    from lamina.engine.plan import make_plan, parse_platforms

    want = parse_platforms([platform])[0] if platform else None
    context = os.fspath(context)
    named = os.fspath(dockerfile) if dockerfile is not None else None
    if not is_local(context, named):  # `-`, `-f -`, a git or http URL: as `lamina build` reads them
        from lamina.engine.buildchecks import shown_dockerfile
        from lamina.engine.contextsource import resolved
        from lamina.engine.dockerfile.parser import parse
        from lamina.engine.dockerfile.source import read_source

        with resolved(context, named, os.environ) as found:
            path = found.dockerfile or default_dockerfile(found.context)
            try:
                data = read_source(path)
            except OSError as err:
                shown = shown_dockerfile(path, found.context)
                raise DockerfileError(f"cannot read Dockerfile {shown}: {err.strerror}") from err
            parsed = parse(data, shown_dockerfile(path, found.context))
        return make_plan(parsed, target=target, build_args=build_args, context=context, target_platform=want)
    path = os.fspath(default_dockerfile(Path(context)) if dockerfile is None else dockerfile)
    parsed = parse_dockerfile(path)
    return make_plan(parsed, target=target, build_args=build_args, context=context, target_platform=want)


# --- images: load, save, images, rmi, cache ------------------------------------------


def _store_root(cache_dir: str | os.PathLike[str] | None, environ: Mapping[str, str] | None) -> str:
    import os

    from lamina.cache.store import default_cache_root

    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.fspath(default_cache_root(os.environ if environ is None else environ))


def load(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    platform: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[ImageRecord, ...]:
    """Import the images of an OCI archive, OCI layout dir or docker-archive into the store.

    Each image is named as the file names it; `name` overrides that (for a
    file that holds a single image). A multi-platform image is loaded whole
    (its index), or only its `platform` (`os/arch[/variant]`) image. Returns
    the name records made.
    """
    from pathlib import Path

    from lamina.cache.images import load_image_file
    from lamina.cache.store import Store

    with Store(_store_root(cache_dir, environ)) as store:
        return load_image_file(store, Path(path), name, _platform(platform))


def _platform(text: str | None) -> Platform | None:
    """A `--platform` value (`linux/arm64`), normalised; None stays None (this host)."""
    from lamina.oci.image import Platform

    return Platform.parse(text).normalized() if text else None


def save(
    name: str,
    path: str | os.PathLike[str],
    *,
    format: str = "oci",
    compression: str | None = None,
    platform: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Descriptor:
    """Write the stored image `name` to `path` (`-`: stdout) as an OCI archive or
    (`format="docker"`) a docker-archive.

    `compression` ("gzip", "zstd", "none") recompresses the layers of an
    OCI archive; None keeps them as stored, so a loaded image saves with
    its manifest digest unchanged. A multi-platform image is saved whole
    (its index) unless `platform` picks one. Returns the written manifest's
    (or index's) descriptor.
    """
    from pathlib import Path

    from lamina.cache.images import save_image
    from lamina.cache.store import Store
    from lamina.oci.compression import Compression

    wanted = Compression.parse(compression) if compression is not None else None
    with Store(_store_root(cache_dir, environ)) as store:
        return save_image(
            store, name, Path(path), format=format, compression=wanted, platform=_platform(platform)
        )


def images(
    *,
    platform: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[ImageRecord, ...]:
    """Every named image in the store, sorted by name; with `platform`, only the images that
    hold that platform, each record's `manifest` being that platform's manifest."""
    return tuple(
        record for record, _ in image_platforms(platform=platform, cache_dir=cache_dir, environ=environ)
    )


def image_platforms(
    *,
    platform: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[tuple[ImageRecord, tuple[str, ...]], ...]:
    """`images`, each with the platforms it is for (cache.platforms.listed_platforms: every
    platform of a multi-platform index; with `platform`, the one chosen)."""
    import dataclasses

    from lamina.cache.platforms import image_platforms, listed_platforms
    from lamina.cache.store import Store
    from lamina.oci.image import match_platform

    want = _platform(platform)
    with Store(_store_root(cache_dir, environ)) as store:
        records = store.images()
        if want is not None:
            found = []
            for record in records:
                held = image_platforms(store, record.manifest)
                chosen = match_platform([_descriptor(p, d) for p, d in held], want)
                if chosen is not None:
                    found.append(dataclasses.replace(record, manifest=chosen.digest))
            records = tuple(found)
        return tuple((record, listed_platforms(store, record.manifest)) for record in records)


def _descriptor(platform: Platform, digest: Digest) -> Descriptor:
    from lamina.oci.image import OCI_MANIFEST, Descriptor

    return Descriptor(OCI_MANIFEST, digest, 0, platform=platform)


def rmi(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> ImageRecord:
    """Remove the name `name` (its blobs stay until `cache_gc` finds them unused), or as
    docker rmi the one name of the image whose ID `name` is (cache.images.resolve_name)."""
    from lamina.cache.images import display_name, names_of_id, normalize_name
    from lamina.cache.store import Store
    from lamina.errors import StoreError

    with Store(_store_root(cache_dir, environ)) as store:
        named = names_of_id(store, name)
        if len(named) > 1:  # docker: "image is referenced in multiple repositories"
            names = ", ".join(display_name(r.name) for r in named)
            raise StoreError(f"rmi {name}: the image has several names ({names}): remove them by name")
        return store.untag(named[0].name if named else normalize_name(name))


def cache_du(
    *, cache_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Usage:
    """Bytes the store uses, by kind (blobs, unpacked layers, index)."""
    from lamina.cache.store import Store

    with Store(_store_root(cache_dir, environ)) as store:
        return store.du()


def cache_prune(
    *,
    all: bool = False,  # docker's word: `docker builder prune --all`, docker-py's prune_builds(all=)
    until: float | None = None,
    keep_storage: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> GcReport:
    """Free cache space; what named images need always stays.

    Always removes blobs and unpacked layers that no image name or build result
    needs. `until` (seconds) also drops build results unused for that long;
    `all` drops every build result and every unpacked layer (those unused for
    `until`, when given). `keep_storage` (bytes) then drops the least recently
    used build results and unpacked layers until the store takes at most that.
    Raises StoreBusy while another lamina process has the store open.
    """
    from lamina.cache.store import Store
    from lamina.engine import failures
    from lamina.engine.sandbox import remove_tree

    with Store(_store_root(cache_dir, environ)) as store:
        failures.prune(store.root, remove_tree)  # failed steps kept for `lamina debug`
        # Rootless builds leave files owned by subordinate ids in unpacked
        # layers: only a remover inside the user namespace can delete them.
        return store.gc(
            cache_older_than=until, drop_all=all, keep_bytes=keep_storage, remove_tree=remove_tree
        )


def cache_gc(
    *,
    older_than: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> GcReport:
    """`cache_prune(until=older_than)`: drop cache results unused for `older_than` seconds, then
    everything no name or result needs."""
    return cache_prune(until=older_than, cache_dir=cache_dir, environ=environ)


def cache_verify(
    *,
    repair: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Check every blob's digest, every name's and build result's references, and what a
    killed process tore (lamina.cache.verify.VerifyReport); `repair` removes torn and corrupt
    entries, never what is intact and still referenced. Raises StoreBusy for `repair` while
    another lamina process has the store open."""
    from lamina.cache.store import Store
    from lamina.cache.verify import verify
    from lamina.engine.sandbox import remove_tree

    with Store(_store_root(cache_dir, environ)) as store:
        return verify(store, repair=repair, remove_tree=remove_tree)


def failures(
    *, cache_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> list[Any]:
    """The failed RUN steps kept for `debug` (engine.failures.KeptFailure), oldest first."""
    from pathlib import Path

    from lamina.engine import failures as kept

    return kept.list_failures(Path(_store_root(cache_dir, environ)))


def debug(
    failure: str = "last",
    command: Sequence[str] = (),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> int:
    """Run `command` (default: the stage's shell) in a failed RUN step's kept filesystem,
    with its env, workdir, user and mounts; stdin/stdout/stderr are the caller's. Returns
    its exit code. `failure` is an id (`BuildError`s of a failed RUN name it), a prefix, or `last`."""
    from pathlib import Path

    from lamina.engine import failures as kept

    return kept.enter(Path(_store_root(cache_dir, environ)), failure, command, on_warning)


def diff_builds(
    context: str | os.PathLike[str] = ".",
    dockerfile: str | os.PathLike[str] | None = None,
    *,
    target: str | None = None,
    metadata_files: Sequence[str | os.PathLike[str]] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The last two builds of (context, Dockerfile, target) compared step by step, or two
    `--metadata-file` documents (older first): a diffbuilds.BuildDiff."""
    from pathlib import Path

    from lamina import diffbuilds

    if metadata_files:
        return diffbuilds.diff_paths([Path(p) for p in metadata_files])
    root = Path(_store_root(cache_dir, environ))
    path = diffbuilds.history_path(root, Path(context), Path(dockerfile) if dockerfile else None, target)
    if not path.exists() and not Path(context).is_dir():
        said = "not a directory" if Path(context).exists() else "no such build context directory"
        raise diffbuilds.NoBuilds(f"diff {context}: {said}")
    return diffbuilds.compare(*diffbuilds.last_two(path, str(context)))


def diff_images(
    image_a: str,
    image_b: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Two stored images compared: config, layer by layer, file by file (diffimages.ImageDiff)."""
    from lamina import diffimages
    from lamina.cache.store import Store

    with Store(_store_root(cache_dir, environ)) as store:
        return diffimages.compare(store, image_a, image_b)


# --- sandbox: run -----------------------------------------------------------------


# Long for its signature and docstring (the public keywords); the body is short.
def run(
    image: str,
    command: Sequence[str] = (),
    *,
    env: Iterable[str] = (),
    workdir: str | None = None,
    user: str | None = None,
    network: str = "default",
    mounts: Iterable[str] = (),
    publish: Iterable[str] = (),
    hostname: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdin: int | IO[bytes] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_started: Callable[[Any], None] | None = None,
    isolation: str | Isolation | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    platform: str | None = None,
) -> int:
    """Run `command` in the stored `image`, as `docker run --rm` does; return its exit code.

    `platform` (`linux/arm64`) picks the image of a multi-platform one (default: this
    host's); an image of another platform runs under emulation (lamina info lists them).

    The image's Entrypoint, Cmd, Env, WorkingDir and User apply; `command`
    replaces Cmd, `env` (`K=V`, or `K` to pass the caller's value) adds to
    Env, `workdir`/`user` replace theirs. `mounts` are `docker run --mount`
    strings (`type=bind,source=S,target=T[,ro]`, `type=tmpfs,target=T`);
    `publish` are `-p` strings (`8080:80`, `127.0.0.1:8080:80`, TCP) forwarded
    into the default network. `on_started` gets a `sandbox.Started` (pid,
    stop()) once the command's namespaces exist and its ports listen.
    `isolation` as for `build`. Nothing the command changes is kept.
    `scratch_dir` holds the sandbox's scratch (its upper dir; default the
    store's tmp/, which `cache gc` empties). Raises LaminaError (ImageNotFound,
    SandboxError) when it cannot start.
    """
    import os
    from pathlib import Path

    from lamina.cache.images import stored_image
    from lamina.cache.store import Store
    from lamina.engine import sandbox
    from lamina.engine.unpack import unpacked_layer
    from lamina.errors import SandboxError

    environ = os.environ if environ is None else environ
    wanted = _isolation(isolation)
    with Store(_store_root(cache_dir, environ)) as store:
        _, source = stored_image(store, image, _platform(platform))
        config = source.config.config
        argv = (*(config.entrypoint or ()), *(command or config.cmd or ()))
        if not argv:
            raise SandboxError(f"run {image}: no command given and the image has no Entrypoint or Cmd")
        variables = _run_env(config.env, env, environ)
        ids = sandbox.detect_ids()
        layers = zip(source.layers, source.diff_ids, strict=True)
        lowers = [unpacked_layer(store, layer.digest, diff_id, ids) for layer, diff_id in layers]
        try:
            net = sandbox.Network(network)
        except ValueError:
            raise SandboxError(f"--network {network}: expected default, host or none") from None
        scratch = store.root / "tmp" if scratch_dir is None else Path(scratch_dir)
        scratch.mkdir(parents=True, exist_ok=True)
        spec = sandbox.SandboxSpec(
            argv=argv,
            lower_dirs=tuple(reversed(lowers)),
            env=tuple(variables.items()),
            cwd=workdir or config.working_dir or "/",
            user=config.user if user is None else user,
            hostname=hostname or "lamina",
            network=net,
            mounts=tuple(sandbox.parse_mount(m) for m in mounts),
            publish=tuple(sandbox.parse_publish(p) for p in publish),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            scratch_dir=scratch,
            isolation=wanted,
            # An image that names no architecture is taken as this host's, as docker runs it.
            platform=source.config.platform.normalized() if source.config.architecture else None,
        )
        return sandbox.run(spec, ids=ids, on_warning=on_warning, on_started=on_started)


def _run_env(image_env: Iterable[str], env: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The image's Env with `docker run -e` items over it (`K=V`, or `K` for the caller's
    value, skipped when the caller has none)."""
    from lamina.errors import SandboxError

    variables = dict(item.partition("=")[::2] for item in image_env)
    for item in env:
        key, sep, value = item.partition("=")
        if not key:
            raise SandboxError(f"-e {item!r}: the variable needs a name (K=V)")
        if not sep:
            if key not in environ:
                continue
            value = environ[key]
        variables[key] = value
    return variables


def sandbox_info() -> Any:
    """What a RUN step gets on this host (lamina.engine.sandbox.info.SandboxInfo)."""
    from lamina.engine.sandbox.info import describe

    return describe()


def _network_mode(network: str) -> str:
    from lamina.errors import PlanError

    if network not in ("default", "host", "none"):
        raise PlanError(f"--network {network}: expected default, host or none")
    return network


def _entitlements(allow: Iterable[str], network: str) -> frozenset[str]:
    """BuildKit's entitlements for RUN; `--network host` for the whole build grants
    network.host, as buildx does."""
    from lamina.errors import PlanError

    granted = set(allow)
    for name in granted:
        if name not in ("network.host", "security.insecure", "device"):
            raise PlanError(f"--allow {name}: expected network.host, security.insecure or device")
    if network == "host":
        granted.add("network.host")
    return frozenset(granted)


# --- build -------------------------------------------------------------------------


# Long for its signature and docstring (the public keywords); the steps are the helpers below.
def build(
    context: str | os.PathLike[str] = ".",
    dockerfile: str | os.PathLike[str] | None = None,
    *,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    outputs: Iterable[str] = (),
    output: str | None = None,
    annotations: Iterable[str] = (),
    provenance: str | None = None,
    sbom: str | None = None,
    attests: Iterable[str] = (),
    no_cache: bool = False,
    no_cache_filter: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    network: str = "default",
    allow: Iterable[str] = (),
    progress: ProgressSink | None = None,
    compression: str = "gzip",
    jobs: int | None = None,
    pull: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    source_date_epoch: int | None = None,
    environ: Mapping[str, str] | None = None,
    dry_run: bool = False,
    push: bool = False,
    cache_from: Iterable[str] = (),
    cache_to: Iterable[str] = (),
    insecure_registries: Iterable[str] = (),
    ssh: Iterable[str] = (),
    add_hosts: Iterable[str] = (),
    ulimits: Iterable[str] = (),
    shm_size: str | int | None = None,
    build_contexts: Iterable[str] = (),
    isolation: str | Isolation | None = None,
    context_subdir: str | None = None,
    platforms: Iterable[str] = (),
    cgroup_parent: str | None = None,
    memory: str | int | None = None,
    lazy_image: bool = False,
) -> BuildResult:
    """Build `dockerfile` (default CONTEXT/Dockerfile) and return a BuildResult.

    `platforms` (`linux/amd64`, `linux/arm64,linux/arm/v7`: buildx's --platform) builds the
    target for each; several make one image index (`-t`, `type=image`, `type=oci`), and the
    result's `image_digest` is the index's (lamina.engine.multiplatform).

    As buildx: `context` may be `-` (stdin holds a tar of the context, or a Dockerfile
    and the context is empty) or a git URL (`https://host/repo.git#ref:subdir`,
    `git@host:repo.git`), checked out with `git`; `dockerfile` may be `-` (stdin), or,
    with a URL context, an absolute path of this machine. `context_subdir` (BuildKit's
    frontend attribute `contextsubdir`) makes a directory of a remote context the context,
    the Dockerfile still named from its top.
    `build_contexts` (`NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG|@DIGEST]`, or a
    git URL) stand in for the image or stage NAME (lamina.engine.namedcontext).

    With no `outputs`, the image goes into the local store under `tags`.
    `outputs` take buildx `-o` specs (`type=oci,dest=x.tar`, `DIR`, `-`);
    `output` is a shorthand for one. `secrets` are `id=ID,src=PATH` specs.
    `SOURCE_DATE_EPOCH` comes from `source_date_epoch`, else a build arg of
    that name, else the environment. The cache lives in `cache_dir`, else
    `$LAMINA_CACHE`, else `$XDG_CACHE_HOME/lamina`. With `dry_run` no step
    runs and no image is made: each step record says whether it would hit
    the cache and, if not, why (`StepRecord.reason`).

    Registries: `push` pushes the image to every tag afterwards
    (`BuildResult.pushed` has the confirmed digests); `cache_to` /
    `cache_from` take `type=registry,ref=REF[,mode=min|max]` specs (see
    lamina.cache.remote), `type=local,dest=DIR|src=DIR` and (to) `type=inline`;
    `insecure_registries` may use plain HTTP.

    Image outputs take BuildKit's exporter attributes (`type=oci,dest=F,compression=zstd`,
    `type=registry,name=REF`, see lamina.engine.outputspec); `annotations` are buildx's
    `--annotation [TYPE:]KEY=VALUE`; `provenance` is `--provenance` (`"true"`, `"mode=min"`,
    ...: an SLSA statement in an OCI index, or provenance.json in a filesystem output);
    `sbom` is refused unless it turns SBOMs off (no generator).

    RUN steps, as buildx's flags: `ssh` forwards ssh-agents to `RUN --mount=type=ssh`
    (`default`, `ID=SOCKET`, `ID=KEYFILE[,KEYFILE]`); `add_hosts` (`NAME:IP`) adds to
    /etc/hosts, `ulimits` (`nofile=1024:2048`) sets limits, `shm_size` (`128m`) sizes /dev/shm.
    `cgroup_parent` (`--cgroup-parent`) runs each RUN in a cgroup of its own below it, and
    `memory` (BuildKit's frontend attribute `memory=`, bytes) limits that cgroup's memory
    (sandbox.cgroups; refused where this host cannot give a cgroup, e.g. rootless on cgroup v1).
    `isolation` (`sandbox.isolation.Isolation` or its name; None or "auto": `$LAMINA_ISOLATION`,
    else the strongest allowed) is checked before the build: one not allowed here is an error.
    `lazy_image` (what `lamina build` does): when only the store takes the image, its new layers
    stay uncompressed until something reads it (cache.store "Pending images"); the result's
    `image_digest` is then "" and `pending` set, as `docker build` names only the image ID.
    """
    import dataclasses
    import os
    from pathlib import Path

    from lamina.cache.store import default_cache_root
    from lamina.engine.buildfiles import default_dockerfile
    from lamina.engine.executor import execute
    from lamina.engine.model import BuildOptions, parse_secret
    from lamina.engine.progress import QuietProgress

    env = dict(os.environ if environ is None else environ)
    wanted = _isolation(isolation)
    insecure = tuple(insecure_registries)
    args = dict(build_args or {})
    if source_date_epoch is None:
        source_date_epoch = _source_date_epoch(args, env)
    _check_context(context, dockerfile)
    specs = [*outputs, *([output] if output else [])]
    provenance, sbom = _with_attests(attests, provenance, sbom)
    sbom_attrs = _sbom(sbom)
    output_specs, attestations = _output_specs(
        specs, annotations, provenance, "generator" if sbom_attrs else None, compression
    )
    if any(spec.insecure for spec in output_specs):
        from lamina.engine.push import insecure_hosts

        insecure = (*insecure, *insecure_hosts(output_specs))
    options = BuildOptions(
        context=Path(context),
        dockerfile=Path(dockerfile) if dockerfile is not None else default_dockerfile(Path(context)),
        target=target,
        build_args=tuple(args.items()),
        tags=tuple(tags),
        outputs=output_specs,
        provenance=attestations,
        no_cache=no_cache,
        no_cache_filter=tuple(no_cache_filter),
        labels=tuple((labels or {}).items()),
        secrets=tuple(parse_secret(spec, env) for spec in secrets),
        network=_network_mode(network),
        allow=_entitlements(allow, network),
        compression=compression,
        jobs=jobs or os.cpu_count() or 1,
        pull=pull,
        cache_root=Path(cache_dir) if cache_dir is not None else default_cache_root(env),
        source_date_epoch=source_date_epoch,
        client_factory=lambda: registry_client(env, insecure),
        dry_run=dry_run,
        cache_from=_cache_specs(cache_from, "--cache-from"),
        cache_to=_cache_specs(_with_inline_cache(cache_to, args), "--cache-to"),
        **_run_inputs(add_hosts, ulimits, shm_size),
        **_cgroup_inputs(cgroup_parent, memory),
        **_platforms(platforms),
        isolation=wanted,
        source_policy=_source_policy(env, context, dockerfile),
        sbom=sbom_attrs,
        **_cdi_dirs(env),
    )
    to_push = _push_names(options)
    options = dataclasses.replace(options, lazy_image=lazy_image and not push and not to_push)
    _check_secrets(options.secrets)
    if push:
        from lamina.engine.push import check_push

        check_push(options.tags)
    with (
        _ssh_agents(ssh, env) as agents,
        _local_inputs(options, context, dockerfile, env, context_subdir or "") as options,
        _named_contexts(build_contexts, options, env) as named,
    ):
        options = dataclasses.replace(options, ssh=agents, build_contexts=named)
        result = execute(options, progress if progress is not None else QuietProgress())
    if dry_run:
        return result
    _remember_build(options, result, context, dockerfile, target)
    return _pushed(options, result, push, to_push)


def _source_date_epoch(args: dict[str, str], env: Mapping[str, str]) -> int | None:
    """SOURCE_DATE_EPOCH from the build arg of that name, else the environment (which buildx
    passes as that build arg). Any other value is a source (`context`, a stage, a named context)
    that the build resolves (engine.sourceepoch), or an error there."""
    text = args.get("SOURCE_DATE_EPOCH") or env.get("SOURCE_DATE_EPOCH")
    if not text:
        return None
    args.setdefault("SOURCE_DATE_EPOCH", text)  # an `ARG SOURCE_DATE_EPOCH` sees it, as with buildx
    try:
        return int(text)
    except ValueError:
        return None


def _check_context(context: str | os.PathLike[str], dockerfile: str | os.PathLike[str] | None) -> None:
    """A local build context must be a directory."""
    from pathlib import Path

    if not Path(context).is_dir() and _local_context(context, dockerfile):
        from lamina.errors import ContextError

        why = "is not a directory" if Path(context).exists() else "does not exist"
        raise ContextError(f"build context {context} {why}")


def _with_attests(
    attests: Iterable[str], provenance: str | None, sbom: str | None
) -> tuple[str | None, str | None]:
    """buildx's --attest type=provenance|sbom,...: the long form of --provenance and --sbom,
    which win when given."""
    for attest in attests:
        from lamina.engine.provenance import attest_kind

        kind = attest_kind(attest)
        provenance = attest if kind == "provenance" and provenance is None else provenance
        sbom = attest if kind == "sbom" and sbom is None else sbom
    return provenance, sbom


def _check_secrets(secrets: Iterable[Any]) -> None:
    """As buildx: a secret file that is not there (or over 500 KiB) fails the build before it starts."""
    from lamina.errors import PlanError

    for secret in secrets:
        if not str(secret.source).startswith("env:") and not secret.source.is_file():
            raise PlanError(f"--secret id={secret.id}: {secret.source} is not a readable file")
        if not str(secret.source).startswith("env:") and secret.source.stat().st_size > 500 * 1024:
            raise PlanError(f"--secret id={secret.id}: secret {secret.id} too big. max size 500KiB")


def _remember_build(
    options: Any,
    result: BuildResult,
    context: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] | None,
    target: str | None,
) -> None:
    """Record the build for `lamina diff`, which compares the last two builds."""
    from pathlib import Path

    from lamina import diffbuilds

    history = diffbuilds.history_path(options.cache_root, Path(context), dockerfile, target)
    # BUILDKIT_BUILD_NAME names the build as buildx history shows it: here, as `lamina diff` does
    diffbuilds.remember(history, result, dict(options.build_args).get("BUILDKIT_BUILD_NAME", ""))


def _pushed(options: Any, result: BuildResult, push: bool, to_push: tuple[str, ...]) -> BuildResult:
    """Push after the build: `push` to every tag, then the -o type=image,push=true and
    type=registry outputs' names (`to_push`)."""
    if push:
        from lamina.engine.push import push_result

        result = push_result(options, result)
    if to_push:
        from lamina.engine.push import push_result

        result = push_result(options, result, names=to_push)
    return result


def _isolation(value: str | Isolation | None) -> Isolation | None:
    """The typed isolation asked for, refused now (one line) if this process may not use it."""
    import os

    if value is None and "LAMINA_ISOLATION" not in os.environ:  # isolation.ENV_VAR unset: auto
        return None  # nothing to check, and a no-op rebuild loads no sandbox module
    from lamina.engine.sandbox import isolation

    # `--isolation` reaches here as $LAMINA_ISOLATION (cli sets it): checked now, not at a RUN.
    wanted = isolation.parse(value) if value is not None else isolation.requested()
    if wanted is None:
        return None  # auto: nothing to check, and a no-op rebuild imports no id-map code
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    isolation.check_ids(isolation.choose(wanted).isolation, detect_ids().mode is IdMode.RECORDED)
    return wanted


def _local_context(context: str | os.PathLike[str], dockerfile: str | os.PathLike[str] | None) -> bool:
    """False for a context of `-` (stdin), a git URL, or `-f -` (engine.contextsource)."""
    import os

    stdin = os.fspath(context) == "-" or (dockerfile is not None and os.fspath(dockerfile) == "-")
    if not stdin and os.path.exists(context):
        return True
    from lamina.engine.contextsource import is_local

    return is_local(os.fspath(context), None if dockerfile is None else os.fspath(dockerfile))


def _local_inputs(
    options: Any,
    context: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    subdir: str = "",
) -> Any:
    """`options` with a stdin or git context (or `-f -`) made local for the build's length."""
    import contextlib

    if _local_context(context, dockerfile) and not subdir:  # a local one with a subdir is refused there
        return contextlib.nullcontext(options)
    import os

    from lamina.engine.contextsource import local_options

    named = None if dockerfile is None else os.fspath(dockerfile)
    return local_options(options, os.fspath(context), named, env, subdir)


def _sbom(text: str | None) -> tuple[tuple[str, str], ...] | None:
    """--sbom's generator and parameters (engine.sbom); None when not asked for or turned off."""
    if text is None:
        return None
    from lamina.engine.sbom import parse

    return parse(text)


def _cdi_dirs(env: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """RUN --device's CDI spec dirs where $LAMINA_CDI_SPEC_DIRS (cdi.ENV_VAR) names them; else
    BuildOptions' default, cdi.DEFAULT_DIRS (then a no-op rebuild loads no cdi module)."""
    if "LAMINA_CDI_SPEC_DIRS" not in env:
        return {}
    from lamina.engine.cdi import spec_dirs

    return {"cdi_dirs": spec_dirs(env)}


def _source_policy(env: Mapping[str, str], context: Any, dockerfile: Any) -> Any:
    """$EXPERIMENTAL_BUILDKIT_SOURCE_POLICY, as buildx reads it; the main context judged by it."""
    if not env.get("EXPERIMENTAL_BUILDKIT_SOURCE_POLICY"):  # sourcepolicy.ENV_VAR: unset, not loaded
        return None
    import os

    from lamina.engine import sourcepolicy

    policy = sourcepolicy.load(env)
    if policy is not None:
        from lamina.engine.contextsource import is_local  # not on a no-op replay: it imports shutil

        shown = os.fspath(dockerfile) if dockerfile is not None else None
        local = is_local(os.fspath(context), shown)
        for source in sourcepolicy.context_sources(os.fspath(context), local):
            sourcepolicy.require_kept(policy, source, f"build context {os.fspath(context)}")
    return policy


def _named_contexts(flags: Iterable[str], options: Any, env: Mapping[str, str]) -> Any:
    """The `--build-context` stand-ins, their images made before the build (engine.namedcontext)."""
    import contextlib

    flags = tuple(flags)
    if not flags:
        return contextlib.nullcontext(())
    from lamina.engine.namedcontext import prepared
    from lamina.engine.sourcepolicy import ENV_VAR

    cache_root = options.cache_root
    # A directory's image is built under the policy's judgement of it (local://NAME), not again.
    env = {key: value for key, value in env.items() if key != ENV_VAR}

    def build_dir(directory: Any, name: str, ignore: bool) -> str:
        # A directory's image, as BuildKit's llb.Local of it: its files as COPY takes them.
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="lamina-context-") as tmp:
            dockerfile = Path(tmp) / "Dockerfile"
            dockerfile.write_text("FROM scratch\nCOPY . /\n")
            if not ignore:  # an empty Dockerfile.dockerignore wins over the directory's own
                (Path(tmp) / "Dockerfile.dockerignore").write_text("")
            made = build(directory, dockerfile, tags=[name], cache_dir=cache_root, environ=env)
        return made.image_digest

    return prepared(flags, cache_root, env, build_dir, options.source_policy, options.context)


def _ssh_agents(specs: Iterable[str], env: Mapping[str, str]) -> Any:
    """The `--ssh` agents, checked before the build and kept for its length (engine.sshforward)."""
    import contextlib

    specs = tuple(specs)
    if not specs:
        return contextlib.nullcontext(())
    from lamina.engine import sshforward

    return sshforward.agents([sshforward.parse_ssh(spec) for spec in specs], env)


def _platforms(texts: Iterable[str]) -> dict[str, Any]:
    """BuildOptions' --platform field, parsed and normalised (plan.parse_platforms)."""
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if not texts:
        return {}  # the host's, without importing the planner
    from lamina.engine.plan import parse_platforms

    return {"platforms": parse_platforms(texts)}


def _run_inputs(
    add_hosts: Iterable[str], ulimits: Iterable[str], shm_size: str | int | None
) -> dict[str, Any]:
    """BuildOptions' --add-host, --ulimit and --shm-size fields, parsed (engine.runflags)."""
    add_hosts, ulimits = tuple(add_hosts), tuple(ulimits)
    if not add_hosts and not ulimits and shm_size in (None, "", 0):
        return {}  # the common case, without importing the sandbox's types
    from lamina.engine import runflags

    return {
        "add_hosts": tuple(runflags.parse_add_host(text) for text in add_hosts),
        "ulimits": tuple(runflags.parse_ulimit(text) for text in ulimits),
        "shm_size": runflags.parse_shm_size(shm_size) if shm_size not in (None, "", 0) else 0,
    }


def _cgroup_inputs(cgroup_parent: str | None, memory: str | int | None) -> dict[str, Any]:
    """BuildOptions' cgroup_parent and memory (memory= as BuildKit parses it: bytes, above 0),
    refused before the build where this host cannot give a RUN a cgroup (sandbox.cgroups)."""
    import os

    from lamina.errors import PlanError

    out: dict[str, Any] = {"cgroup_parent": cgroup_parent} if cgroup_parent else {}
    if memory not in (None, ""):
        text = str(memory)
        if not (text.isascii() and text.isdigit()) or int(text) <= 0:
            raise PlanError(f"invalid memory value: {text}: must be a number of bytes above 0")
        out["memory"] = int(text)
    if out:
        from lamina.engine.sandbox import cgroups

        if why := cgroups.why_not(os.geteuid() != 0):
            raise PlanError(f"{' and '.join(_CGROUP_FLAGS[k] for k in out)}: {why}")
    return out


_CGROUP_FLAGS = {"cgroup_parent": "--cgroup-parent", "memory": "memory="}


def _cache_specs(texts: Iterable[str], flag: str) -> tuple[Any, ...]:
    texts = tuple(texts)
    if not texts:
        return ()  # the common case; a no-op rebuild need not import the registry cache
    from lamina.cache.remote import parse_cache_specs

    return parse_cache_specs(texts, flag)


def _output_specs(
    specs: Sequence[str],
    annotations: Iterable[str],
    provenance: str | None,
    sbom: str | None,
    compression: str,
) -> tuple[tuple[Any, ...], tuple[tuple[str, str], ...] | None]:
    """The -o outputs with --annotation applied, and the --provenance attributes, all checked."""
    annotations = tuple(annotations)
    if not specs and not any(annotations) and provenance is None and sbom is None:
        return (), None  # the store's image alone (a no-op rebuild loads no output parser)
    from lamina.engine.outputspec import (
        check_outputs,
        parse_annotation_flags,
        parse_outputs,
        with_annotations,
    )

    outputs = with_annotations(parse_outputs(specs), parse_annotation_flags(tuple(annotations)))
    attestations = None
    if provenance is not None:
        from lamina.engine.provenance import parse_provenance

        attestations = parse_provenance(provenance)
    attested = attestations is not None or sbom is not None
    if attested and not outputs:  # the store's image gets them, as buildx's default
        from lamina.engine.outputspec import OutputSpec, OutputType

        outputs = (OutputSpec(OutputType.IMAGE),)
    check_outputs(outputs, compression, attested)
    return outputs, attestations


def _push_names(options: Any) -> tuple[str, ...]:
    """The names the pushing outputs (`-o type=image,push=true`, `type=registry`) push to."""
    if not any(output.push for output in options.outputs):
        return ()
    from lamina.engine.push import push_names

    return push_names(options, False)


# --- registry: pull, push, login, logout ------------------------------------------


def registry_client(
    environ: Mapping[str, str] | None = None, insecure_registries: Iterable[str] = ()
) -> RegistryClient:
    """A registry client that finds credentials as docker and podman do (see lamina.oci.auth).

    Plain HTTP is used for loopback hosts and `insecure_registries` only.
    Use it as a context manager.
    """
    import os

    from lamina.oci.auth import find_credential
    from lamina.oci.registry import RegistryClient

    env = dict(os.environ if environ is None else environ)
    return RegistryClient(
        credentials=lambda registry: find_credential(registry, env),
        insecure_registries=tuple(insecure_registries),
    )


def pull(
    reference: str,
    *,
    platform: str | None = None,
    insecure_registries: Iterable[str] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PullResult:
    """Pull `reference` into the local store, named by its normalised reference.

    `platform` is `os/arch[/variant]` (default: this host's) and picks the
    image from an index. A digest in `reference` is verified. `log` gets
    one line per blob fetched.
    """
    import os

    from lamina.cache import transfer
    from lamina.cache.store import Store, default_cache_root
    from lamina.oci.reference import parse_reference

    env = dict(os.environ if environ is None else environ)
    ref = parse_reference(reference)
    from lamina.oci.image import Platform

    want = Platform.parse(platform) if platform else None
    root = cache_dir if cache_dir is not None else default_cache_root(env)
    with Store(root) as store, registry_client(env, insecure_registries) as client:
        return transfer.pull(client, store, ref, platform=want, log=log)


def push(
    name: str,
    reference: str | None = None,
    *,
    insecure_registries: Iterable[str] = (),
    chunk_size: int | None = None,
    platform: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """Push the stored image `name` to `reference` (default: `name` itself); return the pushed digest.

    A multi-platform image is pushed whole (each platform's manifest, then the index) unless
    `platform` picks one, pushed as a single-platform image."""
    import os

    from lamina.cache import transfer
    from lamina.cache.store import Store, default_cache_root
    from lamina.oci.reference import parse_reference

    env = dict(os.environ if environ is None else environ)
    ref = parse_reference(reference if reference is not None else name)
    root = cache_dir if cache_dir is not None else default_cache_root(env)
    with Store(root) as store, registry_client(env, insecure_registries) as client:
        return transfer.push(
            client, store, name, ref, chunk_size=chunk_size, log=log, platform=_platform(platform)
        )


def login(
    registry: str,
    username: str,
    password: str,
    *,
    insecure_registries: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> str:
    """Check the credentials against `registry`, then store them; return the auth file written."""
    import os

    from lamina.oci.auth import Credential, store_credential
    from lamina.oci.registry import RegistryClient

    env = dict(os.environ if environ is None else environ)
    registry = _registry_name(registry)
    credential = Credential(username, password)
    insecure = tuple(insecure_registries)
    with RegistryClient(credentials=lambda _: credential, insecure_registries=insecure) as client:
        client.ping(registry, login=True)
    return str(store_credential(registry, credential, env))


def logout(registry: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Forget the credentials for `registry`; return whether there were any."""
    import os

    from lamina.oci.auth import erase_credential

    env = dict(os.environ if environ is None else environ)
    return erase_credential(_registry_name(registry), env)


def _registry_name(text: str) -> str:
    """`https://ghcr.io/` -> `ghcr.io`; Docker Hub's aliases -> `docker.io`."""
    from lamina.oci.reference import DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_LEGACY_KEYS

    name = text.strip().removeprefix("https://").removeprefix("http://").split("/")[0]
    if name in (DOCKER_HUB_API, "index.docker.io") or text in DOCKER_HUB_LEGACY_KEYS:
        return DOCKER_HUB
    return name


def _with_inline_cache(cache_to: Iterable[str], build_args: Mapping[str, str]) -> tuple[str, ...]:
    """BuildKit's BUILDKIT_INLINE_CACHE build arg asks for what `--cache-to type=inline` does."""
    specs = tuple(cache_to)
    if build_args.get("BUILDKIT_INLINE_CACHE", "") in ("", "0", "f", "F", "false", "FALSE", "False"):
        return specs
    return specs if "type=inline" in specs else (*specs, "type=inline")


def call(
    method: str,
    context: str | os.PathLike[str] = ".",
    dockerfile: str | os.PathLike[str] | None = None,
    *,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    platforms: Iterable[str] = (),
) -> tuple[str, str, int]:
    """A frontend method instead of a build, as buildx's `--call`: `check`, `outline`, `targets`.
    `platforms` (--platform) set the TARGET* args the checks and the outline see (the first's).

    `method` may end in `,format=json` and `,ignorestatus=true`. Returns what
    buildx prints on stdout, the error it would print on stderr (or ""), and
    the exit status (1 when `check` finds a warning or an error).
    """
    import os
    from pathlib import Path

    from lamina.cache.store import Store
    from lamina.engine.buildchecks import call as call_method
    from lamina.engine.buildfiles import default_dockerfile
    from lamina.engine.model import BuildOptions

    options = BuildOptions(
        context=Path(context),
        dockerfile=Path(dockerfile) if dockerfile is not None else default_dockerfile(Path(context)),
        target=target,
        build_args=tuple(dict(build_args or {}).items()),
        **_platforms(platforms),
    )
    env = dict(os.environ if environ is None else environ)
    root = Path(_store_root(cache_dir, environ))
    with _local_inputs(options, context, dockerfile, env) as local:  # `-f -`, `-` and git contexts
        if not root.is_dir():  # nothing pulled yet: the checks know no base image's config
            return call_method(method, local, None)
        with Store(root) as store:
            return call_method(method, local, store)


def __getattr__(name: str) -> Any:
    # The result types live in the engine; importing them here lazily keeps
    # `import lamina.api` light.
    if name in ("BuildResult", "StepRecord"):
        from lamina.engine import model

        return getattr(model, name)
    raise AttributeError(name)
