"""The docs' examples hold: every complete config in docs/ and the demo is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import Config

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = [
    (path.name, block)
    for path in sorted((ROOT / "docs").glob("*.md"))
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)
    if re.search(r"^providers:", block, re.M) and re.search(r"^routes:", block, re.M)
]


@pytest.mark.parametrize(
    ("doc", "block"), BLOCKS, ids=[f"{d}#{i}" for i, (d, _) in enumerate(BLOCKS)]
)
def test_every_complete_config_in_the_docs_is_valid(doc: str, block: str) -> None:
    Config.from_yaml(block, source=doc)


def test_the_docs_have_complete_configs() -> None:
    assert {doc for doc, _ in BLOCKS} >= {"configuration.md"}
