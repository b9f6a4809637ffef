import re
from pathlib import Path

import pytest
import torch

from vae.lmr import LMRConfig, apply_lmr, block_mask, sample_mask_ratio

C = 4


def always(ratio: float) -> LMRConfig:
    """A config that always draws ``ratio`` (at 256p and 512p)."""
    ratios = [0.0, 0.25, 0.5, 0.75]
    probs = [1.0 if r == ratio else 0.0 for r in ratios]
    return LMRConfig(mask_probs={256: probs, 512: probs})


def masked_positions(z_masked: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) bool: where every channel equals the token."""
    return (z_masked == token).all(dim=1)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_masked_fraction_equals_ratio_and_positions_shared_across_batch(ratio):
    z = torch.randn(3, C, 5, 16, 16)  # 256p latent: 1x1x1 blocks
    token = torch.randn(1, C, 1, 1, 1)
    out, used = apply_lmr(z, token, always(ratio), training=True, resolution=256, generator=torch.Generator().manual_seed(0))
    assert used == ratio
    masked = masked_positions(out, token)
    assert masked[0].sum().item() == int(5 * 16 * 16 * ratio)
    assert torch.equal(masked[0], masked[1]) and torch.equal(masked[0], masked[2])
    # Unmasked positions are untouched; masked ones hold the token in every channel.
    keep = ~masked[:, None].expand_as(z)
    assert torch.equal(out[keep], z[keep])
    assert torch.equal(out.permute(0, 2, 3, 4, 1)[masked], token.flatten().expand(int(masked.sum()), C))


def test_512p_masks_whole_2x2x2_blocks():
    z = torch.randn(2, C, 5, 32, 32)
    token = torch.full((1, C, 1, 1, 1), 7.0)
    out, used = apply_lmr(z, token, always(0.5), training=True, resolution=512, generator=torch.Generator().manual_seed(1))
    masked = masked_positions(out, token)[0]
    assert masked[4].sum() == 0  # the trailing frame fills no whole temporal block
    blocks = masked[:4].reshape(2, 2, 16, 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    assert torch.all(blocks.all(dim=1) | ~blocks.any(dim=1))  # each block all-or-nothing
    assert blocks.all(dim=1).sum().item() == int(5 * 32 * 32 * 0.5 // 8)


def test_block_clipped_for_512p_image_and_at_least_one_block():
    mask = block_mask((1, 32, 32), 0.25, (2, 2, 2), torch.Generator().manual_seed(0))
    assert mask.sum().item() == 32 * 32 // 4
    assert block_mask((1, 4, 4), 0.01, (1, 1, 1)).sum().item() == 1
    assert block_mask((1, 4, 4), 0.0, (1, 1, 1)).sum().item() == 0


def test_eval_and_disabled_never_mask():
    z = torch.randn(2, C, 5, 16, 16)
    token = torch.randn(1, C, 1, 1, 1)
    out, used = apply_lmr(z, token, always(0.75), training=False, resolution=256)
    assert out is z and used == 0.0
    config = always(0.75)
    config.enabled = False
    out, used = apply_lmr(z, token, config, training=True, resolution=256)
    assert out is z and used == 0.0


def test_deterministic_given_generator():
    z = torch.randn(1, C, 5, 16, 16)
    token = torch.randn(1, C, 1, 1, 1)
    a, ra = apply_lmr(z, token, LMRConfig(), True, 256, torch.Generator().manual_seed(3))
    b, rb = apply_lmr(z, token, LMRConfig(), True, 256, torch.Generator().manual_seed(3))
    assert ra == rb and torch.equal(a, b)


@pytest.mark.parametrize("resolution,probs", [(256, [0.7, 0.1, 0.1, 0.1]), (512, [0.6, 0.1, 0.15, 0.15])])
def test_ratio_distribution(resolution, probs):
    config = LMRConfig()
    generator = torch.Generator().manual_seed(0)
    got_probs, _ = config.settings_for(resolution)
    assert got_probs == probs
    draws = [sample_mask_ratio(config.mask_ratios, got_probs, generator) for _ in range(4000)]
    for ratio, p in zip(config.mask_ratios, probs):
        assert sum(d == ratio for d in draws) / len(draws) == pytest.approx(p, abs=0.025)


def test_gradient_flows_into_mask_token_and_latent():
    z = torch.randn(2, C, 5, 16, 16, requires_grad=True)
    token = torch.randn(1, C, 1, 1, 1, requires_grad=True)
    out, ratio = apply_lmr(z, token, always(0.25), True, 256, torch.Generator().manual_seed(0))
    out.sum().backward()
    n_masked = int(5 * 16 * 16 * ratio)
    torch.testing.assert_close(token.grad.flatten(), torch.full((C,), 2.0 * n_masked))
    assert z.grad.sum().item() == pytest.approx(2 * C * (5 * 16 * 16 - n_masked))


def test_clear_errors():
    token = torch.randn(1, C, 1, 1, 1)
    with pytest.raises(ValueError, match="resolution 384"):
        apply_lmr(torch.randn(1, C, 5, 24, 24), token, LMRConfig(), training=True, resolution=384)
    with pytest.raises(ValueError, match="mask_token"):
        apply_lmr(torch.randn(1, C + 1, 5, 16, 16), token, LMRConfig(), training=True, resolution=256)


@pytest.mark.parametrize("kwargs,key", [
    ({"mask_ratios": [0.0, 1.5]}, "lmr.mask_ratios"),
    ({"mask_probs": {256: [0.5, 0.5, 0.5, 0.5], 512: [1, 0, 0, 0]}}, "lmr.mask_probs.256"),
    ({"block_sizes": {256: [1, 1], 512: [2, 2, 2]}}, "lmr.block_sizes.256"),
    ({"block_sizes": {256: [1, 1, 1]}}, "lmr.mask_probs/block_sizes"),
])
def test_config_validation_names_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LMRConfig(**kwargs).validate()
    LMRConfig().validate()


def test_token_init_std_validation_names_key():
    with pytest.raises(ValueError, match="lmr.token_init_std"):
        LMRConfig(token_init_std=-0.1).validate()
    LMRConfig(token_init_std=0.0).validate()


def _built_vae(tmp_path, *overrides):
    from infra.config import load_config
    from vae.train import build_vae
    from vae.train_config import VAETrainConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(VAETrainConfig, root / "configs/vae/tiny_ssvae_patch2.yaml",
                      [f"run.output_dir={tmp_path}/run", *overrides])
    torch.manual_seed(0)
    return build_vae(cfg)


def test_token_init_std_scales_only_the_mask_token(tmp_path):
    released = _built_vae(tmp_path)
    scaled = _built_vae(tmp_path, "loss.lmr.token_init_std=0.2")
    zero = _built_vae(tmp_path, "loss.lmr.token_init_std=0.0")
    assert released.mask_token.abs().mean() > 0.3  # the released init: a standard normal draw
    torch.testing.assert_close(scaled.mask_token, 0.2 * released.mask_token)
    assert torch.count_nonzero(zero.mask_token) == 0
    others = {k: v for k, v in released.state_dict().items() if k != "mask_token"}
    for name, value in scaled.state_dict().items():
        if name != "mask_token":
            torch.testing.assert_close(value, others[name], msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["init_from=runs/some_export"], "model built from scratch, but init_from is 'runs/some_export'"),
    (["loss.lmr.enabled=false"], "loss.lmr.enabled is false"),
])
def test_token_init_std_needs_a_fresh_model_that_trains_lmr(tmp_path, overrides, message):
    """A loaded token (ours, the released one, or one a diffusers loader makes afresh) is not what the option
    initialises, and without LMR the token is never used: both are refused at load, naming the key."""
    from infra.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss\.lmr\.token_init_std.*" + re.escape(message)):
        _built_vae(tmp_path, "loss.lmr.token_init_std=0.0", *overrides)
