"""Attention capture: what one denoiser call records of the watched attention layers.

Forward hooks on `to_q`, `to_k` and the input of `to_out[0]` record the raw ingredients (queries, keys, per-head
outputs) of the watched layers only. No attention processor is replaced, so every layer keeps its fused kernel
(SDPA) and its output bit for bit, and LoRA (PEFT-wrapped projections) and IP-Adapter processors keep working.
Maps are formed later, in fp32, only where a segmentor asks for them (`LayerTensors.probs`).

Joint attention (SD3, Flux; `layout.joint_view` names): hooks on the QK-norms (or the projections where a model has
none) and on the module give the image queries, text keys and image keys as the model's softmax sees them (per-head
RMSNorm and, for Flux, RoPE applied exactly as its processor applies them, with the model's own `apply_rotary_emb`)
and the image rows of the attention output; the denoising keeps the model's fused kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn
from torch.profiler import record_function

from .layout import is_attention, is_joint_attention, joint_view, unwrap
from .ops import attention_probs, joint_attention_probs

Field = Literal["q", "k", "o"]
_ACTIVE = "_goca_scfg_capture_active"


@dataclass
class LayerTensors:
    """What one watched attention layer recorded in the latest UNet call.

    q: (2B, N, C) queries; k: (2B, M, C) keys (text keys only for IP-Adapter layers); o: (2B, N, C) per-head
    outputs concatenated before the out-projection; w_out: (C_out, C) out-projection weight; heads, scale;
    reduced: what the layer's `Reduce` made of them inside the forward pass (the raw fields are then dropped).
    k_rest: joint attention only: the keys of the other part of the joint softmax (image keys for the cross view,
    text keys for the self view), so that `probs` is the model's slice of one softmax over both.
    """

    heads: int
    scale: float
    q: Tensor | None = None
    k: Tensor | None = None
    o: Tensor | None = None
    w_out: Tensor | None = None
    reduced: Tensor | None = None
    k_rest: Tensor | None = None

    def probs(self, head_mean: bool = False, key_mask: Tensor | None = None, joint: bool = True) -> Tensor:
        """softmax(Q Kᵀ·scale) in fp32: (2B, H, N, M), or the head mean (2B, N, M); `key_mask` (2B, M) leaves out
        the keys the layer did not attend (an encoder attention mask). A joint-attention view gives its columns of
        the softmax over both key sets (`joint=False`: renormalised over its own keys)."""
        if self.q is None or self.k is None:
            raise RuntimeError("this layer was not asked to record q and k")
        if self.k_rest is not None and joint:
            return joint_attention_probs(self.q, self.k, self.k_rest, self.heads, self.scale, head_mean=head_mean)
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
            t.q = t.k = t.o = t.reduced = t.k_rest = None

    def nbytes(self) -> int:
        """Bytes of the tensors the record holds now (what capture costs in memory between hooks and use)."""
        tensors = [x for t in self.layers.values() for x in (t.q, t.k, t.o, t.reduced, t.k_rest) if x is not None]
        unique = {id(x): x for x in tensors}  # the two views of a joint layer share their image queries
        return sum(x.numel() * x.element_size() for x in unique.values())


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
    unet: nn.Module,
    requests: dict[str, set[Field]],
    reducers: dict[str, Reduce] | None = None,
    rows: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[AttentionRecord]:
    """Record `requests[name]` ⊆ {"q", "k", "o"} for the named attention modules during every UNet call.

    With `reducers[name]`, the layer's record keeps only `Reduce.fn` of its fields (plus `Reduce.keep`).
    Hooks are installed on entry and always removed on exit (also on error); capturing an already-captured
    UNet raises. Each call overwrites the previous call's tensors (the record holds one step). Joint-attention
    views (`…attn:cross`, `…attn:self`) are recorded by one set of hooks per module; `rows` (joint layers only)
    keeps part of the batch (the cond half of a batched CFG call) before anything is stored or reduced.
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
        joint: dict[str, dict[str, tuple[LayerTensors, set[str], Reduce | None]]] = {}
        for name, wanted in requests.items():
            view = joint_view(name)
            if view is not None:
                attn = modules.get(view[0])
                if attn is None or not is_joint_attention(attn):
                    raise ValueError(f"{view[0]!r} is not a joint-attention module of this transformer")
                if not set(wanted) <= {"q", "k", "o"}:
                    raise ValueError(f"unknown capture fields {set(wanted) - {'q', 'k', 'o'}} for {name!r}")
                # both joint processors call SDPA without a scale: its default 1/√(head size)
                slot = LayerTensors(heads=attn.heads, scale=(attn.to_q.out_features // attn.heads) ** -0.5)
                record.layers[name] = slot
                joint.setdefault(view[0], {})[view[1]] = (slot, set(wanted), reducers.get(name))
                continue
            attn = modules.get(name)
            if attn is None or not is_attention(attn):
                raise ValueError(f"{name!r} is not an attention module of this UNet")
            if not set(wanted) <= {"q", "k", "o"}:
                raise ValueError(f"unknown capture fields {set(wanted) - {'q', 'k', 'o'}} for {name!r}")
            slot = LayerTensors(heads=attn.heads, scale=float(attn.scale))
            record.layers[name] = slot
            handles += _install(attn, slot, set(wanted), reducers.get(name), record)
        if joint:
            text = {}
            handles.append(unet.register_forward_pre_hook(_text_length_hook(text), with_kwargs=True))
            for module_name, views in joint.items():
                handles += _install_joint(modules[module_name], views, record, text, rows)
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
    with record_function("goca_scfg::capture_reduce"):
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


def _text_length_hook(text: dict):
    """A denoiser pre-hook noting the text length of the call (`encoder_hidden_states`): Flux's single-stream blocks
    see only the concatenated [text; image] sequence."""

    def hook(_module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states")
        text["length"] = int(enc.shape[1]) if enc is not None else None

    return hook


def _tokens_last(x: Tensor, heads_first: bool) -> Tensor:
    """(B, L, H·D) from a per-head tensor (B, H, L, D) (`heads_first`, SD3's processor) or (B, L, H, D) (Flux's)."""
    if x.dim() == 3:
        return x
    return (x.transpose(1, 2) if heads_first else x).flatten(2)


def _rope(x: Tensor, rope, start: int, heads: int) -> Tensor:
    """RoPE on (B, L, H·D) tokens that sit at positions start … start+L of the model's joint sequence, as Flux's
    processor applies it to the whole sequence (`apply_rotary_emb(…, sequence_dim=1)`: element-wise per position)."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rope
    n = x.shape[1]
    per_head = x.unflatten(-1, (heads, -1))
    return apply_rotary_emb(per_head, (cos[start : start + n], sin[start : start + n]), sequence_dim=1).flatten(2)


def _install_joint(
    attn: nn.Module,
    views: dict[str, tuple[LayerTensors, set[str], Reduce | None]],
    record: AttentionRecord,
    text: dict,
    rows: Callable[[Tensor], Tensor] | None,
) -> list:
    """Hooks for both views of one joint-attention module: its image queries (q), image keys and text keys after the
    per-head norms and RoPE, and the image rows of its output (o): the attention output after `to_out` in a
    double-stream block, the attention output in a single-stream one (what the authors' processor stores as
    'attn-out', install/components/attention.py L540-554)."""
    from diffusers.models.attention_processor import Attention

    heads_first = isinstance(attn, Attention)  # SD3's processor transposes to (B, H, L, D) before its norms
    parts: dict[str, Tensor] = {}
    call: dict = {}
    double = getattr(attn, "add_k_proj", None) is not None

    def keep(part: str, fused: int | None = None):
        def hook(_module, _inputs, output):
            if record.enabled:
                parts[part] = output.chunk(3, dim=-1)[fused] if fused is not None else output

        return hook

    def before(_module, args, kwargs):
        parts.clear()
        call["rope"] = kwargs.get("image_rotary_emb")

    def after(_module, _args, output):
        if not record.enabled:
            return
        out = output[0] if isinstance(output, tuple) else output
        q, k = _tokens_last(parts["q"], heads_first), _tokens_last(parts["k"], heads_first)
        if double:
            k_txt = _tokens_last(parts["k_txt"], heads_first)
            t = k_txt.shape[1]
            first_image = t if call["rope"] is not None else 0  # Flux: [text; image]; SD3 has no positions here
        else:
            t = text.get("length")
            if t is None:
                raise RuntimeError("a single-stream joint block ran outside a transformer call with text")
            k_txt, q, k, out = k[:, :t], q[:, t:], k[:, t:], out[:, t:]
            first_image = t
        if call["rope"] is not None:
            q = _rope(q, call["rope"], first_image, attn.heads)
            k = _rope(k, call["rope"], first_image, attn.heads)
            k_txt = _rope(k_txt, call["rope"], 0, attn.heads)
        if rows is not None:
            q, k, k_txt, out = rows(q), rows(k), rows(k_txt), rows(out)
        fields = {"cross": (k_txt, k), "self": (k, k_txt)}
        for view, (slot, wanted, reducer) in views.items():
            slot.q = q if "q" in wanted else None
            slot.k, slot.k_rest = fields[view]
            slot.o = out if "o" in wanted else None
            if reducer is not None:
                slot.reduced = reducer.fn(slot)
                for f in set(wanted) - reducer.keep:
                    setattr(slot, f, None)
                if "k" not in reducer.keep:
                    slot.k_rest = None
        parts.clear()

    handles = [
        attn.register_forward_pre_hook(before, with_kwargs=True),
        attn.register_forward_hook(after, always_call=False),
    ]
    norms = {"q": "norm_q", "k": "norm_k", "k_txt": "norm_added_k"}
    projections = {"q": "to_q", "k": "to_k", "k_txt": "add_k_proj"}
    for part in ("q", "k", "k_txt") if double else ("q", "k"):
        norm = getattr(attn, norms[part], None)
        if norm is not None:
            handles.append(norm.register_forward_hook(keep(part)))
            continue
        handles.append(getattr(attn, projections[part]).register_forward_hook(keep(part)))
        fused = getattr(attn, "to_added_qkv" if part == "k_txt" else "to_qkv", None)
        if fused is not None:  # fused projections: the chunk this part is
            handles.append(fused.register_forward_hook(keep(part, 0 if part == "q" else 1)))
    return handles


HEAD_MEAN = Reduce(lambda t: t.probs(head_mean=True))  # keep only a layer's head-mean map (2B, N, M)
