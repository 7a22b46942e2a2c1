"""docs/caching.md's transcripts are lamina's real output: this runs them and compares.

The tutorial is a list of steps in document order:
- a code block after `<!-- file: PATH -->` is written to PATH in the example's directory;
- a ```console block holds commands (`$ ...`) each followed by the output it prints
  (stdout and stderr together), run with `sh -c` in that directory.

Volatile parts are normalised on both sides (timings, digests, kept-failure ids,
dates), and `warning:` lines about the host are left out. To regenerate the
transcripts after changing lamina's output:

    .venv/bin/python tests/test_docs_caching.py --update

and read the diff: the tutorial's prose must still say what the output shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "caching.md"

pytestmark = pytest.mark.sandbox

_FILE = re.compile(r"<!-- file: (\S+) -->\n```[^\n]*\n(.*?)```\n", re.S)
_CONSOLE = re.compile(r"```console\n(.*?)```\n", re.S)
_NORMAL = (
    (re.compile(r"\b\d+\.\d\ds\b"), "0.00s"),
    (re.compile(r"\bsha256:[0-9a-f]{64}\b"), "sha256:" + "0" * 64),
    (re.compile(r"\bsha256:[0-9a-f]{12}\b"), "sha256:" + "0" * 12),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "2026-01-01 00:00:00"),
    (re.compile(r"(lamina debug |failed step's filesystem \(|^)[0-9a-f]{12}\b", re.M), r"\g<1>0123456789ab"),
)


def normalise(text: str) -> str:
    # Warnings say what this host lacks (no slirp4netns, no subordinate ids): not the tutorial's.
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("warning: "))
    for pattern, replacement in _NORMAL:
        text = pattern.sub(replacement, text)
    return text


def steps(doc: str) -> Iterator[tuple[str, int, int, str, str]]:
    """("file", start, end, path, content) or ("console", start, end, body, "") in document order."""
    found = [("file", m.start(), m.end(), m.group(1), m.group(2)) for m in _FILE.finditer(doc)]
    found += [("console", m.start(1), m.end(1), m.group(1), "") for m in _CONSOLE.finditer(doc)]
    yield from sorted(found, key=lambda step: step[1])


def commands(body: str) -> list[tuple[str, str]]:
    """(command, expected output) per `$ ` line of a console block."""
    out: list[tuple[str, str]] = []
    for line in body.splitlines(keepends=True):
        if line.startswith("$ "):
            out.append((line[2:].rstrip("\n"), ""))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def run_tutorial(work: Path, cache: Path) -> Iterator[tuple[int, int, str, str]]:
    """Run every step; yield (start, end, expected block body, actual block body) per console block."""
    doc = DOC.read_text()
    # `lamina` is this checkout's (ROOT), run by this interpreter.
    bin_dir = work.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "lamina").write_text(f'#!/bin/sh\nexec {sys.executable} -m lamina "$@"\n')
    (bin_dir / "lamina").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(work),
        "LAMINA_CACHE": str(cache),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "COLUMNS": "200",
    }
    for kind, start, end, first, second in steps(doc):
        if kind == "file":
            path = work / first
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(second)
            continue
        actual = ""
        for command, _ in commands(first):
            proc = subprocess.run(
                ["sh", "-c", command], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            actual += f"$ {command}\n" + normalise(proc.stdout.decode())
        yield start, end, first, actual


@pytest.fixture
def tutorial_cache(tmp_path: Path, busybox_image: Path) -> Path:
    from tests.support.build import make_cache

    return make_cache(tmp_path, busybox_image)


def test_the_caching_tutorial_shows_lamina_s_real_output(tmp_path: Path, tutorial_cache: Path) -> None:
    work = tmp_path / "example"
    work.mkdir()
    for _, _, expected, actual in run_tutorial(work, tutorial_cache):
        assert "Traceback" not in actual, actual  # a tutorial never shows a crash, even a faithful one
        assert normalise(expected) == actual, (
            "docs/caching.md is stale: run tests/test_docs_caching.py --update"
        )


def _update() -> None:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tests.support.build import make_cache
    from tests.support.busybox import make_busybox_image

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cache = make_cache(base, make_busybox_image(base / "busybox"))
        work = base / "example"
        work.mkdir()
        doc = DOC.read_text()
        pieces, last = [], 0
        for start, end, _, actual in run_tutorial(work, cache):
            if "Traceback (most recent call last)" in actual:  # twice committed so: a tree mid-change
                sys.exit(f"{DOC}: not rewritten, lamina crashed in it:\n{actual}")
            pieces += [doc[last:start], actual]
            last = end
        DOC.write_text("".join(pieces) + doc[last:])
    print(f"{DOC}: transcripts rewritten; read `git diff {DOC.relative_to(ROOT)}`")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {sys.argv[0]} --update  (rewrites docs/caching.md's transcripts)")
    _update()
