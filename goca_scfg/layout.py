"""Where a denoiser's attention is: every self-/cross-attention module of its transformer blocks, at which grid.

`ModelLayout.of(model)` reads the structure of a diffusers UNet (`down_blocks`/`mid_block`/`up_blocks`), a
diffusion transformer with cross-attention (`transformer_blocks`, e.g. PixArt) or a joint-attention transformer
(MMDiT: SD3's `transformer_blocks`, Flux's double- and single-stream blocks), also behind `torch.compile`, without
running it. A joint-attention module is two layers: its `…attn:cross` view (image queries × text keys of the joint
softmax) and its `…attn:self` view (image queries × image keys); both are recorded by one set of hooks. Layers
are addressed down to the transformer block (`up_blocks.1.attentions.0.transformer_blocks.1`), so SDXL's ten blocks
per attention module are each one layer. The segmentors pick their layers from a layout by the rules documented in
algorithm.md §8 (the authors' choices where they exist for the model, a stated rule elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

Kind = Literal["self", "cross"]
JOINT_VIEWS: dict[str, Kind] = {"cross": "cross", "self": "self"}  # `<module>:<view>` names of a joint layout


def joint_view(name: str) -> tuple[str, Kind] | None:
    """(module name, view) of a joint-attention layer name `transformer_blocks.3.attn:cross`, else None."""
    module, sep, view = name.rpartition(":")
    return (module, JOINT_VIEWS[view]) if sep and view in JOINT_VIEWS else None


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a transformer block, located in the denoiser's structure.

    name: qualified module name (`…transformer_blocks.0.attn2`); block: its transformer block's name; kind: "self"
    (attn1) or "cross" (attn2); factor: downsampling of its token grid relative to the latent; position: "down" |
    "mid" | "up" ("mid" for every block of a transformer); order: call order within one forward pass.
    """

    name: str
    block: str
    kind: Kind
    factor: int
    position: Literal["down", "mid", "up"]
    order: int

    @property
    def module(self) -> str:
        """The attention module (`…attentions.0`) that holds this layer's transformer block."""
        return self.block.split(".transformer_blocks.")[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The module `torch.compile` wrapped (`_orig_mod`), or the model itself: hooks and names live there."""
    return getattr(model, "_orig_mod", model)


def is_attention(module: nn.Module) -> bool:
    """An attention module with separate or fused q/k projections and an output projection (any diffusers class)."""
    has_qk = hasattr(module, "to_q") or hasattr(module, "to_qkv")
    return has_qk and hasattr(module, "to_out") and hasattr(module, "heads")


def _unet_grid(block: str, n_down: int, n_up: int) -> tuple[int, str, int] | None:
    """(level, position, rank) of a UNet block name: down level i → latent/2^i, mid → deepest, up mirrors down."""
    part = block.split(".")
    if part[0] == "down_blocks":
        return int(part[1]), "down", 0
    if part[0] == "mid_block":
        return n_down - 1, "mid", 1
    if part[0] == "up_blocks":
        return n_up - 1 - int(part[1]), "up", 2
    return None


@dataclass(frozen=True)
class ModelLayout:
    """All attention layers of one denoiser in call order, and the lookups the segmentors' layer rules use."""

    layers: tuple[AttentionLayer, ...]
    arch: Literal["unet", "transformer", "joint"]

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        """The layout of a UNet2DConditionModel-like, transformer_blocks-based or joint-attention denoiser (compiled
        or not)."""
        model = unwrap(model)
        if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
            return cls(tuple(_locate_unet(model)), "unet")
        if is_joint_transformer(model):
            return cls(tuple(_locate_joint(model)), "joint")
        if hasattr(model, "transformer_blocks"):
            return cls(tuple(_locate_transformer(model)), "transformer")
        raise ValueError(f"cannot locate attention layers in a {type(model).__name__}: expected a UNet or transformer")

    def of_kind(self, kind: Kind) -> list[AttentionLayer]:
        return [x for x in self.layers if x.kind == kind]

    def cross_factors(self) -> list[int]:
        """The distinct grid factors that have cross-attention, finest first."""
        return sorted({x.factor for x in self.of_kind("cross")})

    def resolve(self, names: tuple[str, ...], kind: Kind) -> list[AttentionLayer]:
        """The `kind` layers whose block equals or lies below one of `names` (module or block prefixes), in call
        order; raises naming what exists when a name matches nothing."""
        picked: list[AttentionLayer] = []
        for prefix in names:
            hits = [x for x in self.of_kind(kind) if x.block == prefix or x.block.startswith(prefix + ".")]
            if not hits:
                available = sorted({x.module for x in self.layers})
                raise ValueError(f"layer {prefix!r} matches no {kind}-attention block; available modules: {available}")
            picked += [h for h in hits if h not in picked]
        return sorted(picked, key=lambda x: x.order)

    def sibling(self, layer: AttentionLayer, kind: Kind) -> AttentionLayer:
        """The attn1 (kind="self") or attn2 (kind="cross") module of the same transformer block."""
        for x in self.layers:
            if x.block == layer.block and x.kind == kind:
                return x
        raise ValueError(f"block {layer.block!r} has no {kind}-attention module")

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """(position, factor, blocks) per attention module in call order: identifies a published architecture."""
        counts: dict[tuple[str, str, int], int] = {}
        for x in self.of_kind("cross"):
            key = (x.module, x.position, x.factor)
            counts[key] = counts.get(key, 0) + 1
        return tuple((pos, factor, n) for (_, pos, factor), n in counts.items())


def _locate_unet(unet: nn.Module) -> list[AttentionLayer]:
    """attn1/attn2 of a UNet's transformer blocks, in call order (down fine→coarse, mid, up coarse→fine)."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    found = []
    for name, module in unet.named_modules():
        if not name.endswith((".attn1", ".attn2")) or not is_attention(module):
            continue
        block = name.rsplit(".", 1)[0]
        grid = _unet_grid(block, n_down, n_up)
        if grid is None:
            continue
        level, position, rank = grid
        kind: Kind = "self" if name.endswith("attn1") else "cross"
        found.append(
            ((rank, level if position != "up" else -level), AttentionLayer(name, block, kind, 2**level, position, 0))
        )
    found.sort(key=lambda x: x[0])  # stable: keeps module order within a level
    return [replace(layer, order=i) for i, (_, layer) in enumerate(found)]


def _locate_transformer(model: nn.Module) -> list[AttentionLayer]:
    """attn1/attn2 of a DiT's `transformer_blocks`, in call order; the token grid is latent / patch size."""
    patch = int(getattr(getattr(model, "config", None), "patch_size", None) or 1)
    layers = []
    for name, module in model.named_modules():
        if not name.startswith("transformer_blocks.") or not name.endswith((".attn1", ".attn2")):
            continue
        if not is_attention(module):
            continue
        kind: Kind = "self" if name.endswith("attn1") else "cross"
        layers.append(AttentionLayer(name, name.rsplit(".", 1)[0], kind, patch, "mid", len(layers)))
    return layers


def is_joint_attention(module: nn.Module) -> bool:
    """An MMDiT attention module: image q/k/v plus the text stream's `add_k_proj` (double-stream), or a Flux
    single-stream attention (`pre_only`, run on the concatenated [text; image] sequence)."""
    has_qk = hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads")
    return has_qk and (getattr(module, "add_k_proj", None) is not None or bool(getattr(module, "pre_only", False)))


def is_joint_transformer(model: nn.Module) -> bool:
    """SD3/Flux-like: `transformer_blocks` whose `attn` is joint attention (no `attn2` over the text)."""
    blocks = getattr(model, "transformer_blocks", None)
    return bool(blocks) and all(is_joint_attention(getattr(b, "attn", None) or nn.Module()) for b in blocks)


def joint_token_factor(model: nn.Module) -> int:
    """Latent pixels per token side: the patch size, times 2 for Flux's 2×2 latent packing (its pipelines pack
    16-channel latents into 64-channel tokens, and the transformer's own patch size is 1)."""
    config = getattr(model, "config", None)
    patch = int(getattr(config, "patch_size", None) or 1)
    packed = hasattr(model, "single_transformer_blocks")
    return patch * (2 if packed else 1)


def _locate_joint(model: nn.Module) -> list[AttentionLayer]:
    """Both views of every joint-attention module, in call order: double-stream `transformer_blocks.i.attn`, then
    Flux's single-stream `single_transformer_blocks.j.attn` (the authors number them 0 … 56 in this order)."""
    factor = joint_token_factor(model)
    layers: list[AttentionLayer] = []
    for stack in ("transformer_blocks", "single_transformer_blocks"):
        for i, _ in enumerate(getattr(model, stack, None) or []):
            block = f"{stack}.{i}"
            for view in ("cross", "self"):
                layers.append(AttentionLayer(f"{block}.attn:{view}", block, view, factor, "mid", len(layers)))
    return layers
