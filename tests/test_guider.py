"""`SCFGGuidance` in diffusers' modular SDXL pipeline (each CFG branch its own UNet call): it segments every step
like `StableDiffusionXLSCFGPipeline` (one batched call), is `ClassifierFreeGuidance` with `segmentor=None`, and
saves and loads like diffusers' own guiders."""

import pytest
import torch
from diffusers import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
from test_conformance import sdxl_dummy_components

from goca_scfg import StableDiffusionXLSCFGPipeline
from goca_scfg.guider import SCFGGuidance

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

PROMPT = "a watercolour fox reading a newspaper"
PROMPTS = [PROMPT, "two red apples on a wooden table"]


@pytest.fixture(scope="module")
def components():
    """diffusers' SDXL fast-test components, attention sharpened (labels that rounding cannot flip)."""
    return sdxl_dummy_components()


@pytest.fixture(scope="module")
def modular(components):
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{k: v for k, v in components.items() if k not in ("add_watermarker",)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, guider, prompt=PROMPT, seeds=(0,), **kw):
    pipe.update_components(guider=guider)
    generator = (
        [torch.Generator().manual_seed(s) for s in seeds]
        if len(seeds) > 1
        else torch.Generator().manual_seed(seeds[0])
    )
    return pipe(prompt=prompt, num_inference_steps=3, height=64, width=64, generator=generator, output="images",
                output_type="pt", **kw)  # fmt: skip


def test_off_is_classifier_free_guidance(modular):
    """`segmentor=None`: the same images as diffusers' `ClassifierFreeGuidance`, bit for bit (one instance)."""
    plain = _run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    off = _run(modular, SCFGGuidance(guidance_scale=5.0, segmentor=None))
    assert torch.equal(off, plain)


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_segments_every_step_like_the_pipeline(modular, components, segmentor):
    """Maps at every step, as the pipeline class returns them. Branches as separate UNet calls here, batched there:
    equal up to rounding: step-0 labels on >= 98 % of pixels (here all of them), mean |Δpixel| <= 2e-3."""
    guider = SCFGGuidance(guidance_scale=5.0, segmentor=segmentor, return_maps=True, caption=PROMPT)
    images = _run(modular, guider)
    pipe = StableDiffusionXLSCFGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0),
               guidance_scale=5.0, segmentor=segmentor, return_maps=True, output_type="pt")  # fmt: skip
    assert [m.step for m in guider.maps] == [m.step for m in ref.maps] == [0, 1, 2]
    assert [m.timestep for m in guider.maps] == [m.timestep for m in ref.maps]
    assert guider.maps[0].labels.shape == ref.maps[0].labels.shape
    assert (guider.maps[0].labels == ref.maps[0].labels).float().mean() >= 0.98
    assert guider.maps[0].tokens == ref.maps[0].tokens
    assert (images - ref.images).abs().mean() <= 2e-3
    plain = _run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    assert (images - plain).abs().mean() > 1e-3  # the segmentation acted
    assert [r.step for r in guider.rates] == [0, 1, 2]


def test_batch_and_reuse(modular):
    """Two prompts with two images each (one caption per prompt); a second call starts new maps."""
    guider = SCFGGuidance(guidance_scale=5.0, return_maps=True, caption=PROMPTS)
    images = _run(modular, guider, prompt=PROMPTS, seeds=(0, 1, 2, 3), num_images_per_prompt=2)
    assert images.shape[0] == 4 and len(guider.maps) == 3
    tokens = guider.maps[0].tokens
    assert tokens[0] == tokens[1] != tokens[2] == tokens[3] and guider.maps[0].labels.shape[0] == 4
    _run(modular, guider, prompt=PROMPTS, seeds=(0, 1))
    assert len(guider.maps) == 3 and guider.maps[0].labels.shape[0] == 2
    with pytest.raises(ValueError, match="caption has 2 text"):  # one prompt, two captions
        _run(modular, guider)


def test_window_and_scale_one(modular):
    """`stop=0.5` segments the first of three steps only (then plain cond prediction, as diffusers' CFG); w = 1
    segments nothing."""
    guider = SCFGGuidance(guidance_scale=5.0, return_maps=True, caption=PROMPT, stop=0.5)
    _run(modular, guider)
    assert [m.step for m in guider.maps] == [0]
    guider = SCFGGuidance(guidance_scale=1.0, return_maps=True, caption=PROMPT)
    _run(modular, guider)
    assert guider.maps == [] and guider.rates == []


def test_goca_without_caption_says_so(modular):
    with pytest.raises(ValueError, match="pass caption="):
        _run(modular, SCFGGuidance(guidance_scale=5.0, segmentor="goca"))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modular.unet.modules())  # cleaned up


def test_saves_and_loads_like_diffusers_guiders(tmp_path):
    from goca_scfg import GoCAConfig, SCFGConfig
    from goca_scfg.guidance import SCFGRate

    guider = SCFGGuidance(guidance_scale=4.0, segmentor="scfg", scfg_config=SCFGConfig.paper(),
                          goca_config=GoCAConfig.vanilla(), return_maps=True, caption=PROMPTS, stop=0.8)  # fmt: skip
    guider.save_pretrained(tmp_path)
    loaded = SCFGGuidance.from_pretrained(tmp_path)
    assert loaded.config == guider.config
    assert loaded.scfg_config == SCFGConfig.paper() and loaded.goca_config == GoCAConfig.vanilla()
    assert loaded.segmentor.name == "scfg" and loaded.caption == PROMPTS and loaded._stop == 0.8
    assert loaded.rate_rule == guider.rate_rule
    assert type(guider.new(guidance_scale=2.0)) is SCFGGuidance
    rule = SCFGRate(rate_max=2.0, smooth=False)
    SCFGGuidance(rate_rule=rule).save_pretrained(tmp_path / "rule")
    assert SCFGGuidance.from_pretrained(tmp_path / "rule").rate_rule == rule
    with pytest.raises(ValueError, match="unknown segmentor"):
        SCFGGuidance(segmentor="sfcg")
    with pytest.raises(TypeError, match="caption must be"):
        SCFGGuidance(caption=3)


def test_a_failing_denoiser_call_leaves_no_hooks(modular):
    """The modular loop has no `finally`: the guider's hooks go with the failing call itself."""

    def fail(*_):
        raise RuntimeError("stop here")

    handle = modular.unet.mid_block.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            _run(modular, SCFGGuidance(guidance_scale=5.0, caption=PROMPT))
    finally:
        handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modular.unet.modules())
    guider = SCFGGuidance(guidance_scale=5.0, caption=PROMPT, return_maps=True)
    _run(modular, guider)  # the UNet is free for the next capture
    assert len(guider.maps) == 3
