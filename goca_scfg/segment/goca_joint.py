"""GoCA on joint-attention transformers (SD3, Flux; algorithm.md §8.5): the cross and self maps are slices of one
softmax over text + image keys, formed per layer in one pass over query-row chunks.

Per layer ℓ and head h the model's softmax over [text; image] keys splits exactly into a text share
m_h(p) = Σ_t P_h(p, t) and its complement: the cross map is P_h(p, t) (the authors' slice, columns summing to m_h(p)),
the self map is P_h(p, k) (rows summing to 1 − m_h(p)). One pass over the image keys gives the log-normaliser, the
head-mean cross map, the layer's similarity to the reference and, for the propagation blocks, 1 − m_h(p) — which
turns the fused image-only attention of `propagate_self_attention` into the model's slice. Records hold the cond
branch only (the foreground comes from the cond global token, §8.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import split_heads

_CHUNK_ELEMENTS = 2**24  # fp32 logits (64 MiB) per temporary


@dataclass(frozen=True)
class JointLayerMaps:
    """One joint layer's pass: the head-mean cross map (B, N, T), the similarity to the reference (B,) or None, and
    the per-head image share 1 − m_h(p) (B, H, N) of its self map."""

    cross: Tensor
    similarity: Tensor | None
    image_share: Tensor


def joint_layer_pass(
    q: Tensor,
    k_text: Tensor,
    k_image: Tensor,
    heads: int,
    scale: float,
    pseudo: Tensor | None = None,
    text_only: bool = False,
) -> JointLayerMaps:
    """Cross map A(p, t) = mean_h P_h(p, t), similarity s = Σ_{p,k} Pseudo(p, k)·mean_h P_h(p, k) and the image share
    1 − m_h(p) of one joint layer, P the joint softmax (algorithm.md §8.5; the authors' FluxAttnStoreProcessor,
    install/components/attention.py L508-520). `text_only`: the cross map renormalised over the text keys.

    q: (B, N, C) image queries; k_text: (B, T, C); k_image: (B, N, C); pseudo: (B, N, N) or None."""
    qh = split_heads(q.float(), heads)
    kt = split_heads(k_text.float(), heads)
    ki = split_heads(k_image.float(), heads)
    b, h, n, _ = qh.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * (ki.shape[2] + kt.shape[2])))
    cross, share, sim = [], [], torch.zeros(b, device=q.device)
    for start in range(0, n, rows):
        qc = qh[:, :, start : start + rows]
        lt = qc @ kt.transpose(-1, -2) * scale  # (B, H, r, T)
        li = qc @ ki.transpose(-1, -2) * scale  # (B, H, r, N)
        lse_t, lse_i = torch.logsumexp(lt, dim=-1), torch.logsumexp(li, dim=-1)
        total = torch.logaddexp(lse_t, lse_i)
        cross.append(torch.exp(lt - (lse_t if text_only else total).unsqueeze(-1)).mean(dim=1))
        share.append(torch.exp(lse_i - total))
        if pseudo is not None:
            p_image = torch.exp(li - total.unsqueeze(-1)).mean(dim=1)  # (B, r, N): the head-mean self map
            sim += (pseudo[:, start : start + rows].float() * p_image).sum(dim=(1, 2))
    return JointLayerMaps(torch.cat(cross, dim=1), sim if pseudo is not None else None, torch.cat(share, dim=2))


def reference_feature(feature: Tensor, channels: str) -> Tensor:
    """The similarity's reference feature (B, N, C): all channels (the authors' generation code, utils_sigma.py), or
    channel 0 only ("first": their segmentation code's `features[ref_layer][0]`, cross_attn_dispatch.py L471)."""
    return feature[..., :1] if channels == "first" else feature


def pad_tokens(mask: Tensor, length: int) -> Tensor:
    """A (B, T') token mask extended with False (or cut) to the joint context's length T."""
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], length - mask.shape[1])], dim=1)
