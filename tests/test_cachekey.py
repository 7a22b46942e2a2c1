"""Step cache keys change exactly when what the step sees changes."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from lamina.engine.cachekey import KeyInputs, explain_miss, make_inputs

BASE = make_inputs("sha256:parent", "RUN make", {"A": "1"}, "linux/amd64", "sha256:files")


def test_same_inputs_same_key() -> None:
    again = make_inputs("sha256:parent", "RUN make", {"A": "1"}, "linux/amd64", "sha256:files")
    assert BASE.key() == again.key()


def test_each_input_changes_the_key() -> None:
    variants = [
        make_inputs("sha256:other", "RUN make", {"A": "1"}, "linux/amd64", "sha256:files"),
        make_inputs("sha256:parent", "RUN make all", {"A": "1"}, "linux/amd64", "sha256:files"),
        make_inputs("sha256:parent", "RUN make", {"A": "2"}, "linux/amd64", "sha256:files"),
        make_inputs("sha256:parent", "RUN make", {"A": "1"}, "linux/arm64", "sha256:files"),
        make_inputs("sha256:parent", "RUN make", {"A": "1"}, "linux/amd64", "sha256:other"),
    ]
    keys = {variant.key() for variant in variants}
    assert BASE.key() not in keys
    assert len(keys) == len(variants)


def test_env_order_does_not_matter() -> None:
    one = make_inputs("p", "RUN x", {"A": "1", "B": "2"})
    two = make_inputs("p", "RUN x", {"B": "2", "A": "1"})
    assert one.key() == two.key()


def test_explain_names_the_changed_arg() -> None:
    changed = make_inputs("sha256:parent", "RUN make", {"A": "2"}, "linux/amd64", "sha256:files")
    assert explain_miss(BASE, changed) == 'build arg A changed: "1" -> "2"'
    assert explain_miss(None, BASE) == "first build of this step"


def test_explain_tells_env_from_arg_and_masks_secrets_and_proxies() -> None:
    old = make_inputs("p", "RUN x", {"MODE": "a", "API_TOKEN": "s1", "HTTP_PROXY": "http://u:pw@one"})
    new = make_inputs("p", "RUN x", {"MODE": "b", "API_TOKEN": "s2", "HTTP_PROXY": "http://u:pw@two"})
    old, new = (dataclasses.replace(i, env_from=("MODE",)) for i in (old, new))
    assert explain_miss(old, new) == (
        "build arg API_TOKEN changed: (value masked); build arg HTTP_PROXY changed: (value masked); "
        'ENV MODE changed: "a" -> "b"'
    )
    added = make_inputs("p", "RUN x", {"MODE": "a", "NEW": "1"})
    assert 'build arg NEW changed: (unset) -> "1"' in explain_miss(
        make_inputs("p", "RUN x", {"MODE": "a"}), added
    )


def _files(*items: tuple[str, str, str]) -> KeyInputs:
    return dataclasses.replace(make_inputs("p", "COPY {}", content=str(items)), files=items)


def test_explain_names_the_files_and_the_kind_of_change() -> None:
    old = _files(("a", "c1", "file 644 0:0 "), ("b", "c2", "file 644 0:0 "), ("gone", "c3", "file 644 0:0 "))
    new = _files(("a", "c9", "file 644 0:0 "), ("b", "c2", "file 755 0:0 "), ("new", "c4", "file 644 0:0 "))
    assert explain_miss(old, new) == (
        "file content changed: a; mode or owner changed: b; file added: new; file removed: gone"
    )
    many_old = _files(*((f"f{i}", "x", "m") for i in range(6)))
    many_new = _files(*((f"f{i}", "y", "m") for i in range(6)))
    assert explain_miss(many_old, many_new) == "file content changed: f0, f1, f2 and 3 more"
    # Inputs stored by an older lamina have no file list: the cause is still named, vaguely.
    assert explain_miss(
        make_inputs("p", "COPY {}", content="1"), make_inputs("p", "COPY {}", content="2")
    ) == ("input files changed")


def test_explain_names_run_options_and_the_base_image() -> None:
    def run(**fields: object) -> KeyInputs:
        described = {
            "argv": ["make"],
            "cwd": "/",
            "mounts": [],
            "network": "default",
            "script": "",
            "user": "",
        }
        described.update(fields)
        return make_inputs("sha256:base1", "RUN " + json.dumps(described, sort_keys=True))

    assert explain_miss(run(), run(network="none")) == "RUN options changed: network default -> none"
    assert (
        explain_miss(run(), run(security="insecure")) == "RUN options changed: security default -> insecure"
    )
    mount = "cache:pip:/root/.cache"
    assert explain_miss(run(), run(mounts=[mount])) == "RUN options changed: mounts (+cache:pip:/root/.cache)"
    assert explain_miss(run(), run(argv=["make", "all"])) == "instruction text changed (the command)"
    # the build's RUN flags name themselves (was: 'instruction text changed', a text that did not change)
    assert explain_miss(run(shm=32 << 20), run(shm=16 << 20)) == "RUN options changed: --shm-size 32m -> 16m"
    assert (
        explain_miss(run(), run(ulimits=["nofile=1:2"]))
        == "RUN options changed: --ulimit default -> nofile=1:2"
    )
    assert explain_miss(run(hosts=["a=10.0.0.1"]), run(hosts=["a=10.0.0.2"])) == (
        "RUN options changed: --add-host a=10.0.0.1 -> a=10.0.0.2"
    )
    assert explain_miss(run(), run(hostname="box")) == "RUN options changed: hostname default -> box"
    old = dataclasses.replace(run(), base="image busybox:1.36@sha256:" + "a" * 64)
    new = dataclasses.replace(run(), parent="sha256:base2", base="image busybox:1.36@sha256:" + "b" * 64)
    assert explain_miss(old, new) == (
        "base image changed: busybox:1.36 sha256:aaaaaaaaaaaa -> sha256:bbbbbbbbbbbb"
    )
    stage_old = dataclasses.replace(run(), base="stage build@sha256:1")
    stage_new = dataclasses.replace(run(), parent="sha256:x", base="stage build@sha256:2")
    assert explain_miss(stage_old, stage_new) == "upstream stage build changed"


def test_explaining_fields_are_not_keyed_and_round_trip() -> None:
    told = dataclasses.replace(BASE, files=(("a", "c", "m"),), env_from=("A",), base="scratch")
    assert told.key() == BASE.key()
    assert KeyInputs.from_json(told.record_json()) == told
    assert KeyInputs.from_json(BASE.to_json()) == BASE


@given(
    st.text(),
    st.text(),
    st.dictionaries(st.text(min_size=1), st.text()),
    st.text(),
    st.text(),
)
def test_inputs_round_trip_through_json(
    parent: str, instruction: str, env: dict[str, str], platform: str, content: str
) -> None:
    inputs = make_inputs(parent, instruction, env, platform, content)
    assert KeyInputs.from_json(inputs.to_json()) == inputs


def test_cache_index_prefixes_are_written_in_cachekey_alone() -> None:
    # The index's key layout is read in one place (cachekey's layout comment).
    from pathlib import Path

    import lamina

    prefixes = ('"step-last:', '"copy-files:', '"copy-from:', '"build-memo:', '"layer-blob:')
    root = Path(lamina.__file__).parent
    writers = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        for prefix in prefixes
        if prefix in path.read_text() or prefix.replace('"', 'f"', 1) in path.read_text()
    }
    assert writers == {"engine/cachekey.py"}


def test_explain_names_the_line_of_changed_text_and_source_date_epoch() -> None:
    old = make_inputs("p", "WORKDIR /a", {"SOURCE_DATE_EPOCH": "1"})
    new = make_inputs("p", "WORKDIR /b", {"SOURCE_DATE_EPOCH": "2"})
    assert explain_miss(old, new, line="line 7") == (
        'instruction text changed (line 7); SOURCE_DATE_EPOCH changed: "1" -> "2"'
    )


def test_a_workdir_keyed_by_user_says_user_changed() -> None:
    old = make_inputs("p", "WORKDIR /app", {"user": "app"})
    assert explain_miss(old, make_inputs("p", "WORKDIR /app", {})) == "USER changed: app -> root"
