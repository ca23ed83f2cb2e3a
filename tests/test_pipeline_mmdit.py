"""SD3 and Flux (joint attention): capture against a naive explicit softmax, the joint pass against its definition,
the layer rule, and the two pipelines against the stock diffusers ones on tiny models built here (independently of
the project's fixtures), plus `SCFGGuidance` inside diffusers' modular SD3 pipeline."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.embeddings import apply_rotary_emb
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from goca_scfg import FluxSCFGPipeline, GoCAConfig, StableDiffusion3SCFGPipeline
from goca_scfg.capture import capture_attention
from goca_scfg.clip_bpe import clip_tokenizer
from goca_scfg.layout import ModelLayout
from goca_scfg.segment.goca import goca_layers, joint_rule
from goca_scfg.segment.goca_joint import joint_layer_pass
from goca_scfg.testing import sharpen_attention, t5_tokenizer

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again

PROMPTS = ["a cat on a red sofa", "a dog in a green park"]
OTHER = ["a lighthouse at night by the sea", "two apples on a wooden table"]  # lower case: the T5 vocabulary is


def _clip(width: int, projection: bool, pad_token_id: int, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id,
        projection_dim=width, hidden_act="gelu",
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(width: int, seed: int):
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4, is_encoder_decoder=False
    )
    return T5EncoderModel(config).eval(), tokenizer


def _vae(shift: float, scale: float):
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale,
    ).eval()  # fmt: skip


def sd3_components() -> dict:
    """4 joint blocks, CLIP-L/G of width 32 (projection 32: pooled 64) and T5 of width 64 (SD3 pads the CLIP
    features to T5's width), 16-channel VAE, flow-matching Euler; the attention sharpened (labels survive rounding)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
    ).eval()  # fmt: skip
    text_encoder_3, tokenizer_3 = _t5(64, 3)
    return dict(
        transformer=sharpen_attention(transformer),
        text_encoder=_clip(32, True, 49407, 1),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(32, True, 0, 2),
        tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        vae=_vae(0.0609, 1.5305),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_encoder=None,
        feature_extractor=None,
    )


def flux_components() -> dict:
    """2 double + 4 single blocks, RoPE axes [4, 4, 8], CLIP (pooled) + T5 of width 32, 16-channel VAE; sharpened."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()  # fmt: skip
    text_encoder_2, tokenizer_2 = _t5(32, 2)
    return dict(
        transformer=sharpen_attention(transformer),
        text_encoder=_clip(32, False, 49407, 1),
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        vae=_vae(0.1159, 0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),  # fmt: skip
        image_encoder=None,
        feature_extractor=None,
    )


@pytest.fixture(scope="module")
def sd3():
    components = sd3_components()
    return StableDiffusion3SCFGPipeline(**components), StableDiffusion3Pipeline(**components)


@pytest.fixture(scope="module")
def flux():
    components = flux_components()
    return FluxSCFGPipeline(**components), FluxPipeline(**components)


def _call(pipe, prompts=PROMPTS, seed=0, **kw):
    base = dict(num_inference_steps=3, height=64, width=64, output_type="pt", num_images_per_prompt=2)
    if isinstance(pipe, FluxPipeline):
        base.update(true_cfg_scale=4.0, negative_prompt=["blurry"] * len(prompts), max_sequence_length=32)
    else:
        base.update(guidance_scale=5.0, negative_prompt=["blurry"] * len(prompts))
    base.update(kw)
    n = len(prompts) * base["num_images_per_prompt"]
    return pipe(prompts, generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], **base)


# ------------------------------------------------------------------------------------------ capture and maths


def _naive_flux_probs(attn, hidden, encoder, rope, text_len):
    """The authors' way (FluxAttnStoreProcessor): q, k of [text; image] by hand, RoPE, explicit softmax."""
    heads = attn.heads

    def per_head(x):
        return x.unflatten(-1, (heads, -1))

    if encoder is not None:
        q = torch.cat(
            [attn.norm_added_q(per_head(attn.add_q_proj(encoder))), attn.norm_q(per_head(attn.to_q(hidden)))], 1
        )
        k = torch.cat(
            [attn.norm_added_k(per_head(attn.add_k_proj(encoder))), attn.norm_k(per_head(attn.to_k(hidden)))], 1
        )
    else:
        q, k = attn.norm_q(per_head(attn.to_q(hidden))), attn.norm_k(per_head(attn.to_k(hidden)))
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    probs = torch.softmax(logits, dim=-1)
    return probs[:, :, text_len:, :text_len], probs[:, :, text_len:, text_len:]


def test_joint_capture_equals_an_explicit_softmax_of_the_models_own_q_and_k(flux):
    """Every view of every block (double and single stream) is the authors' slice of one softmax over text + image
    keys, with QK-norm and RoPE as the model applies them; the record does not change the model's output."""
    pipe, _ = flux
    transformer = pipe.transformer
    layout = ModelLayout.of(transformer)
    assert layout.arch == "joint" and len(layout.layers) == 12  # 6 blocks × (cross, self)
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = (kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs["image_rotary_emb"])

        return hook

    modules = dict(transformer.named_modules())
    blocks = sorted({x.name.rpartition(":")[0] for x in layout.layers})
    handles = [modules[b].register_forward_pre_hook(keep(b), with_kwargs=True) for b in blocks]
    torch.manual_seed(0)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    inputs = dict(
        hidden_states=torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 7, 32),
        pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.5]), txt_ids=torch.zeros(7, 3),
        img_ids=torch.stack(grid, -1).reshape(16, 3), return_dict=False,
    )  # fmt: skip
    try:
        with torch.no_grad():
            plain = transformer(**inputs)[0]
            with capture_attention(transformer, {x.name: {"q", "k"} for x in layout.layers}) as record:
                captured = transformer(**inputs)[0]
                for x in layout.layers:
                    module = x.name.rpartition(":")[0]
                    hidden, encoder, rope = seen[module]
                    cross, self_ = _naive_flux_probs(modules[module], hidden, encoder, rope, 7)
                    ours = record[x.name].probs()
                    torch.testing.assert_close(ours.double(), cross if x.kind == "cross" else self_, atol=5e-6, rtol=0)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, captured)


def test_joint_layer_pass_equals_its_definition():
    """Cross map, similarity to a reference and image share from one chunked pass equal the explicit joint softmax."""
    torch.manual_seed(0)
    b, n, t, c, heads = 2, 12, 5, 16, 4
    q, kt, ki = torch.randn(b, n, c), torch.randn(b, t, c), torch.randn(b, n, c)
    pseudo = torch.softmax(torch.randn(b, n, n), dim=-1)
    out = joint_layer_pass(q, kt, ki, heads, 0.5, pseudo=pseudo)
    qh, k = q.view(b, n, heads, -1).transpose(1, 2), torch.cat([kt, ki], 1).view(b, t + n, heads, -1).transpose(1, 2)
    probs = torch.softmax(qh.double() @ k.double().transpose(-1, -2) * 0.5, dim=-1)
    torch.testing.assert_close(out.cross.double(), probs[..., :t].mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.image_share.double(), probs[..., t:].sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.similarity.double(), (pseudo.double() * probs[..., t:].mean(1)).sum((1, 2)))
    text = joint_layer_pass(q, kt, ki, heads, 0.5, text_only=True).cross
    torch.testing.assert_close(text.sum(-1), torch.ones(b, n), atol=1e-6, rtol=0)


def test_joint_rule_and_flux_preset():
    """A 57-block Flux layout takes the authors' preset; smaller ones the same relative positions."""
    with torch.device("meta"):
        big = FluxTransformer2DModel(
            num_layers=19, num_single_layers=38, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=16, in_channels=16, axes_dims_rope=[2, 2, 4],
        )  # fmt: skip
    layers = goca_layers(ModelLayout.of(big), GoCAConfig())
    assert layers.rule == "preset flux" and layers.dense.block == "single_transformer_blocks.8"
    assert [x.block for x in layers.propagation] == ["transformer_blocks.12", "transformer_blocks.18"]
    assert len(layers.cross) == 57 and layers.order == 2 and layers.head == "average" and layers.reference == "output"
    rule = joint_rule(ModelLayout.of(big))
    assert (rule.dense, rule.self_blocks) == (layers.dense.block, tuple(x.block for x in layers.propagation))
    small = goca_layers(ModelLayout.of(flux_components()["transformer"]), GoCAConfig())
    assert small.dense.block == "single_transformer_blocks.0"
    assert [x.block for x in small.propagation] == ["transformer_blocks.1", "single_transformer_blocks.0"]
    assert "heads average" in small.describe() and "attention output" in small.describe()


# ------------------------------------------------------------------------------------------ the pipelines


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_off_is_stock_bit_for_bit(name, request):
    ours, stock = request.getfixturevalue(name)
    assert torch.equal(_call(ours, segmentor=None).images, _call(stock).images)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_goca_segments_every_step(name, request):
    ours, stock = request.getfixturevalue(name)
    out = _call(ours, return_maps=True)
    assert torch.isfinite(out.images).all()
    assert (out.images - _call(stock).images).abs().max() > 1e-3
    assert len(out.maps) == len(out.rates) == 3
    for m in out.maps:
        assert m.labels.shape == m.foreground.shape == m.rate.shape == (4, 8, 8)
        assert len(m.tokens) == 4
        assert len({int(x) for x in m.labels.unique()}) > 1  # several regions, named by prompt tokens
    assert all(r.mean.shape == (4,) for r in out.rates)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_sample_independent_of_its_batch_partner(name, request):
    ours, _ = request.getfixturevalue(name)
    a = _call(ours, [PROMPTS[0], OTHER[0]], num_images_per_prompt=1).images
    b = _call(ours, [PROMPTS[0], OTHER[1]], num_images_per_prompt=1).images
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_flux_without_true_cfg_is_stock(flux, caplog):
    ours, stock = flux
    for kw in (dict(true_cfg_scale=1.0), dict(negative_prompt=None)):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            out = _call(ours, **kw, return_maps=True)
            assert not caplog.records  # the default segmentor: silently plain Flux
        assert torch.equal(out.images, _call(stock, **kw).images) and out.maps == []
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        _call(ours, true_cfg_scale=1.0, segmentor="goca")
    assert ["segments nothing" in r.message and "true_cfg_scale=1.0" in r.message for r in caplog.records] == [True]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_scfg_and_bad_sizes_refused_before_any_work(name, request):
    ours, _ = request.getfixturevalue(name)
    calls = []
    handle = ours.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="scfg"):
            _call(ours, segmentor="scfg")
        if name == "sd3":  # stock's own error: sizes must be multiples of VAE scale × patch (16)
            with pytest.raises(ValueError, match="divisible by 16"):
                _call(ours, height=72)
    finally:
        handle.remove()
    assert not calls


def test_flux_long_prompt_truncated_as_stock(flux):
    """A prompt longer than `max_sequence_length`: the same truncation as the encoder; regions named by kept tokens."""
    ours, stock = flux
    long = [" ".join(["a red cat"] * 20), PROMPTS[1]]
    out = _call(ours, long, max_sequence_length=16, return_maps=True, num_images_per_prompt=1)
    assert all(len(row) == 16 for row in out.maps[0].tokens) and out.maps[0].tokens[0][-1] == "</s>"
    assert out.maps[-1].labels.max() < 16
    off = _call(ours, long, max_sequence_length=16, segmentor=None, num_images_per_prompt=1).images
    assert torch.equal(off, _call(stock, long, max_sequence_length=16, num_images_per_prompt=1).images)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_saved_folder_is_a_stock_pipeline_and_loads_as_ours(name, request, tmp_path):
    from goca_scfg.loading import load_pipeline

    ours, stock = request.getfixturevalue(name)
    ours.save_pretrained(tmp_path)
    plain = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(plain) is type(stock)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded) is type(ours)
    assert torch.equal(_call(loaded, segmentor=None).images, _call(plain).images)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_loads_as_in_stock(name, request, tmp_path):
    """A LoRA saved with diffusers' own `save_lora_weights` loads into ours as into stock: equal with segmentation
    off, and GoCA segments through the PEFT-wrapped projections."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    components = sd3_components() if name == "sd3" else flux_components()
    cls, stock_cls = (
        (StableDiffusion3SCFGPipeline, StableDiffusion3Pipeline) if name == "sd3" else (FluxSCFGPipeline, FluxPipeline)
    )
    torch.manual_seed(0)
    donor = components["transformer"]
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    layers = get_peft_model_state_dict(donor)
    stock_cls.save_lora_weights(tmp_path, transformer_lora_layers=layers)
    donor.delete_adapters("default")
    ours, stock = cls(**components), stock_cls(**components)
    ours.load_lora_weights(tmp_path, adapter_name="a")
    plain = _call(ours, segmentor=None).images
    segmented = _call(ours, return_maps=True)
    ours.unload_lora_weights()
    stock.load_lora_weights(tmp_path, adapter_name="a")
    assert torch.equal(plain, _call(stock).images)
    stock.unload_lora_weights()
    assert torch.isfinite(segmented.images).all() and len(segmented.maps) == 3


def test_modular_sd3_guider_segments_every_step():
    """diffusers' modular SD3 with `SCFGGuidance` as its guider: plain with segmentor=None, segmented with GoCA."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    from goca_scfg import SCFGGuidance

    components = {k: v for k, v in sd3_components().items() if k not in ("image_encoder", "feature_extractor")}

    def run(guider):
        pipe = StableDiffusion3AutoBlocks().init_pipeline()
        pipe.update_components(**components, guider=guider)
        return pipe(
            prompt=PROMPTS, negative_prompt=["", ""], num_inference_steps=3, height=64, width=64,
            generator=torch.Generator().manual_seed(0), output="latents",
        )  # fmt: skip

    cfg = run(ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(run(SCFGGuidance(guidance_scale=5.0, segmentor=None)), cfg)
    guider = SCFGGuidance(guidance_scale=5.0, segmentor="goca", return_maps=True, caption=PROMPTS)
    segmented = run(guider)
    assert len(guider.maps) == 3 and [m.step for m in guider.maps] == [0, 1, 2]
    assert guider.maps[0].labels.shape == (2, 8, 8) and (segmented - cfg).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_in_forward_passes_equal_the_passes_from_raw_records(name, request):
    """The plan's in-forward reduction (blocks from the reference on) gives the masks a raw record gives, and keeps
    less: only the earlier blocks hold their queries and keys until the reference exists."""
    from goca_scfg.pipeline_utils import cond_half

    ours, _ = request.getfixturevalue(name)
    kw = dict(height=64, width=64, key_mask=None)
    if name == "flux":
        kw["key_mask"] = ours.context_columns(PROMPTS, 1, 32)
        kw["max_sequence_length"] = 32
    masks, sizes = [], []
    for reducers in (True, False):
        guide = ours.spatial_guidance("goca", PROMPTS, batch_size=2, **kw)
        rows = cond_half if name == "sd3" else None
        torch.manual_seed(0)
        x = torch.randn(4 if name == "sd3" else 2, *((16, 8, 8) if name == "sd3" else (16, 64)))
        args = _transformer_inputs(ours, x)
        with capture_attention(ours.transformer, guide.requests, guide.reducers if reducers else {}, rows) as record:
            with torch.no_grad():
                ours.transformer(**args)
            sizes.append(record.nbytes())
            masks.append(guide.masks(0, record))
    assert torch.equal(masks[0][0], masks[1][0]) and torch.equal(masks[0][1], masks[1][1])
    assert sizes[0] < sizes[1]


def _transformer_inputs(pipe, x):
    """One transformer call's keywords for latents `x` (SD3: the [uncond; cond] batch; Flux: the cond call)."""
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=32)
        ids = pipe._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
        return dict(
            hidden_states=x, timestep=torch.full((2,), 0.5), pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=ids, return_dict=False,
        )  # fmt: skip
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=["", ""])
    return dict(
        hidden_states=x, timestep=torch.full((4,), 500.0), encoder_hidden_states=torch.cat([negative, embeds]),
        pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_bad_input_refused_before_the_denoiser_runs(name, request):
    """The drop-in checks of the other pipelines hold here too (docs/bad_input.md)."""
    ours, _ = request.getfixturevalue(name)
    calls = []
    handle = ours.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    wrong = torch.zeros(4, 3, 8, 8)
    try:
        for kw, error, match in [
            (dict(latents=wrong), ValueError, "latents"),
            (dict(generator=42), TypeError, "generator"),
            (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
            (dict(return_maps="yes"), TypeError, "return_maps"),
            (dict(goca_config="fast"), TypeError, "goca_config"),
        ]:
            base = dict(num_inference_steps=2, height=64, width=64, output_type="pt", **kw)
            if name == "flux":
                base.update(true_cfg_scale=4.0, negative_prompt=["", ""])
            with pytest.raises(error, match=match):
                ours(PROMPTS, **base)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("model", ["tiny-random-sd3", "tiny-random-flux"])
def test_cli_generates_with_joint_models(model, tmp_path, capsys):
    """`goca-scfg generate` on SD3 and Flux: w is Flux's true_cfg_scale (with an empty negative prompt); a
    noise-prediction scheduler for a flow-matching model is one error line, exit 2."""
    from goca_scfg.cli import main

    out, maps = tmp_path / "a.png", tmp_path / "a_maps.png"
    argv = ["generate", "--model", model, "--prompt", "a corgi on a red sofa", "--height", "64", "--width", "64"]
    main([*argv, "--steps", "2", "--out", str(out), "--maps", str(maps)])
    assert out.stat().st_size > 1000 and maps.stat().st_size > 1000
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--steps", "2", "--out", str(tmp_path / "b.png"), "--scheduler", "ddim"])
    assert exit_.value.code == 2 and "--scheduler ddim" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_sd3_skip_layer_guidance_segments_the_batched_call(sd3):
    """SD3's skip-layer guidance adds a cond-only call inside CFG steps: it is not recorded (batch 1 included)."""
    ours, stock = sd3
    kw = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    out = _call(ours, PROMPTS[:1], num_images_per_prompt=1, return_maps=True, **kw)
    assert len(out.maps) == 3 and torch.isfinite(out.images).all()
    off = _call(ours, PROMPTS[:1], num_images_per_prompt=1, segmentor=None, **kw).images
    assert torch.equal(off, _call(stock, PROMPTS[:1], num_images_per_prompt=1, **kw).images)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_call_plan_is_the_calls_plan(name, request):
    """`call_plan` (segment any recorded step yourself) gives the masks the call's own plan gives for a record."""
    ours, _ = request.getfixturevalue(name)
    extra = {"max_sequence_length": 32} if name == "flux" else {}
    plan = ours.call_plan("goca", PROMPTS, 64, 64, **extra)
    kw = dict(height=64, width=64, batch_size=2)
    if name == "flux":
        kw.update(key_mask=ours.context_columns(PROMPTS, 1, 32), max_sequence_length=32)
    else:
        kw.update(key_mask=ours.context_columns(torch.zeros(4, 77 + 256, 1)))
    call = ours.spatial_guidance("goca", PROMPTS, **kw)
    assert plan.requests == call.requests and plan.tokens == call.tokens
    torch.manual_seed(0)
    x = torch.randn(4 if name == "sd3" else 2, *((16, 8, 8) if name == "sd3" else (16, 64)))
    args = _transformer_inputs(ours, x)
    from goca_scfg.pipeline_utils import cond_half

    masks = []
    for guide in (plan, call):
        with capture_attention(
            ours.transformer, guide.requests, guide.reducers, cond_half if name == "sd3" else None
        ) as record:
            with torch.no_grad():
                ours.transformer(**args)
            masks.append(guide.masks(0, record)[0])
    assert torch.equal(*masks)
