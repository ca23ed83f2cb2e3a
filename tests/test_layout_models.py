"""The model layout and the segmentors' layer rules on published architectures (built on the meta device: no
weights, no download) and on diffusers' own test UNet: the authors' layer lists exactly, a stated rule elsewhere."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from goca_scfg import GoCAConfig, ModelLayout, SCFGConfig
from goca_scfg.segment.goca import goca_layers
from goca_scfg.segment.scfg import scfg_layers
from goca_scfg.testing import _SD15, _SDXL, _SDXL_UNET_LAYOUT, _UNET_LAYOUT, DIFFUSERS_TEST_UNET


def _meta_layout(**config) -> ModelLayout:
    with torch.device("meta"):
        return ModelLayout.of(UNet2DConditionModel(**config))


def _blocks(layers):
    return [x.block for x in layers]


def test_sd15_resolves_to_the_authors_layers():
    layout = _meta_layout(**_UNET_LAYOUT, **_SD15[0])
    goca = goca_layers(layout, GoCAConfig())
    assert len(goca.cross) == 16 and goca.order == 2 and goca.factor == 1
    assert goca.describe().startswith("SD v1.5 rules (algorithm.md §8.2): cross all 16; dense up_blocks.2.")
    assert goca.dense.name == "up_blocks.2.attentions.1.transformer_blocks.0.attn2"  # cfg15 ref layer
    assert _blocks(goca.propagation) == [  # call order; cfg15 lists the up blocks first
        "down_blocks.0.attentions.1.transformer_blocks.0",
        "up_blocks.3.attentions.0.transformer_blocks.0",
        "up_blocks.3.attentions.1.transformer_blocks.0",
    ]
    scfg = scfg_layers(layout, SCFGConfig().ratios)  # official: latent/4 (5 blocks) then latent/8 (mid)
    assert [c.module for _, c in scfg] == [
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "mid_block.attentions.0",
    ]
    assert all(s.block == c.block and s.kind == "self" for s, c in scfg)


def test_sdxl_resolves_to_the_authors_layers():
    layout = _meta_layout(**_SDXL_UNET_LAYOUT, **_SDXL[0])
    goca = goca_layers(layout, GoCAConfig())
    assert len(goca.cross) == 70 and goca.order == 2 and goca.factor == 2  # config_model_xl.py: all 70
    assert goca.describe().startswith("preset sdxl: cross all 70; dense up_blocks.1.attentions.0.")
    assert goca.dense.name == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert sorted(_blocks(goca.propagation)) == sorted(
        [f"up_blocks.1.attentions.{m}.transformer_blocks.{b}" for m, b in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]]
        + [f"down_blocks.1.attentions.0.transformer_blocks.{b}" for b in (0, 1)]
    )
    scfg = scfg_layers(layout, SCFGConfig().ratios)  # §8.1: latent/4 only, first block of each module
    assert [c.block for _, c in scfg] == [
        f"{m}.transformer_blocks.0"
        for m in [
            "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.1",
            "mid_block.attentions.0",
            "up_blocks.0.attentions.0",
            "up_blocks.0.attentions.1",
            "up_blocks.0.attentions.2",
        ]
    ]


def test_diffusers_test_unet_gets_the_documented_rules():
    layout = _meta_layout(**DIFFUSERS_TEST_UNET)
    goca = goca_layers(layout, GoCAConfig())
    assert goca.factor == 2 and goca.dense.block == "up_blocks.0.attentions.1.transformer_blocks.0"
    assert _blocks(goca.propagation) == [
        "down_blocks.1.attentions.1.transformer_blocks.0",
        "up_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.1.transformer_blocks.0",
    ]
    assert {c.factor for _, c in scfg_layers(layout, (4, 8))} == {2}  # the closest grid to 4 and 8


def test_explicit_names_win_and_bad_names_say_what_exists():
    layout = _meta_layout(**_UNET_LAYOUT, **_SD15[0])
    cfg = GoCAConfig(cross_layers=("up_blocks.3",), dense_layer="up_blocks.2.attentions.0", propagation_order=0)
    goca = goca_layers(layout, cfg)
    assert len(goca.cross) == 3 and goca.dense.module == "up_blocks.2.attentions.0" and goca.propagation == []
    described = "(3 of 16) (config); dense up_blocks.2.attentions.0.transformer_blocks.0 (config); no propagation"
    assert described + " (config); segmentation at latent/1" in goca.describe()
    with pytest.raises(ValueError, match="available modules: .*up_blocks.3.attentions.2"):
        goca_layers(layout, GoCAConfig(self_layers=("up_blocks.9",)))
    with pytest.raises(ValueError, match="share one grid"):
        goca_layers(layout, GoCAConfig(self_layers=("up_blocks.3", "up_blocks.2")))


def test_compiled_unet_has_the_same_layout():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**DIFFUSERS_TEST_UNET)
    assert ModelLayout.of(torch.compile(unet)) == ModelLayout.of(unet)
