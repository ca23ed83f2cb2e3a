"""Bad input on the generation side, one row per probe of docs/bad_input.md ("Generation"): the Python API raises
ValueError/TypeError naming the argument before the denoiser runs (or right after the step that produced the bad
value: a step-end callback's latents, a segmentor's masks), and the CLI exits 2 with one `error:` line naming the
option and writes nothing. The probes with a correct behaviour instead of an error are tests of their own below."""

import logging
import math
import os

import pytest
import torch
from PIL import Image

from goca_scfg import GoCAConfig, SCFGConfig
from goca_scfg.capture import HEAD_MEAN
from goca_scfg.checks import MAX_SEED
from goca_scfg.cli import main
from goca_scfg.guidance import SCFGRate
from goca_scfg.segment import CapturePlan, GoCASegmentor, Segmentor
from goca_scfg.testing import tiny_pipeline, tiny_pixart_pipeline, tiny_xl_pipeline


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per family, built when first asked for (a refused call leaves it as it was)."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = {"sd": tiny_pipeline, "sdxl": tiny_xl_pipeline, "pixart": tiny_pixart_pipeline}[family]()
        return built[family]

    return get


BASE = {
    "sd": dict(height=64, width=64),
    "sdxl": dict(height=128, width=128),
    "pixart": dict(height=256, width=256, clean_caption=False),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class WrongShapeMasks(Segmentor):
    """A segmentor of one's own whose masks are not at latent size."""

    def start(self, context):
        self.layer = max(context.layout.of_kind("cross"), key=lambda x: x.factor).name
        self.plan = CapturePlan({self.layer: {"q", "k"}}, {self.layer: HEAD_MEAN})
        return self.plan

    def segment(self, step, record):
        return torch.ones(1, 3, 5, 5), torch.ones(1, 1, 5, 5)


def _shrink_latents(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"][..., :3, :3]}


def _forget_return(pipe, i, t, kwargs):
    pipe._guidance_scale = pipe._guidance_scale  # does its work, but returns None


def _huge_scale(pipe, i, t, kwargs):
    pipe._guidance_scale = 1e6
    return kwargs


def _api(case, change, error, words, family="sd", calls=0):
    """A probe: call keywords (prompt "a red dog" unless given), the exception, words its message must contain, and
    the denoiser calls made before it (0: refused before any work)."""
    return pytest.param(family, change, error, words, calls, id=case)


API = [
    # the probes the bug report lists
    _api("scfg-config-dict", dict(scfg_config={"rate_min": 1.0}), TypeError, "scfg_config must be an SCFGConfig"),
    _api("goca-config-is-scfg", dict(goca_config=SCFGConfig()), TypeError, "goca_config must be a GoCAConfig"),
    _api("goca-config-name", dict(goca_config="fast"), TypeError, "goca_config must be a GoCAConfig"),
    _api("scfg-config-is-goca", dict(scfg_config=GoCAConfig(), segmentor="scfg"), TypeError, "scfg_config"),
    _api("latents-shape", dict(latents=torch.zeros(1, 4, 4, 4)), ValueError, "latents must have shape (1, 4, 8, 8)"),
    _api("latents-channels", dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents must have shape"),
    _api("latents-batch", dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, "latents must have shape"),
    _api(
        "latents-dtype", dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.float16)), ValueError, "latents have dtype"
    ),
    _api("generator-int", dict(generator=42), TypeError, "generator must be a torch.Generator"),
    _api(
        "callback-latents-shape",
        dict(callback_on_step_end=_shrink_latents),
        ValueError,
        "callback_on_step_end returned latents of shape",
        calls=1,
    ),
    _api("images-per-prompt-0", dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be >= 1"),
    _api("prompt-empty-list", dict(prompt=[]), ValueError, "prompt is an empty list"),
    _api(
        "segmentor-masks-shape",
        dict(segmentor=WrongShapeMasks()),
        ValueError,
        "segmentor WrongShapeMasks returned masks of shape (1, 3, 5, 5)",
        calls=1,
    ),
    _api("return-maps-str", dict(return_maps="yes"), TypeError, "return_maps must be True or False"),
    _api("guidance-rescale-nan", dict(guidance_rescale=math.nan), ValueError, "guidance_rescale must be finite"),
    _api(
        "guidance-scale-1e308", dict(guidance_scale=1e308), ValueError, "guidance_scale must be between -1000 and 1000"
    ),
    _api("steps-1e12", dict(num_inference_steps=10**12), ValueError, "num_inference_steps must be <= 1000"),
    _api("steps-1001", dict(num_inference_steps=1001), ValueError, "num_inference_steps must be <= 1000"),
    # probes of our own
    _api("segmentor-upper-case", dict(segmentor="GOCA"), ValueError, "names are lower case: segmentor='goca'"),
    _api("segmentor-method-name", dict(segmentor="goca-vanilla"), ValueError, "get_method('goca-vanilla')"),
    _api("segmentor-none-string", dict(segmentor="none"), ValueError, "pass segmentor=None"),
    _api("segmentor-typo", dict(segmentor="gcoa"), ValueError, "unknown segmentor 'gcoa'"),
    _api("segmentor-class", dict(segmentor=GoCASegmentor), TypeError, "pass GoCASegmentor()"),
    _api("segmentor-int", dict(segmentor=3), TypeError, "segmentor must be one of"),
    _api("misspelt-keyword", dict(segmenter="goca"), TypeError, "unexpected keyword arguments: ['segmenter']"),
    _api("output-type-typo", dict(output_type="PIL"), ValueError, "output_type must be one of"),
    _api(
        "callback-not-callable",
        dict(callback_on_step_end="print"),
        TypeError,
        "callback_on_step_end must be a function",
    ),
    _api(
        "callback-returns-none",
        dict(callback_on_step_end=_forget_return),
        TypeError,
        "callback_on_step_end must return a dict",
        calls=1,
    ),
    _api(
        "callback-sets-huge-scale",
        dict(callback_on_step_end=_huge_scale),
        ValueError,
        "guidance_scale became 1000000.0",
        calls=1,
    ),
    _api(
        "callback-tensor-unknown",
        dict(callback_on_step_end=_forget_return, callback_on_step_end_tensor_inputs=["noise"]),
        ValueError,
        "callback_on_step_end_tensor_inputs",
    ),
    _api(
        "negative-prompt-count",
        dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]),
        ValueError,
        "negative_prompt",
    ),
    _api("negative-prompt-empty-list", dict(negative_prompt=[]), ValueError, "negative_prompt is an empty list"),
    _api("prompt-item-none", dict(prompt=["a dog", None]), TypeError, "prompt[1] must be a str"),
    _api("prompt-tuple", dict(prompt=("a", "b")), ValueError, "prompt"),
    _api("height-not-multiple-of-8", dict(height=65), ValueError, "height"),
    _api("height-not-multiple-of-grid", dict(height=72), ValueError, "multiples of 64 px"),
    _api("height-float", dict(height=64.0), ValueError, "height must be an int"),
    _api("height-zero-width-given", dict(height=0), ValueError, "height must be >= 1"),
    _api("steps-float", dict(num_inference_steps=2.0), ValueError, "num_inference_steps must be an int"),
    _api("guidance-scale-str", dict(guidance_scale="7.5"), ValueError, "guidance_scale must be a number"),
    _api("guidance-scale-minus-1e6", dict(guidance_scale=-1e6), ValueError, "guidance_scale must be between"),
    _api("guidance-rescale-above-1", dict(guidance_rescale=1.5), ValueError, "guidance_rescale must be <= 1"),
    _api("eta-nan", dict(eta=math.nan), ValueError, "eta must be finite"),
    _api("eta-negative", dict(eta=-0.5), ValueError, "eta must be >= 0"),
    _api("clip-skip-negative", dict(clip_skip=-1), ValueError, "clip_skip must be >= 0"),
    _api("clip-skip-too-deep", dict(clip_skip=5), ValueError, "clip_skip must be <= 1"),
    _api(
        "images-per-prompt-none", dict(num_images_per_prompt=None), TypeError, "num_images_per_prompt must be an int"
    ),
    _api("generator-list-length", dict(generator=[_gen(), _gen()]), ValueError, "generator is a list of 2 generators"),
    _api("generator-tuple", dict(generator=(_gen(),)), TypeError, "generator must be a torch.Generator"),
    _api("generator-list-of-ints", dict(generator=[0]), TypeError, "generator[0] must be a torch.Generator"),
    _api("latents-int", dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), ValueError, "floating-point"),
    _api("latents-nan", dict(latents=torch.full((1, 4, 8, 8), math.nan)), ValueError, "latents hold NaN"),
    _api("latents-numpy", dict(latents=[[0.0]]), TypeError, "latents must be a torch.Tensor"),
    _api(
        "prompt-embeds-width",
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 5), segmentor="scfg"),
        ValueError,
        "prompt_embeds must have shape (batch, tokens, 32)",
    ),
    _api(
        "prompt-embeds-2d",
        dict(prompt=None, prompt_embeds=torch.zeros(77, 32), segmentor="scfg"),
        ValueError,
        "prompt_embeds must have shape",
    ),
    _api(
        "goca-unknown-layer",
        dict(goca_config=GoCAConfig(cross_layers=("no.such.block",))),
        ValueError,
        "no.such.block",
    ),
    _api("rate-rule-name", dict(rate_rule="scfg"), TypeError, "rate_rule must be a RateRule"),
    _api("caption-with-prompt", dict(caption="a red dog"), ValueError, "caption= is for calls with prompt_embeds"),
    _api("timesteps-unsupported", dict(timesteps=[999, 500]), ValueError, "custom timestep"),
    _api(
        "sdxl-latents-channels",
        dict(latents=torch.zeros(1, 3, 16, 16)),
        ValueError,
        "latents must have shape (1, 4, 16, 16)",
        family="sdxl",
    ),
    _api(
        "sdxl-prompt-embeds-width",
        dict(
            prompt=None, prompt_embeds=torch.zeros(1, 77, 32), pooled_prompt_embeds=torch.zeros(1, 32), segmentor=None
        ),
        ValueError,
        "prompt_embeds must have shape (batch, tokens, 64)",
        family="sdxl",
    ),
    _api(
        "sdxl-callback-latents-shape",
        dict(callback_on_step_end=_shrink_latents),
        ValueError,
        "callback_on_step_end returned latents",
        family="sdxl",
        calls=1,
    ),
    _api("sdxl-generator-int", dict(generator=7), TypeError, "generator must be a torch.Generator", family="sdxl"),
    _api(
        "pixart-scfg",
        dict(segmentor="scfg"),
        ValueError,
        "segmentor='scfg' is defined for UNet denoisers only",
        family="pixart",
    ),
    _api(
        "pixart-latents-batch",
        dict(latents=torch.zeros(2, 4, 32, 32)),
        ValueError,
        "latents must have shape (1, 4, 32, 32)",
        family="pixart",
    ),
    _api(
        "pixart-callback-returns-none",
        dict(callback_on_step_end=_forget_return),
        TypeError,
        "must return a dict",
        family="pixart",
        calls=1,
    ),
    _api("pixart-output-type", dict(output_type="numpy"), ValueError, "output_type must be one of", family="pixart"),
    _api(
        "pixart-return-maps-int", dict(return_maps=1), TypeError, "return_maps must be True or False", family="pixart"
    ),
]


@pytest.mark.parametrize(("family", "change", "error", "words", "calls_allowed"), API)
def test_api_refuses_bad_input_naming_the_argument(pipes, family, change, error, words, calls_allowed):
    pipe = pipes(family)
    kw = dict(num_inference_steps=2, guidance_scale=7.5, output_type="latent", generator=_gen(), **BASE[family])
    kw.update(change)
    prompt = kw.pop("prompt", "a red dog")
    calls = []
    hook = pipe.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error) as info:
            pipe(prompt, **kw)
    finally:
        hook.remove()
    assert words in str(info.value)
    assert len(calls) == calls_allowed, f"the denoiser ran {len(calls)} time(s) before the error"


CONFIGS = {
    # id: (build, exception, words)
    "goca-fg-threshold-above-1": (lambda: GoCAConfig(fg_threshold=1.5), ValueError, "GoCAConfig.fg_threshold"),
    "goca-head-capitalised": (lambda: GoCAConfig(head="Dot"), ValueError, "GoCAConfig.head='Dot'"),
    "goca-blur-kernel-even": (lambda: GoCAConfig(blur_kernel=4), ValueError, "must be odd"),
    "goca-refresh-zero": (lambda: GoCAConfig(layer_refresh=0), ValueError, "GoCAConfig.layer_refresh"),
    "goca-cross-layers-str": (lambda: GoCAConfig(cross_layers="up_blocks.1"), TypeError, "GoCAConfig.cross_layers"),
    "scfg-ratios-not-power-of-2": (lambda: SCFGConfig(ratios=(3,)), ValueError, "powers of two"),
    "rate-min-above-max": (lambda: SCFGRate(rate_min=5.0), ValueError, "SCFGRate.rate_min=5.0"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_fields_out_of_range_are_refused_when_built(case):
    build, error, words = CONFIGS[case]
    with pytest.raises(error, match=None) as info:
        build()
    assert words in str(info.value)


def test_return_maps_without_a_segmentor_warns_and_returns_no_maps(pipes, caplog):
    """Consistent with CFG off (w <= 1): `maps` is [] (not None), and a warning says why."""
    with caplog.at_level(logging.WARNING, logger="goca_scfg"):
        out = pipes("sd")("a red dog", num_inference_steps=2, output_type="latent", return_maps=True, segmentor=None,
                          generator=_gen(), **BASE["sd"])  # fmt: skip
    assert out.maps == [] and out.rates is None
    assert "return_maps=True with segmentor=None" in caplog.text


def test_sd_keeps_a_lone_width(pipes):
    """diffusers' SD resets both sides when only one is given; ours defaults the missing one only, as SDXL does."""
    pipe = pipes("sd")
    out = pipe("a red dog", width=64, num_inference_steps=1, output_type="latent", generator=_gen())
    native = pipe.unet.config.sample_size
    assert tuple(out.images.shape[-2:]) == (native, 64 // pipe.vae_scale_factor)


# ------------------------------------------------------------------------------------------------ CLI

GOOD = ["--model", "tiny-random", "--prompt", "a red dog", "--steps", "2", "--height", "64", "--width", "64"]


def _refused(capsys, argv, folder, needle):
    """Run the CLI; it must exit 2 with one stderr line `error: …` containing `needle`, and write nothing."""
    before = sorted((p, p.stat(follow_symlinks=False).st_mtime_ns) for p in folder.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert needle in lines[0], lines[0]
    assert captured.out == ""
    assert sorted((p, p.stat(follow_symlinks=False).st_mtime_ns) for p in folder.rglob("*")) == before


def _setup(d):
    """Files some CLI probes need in the folder `d`."""
    (d / "real.png").write_bytes(b"")
    (d / "link.png").symlink_to("real.png")
    (d / "loop1.png").symlink_to("loop2.png")
    (d / "loop2.png").symlink_to("loop1.png")
    (d / "hard.png").hardlink_to(d / "real.png")
    (d / "sdxl").mkdir()
    (d / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (d / "kandinsky").mkdir()
    (d / "kandinsky" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    (d / "broken").mkdir()
    (d / "broken" / "model_index.json").write_text("{not json")
    (d / "pixart").mkdir()
    (d / "pixart" / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')


# extra argv ({d} = a folder holding _setup's files) and words the one error line must contain
CLI = [
    # the probes the bug report lists (the symlinked --out and the progress line: tests of their own below)
    pytest.param(
        ["--out", "{d}/x.png", "--guidance-scale", "1e308"], "argument --guidance-scale", id="guidance-scale-1e308"
    ),
    pytest.param(
        ["--out", "{d}/x.png", "--steps", "1001"],
        "argument --steps: invalid value '1001': must be <= 1000",
        id="steps-1001",
    ),
    pytest.param(["--out", "{d}/x.png", "--steps", "1000000000000"], "argument --steps", id="steps-1e12"),
    pytest.param(["--out", "{d}/x.png", "--seed", str(MAX_SEED + 1)], "argument --seed", id="seed-2**64"),
    # probes of our own
    pytest.param(
        ["--out", "{d}/x.png", "--guidance-scale", "-1e308"],
        "argument --guidance-scale",
        id="guidance-scale-minus-1e308",
    ),
    pytest.param(
        ["--out", "{d}/x.png", "--guidance-scale", "0x10"], "argument --guidance-scale", id="guidance-scale-hex"
    ),
    pytest.param(["--out", "{d}/x.png", "--seed", "-1"], "argument --seed", id="seed-negative"),
    pytest.param(["--out", "{d}/x.png", "--seed", "4.2"], "argument --seed", id="seed-float"),
    pytest.param(["--out", "{d}/loop1.png"], "symbolic link that loops", id="out-symlink-loop"),
    pytest.param(["--out", "{d}/real.png/x.png"], "is a file, not a folder", id="out-under-a-file"),
    pytest.param(["--out", "{d}/real.png", "--maps", "{d}/link.png"], "same file", id="maps-symlink-to-out"),
    pytest.param(["--out", "{d}/real.png", "--maps", "{d}/hard.png"], "same file", id="maps-hard-link-to-out"),
    pytest.param(["--out", "{d}/x.webm"], ".webm", id="out-unknown-extension"),
    pytest.param(["--out", "{d}/x.psd"], ".psd", id="out-read-only-format"),
    pytest.param(["--out", "{d}/x.png", "--device", "meta"], "--device meta", id="device-meta"),
    pytest.param(
        ["--out", "{d}/x.png", "--model", "{d}/kandinsky"], "is a KandinskyPipeline", id="model-unsupported-pipeline"
    ),
    pytest.param(["--out", "{d}/x.png", "--model", "{d}/broken"], "not a diffusers index", id="model-broken-index"),
    pytest.param(["--out", "{d}/x.png", "--model", "{d}/real.png"], "no model_index.json", id="model-is-a-file"),
    pytest.param(
        ["--out", "{d}/x.png", "--model", "{d}/pixart", "--segmentor", "scfg"],
        "--segmentor scfg",
        id="pixart-folder-with-scfg",
    ),
    pytest.param(
        ["--out", "{d}/x.png", "--model", "tiny-random-pixart", "--segmentor", "scfg-paper"],
        "--segmentor scfg-paper",
        id="tiny-pixart-with-scfg-paper",
    ),
    pytest.param(["--out", "{d}/x.png", "--segmentor", "GOCA"], "--segmentor", id="segmentor-upper-case"),
    pytest.param(
        ["--out", "{d}/x.png", "--height", "72"],
        "--height/--width: segmentation needs",
        id="height-not-multiple-of-grid",
    ),
]


@pytest.mark.parametrize(("extra", "needle"), CLI)
def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _setup(tmp_path)
    _refused(capsys, ["generate", *GOOD, *[a.format(d=tmp_path) for a in extra]], tmp_path, needle)


def test_cli_bounds_are_inclusive():
    """The largest seed, the most steps and the largest scale are accepted by the parser."""
    from goca_scfg.cli import _parser

    args = _parser().parse_args(["generate", *GOOD, "--out", "x.png", "--seed", str(MAX_SEED), "--steps", "1000",
                                 "--guidance-scale", "-1000"])  # fmt: skip
    assert (args.seed, args.steps, args.guidance_scale) == (MAX_SEED, 1000, -1000.0)


def test_cli_writes_through_symlinks_and_keeps_the_mode(tmp_path, capsys):
    """--out a link: the file it points at gets the image and the link stays a link (also a dangling one: its target
    is created); a new file gets the usual permissions (0666 less the umask), a replaced one keeps its own."""
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "real.png").chmod(0o640)
    (tmp_path / "link.png").symlink_to("real.png")
    (tmp_path / "dangling.png").symlink_to("new.png")
    for link in ("link.png", "dangling.png"):
        main(["generate", *GOOD, "--steps", "1", "--segmentor", "cfg", "--out", str(tmp_path / link)])
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "dangling.png").is_symlink()
    assert Image.open(tmp_path / "real.png").size == (64, 64)
    assert Image.open(tmp_path / "new.png").format == "PNG"
    assert (tmp_path / "real.png").stat().st_mode & 0o777 == 0o640
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.png", "link.png", "new.png", "real.png"]
    assert capsys.readouterr().out.count("wrote ") == 2


def test_cli_prints_progress_on_long_runs(tmp_path, capsys, monkeypatch):
    """A run longer than PROGRESS_EVERY_S prints `step i/N …` lines on stderr (here the interval is 0: every step);
    one shorter prints none."""
    from goca_scfg import cli

    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)
    main(["generate", *GOOD, "--steps", "3", "--scheduler", "ddim", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("step ")] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 3600.0)
    main(["generate", *GOOD, "--out", str(tmp_path / "y.png")])
    assert "step " not in capsys.readouterr().err
