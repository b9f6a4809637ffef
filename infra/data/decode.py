"""Decoding: only the frames a sample needs from mp4 bytes (decord or PyAV), and images.

Both back-ends return the same thing: uint8 frames (T, H, W, 3) at the file's own resolution for the requested frame
indices (which must be non-decreasing; repeats are allowed, for target rates above the source rate). Resizing is done
afterwards by ``transforms`` so the two back-ends feed the model identical pixels (decord and PyAV decode H.264
bit-identically). ``DataConfig`` defaults to PyAV, which ``bench/bench_data.py`` measured faster for sparse frames.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


class TruncatedVideo(RuntimeError):
    """The file decoded, but ended before a requested frame."""


class NoVideoStream(ValueError):
    """The file opened, but holds no video stream (audio only, or another kind of container)."""


class VideoSource:
    """An opened video. ``num_frames`` is the frame count the container announces (0 when it gives none)."""

    num_frames: int
    fps: float

    def get(self, indices: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def get_all(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the decoder now rather than at garbage collection."""


class DecordSource(VideoSource):
    def __init__(self, data: bytes, threads: int = 1):
        import decord

        try:
            self._reader = decord.VideoReader(io.BytesIO(data), num_threads=threads)
        except decord.DECORDError as e:
            if "video stream" in str(e).lower():
                raise NoVideoStream("the file holds no video stream") from e
            raise
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def get(self, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        if indices and indices[-1] >= self.num_frames:
            raise TruncatedVideo(f"frame {indices[-1]} requested, the file has {self.num_frames}")
        # decord seeks to the key frame before each jump and decodes forward, so sparse indices cost little.
        return self._reader.get_batch(indices).asnumpy()

    def get_all(self) -> np.ndarray:
        return self.get(range(self.num_frames))


class PyAVSource(VideoSource):
    def __init__(self, data: bytes, threads: int = 1):
        import av

        self._container = av.open(io.BytesIO(data))
        if not self._container.streams.video:
            kinds = sorted({stream.type for stream in self._container.streams}) or ["no streams"]
            self._container.close()
            raise NoVideoStream(f"the file holds no video stream (it has: {', '.join(kinds)})")
        self._stream = self._container.streams.video[0]
        self._stream.thread_count = threads
        self.num_frames = int(self._stream.frames or 0)
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def _index(self, frame) -> int:
        start = self._stream.start_time or 0
        return int(round(float((frame.pts - start) * self._stream.time_base) * self.fps))

    def get(self, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        if not indices:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if self.fps <= 0:
            raise TruncatedVideo("the stream gives no frame rate, so frames cannot be located")
        first, last = indices[0], indices[-1]
        if first > 0:
            # Seek lands on the key frame at or before the target; decoding forward from there finds it.
            target = int(first / self.fps / self._stream.time_base) + (self._stream.start_time or 0)
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        wanted, needed = {}, set(indices)
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                continue
            i = self._index(frame)
            if i in needed and i not in wanted:
                wanted[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        missing = [i for i in indices if i not in wanted]
        if missing:
            raise TruncatedVideo(f"frames {missing[:4]}... not found (decoded up to the file's end)")
        return np.stack([wanted[i] for i in indices])

    def get_all(self) -> np.ndarray:
        return np.stack([f.to_ndarray(format="rgb24") for f in self._container.decode(self._stream)])

    def close(self) -> None:
        self._container.close()


def open_video(data: bytes, decoder: str = "pyav", threads: int = 1) -> VideoSource:
    if decoder == "decord":
        return DecordSource(data, threads)
    if decoder == "pyav":
        return PyAVSource(data, threads)
    raise ValueError(f"decoder must be 'decord' or 'pyav', got {decoder!r}")


def decode_all(data: bytes, decoder: str = "pyav", threads: int = 1) -> np.ndarray:
    """Every frame of the file (the naive baseline the benchmark compares against)."""
    return open_video(data, decoder, threads).get_all()


def decode_image(data: bytes) -> np.ndarray:
    """jpg/png bytes -> uint8 (1, H, W, 3): an image is a 1-frame clip. Images of more than 8 bits are scaled to 8,
    not clipped (PIL's ``convert("RGB")`` would saturate a 16-bit PNG to white and a [0, 1] float image to black)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            return _wide_to_uint8(np.asarray(image), image.mode)[None]
        return np.asarray(image.convert("RGB"))[None]


def _wide_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A one-channel image of 16-bit, 32-bit integer or float pixels -> uint8 RGB (H, W, 3).

    The range is taken from the type, as a viewer would: 16 bits are 0..65535; 32-bit integers are 0..65535 when they
    fit (PIL opens 16-bit PNGs as "I" too), else 0..2^31-1; floats are 0..1 when they fit, else 0..255."""
    x = pixels.astype(np.float64)
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "I":
        scale = 255.0 if x.max(initial=0) <= 255 else 65535.0 if x.max(initial=0) <= 65535 else 2.0**31 - 1
    else:
        x = np.nan_to_num(x)
        scale = 1.0 if x.max(initial=0) <= 1.0 else 255.0
    gray = np.clip(np.rint(x / scale * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size
