"""Attention capture: which layers are watched and what one UNet call records.

Forward hooks on `to_q`, `to_k` and the input of `to_out[0]` record the raw ingredients (queries, keys, per-head
outputs) of the watched layers only. No attention processor is replaced, so every layer keeps its fused kernel
(SDPA) and its output bit for bit, and LoRA (PEFT-wrapped projections) and IP-Adapter processors keep working.
Maps are formed later, in fp32, only where a segmentor asks for them (`LayerTensors.probs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from .ops import attention_probs

Field = Literal["q", "k", "o"]
_ACTIVE = "_goca_scfg_capture_active"


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a transformer block, located in the UNet's structure.

    name: qualified module name (`…transformer_blocks.0.attn2`); block: its transformer block's name;
    kind: "self" (attn1) or "cross" (attn2); factor: downsampling of its grid relative to the latent;
    position: "down" | "mid" | "up"; order: call order within the UNet forward.
    """

    name: str
    block: str
    kind: Literal["self", "cross"]
    factor: int
    position: Literal["down", "mid", "up"]
    order: int


def locate_attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """All attn1/attn2 modules of the UNet's transformer blocks, in call order, with their grid factor.

    Factors come from the structure (down level i → 2^i, mid → deepest, up level j mirrors), so layers can be
    chosen before the first call; the grid of every recorded map is taken from its real token count at run time.
    """
    n_down = len(getattr(unet, "down_blocks", []))
    n_up = len(getattr(unet, "up_blocks", []))
    found: list[tuple[tuple[int, int], AttentionLayer]] = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or not name.endswith((".attn1", ".attn2")):
            continue
        block = name.rsplit(".", 1)[0]
        kind: Literal["self", "cross"] = "self" if name.endswith("attn1") else "cross"
        if block.startswith("down_blocks."):
            level, position, rank = int(block.split(".")[1]), "down", 0
        elif block.startswith("mid_block."):
            level, position, rank = n_down - 1, "mid", 1
        elif block.startswith("up_blocks."):
            level, position, rank = n_up - 1 - int(block.split(".")[1]), "up", 2
        else:
            continue
        # call order: down path from fine to coarse, mid, up path from coarse to fine
        sort_key = (rank, level if position != "up" else -level)
        found.append((sort_key, AttentionLayer(name, block, kind, 2**level, position, order=0)))
    found.sort(key=lambda x: x[0])  # stable: keeps module order within a level
    return [replace(layer, order=i) for i, (_, layer) in enumerate(found)]


@dataclass
class LayerTensors:
    """What one watched attention layer recorded in the latest UNet call.

    q: (2B, N, C) queries; k: (2B, M, C) keys (text keys only for IP-Adapter layers); o: (2B, N, C) per-head
    outputs concatenated before the out-projection; w_out: (C_out, C) out-projection weight; heads, scale;
    reduced: what the layer's `Reduce` made of them inside the forward pass (the raw fields are then dropped).
    """

    heads: int
    scale: float
    q: Tensor | None = None
    k: Tensor | None = None
    o: Tensor | None = None
    w_out: Tensor | None = None
    reduced: Tensor | None = None

    def probs(self, head_mean: bool = False) -> Tensor:
        """softmax(Q Kᵀ·scale) in fp32: (2B, H, N, M), or the head mean (2B, N, M)."""
        if self.q is None or self.k is None:
            raise RuntimeError("this layer was not asked to record q and k")
        return attention_probs(self.q, self.k, self.heads, self.scale, head_mean=head_mean)


@dataclass
class AttentionRecord:
    """Per-layer tensors of the latest UNet call, keyed by qualified module name; `clear()` frees them."""

    layers: dict[str, LayerTensors] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerTensors:
        if name not in self.layers:
            raise KeyError(f"no capture for layer {name!r}; recorded: {sorted(self.layers)}")
        return self.layers[name]

    def clear(self) -> None:
        for t in self.layers.values():
            t.q = t.k = t.o = t.reduced = None

    def nbytes(self) -> int:
        """Bytes of the tensors the record holds now (what capture costs in memory between hooks and use)."""
        tensors = [x for t in self.layers.values() for x in (t.q, t.k, t.o, t.reduced) if x is not None]
        return sum(x.numel() * x.element_size() for x in tensors)


@dataclass(frozen=True)
class Reduce:
    """Turn a layer's raw q/k/o into what the segmentor needs as soon as they exist, inside the forward pass, so
    the raw tensors are not kept alive; `keep` names raw fields that must stay as well."""

    fn: Callable[[LayerTensors], Tensor]
    keep: frozenset[str] = frozenset()


def _fused_split(out: Tensor, kind: str) -> tuple[Tensor | None, Tensor | None]:
    """(q, k) from a fused to_qkv output, or (None, k) from a fused to_kv output."""
    if kind == "qkv":
        q, k, _ = out.chunk(3, dim=-1)
        return q, k
    k, _ = out.chunk(2, dim=-1)
    return None, k


@contextmanager
def capture_attention(
    unet: nn.Module, requests: dict[str, set[Field]], reducers: dict[str, Reduce] | None = None
) -> Iterator[AttentionRecord]:
    """Record `requests[name]` ⊆ {"q", "k", "o"} for the named attention modules during every UNet call.

    With `reducers[name]`, the layer's record keeps only `Reduce.fn` of its fields (plus `Reduce.keep`).
    Hooks are installed on entry and always removed on exit (also on error); capturing an already-captured
    UNet raises. Each call overwrites the previous call's tensors (the record holds one step).
    """
    reducers = reducers or {}
    if getattr(unet, _ACTIVE, False):
        raise RuntimeError("attention capture is already active on this UNet (nested capture is not supported)")
    modules = dict(unet.named_modules())
    record = AttentionRecord()
    handles = []
    try:
        setattr(unet, _ACTIVE, True)
        for name, wanted in requests.items():
            attn = modules.get(name)
            if not isinstance(attn, Attention):
                raise ValueError(f"{name!r} is not an attention module of this UNet")
            if not set(wanted) <= {"q", "k", "o"}:
                raise ValueError(f"unknown capture fields {set(wanted) - {'q', 'k', 'o'}} for {name!r}")
            slot = LayerTensors(heads=attn.heads, scale=float(attn.scale))
            record.layers[name] = slot
            handles += _install(attn, slot, set(wanted), reducers.get(name))
        yield record
    finally:
        for h in handles:
            h.remove()
        record.clear()
        if hasattr(unet, _ACTIVE):
            delattr(unet, _ACTIVE)


def _maybe_reduce(slot: LayerTensors, wanted: set[str], reducer: Reduce | None) -> None:
    if reducer is None or any(getattr(slot, f) is None for f in wanted):
        return
    slot.reduced = reducer.fn(slot)
    for f in wanted - reducer.keep:
        setattr(slot, f, None)


def _install(attn: Attention, slot: LayerTensors, wanted: set[str], reducer: Reduce | None = None) -> list:
    handles = []

    def keep(attr: str):
        def hook(_module, _inputs, output):
            setattr(slot, attr, output)
            _maybe_reduce(slot, wanted, reducer)

        return hook

    def keep_fused(kind: str):
        def hook(_module, _inputs, output):
            q, k = _fused_split(output, kind)
            if q is not None and "q" in wanted:
                slot.q = q
            if "k" in wanted:
                slot.k = k
            _maybe_reduce(slot, wanted, reducer)

        return hook

    def keep_out_input(module, inputs):
        slot.w_out = module.weight
        slot.o = inputs[0]
        _maybe_reduce(slot, wanted, reducer)

    # Hook every projection the processor might use: after `fuse_qkv_projections()` it calls to_qkv (self) or to_q +
    # to_kv (cross); after unfusing, to_q/to_k again while to_qkv stays on the module. Only the called ones fire.
    if "q" in wanted:
        handles.append(attn.to_q.register_forward_hook(keep("q")))
    if "k" in wanted:
        handles.append(attn.to_k.register_forward_hook(keep("k")))
    if wanted & {"q", "k"} and hasattr(attn, "to_qkv"):
        handles.append(attn.to_qkv.register_forward_hook(keep_fused("qkv")))
    if "k" in wanted and hasattr(attn, "to_kv"):
        handles.append(attn.to_kv.register_forward_hook(keep_fused("kv")))
    if "o" in wanted:
        handles.append(attn.to_out[0].register_forward_pre_hook(keep_out_input))
    return handles


def resolve_blocks(layers: list[AttentionLayer], names: tuple[str, ...], kind: str) -> list[AttentionLayer]:
    """The `kind` layers whose block or module name starts with one of `names` (config names such as
    `up_blocks.2.attentions.1`); raises naming what exists when a name matches nothing."""
    picked = []
    for prefix in names:
        hits = [
            layer
            for layer in layers
            if layer.kind == kind and (layer.block == prefix or layer.block.startswith(prefix + "."))
        ]
        if not hits:
            available = sorted({layer.block for layer in layers})
            raise ValueError(f"layer {prefix!r} matches no {kind}-attention block; available: {available}")
        picked += [h for h in hits if h not in picked]
    return sorted(picked, key=lambda x: x.order)


def default_dense_block(layers: list[AttentionLayer]) -> str:
    """GoCA's dense feature block (ALGORITHM §2.4): the 2nd up-path block at latent/2 (SD v1.5:
    `up_blocks.2.attentions.1`), or the last up block at latent/2 if that level has a single one."""
    ups = [x for x in layers if x.kind == "cross" and x.position == "up" and x.factor == 2]
    if not ups:
        raise ValueError("this UNet has no up-path cross-attention at latent/2; set GoCAConfig.dense_layer")
    return ups[min(1, len(ups) - 1)].block


def default_self_blocks(layers: list[AttentionLayer]) -> tuple[str, ...]:
    """GoCA's propagation blocks (ALGORITHM §2.6): the first two up-path and the second down-path self-attention
    blocks at latent resolution (SD v1.5: up_blocks.3.attentions.{0,1}, down_blocks.0.attentions.1)."""
    full = [x for x in layers if x.kind == "self" and x.factor == 1]
    ups = [x.block for x in full if x.position == "up"][:2]
    downs = [x.block for x in full if x.position == "down"][1:2]
    if not ups and not downs:
        raise ValueError("this UNet has no self-attention at latent resolution; set GoCAConfig.self_layers")
    return tuple(ups + downs)


def sibling(layers: list[AttentionLayer], layer: AttentionLayer, kind: str) -> AttentionLayer:
    """The attn1 (kind="self") or attn2 (kind="cross") module of the same transformer block."""
    for x in layers:
        if x.block == layer.block and x.kind == kind:
            return x
    raise ValueError(f"block {layer.block!r} has no {kind}-attention module")
