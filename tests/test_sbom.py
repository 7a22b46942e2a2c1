"""--sbom as buildx passes it to BuildKit's frontend (lamina.engine.sbom.parse); the generator's
run and attachment are BuildKit's testSBOMScannerImage (tests/conformance/buildkit)."""

from __future__ import annotations

import pytest

from lamina.engine.sbom import DEFAULT_GENERATOR, parse
from lamina.errors import PlanError


@pytest.mark.parametrize("text", ["false", "0", "generator=x/y,disabled=true"])
def test_sboms_turned_off(text: str) -> None:
    assert parse(text) is None


def test_true_is_buildkits_default_generator() -> None:
    assert parse("true") == (("generator", DEFAULT_GENERATOR),)
    assert parse("type=sbom") == (("generator", DEFAULT_GENERATOR),)


def test_other_attributes_are_the_scanners_parameters() -> None:
    """BuildKit gives each as $BUILDKIT_SCAN_<KEY> to the generator."""
    assert parse("generator=example.com/scan:1,mode=deep") == (
        ("generator", "example.com/scan:1"),
        ("mode", "deep"),
    )


@pytest.mark.parametrize(
    "text, message",
    [("generator=", "cannot be empty"), ("generator=Not A Ref", "failed to parse sbom scanner")],
)
def test_a_bad_generator_is_refused(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse(text)
