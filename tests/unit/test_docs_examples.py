"""Every TOML example in the documentation is a valid configuration, and every config key
is documented in docs/configuration.md (or, for [spf], in docs/spf.md)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from policyd import config as cfg

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "exim-snippets/README.md"])
EXAMPLES = [
    pytest.param(block, id=f"{path.name}#{i}")
    for path in DOCS
    for i, block in enumerate(re.findall(r"```toml\n(.*?)```", path.read_text(), re.S))
]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("block", EXAMPLES)
def test_toml_examples_validate(block: str) -> None:
    cfg.from_mapping(tomllib.loads(block))


def test_every_key_is_documented() -> None:
    text = (REPO / "docs/configuration.md").read_text() + (REPO / "docs/spf.md").read_text()
    sections = [*cfg.SECTIONS.values(), cfg.RateRule]  # the registry
    missing = [
        f"{section.__name__}.{field.name}"
        for section in sections
        for field in dataclasses.fields(section)
        if f"`{field.name}`" not in text
    ]
    assert missing == []
