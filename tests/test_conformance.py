"""Drop-in conformance: the scenarios of diffusers' own pipeline fast tests, run on every SCFG pipeline.

Each pipeline runs on diffusers' dummy component configurations (built here, random weights, a real CLIP tokenizer)
three ways: `segmentor=None` must give exactly what the stock diffusers pipeline gives on the same components
(`torch.equal`), and `segmentor="goca"` / `"scfg"` must run the scenario with the right output shapes and one
`SCFGStepMaps` / `SCFGStepRates` per denoising-loop iteration of the right shape.

Adding a pipeline is one `Case(...)` line in `CASES` (plus the function that builds its dummy components). What a
stock pipeline does not support (a segmentor, FreeU, `callback_on_step_end`, ...) its Case names in `not_applicable`
with the reason, from the vocabulary in `CAPABILITIES`; those scenarios are skipped for it and say why.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from goca_scfg import (
    GoCAConfig,
    PixArtSigmaSCFGPipeline,
    SCFGStepMaps,
    StableDiffusionSCFGPipeline,
    StableDiffusionXLSCFGPipeline,
)
from goca_scfg.testing import (
    DIFFUSERS_TEST_UNET,
    clip_tokenizer,
    sharpened,
    t5_tokenizer,
    tiny_pixart_components,
)

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

SEGMENTORS = [None, "goca", "scfg"]
PROMPT = "a watercolour fox reading a newspaper"
PROMPTS = [PROMPT, "two red apples on a wooden table", "a lighthouse at night"]

# ------------------------------------------------------------------------------ diffusers' dummy components


@lru_cache(maxsize=2)
def _tokenizer(pad_token: str = "<|endoftext|>"):
    return clip_tokenizer(pad_token)


def _clip_text_config(**over) -> CLIPTextConfig:
    """diffusers' dummy CLIP text encoder (hidden 32, 5 layers) with the real tokenizer's vocabulary and ids."""
    cfg = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, layer_norm_eps=1e-5,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    return CLIPTextConfig(**{**cfg, **over})


def _dummy_vae(**over) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        **over,
    ).eval()


def sd_dummy_components() -> dict[str, Any]:
    """diffusers' StableDiffusionPipeline fast-test components: 2-level UNet (32, 64), cross-attention 32, DDIM; the
    UNet's attention sharpened (`sharpened`), so that scenarios comparing two code paths (attention processors,
    batch shapes, a reloaded copy) compare labels that rounding cannot flip."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DIFFUSERS_TEST_UNET).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    vae = _dummy_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config()).eval()
    return sharpened(
        _components(unet, scheduler, vae, text_encoder, safety_checker=None, requires_safety_checker=False)
    )


def _components(unet, scheduler, vae, text_encoder, **more) -> dict[str, Any]:
    """The components every Stable Diffusion pipeline takes (no image encoder), plus `more`."""
    return dict(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        feature_extractor=None,
        image_encoder=None,
        **more,
    )


def sdxl_dummy_components() -> dict[str, Any]:
    """diffusers' StableDiffusionXLPipeline fast-test components: 2-level UNet with transformer_layers_per_block
    (1, 2), text_time conditioning, two CLIP text encoders (the second with projection, padding with id 0); the UNet's
    attention sharpened as in `sd_dummy_components`."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{**DIFFUSERS_TEST_UNET, "block_out_channels": (2, 4), "cross_attention_dim": 64, "norm_num_groups": 1},
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    vae = _dummy_vae(sample_size=128)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config(hidden_act="gelu", projection_dim=32)).eval()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(hidden_act="gelu", projection_dim=32, pad_token_id=0)
    ).eval()
    return sharpened(_components(
        unet, scheduler, vae, text_encoder, text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer("!"),
        add_watermarker=False,
    ))  # fmt: skip


def pixart_dummy_components() -> dict[str, Any]:
    """Tiny PixArt-Sigma components: 28 blocks (so GoCA's PixArt-Sigma preset applies, as on the real model), 8
    output channels (learned sigma), a 4-level VAE (scale 8), T5 of width 16 with a real T5-style tokenizer; sample
    size 32 (256 px: resolution binning has its bins). diffusers' PixArt dummy scheduler, DDIM (x0 unclipped).

    The attention is sharpened (`sharpened`) so the random attention is peaked as a trained model's is: with
    near-uniform random self-attention, GoCA's order-5 propagation flattens every token map and its per-token
    min-max turns 1e-7 rounding (another attention processor) into label flips at every pixel. (DPM-Solver++ from
    t=999 would also put the random model's latents in the hundreds.)
    """
    components = sharpened(tiny_pixart_components())
    config = components["transformer"].config
    assert config.num_layers == 28 and config.out_channels == 2 * config.in_channels
    return {**components, "scheduler": DDIMScheduler(clip_sample=False)}


def pixart_two_block_components() -> dict[str, Any]:
    """diffusers' own PixArt-Sigma fast-test components (2 transformer blocks, sample size 8, the one-level default
    VAE, DDIM), with a tiny T5 encoder of the caption width over the offline T5-style tokenizer."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, is_encoder_decoder=False
    )
    text_encoder = T5EncoderModel(text_config).eval()
    return dict(
        transformer=transformer, vae=vae, scheduler=DDIMScheduler(), text_encoder=text_encoder, tokenizer=tokenizer
    )


# What a stock pipeline may lack. A Case lists those its stock pipeline lacks, with the reason, in `not_applicable`.
CAPABILITIES = {
    "segmentor:scfg": "segmentor='scfg'",
    "step_end_callback": "callback_on_step_end and _callback_tensor_inputs",
    "cfg_cutoff_callback": "a diffusers CFG-cutoff PipelineCallback",
    "interrupt": "pipe._interrupt from a callback",
    "attention_slicing": "enable_attention_slicing on the denoiser",
    "freeu": "enable_freeu",
    "ip_adapter": "IP-Adapter image embeddings",
    "guidance_rescale": "guidance_rescale",
    "resolution_binning": "use_resolution_binning",
    "max_sequence_length": "max_sequence_length",
    "clean_caption": "clean_caption",
}
_CLIP_ONLY = {
    "resolution_binning": "no use_resolution_binning (any multiple of the VAE scale is generated as asked)",
    "max_sequence_length": "CLIP prompts: always the tokenizer's 77 positions, no max_sequence_length",
    "clean_caption": "no clean_caption (prompts reach the CLIP tokenizer as given)",
}
_PIXART_LACKS = {
    "segmentor:scfg": "S-CFG defines no DiT segmentation; it raises (test_unsupported_segmentors_raise)",
    "step_end_callback": "PixArtSigmaPipeline has no callback_on_step_end (only the legacy callback/callback_steps)",
    "cfg_cutoff_callback": "diffusers.callbacks has no PixArt CFG-cutoff callback (nor PixArt callback_on_step_end)",
    "interrupt": "PixArtSigmaPipeline's loop has no _interrupt check",
    "attention_slicing": "PixArtTransformer2DModel has no set_attention_slice (enable_attention_slicing: a no-op)",
    "freeu": "FreeU scales UNet up-blocks; PixArtSigmaPipeline has no enable_freeu",
    "ip_adapter": "PixArtSigmaPipeline has no IP-Adapter loader",
    "guidance_rescale": "PixArtSigmaPipeline has no guidance_rescale",
}


@dataclass(frozen=True)
class Case:
    """One SCFG pipeline under test: its class, the stock diffusers class it extends, and its dummy inputs."""

    name: str
    pipeline: type
    stock: type
    components: Callable[[], dict[str, Any]]
    guidance_scale: float
    # the diffusers callback that switches CFG off after a step (a `PipelineCallback`), if diffusers has one
    cfg_cutoff: type | None
    # names of what `encode_prompt` returns, in order, as `__call__` keywords
    embeds: tuple[str, ...] = ("prompt_embeds", "negative_prompt_embeds")
    size: int = 32  # px: latents 16x16 with the 2-level dummy VAE
    extra: dict[str, Any] = field(default_factory=dict)  # call keywords every scenario passes to this pipeline
    # the maps' token rows: what the tokenizer puts first, what ends a truncated prompt, and the `__call__` keyword
    # that sets the row length (None: the tokenizer's `model_max_length`)
    bos: tuple[str, ...] = ("<|startoftext|>",)
    eos: str = "<|endoftext|>"
    sequence_length: str | None = None
    not_applicable: dict[str, str] = field(default_factory=dict)  # capability (`CAPABILITIES`) -> why

    def __post_init__(self):
        assert self.not_applicable.keys() <= CAPABILITIES.keys(), self.not_applicable.keys() - CAPABILITIES.keys()

    @property
    def segmentors(self) -> tuple[str, ...]:
        """The segmentors this pipeline defines."""
        return tuple(s for s in SEGMENTORS if s is not None and f"segmentor:{s}" not in self.not_applicable)


CASES = [
    Case("sd", StableDiffusionSCFGPipeline, StableDiffusionPipeline, sd_dummy_components, 6.0, SDCFGCutoffCallback,
         not_applicable=_CLIP_ONLY),
    Case("sdxl", StableDiffusionXLSCFGPipeline, StableDiffusionXLPipeline, sdxl_dummy_components, 5.0,
         SDXLCFGCutoffCallback,
         embeds=("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
         not_applicable=_CLIP_ONLY),
    Case("pixart", PixArtSigmaSCFGPipeline, PixArtSigmaPipeline, pixart_dummy_components, 5.0, None,
         embeds=("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
         size=64,  # latents 8x8 with the 4-level VAE
         extra=dict(use_resolution_binning=False, clean_caption=False),  # as diffusers' own PixArt tests; both tested
         bos=(), eos="</s>", sequence_length="max_sequence_length", not_applicable=_PIXART_LACKS),
]  # fmt: skip


# ------------------------------------------------------------------------------ harness


def _images(out) -> Any:
    return out.images if hasattr(out, "images") else out[0]


def _count(images) -> int:
    return len(images) if isinstance(images, list) else images.shape[0]


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, list):
        return torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    return torch.from_numpy(images) if isinstance(images, np.ndarray) else images


def assert_same_images(a, b) -> None:
    assert type(a) is type(b)
    assert torch.equal(_as_tensor(a), _as_tensor(b))


class Harness:
    """One case's pipelines over shared dummy components, and calls that check what every scenario must show."""

    def __init__(self, case: Case):
        self.case = case
        self.components = case.components()
        self.pipe = self.ours()
        self.stock = self.plain()

    def require(self, capability: str) -> None:
        """Skip the scenario, saying why, where the stock pipeline does not support `capability`."""
        assert capability in CAPABILITIES, capability
        if capability in self.case.not_applicable:
            pytest.skip(f"{CAPABILITIES[capability]} not applicable to {self.case.name}: "
                        f"{self.case.not_applicable[capability]}")  # fmt: skip

    def token_row_length(self, kw: dict[str, Any]) -> int:
        """Entries per token row of the maps: the call's sequence length (its default if not given) or the
        tokenizer's `model_max_length`."""
        name = self.case.sequence_length
        if name is None:
            return self.pipe.tokenizer.model_max_length
        return kw.get(name, inspect.signature(self.case.pipeline.__call__).parameters[name].default)

    def denoiser(self, pipe) -> torch.nn.Module:
        """The UNet or transformer of either pipeline (ours or stock)."""
        return getattr(pipe, self.case.pipeline.denoiser_name)

    def _build(self, cls, components=None, **replace):
        pipe = cls(**{**(components or self.components), **replace})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def ours(self, components=None, **replace):
        """The SCFG pipeline over `components` (default: the shared ones), with some components replaced."""
        return self._build(self.case.pipeline, components, **replace)

    def plain(self, components=None, **replace):
        """The stock diffusers pipeline over the same components."""
        return self._build(self.case.stock, components, **replace)

    def fresh(self) -> tuple[Any, Any]:
        """(ours, stock) over a private copy of the components, for scenarios that change the models in place."""
        components = {k: v if "tokenizer" in k else copy.deepcopy(v) for k, v in self.components.items()}
        return self.ours(components), self.plain(components)

    def inputs(self, prompt=PROMPT, seeds=(0,), **over) -> dict[str, Any]:
        """diffusers-style dummy inputs with freshly seeded generators (one per image)."""
        kw = dict(
            prompt=prompt,
            num_inference_steps=2,
            guidance_scale=self.case.guidance_scale,
            height=self.case.size,
            width=self.case.size,
            output_type="pt",
            **self.case.extra,
        )
        kw.update(over)
        if seeds is not None:
            kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        return kw

    def run(self, segmentor, pipe=None, stock=None, steps=None, latent_hw=None, **inputs):
        """Call `pipe` (default: ours) with `segmentor`. None: the output must equal the stock pipeline's on the same
        inputs. A segmentor: the maps and rates must be right (`steps` loop iterations; default all of them; maps
        of size `latent_hw`, default height and width over the VAE scale)."""
        pipe = pipe or self.pipe
        kw = self.inputs(**inputs)
        out = pipe(**kw, segmentor=segmentor, return_maps=segmentor is not None)
        if segmentor is None:
            ref = (stock or self.stock)(**self.inputs(**inputs))
            assert type(ref) is not tuple or len(out) == len(ref)
            assert_same_images(_images(out), _images(ref))
            if isinstance(out, tuple):
                assert all(x == y for x, y in zip(out[1:], ref[1:]))
            else:
                assert out.maps is None and out.rates is None
        else:
            native = pipe.denoiser.config.sample_size  # the latent size when no height/width is given
            hw = latent_hw or tuple(kw[k] // pipe.vae_scale_factor if kw[k] else native for k in ("height", "width"))
            maps = out[-1] if isinstance(out, tuple) else out.maps
            check_maps(pipe, maps, _count(_images(out)), hw, self.token_row_length(kw), steps,
                       has_tokens=kw.get("prompt") is not None or kw.get("caption") is not None)  # fmt: skip
            if not isinstance(out, tuple):
                assert [r.step for r in out.rates] == [m.step for m in maps]
                assert all(r.mean.shape == (_count(_images(out)),) for r in out.rates)
        return out


def assert_same_guidance(a, b, segmentor) -> None:
    """Two runs that differ only by rounding in the denoiser (~1e-6: batch size, slicing, fused projections, another
    attention processor, a reloaded copy of the weights; on some CPUs MKL also rounds by buffer alignment).

    Plain CFG keeps that size (1e-4, diffusers' bound). The dummy models' attention is sharpened, so rounding does
    not flip their maps: every step keeps >= 99 % of its labels and foreground, and the latents stay within 1e-3,
    while segmenting or not differs by 0.15-0.6 on these latents.
    """
    torch.testing.assert_close(a.images, b.images, atol=1e-4 if segmentor is None else 1e-3, rtol=0)
    if segmentor is not None:
        assert len(a.maps) == len(b.maps)
        for x, y in zip(a.maps, b.maps):
            assert (x.labels == y.labels).float().mean() >= 0.99
            assert (x.foreground == y.foreground).float().mean() >= 0.99


def check_maps(pipe, maps: list[SCFGStepMaps], n_images, latent_hw, max_tokens, steps=None, has_tokens=True) -> None:
    """One map per loop iteration (step index and timestep in order), each (B, h, w) with labels naming tokens
    (token rows of `max_tokens` entries)."""
    timesteps = pipe.scheduler.timesteps
    assert len(maps) == (len(timesteps) if steps is None else steps)
    for i, m in enumerate(maps):
        assert m.step == i and m.timestep == int(timesteps[i])
        assert m.labels.shape == m.foreground.shape == m.rate.shape == (n_images, *latent_hw)
        assert m.labels.dtype == torch.long and m.foreground.dtype == torch.bool and m.rate.dtype == torch.float32
        assert m.labels.min() >= 0 and m.labels.max() < max_tokens and torch.isfinite(m.rate).all()
        if has_tokens:
            assert len(m.tokens) == n_images and all(len(t) == max_tokens for t in m.tokens)
        else:
            assert m.tokens is None


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def h(request) -> Harness:
    return Harness(request.param)


@pytest.fixture(autouse=True)
def _segmentor_applicable(request):
    """A scenario parametrized with a segmentor the case's pipeline does not define is skipped, saying why."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    case, segmentor = params.get("h"), params.get("segmentor")
    if case is not None and segmentor is not None and segmentor not in case.segmentors:
        pytest.skip(f"segmentor={segmentor!r} not applicable to {case.name}: "
                    f"{case.not_applicable[f'segmentor:{segmentor}']}")  # fmt: skip


segmentors = pytest.mark.parametrize("segmentor", SEGMENTORS, ids=["off", "goca", "scfg"])

# ------------------------------------------------------------------------------ scenarios


@segmentors
def test_output_types(h, segmentor):
    """pt, np, pil and latent outputs: one generation, four views (pt == np exactly, pil == round(255·np))."""
    outs = {t: h.run(segmentor, output_type=t) for t in ("pt", "np", "pil", "latent")}
    pt, np_, pil, latent = (outs[t].images for t in ("pt", "np", "pil", "latent"))
    s = h.case.size
    assert pt.shape == (1, 3, s, s) and np_.shape == (1, s, s, 3) and isinstance(pil[0], Image.Image)
    assert latent.shape == (1, 4, s // h.pipe.vae_scale_factor, s // h.pipe.vae_scale_factor)
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(np_))
    assert np.abs(np.asarray(pil[0], dtype=np.float32) - (np_[0] * 255).round()).max() <= 1
    if segmentor is not None:  # the maps do not depend on how the result is decoded; the segmentation acted
        ref = outs["latent"].maps
        for t in ("pt", "np", "pil"):
            assert all(
                torch.equal(a.rate, b.rate) and torch.equal(a.labels, b.labels) for a, b in zip(outs[t].maps, ref)
            )
        plain = h.pipe(**h.inputs(output_type="latent"), segmentor=None).images
        assert (latent - plain).abs().max() > 1e-2


def test_call_signature_and_components(h):
    """Same `__call__` parameters as the stock pipeline, in the same order with the same defaults, the new keywords
    after them; the same components, optional components and callback tensor inputs."""
    ours = list(inspect.signature(h.case.pipeline.__call__).parameters.values())
    stock = [p for p in inspect.signature(h.case.stock.__call__).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert [(p.name, p.default) for p in ours[: len(stock)]] == [(p.name, p.default) for p in stock]
    new = [p.name for p in ours[len(stock) :] if p.kind != p.VAR_KEYWORD]
    added = ["callback_on_step_end", "callback_on_step_end_tensor_inputs"]  # ours adds them where stock lacks them
    lacks_callback = "step_end_callback" in h.case.not_applicable
    assert new == ["segmentor", "scfg_config", "goca_config", "return_maps", "caption", "rate_rule"] + (
        added if lacks_callback else []
    )
    assert h.pipe.components.keys() == h.stock.components.keys()
    assert h.case.pipeline._optional_components == h.case.stock._optional_components
    tensor_inputs = "_callback_tensor_inputs"  # PixArt: stock has none, ours its loop's tensors
    if lacks_callback:
        assert (
            getattr(h.case.stock, tensor_inputs, None) is None and "latents" in h.case.pipeline._callback_tensor_inputs
        )
    else:
        assert getattr(h.case.pipeline, tensor_inputs) == getattr(h.case.stock, tensor_inputs)


@segmentors
def test_batch_consistent_and_batch_equals_single(h, segmentor):
    """Prompts of unequal length (one truncated) in one batch; image 0 of the batch equals the single call's."""
    long = 100 * "very long "
    batch = h.run(segmentor, prompt=[PROMPT, PROMPT[: len(PROMPT) // 2], long], seeds=(0, 1, 2), output_type="latent")
    single = h.run(segmentor, prompt=PROMPT, seeds=(0,), output_type="latent")
    assert batch.images.shape[0] == 3
    first = SimpleNamespace(images=batch.images[:1], maps=segmentor and [_first_image(m) for m in batch.maps])
    assert_same_guidance(first, single, segmentor)  # the denoiser differs by ~1e-6 between batch sizes
    if segmentor is not None:
        tokens = batch.maps[0].tokens
        assert tokens[0] == single.maps[0].tokens[0] and tokens[2][-1] == h.case.eos  # truncated


def _first_image(m: SCFGStepMaps) -> SCFGStepMaps:
    return SCFGStepMaps(m.step, m.timestep, m.labels[:1], m.foreground[:1], m.rate[:1], m.tokens[:1])


@segmentors
def test_num_images_per_prompt(h, segmentor):
    for n_prompts, per_prompt in ((1, 2), (2, 2)):  # (n, 1) is the batch test above
        out = h.run(
            segmentor,
            prompt=PROMPTS[:n_prompts],
            seeds=range(n_prompts * per_prompt),
            num_images_per_prompt=per_prompt,
            output_type="latent",
        )
        assert out.images.shape[0] == n_prompts * per_prompt
        if segmentor is not None:  # one token row per image, each prompt's images together
            want = [[*h.case.bos, *h.pipe.tokenizer.tokenize(p)] for p in PROMPTS[:n_prompts]]
            want = [row for row in want for _ in range(per_prompt)]
            assert [t[: len(w)] for t, w in zip(out.maps[0].tokens, want)] == want


@segmentors
def test_height_width_and_given_latents(h, segmentor):
    """No size: the UNet's native one; a non-square size; `latents` given instead of drawn from the generator."""
    native = h.pipe.denoiser.config.sample_size
    out = h.run(segmentor, height=None, width=None, output_type="latent")
    assert out.images.shape[-2:] == (native, native) and native * h.pipe.vae_scale_factor > h.case.size
    size = dict(height=h.case.size, width=h.case.size * 3 // 2)
    drawn = h.run(segmentor, **size, output_type="latent")
    assert drawn.images.shape[-2:] == (
        size["height"] // h.pipe.vae_scale_factor,
        size["width"] // h.pipe.vae_scale_factor,
    )
    shape = (1, 4, size["height"] // h.pipe.vae_scale_factor, size["width"] // h.pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    given = h.run(segmentor, **size, latents=latents, seeds=None, output_type="latent")
    assert torch.equal(given.images, drawn.images)


@segmentors
def test_dict_and_tuple_outputs_equal(h, segmentor):
    as_dict = h.run(segmentor, output_type="latent")
    as_tuple = h.run(segmentor, output_type="latent", return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.images)
    if segmentor is not None:
        assert len(as_tuple[-1]) == len(as_dict.maps)
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(as_tuple[-1], as_dict.maps))


@pytest.fixture(scope="module")
def saved(h, tmp_path_factory):
    """The pipeline (optional components None) saved and loaded back, plainly and as variant "fp16"."""
    root = tmp_path_factory.mktemp(h.case.name)
    h.pipe.save_pretrained(root / "plain")
    h.pipe.save_pretrained(root / "variant", variant="fp16")  # file names only: still fp32 weights
    for sub in (root / "variant").iterdir():
        if sub.is_dir() and isinstance(h.components.get(sub.name), torch.nn.Module):
            assert any(".fp16." in f.name for f in sub.iterdir()), sub.name
    with pytest.raises(ValueError, match="variant=fp16"):
        h.case.pipeline.from_pretrained(root / "plain", variant="fp16")
    loaded = {
        "plain": h.case.pipeline.from_pretrained(root / "plain"),
        "variant": h.case.pipeline.from_pretrained(root / "variant", variant="fp16"),
    }
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.mark.parametrize(
    ("saved_as", "segmentor"),
    [("plain", None), ("plain", "goca"), ("plain", "scfg"), ("variant", None)],  # variants: file names, no maps
    ids=["plain-off", "plain-goca", "plain-scfg", "variant-off"],
)
def test_save_load_local_optional_components_variants(h, saved, saved_as, segmentor):
    loaded = saved[saved_as]
    assert type(loaded) is h.case.pipeline
    for name in h.case.pipeline._optional_components:  # what was None stays None
        if h.components.get(name) is None:
            assert getattr(loaded, name) is None, name
    for name, module in h.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            theirs = dict(getattr(loaded, name).named_parameters())
            assert theirs.keys() <= dict(module.named_parameters()).keys()
            assert all(torch.equal(p, theirs[k]) for k, p in module.named_parameters() if k in theirs), name
    # Off: exactly the stock pipeline over the loaded components (same instances). Against the pipeline that was
    # saved, only up to rounding: the reloaded weights are equal but are other buffers, and MKL may round by
    # buffer alignment.
    got = h.run(segmentor, pipe=loaded, stock=h.plain(loaded.components), output_type="latent")
    want = h.run(segmentor, output_type="latent")
    assert_same_guidance(got, want, segmentor)


@segmentors
def test_from_pipe_both_ways(h, segmentor):
    processors = {k: type(v) for k, v in h.denoiser(h.stock).attn_processors.items()}
    ours = h.case.pipeline.from_pipe(h.stock)
    ours.set_progress_bar_config(disable=True)
    assert type(ours) is h.case.pipeline
    assert all(ours.components[k] is v for k, v in h.stock.components.items())
    back = h.case.stock.from_pipe(ours)
    back.set_progress_bar_config(disable=True)
    assert type(back) is h.case.stock
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in h.stock.config.items() if not k.startswith("_")
    }
    got = h.run(segmentor, pipe=ours, stock=back, output_type="latent")
    if segmentor is not None:
        assert torch.equal(got.images, h.run(segmentor, output_type="latent").images)
    assert {k: type(v) for k, v in h.denoiser(h.stock).attn_processors.items()} == processors


@segmentors
def test_callback_tensor_inputs(h, segmentor):
    """A subset and all of `_callback_tensor_inputs` reach the callback; what it returns replaces the tensors."""
    h.require("step_end_callback")
    seen = []

    def subset(pipe, i, t, kwargs):
        seen.append(set(kwargs))
        return kwargs

    h.run(segmentor, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
    allowed = list(h.pipe._callback_tensor_inputs)
    h.run(segmentor, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=allowed, output_type="latent")
    n = len(h.pipe.scheduler.timesteps)
    stock_calls = n if segmentor is None else 0  # the stock pipeline ran the same callback in the `off` runs
    assert seen == [{"latents"}] * (n + stock_calls) + [set(allowed)] * (n + stock_calls)

    def zero_last(pipe, i, t, kwargs):
        if i == pipe.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = h.run(segmentor, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=allowed,
                output_type="latent")  # fmt: skip
    assert out.images.abs().sum() == 0


@segmentors
def test_callback_changes_guidance_scale(h, segmentor):
    """A callback raising `_guidance_scale` by 1 each step: the pipeline reads the new scale at every step."""
    h.require("step_end_callback")

    def louder(pipe, i, t, kwargs):
        pipe._guidance_scale += 1.0
        return kwargs

    out = h.run(segmentor, guidance_scale=2.0, callback_on_step_end=louder, output_type="latent")
    assert h.pipe.guidance_scale == 2.0 + h.pipe.num_timesteps
    if segmentor is not None:
        assert [r.guidance_scale for r in out.rates] == [2.0 + i for i in range(h.pipe.num_timesteps)]


@segmentors
def test_pipeline_callback_cfg_cutoff(h, segmentor):
    """diffusers' CFG-cutoff `PipelineCallback` drops the uncond half after step 1: segmentation stops there."""
    h.require("cfg_cutoff_callback")
    cutoff = h.case.cfg_cutoff(cutoff_step_ratio=None, cutoff_step_index=1)
    h.run(segmentor, num_inference_steps=3, callback_on_step_end=cutoff, output_type="latent", steps=2)


@segmentors
def test_interrupt(h, segmentor):
    """`pipe._interrupt = True` from a callback skips the remaining steps: the output is that step's latents."""
    h.require("interrupt")
    states = []

    def record(pipe, i, t, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    h.pipe(**h.inputs(num_inference_steps=3, output_type="latent"), segmentor=segmentor, callback_on_step_end=record)

    def interrupt(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    out = h.run(segmentor, num_inference_steps=3, callback_on_step_end=interrupt, output_type="latent", steps=2)
    assert torch.equal(out.images, states[1])


@segmentors
def test_attention_slicing(h, segmentor):
    """Sliced attention (slice sizes 1 and 2): the same guidance."""
    h.require("attention_slicing")
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    for size in (1, 2):
        ours.enable_attention_slicing(slice_size=size)  # the stock pipeline shares the UNet
        sliced = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
        assert_same_guidance(sliced, base, segmentor)


@segmentors
def test_default_attention_processor(h, segmentor):
    """The plain attention processor (`AttnProcessor`, as diffusers' own tests set): the same guidance."""
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    h.denoiser(ours).set_default_attn_processor()  # the stock pipeline shares the denoiser
    assert_same_guidance(h.run(segmentor, pipe=ours, stock=stock, output_type="latent"), base, segmentor)


@segmentors
def test_vae_slicing(h, segmentor):
    kw = dict(prompt=PROMPTS, seeds=(0, 1, 2))
    base = h.run(segmentor, **kw)
    h.pipe.vae.enable_slicing()
    try:
        sliced = h.run(segmentor, **kw)
    finally:
        h.pipe.vae.disable_slicing()
    torch.testing.assert_close(sliced.images, base.images, atol=3e-3, rtol=0)
    if segmentor is not None:
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(sliced.maps, base.maps))


@segmentors
def test_freeu(h, segmentor):
    h.require("freeu")
    base = h.run(segmentor, output_type="latent")
    h.pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        freeu = h.run(segmentor, output_type="latent")
    finally:
        h.pipe.disable_freeu()
    assert all(getattr(b, k) is None for b in h.pipe.unet.up_blocks for k in ("s1", "s2", "b1", "b2"))
    again = h.run(segmentor, output_type="latent")
    assert not torch.allclose(freeu.images, base.images, atol=1e-3) and torch.equal(again.images, base.images)


@segmentors
def test_fused_qkv_projections(h, segmentor):
    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    # the pipeline's switch where it has one (UNet and VAE), else the denoiser's, as diffusers' own PixArt test does
    fusing = ours if hasattr(ours, "fuse_qkv_projections") else h.denoiser(ours)
    fusing.fuse_qkv_projections()
    assert any("Fused" in type(p).__name__ for p in h.denoiser(ours).attn_processors.values())
    fused = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    fusing.unfuse_qkv_projections()
    unfused = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    assert_same_guidance(fused, base, segmentor)  # one fused matmul rounds differently
    assert torch.equal(unfused.images, base.images)


SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}


def _with_scheduler(h, name):
    cls, over = SCHEDULERS[name]
    scheduler = cls.from_config(h.components["scheduler"].config, **over)
    return h.ours(scheduler=scheduler), h.plain(scheduler=copy.deepcopy(scheduler))


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@segmentors
def test_schedulers(h, segmentor, scheduler):
    ours, stock = _with_scheduler(h, scheduler)
    out = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    assert out.images.shape == (1, 4, h.case.size // ours.vae_scale_factor, h.case.size // ours.vae_scale_factor)
    assert torch.isfinite(out.images).all()


@segmentors
def test_custom_timesteps_and_sigmas(h, segmentor):
    ours, stock = _with_scheduler(h, "euler")
    out = h.run(segmentor, pipe=ours, stock=stock, timesteps=[999, 499], output_type="latent")
    assert ours.scheduler.timesteps.tolist() == [999, 499]
    if segmentor is not None:
        assert [m.timestep for m in out.maps] == [999, 499]
    h.run(segmentor, pipe=ours, stock=stock, sigmas=[14.6, 2.0], output_type="latent")
    assert ours.scheduler.sigmas.tolist()[:2] == pytest.approx([14.6, 2.0])
    ours, stock = _with_scheduler(h, "ddim")  # no custom timesteps: the same error as the stock pipeline's
    with pytest.raises(ValueError, match="does not support custom timestep"):
        stock(**h.inputs(timesteps=[999, 499]))
    with pytest.raises(ValueError, match="does not support custom timestep"):
        ours(**h.inputs(timesteps=[999, 499]), segmentor=segmentor)


@segmentors
def test_prompt_embeds(h, segmentor):
    """`prompt_embeds`/`negative_prompt_embeds` give the images of the prompt text; goca takes the text as `caption`
    (one per prompt row) and then equals the prompt's call, maps and all; without it, one error naming `caption=`
    and only the segmentors this pipeline has."""
    negative = ["blurry", "dark"]
    with torch.no_grad():  # as in `__call__` (T5 rounds differently with autograd on)
        embeds = h.pipe.encode_prompt(
            prompt=PROMPTS[:2], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative,
        )  # fmt: skip
    embeds = dict(zip(h.case.embeds, embeds), negative_prompt=None)  # PixArt's default is "", not None
    if segmentor == "goca":
        with pytest.raises(ValueError, match="pass caption=") as err:
            h.pipe(**h.inputs(prompt=None, seeds=(0, 1), **embeds), segmentor=segmentor)
        assert ("'scfg'" in str(err.value)) == ("scfg" in h.case.segmentors)  # only what this pipeline can run
        with pytest.raises(ValueError, match="caption has 1 text"):
            h.pipe(**h.inputs(prompt=None, seeds=(0, 1), caption=PROMPTS[0], **embeds), segmentor=segmentor)
        embeds["caption"] = PROMPTS[:2]
    from_text = h.run(segmentor, prompt=PROMPTS[:2], negative_prompt=negative, seeds=(0, 1), output_type="latent")
    from_embeds = h.run(segmentor, prompt=None, seeds=(0, 1), output_type="latent", **embeds)
    assert torch.equal(from_embeds.images, from_text.images)  # one instance, the same shapes: exact
    for a, b in zip(from_embeds.maps or [], from_text.maps or []):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.rate, b.rate)
        assert a.tokens == (b.tokens if "caption" in embeds else None)  # scfg without a caption: no token names


@segmentors
def test_ip_adapter(h, segmentor):
    """A random IP-Adapter loaded through diffusers' loader acts (scale 1) and is inert at scale 0."""
    h.require("ip_adapter")
    from test_pipeline import _attach_random_ip_adapter

    ours, stock = h.fresh()
    base = h.run(segmentor, pipe=ours, stock=stock, output_type="latent")
    _attach_random_ip_adapter(ours.unet)
    image_embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))]  # [negative; positive]
    kw = dict(output_type="latent", ip_adapter_image_embeds=image_embeds)
    with_ip = h.run(segmentor, pipe=ours, stock=stock, **kw)
    ours.set_ip_adapter_scale(0.0)
    inert = h.run(segmentor, pipe=ours, stock=stock, **kw)
    assert (with_ip.images - base.images).abs().max() > 1e-4
    torch.testing.assert_close(inert.images, base.images, atol=1e-4, rtol=0)


@segmentors
def test_guidance_rescale(h, segmentor):
    h.require("guidance_rescale")
    rescaled = h.run(segmentor, guidance_rescale=0.7, output_type="latent")
    plain = h.pipe(**h.inputs(output_type="latent"), segmentor=segmentor).images
    assert not torch.equal(rescaled.images, plain)


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_no_cfg_segments_nothing(h, segmentor):
    """guidance_scale <= 1: no CFG, so nothing to segment; the stock pipeline's output and no maps."""
    out = h.pipe(**h.inputs(guidance_scale=1.0), segmentor=segmentor, return_maps=True)
    assert_same_images(out.images, h.stock(**h.inputs(guidance_scale=1.0)).images)
    assert out.maps == [] and out.rates is None


# ------------------------------------------------------------------------------ scenarios of some pipelines only


class _Calls:
    """Counts forward calls of modules (what ran before an error)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            self.counts[name] += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stock_supports(h, capability: str) -> bool:
    """Whether the stock diffusers pipeline has `capability`, read off its class, `__call__` and denoiser."""
    stock = h.case.stock
    params = inspect.signature(stock.__call__).parameters
    return {
        "step_end_callback": "callback_on_step_end" in params and hasattr(stock, "_callback_tensor_inputs"),
        "cfg_cutoff_callback": h.case.cfg_cutoff is not None,
        "interrupt": "self.interrupt" in inspect.getsource(stock.__call__),
        "attention_slicing": hasattr(h.denoiser(h.stock), "set_attention_slice"),
        "freeu": hasattr(stock, "enable_freeu"),
        "ip_adapter": hasattr(stock, "load_ip_adapter") and "ip_adapter_image_embeds" in params,
        "guidance_rescale": "guidance_rescale" in params,
        "resolution_binning": "use_resolution_binning" in params,
        "max_sequence_length": "max_sequence_length" in params,
        "clean_caption": "clean_caption" in params,
    }[capability]


def test_not_applicable_is_what_the_stock_pipeline_lacks(h):
    """Each capability a case marks not applicable is one its stock pipeline lacks, and every other one it has (the
    segmentors: test_unsupported_segmentors_raise)."""
    for capability in CAPABILITIES:
        if not capability.startswith("segmentor:"):
            assert _stock_supports(h, capability) == (capability not in h.case.not_applicable), capability


def test_unsupported_segmentors_raise(h):
    """A segmentor the pipeline does not define: a clear ValueError naming it; no denoiser call, no decoding."""
    unsupported = [s for s in SEGMENTORS if s is not None and s not in h.case.segmentors]
    if not unsupported:
        pytest.skip(f"{h.case.name} defines every segmentor")
    calls = _Calls({"denoiser": h.denoiser(h.pipe), "vae": h.pipe.vae})
    try:
        for segmentor in unsupported:
            with pytest.raises(ValueError, match=f"segmentor={segmentor!r} is defined for UNet denoisers only"):
                h.pipe(**h.inputs(), segmentor=segmentor)
    finally:
        calls.remove()
    assert calls.counts == {"denoiser": 0, "vae": 0}


def test_unsupported_segmentors_raise_before_any_work(h):
    """... and before the text encoder runs or the generator draws anything."""
    unsupported = [s for s in SEGMENTORS if s is not None and s not in h.case.segmentors]
    if not unsupported:
        pytest.skip(f"{h.case.name} defines every segmentor")
    calls = _Calls({"text_encoder": h.pipe.text_encoder})
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    try:
        with pytest.raises(ValueError, match="is defined for UNet denoisers only"):
            h.pipe(**h.inputs(seeds=None, generator=generator), segmentor=unsupported[0])
    finally:
        calls.remove()
    assert calls.counts == {"text_encoder": 0}, "the text encoder ran"
    assert torch.equal(generator.get_state(), state), "the generator drew"


@segmentors
def test_resolution_binning(h, segmentor):
    """`use_resolution_binning=True`: the latents at the nearest bin of the transformer's aspect-ratio table, the
    decoded image resized and cropped back to the size asked for; the maps at the binned latent size."""
    h.require("resolution_binning")
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    assert h.pipe.transformer.config.sample_size == 32  # 256 px: the 256 table
    size = dict(height=h.case.size, width=h.case.size * 3 // 2)
    binned = [int(x) for x in h.pipe.image_processor.classify_height_width_bin(**size, ratios=ASPECT_RATIO_256_BIN)]
    assert binned != [size["height"], size["width"]]
    hw = tuple(x // h.pipe.vae_scale_factor for x in binned)
    latents = h.run(segmentor, **size, use_resolution_binning=True, output_type="latent", latent_hw=hw)
    assert latents.images.shape[-2:] == hw
    image = h.run(segmentor, **size, use_resolution_binning=True, output_type="pt", latent_hw=hw)
    assert image.images.shape[-2:] == (size["height"], size["width"])
    unbinned = h.run(segmentor, **size, use_resolution_binning=False, output_type="pt")
    assert unbinned.images.shape == image.images.shape and not torch.allclose(unbinned.images, image.images)
    if segmentor is not None:
        assert all(torch.equal(a.rate, b.rate) for a, b in zip(latents.maps, image.maps))


@segmentors
def test_max_sequence_length(h, segmentor):
    """`max_sequence_length` truncates the prompt (the encoder's `</s>` last) and sets the token rows' length (its
    default, 300, as well: this prompt has 300 pieces)."""
    h.require("max_sequence_length")
    long = 100 * "very long "
    short = h.run(segmentor, prompt=[PROMPT, long], seeds=(0, 1), max_sequence_length=16, output_type="latent")
    default = h.run(segmentor, prompt=[PROMPT, long], seeds=(0, 1), output_type="latent")
    assert not torch.equal(short.images[1], default.images[1])
    if segmentor is not None:
        words = h.pipe.tokenizer.tokenize(long)
        assert short.maps[0].tokens[1] == [*words[:15], h.case.eos]
        assert len(words) >= 300 and default.maps[0].tokens[1] == [*words[:299], h.case.eos]


@segmentors
def test_clean_caption(h, segmentor):
    """`clean_caption=True` (PixArt's default): the encoder sees the cleaned, lower-cased text, and the maps name
    its tokens (without bs4 installed diffusers warns and only lower-cases, for the embeddings and the maps
    alike)."""
    h.require("clean_caption")
    from diffusers.utils import is_bs4_available, is_ftfy_available

    prompt = "A FOX   reading #news at http://example.com"
    out = h.run(segmentor, prompt=prompt, clean_caption=True, output_type="latent")
    raw = h.run(segmentor, prompt=prompt, clean_caption=False, output_type="latent")
    seen = h.pipe._text_preprocessing(prompt, clean_caption=True)[0]
    assert seen != prompt
    if segmentor is not None:  # by id: pieces out of the vocabulary are `<unk>`
        tokens = h.pipe.tokenizer.convert_ids_to_tokens(h.pipe.tokenizer(seen).input_ids)
        assert tokens[-1] == h.case.eos and out.maps[0].tokens[0][: len(tokens)] == tokens
        cleaning = is_bs4_available() and is_ftfy_available()  # else both only lower-case
        assert (raw.maps[0].tokens[0] != out.maps[0].tokens[0]) == cleaning


@segmentors
def test_legacy_callback(h, segmentor):
    """The older `callback(step, t, latents)` every `callback_steps` steps (PixArt's only callback; deprecated in
    the Stable Diffusion pipelines): the same calls as the stock pipeline's, the last one with the output."""
    calls = []

    def record(step, t, latents):
        calls.append((step, int(t), latents.clone()))

    out = h.run(segmentor, num_inference_steps=3, callback=record, callback_steps=2, output_type="latent")
    timesteps = [int(t) for t in h.pipe.scheduler.timesteps]
    ours = calls[:2]
    assert [(step, t) for step, t, _ in ours] == [(0, timesteps[0]), (2, timesteps[2])]
    assert torch.equal(ours[-1][2], out.images)
    if segmentor is None:  # then the stock pipeline ran the same callback
        assert len(calls) == 4 and all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(ours, calls[2:]))
    with pytest.raises(ValueError, match="callback_steps"):
        h.pipe(**h.inputs(), callback=record, callback_steps=0, segmentor=segmentor)


def test_goca_vanilla_config(h):
    """GoCA with the authors' vanilla configuration (average heads and layers, no rescaling) segments too."""
    vanilla = h.run("goca", goca_config=GoCAConfig.vanilla(), output_type="latent")
    plain = h.pipe(**h.inputs(output_type="latent"), segmentor=None).images
    default = h.run("goca", output_type="latent")
    assert (vanilla.images - plain).abs().max() > 1e-2
    assert any(not torch.equal(a.labels, b.labels) for a, b in zip(vanilla.maps, default.maps))


@segmentors
def test_save_load_without_optional_components(h, segmentor, tmp_path):
    """Optional components set to None (PixArt: tokenizer and text encoder) stay None through save/load; the
    loaded pipeline generates from prompt embeddings, several images each, as before saving; goca needs the text."""
    optional = [n for n in h.case.pipeline._optional_components if h.components.get(n) is not None]
    if not optional:
        pytest.skip(f"{h.case.name}: its optional components are None in the dummy already (test_save_load_...)")
    with torch.no_grad():
        embeds = dict(zip(h.case.embeds, h.pipe.encode_prompt(PROMPT, device="cpu")), negative_prompt=None)
    kw = dict(prompt=None, seeds=(0, 1), num_images_per_prompt=2, output_type="latent", **embeds)
    ours, stock = h.ours(**dict.fromkeys(optional)), h.plain(**dict.fromkeys(optional))
    ours.save_pretrained(tmp_path)
    loaded = h.case.pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert all(getattr(loaded, name) is None for name in optional)
    if segmentor == "goca":  # no prompt and no tokenizer: nothing can name the regions
        with pytest.raises(ValueError, match="pass caption="):
            loaded(**h.inputs(**kw), segmentor=segmentor)
        with pytest.raises(ValueError, match="needs the pipeline's tokenizer"):
            loaded(**h.inputs(**kw, caption=PROMPT), segmentor=segmentor)
        return
    got = h.run(segmentor, pipe=loaded, stock=h.plain(loaded.components), **kw)  # off: exact, same instances
    assert_same_guidance(got, h.run(segmentor, pipe=ours, stock=stock, **kw), segmentor)  # reloaded: other buffers
    assert got.images.shape[0] == 2


def test_goca_pixart_without_preset():
    """diffusers' own 2-block PixArt dummy: not PixArt-Sigma's 28 blocks, so no GoCA preset; the transformer rule
    (algorithm.md §8.4) picks its layers, so the default GoCA and `GoCAConfig.vanilla()` run without configuration
    (dense block 0, both blocks' cross and self maps, order 5) and an explicit `dense_layer` still wins."""
    from goca_scfg.layout import ModelLayout
    from goca_scfg.segment.goca import goca_layers

    components = pixart_two_block_components()
    pipe, stock = PixArtSigmaSCFGPipeline(**components), PixArtSigmaPipeline(**components)
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=5.0, use_resolution_binning=False,
              clean_caption=False, output_type="latent")  # fmt: skip
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0), segmentor=None).images
    assert torch.equal(plain, stock(**kw, generator=torch.Generator().manual_seed(0)).images)
    layout = ModelLayout.of(pipe.transformer)
    assert goca_layers(layout, GoCAConfig()).rule == "rule for a 2-block transformer (algorithm.md §8.4)"
    outs = {}
    for name, config in [
        ("default", None),
        ("vanilla", GoCAConfig.vanilla()),
        ("dense 1", GoCAConfig(dense_layer="transformer_blocks.1")),
    ]:
        out = pipe(
            **kw, generator=torch.Generator().manual_seed(0), segmentor="goca", goca_config=config, return_maps=True
        )
        check_maps(pipe, out.maps, 1, plain.shape[-2:], 300)
        assert (out.images - plain).abs().max() > 1e-3, name
        outs[name] = out.images
    assert goca_layers(layout, GoCAConfig(dense_layer="transformer_blocks.1")).dense.block == "transformer_blocks.1"
    assert not torch.equal(outs["dense 1"], outs["default"])  # the reference query changes the layer weights
