"""Step cache keys change exactly when what the step sees changes."""

from __future__ import annotations

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
    assert explain_miss(BASE, changed) == "ARG/ENV changed: A"
    assert explain_miss(None, BASE) == "never built"


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
