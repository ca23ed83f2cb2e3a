"""Frozen configuration dataclasses for S-CFG guidance and GoCA segmentation, with named presets.

Defaults are the constants of the authors' released code (algorithm.md §1, §2.9); each cites its source.
Configs are inputs only: nothing in the library mutates them (derive variants with `dataclasses.replace`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

from .checks import check_bool, check_float, check_int, check_name, check_names

SSGCVariant = Literal["official", "paper"]
HeadMethod = Literal["dot", "average"]
LayerMethod = Literal["similarity", "average"]
RescaleMethod = Literal["sum1", "none"]
TokenSet = Literal["caption", "content"]


def _check_choice(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{type(obj).__name__}.{name}={value!r} is not one of {allowed}")


def _field(obj: object, name: str) -> str:
    """'Class.field', the name every config error carries."""
    return f"{type(obj).__name__}.{name}"


def _set_names(obj: object, name: str) -> None:
    """Check a layer-name tuple field (None allowed) and store a list given for it as a tuple."""
    value = getattr(obj, name)
    if value is not None:
        object.__setattr__(obj, name, check_names(_field(obj, name), value))


@dataclass(frozen=True)
class SCFGConfig:
    """The official S-CFG segmentation (algorithm.md §1.3), used by `segmentor="scfg"`. The per-region rate that
    every segmentor's masks feed is a rate rule of its own (`guidance.SCFGRate`, §1.4)."""

    ssgc: SSGCVariant = "official"  # SCFG sd/utils.py L224-231: (S + 3 S^2)/4; "paper": mean of S..S^4
    ratios: tuple[int, ...] = (4, 8)  # SCFG sd/utils.py L212: maps at latent/4 and latent/8; masks at latent/4
    smooth_maps: bool = True  # SCFG sd/utils.py L245-252: 3x3 blur of every token map
    norm_eps: float = 1e-8  # SCFG sd/utils.py L254: per-token spatial mean normalisation

    def __post_init__(self) -> None:
        check_float(_field(self, "norm_eps"), self.norm_eps, above=0)
        check_bool(_field(self, "smooth_maps"), self.smooth_maps)
        _check_choice(self, "ssgc", ("official", "paper"))
        if isinstance(self.ratios, list):
            object.__setattr__(self, "ratios", tuple(self.ratios))
        if not isinstance(self.ratios, tuple) or not self.ratios:
            raise TypeError(f"SCFGConfig.ratios must be a non-empty tuple of ints (e.g. (4, 8)), got {self.ratios!r}")
        for i, r in enumerate(self.ratios):
            if check_int(f"SCFGConfig.ratios[{i}]", r, minimum=1) & (r - 1):
                raise ValueError(f"SCFGConfig.ratios={self.ratios!r} must be powers of two (e.g. (4, 8))")
        if tuple(sorted(set(self.ratios))) != self.ratios:
            raise ValueError(f"SCFGConfig.ratios={self.ratios!r} must be strictly increasing; masks use the first")

    @classmethod
    def official(cls) -> SCFGConfig:
        """The released S-CFG code (SCFG commit 4e5c9a7)."""
        return cls()

    @classmethod
    def paper(cls) -> SCFGConfig:
        """As `official()` but with the paper's SSGC (mean of S, S², S³, S⁴) instead of the code's (S + 3S²)/4."""
        return cls(ssgc="paper")


@dataclass(frozen=True)
class GoCAConfig:
    """GoCA segmentation inside S-CFG (algorithm.md §2); `GoCAConfig()` is the released `config_model_15.py`.

    Layer names are diffusers module or block prefixes (`up_blocks.2.attentions.1`,
    `…attentions.0.transformer_blocks.1`); `None` takes the authors' choice for a recognised architecture or a
    documented rule for any other denoiser (`segment.goca.goca_layers`, algorithm.md §8).
    Fast-mode switches (`layer_refresh`, `layer_query_stride`) trade exactness for speed; both off by default.
    """

    head: HeadMethod = "dot"  # cfg15 L22 'dot-product w/o clamp'; vanilla 'average' (cfg15v L18)
    layer: LayerMethod = "similarity"  # cfg15 L27 'dot-product similarity'; vanilla 'vanilla' (cfg15v L30)
    rescale: RescaleMethod = "sum1"  # cfg15 L38 'sum-1 rescaling + per-token renorm+'; vanilla L35
    tokens: TokenSet = "caption"  # u15 L318-321: all caption tokens; "content": paper Eq. 11 (no stop words)
    propagation_order: int | None = None  # None: the model's (SD v1.5, SDXL: 2, cfg15 L74-79; PixArt-Sigma: 5)
    dense_layer: str | None = None  # cfg15 L43: up_blocks.2.attentions.1 (attn2 query) in SD v1.5
    self_layers: tuple[str, ...] | None = (
        None  # cfg15 L65-72: up_blocks.3.attentions.{0,1}, down_blocks.0.attentions.1
    )
    cross_layers: tuple[str, ...] | None = None  # cfg15 L45-62: every transformer block
    blur_kernel: int = 5  # u15 L337-339: torchvision gaussian_blur kernel 5
    blur_sigma: float = 1.1  # 0.3 * ((5 - 1) / 2 - 1) + 0.8, torchvision's default for kernel 5
    fg_threshold: float = 0.5  # u15 L421, L431-434: fg = [s < 0.5]
    eps: float = 1e-12  # guards divisions the released code leaves unguarded (algorithm.md §5.14)
    layer_refresh: int = 1  # fast mode: recompute layer weights every k steps (1 = every step, exact)
    layer_query_stride: int = 1  # fast mode: similarity on every k-th dense query row (1 = all rows, exact)
    # joint attention (SD3, Flux; algorithm.md §8.5): "joint": the cross map is the text slice of the softmax over
    # text + image keys (the authors' FluxAttnStoreProcessor, attention.py L513); "text": renormalised over text keys
    cross_norm: Literal["joint", "text"] = "joint"
    # "all": the reference feature's every channel (their generation code); "first": channel 0 only, as their Flux
    # and SDXL segmentation code reads it (cross_attn_dispatch.py L471 `features[ref_layer][0]`)
    reference_channels: Literal["all", "first"] = "all"

    def __post_init__(self) -> None:
        _check_choice(self, "head", ("dot", "average"))
        _check_choice(self, "layer", ("similarity", "average"))
        _check_choice(self, "rescale", ("sum1", "none"))
        _check_choice(self, "tokens", ("caption", "content"))
        _check_choice(self, "cross_norm", ("joint", "text"))
        _check_choice(self, "reference_channels", ("all", "first"))
        if self.propagation_order is not None:  # None: the model's order (algorithm.md §8)
            check_int(_field(self, "propagation_order"), self.propagation_order, minimum=0)
        for name in ("layer_refresh", "layer_query_stride"):
            check_int(_field(self, name), getattr(self, name), minimum=1)
        if check_int(_field(self, "blur_kernel"), self.blur_kernel, minimum=1) % 2 == 0:
            raise ValueError(f"GoCAConfig.blur_kernel={self.blur_kernel} must be odd")
        check_float(_field(self, "blur_sigma"), self.blur_sigma, above=0)
        check_float(_field(self, "fg_threshold"), self.fg_threshold, above=0, below=1)
        check_float(_field(self, "eps"), self.eps, above=0)
        if self.dense_layer is not None:
            check_name(_field(self, "dense_layer"), self.dense_layer)
        for name in ("self_layers", "cross_layers"):
            _set_names(self, name)
        # With propagation_order=0 no self-attention is used, so any self_layers (even empty) is accepted.
        if self.self_layers is not None and not self.self_layers and self.propagation_order != 0:
            raise ValueError("GoCAConfig.self_layers is empty but propagation is on (set propagation_order=0)")
        if self.cross_layers is not None and not self.cross_layers:
            raise ValueError("GoCAConfig.cross_layers must name at least one block")

    @classmethod
    def released(cls) -> GoCAConfig:
        """The released GoCA generation config (`config_model_15.py`)."""
        return cls()

    @classmethod
    def vanilla(cls) -> GoCAConfig:
        """The released vanilla config (`config_model_15_vanilla.py`): the three Table-2 switches off."""
        return cls(head="average", layer="average", rescale="none")

    @classmethod
    def paper(cls) -> GoCAConfig:
        """As `released()` but rescaling over content tokens only (paper Eq. 11)."""
        return cls(tokens="content")

    @classmethod
    def fast(cls, refresh: int = 5, query_stride: int = 2) -> GoCAConfig:
        """Opt-in fast mode: layer weights refreshed every `refresh` steps on every `query_stride`-th dense row.

        Not recommended: since the similarity is chunked it saves about 1 % of a CFG step (bench/RESULTS.md)."""
        return cls(layer_refresh=refresh, layer_query_stride=query_stride)

    def is_exact(self) -> bool:
        """True when no fast-mode approximation is on."""
        return self.layer_refresh == 1 and self.layer_query_stride == 1


def describe(config: SCFGConfig | GoCAConfig) -> dict:
    """Plain-dict view of a config, for manifests."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


__all__ = ["SCFGConfig", "GoCAConfig", "describe", "replace"]
