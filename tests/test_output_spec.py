"""`-o/--output` specs parse as buildx reads them; rootfs merge honours whiteouts."""

from __future__ import annotations

import os

import pytest

from lamina.engine.output import merge_layers
from lamina.engine.outputspec import OutputType, parse_output, parse_outputs
from lamina.errors import OutputError


@pytest.mark.parametrize(
    ("spec", "kind", "dest"),
    [
        ("type=oci,dest=out.tar", OutputType.OCI, "out.tar"),
        ("type=docker,dest=-", OutputType.DOCKER, "-"),
        ("type=local,dest=dir", OutputType.LOCAL, "dir"),
        ("type=tar,dest=r.tar", OutputType.TAR, "r.tar"),
        ("type=image", OutputType.IMAGE, ""),
        ("outdir", OutputType.LOCAL, "outdir"),
        ("-", OutputType.TAR, "-"),
    ],
)
def test_parse_output(spec, kind, dest):
    output = parse_output(spec)
    assert (output.type, output.dest) == (kind, dest)


def test_parse_output_names_and_compression():
    output = parse_output("type=oci,dest=x.tar,name=a:1,name=b:2,compression=zstd")
    assert output.names == ("a:1", "b:2") and output.compression == "zstd"
    assert parse_output("type=oci,dest=d,tar=false").tar is False


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("type=oci,tar=false", "needs dest="),
        ("type=docker", "needs dest="),
        ("type=local", "needs dest="),
        ("type=nope,dest=x", "unknown type"),
        ("type=image,name=x,push-by-digest=true", "needs push=true"),
        ("type=image,name=x,dangling-name-prefix=d", "not supported"),
        ("dest=x", "missing type"),
        ("type=oci,dest=x,bogus=1", "unknown key"),
        ("type=oci,dest=x,compression=lz4", "compression"),
        ("", "empty"),
    ],
)
def test_parse_output_errors(spec, message):
    with pytest.raises(OutputError, match=message):
        parse_output(spec)


def test_registry_is_image_with_push_and_attributes_parse():
    output = parse_output('type=registry,"name=a:1,b:2",compression=uncompressed,annotation[linux/amd64].k=v')
    assert (output.type, output.push, output.names) == (OutputType.IMAGE, True, ("a:1", "b:2"))
    assert output.compression == "none" and output.oci_types
    assert [(a.kind, a.key, a.value, a.platform) for a in output.annotations] == [
        ("manifest", "k", "v", "linux/amd64")
    ]
    assert not parse_output("type=docker,dest=x").oci_types


def test_unpack_is_accepted_as_buildx_push_passes_it():
    # buildx's --push is -o type=registry,unpack=false: lamina unpacks nothing for an image
    assert parse_output("type=registry,name=r/a:1,unpack=false").push
    with pytest.raises(OutputError, match="store=false is not supported"):
        parse_output("type=image,name=a,store=false")


def test_only_one_stdout_output():
    with pytest.raises(OutputError, match="stdout"):
        parse_outputs(["-", "type=oci,dest=-"])


def test_merge_layers_applies_whiteouts_and_opaque_dirs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("whiteout char devices need root to create")
    low, up, dest = tmp_path / "low", tmp_path / "up", tmp_path / "dest"
    (low / "keep").mkdir(parents=True)
    (low / "keep" / "a").write_text("a")
    (low / "gone").write_text("x")
    (low / "opq").mkdir()
    (low / "opq" / "old").write_text("old")
    up.mkdir()
    os.mknod(up / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    (up / "opq").mkdir()
    os.setxattr(up / "opq", "trusted.overlay.opaque", b"y")
    (up / "opq" / "new").write_text("new")
    (up / "keep" / "b").parent.mkdir()
    (up / "keep" / "b").write_text("b")
    os.symlink("keep/a", up / "link")
    merge_layers([low, up], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep", "link", "opq"]
    assert sorted(p.name for p in (dest / "keep").iterdir()) == ["a", "b"]
    assert [p.name for p in (dest / "opq").iterdir()] == ["new"]
    assert os.readlink(dest / "link") == "keep/a"


def test_stdout_output_on_a_terminal_is_refused(monkeypatch):
    """`-o -` / dest=- with stdout a terminal: buildx's refusal (was: the tar written to the terminal)."""
    import os

    from lamina.engine.outputspec import check_outputs

    monkeypatch.setattr(os, "isatty", lambda fd: fd == 1)
    for spec in ("-", "type=oci,dest=-"):
        with pytest.raises(
            OutputError, match=r"dest file is required for \w+ exporter\. refusing to write to console$"
        ):
            check_outputs((parse_output(spec),), "gzip", False)
    check_outputs((parse_output("type=tar,dest=out.tar"),), "gzip", False)


def test_a_file_output_without_dest_goes_to_stdout():
    """As buildx: type=tar and type=oci (a tar) with no dest= write to stdout (was: refused)."""
    assert parse_output("type=tar").to_stdout and parse_output("type=oci").to_stdout
    assert not parse_output("type=oci,dest=x.tar").to_stdout


def test_quiet_build_with_a_tar_on_stdout_prints_the_image_id_to_stderr(tmp_path):
    """`-q -o -`: stdout is the tar alone, the image ID goes to stderr (was: appended to the tar)."""
    import io
    import subprocess
    import sys
    import tarfile

    from tests.support.build import ROOT, write_context

    ctx = write_context(tmp_path / "ctx", "FROM scratch\nCOPY f.txt /f.txt\n", {"f.txt": "x\n"})
    env = {**os.environ, "LAMINA_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    for spec in ("-", "type=oci"):
        proc = subprocess.run(
            [sys.executable, "-m", "lamina", "build", "-q", "-o", spec, str(ctx)],
            capture_output=True,
            env=env,
            check=True,
        )
        assert proc.stderr.decode().startswith("sha256:"), proc.stderr
        assert len(proc.stdout) % 512 == 0, "nothing after the tar's last block"
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            assert tar.getnames()
