"""FID and KID as registry entries: both read the Inception features of one protocol (one feature pass) and compare
them with reference statistics from `eval.metrics ref-stats` (KID needs the reference's kept features).

The protocols (`clean`, `t2ib`) and the maths are in `eval.fid`; this module only declares the entries, their CLI
options and cache keys. torch is imported when a metric is built.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import io
from .metric_base import BuildContext, CellData, FeaturePass, Metric, MetricEntry, MetricValue

if TYPE_CHECKING:
    from .fid import FeatureExtractor, FeatureStats, FIDProtocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FIDSetup:
    """What FID and KID need: reference statistics (and an id for caching), the protocol and the feature extractor."""

    reference: FeatureStats
    reference_id: str
    protocol: FIDProtocol
    extractor: FeatureExtractor
    extractor_name: str

    def feature_pass(self) -> FeaturePass:
        """The protocol's Inception features: one pass serves FID and KID."""
        from .fid import image_features

        def compute(files, batch_size, device, num_workers, progress):
            return image_features(files, self.extractor, self.protocol, batch_size, device, num_workers, progress)

        return FeaturePass(f"{self.extractor_name}/{self.protocol.tag}", compute)

    def key(self) -> dict[str, Any]:
        return {"reference": self.reference_id, "protocol": self.protocol.tag, "extractor": self.extractor_name}


class FID(Metric):
    """Fréchet distance of a cell's features to the reference statistics (algorithm.md §3.3)."""

    def __init__(self, setup: FIDSetup) -> None:
        self.setup = setup
        self.features = setup.feature_pass()

    def key(self) -> dict[str, Any]:
        return self.setup.key()

    def provenance(self) -> dict[str, str]:
        return {
            "fid_protocol": self.setup.protocol.tag,
            "fid_extractor": self.setup.extractor_name,
            "fid_reference": self.setup.reference_id,
        }

    def compute(self, cell: CellData) -> MetricValue:
        from .fid import feature_statistics, frechet_distance

        stats = feature_statistics(cell.features, self.setup.protocol.tag, self.setup.extractor_name)
        return MetricValue(frechet_distance(stats, self.setup.reference))


class KID(Metric):
    """clean-fid's kernel inception distance of a cell's features to the reference's kept features."""

    def __init__(self, setup: FIDSetup) -> None:
        if setup.reference.features is None:
            raise ValueError("KID needs reference statistics that kept their features (`eval.metrics ref-stats`)")
        self.setup = setup
        self.features = setup.feature_pass()

    def key(self) -> dict[str, Any]:
        return {**self.setup.key(), "subsets": 100, "subset_size": 1000, "rng_seed": 0}

    def provenance(self) -> dict[str, str]:
        return {}

    def compute(self, cell: CellData) -> MetricValue:
        from .fid import kernel_distance

        return MetricValue(kernel_distance(cell.features, self.setup.reference))


# ---------------------------------------------------------------- CLI


def add_protocol_options(parser: argparse._ActionsContainer) -> None:
    """`--preset`, `--mode`, `--no-center-crop`, `--inception`: the FID protocol (`ref-stats` and `score`)."""
    parser.add_argument(
        "--preset",
        choices=("paper",),
        help="paper: the protocol of the paper's Table 3 (T2IBenchmark's t2ib preprocessing and Inception port)",
    )
    parser.add_argument(
        "--mode",
        choices=("clean", "t2ib"),
        help="FID protocol (default clean, or t2ib with --preset paper); clean is not comparable with the paper",
    )
    parser.add_argument("--no-center-crop", action="store_true", help="clean mode: resize without centre crop")
    parser.add_argument("--inception", type=Path, help="local Inception weights file (see README, offline use)")


def protocol_from_args(args: argparse.Namespace) -> FIDProtocol:
    """`--mode` / `--preset`: the paper's preset is the t2ib protocol (algorithm.md §3.3)."""
    from .fid import FIDProtocol

    if args.preset == "paper":
        if args.mode not in (None, "t2ib") or args.no_center_crop:
            raise ValueError("--preset paper scores with --mode t2ib (centre crop); drop --mode/--no-center-crop")
        return FIDProtocol("t2ib")
    return FIDProtocol(args.mode or "clean", center_crop=not args.no_center_crop)


def check_inception_file(args: argparse.Namespace) -> None:
    """`--inception` names an existing file (it is loaded only when features are computed)."""
    if args.inception is not None and not args.inception.is_file():
        what = "a folder" if args.inception.is_dir() else "not found"
        raise FileNotFoundError(f"--inception {args.inception}: {what}; give the weights file itself")


def load_extractor(args: argparse.Namespace, ctx: BuildContext, protocol: FIDProtocol) -> FeatureExtractor:
    """The protocol's Inception, loaded once per command."""
    from .fid import load_inception

    def make():
        return load_inception(protocol, args.inception, device=ctx.device, allow_download=ctx.allow_download)

    return ctx.once(("inception", protocol, args.inception), make)


def _reference(args: argparse.Namespace, ctx: BuildContext) -> tuple[FIDProtocol, FeatureStats]:
    """The protocol and the `--ref-stats` statistics (read once, checked before any model loads)."""
    from .fid import load_stats

    def make():
        if args.ref_stats is None:
            raise ValueError("FID needs --ref-stats (or pass --no-fid)")
        protocol = protocol_from_args(args)
        check_inception_file(args)
        assume = (protocol.tag, protocol.network) if args.ref_stats_foreign else None
        try:
            reference = load_stats(args.ref_stats, assume=assume)
        except (OSError, ValueError) as err:
            raise type(err)(f"{err} (--ref-stats)") from None
        if (reference.protocol, reference.extractor) != (protocol.tag, protocol.network):
            raise ValueError(
                f"--ref-stats {args.ref_stats} was computed with {reference.protocol}/{reference.extractor}, but "
                f"this command scores with {protocol.tag}/{protocol.network}; pass the matching --mode/--preset or "
                "compute the statistics with this protocol"
            )
        return protocol, reference

    return ctx.once("fid-reference", make)


def _setup(args: argparse.Namespace, ctx: BuildContext) -> FIDSetup:
    def make():
        protocol, reference = _reference(args, ctx)
        extractor = load_extractor(args, ctx, protocol)
        return FIDSetup(reference, io.file_md5(args.ref_stats), protocol, extractor, protocol.network)

    return ctx.once("fid-setup", make)


def _fid_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--ref-stats", type=Path, help="reference statistics .npz from `ref-stats`")
    group.add_argument(
        "--ref-stats-foreign",
        action="store_true",
        help="the .npz has only mu/sigma (e.g. T2IBenchmark's); assume it used --mode's protocol and network",
    )
    group.add_argument("--no-fid", action="store_true", help="skip FID (and KID, which reads the same reference)")
    add_protocol_options(group)


def _fid_check(args: argparse.Namespace, ctx: BuildContext) -> bool:
    if args.no_fid:
        return False
    _reference(args, ctx)
    return True


def _kid_check(args: argparse.Namespace, ctx: BuildContext) -> bool:
    if args.no_fid or args.no_kid:
        return False
    if _reference(args, ctx)[1].features is None:
        logger.info("no KID: --ref-stats %s kept no features (foreign statistics)", args.ref_stats)
        return False
    return True


FID_ENTRY = MetricEntry(
    name="fid",
    label="FID",
    summary="Fréchet inception distance to --ref-stats (protocol --mode clean|t2ib, or --preset paper)",
    lower_is_better=True,
    digits=2,
    provenance=("fid_protocol", "fid_extractor", "fid_reference"),
    always_shown=True,
    note="FID: Fréchet distance of Inception features to the reference statistics",
    add_options=_fid_options,
    check=_fid_check,
    build=lambda args, ctx: FID(_setup(args, ctx)),
)
FID.entry = FID_ENTRY


def _kid_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--no-kid", action="store_true", help="skip KID (on whenever FID's reference kept features)")


KID_ENTRY = MetricEntry(
    name="kid",
    label="KID",
    summary="kernel inception distance (clean-fid's, unbiased) on FID's features; needs --ref-stats from ref-stats",
    lower_is_better=True,
    digits=4,
    primary=False,
    always_shown=True,
    note="KID: clean-fid's unbiased polynomial-kernel MMD² on the same features",
    add_options=_kid_options,
    check=_kid_check,
    build=lambda args, ctx: KID(_setup(args, ctx)),
)
KID.entry = KID_ENTRY
