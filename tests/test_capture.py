"""Attention capture: recorded maps equal an explicit softmax, hooks leave the UNet exactly as it was."""

import pytest
import torch

from goca_scfg.capture import capture_attention
from goca_scfg.layout import ModelLayout
from goca_scfg.segment.goca import default_dense_block, default_self_blocks

pytestmark = pytest.mark.rounding  # compares runs: .ci/run's portability job runs it again


@pytest.fixture()
def unet(tiny_components_factory):
    return tiny_components_factory()["unet"]


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(batch, 77, 32, generator=g)


def _all_requests(unet):
    return {x.name: {"q", "k", "o"} for x in ModelLayout.of(unet).layers}


def _hook_counts(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_layers_located_like_sd15(unet):
    layers = ModelLayout.of(unet).layers
    cross = [x for x in layers if x.kind == "cross"]
    assert len(layers) == 32 and len(cross) == 16
    assert [x.factor for x in cross] == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]  # call order (§0.1)
    assert cross[6].block.startswith("mid_block")
    assert default_dense_block(ModelLayout.of(unet)) == "up_blocks.2.attentions.1.transformer_blocks.0"
    assert default_self_blocks(ModelLayout.of(unet)) == (
        "up_blocks.3.attentions.0.transformer_blocks.0",
        "up_blocks.3.attentions.1.transformer_blocks.0",
        "down_blocks.0.attentions.1.transformer_blocks.0",
    )


def test_captured_maps_equal_explicit_softmax(unet):
    """Probabilities from the recorded q/k equal diffusers' explicit `get_attention_scores` on the layer's inputs."""
    seen = {}
    modules = dict(unet.named_modules())
    names = [x.name for x in ModelLayout.of(unet).layers]

    def pre(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] = (hidden, kwargs.get("encoder_hidden_states"))

        return hook

    handles = [modules[n].register_forward_pre_hook(pre(n), with_kwargs=True) for n in names]
    try:
        with capture_attention(unet, _all_requests(unet)) as record, torch.no_grad():
            unet(*_inputs())
            for name in names:
                attn = modules[name]
                hidden, context = seen[name]
                context = hidden if context is None else context
                q = attn.head_to_batch_dim(attn.to_q(hidden))
                k = attn.head_to_batch_dim(attn.to_k(context))
                ref = attn.get_attention_scores(q, k).view(hidden.shape[0], attn.heads, q.shape[1], k.shape[1])
                got = record[name].probs()
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
                # §6.11: the recorded per-head outputs pushed through W_o are the out-projection minus its bias
                o, out = record[name].o, attn.to_out[0]
                torch.testing.assert_close(o @ record[name].w_out.t(), out(o) - out.bias, atol=1e-5, rtol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_capture_keeps_outputs_and_processors_and_always_unhooks(unet):
    x = _inputs()
    with torch.no_grad():
        before = unet(*x).sample
        processors = dict(unet.attn_processors)
        hooks = _hook_counts(unet)
        with capture_attention(unet, _all_requests(unet)):
            during = unet(*x).sample
            assert _hook_counts(unet) > hooks
        after = unet(*x).sample
    assert torch.equal(before, during) and torch.equal(before, after)
    assert _hook_counts(unet) == hooks
    assert all(unet.attn_processors[k] is v for k, v in processors.items())

    with pytest.raises(RuntimeError, match="boom"), capture_attention(unet, _all_requests(unet)):
        raise RuntimeError("boom")
    assert _hook_counts(unet) == hooks
    with capture_attention(unet, {}), pytest.raises(RuntimeError, match="already active"):
        with capture_attention(unet, {}):
            pass
    assert _hook_counts(unet) == hooks


def test_capture_rejects_unknown_layers(unet):
    with pytest.raises(ValueError, match="not an attention module"), capture_attention(unet, {"nope": {"q"}}):
        pass
    name = ModelLayout.of(unet).layers[0].name
    with pytest.raises(ValueError, match="unknown capture fields"), capture_attention(unet, {name: {"v"}}):
        pass


def test_capture_sees_lora_projections(unet):
    """LoRA (PEFT-wrapped to_q/to_k) keeps working: the recorded q is the adapted projection."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    name = [x.name for x in ModelLayout.of(unet).layers if x.kind == "cross"][0]
    attn = dict(unet.named_modules())[name]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with capture_attention(unet, {name: {"q"}}) as record, torch.no_grad():
            unet(*_inputs())
            adapted = attn.to_q(seen["h"])
            base = attn.to_q.base_layer(seen["h"])
            assert torch.equal(record[name].q, adapted) and not torch.allclose(adapted, base)
    finally:
        handle.remove()


def test_reducers_keep_only_their_result(unet):
    """A `Reduce` runs inside the forward pass: the record holds its result (and `keep`), not the raw tensors."""
    from goca_scfg.capture import Reduce

    cross = [x.name for x in ModelLayout.of(unet).layers if x.kind == "cross"][:2]
    requests = {n: {"q", "k", "o"} for n in cross}
    x = _inputs()
    with torch.no_grad(), capture_attention(unet, requests) as raw:
        unet(*x)
        expected = {n: raw[n].probs(head_mean=True) for n in cross}
    reducers = {
        cross[0]: Reduce(lambda t: t.probs(head_mean=True)),
        cross[1]: Reduce(lambda t: t.o * 2, frozenset({"q"})),
    }
    with torch.no_grad(), capture_attention(unet, requests, reducers) as record:
        out = unet(*x).sample
        first, second = record[cross[0]], record[cross[1]]
        assert first.q is None and first.k is None and first.o is None
        torch.testing.assert_close(first.reduced, expected[cross[0]])
        assert second.q is not None and second.k is None and second.o is None and second.reduced is not None
        held = [first.reduced, second.q, second.reduced]
        assert record.nbytes() == sum(t.numel() * t.element_size() for t in held)
        record.clear()
        assert record.nbytes() == 0
    with torch.no_grad():
        assert torch.equal(out, unet(*x).sample)
