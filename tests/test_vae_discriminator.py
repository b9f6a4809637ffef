import pytest
import torch

from vae.discriminator import (DiscriminatorConfig, ImageVideoDiscriminator, hinge_discriminator_loss,
                               hinge_generator_loss)

TINY = DiscriminatorConfig(ndf=4, max_spatial_down=4, max_temporal_down=2)


def tiny_disc(config: DiscriminatorConfig = TINY) -> ImageVideoDiscriminator:
    torch.manual_seed(0)
    return ImageVideoDiscriminator(config)


@pytest.mark.parametrize("frames,video_frames", [(1, 1), (5, 3), (9, 5)])
def test_logit_shapes_images_and_videos(frames, video_frames):
    image_logits, video_logits = tiny_disc()(torch.randn(2, 3, frames, 32, 32))
    assert image_logits.shape == (2, 1, frames, 6, 6)  # 32 / 4 = 8, minus 2 for the 4x4 head convs
    assert video_logits.shape == (2, 1, video_frames, 8, 8)


def test_released_geometry_with_small_width():
    disc = tiny_disc(DiscriminatorConfig(ndf=2, max_spatial_down=16, max_temporal_down=4)).eval()
    image_logits, video_logits = disc(torch.randn(1, 3, 17, 48, 48))
    assert image_logits.shape == (1, 1, 17, 1, 1)
    assert video_logits.shape == (1, 1, 5, 3, 3)  # 17 -> 9 -> 5 frames, space / 16
    names = set(disc.state_dict())
    # Reference key layout (loss.discriminator.* of the released checkpoint), spectral norm on the convs.
    for key in ("patchgan_2d.input_layer.0.weight_orig", "patchgan_2d.blocks.2.0.weight_u",
                "patchgan_2d.out_layer.2.weight", "patchgan_3d.conv_in.0.conv.weight_orig",
                "patchgan_3d.down_blocks.0.0.conv.weight_orig", "patchgan_3d.down_blocks.1.0.weight_orig",
                "patchgan_3d.out.2.conv.weight_v"):
        assert key in names, key


def test_video_branch_is_causal_and_image_branch_is_per_frame():
    disc = tiny_disc().eval()
    x = torch.randn(1, 3, 5, 32, 32)
    y = x.clone()
    y[:, :, 3:] = torch.randn_like(y[:, :, 3:])
    (img_x, vid_x), (img_y, vid_y) = disc(x), disc(y)
    # Video logit frame j covers input frames 2j-1..2j (causal, stride 2): frames 0 and 1 never see frames 3, 4.
    torch.testing.assert_close(vid_x[:, :, :2], vid_y[:, :, :2])
    assert not torch.allclose(vid_x[:, :, 2], vid_y[:, :, 2])
    torch.testing.assert_close(img_x[:, :, :3], img_y[:, :, :3])
    assert not torch.allclose(img_x[:, :, 3:], img_y[:, :, 3:])


def test_spectral_norm_bounds_the_weights():
    disc = tiny_disc().train()
    x = torch.randn(2, 3, 5, 32, 32)
    for _ in range(20):  # power iterations run in training-mode forwards
        disc(x)
    conv = disc.patchgan_2d.blocks[0][0]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, abs=0.05)


def test_hinge_losses_by_hand():
    real = (torch.tensor([0.5, 2.0]), torch.tensor([-1.0]))
    fake = (torch.tensor([-2.0, 0.0]), torch.tensor([0.5]))
    # branch 0: 0.5 * (mean(0.5, 0) + mean(0, 1)) = 0.375; branch 1: 0.5 * (2 + 1.5) = 1.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx((0.375 + 1.75) / 2)
    assert hinge_generator_loss(fake).item() == pytest.approx((1.0 + -0.5) / 2)


def test_discriminator_learns_to_separate_fixed_fakes():
    disc = tiny_disc().train()
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 5, 32, 32, generator=gen) * 2 - 1
    fake = (real + 0.5 * torch.randn(real.shape, generator=gen)).clamp(-1, 1)
    optimizer = torch.optim.Adam(disc.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = hinge_discriminator_loss(disc(real), disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_inputs_raise():
    disc = tiny_disc()
    with pytest.raises(ValueError, match="expected"):
        disc(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 12x12"):
        disc(torch.randn(1, 3, 1, 8, 8))


@pytest.mark.parametrize("kwargs,key", [({"ndf": 0}, "ndf"), ({"max_spatial_down": 12}, "max_spatial_down"),
                                        ({"max_temporal_down": 1}, "max_temporal_down"),
                                        ({"max_spatial_down": 4, "max_temporal_down": 8}, "max_temporal_down")])
def test_config_validation_names_key(kwargs, key):
    with pytest.raises(ValueError, match=f"discriminator.*{key}"):
        DiscriminatorConfig(**kwargs).validate()
