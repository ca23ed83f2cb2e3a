"""The registered metrics, in column order: what `eval.metrics score` computes and `eval.report` reports.

Adding a metric is one module declaring a `MetricEntry` (and its `Metric`; see `eval.metric_base`) plus one line
here; the CLI options, the scoring, the cache, `scores.csv`, the per-image files, the tables and the plots follow.
"""

from __future__ import annotations

from .metric_base import MetricEntry
from .metric_clip import ENTRY as CLIP
from .metric_cmmd import ENTRY as CMMD
from .metric_fid import FID_ENTRY as FID
from .metric_fid import KID_ENTRY as KID

REGISTRY: dict[str, MetricEntry] = {entry.name: entry for entry in (FID, KID, CLIP, CMMD)}


def entries() -> tuple[MetricEntry, ...]:
    """The registered entries in column order."""
    return tuple(REGISTRY.values())


def get_entry(name: str) -> MetricEntry:
    """The entry registered as `name`."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(REGISTRY)}") from None


def _check(registered: dict[str, MetricEntry]) -> None:
    """Every scores.csv column (metric names and provenance columns) is claimed by one entry only."""
    columns = [c for e in registered.values() for c in (e.name, *e.provenance)]
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise ValueError(f"scores.csv columns claimed twice by registered metrics: {twice}")


_check(REGISTRY)
