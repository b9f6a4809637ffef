"""Chunked (cached causal context) and tiled SSVAE inference against one whole pass, on a tiny model."""

import pytest
import torch

from vae.config import DecoderConfig, EncoderConfig, SSVAEConfig
from vae.inference import (
    InferenceConfig,
    blend_tiles,
    causal_streaming,
    decode_latents,
    encode_moments_chunked,
    encode_video,
)
from vae.model import SSVAE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    common = dict(ch=4, ch_mult=(2, 4, 8, 16, 16), num_res_blocks=1, num_mid_blocks=2, z_channels=8)
    m = SSVAE(SSVAEConfig(encoder=EncoderConfig(**common), decoder=DecoderConfig(**common))).eval()
    for p in m.parameters():  # wake the zero-initialised attention projections
        if p.ndim == 4 and p.shape[-1] == 1:
            torch.nn.init.normal_(p, std=0.05)
    m.set_latent_stats(torch.linspace(-0.5, 0.5, 8), torch.linspace(0.5, 1.5, 8))
    return m


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_encode_equals_whole(model, chunk):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 13, 32, 32)
    with torch.no_grad():
        whole = model.encoder(x)
        chunked = encode_moments_chunked(model, x, chunk)
    assert chunked.shape == whole.shape == (1, 16, 4, 2, 2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    # The streaming state does not leak into later whole-video calls.
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), whole, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_equals_whole(model, chunk):
    torch.manual_seed(2)
    z = torch.randn(1, 8, 4, 2, 2)
    cfg = InferenceConfig(chunk_latent_frames=chunk)
    with torch.no_grad():
        whole = model.decode(z)
    chunked = decode_latents(model, z, cfg)
    assert chunked.shape == whole.shape == (1, 3, 13, 32, 32)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_encode_video_chunked_matches_model_encode(model):
    x = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        ref = model.encode(x)
    torch.testing.assert_close(encode_video(model, x, InferenceConfig(chunk_latent_frames=1)), ref, atol=1e-5, rtol=0)


def test_streaming_context_is_reset_between_streams(model):
    x = torch.randn(1, 3, 5, 16, 16)
    with torch.no_grad():
        a = encode_moments_chunked(model, x, 1)
        b = encode_moments_chunked(model, x, 1)
        with causal_streaming(model.encoder):
            model.encoder(x[:, :, :1])
        c = encode_moments_chunked(model, x, 1)
    assert torch.equal(a, b) and torch.equal(a, c)


def smooth_video(t: int, size: int) -> torch.Tensor:
    lin = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    frames = [torch.stack([torch.sin(2 * xx + k * 0.1), torch.cos(3 * yy), xx * yy]) for k in range(t)]
    return torch.stack(frames, dim=1)[None] * 0.8


def test_tiled_encode_and_decode_close_to_untiled(model):
    # A random network's receptive field spans the whole frame, so tiles only approximate; the error must be
    # moderate and shrink as tiles grow.
    x = smooth_video(1, 96)

    def rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    with torch.no_grad():
        z_ref = model.encode(x)
        v_ref = model.decode(z_ref)
    errors = {}
    for tile in (32, 64):
        cfg = InferenceConfig(tile_size=tile, tile_overlap=tile // 2)
        z = encode_video(model, x, cfg)
        v = decode_latents(model, z_ref, cfg)
        assert z.shape == z_ref.shape == (1, 8, 1, 6, 6)
        assert v.shape == v_ref.shape == (1, 3, 1, 96, 96)
        errors[tile] = rel(z, z_ref), rel(v, v_ref)
    assert errors[64][0] < 0.3 and errors[64][1] < 0.1
    assert errors[64][0] < errors[32][0] and errors[64][1] < errors[32][1]


def test_blend_tiles_reproduces_pointwise_function():
    x = torch.randn(1, 2, 1, 40, 56)
    y = blend_tiles(lambda t: t * 2 + 1, x, tile=16, overlap=8, scale=1)
    torch.testing.assert_close(y, x * 2 + 1)


def test_inference_config_validation(model):
    with pytest.raises(ValueError, match="tile_size"):
        InferenceConfig(tile_size=40).validate(16)
    with pytest.raises(ValueError, match="tile_overlap"):
        InferenceConfig(tile_size=64, tile_overlap=64).validate(16)
    with pytest.raises(ValueError, match="chunk_latent_frames"):
        encode_video(model, torch.zeros(1, 3, 5, 16, 16), InferenceConfig(chunk_latent_frames=0))
    with pytest.raises(ValueError, match="frame count"):
        encode_video(model, torch.zeros(1, 3, 6, 16, 16))
