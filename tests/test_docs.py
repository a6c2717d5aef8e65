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


def test_the_dashboard_and_the_promql_use_metrics_that_exist() -> None:
    """Every cascade_* series named in the Grafana dashboard and in docs/operations.md is one
    the gateway exports (histograms by their _bucket, counters by their _total)."""
    from router.telemetry.metrics import Metrics

    metrics = Metrics()
    metrics.supervisor.update(wanted=2, running=2, restarts=0)  # as in a worker (workers > 1)
    exported = set()
    for family in metrics.registry.collect():
        exported |= {sample.name for sample in family.samples} | {family.name}
    exported |= {name + "_total" for name in exported} | {name + "_bucket" for name in exported}
    for doc in ("grafana-dashboard.json", "operations.md"):
        named = set(re.findall(r"\bcascade_[a-z_]+", (ROOT / "docs" / doc).read_text()))
        assert named, doc
        unknown = {n for n in named if n not in exported}
        assert unknown == set(), (doc, unknown)
