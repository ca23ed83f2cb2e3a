"""The model family registry round-trips: each family's pipeline extends the diffusers class it is loaded from, its
saved tiny model loads back as its pipeline, and loading, the CLI, the sweep, the benchmarks, the package exports
and GoCA's presets all read the registry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from test_bench import _load as _bench_module  # the bench scripts, loaded from their files

import goca_scfg
from goca_scfg import GoCAConfig, ModelLayout
from goca_scfg.families import (
    FAMILIES,
    family_named,
    family_names,
    family_of,
    flux,
    goca_presets,
    pixart,
    sdxl,
    tiny_models,
)
from goca_scfg.loading import SCFG_PIPELINES, TINY_MODELS, load_pipeline, model_family
from goca_scfg.segment import goca

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f.name for f in FAMILIES]


def _tiny_name(family) -> str:
    (name,) = family.tiny_models
    return name


def test_registry_lookups():
    assert family_names() == tuple(NAMES) == ("sd15", "sdxl", "pixart-sigma", "sd3", "flux")
    for family in FAMILIES:
        assert family_named(family.name) is family
        assert all(family_of(name) is family for name in family.class_names)
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'"):
        family_named("kandinsky")
    with pytest.raises(ValueError, match="KandinskyPipeline.*belongs to no registered model family"):
        family_of("KandinskyPipeline")


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_extends_the_class_it_is_loaded_from(name):
    family = family_named(name)
    cls = family.pipeline_class()
    upstream = getattr(diffusers, family.extends[0])
    assert issubclass(cls, upstream) and cls.diffusers_class() is upstream
    assert family_of(cls) is family and family_of(upstream) is family
    assert cls.denoiser_name == family.denoiser
    assert all(getattr(goca_scfg, export) is getattr(sys.modules[family.pipeline_module], export)
               for export in family.public_names)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_saved_tiny_model_loads_as_the_family_pipeline(name, tmp_path):
    family = family_named(name)
    pipe = load_pipeline(_tiny_name(family))
    assert type(pipe) is family.pipeline_class() and family_of(pipe) is family
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "model_index.json").read_text())["_class_name"]
    assert saved in family.extends  # a stock diffusers folder
    assert model_family(str(tmp_path)) is family
    assert type(load_pipeline(str(tmp_path))) is family.pipeline_class()


@pytest.mark.parametrize("name", NAMES)
def test_token_rule_is_the_pipelines(name):
    family = family_named(name)
    pipe = load_pipeline(_tiny_name(family))
    prompts = ["a red dog on a green sofa", "two cats"]
    tokenizer = getattr(pipe, family.region_tokenizer)
    ours, theirs = family.tokens(tokenizer, prompts, 2), pipe.segmentation_tokens(prompts, 2)
    assert ours.strings == theirs.strings
    for field in ("ids", "caption", "stop", "live", "global_index"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


def test_loading_cli_sweep_and_exports_read_the_registry():
    assert TINY_MODELS == tiny_models() == {m: t for f in FAMILIES for m, t in f.tiny_models.items()}
    assert SCFG_PIPELINES == {c: f.pipeline for f in FAMILIES for c in f.class_names}
    assert model_family("tiny-random-pixart") is family_named("pixart-sigma")
    from goca_scfg.cli import _parser

    model_help = next(a.help for a in _parser()._subparsers._group_actions[0].choices["generate"]._actions
                      if "--model" in a.option_strings)  # fmt: skip
    assert all(f.title in model_help and all(m in model_help for m in f.tiny_models) for f in FAMILIES)
    from eval import sweep

    expected = {p.name: f.model_id for f in FAMILIES for p in f.sweep_presets}
    assert {name: preset.settings.model for name, preset in sweep.PRESETS.items()} == expected
    assert sweep.PRESETS["pixart-sigma"].settings.steps == 20 and sweep.PRESETS["sdxl"].settings.steps == 50
    exported = {n: f.pipeline_module for f in FAMILIES for n in f.public_names}
    assert exported.items() <= goca_scfg._PUBLIC.items() and set(exported) <= set(goca_scfg.__all__)


def test_every_bench_arch_is_a_registered_family():
    bench, step_flops = _bench_module("bench_guidance"), _bench_module("step_flops")
    assert tuple(bench.ARCHS) == step_flops.arch_names() == family_names()
    assert all(bench.ARCHS[n] is family_named(n) for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_step_flops_builds_the_family_model(name):
    """`step_flops --arch NAME` builds that family's pipeline (it once built SD v1.5 for pixart-sigma), with the
    denoiser on the meta device and a CPU scheduler (DDIM, or a flow-matching model's own)."""
    step_flops = _bench_module("step_flops")
    family = family_named(name)
    pipe = step_flops.build_pipeline(name, "shapes", tiny=True)
    assert type(pipe) is family.pipeline_class()
    assert getattr(pipe, family.denoiser).device.type == "meta" and pipe.text_encoder.device.type == "cpu"
    scheduler = type(pipe.scheduler).__name__
    if scheduler.startswith("FlowMatch"):  # flow-matching models (SD3, Flux) keep their own scheduler
        assert family.name in ("sd3", "flux") and pipe.scheduler.sigmas.device.type == "cpu"
    else:
        assert scheduler == "DDIMScheduler" and pipe.scheduler.betas.device.type == "cpu"


def test_goca_presets_come_from_the_registry():
    assert (
        goca.GOCA_PRESETS
        == goca_presets()
        == (*sdxl.FAMILY.goca_presets, *pixart.FAMILY.goca_presets, *flux.FAMILY.goca_presets)
    )
    assert goca.GoCAPreset is sdxl.GoCAPreset  # the one preset type, defined with the families


def _matched(layout):
    return [p for match, p in goca.GOCA_PRESETS if match(layout)]


def test_tiny_models_resolve_to_the_same_layers():
    """The presets moved to the families resolve the tiny SDXL and PixArt-Sigma models to the authors' layers as
    before; the SD model matches no preset (the SD v1.5 rules give the authors' lists)."""
    from goca_scfg.testing import tiny_components, tiny_pixart_components, tiny_xl_components

    xl = ModelLayout.of(tiny_xl_components()["unet"])
    assert _matched(xl) == [sdxl.SDXL_PRESET]
    layers = goca.goca_layers(xl, GoCAConfig())
    up = [f"up_blocks.1.attentions.{m}.transformer_blocks.{b}" for m, b in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]]
    down = [f"down_blocks.1.attentions.0.transformer_blocks.{b}" for b in (0, 1)]
    assert [x.block for x in layers.propagation] == down + up  # call order
    assert layers.dense.name == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert (len(layers.cross), layers.order, layers.factor, layers.foreground) == (70, 2, 2, "uncond")
    assert layers.rule == "preset sdxl"

    dit = ModelLayout.of(tiny_pixart_components()["transformer"])
    assert _matched(dit) == [pixart.PIXART_SIGMA_PRESET]
    layers = goca.goca_layers(dit, GoCAConfig())
    band = [f"transformer_blocks.{i}" for i in range(10, 18)]
    assert [x.block for x in layers.cross] == band == [x.block for x in layers.propagation]
    assert layers.dense.name == "transformer_blocks.13.attn2"
    assert (layers.order, layers.factor, layers.foreground, layers.rule) == (5, 1, "cond", "preset pixart-sigma")

    sd = ModelLayout.of(tiny_components()["unet"])
    assert _matched(sd) == [] and goca.goca_layers(sd, GoCAConfig()).rule == "SD v1.5 rules (algorithm.md §8.2)"


def test_registry_imports_no_torch():
    code = (
        "import sys\n"
        "import goca_scfg.families, goca_scfg.loading\n"
        "goca_scfg.families.family_of('PixArtSigmaPipeline')\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
