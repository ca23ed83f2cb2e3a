"""Pictures of one denoising step's segmentation: regions, foreground and rate map over the generated image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .guidance import SCFGStepMaps


def token_label(tokens: list[str], index: int) -> str:
    """A readable name for prompt position `index`: the word, `<sos>`, `<eos>` (first end token) or `<pad N>`; T5
    pieces lose their `▁` word mark (a bare `▁` stays)."""
    token = tokens[index]
    if token == "<|endoftext|>" and index > tokens.index("<|endoftext|>"):
        return f"<pad {index}>"
    token = token.replace("</w>", "").replace("<|startoftext|>", "<sos>").replace("<|endoftext|>", "<eos>")
    return token.lstrip("▁") or token


def plot_step_maps(image: Image.Image, maps: SCFGStepMaps, index: int = 0):
    """A matplotlib figure: the image, its token regions (named), the foreground and the rate map, overlaid."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = np.asarray(image.convert("RGB"))
    extent = (0, img.shape[1], img.shape[0], 0)
    labels = maps.labels[index].numpy()
    fg = maps.foreground[index].numpy().astype(float)
    rate = maps.rate[index].numpy()
    fig, axes = plt.subplots(1, 4, figsize=(16, 5.4))
    axes[0].imshow(img)
    axes[0].set_title("image")
    present = np.unique(labels)
    cmap = plt.get_cmap("tab20", max(len(present), 1))
    colour_of = {int(t): cmap(i) for i, t in enumerate(present)}
    rgba = np.array([colour_of[int(t)] for t in labels.reshape(-1)]).reshape(*labels.shape, 4)
    axes[1].imshow(img)
    axes[1].imshow(rgba, alpha=0.55, extent=extent, interpolation="nearest")
    axes[1].set_title("regions (winning token)")
    names = maps.tokens[index] if maps.tokens is not None else None
    handles = [
        Patch(color=colour_of[int(t)], label=token_label(names, int(t)) if names else f"token {int(t)}")
        for t in present
    ]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), ncol=3, fontsize=7, frameon=False)
    axes[2].imshow(img)
    axes[2].imshow(fg, cmap="gray", alpha=0.6, extent=extent, interpolation="nearest", vmin=0, vmax=1)
    axes[2].set_title(f"foreground ({fg.mean():.0%})")
    axes[3].imshow(img)
    shown = axes[3].imshow(rate, cmap="magma", alpha=0.7, extent=extent, interpolation="nearest")
    fig.colorbar(shown, ax=axes[3], fraction=0.046)
    axes[3].set_title(f"rate r (step {maps.step}, t={maps.timestep})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_step_maps(path: str, image: Image.Image, maps: SCFGStepMaps, index: int = 0) -> None:
    """Write `plot_step_maps` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = plot_step_maps(image, maps, index)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
