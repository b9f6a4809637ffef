"""The CogVideoX-style transformer: numbers equal diffusers' CogVideoXTransformer3DModel after conversion,
shapes, positions, checkpointing, the replaceable attention function and input errors."""

import pytest
import torch

from dit import CogVideoXTransformer, DiTConfig, diffusers_config, from_diffusers, set_attention_fn
from dit.convert import diffusers_rotary_emb
from dit.embeddings import patchify, unpatchify

diffusers = pytest.importorskip("diffusers")

TEXT_LEN = 8  # == tiny presets' max_text_seq_length: diffusers' sin-cos table requires it


def tiny_config(**overrides) -> DiTConfig:
    return DiTConfig.preset("tiny", **overrides)


def random_reference(config: DiTConfig, seed: int = 0):
    """A diffusers CogVideoXTransformer3DModel of config whose every parameter (LayerNorms, zero biases
    included) is perturbed, so that a swapped or missing weight shows in the outputs."""
    torch.manual_seed(seed)
    ref = diffusers.CogVideoXTransformer3DModel(**diffusers_config(config)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def inputs(config: DiTConfig, frames: int, height: int, width: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=g)
    text = torch.randn(batch, TEXT_LEN, config.text_embed_dim, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    return latents, text, timestep


def reference_output(ref, config, latents, text, timestep):
    rope = diffusers_rotary_emb(config, latents.shape[1], latents.shape[3], latents.shape[4])
    with torch.no_grad():
        return ref(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0]


@pytest.mark.parametrize(
    "positional_embedding, patch_size, patch_size_t, frames, height, width",
    [
        ("rope", 1, None, 3, 8, 8),  # 5B design with a 16x VAE: patch 1
        ("rope", 2, None, 3, 8, 8),  # 5B design as shipped: patch 2
        ("rope", 2, None, 2, 6, 12),  # another aspect ratio: 1.0's rope grid is relative to the base size
        ("sincos", 1, None, 3, 8, 8),  # 2B design
        ("sincos", 2, None, 2, 6, 10),  # sin-cos table recomputed for a non-base size
        ("rope", 2, 2, 4, 8, 8),  # CogVideoX 1.5: 2-frame patches, absolute rope grid
        ("learned", 2, None, 3, 8, 8),  # 5B-I2V: rope plus a learned table over text and video
    ],
)
def test_matches_diffusers(positional_embedding, patch_size, patch_size_t, frames, height, width):
    config = tiny_config(positional_embedding=positional_embedding, patch_size=patch_size, patch_size_t=patch_size_t,
                         in_channels=48, out_channels=48)
    ref = random_reference(config)
    ours = from_diffusers(ref).eval()
    latents, text, timestep = inputs(config, frames, height, width)
    expected = reference_output(ref, config, latents, text, timestep)
    with torch.no_grad():
        got = ours(latents, text, timestep)
    assert got.shape == latents.shape
    assert expected.abs().mean() > 0.1  # a meaningful comparison, not of near-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_gradients_match_diffusers():
    config = tiny_config(positional_embedding="rope", patch_size=1)
    ref = random_reference(config)
    ours = from_diffusers(ref)
    latents, text, timestep = inputs(config, 2, 4, 4)
    rope = diffusers_rotary_emb(config, 2, 4, 4)
    ref(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0].square().mean().backward()
    ours(latents, text, timestep).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_grads[name].grad
        torch.testing.assert_close(p.grad.reshape(expected.shape), expected, atol=1e-5, rtol=1e-4, msg=name)


def test_patchify_roundtrip_and_token_order():
    x = torch.randn(2, 4, 3, 6, 8)
    tokens = patchify(x, 2, 2)
    assert tokens.shape == (2, 2 * 3 * 4, 3 * 2 * 2 * 2)
    assert torch.equal(unpatchify(tokens, 4, 6, 8, 2, 2), x)
    # Token 1 is the second patch column of the first row of the first frame pair.
    assert torch.equal(tokens[0, 1].reshape(3, 2, 2, 2), x[0, 0:2, :, 0:2, 2:4].transpose(0, 1))


def test_patch_one_gives_cogvideox_token_count_for_16x_vae():
    # 480x720, 13 latent frames: an 8x VAE + patch 2 and a 16x VAE + patch 1 both give 13*30*45 tokens.
    cfg = DiTConfig.preset("cogvideox-5b")
    ssvae = cfg.for_vae(latent_channels=48, spatial_compression=16)
    assert (ssvae.in_channels, ssvae.output_channels, ssvae.patch_size) == (48, 48, 1)
    assert (ssvae.sample_height, ssvae.sample_width) == (30, 45)
    assert patchify(torch.zeros(1, 13, 16, 60, 90), cfg.patch_size, 1).shape[1] == 13 * 30 * 45
    assert patchify(torch.zeros(1, 13, 48, 30, 45), ssvae.patch_size, 1).shape[1] == 13 * 30 * 45


def test_presets_have_cogvideox_sizes():
    for name, layers, width, heads, pos in [("cogvideox-2b", 30, 1920, 30, "sincos"), ("cogvideox-5b", 42, 3072, 48, "rope")]:
        cfg = DiTConfig.preset(name)
        assert (cfg.num_layers, cfg.inner_dim, cfg.num_attention_heads, cfg.positional_embedding) == (layers, width, heads, pos)
    with torch.device("meta"):
        n = sum(p.numel() for p in CogVideoXTransformer(DiTConfig.preset("cogvideox-2b")).parameters())
        ref = diffusers.CogVideoXTransformer3DModel(**diffusers_config(DiTConfig.preset("cogvideox-2b")))
    assert n == sum(p.numel() for p in ref.parameters())
    assert 1.6e9 < n < 1.8e9


def test_gradient_checkpointing_gives_same_loss_and_grads():
    config = tiny_config()
    torch.manual_seed(0)
    plain = CogVideoXTransformer(config)
    ckpt = CogVideoXTransformer(config.replace(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    latents, text, timestep = inputs(config, 2, 4, 4)
    for model in (plain, ckpt):
        model(latents, text, timestep).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_text_mask_hides_masked_tokens():
    torch.manual_seed(0)
    model = CogVideoXTransformer(tiny_config()).eval()
    latents, text, timestep = inputs(model.config, 2, 4, 4)
    mask = torch.ones(2, TEXT_LEN, dtype=torch.bool)
    mask[:, 5:] = False
    changed = text.clone()
    changed[:, 5:] = torch.randn_like(changed[:, 5:])
    with torch.no_grad():
        a = model(latents, text, timestep, text_mask=mask)
        b = model(latents, changed, timestep, text_mask=mask)
        c = model(latents, changed, timestep)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_attention_fn_is_replaceable():
    torch.manual_seed(0)
    model = CogVideoXTransformer(tiny_config()).eval()
    latents, text, timestep = inputs(model.config, 2, 4, 4)
    with torch.no_grad():
        expected = model(latents, text, timestep)
    seen = []

    def wrap(fn):
        def wrapped(q, k, v, key_mask=None):
            seen.append(q.shape)
            return fn(q, k, v, key_mask)
        return wrapped

    set_attention_fn(model, wrap)
    with torch.no_grad():
        got = model(latents, text, timestep)
    torch.testing.assert_close(got, expected)
    # (B, heads, text + video tokens, head_dim), once per layer; tiny patches 2x2: 2 frames x 2 x 2 tokens
    assert seen == [torch.Size([2, 4, TEXT_LEN + 2 * 2 * 2, 16])] * model.config.num_layers


def test_flash_backend_without_flash_attn_fails_clearly():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="flash-attn"):
        CogVideoXTransformer(tiny_config(attention_backend="flash"))


def test_bad_inputs_and_configs_raise():
    model = CogVideoXTransformer(tiny_config())
    latents, text, timestep = inputs(model.config, 2, 4, 4)
    with pytest.raises(ValueError, match="latents"):
        model(latents[:, :, :8], text, timestep)
    with pytest.raises(ValueError, match="text_states"):
        model(latents, text[..., :5], timestep)
    odd = CogVideoXTransformer(tiny_config(patch_size=2))
    with pytest.raises(ValueError, match="patches"):
        odd(torch.randn(1, 2, 16, 5, 4), text[:1], timestep[:1])
    with pytest.raises(ValueError, match="positional_embedding"):
        tiny_config(positional_embedding="alibi")
    with pytest.raises(ValueError, match="attention_head_dim"):
        tiny_config(attention_head_dim=24)
    with pytest.raises(ValueError, match="attention_backend"):
        tiny_config(attention_backend="xformers")
    with pytest.raises(ValueError, match="num_layrs"):
        tiny_config(num_layrs=3)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.preset("cogvideox-9b")


def test_adaln_zero_init_starts_from_identity_blocks_and_a_zero_prediction():
    from dit.transformer import adaln_zero_init

    torch.manual_seed(0)
    config = DiTConfig.preset("tiny", in_channels=8).replace(patch_size=2)
    model = CogVideoXTransformer(config)
    adaln_zero_init(model)
    x = torch.randn(2, 3, 8, 8, 8)
    text = torch.randn(2, config.max_text_seq_length, config.text_embed_dim)
    out = model(x, text, torch.tensor([10, 500]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    out.square().sum().backward()  # zero output, but the output projection still learns first
    out = model(x, text, torch.tensor([10, 500]))
    (out - torch.randn_like(out)).square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0
