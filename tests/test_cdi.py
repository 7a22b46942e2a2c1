"""RUN --device with CDI specs (lamina.engine.cdi), as BuildKit's cdidevices manager: selection,
`required`, the `device` entitlement and its autoallow annotation, and what a device gives a RUN."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lamina.engine import cdi
from lamina.engine.dockerfile.instructions import parse_device
from lamina.errors import BuildError, InstructionError, LaminaError
from tests.support.build import BASE, build, make_cache, write_context


def _spec(directory: Path, name: str, kind: str, devices: list[dict[str, Any]], **extra: Any) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(
        json.dumps({"cdiVersion": "0.6.0", "kind": kind, "devices": devices, **extra})
    )


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("vendor.com/gpu=0", ("vendor.com/gpu=0", False)),
        ("vendor.com/gpu=0,required", ("vendor.com/gpu=0", True)),
        ("name=vendor.com/gpu=0,required=false", ("vendor.com/gpu=0", False)),
        ("gpu,required=true", ("gpu", True)),
    ],
)
def test_device_values_parse_as_buildkit_reads_them(text: str, parsed: tuple[str, bool]) -> None:
    assert parse_device(text) == parsed


def test_a_misspelt_device_key_says_what_was_meant() -> None:
    with pytest.raises(InstructionError, match=r"unexpected key 'requird' .*did you mean required"):
        parse_device("vendor.com/gpu=0,requird=true")


def test_selection_by_name_kind_all_and_class(tmp_path: Path) -> None:
    gpu = {"containerEdits": {"env": ["A=1"]}}
    _spec(tmp_path, "gpu.json", "vendor.com/gpu", [{"name": "0", **gpu}, {"name": "1", **gpu}])
    classed = {"name": "x", "annotations": {cdi.CLASS_ANNOTATION: "accel"}}
    _spec(tmp_path, "other.json", "other.com/dev", [classed])
    known = cdi.load([str(tmp_path)])

    def pick(name: str) -> list[str]:
        return cdi.resolve([(name, True)], known, True, "Dockerfile:2")

    assert pick("vendor.com/gpu=1") == ["vendor.com/gpu=1"]
    assert pick("vendor.com/gpu") == ["vendor.com/gpu=0"]  # the first of its kind
    assert pick("vendor.com/gpu=*") == ["vendor.com/gpu=0", "vendor.com/gpu=1"]
    assert pick("accel") == ["other.com/dev=x"]
    assert cdi.resolve([("vendor.com/gpu=9", False)], known, True, "Dockerfile:2") == []
    with pytest.raises(
        BuildError, match=r"Dockerfile:2: required device 'vendor.com/gpu=9' is not registered"
    ):
        pick("vendor.com/gpu=9")


def test_a_device_needs_the_entitlement_unless_its_spec_auto_allows_it(tmp_path: Path) -> None:
    _spec(
        tmp_path,
        "a.json",
        "vendor.com/a",
        [{"name": "open", "annotations": {cdi.AUTOALLOW_ANNOTATION: True}}],
    )
    _spec(tmp_path, "b.json", "vendor.com/b", [{"name": "closed"}])
    known = cdi.load([str(tmp_path)])
    assert cdi.resolve([("vendor.com/a=open", True)], known, False, "x") == ["vendor.com/a=open"]
    with pytest.raises(BuildError, match=r"vendor.com/b=closed is requested .* --allow device"):
        cdi.resolve([("vendor.com/b=closed", True)], known, False, "x")
    assert cdi.resolve([("vendor.com/b=closed", True)], known, True, "x") == ["vendor.com/b=closed"]


@pytest.mark.parametrize(
    "edits, message",
    [
        (
            {"hooks": [{"hookName": "createContainer", "path": "/bin/true"}]},
            "containerEdits.hooks is not supported",
        ),
        ({"mounts": [{"hostPath": "/x", "containerPath": "/y", "type": "tmpfs"}]}, "only bind mounts"),
    ],
)
def test_edits_lamina_cannot_make_are_refused_naming_the_spec(
    tmp_path: Path, edits: dict[str, Any], message: str
) -> None:
    _spec(tmp_path, "h.json", "vendor.com/h", [{"name": "0", "containerEdits": edits}])
    with pytest.raises(BuildError, match=rf"CDI spec .*h.json: .*{message}"):
        cdi.edits(["vendor.com/h=0"], cdi.load([str(tmp_path)]))


@pytest.mark.sandbox
def test_a_device_mount_and_env_reach_the_run_and_change_its_key(
    tmp_path: Path, busybox_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path, busybox_image)
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "model").write_text("weights")
    mount = {"hostPath": str(tmp_path / "share"), "containerPath": "/opt/share", "options": ["ro", "bind"]}
    edits = {"env": ["ACCEL=1"], "mounts": [mount]}
    _spec(tmp_path / "cdi", "acc.json", "vendor.com/acc", [{"name": "0", "containerEdits": edits}])
    monkeypatch.setenv(cdi.ENV_VAR, str(tmp_path / "cdi"))
    dockerfile = (
        f"FROM {BASE}\nRUN --device=vendor.com/acc=0 cat /opt/share/model > /out && echo $ACCEL >> /out\n"
    )
    ctx = write_context(tmp_path / "ctx", dockerfile)
    with pytest.raises(LaminaError, match="--allow device"):
        build(cache, ctx)
    out = tmp_path / "out"
    result = build(cache, ctx, allow=["device"], outputs=[f"type=local,dest={out}"])
    assert (out / "out").read_text() == "weights1\n"
    assert not (out / "opt" / "share" / "model").exists()  # a bind, not a layer's file
    plain = write_context(
        tmp_path / "plain", f"FROM {BASE}\nRUN cat /dev/null > /out && echo $ACCEL >> /out\n"
    )
    assert build(cache, plain).image_digest != result.image_digest
