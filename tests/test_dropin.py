"""What diffusers users do keeps working while segmenting: torch.compile'd UNets, step-end callbacks that change the
guidance scale, multi-vector textual inversion, and a warning where nothing can be segmented."""

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel

from goca_scfg import StableDiffusionSCFGPipeline
from goca_scfg.testing import _TINY, _UNET_LAYOUT, sharpened, tiny_components

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

PROMPTS = ["a red dog on a green sofa", "two cats, sleeping."]


def _pipe(components=None):
    pipe = StableDiffusionSCFGPipeline(**(components or tiny_components()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(**over):
    kw = dict(num_inference_steps=2, height=128, width=128, guidance_scale=7.5, output_type="latent")
    kw.update(over)
    return kw


def _gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile"])  # `unet.compile()` keeps the names: the same path, checked by hand
def test_compiled_unet_segments_like_the_plain_one(how):
    """GoCA (the segmentor with the most hooks: q/k/o of every layer) through a compiled UNet; eager backend, so
    the test checks dynamo tracing the capture hooks and the wrapped names, not inductor's kernels. Compiled and eager
    may round differently, so the model is sharpened (labels that rounding cannot flip)."""
    pipe = _pipe(sharpened(tiny_components()))
    kw = _kwargs(num_inference_steps=1, height=64, width=64)
    expected = pipe(PROMPTS[0], generator=_gens(1), return_maps=True, **kw)
    torch._dynamo.reset()
    if how == "torch.compile":
        pipe.unet = torch.compile(pipe.unet, backend="eager")  # names gain `_orig_mod.`; dynamo traces the hooks
    else:
        pipe.unet.compile(backend="eager")
    got = pipe(PROMPTS[0], generator=_gens(1), return_maps=True, **kw)
    assert len(got.maps) == len(expected.maps) >= 1
    for a, b in zip(got.maps, expected.maps):
        assert (a.labels == b.labels).float().mean() >= 0.99
        assert (a.foreground == b.foreground).float().mean() >= 0.99
    torch.testing.assert_close(got.images, expected.images, atol=1e-3, rtol=0)


def test_callback_changing_the_guidance_scale_is_applied_by_the_rate():
    """w set to 20 after step 0: from step 1 on the rate is min(clamp(r, 0.8, 3), 15/w) = 0.75 everywhere."""

    def raise_w(pipe, i, t, kwargs):
        if i == 0:
            pipe._guidance_scale = 20.0
        return {}

    pipe = _pipe()
    kw = _kwargs(num_inference_steps=3)
    base = pipe(PROMPTS, generator=_gens(2), return_maps=True, **kw)
    out = pipe(PROMPTS, generator=_gens(2), return_maps=True, callback_on_step_end=raise_w, **kw)
    assert [r.guidance_scale for r in out.rates] == [7.5] + [20.0] * (len(out.rates) - 1)
    assert torch.equal(out.maps[0].rate, base.maps[0].rate)
    for m in out.maps[1:]:
        torch.testing.assert_close(m.rate, torch.full_like(m.rate, 0.75), atol=1e-6, rtol=0)
    assert (out.images - base.images).abs().max() > 1e-3


def test_multi_vector_textual_inversion_tokens_line_up():
    pipe = _pipe()
    pipe.load_textual_inversion(
        {"<toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, token="<toy>"
    )
    out = pipe("a <toy> on a sofa", generator=_gens(1), return_maps=True, **_kwargs())
    tokens = out.maps[0].tokens[0]
    assert tokens[:8] == [
        "<|startoftext|>",
        "a</w>",
        "<toy>",
        "<toy>_1",
        "on</w>",
        "a</w>",
        "sofa</w>",
        "<|endoftext|>",
    ]
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <toy> on a sofa", pipe.tokenizer)).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids) == tokens[: len(ids)]  # the ids the text encoder embedded
    assert int(out.maps[-1].labels.max()) <= 6  # regions: <sos> or one of the six caption tokens


def test_warns_when_nothing_can_be_segmented(caplog):
    components = tiny_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**_UNET_LAYOUT, **_TINY[0], time_cond_proj_dim=32).eval()
    with caplog.at_level(logging.WARNING, logger="goca_scfg"):
        out = _pipe(components)(PROMPTS[0], generator=_gens(1), return_maps=True, **_kwargs())
    assert out.maps == [] and out.rates is None
    assert "guidance-embedding denoiser" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="goca_scfg"):
        _pipe()(PROMPTS[0], generator=_gens(1), **_kwargs(guidance_scale=1.0))
    assert "classifier-free guidance is off (guidance_scale=1.0" in caplog.text


def _tiny(family: str):
    from goca_scfg.testing import tiny_pipeline, tiny_pixart_pipeline, tiny_xl_pipeline

    if family == "pixart":
        return tiny_pixart_pipeline(), dict(clean_caption=False, height=256, width=256)
    return (tiny_pipeline(scheduler="dpm++") if family == "sd" else tiny_xl_pipeline(scheduler="dpm++")), {}


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart"])
def test_explicit_timesteps_without_num_inference_steps(family):
    """`num_inference_steps=None` with `timesteps=` (an Align-Your-Steps-style schedule) and a DPM-Solver++
    scheduler, as the stock pipelines take it: every one of the 4 steps is segmented."""
    pipe, extra = _tiny(family)
    kw = _kwargs(num_inference_steps=None, timesteps=[999, 845, 500, 100], return_maps=True, **extra)
    out = pipe(PROMPTS[0], generator=_gens(1), **kw)
    assert [m.timestep for m in out.maps] == [999, 845, 500, 100]
    with pytest.raises(ValueError, match="num_inference_steps must be an int"):
        pipe(PROMPTS[0], **_kwargs(num_inference_steps=None, **extra))  # nor a schedule: refused before any work


def test_caption_names_the_regions_of_prompt_embeds():
    """GoCA from `prompt_embeds` (prompt weighting, compel): `caption=` names the regions, and the call equals the
    one with the prompt text, bit for bit (one instance, the same shapes), tokens in the maps."""
    pipe = _pipe()
    text, negative = "a cat on the grass", "blurry"
    pe, npe = pipe.encode_prompt(text, "cpu", 1, True, negative)
    from_embeds = pipe(
        prompt_embeds=pe, negative_prompt_embeds=npe, caption=text, generator=_gens(1), return_maps=True, **_kwargs()
    )
    from_text = pipe(text, negative_prompt=negative, generator=_gens(1), return_maps=True, **_kwargs())
    assert torch.equal(from_embeds.images, from_text.images)
    assert from_embeds.maps[0].tokens == from_text.maps[0].tokens and from_text.maps[0].tokens[0][1] == "a</w>"
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(from_embeds.maps, from_text.maps))
    with pytest.raises(ValueError, match="caption= is for calls with prompt_embeds"):
        pipe(text, caption=text, **_kwargs())
    with pytest.raises(TypeError, match="caption must be a str or a list of str"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=npe, caption=3, **_kwargs())


def _cfg_off_after_step_1(pipe, i, t, kwargs):
    """diffusers' dynamic-CFG pattern for any batch: w := 0 and only the cond half of the embeddings from now on."""
    if i == 1:
        pipe._guidance_scale = 0.0
        for name, x in kwargs.items():
            if name != "latents":
                kwargs[name] = x.chunk(2)[-1]
    return kwargs


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_callback_switching_cfg_off_stops_segmentation(family, segmentor):
    """A step-end callback that turns CFG off (w <= 1, embeddings sliced) ends segmentation at that step, with no
    error: maps and rates for steps 0 and 1 only; the same with diffusers' own CFG-cutoff callback."""
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    pipe, _ = _tiny(family)
    inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"] if family == "sdxl" else ["prompt_embeds"]
    kw = _kwargs(num_inference_steps=4, segmentor=segmentor, return_maps=True)
    out = pipe(PROMPTS, generator=_gens(2), callback_on_step_end=_cfg_off_after_step_1,
               callback_on_step_end_tensor_inputs=["latents", *inputs], **kw)  # fmt: skip
    assert [m.step for m in out.maps] == [0, 1] and len(out.rates) == 2 and torch.isfinite(out.images).all()
    cutoff = (SDXLCFGCutoffCallback if family == "sdxl" else SDCFGCutoffCallback)(
        cutoff_step_ratio=None, cutoff_step_index=1
    )
    out = pipe(PROMPTS[0], generator=_gens(1), callback_on_step_end=cutoff, **kw)  # its slicing assumes one prompt
    assert [m.step for m in out.maps] == [0, 1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_callback_setting_a_non_finite_guidance_scale_is_refused(bad):
    def breaks(pipe, i, t, kwargs):
        pipe._guidance_scale = bad
        return kwargs

    with pytest.raises(ValueError, match=f"guidance_scale became {bad} during the call"):
        _pipe()(PROMPTS[0], generator=_gens(1), callback_on_step_end=breaks, **_kwargs())
