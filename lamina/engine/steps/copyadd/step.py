"""COPY and ADD as a build step: the source tree, the key, the layer.

This module joins the concerns of `steps.copyadd` to the stage: `--from`
(stage name, index or image, `base.source_stage`), `--chown` names resolved
in the stage's /etc/passwd and /etc/group, the key, and the `produce` that
writes the layer on a miss (`selection`, `placement`, `heredoc`, and ADD's
`fetch` and `archive`).

`COPY --from=stage` is keyed by the content of the files it selects in that
stage, never by the stage's key: a builder rebuilt to the same output keeps
its consumers cached. To skip merging the stage's layers on a no-op
rebuild, the content digest is memoised under (stage key, instruction):
the same stage key means the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.engine.cachekey import copy_files_key, copy_from_key, layer_donor_key, make_inputs
from lamina.engine.context import bulk, open_rootfs
from lamina.engine.dockerfile.instructions import AddInstruction
from lamina.engine.steps import metadata as md
from lamina.engine.steps.base import source_stage, stage_index
from lamina.engine.steps.copyadd.chmod import Chmod, parse_chmod
from lamina.engine.steps.copyadd.dirkeys import context_key
from lamina.engine.steps.copyadd.selection import CopyOptions, destination_path, select_sources, selection_key
from lamina.engine.steps.layerstep import layer_step, step_env
from lamina.engine.steps.layerview import LayerView
from lamina.engine.steps.missfacts import MAX_FILES, selection_files
from lamina.engine.steps.owners import chown_all
from lamina.engine.steps.users import resolve_owner
from lamina.errors import InstructionError
from lamina.oci.digest import Digest

if TYPE_CHECKING:
    from lamina.engine.model import StageState, StepHost
    from lamina.engine.plan import PlannedStage
    from lamina.engine.steps.copyadd.placement import PriorCopy, Written


@dataclasses.dataclass(frozen=True, slots=True)
class _Copy:
    """One COPY/ADD resolved against its stage: owner, mode, destination, sources by kind."""

    instruction: Any  # its heredocs expanded
    keyword: str  # COPY or ADD
    owner: tuple[int, int] | None  # --chown, numeric
    chmod: Chmod | None
    from_: str | None
    dest: str  # absolute, a trailing `/` kept
    options: CopyOptions
    image: LayerView | None  # what the stage holds below (None with --link)
    local: list[str]  # the build context's (or the --from stage's) paths
    urls: list[str]  # ADD <http(s) URL>
    gits: list[str]  # ADD <git URL>
    described: str  # the instruction as keyed (JSON)

    @property
    def is_add(self) -> bool:
        return self.keyword == "ADD"


@dataclasses.dataclass(slots=True)
class _Sources:
    """What a COPY/ADD reads, keyed: the parts `produce` writes and the facts a miss names."""

    parts: list[tuple[str, Any]]  # ("files", materialize) | ("url", Fetched) | ("git", (url, commit))
    digest: str  # of all of their content
    files: tuple[tuple[str, str, str], ...] = ()  # not keyed: names a later miss's files
    source: str = ""  # "stage NAME" / "image REF" for a --from
    list_files: Callable[[], tuple[tuple[str, str, str], ...]] | None = None  # on a miss only


class _PriorRun:
    """The last run of this COPY (build context only): its unchanged files are linked
    from its layer, and what this run wrote is recorded for the next."""

    def __init__(self, executor: StepHost, state: StageState, instruction: Any) -> None:
        self.executor = executor
        self.state = state
        self.instruction = instruction
        self.where = ""
        self.written: Written | None = None  # made when the step runs (the writer is imported then)
        self.prior: PriorCopy | None = None

    def load(self) -> PriorCopy | None:
        """Called when the step runs (its position in the stage is known then)."""
        from lamina.engine.steps.copyadd.placement import Written
        from lamina.engine.steps.copyadd.priorcopy import spool_dir

        self.written = Written(spool_dir(self.executor.store.root))
        self.where = copy_files_key(self.executor.cache.step_position(self.state, self.instruction))
        self.prior = _load_prior_copy(self.executor, self.where)
        return self.prior

    def save(self, dir_id: str) -> None:
        if self.where and self.written:
            linked = self.written.linked
            _save_prior_copy(self.executor, self.where, dir_id, self.written)
            if linked and self.prior is not None:
                # The new layer's blob may take those files' bytes from the old one's
                # (engine.snapshot.Donor). No refs: a donor gone means reading the files.
                record = json.dumps({"dir": self.prior.root.name})
                self.executor.store.cache_put(layer_donor_key(dir_id), record)
            self.written = None

    def close(self) -> None:
        """Drop what a copy that is not saved spooled (it failed, or wrote no layer)."""
        if self.written is not None:
            self.written.discard()


def copy_step(executor: StepHost, state: StageState, plan: PlannedStage, instruction: Any) -> None:
    """COPY or ADD in a stage: key what it reads; on a miss write it into the step's layer."""
    copy = _resolve(state, instruction)
    if executor.options.dry_run and copy.from_ and _pending_source(executor, state, copy):
        return
    sources = _read_sources(executor, state, copy)
    inputs = make_inputs(state.key, copy.keyword + " " + copy.described, {}, state.platform, sources.digest)
    inputs = dataclasses.replace(inputs, files=sources.files, source=sources.source)
    # Unchanged files of the build context are linked from the last run's layer
    # (their digests are in the stat cache; a stage's files would be hashed
    # again), unless something after the copy would chown them (unprivileged --chown).
    link_prior = not copy.from_ and (os.geteuid() == 0 or copy.owner is None)
    prior = _PriorRun(executor, state, copy.instruction) if link_prior else None

    def produce(upper: Path) -> None:
        _produce(executor, copy, sources.parts, prior, upper)

    try:
        has_layer = layer_step(
            executor,
            state,
            copy.instruction,
            inputs,
            produce,
            files=sources.list_files,
            defined=_defined(executor, copy, inputs),
        )
        if prior is not None and prior.written and has_layer:  # written: it ran (not a dry run)
            prior.save(state.layers[-1].dir_id)
    finally:
        if prior is not None:
            prior.close()
    _add_history(executor, state, copy, has_layer)


def _resolve(state: StageState, instruction: Any) -> _Copy:
    """The instruction read against the stage: heredocs expanded, --chown and --chmod
    resolved, the destination made absolute, the sources sorted by kind."""
    is_add = isinstance(instruction, AddInstruction)
    if any(content.expand for content in instruction.contents):
        env = step_env(state)
        from lamina.engine.steps.copyadd.heredoc import expand_heredoc

        contents = tuple(expand_heredoc(content, env) for content in instruction.contents)
        instruction = dataclasses.replace(instruction, contents=contents)
    view = LayerView([layer.path for layer in state.layers])
    owner = resolve_owner(view, instruction.chown) if instruction.chown else None
    chmod = parse_chmod(instruction.chmod) if instruction.chmod else None
    from_ = getattr(instruction, "from_", None)
    dest = destination_path(instruction.dest, state.config.config.working_dir or "/")
    options = CopyOptions(
        chown=owner,
        chmod=chmod,
        excludes=tuple(instruction.excludes),
        parents=bool(getattr(instruction, "parents", False)),
        source_name=f"stage {from_}" if from_ else "build context",
    )
    keyword = "ADD" if is_add else "COPY"
    gits = _git_sources(instruction.sources) if is_add else []  # before URLs: https://h/r.git is one
    # A git source's commit is in the key; --checksum only checks it, so adding one keeps the cache.
    described = _describe(keyword, instruction, dest, owner, options.parents, keyed_checksum=not gits)
    urls = [s for s in instruction.sources if is_add and _is_url(s) and s not in gits]
    local = [s for s in instruction.sources if s not in urls and s not in gits]
    _check_checksum(instruction, urls, gits)
    image = None if instruction.link else view
    return _Copy(
        instruction, keyword, owner, chmod, from_, dest, options, image, local, urls, gits, described
    )


def _describe(
    keyword: str,
    instruction: Any,
    dest: str,
    owner: tuple[int, int] | None,
    parents: bool,
    *,
    keyed_checksum: bool = True,
) -> str:
    """The instruction as its key reads it (JSON, sorted keys)."""
    described = {
        "op": keyword,
        "sources": list(instruction.sources),
        "dest": dest,
        "owner": list(owner) if owner else None,
        "chmod": instruction.chmod,
        "excludes": list(instruction.excludes),
        "parents": parents,
        "link": instruction.link,
        "heredocs": [[c.path, hashlib.sha256(c.data.encode()).hexdigest()] for c in instruction.contents],
        "checksum": getattr(instruction, "checksum", None) if keyed_checksum else None,
        "unpack": getattr(instruction, "unpack", None),
    }
    return json.dumps(described, sort_keys=True)


def _check_checksum(instruction: Any, urls: list[str], gits: list[str]) -> None:
    """BuildKit's dispatchCopy: a checksum pins one downloaded source."""
    if not getattr(instruction, "checksum", None):
        return
    if len(instruction.sources) != 1:
        why = "ADD --checksum can't be specified for multiple sources"
        raise InstructionError(why, instruction.location)
    if not urls and not gits:
        raise InstructionError(
            f"ADD --checksum {instruction.sources[0]}: checksum requires HTTP(S) or Git sources",
            instruction.location,
        )


def _defined(executor: StepHost, copy: _Copy, inputs: Any) -> Any:
    """A COPY --from's inputs with the stage's key in place of the files' digest: BuildKit's
    definition key of it, which a --cache-from entry may match (stepcache.fetch_defined)."""
    if not copy.from_:
        return None
    source = source_stage(executor, copy.from_, copy.instruction.location)
    return make_inputs(
        inputs.parent, inputs.instruction, dict(inputs.env), inputs.platform, f"from:{source.key}"
    )


def _pending_source(executor: StepHost, state: StageState, copy: _Copy) -> bool:
    """--dry-run: a --from stage that will run first has no files to key yet; record the
    step as pending on it (identical output would still hit). True when recorded."""
    assert copy.from_ is not None
    source = source_stage(executor, copy.from_, copy.instruction.location)
    if source.name not in executor.dirty:
        return False
    reason = f"stage {source.name} will run first; the files it selects decide"
    inputs = make_inputs(state.key, copy.keyword + " " + copy.described, {}, state.platform, "pending")
    layer_step(executor, state, copy.instruction, inputs, lambda upper: None, pending=reason)
    return True


def _read_sources(executor: StepHost, state: StageState, copy: _Copy) -> _Sources:
    """Select the local files, fetch the URLs, find the git commits: their content keys the step."""
    content = hashlib.sha256()
    sources = _Sources([], "")
    if copy.local:
        from_ = copy.from_
        materialize, digest, items = _select(
            executor, state, copy.instruction, from_, copy.local, copy.dest, copy.options, copy.image
        )
        content.update(f"files\0{digest}\n".encode())
        sources.parts.append(("files", materialize))
        if not from_:  # listed on every build (a later miss names them), up to missfacts' limit
            sources.files = selection_files(*materialize()) if items <= MAX_FILES else ()
        else:
            index = stage_index(from_)
            index = executor.plan.names.get(from_.lower()) if index is None else index
            stage = executor.plan.needed.get(index) if index is not None else None
            sources.source = f"stage {stage.display_name}" if stage is not None else f"image {from_}"
            sources.list_files = lambda: selection_files(*materialize())
    for url in copy.urls:
        from lamina.engine.steps.copyadd.fetch import fetch_url

        fetched = fetch_url(executor, url, copy.instruction.checksum)
        content.update(f"url\0{url}\0{fetched.digest}\n".encode())
        sources.files += ((url, fetched.digest, "url"),)  # a miss names the URL whose content changed
        sources.parts.append(("url", fetched))
    for src in copy.gits:
        from lamina.engine.steps.copyadd.gitadd import commit_of, git_environ

        if executor.options.source_policy is not None:  # BuildKit's git source op is judged too
            from lamina.engine.sourcepolicy import git_source, require_kept

            where = f"{copy.instruction.location}: ADD {src}"
            require_kept(executor.options.source_policy, git_source(src), where)
        env = git_environ(executor.options)  # an ssh URL: the --ssh default agent, as BuildKit's
        commit = commit_of(src, copy.instruction.checksum, copy.instruction.location, env)  # the key
        content.update(f"git\0{src}\0{commit}\0{copy.instruction.keep_git_dir}\n".encode())
        sources.files += ((src, commit, "git"),)
        sources.parts.append(("git", (src, commit)))
    sources.digest = content.hexdigest()
    return sources


def _produce(
    executor: StepHost, copy: _Copy, parts: list[tuple[str, Any]], prior: _PriorRun | None, upper: Path
) -> None:
    """Write every part into the step's upper dir, then the heredocs, then the late owners."""
    # Owners of directories kept from the layers below: set after every write
    # (unprivileged, a directory given to another id is no longer writable).
    from lamina.engine.steps.copyadd.fetch import write_fetched
    from lamina.engine.steps.copyadd.heredoc import write_heredoc

    late: list[tuple[Path, int, int]] = []
    for kind, part in parts:
        if kind == "files":
            _write_files(executor, copy, part, prior, upper, late)
        elif kind == "git":
            _write_git(executor, copy, part, upper, late)
        else:
            unpack = copy.is_add and copy.instruction.unpack is True
            write_fetched(part, upper, copy.dest, copy.owner, copy.chmod, copy.image, late, unpack=unpack)
    several = len(copy.instruction.contents) > 1
    for heredoc in copy.instruction.contents:
        write_heredoc(upper, copy.dest, heredoc, copy.owner, copy.chmod, copy.image, several, late)
    chown_all(late)


def _write_files(
    executor: StepHost,
    copy: _Copy,
    materialize: Callable[[], tuple[Any, Any]],
    prior: _PriorRun | None,
    upper: Path,
    late: list[tuple[Path, int, int]],
) -> None:
    """The local sources: ADD's archives unpacked, the rest written (linked from the last
    run where unchanged), then the owners an unprivileged copy could not give."""
    from lamina.engine.steps.copyadd.archive import unpack_archives
    from lamina.engine.steps.copyadd.placement import write_selection

    tree, selection = materialize()
    if copy.is_add and copy.instruction.unpack is not False:
        selection = unpack_archives(
            tree, selection, upper, copy.dest, copy.owner, copy.image, copy.local, late
        )
    last = prior.load() if prior is not None else None  # and prior.written made
    with bulk():
        write_selection(
            tree,
            selection,
            upper,
            copy.image,
            late_owners=late,
            prior=last,
            written=prior.written if prior is not None else None,
            stop=executor.stop,
        )
    if os.geteuid() != 0 and copy.owner is not None:
        _rootless_owners(upper, selection, copy.owner, copy.image)
    elif os.geteuid() != 0 and copy.from_:
        _restore_stage_owners(executor, tree, upper, selection)


def _write_git(
    executor: StepHost, copy: _Copy, part: tuple[str, str], upper: Path, late: list[tuple[Path, int, int]]
) -> None:
    """ADD <git URL>: the repository's tree at the keyed commit."""
    from lamina.engine.steps.copyadd.gitadd import git_tree
    from lamina.engine.steps.copyadd.placement import write_selection

    with git_tree(executor, *part, copy.instruction.keep_git_dir) as tree:
        selection = select_sources(tree, ["."], copy.dest, copy.options, copy.image)
        write_selection(tree, selection, upper, copy.image, late_owners=late, stop=executor.stop)
        if os.geteuid() != 0 and copy.owner is not None:
            _rootless_owners(upper, selection, copy.owner, copy.image)


def _add_history(executor: StepHost, state: StageState, copy: _Copy, has_layer: bool) -> None:
    instruction = copy.instruction
    created_by = md.copy_created_by(
        copy.keyword,
        instruction.sources,
        instruction.dest,
        chown=instruction.chown or "",
        chmod=instruction.chmod or "",
        parents=copy.options.parents,
        heredoc_names=[c.path for c in instruction.contents],
    )
    state.config = md.add_history(
        state.config, created_by, created=executor.created(state), empty_layer=not has_layer, ran=True
    )


def _load_prior_copy(executor: StepHost, where: str) -> PriorCopy | None:
    """The files the last run of this COPY wrote, if its layer directory is still there."""
    from lamina.engine.steps.copyadd import priorcopy
    from lamina.engine.steps.copyadd.placement import PriorCopy

    text = executor.store.cache_get(where)
    if text is None:
        return None
    try:
        record = json.loads(text)
        dir_id = record["dir"]
        root = executor.store.unpacked_path(Digest("sha256", dir_id))
        if record.get("format") != priorcopy.FORMAT or not root.is_dir():
            return None  # gone, or an older record's: copy everything
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    files = priorcopy.load(executor.store.root, where, dir_id)
    return PriorCopy(root, files) if files is not None else None


def _save_prior_copy(executor: StepHost, where: str, dir_id: str, written: Written) -> None:
    """The packed records, compressed, in a file of the store (`priorcopy`): never an
    object per file, nor the stream in memory (issue 22)."""
    from lamina.engine.steps.copyadd import priorcopy

    try:
        priorcopy.keep(written.save(), executor.store.root, where, dir_id)
    except OSError:
        written.discard()
        return  # a full or unwritable store: the next run copies every file
    # No refs: this record keeps no layer from gc; a missing directory means copying.
    executor.store.cache_put(where, json.dumps({"dir": dir_id, "format": priorcopy.FORMAT}))


def _rootless_owners(upper: Path, selection: Any, owner: tuple[int, int], image: Any) -> None:
    """Unprivileged, the copy could not --chown: set the owner inside the user namespace
    (not on directories that exist below: those keep their owner, as BuildKit's do)."""

    def below(dest: str) -> bool:
        return image is not None and image.stat("/" + dest) is not None

    paths = [upper / made.dest for made in selection.made_dirs if not below(made.dest)]
    paths += [upper / item.dest for item in selection.items]
    chown_all([(path, *owner) for path in paths if os.path.lexists(path)])


def _restore_stage_owners(executor: StepHost, tree: Any, upper: Path, selection: Any) -> None:
    """Unprivileged COPY --from: give copied files the owners they have in the stage.

    The stage view is a copy owned by the caller (root in the sandbox); the
    owners it could not keep are mapped back to container ids and set inside
    the user namespace.
    """
    lost = executor.lost_owners.get(Path(tree.root), {})
    if not lost:
        return
    from lamina.engine.sandbox.idmap import IdMode, detect_ids

    ids = detect_ids()
    owners = []
    for item in selection.items:
        host = lost.get(tree.abspath(item.entry.path))
        if host is not None and ids.mode is IdMode.RECORDED:
            owners.append((upper / item.dest, *host))  # recorded: container ids already
        elif host is not None:
            owners.append((upper / item.dest, ids.uid_inside(host[0]), ids.gid_inside(host[1])))
    chown_all(owners)


def _git_sources(sources: list[str]) -> list[str]:
    """ADD's git sources (engine.gitsource's rule: a `.git` URL, `git@`, `git://`, ...)."""
    from lamina.engine.steps.copyadd.gitadd import is_git_url

    return [source for source in sources if is_git_url(source)]


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _select(
    executor: StepHost,
    state: StageState,
    instruction: Any,
    from_: str | None,
    sources: list[str],
    dest: str,
    options: Any,
    image: Any,
) -> tuple[Any, str, int]:
    """(a function giving (source tree, selection), content digest, how many items) of the
    local sources (items: 0 for a --from stage, whose files are not listed on a hit).

    The build context's directories are keyed from their records (dirkeys), and the
    selection is made only if the step runs. For an unchanged `--from` stage the digest
    comes from a memo, and the stage's files are only merged if the step must actually run.
    """
    if not from_:
        tree = executor.context()
        with bulk():
            # A fetched (git, tar) context is a new directory every build: no record would serve.
            remote = executor.options.remote_context
            keyed = None if remote else context_key(tree, sources, dest, options, image, executor.store.root)
            if keyed is None:
                selection = select_sources(tree, sources, dest, options, image)
                digest = str(selection_key(tree, selection))
                return (lambda: (tree, selection)), digest, len(selection.items)
        made: list[Any] = [keyed.selection] if keyed.selection is not None else []  # a first build's

        def select() -> tuple[Any, Any]:
            if not made:
                with bulk():
                    made.append(select_sources(tree, sources, dest, options, image))
            return tree, made[0]

        return select, str(keyed.digest), keyed.items
    outcome = source_stage(executor, from_, instruction.location)
    # The selection also depends on what the destination stage holds: its key says. The
    # stage's layer dirs are in it too: --no-cache(-filter) reruns a stage under the same
    # key, and what it made then is not what the memo saw (BuildKit copies the new content).
    made = ",".join(layer.dir_id or str(layer.diff_id) for layer in outcome.layers)
    memo_key = _memo_key(f"{outcome.key}:{made}", state.key, sources, dest, options, image is None)

    def materialize() -> tuple[Any, Any]:
        roots = [_literal_prefix(source) for source in sources]
        tree = open_rootfs(executor.stage_rootfs(outcome, roots), executor.stat_cache())
        return tree, select_sources(tree, sources, dest, options, image)

    memo = executor.store.cache_get(memo_key)
    if memo is not None:
        return materialize, memo, 0
    tree, selection = materialize()
    digest = str(selection_key(tree, selection))
    executor.store.cache_put(memo_key, digest)
    return (lambda: (tree, selection)), digest, 0


def _literal_prefix(source: str) -> str:
    """The part of a source path before its first wildcard component (`/a/*/b` -> `/a`)."""
    parts = []
    for part in source.split("/"):
        if any(ch in part for ch in "*?[\\"):
            break
        parts.append(part)
    return "/" + "/".join(p for p in parts if p and p != ".")


def _memo_key(stage_key: str, dest_key: str, sources: list[str], dest: str, options: Any, link: bool) -> str:
    text = json.dumps([stage_key, dest_key, sources, dest, repr(options), link])
    return copy_from_key(text)
