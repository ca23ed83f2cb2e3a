"""The offline SD3 and Flux (MMDiT) fixtures of goca_scfg/testing.py: the tiny components run in the stock diffusers
pipelines; the real-size builders have the published shapes (checked on the meta device only: no memory)."""

import importlib.util

import pytest
import torch

from goca_scfg.testing import (
    flux_dev_random_components,
    sd35_medium_random_components,
    t5_tokenizer,
    tiny_flux_components,
    tiny_sd3_components,
)

PROMPTS = ["a cat on a red sofa", "a dog in the snow"]


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _images(pipe, **kwargs) -> torch.Tensor:
    kwargs = dict(height=64, width=64, num_inference_steps=2, num_images_per_prompt=2, output_type="pt", **kwargs)
    return pipe(PROMPTS, generator=_gens(4), **kwargs).images


@pytest.fixture(scope="module")
def sd3():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sd3_runs_in_the_stock_pipeline(sd3):
    """2 prompts x 2 images at 64 px (8x8 latents, 4x4 patches), 2 steps, CFG on: finite images in [0, 1]."""
    assert sd3.vae_scale_factor == 8 and sd3.patch_size == 2
    images = _images(sd3, guidance_scale=5.0, negative_prompt=["blurry", "dark"])
    assert images.shape == (4, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_tiny_sd3_text_layout(sd3):
    """77 CLIP tokens (both encoders' hidden states side by side, none cut off) then 256 T5 tokens; pooled 32 + 32."""
    embeds, _, pooled, _ = sd3.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77 + 256, sd3.transformer.config.joint_attention_dim)
    assert pooled.shape == (2, sd3.transformer.config.pooled_projection_dim)
    ids = sd3.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden_2 = sd3.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(embeds[:, :77, 16:32], hidden_2)  # the second CLIP tower fills the last 16 features
    assert sd3.tokenizer.pad_token_id == 49407 and sd3.tokenizer_2.pad_token_id == 0  # CLIP-L's / CLIP-G's padding


def test_tiny_flux_runs_with_true_cfg(flux):
    """Flux's true CFG (`true_cfg_scale` > 1 and a negative prompt) at 64 px (8x8 latents packed 2x2): finite
    images, different from the unguided ones."""
    assert flux.vae_scale_factor == 8 and not flux.transformer.config.guidance_embeds
    guided = _images(flux, true_cfg_scale=4.0, negative_prompt=["blurry", "dark"])
    assert guided.shape == (4, 3, 64, 64)
    assert torch.isfinite(guided).all() and guided.min() >= 0 and guided.max() <= 1
    plain = _images(flux, max_sequence_length=32)
    assert plain.shape == (4, 3, 64, 64) and not torch.equal(guided, plain)


def test_tiny_flux_with_guidance_embedding():
    """`guidance_embeds=True` (FLUX.1-dev-style distilled guidance): the pipeline feeds `guidance_scale`."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(guidance_embeds=True))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.guidance_embeds
    out = pipe(PROMPTS[0], height=64, width=64, num_inference_steps=1, guidance_scale=3.5, max_sequence_length=32,
               generator=_gens(1), output_type="pt").images  # fmt: skip
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_tiny_components_are_seeded(sd3, flux):
    """The same seed gives the same weights, another seed other weights."""
    same, other = tiny_sd3_components(0)["transformer"], tiny_flux_components(1)["transformer"]
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in sd3.transformer.state_dict().items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in flux.transformer.state_dict().items())


def test_schedulers_and_vaes(sd3, flux):
    for pipe in (sd3, flux):
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting
    f = flux.scheduler.config
    assert f.use_dynamic_shifting and (f.base_shift, f.max_shift) == (0.5, 1.15)
    assert (f.base_image_seq_len, f.max_image_seq_len) == (256, 4096)
    for pipe, shift, scale in ((sd3, 0.0609, 1.5305), (flux, 0.1159, 0.3611)):
        vae = pipe.vae.config
        assert vae.latent_channels == 16 and not vae.use_quant_conv and not vae.use_post_quant_conv
        assert (vae.shift_factor, vae.scaling_factor) == (shift, scale)


def test_t5_tokenizer_in_the_pipelines(sd3, flux):
    tok = t5_tokenizer()
    assert tok.convert_ids_to_tokens(tok("a cat").input_ids) == ["▁a", "▁cat", "</s>"]
    # the 1000-piece vocabulary is lower case (COCO captions): capitals are `<unk>`, unlike T5's
    assert tok.convert_ids_to_tokens(tok("A cat").input_ids) == ["▁", "<unk>", "▁cat", "</s>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for t in (sd3.tokenizer_3, flux.tokenizer_2):
        ids = t(["a red dog"], padding="max_length", max_length=8, return_tensors="pt").input_ids[0].tolist()
        assert t.convert_ids_to_tokens(ids[:4]) == ["▁a", "▁red", "▁dog", "</s>"] and ids[4:] == [0] * 4
    assert sd3.text_encoder_3.config.vocab_size == flux.text_encoder_2.config.vocab_size == len(tok)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_size_builders_on_the_meta_device():
    """The published transformer shapes (parameter counts), built in the requested dtype on the requested (or
    enclosing) device; torch's default dtype is restored afterwards."""
    sd35 = sd35_medium_random_components(device="meta")
    assert torch.get_default_dtype() == torch.float32
    t = sd35["transformer"]
    assert 2.2e9 < _count(t) < 2.5e9  # 2.243B
    assert t.config.qk_norm == "rms_norm" and list(t.config.dual_attention_layers) == list(range(13))
    assert t.config.sample_size == 128 and t.config.pos_embed_max_size == 384
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16} and t.device.type == "meta"
    assert sd35["text_encoder"].config.num_hidden_layers == 1 and sd35["text_encoder_3"].config.d_model == 4096
    assert sd35["vae"].config.block_out_channels == (128, 256, 512, 512)

    with torch.device("meta"):  # as bench/step_flops.py builds: the enclosing device is kept
        flux = flux_dev_random_components(dtype=torch.float16)
    assert torch.get_default_dtype() == torch.float32
    t = flux["transformer"]
    assert 11.8e9 < _count(t) < 12.0e9  # 11.901B
    assert t.config.guidance_embeds and tuple(t.config.axes_dims_rope) == (16, 56, 56)
    assert {p.dtype for p in t.parameters()} == {torch.float16} and t.device.type == "meta"
    assert flux["text_encoder"].config.hidden_size == 768 and flux["text_encoder_2"].config.d_model == 4096


@pytest.mark.parametrize(
    "module, builder", [("pipeline_sd3", "tiny_sd3_pipeline"), ("pipeline_flux", "tiny_flux_pipeline")]
)
def test_tiny_scfg_pipelines(module, builder):
    """The plugin's pipelines over the tiny components (skipped until their modules exist)."""
    if importlib.util.find_spec(f"goca_scfg.{module}") is None:
        pytest.skip(f"goca_scfg.{module} does not exist yet")
    from diffusers import FlowMatchEulerDiscreteScheduler

    import goca_scfg.testing as testing

    pipe = getattr(testing, builder)()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.in_channels in (16, 64)
