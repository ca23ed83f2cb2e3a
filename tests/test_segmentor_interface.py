"""A segmentor written outside the package runs through the pipelines; both built-in segmentors run on diffusers'
own test UNet (cross-attention only at latent/2)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from goca_scfg import CapturePlan, SegmentationContext, Segmentor, StableDiffusionSCFGPipeline
from goca_scfg.capture import HEAD_MEAN
from goca_scfg.ops import grid_shape, resize_nearest, split_cfg, to_grid
from goca_scfg.testing import DIFFUSERS_TEST_UNET, tiny_components, tiny_xl_pipeline

PROMPTS = ["a red dog on a green sofa", "two cats, sleeping."]


class CoarsestCrossArgmax(Segmentor):
    """A third party's segmentor: regions = argmax of the cond head-mean map of the coarsest cross layer; all
    foreground. Keeps what it returned so the test can compare it with the pipeline's maps."""

    name = "coarsest-argmax"

    def __init__(self):
        self.returned = []

    def start(self, context: SegmentationContext) -> CapturePlan:
        cross = context.layout.of_kind("cross")
        self.layer = max(cross, key=lambda x: x.factor).name
        self.latent_hw = context.latent_hw
        self.returned = []
        self.plan = CapturePlan({self.layer: {"q", "k"}}, {self.layer: HEAD_MEAN})
        return self.plan

    def segment(self, step, record):
        _, cond = split_cfg(self.reduced(record, self.layer))  # (B, N, T)
        grid = to_grid(cond, grid_shape(cond.shape[1], self.latent_hw))
        masks = (grid == grid.amax(dim=1, keepdim=True)).float()
        masks = resize_nearest(masks, self.latent_hw)
        self.returned.append(masks)
        return masks, torch.ones_like(masks[:, :1])


@pytest.mark.parametrize("make", ["sd", "sdxl"])
def test_external_segmentor_runs_through_the_pipelines(make):
    if make == "sd":
        pipe = StableDiffusionSCFGPipeline(**tiny_components())
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = tiny_xl_pipeline()
    seg = CoarsestCrossArgmax()
    kw = dict(num_inference_steps=2, height=128, width=128, guidance_scale=5.0, output_type="latent")
    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), segmentor=seg, return_maps=True, **kw)
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), segmentor=None, **kw)
    assert seg.returned == []  # the pipeline worked on a copy: the caller's instance holds no call state
    assert len(out.maps) == len(pipe.scheduler.timesteps) and (out.images - plain.images).abs().max() > 1e-4
    assert out.maps[0].labels.shape == (2, 16, 16) and out.maps[0].foreground.all()


@pytest.mark.parametrize("segmentor", ["goca", "scfg"])
def test_builtin_segmentors_on_diffusers_test_unet(segmentor):
    components = tiny_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**DIFFUSERS_TEST_UNET).eval()
    pipe = StableDiffusionSCFGPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=64, width=64, guidance_scale=6.0, output_type="latent")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(PROMPTS, generator=gens, segmentor=segmentor, return_maps=True, **kw)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    plain = pipe(PROMPTS, generator=gens, segmentor=None, **kw)
    assert len(out.maps) == len(pipe.scheduler.timesteps) and out.maps[-1].labels.shape == (2, 8, 8)
    assert (out.images - plain.images).abs().max() > 1e-4
