"""Pictures for the reports: frames of videos side by side, in PNG grids a person looks at before reading numbers.

- ``reconstruction_grid``: one row per clip, original frames then the reconstruction's frames;
- ``samples_grid``: one row per prompt (its caption and score as the row's title), the samples of two evaluation
  steps (e.g. the first and the last) side by side.

Videos are (3, T, H, W) float tensors in [-1, 1] or uint8 arrays (T, H, W, 3); ``frames`` picks which to show (the
first, middle and last by default).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def _frames(video, picks: Sequence[int] | None) -> list[np.ndarray]:
    """(H, W, 3) float frames in [0, 1] of a video, at ``picks`` (default: first, middle, last)."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        frames = video.astype(np.float32) / 255.0
    else:
        frames = np.clip((video.transpose(1, 2, 3, 0) + 1.0) / 2.0, 0.0, 1.0)
    t = frames.shape[0]
    picks = [0, t // 2, t - 1] if picks is None else [min(p, t - 1) for p in picks]
    return [frames[p] for p in picks]


def _grid(rows: list[tuple[str, list[list[np.ndarray]]]], group_titles: list[str], path: str | Path,
          scale: float = 1.0) -> Path:
    """One row per entry: a text column with the row's title, then each group's frames side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = len(rows[0][1])
    per_group = len(rows[0][1][0])
    cols = groups * per_group
    fig, axes = plt.subplots(len(rows), cols + 1, squeeze=False, gridspec_kw={"width_ratios": [1.8] + [1] * cols},
                             figsize=(scale * (1.1 * cols + 2.0), scale * 1.2 * len(rows) + 0.3))
    for r, (title, blocks) in enumerate(rows):
        label = axes[r, 0]
        label.axis("off")
        label.text(1.0, 0.5, "\n".join(textwrap.wrap(title, 30)[:6]), fontsize=6, ha="right", va="center",
                   transform=label.transAxes)
        for g, block in enumerate(blocks):
            for k, frame in enumerate(block):
                ax = axes[r, 1 + g * per_group + k]
                ax.imshow(frame, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 and k == 0:
                    ax.set_title(group_titles[g], fontsize=7, loc="left", fontweight="bold")
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reconstruction_grid(clips: list[tuple[str, object, object]], path: str | Path,
                        frames: Sequence[int] | None = None) -> Path:
    """``clips``: (label, original, reconstruction) per row; original frames on the left, reconstruction's right."""
    if not clips:
        raise ValueError("reconstruction_grid needs at least one clip")
    rows = [(label, [_frames(a, frames), _frames(b, frames)]) for label, a, b in clips]
    return _grid(rows, ["original", "reconstruction"], path)


def samples_grid(prompts: list[str], groups: list[tuple[str, list]], path: str | Path,
                 scores: list[list[float | None]] | None = None, frames: Sequence[int] | None = None) -> Path:
    """One row per prompt; ``groups`` = [(title, [video per prompt]), ...] side by side (e.g. first and last
    evaluation); ``scores[g][i]``, when given, is added to the row title for each group."""
    if not prompts or not groups:
        raise ValueError("samples_grid needs prompts and at least one group of samples")
    rows = []
    for i, prompt in enumerate(prompts):
        label = prompt
        if scores:
            label += " | " + " / ".join("-" if s[i] is None else f"{s[i]:.2f}" for s in scores)
        rows.append((label, [_frames(videos[i], frames) for _, videos in groups]))
    return _grid(rows, [title for title, _ in groups], path)
