"""What a metric is (`eval.registry` lists them): a static `MetricEntry` that the CLI and the report read, and a
configured `Metric` that scores the cells of a sweep.

A metric declares its features (a `FeaturePass`: extractor + preprocessing, named by an id; metrics whose passes have
the same id read one pass), its cache key, its statistic (`compute`), its per-image values where it has them (the
report bootstraps those over images; the others are compared over seeds) and its columns in `scores.csv`. Standard
library and numpy only: the entries import torch and their models when a metric is built.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .captions import Caption

FeatureFn = Callable[[Sequence[Path], int, str, int, bool], np.ndarray]
"""(files, batch_size, device, num_workers, progress) → (N, D) float64 rows in file order."""
RowsFn = Callable[[Callable[[list[int]], np.ndarray]], np.ndarray]
"""rows(compute) → compute(items) over all items of a cell, split across processes in whole batches, gathered."""


@dataclass(frozen=True)
class FeaturePass:
    """Per-image rows one extractor computes under one preprocessing. `id` names both (e.g.
    `inception-torchscript/clean-ccrop-299`); every metric whose pass has the same id reads the same rows."""

    id: str
    compute: FeatureFn = field(compare=False, repr=False)


@dataclass(frozen=True)
class CellData:
    """What a metric sees of one cell: its pass's features (N, D) in caption order, the caption ids and texts, and
    `rows` to compute further per-item rows (e.g. text embeddings) split across processes like the features."""

    features: np.ndarray
    image_ids: tuple[int, ...]
    texts: tuple[str, ...]
    rows: RowsFn
    batch_size: int
    device: str


@dataclass(frozen=True)
class MetricValue:
    """A metric's value for one cell and, for per-image metrics, its value per image id."""

    value: float
    per_image: Mapping[int, float] | None = None


class Metric(ABC):
    """A configured metric: one entry's settings, reference and feature pass, ready to score cells."""

    entry: ClassVar[MetricEntry]
    features: FeaturePass

    @abstractmethod
    def key(self) -> dict[str, Any]:
        """JSON values that decide the result besides the images and captions (reference digest, model, protocol…);
        a cached result is reused only under an equal key."""

    @abstractmethod
    def provenance(self) -> dict[str, str]:
        """Values of the entry's provenance columns of `scores.csv`."""

    @abstractmethod
    def compute(self, cell: CellData) -> MetricValue:
        """The metric of one cell."""


@dataclass
class BuildContext:
    """What entries need to build their metric from the CLI: the device, download policy, batching, the run's
    captions, and `once` to share what two entries load alike (an Inception, a CLIP model, reference statistics)."""

    device: str
    allow_download: bool
    batch_size: int
    num_workers: int
    captions: tuple[Caption, ...]
    progress: bool = True
    _shared: dict[Any, Any] = field(default_factory=dict, repr=False)

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()` the first time `key` is asked for in this command, the same object afterwards."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]


@dataclass(frozen=True)
class MetricEntry:
    """A registered metric as the CLI and the report see it.

    name: its `scores.csv` column and CLI name; label: its name in tables and plots; summary: one line of `--help`.
    lower_is_better: the arrow in tables (FID↓, CLIP↑). per_image: it has per-image values, written to
    `{name}_per_image.csv` and compared with the baseline by a bootstrap over images (else by a paired t-test over
    seeds). digits: decimals in the tables. provenance: further `scores.csv` columns saying how a value was made.
    primary: a column of Table 3, a comparison in Table 9 and a curve in the plots (KID is reported in Table 9 and
    results.csv only). always_shown: a table column even when no cell has a value (the paper's columns).
    note: how the value is made, under the report's tables. add_options: adds its CLI options to an argument group of
    `score`. check: whether the parsed arguments request it, after checking its inputs (references, files, option
    combinations) without loading a model; every entry is checked before any is built. build: its configured
    `Metric` (loads models).
    """

    name: str
    label: str
    summary: str
    lower_is_better: bool
    per_image: bool = False
    digits: int = 2
    provenance: tuple[str, ...] = ()
    primary: bool = True
    always_shown: bool = False
    note: str = ""
    add_options: Callable[[argparse._ArgumentGroup], None] | None = field(default=None, compare=False, repr=False)
    check: Callable[[argparse.Namespace, BuildContext], bool] | None = field(default=None, compare=False, repr=False)
    build: Callable[[argparse.Namespace, BuildContext], Metric] | None = field(default=None, compare=False, repr=False)

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_is_better else "↑"

    @property
    def per_image_file(self) -> str:
        """`{name}_per_image.csv`: columns method, scale, seed, image_id, {name}."""
        return f"{self.name}_per_image.csv"
