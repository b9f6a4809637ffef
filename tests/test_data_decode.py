import numpy as np
import pytest
import torch

from infra.data.buckets import frame_offsets, frame_span, start_frame
from infra.data.decode import TruncatedVideo, decode_all, decode_image, open_video
from infra.data.shard_writer import encode_image
from infra.data.config import DataConfig
from infra.data.transforms import crop_box, frames_to_tensor
from test_data_helpers import LEVEL0, LEVEL_STEP, video_entry


@pytest.fixture(scope="module")
def mp4():
    return video_entry(40, 24.0)[0]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_decoder_returns_exactly_the_requested_frames(mp4, decoder):
    indices = [3, 6, 9, 21, 21, 39]  # a jump past key frames, a repeat, the last frame
    source = open_video(mp4, decoder)
    assert source.num_frames == 40 and source.fps == pytest.approx(24.0)
    frames = source.get(indices)
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    levels = frames.reshape(6, -1).mean(1) - 4  # the ramp adds 4 on average
    np.testing.assert_allclose(levels, LEVEL0 + LEVEL_STEP * np.asarray(indices), atol=1.5)


def test_decoders_agree_bit_for_bit(mp4):
    indices = list(range(5, 38, 3))
    assert np.array_equal(open_video(mp4, "decord").get(indices), open_video(mp4, "pyav").get(indices))
    assert np.array_equal(decode_all(mp4, "decord"), decode_all(mp4, "pyav"))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_frames_past_the_end_raise_truncated(mp4, decoder):
    with pytest.raises(TruncatedVideo):
        open_video(mp4, decoder).get([30, 45])


def test_unknown_decoder_is_refused(mp4):
    with pytest.raises(ValueError, match="decoder"):
        open_video(mp4, "opencv")


def test_frame_offsets_follow_the_target_rate():
    assert frame_offsets(5, 24.0, 8.0) == [0, 3, 6, 9, 12]
    assert frame_span(17, 29.97, 8.0) == 61  # 16 steps of 3.746 source frames
    assert frame_offsets(3, 8.0, 16.0) == [0, 1, 1]  # above the source rate frames repeat
    # every start keeps the span inside the clip, and both ends are reachable
    starts = {start_frame(u, 40, 13) for u in np.linspace(0, 0.999999, 1000)}
    assert starts == set(range(0, 28))


def test_crop_box_covers_target_and_centre_crop_is_centred():
    assert crop_box(300, 534, 256, 256, 0.5, 0.5) == (0, 117, 300, 300)
    assert crop_box(300, 534, 256, 256, 0.0, 1.0) == (0, 234, 300, 300)
    assert crop_box(720, 1280, 144, 256, 0.5, 0.5) == (0, 0, 720, 1280)
    top, left, h, w = crop_box(100, 100, 64, 128, 0.5, 0.5)  # wider target: crop rows
    assert (w, h, left) == (100, 50, 0) and top == 25


def test_resize_cuts_crops_out_of_frames_seen_at_that_size():
    # 64-pixel frames (from 405x720): a 32x32 crop covers half the short side, not all of it.
    assert crop_box(405, 720, 32, 32, 0.5, 0.5, resize=64) == (102, 259, 202, 202)
    assert crop_box(64, 64, 32, 32, 0.0, 1.0, resize=64) == (0, 32, 32, 32)  # no rescaling, a plain crop
    assert crop_box(64, 64, 32, 32, 0.5, 0.5, resize=0) == (0, 0, 64, 64)  # without resize: the whole frame
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    frames[:, :32, :32] = 255  # top-left quarter white
    assert torch.equal(frames_to_tensor(frames, 32, 32, 0.0, 0.0, resize=64), torch.ones(3, 1, 32, 32))
    with pytest.raises(ValueError, match="resize"):
        DataConfig(video_roots="x", height=32, width=32, resize=16).validate()


def test_frames_to_tensor_shape_range_and_content():
    frames = np.zeros((2, 30, 60, 3), np.uint8)
    frames[:, :, 30:] = 255  # right half white
    x = frames_to_tensor(frames, 16, 16, 0.5, 1.0)  # rightmost square: all white
    assert x.shape == (3, 2, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    x = frames_to_tensor(frames, 16, 16, 0.5, 0.0)
    assert torch.allclose(x, -torch.ones_like(x))
    centre = frames_to_tensor(frames, 16, 16)
    assert centre.min() == -1 and centre.max() == 1


def test_image_decodes_as_one_frame():
    image = np.full((20, 30, 3), 200, np.uint8)
    frames = decode_image(encode_image(image, "png"))
    assert frames.shape == (1, 20, 30, 3) and np.array_equal(frames[0], image)
