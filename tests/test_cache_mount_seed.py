"""A cache mount seeded from `from=` in one build while another build prunes the same id
(--no-cache): two processes sharing one store (lamina.engine.steps.cachemount)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Seeds cachemounts/NAME-REF from SOURCE, and stops between the copy and its rename into place.
SEEDER = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from lamina.engine.steps.cachemount import seed

    mounts, source, scratch = map(Path, sys.argv[1:4])

    def copy(src, dst):
        shutil.copytree(src, dst, symlinks=True)
        print("copied", flush=True)
        sys.stdin.readline()  # the other build prunes now

    seed(mounts / (sys.argv[4] + "-0123456789abcdef"), source, scratch, copy)
    """
)
PRUNER = "import sys; from pathlib import Path; from lamina.engine.steps.cachemount import prune; " + (
    "prune(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))"
)


def test_a_prune_in_another_build_leaves_a_seed_in_flight_alone(tmp_path: Path) -> None:
    mounts, scratch, source = tmp_path / "cachemounts", tmp_path / "tmp", tmp_path / "stage-src"
    for d in (mounts, scratch, source / "sub"):
        d.mkdir(parents=True)
    (source / "sub" / "seeded").write_text("from the stage\n")
    name = "ab" * 16
    (mounts / name).mkdir()  # the id's cache without a ref, as a build before left it
    (mounts / name / "old").write_text("old\n")
    (mounts / f"{name}.lock").touch()

    seeder = subprocess.Popen(
        [sys.executable, "-c", SEEDER, str(mounts), str(source), str(scratch), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert seeder.stdout is not None and seeder.stdin is not None
    try:
        assert seeder.stdout.readline() == "copied\n"
        pruner = [sys.executable, "-c", PRUNER, str(mounts), name, str(scratch)]
        subprocess.run(pruner, check=True, cwd=ROOT, timeout=60)
        assert not (mounts / name).exists()  # the prune did prune
        seeder.stdin.write("\n")
        seeder.stdin.close()
        assert seeder.wait(timeout=60) == 0
    finally:
        seeder.kill()
        seeder.wait()
    seeded = mounts / f"{name}-0123456789abcdef"
    assert (seeded / "sub" / "seeded").read_text() == "from the stage\n"
    assert sorted(p.name for p in mounts.iterdir()) == [seeded.name, f"{name}.lock"]
    assert list(scratch.iterdir()) == []  # neither left work behind
