"""PixArtSigmaSCFGPipeline end to end on the tiny offline PixArt-Sigma (28 blocks, real T5-style tokenizer)."""

import pytest
import torch
from diffusers import PixArtSigmaPipeline

from goca_scfg import GoCAConfig, PixArtSigmaSCFGPipeline
from goca_scfg.capture import capture_attention
from goca_scfg.loading import load_pipeline, swap_scheduler
from goca_scfg.testing import sharpened, tiny_pixart_components

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

PROMPTS = ["a red dog on a green sofa", "two cats, sleeping."]


@pytest.fixture(scope="module")
def components():
    return tiny_pixart_components()


def _pipe(components, cls=PixArtSigmaSCFGPipeline, scheduler="default"):
    pipe = cls(**components)
    swap_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _kwargs(**over):
    kw = dict(num_inference_steps=2, output_type="latent", guidance_scale=4.5, clean_caption=False)
    kw.update(over)
    return kw


@pytest.mark.parametrize(("scheduler", "binning"), [("default", True), ("ddim", False)])
def test_off_is_bit_identical_to_diffusers(components, scheduler, binning):
    """segmentor=None runs our loop and gives exactly PixArtSigmaPipeline's images (non-square, batch 2 × 2)."""
    ref, ours = _pipe(components, PixArtSigmaPipeline, scheduler), _pipe(components, scheduler=scheduler)
    kw = _kwargs(
        negative_prompt="blurry", num_images_per_prompt=2, height=160, width=224, output_type="pt",
        use_resolution_binning=binning, max_sequence_length=64,
    )  # fmt: skip
    expected = ref(PROMPTS, generator=_gens(4), **kw).images
    got = ours(PROMPTS, generator=_gens(4), segmentor=None, **kw).images
    assert got.shape == (4, 3, 160, 224)
    assert torch.equal(got, expected)


def test_goca_is_active_and_names_t5_tokens(components):
    pipe = _pipe(components)
    plain = pipe(PROMPTS, generator=_gens(2), segmentor=None, **_kwargs()).images
    out = pipe(PROMPTS, generator=_gens(2), segmentor="goca", return_maps=True, **_kwargs())
    assert (out.images - plain).abs().max() > 1e-3
    assert len(out.maps) == len(out.rates) == len(pipe.scheduler.timesteps)
    m = out.maps[-1]
    assert m.labels.shape == m.foreground.shape == m.rate.shape == (2, 32, 32)  # latent size (256 px)
    assert m.tokens[0][:8] == ["▁a", "▁red", "▁dog", "▁on", "▁a", "▁green", "▁sofa", "</s>"]
    assert len(m.tokens[0]) == 300
    # regions come from caption positions only: `</s>` (7 and 8) and pads are zeroed (utils_sigma.py L410-411)
    assert m.labels[0].max() <= 6 and m.labels[1].max() <= int(m.tokens[1].index("</s>")) - 1
    assert m.rate.min() >= 0.8 - 1e-6 and m.rate.max() <= 3.0 + 1e-6


@torch.no_grad()
def test_guide_sees_all_eight_channels(components):
    """One step by hand: the rate's norm and the guidance take noise and learned variance (8 channels), then the
    first 4 are kept, as the authors' loop does (generate_for_fid_sigma.py L329-379)."""
    pipe = _pipe(components)
    kw = _kwargs(num_inference_steps=1, max_sequence_length=32)
    latents = torch.randn((1, 4, 32, 32), generator=_gens(1)[0])
    got = pipe(PROMPTS[0], latents=latents, segmentor="goca", **kw).images
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS[0], max_sequence_length=32, device="cpu")
    embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    guide = pipe.spatial_guidance(
        "goca", PROMPTS[0], 256, 256, key_mask=mask, token_options={"max_sequence_length": 32}
    )
    with capture_attention(pipe.transformer, guide.requests, guide.reducers) as record:
        x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        pred = pipe.transformer(
            x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t.expand(2),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]  # fmt: skip
        assert pred.shape[1] == 8
        uncond, cond = pred.chunk(2)
        guided = guide(0, t, record, uncond, cond, 4.5)
    expected = pipe.scheduler.step(guided.chunk(2, dim=1)[0], t, latents, return_dict=False)[0]
    assert torch.equal(got, expected)


def test_batch_equals_single_calls():
    """B prompts in one call give B separate calls' maps and images, up to the transformer's own batch-size rounding
    (BLAS blocking, and on some CPUs buffer alignment). On the default-initialised model GoCA's min-max turns that
    rounding into label flips at most pixels, so this runs on the sharpened one (DDIM: DPM-Solver++ from t=999
    puts the random model's latents in the hundreds): every step's labels and foregrounds agree on >= 99 % of
    pixels, and the latents (|x| ~ 50) on average within 5e-3, while segmenting or not moves them by ~0.09 on
    average (a pixel that does flip moves its latents by up to ~0.07: seen with 2 threads). Exact sample independence:
    test_sample_independent_of_its_batch_partner; of the PixArt maths on fixed tensors: test_segment_goca_pixart.py.
    """
    pipe = _pipe(sharpened(tiny_pixart_components()), scheduler="ddim")
    kw = _kwargs(num_inference_steps=2)
    batch = pipe(PROMPTS, generator=_gens(2), segmentor="goca", return_maps=True, **kw)
    for i, prompt in enumerate(PROMPTS):
        single = pipe(prompt, generator=_gens(1, base=i), segmentor="goca", return_maps=True, **kw)
        assert (batch.images[i] - single.images[0]).abs().mean() <= 5e-3
        for b, s in zip(batch.maps, single.maps):
            assert (b.labels[i] == s.labels[0]).float().mean() >= 0.99
            assert (b.foreground[i] == s.foreground[0]).float().mean() >= 0.99


def test_sample_independent_of_its_batch_partner(components):
    """Image 0 of [P, Q1] equals image 0 of [P, Q2] bit for bit (one instance, the same shapes): nothing of the
    other image reaches it, also through the T5 attention mask or the maps."""
    pipe = _pipe(components)
    kw = _kwargs(segmentor="goca", return_maps=True)
    a = pipe(PROMPTS, generator=_gens(2), **kw)
    b = pipe([PROMPTS[0], "a lighthouse at night by the sea"], generator=[*_gens(1), *_gens(1, base=7)], **kw)
    assert torch.equal(a.images[0], b.images[0]) and not torch.equal(a.images[1], b.images[1])
    for x, y in zip(a.maps, b.maps):
        assert torch.equal(x.labels[0], y.labels[0]) and torch.equal(x.rate[0], y.rate[0])


def test_fp16_goca_is_finite():
    pipe = load_pipeline("tiny-random-pixart", torch_dtype=torch.float16)
    assert isinstance(pipe, PixArtSigmaSCFGPipeline)
    out = pipe(PROMPTS[0], generator=_gens(1), segmentor="goca", return_maps=True, **_kwargs(output_type="pt"))
    assert torch.isfinite(out.images).all()
    assert all(torch.isfinite(m.rate).all() for m in out.maps)


def test_bad_inputs_raise(components):
    pipe = _pipe(components)
    with pytest.raises(ValueError, match="UNet denoisers only.*utils_sigma.py"):
        pipe(PROMPTS[0], segmentor="scfg", **_kwargs())
    with pytest.raises(TypeError, match="return_map"):
        pipe(PROMPTS[0], return_map=True, **_kwargs())
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS[0], device="cpu")
    with pytest.raises(ValueError, match=r"pass caption=\S* .*or use segmentor=None$"):
        pipe(
            negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
            negative_prompt_attention_mask=neg_mask, segmentor="goca", **_kwargs(),
        )  # fmt: skip
    out = pipe(PROMPTS[0], segmentor="goca", return_maps=True, **_kwargs(guidance_scale=1.0))
    assert out.maps == [] and out.rates is None


def test_vanilla_config_runs(components):
    pipe = _pipe(components)
    out = pipe(PROMPTS[0], generator=_gens(1), goca_config=GoCAConfig.vanilla(), return_maps=True, **_kwargs())
    assert out.maps[0].labels.shape == (1, 32, 32)


def test_saved_pixart_sigma_loads_as_ours(components, tmp_path):
    """A diffusers PixArtSigmaPipeline folder (model_index.json) loads as PixArtSigmaSCFGPipeline, same weights."""
    _pipe(components, PixArtSigmaPipeline).save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path))
    assert type(pipe) is PixArtSigmaSCFGPipeline
    assert pipe.tokenizer("a red dog").input_ids == components["tokenizer"]("a red dog").input_ids
    ref = components["transformer"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.transformer.state_dict().items())


def test_step_end_callback(components):
    """Our addition (stock PixArt has none): the tensors asked for reach the callback, what it returns replaces
    them, a changed `_guidance_scale` is read at the next step, unknown tensor names are refused before any work."""
    pipe = _pipe(components)
    seen = []

    def zero_last(p, i, t, kwargs):
        seen.append(sorted(kwargs))
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    inputs = ["latents", "prompt_embeds"]
    out = pipe(PROMPTS[0], generator=_gens(1), callback_on_step_end=zero_last,
               callback_on_step_end_tensor_inputs=inputs, **_kwargs())  # fmt: skip
    assert seen == [inputs] * 2 and out.images.abs().sum() == 0

    def louder(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    out = pipe(PROMPTS[0], generator=_gens(1), callback_on_step_end=louder, return_maps=True, **_kwargs())
    assert [r.guidance_scale for r in out.rates] == [4.5, 5.5]
    with pytest.raises(ValueError, match=r"\['noise_pred'\] are not handed to callbacks"):
        pipe(PROMPTS[0], callback_on_step_end=louder, callback_on_step_end_tensor_inputs=["noise_pred"], **_kwargs())


def test_callback_switching_cfg_off_stops_segmentation(components):
    """w := 0 and the cond half of the embeddings and mask from step 1 on: maps for steps 0 and 1 only, no error;
    with segmentor=None the same callback runs as plain CFG would."""
    pipe = _pipe(components)

    def cfg_off(p, i, t, kwargs):
        if i == 1:
            p._guidance_scale = 0.0
            kwargs = {k: (v if k == "latents" else v.chunk(2)[-1]) for k, v in kwargs.items()}
        return kwargs

    kw = dict(callback_on_step_end=cfg_off, callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs))
    out = pipe(PROMPTS, generator=_gens(2), return_maps=True, **kw, **_kwargs(num_inference_steps=4))
    assert [m.step for m in out.maps] == [0, 1] and torch.isfinite(out.images).all()
    plain = pipe(PROMPTS, generator=_gens(2), segmentor=None, **kw, **_kwargs(num_inference_steps=4))
    assert plain.images.shape == out.images.shape


def test_call_plan_segments_like_the_call(components):
    """`call_plan` (the plan a call makes, built outside it: T5 key mask, token rows) applied to a plain-CFG run's
    first step gives the segmenting call's first-step labels, bit for bit (one instance, the same shapes)."""
    pipe = _pipe(components)
    kw = _kwargs(max_sequence_length=40)
    guided = pipe(PROMPTS, generator=_gens(2), segmentor="goca", return_maps=True, **kw)
    plan = pipe.call_plan("goca", PROMPTS, 256, 256, clean_caption=False, max_sequence_length=40)
    seen = {}

    def first_step(p, i, t, kwargs):
        if i == 0:
            seen["labels"] = plan.masks(i, record)[0].argmax(1)
        return kwargs

    with capture_attention(pipe.transformer, plan.requests, plan.reducers) as record:
        pipe(PROMPTS, generator=_gens(2), segmentor=None, callback_on_step_end=first_step, **kw)
    assert torch.equal(seen["labels"], guided.maps[0].labels)
