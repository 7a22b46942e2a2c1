"""Every failure a user can cause or meet is a LaminaError.

    LaminaError                      base; the CLI prints str(err) and exits 1
    ├── DockerfileError              carries path, line, column of the Dockerfile
    │   ├── DockerfileSyntaxError    the text does not parse
    │   └── InstructionError         an instruction or flag is malformed/unsupported
    ├── ExpansionError               ${VAR:?msg} and bad substitutions
    ├── IgnoreFileError              an invalid .dockerignore pattern
    ├── PlanError                    unknown stage, cycle, bad --target, bad --build-arg
    ├── ContextError                 a COPY source is missing or escapes the context
    ├── StoreError                   the content store or cache index
    │   ├── DigestMismatch           bytes do not hash to the digest they claim
    │   ├── ImageNotFound            a name the store does not hold
    │   └── StoreBusy                gc needs the store to itself
    ├── ImageFormatError             a malformed image document, layout or archive
    ├── LayerError                   a hostile or broken layer tar
    │   └── UnsafePath               a path (tar entry, link target) that would leave its root
    ├── SandboxError                 namespaces, mounts, process start
    ├── DiskFull                     a write found no space (ENOSPC) or quota (EDQUOT); names the path
    ├── BuildError                   a step failed (names stage and line, keeps output tail)
    │   └── OutputError              a malformed --output spec, or an output that cannot be written
    └── RegistryError                registry protocol, auth, transport
        ├── CredentialError          an auth file or docker-credential-* helper failed
        └── InvalidReference         text that is not an image reference

Per-instruction parsers raise a bare error; the dispatcher that knows the
node adds the location once (`with_location`).
"""

from __future__ import annotations

import dataclasses
import errno


class LaminaError(Exception):
    """Base of all user-facing errors."""


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
    path: str
    line: int  # 1-based; 0 when unknown
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.path
        return f"{self.path}:{self.line}"


class DockerfileError(LaminaError):
    """An error in a Dockerfile; `location` names the file and line."""

    def __init__(self, message: str, location: Location | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location

    def with_location(self, location: Location) -> DockerfileError:
        """Return a copy of this error located at `location` (kept if already set)."""
        if self.location is not None:
            return self
        err = type(self).__new__(type(self))
        DockerfileError.__init__(err, self.message, location)
        err.__cause__ = self.__cause__
        return err

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        return f"{self.location}: {self.message}"


class DockerfileSyntaxError(DockerfileError):
    pass


class InstructionError(DockerfileError):
    pass


class ExpansionError(LaminaError):
    pass


class IgnoreFileError(LaminaError):
    pass


class PlanError(LaminaError):
    pass


class ContextError(LaminaError):
    pass


class StoreError(LaminaError):
    pass


class DigestMismatch(StoreError):
    pass


class ImageNotFound(StoreError):
    pass


class StoreBusy(StoreError):
    pass


class ImageFormatError(LaminaError):
    """A manifest, config, index, layout or archive is malformed; lists every problem."""


class LayerError(LaminaError):
    pass


class UnsafePath(LayerError):
    """A hostile path; callers add which layer or context and which entry."""


class SandboxError(LaminaError):
    pass


# What a write that found no room fails with: the disk is full, or the user's quota is.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


class DiskFull(LaminaError):
    """A write found no room: `write PATH: No space left on device`, PATH the file being written.

    Whoever knows more (the Dockerfile step, the output, the file being loaded)
    puts it in front with `within()`, so the user reads one line: what was being
    done, where it was being written, and that the disk is full.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def writing(cls, path: object | None, err: OSError) -> DiskFull:
        """The error for `err` (ENOSPC or EDQUOT) met while writing `path`; with None,
        the file `err` names (shutil.copyfile names the destination second)."""
        import os

        if path is None:
            path = err.filename2 or err.filename or "(a file)"
        return cls(f"write {path}: {err.strerror or os.strerror(err.errno or errno.ENOSPC)}", str(path))

    def within(self, what: str) -> DiskFull:
        """The same error, said to happen while doing `what` (a step, an output)."""
        wrapped = DiskFull(f"{what}: {self}", self.path)
        wrapped.__cause__ = self.__cause__
        return wrapped


class BuildError(LaminaError):
    """A build step failed; `output_tail` holds the last lines the step printed."""

    def __init__(self, message: str, output_tail: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.output_tail = output_tail


class OutputError(BuildError):
    pass


class RegistryError(LaminaError):
    pass


class CredentialError(RegistryError):
    pass


class InvalidReference(RegistryError):
    pass
