"""CLIP score as a registry entry: 100 · cos(image, caption) per image (algorithm.md §3.4), from the open_clip image
embeddings of one feature pass, which CMMD reads too when it uses the same model (`clip_feature_pass`).

The maths and the open_clip wrapper are in `eval.clip_score`; this module declares the entry, its CLI options and
cache key. torch and open_clip are imported when a metric is built.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .metric_base import BuildContext, CellData, FeaturePass, Metric, MetricEntry, MetricValue

if TYPE_CHECKING:
    from .clip_score import CLIPSpec, LoadedCLIP


def clip_feature_pass(clip: LoadedCLIP) -> FeaturePass:
    """Image embeddings of an open_clip model through its own validation transform. The id names the model, tag and
    weights file: CLIP score and CMMD share the pass exactly when these (hence the preprocessing) are equal."""
    from .clip_score import image_embeddings

    def compute(files, batch_size, device, num_workers, progress):
        return image_embeddings(clip, files, batch_size, device, num_workers, progress)

    spec = clip.spec
    return FeaturePass(f"open_clip-image/{spec.name}/{spec.weights or 'tag'}", compute)


class CLIPScore(Metric):
    """Mean over a cell's images of 100 · cos(image embedding, caption embedding), with the per-image values."""

    def __init__(self, clip: LoadedCLIP) -> None:
        self.clip = clip
        self.features = clip_feature_pass(clip)

    def key(self) -> dict[str, Any]:
        return {"model": self.clip.spec.name, "weights": self.clip.spec.weights}

    def provenance(self) -> dict[str, str]:
        return {"clip_model": self.clip.spec.name}

    def compute(self, cell: CellData) -> MetricValue:
        from .clip_score import scores_from_embeddings, text_embeddings

        def texts_of(items: list[int]):
            return text_embeddings(self.clip, [cell.texts[i] for i in items], cell.batch_size, cell.device)

        scores = scores_from_embeddings(cell.features, cell.rows(texts_of))
        per_image = {image_id: float(s) for image_id, s in zip(cell.image_ids, scores)}
        return MetricValue(float(scores.mean()), per_image)


# ---------------------------------------------------------------- CLI: shared by the entries that load open_clip


def spec_from_args(model: str, pretrained: str, weights: str | None) -> CLIPSpec:
    """A `CLIPSpec` from option values (`pretrained` 'none': random weights)."""
    from .clip_score import CLIPSpec

    return CLIPSpec(model, None if pretrained.lower() == "none" else pretrained, weights)


def check_spec(spec: CLIPSpec, options: str, allow_download: bool) -> None:
    """An open_clip architecture and tag that exist, weights that are given, cached or allowed to download; checked
    without building the model. `options` names the CLI options in messages (e.g. "--clip-model/--clip-pretrained")."""
    import open_clip

    from .clip_score import _NO_WEIGHTS_HINT, cached_clip_weights

    if spec.model not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(spec.model.lower()[:5])][:6]
        raise ValueError(f"{options}: open_clip has no model {spec.model!r}" + (f"; e.g. {close}" if close else ""))
    if spec.weights is not None:
        from pathlib import Path

        if not Path(spec.weights).is_file():
            raise FileNotFoundError(f"{options}: CLIP weights file not found: {spec.weights}")
    if spec.pretrained is None:
        return
    if not open_clip.get_pretrained_cfg(spec.model, spec.pretrained):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        raise ValueError(f"{options}: open_clip has no tag {spec.pretrained!r} for {spec.model}; tags: {tags}")
    if spec.weights is None and not allow_download and cached_clip_weights(spec)[0] is None:
        where = cached_clip_weights(spec)[1]
        raise FileNotFoundError(
            f"CLIP weights {spec.name} are not in {where} and downloading is off (--no-download or HF_HUB_OFFLINE=1); "
            f"{_NO_WEIGHTS_HINT}"
        )


def load_once(spec: CLIPSpec, ctx: BuildContext) -> LoadedCLIP:
    """The open_clip model of `spec`, loaded once per command (CLIP score and CMMD with one model share it)."""
    from .clip_score import load_clip

    return ctx.once(("open_clip", spec), lambda: load_clip(spec, device=ctx.device, allow_download=ctx.allow_download))


def _options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    group.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32: the paper)")
    group.add_argument(
        "--clip-pretrained",
        default="openai",
        help="open_clip pretrained tag (default openai; 'none': random weights, for smoke tests only)",
    )
    group.add_argument("--clip-weights", help="local file with the tag's weights (offline)")


def _spec(args: argparse.Namespace) -> CLIPSpec:
    return spec_from_args(args.clip_model, args.clip_pretrained, args.clip_weights)


def _check(args: argparse.Namespace, ctx: BuildContext) -> bool:
    if args.no_clip:
        return False
    check_spec(_spec(args), "--clip-model/--clip-pretrained/--clip-weights", ctx.allow_download)
    return True


ENTRY = MetricEntry(
    name="clip",
    label="CLIP",
    summary="CLIP score: 100 × cosine of open_clip image and caption embeddings (--clip-model, default ViT-B-32)",
    lower_is_better=False,
    per_image=True,
    digits=2,
    provenance=("clip_model",),
    always_shown=True,
    note="CLIP: 100 × cosine of image and caption embeddings",
    add_options=_options,
    check=_check,
    build=lambda args, ctx: CLIPScore(load_once(_spec(args), ctx)),
)
CLIPScore.entry = ENTRY
