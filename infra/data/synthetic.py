"""Procedurally rendered, captioned videos: the embedded default data set.

Each clip shows one anti-aliased coloured shape moving in a stated direction (or staying still, growing, shrinking)
over a static textured background (value noise, stripes, a gradient or a checkerboard in two random muted colours),
and its caption says exactly that: "a red circle moves to the right over a striped navy background". The ground truth
(``truth``) is a JSON-able dict that fully determines the pixels, so ``render(truth, ...)`` is a pure function and a
reward can check a generated clip against it (``tools.caption_reward``).

Design choices that the caption reward relies on:
- Foreground colours are bright and saturated (``COLORS``); background colours are dark or muted (``BACKGROUND_COLORS``)
  and every colour of a background's texture is kept at least ``MIN_BACKGROUND_DISTANCE`` (RGB in [0, 1], Euclidean)
  away from every foreground colour, so the foreground can be segmented by colour alone.
- Shapes are axis-aligned and stay fully inside the frame for the whole clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from infra.config import check, join_key

# Bright foreground palette, RGB 0-255. Pairwise distances are >= 0.33 in [0, 1] RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 40),
    "green": (30, 190, 50),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 235),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
# Dark or muted background base colours, RGB 0-255.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (105, 105, 105),
    "brown": (110, 70, 40),
    "navy": (25, 30, 90),
    "olive": (95, 95, 30),
    "teal": (20, 90, 90),
    "maroon": (100, 25, 35),
    "slate": (60, 70, 90),
    "black": (20, 20, 20),
}
MIN_BACKGROUND_DISTANCE = 0.3
TEXTURES = ("noise", "stripes", "gradient", "checkerboard")
TEXTURE_ADJECTIVE = {"noise": "noisy", "stripes": "striped", "gradient": "gradient", "checkerboard": "checkered"}

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Direction of travel in image coordinates (x right, y down), unit-free.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
    "up-right": (1, -1), "up-left": (-1, -1), "down-right": (1, 1), "down-left": (-1, 1),
}
MOTIONS = (*DIRECTIONS, "still", "grow", "shrink")
MOTION_PHRASE = {
    "right": "moves to the right", "left": "moves to the left", "up": "moves up", "down": "moves down",
    "up-right": "moves up and to the right", "up-left": "moves up and to the left",
    "down-right": "moves down and to the right", "down-left": "moves down and to the left",
    "still": "stays still", "grow": "grows", "shrink": "shrinks",
}


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_ARM = 0.34  # half-width of the cross's arms
# Unit polygons (x, y), y down, fitting in [-1, 1]^2 and roughly centred on the origin.
POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": np.array([[0.0, -0.87], [1.0, 0.87], [-1.0, 0.87]]),
    "star": _star(),
    "cross": np.array([[-_ARM, -1], [_ARM, -1], [_ARM, -_ARM], [1, -_ARM], [1, _ARM], [_ARM, _ARM], [_ARM, 1],
                       [-_ARM, 1], [-_ARM, _ARM], [-1, _ARM], [-1, -_ARM], [-_ARM, -_ARM]], dtype=float),
}


@dataclass
class SyntheticConfig:
    """Size and timing of rendered clips, and the ranges shapes are drawn from (fractions of the frame side)."""

    width: int = 128
    height: int = 128
    frames: int = 33
    fps: float = 8.0
    min_radius: float = 0.08
    max_radius: float = 0.15
    min_travel: float = 0.35  # distance travelled by a moving shape over the clip, fraction of the frame side
    max_travel: float = 0.55
    growth: float = 2.0  # radius ratio last/first frame of a growing shape
    # The classes scenes are drawn from (uniformly); subsets make an easier set, e.g. for a CPU-scale study.
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    motions: tuple[str, ...] = MOTIONS
    textures: tuple[str, ...] = TEXTURES

    def validate(self, prefix: str = "") -> None:
        """``prefix``: where these fields sit in a run config (the study's ``data.default``), "" standalone."""
        for name in ("width", "height", "frames"):
            check(getattr(self, name) >= 1, join_key(prefix, name), f"must be >= 1, got {getattr(self, name)}")
        check(self.fps > 0, join_key(prefix, "fps"), f"must be > 0, got {self.fps}")
        check(0 < self.min_radius <= self.max_radius <= 0.25, join_key(prefix, "min_radius/max_radius"),
              f"must satisfy 0 < min <= max <= 0.25, got {self.min_radius}/{self.max_radius}")
        check(0 < self.min_travel <= self.max_travel, join_key(prefix, "min_travel/max_travel"),
              f"must satisfy 0 < min <= max, got {self.min_travel}/{self.max_travel}")
        # A trip along an axis covers max_travel; the shape (and its 0.02 margin) must still fit beside it.
        check(self.max_travel + 2 * (self.max_radius + 0.02) <= 1.0, join_key(prefix, "max_travel"),
              f"{self.max_travel} is too long for max_radius {self.max_radius}")
        check(self.growth > 1, join_key(prefix, "growth"), f"must be > 1, got {self.growth}")
        for name, known in (("shapes", SHAPES), ("colors", tuple(COLORS)), ("motions", MOTIONS),
                            ("textures", TEXTURES)):
            chosen = getattr(self, name)
            unknown = [c for c in chosen if c not in known]
            check(bool(chosen) and not unknown and len(set(chosen)) == len(chosen), join_key(prefix, name),
                  f"must be a non-empty subset of {list(known)} without repeats, got {list(chosen)}")


# Every field but the clip geometry: what a data set's scene is drawn from.
SCENE_OPTIONS = tuple(f.name for f in fields(SyntheticConfig) if f.name not in ("width", "height", "frames", "fps"))


def scene_options(**options) -> dict:
    """The scene options that are set, ready for ``SyntheticConfig(**...)``: None and empty values mean "the
    default" and are dropped, lists become tuples; a name that is not in ``SCENE_OPTIONS`` raises."""
    unknown = sorted(set(options) - set(SCENE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown scene option(s) {unknown}; known: {list(SCENE_OPTIONS)}")
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()
            if v is not None and not (isinstance(v, (list, tuple)) and not v)}


# ----------------------------------------------------------------------------------------------------------- shapes
def polygon_sdf(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance from points to a closed polygon (negative inside), vectorised over points."""
    dist2 = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(poly)):
        (x0, y0), (x1, y1) = poly[i], poly[i - 1]
        ex, ey = x1 - x0, y1 - y0
        wx, wy = px - x0, py - y0
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        dist2 = np.minimum(dist2, bx * bx + by * by)
        # Even-odd rule: count crossings of a ray going in +x.
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (py - y0) * ex / ey
        inside ^= crosses & (px < x_cross)
    return np.where(inside, -1.0, 1.0) * np.sqrt(dist2)


def shape_coverage(shape: str, cx: float, cy: float, radius: float, height: int, width: int,
                   ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at pixel (cx, cy) with outer radius ``radius`` pixels.

    Returns the coverage over the shape's bounding box and the (rows, cols) slices of that box in the frame, so
    callers only touch the few pixels the shape can cover.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    r = max(float(radius), 0.5)
    y0, y1 = max(int(math.floor(cy - r - 1)), 0), min(int(math.ceil(cy + r + 2)), height)
    x0, x1 = max(int(math.floor(cx - r - 1)), 0), min(int(math.ceil(cx + r + 2)), width)
    if y0 >= y1 or x0 >= x1:
        return np.zeros((0, 0)), (slice(0, 0), slice(0, 0))
    # Pixel centres are at integer + 0.5.
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    ux, uy = (px - cx) / r, (py - cy) / r
    if shape == "circle":
        sdf = np.sqrt(ux * ux + uy * uy) - 1.0
    else:
        sdf = polygon_sdf(ux, uy, POLYGONS[shape])
    # One pixel wide linear ramp across the edge: the exact coverage of a straight edge through a pixel.
    return np.clip(0.5 - sdf * r, 0.0, 1.0), (slice(y0, y1), slice(x0, x1))


# ------------------------------------------------------------------------------------------------------ backgrounds
def _color_distance_to_segment(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Smallest distance from colour ``c`` to any mix of colours ``a`` and ``b`` (textures blend the two)."""
    ab = b - a
    t = np.clip(np.dot(c - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(a + t * ab - c))


def background_is_safe(colors: list, margin: float = MIN_BACKGROUND_DISTANCE) -> bool:
    """True when every mix of the two background colours stays ``margin`` away from every foreground colour."""
    a, b = (np.asarray(c, dtype=np.float64) / 255.0 for c in colors)
    return all(_color_distance_to_segment(a, b, np.asarray(f) / 255.0) >= margin for f in COLORS.values())


def sample_background(rng: np.random.Generator, textures: tuple[str, ...] = TEXTURES) -> dict:
    name = str(rng.choice(list(BACKGROUND_COLORS)))
    base = np.asarray(BACKGROUND_COLORS[name], dtype=np.float64)
    for _ in range(100):
        first = np.clip(base + rng.uniform(-15, 15, 3), 0, 255)
        # The second colour leans towards a random muted colour, so the named colour still dominates the look.
        second = np.clip(0.4 * first + 0.6 * rng.uniform(0, 160, 3), 0, 255)
        colors = [[int(round(v)) for v in first], [int(round(v)) for v in second]]
        if background_is_safe(colors) and np.linalg.norm(first - second) > 40:
            break
    else:  # pragma: no cover - the muted palette always leaves room
        colors = [list(BACKGROUND_COLORS[name]), [int(v * 0.5) for v in BACKGROUND_COLORS[name]]]
    texture = str(rng.choice(list(textures)))
    return {
        "texture": texture, "color": name, "colors": colors,
        "angle": round(float(rng.uniform(0, math.pi)), 4),  # stripe / gradient direction
        "period": round(float(rng.uniform(0.06, 0.2)), 4),  # stripe period / checker cell, fraction of the side
        "seed": int(rng.integers(2**31)),  # value-noise and grain seed
    }


def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells`` x ``cells`` grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, height), np.linspace(0, cells, width)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep hides the grid
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def render_background(background: dict, height: int, width: int) -> np.ndarray:
    """Float RGB image (H, W, 3) in [0, 255] of a background description from ``sample_background``."""
    rng = np.random.default_rng(background["seed"])
    side = max(height, width)
    y, x = (np.mgrid[0:height, 0:width] + 0.5) / side
    along = x * math.cos(background["angle"]) + y * math.sin(background["angle"])
    texture = background["texture"]
    if texture == "noise":
        mix = 0.65 * _value_noise(rng, height, width, 4) + 0.35 * _value_noise(rng, height, width, 12)
        mix = (mix - mix.min()) / max(mix.max() - mix.min(), 1e-6)
    elif texture == "stripes":
        # Anti-aliased square wave: a clipped, steep sine.
        mix = np.clip(0.5 + 3.0 * np.sin(2 * math.pi * along / background["period"]), 0.0, 1.0)
    elif texture == "gradient":
        mix = (along - along.min()) / max(along.max() - along.min(), 1e-6)
    elif texture == "checkerboard":
        cell = background["period"]
        mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float64)
    else:
        raise ValueError(f"background.texture must be one of {TEXTURES}, got {texture!r}")
    a, b = (np.asarray(c, dtype=np.float64) for c in background["colors"])
    image = a + mix[..., None] * (b - a)
    # Fine grain so no region is perfectly flat (gives the VAE texture everywhere); small enough to keep colours safe.
    image += rng.normal(0.0, 4.0, (height, width, 1))
    return np.clip(image, 0, 255)


# ------------------------------------------------------------------------------------------------------ sampling
def sample_truth(rng: np.random.Generator, cfg: SyntheticConfig, video: bool = True) -> dict:
    """Draw a random scene. ``video=False`` draws an image scene (no motion)."""
    shape = str(rng.choice(list(cfg.shapes)))
    color = str(rng.choice(list(cfg.colors)))
    rgb = [int(np.clip(v + rng.integers(-10, 11), 0, 255)) for v in COLORS[color]]
    motion = str(rng.choice(list(cfg.motions))) if video else None
    radius = float(rng.uniform(cfg.min_radius, cfg.max_radius))
    r0 = r1 = radius
    dx = dy = 0.0
    if motion in DIRECTIONS:
        ux, uy = DIRECTIONS[motion]
        travel = float(rng.uniform(cfg.min_travel, cfg.max_travel)) / math.hypot(ux, uy)
        dx, dy = ux * travel, uy * travel
    elif motion in ("grow", "shrink"):
        small = float(rng.uniform(cfg.min_radius * 0.7, cfg.max_radius / cfg.growth * 1.3))
        r0, r1 = (small, small * cfg.growth) if motion == "grow" else (small * cfg.growth, small)
    # Place the start so the whole trajectory keeps the shape inside the frame (with a small margin).
    margin = max(r0, r1) + 0.02
    sx = float(rng.uniform(margin - min(dx, 0), 1 - margin - max(dx, 0)))
    sy = float(rng.uniform(margin - min(dy, 0), 1 - margin - max(dy, 0)))
    truth = {
        "shape": shape, "color": color, "rgb": rgb, "motion": motion,
        "start": [round(sx, 4), round(sy, 4)], "end": [round(sx + dx, 4), round(sy + dy, 4)],
        "radius": [round(r0, 4), round(r1, 4)],
        "background": sample_background(rng, cfg.textures),
    }
    # Per-frame centre x, centre y, radius (fractions of the frame side): derived, stored for readers of the meta.
    truth["trajectory"] = np.round(trajectory(truth, cfg.frames if video else 1), 4).tolist()
    return truth


def trajectory(truth: dict, frames: int) -> np.ndarray:
    """(frames, 3) array of centre x, centre y, radius per frame, as fractions of the frame side."""
    t = np.linspace(0.0, 1.0, frames)[:, None] if frames > 1 else np.zeros((1, 1))
    start = np.array([*truth["start"], truth["radius"][0]])
    end = np.array([*truth["end"], truth["radius"][1]])
    return start + t * (end - start)


def render(truth: dict, height: int, width: int, frames: int) -> np.ndarray:
    """Render a scene as uint8 frames (frames, H, W, 3); deterministic given ``truth``."""
    background = render_background(truth["background"], height, width)
    side = max(height, width)
    color = np.asarray(truth["rgb"], dtype=np.float64)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i, (cx, cy, r) in enumerate(trajectory(truth, frames)):
        frame = background.copy()
        cover, (rows, cols) = shape_coverage(truth["shape"], cx * side, cy * side, r * side, height, width)
        patch = frame[rows, cols]
        frame[rows, cols] = patch + cover[..., None] * (color - patch)
        out[i] = np.round(frame).astype(np.uint8)
    return out


_CAPTION_TEMPLATES = (
    "{a} {color} {shape} {motion} over a {texture} {bg} background",
    "{a} {color} {shape} {motion} in front of a {texture} {bg} background",
    "on a {texture} {bg} background, {a} {color} {shape} {motion}",
)
_IMAGE_TEMPLATES = (
    "{a} {color} {shape} on a {texture} {bg} background",
    "{a} {color} {shape} in front of a {texture} {bg} background",
)


def caption(truth: dict, rng: np.random.Generator) -> str:
    """A caption stating shape, colour, motion (videos) and background; phrasing varies with ``rng``."""
    templates = _CAPTION_TEMPLATES if truth["motion"] else _IMAGE_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    background = truth["background"]
    article = "an" if truth["color"][0] in "aeiou" else "a"
    return template.format(a=article, color=truth["color"], shape=truth["shape"],
                           motion=MOTION_PHRASE.get(truth["motion"], ""),
                           texture=TEXTURE_ADJECTIVE[background["texture"]], bg=background["color"])


def make_caption(seed: int, index: int, cfg: SyntheticConfig, video: bool = True) -> tuple[str, dict]:
    """(caption, truth) of sample ``index`` of the set drawn from ``seed``, without rendering it: exactly what
    ``make_sample`` gives (rendering draws from the truth's own seed, not from the sample's generator)."""
    rng = np.random.default_rng([seed, int(video), index])
    truth = sample_truth(rng, cfg, video=video)
    return caption(truth, rng), truth


def make_sample(seed: int, index: int, cfg: SyntheticConfig, video: bool = True) -> tuple[np.ndarray, str, dict]:
    """Sample ``index`` of the set drawn from ``seed``: (frames uint8 (T, H, W, 3), caption, truth).

    Each sample has its own generator, so any sample can be rebuilt without rendering the others.
    """
    text, truth = make_caption(seed, index, cfg, video)
    return render(truth, cfg.height, cfg.width, cfg.frames if video else 1), text, truth
