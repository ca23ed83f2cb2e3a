"""Attention capture: what one denoiser call records of the watched attention layers.

Forward hooks on `to_q`, `to_k` and the input of `to_out[0]` record the raw ingredients (queries, keys, per-head
outputs) of the watched layers only. No attention processor is replaced, so every layer keeps its fused kernel
(SDPA) and its output bit for bit, and LoRA (PEFT-wrapped projections) and IP-Adapter processors keep working.
Maps are formed later, in fp32, only where a segmentor asks for them (`LayerTensors.probs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from .layout import is_attention, unwrap
from .ops import attention_probs

Field = Literal["q", "k", "o"]
_ACTIVE = "_goca_scfg_capture_active"


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

    def probs(self, head_mean: bool = False, key_mask: Tensor | None = None) -> Tensor:
        """softmax(Q Kᵀ·scale) in fp32: (2B, H, N, M), or the head mean (2B, N, M); `key_mask` (2B, M) leaves out
        the keys the layer did not attend (an encoder attention mask)."""
        if self.q is None or self.k is None:
            raise RuntimeError("this layer was not asked to record q and k")
        return attention_probs(self.q, self.k, self.heads, self.scale, head_mean=head_mean, key_mask=key_mask)


@dataclass
class AttentionRecord:
    """Per-layer tensors of the latest UNet call, keyed by qualified module name; `clear()` frees them.

    enabled: while False the hooks record nothing (a step-end callback switched CFG off: the denoiser then runs on
    one half only, which the segmentor's reducers cannot read).
    """

    layers: dict[str, LayerTensors] = field(default_factory=dict)
    enabled: bool = True

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
    unet = unwrap(unet)  # a torch.compile'd model: hook the wrapped modules, by their own names
    modules = dict(unet.named_modules())
    record = AttentionRecord()
    handles = []
    try:
        setattr(unet, _ACTIVE, True)
        for name, wanted in requests.items():
            attn = modules.get(name)
            if attn is None or not is_attention(attn):
                raise ValueError(f"{name!r} is not an attention module of this UNet")
            if not set(wanted) <= {"q", "k", "o"}:
                raise ValueError(f"unknown capture fields {set(wanted) - {'q', 'k', 'o'}} for {name!r}")
            slot = LayerTensors(heads=attn.heads, scale=float(attn.scale))
            record.layers[name] = slot
            handles += _install(attn, slot, set(wanted), reducers.get(name), record)
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


def _install(
    attn: nn.Module, slot: LayerTensors, wanted: set[str], reducer: Reduce | None, record: AttentionRecord
) -> list:
    handles = []

    def keep(attr: str):
        def hook(_module, _inputs, output):
            if not record.enabled:
                return
            setattr(slot, attr, output)
            _maybe_reduce(slot, wanted, reducer)

        return hook

    def keep_fused(kind: str):
        def hook(_module, _inputs, output):
            if not record.enabled:
                return
            q, k = _fused_split(output, kind)
            if q is not None and "q" in wanted:
                slot.q = q
            if "k" in wanted:
                slot.k = k
            _maybe_reduce(slot, wanted, reducer)

        return hook

    def keep_out_input(module, inputs):
        if not record.enabled:
            return
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


HEAD_MEAN = Reduce(lambda t: t.probs(head_mean=True))  # keep only a layer's head-mean map (2B, N, M)
