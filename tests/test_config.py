"""Config fields and pipeline-call inputs are typed and ranged: a bad value raises, naming the field or argument."""

import math

import pytest

from goca_scfg.checks import check_call_inputs
from goca_scfg.config import GoCAConfig, SCFGConfig
from goca_scfg.guidance import SCFGRate

BAD_SCFG = [
    ({"norm_eps": 0}, ValueError),
    ({"norm_eps": math.inf}, ValueError),
    ({"smooth_maps": 0}, TypeError),
    ({"ssgc": "power"}, ValueError),
    ({"ssgc": ["official"]}, ValueError),
    ({"ratios": ()}, TypeError),
    ({"ratios": 4}, TypeError),
    ({"ratios": (4.0, 8)}, TypeError),
    ({"ratios": (True, 8)}, TypeError),
    ({"ratios": (4, 6)}, ValueError),
    ({"ratios": (0, 8)}, ValueError),
    ({"ratios": (8, 4)}, ValueError),
    ({"ratios": (4, 4)}, ValueError),
]

BAD_RATE = [
    ({"rate_min": 0.0}, ValueError),
    ({"rate_min": -1}, ValueError),
    ({"rate_min": math.nan}, ValueError),
    ({"rate_max": math.inf}, ValueError),
    ({"rate_max": "3"}, TypeError),
    ({"rate_max": True}, TypeError),
    ({"cap_numerator": 0}, ValueError),
    ({"cap_numerator": math.nan}, ValueError),
    ({"region_eps": 0.0}, ValueError),
    ({"region_eps": -1e-8}, ValueError),
    ({"rate_min": 3.5}, ValueError),  # above rate_max
    ({"smooth": 1}, TypeError),
    ({"smooth": "yes"}, TypeError),
]

BAD_GOCA = [
    ({"head": "dot-product"}, ValueError),
    ({"layer": None}, ValueError),
    ({"rescale": 1}, ValueError),
    ({"tokens": "all"}, ValueError),
    ({"propagation_order": 2.0}, TypeError),
    ({"propagation_order": True}, TypeError),
    ({"propagation_order": -1}, ValueError),
    ({"dense_layer": ""}, ValueError),
    ({"dense_layer": 3}, TypeError),
    ({"self_layers": "up_blocks.3.attentions.0"}, TypeError),
    ({"self_layers": ("up_blocks.3.attentions.0", "")}, ValueError),
    ({"self_layers": (1,)}, TypeError),
    ({"self_layers": ()}, ValueError),
    ({"cross_layers": "down_blocks.0"}, TypeError),
    ({"cross_layers": ()}, ValueError),
    ({"cross_layers": (None,)}, TypeError),
    ({"blur_kernel": 4}, ValueError),
    ({"blur_kernel": 0}, ValueError),
    ({"blur_kernel": 5.0}, TypeError),
    ({"blur_sigma": 0}, ValueError),
    ({"blur_sigma": -1.1}, ValueError),
    ({"blur_sigma": math.nan}, ValueError),
    ({"fg_threshold": 5}, ValueError),
    ({"fg_threshold": 0.0}, ValueError),
    ({"fg_threshold": 1.0}, ValueError),
    ({"fg_threshold": math.nan}, ValueError),
    ({"eps": -1}, ValueError),
    ({"eps": 0.0}, ValueError),
    ({"eps": math.inf}, ValueError),
    ({"eps": None}, TypeError),
    ({"layer_refresh": 0}, ValueError),
    ({"layer_refresh": 1.5}, TypeError),
    ({"layer_query_stride": 0}, ValueError),
    ({"layer_query_stride": False}, TypeError),
]


def _field(kwargs):
    return next(iter(kwargs))


@pytest.mark.parametrize(("kwargs", "error"), BAD_SCFG, ids=[repr(k) for k, _ in BAD_SCFG])
def test_scfg_config_refuses_bad_field(kwargs, error):
    with pytest.raises(error, match=rf"SCFGConfig\.{_field(kwargs)}"):
        SCFGConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "error"), BAD_RATE, ids=[repr(k) for k, _ in BAD_RATE])
def test_rate_rule_refuses_bad_field(kwargs, error):
    with pytest.raises(error, match=rf"SCFGRate\.{_field(kwargs)}"):
        SCFGRate(**kwargs)


@pytest.mark.parametrize(("kwargs", "error"), BAD_GOCA, ids=[repr(k) for k, _ in BAD_GOCA])
def test_goca_config_refuses_bad_field(kwargs, error):
    with pytest.raises(error, match=rf"GoCAConfig\.{_field(kwargs)}"):
        GoCAConfig(**kwargs)


def test_good_values_are_accepted_and_normalised():
    assert SCFGRate(rate_min=1, rate_max=3, cap_numerator=15).rate_max == 3
    assert SCFGConfig(ratios=[4, 8]).ratios == (4, 8)
    assert SCFGConfig(ratios=(8,)).ratios == (8,)
    cfg = GoCAConfig(self_layers=["up_blocks.3.attentions.0"], cross_layers=["down_blocks.0.attentions.0"])
    assert cfg.self_layers == ("up_blocks.3.attentions.0",) and cfg.cross_layers == ("down_blocks.0.attentions.0",)
    hash(cfg)  # frozen configs stay hashable after the list → tuple normalisation
    assert GoCAConfig(fg_threshold=0.25, eps=1e-6, blur_sigma=2, blur_kernel=3).fg_threshold == 0.25
    for presets in (SCFGConfig.official(), SCFGConfig.paper(), GoCAConfig.vanilla(), GoCAConfig.fast()):
        assert presets == type(presets)(**{k: getattr(presets, k) for k in presets.__dataclass_fields__})


def test_propagation_order_zero_accepts_any_self_layers():
    for layers in ((), None, ("anything",)):
        assert GoCAConfig(propagation_order=0, self_layers=layers).propagation_order == 0


BAD_CALLS = [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -1}, "num_inference_steps"),
    ({"num_inference_steps": 2.0}, "num_inference_steps"),
    ({"num_inference_steps": None}, "num_inference_steps"),
    ({"num_inference_steps": True}, "num_inference_steps"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"guidance_scale": -math.inf}, "guidance_scale"),
    ({"guidance_scale": "7.5"}, "guidance_scale"),
    ({"height": 0}, "height"),
    ({"height": -64}, "height"),
    ({"height": 64.0}, "height"),
    ({"width": 0}, "width"),
    ({"width": "512"}, "width"),
]


@pytest.mark.parametrize(("change", "name"), BAD_CALLS, ids=[repr(c) for c, _ in BAD_CALLS])
def test_check_call_inputs_refuses_bad_argument(change, name):
    args = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": None, "width": None} | change
    with pytest.raises(ValueError, match=name):
        check_call_inputs(**args)


def test_check_call_inputs_accepts_good_arguments():
    check_call_inputs(1, 0.0, None, None)
    check_call_inputs(50, 7, 64, 72)
