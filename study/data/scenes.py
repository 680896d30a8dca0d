"""The ``shapes`` dataset's world: scenes of 1-3 coloured shapes that never overlap, and how they are drawn.

``sample_scene`` draws colour, shape, size, count and the spatial relation independently (so no caption is
guessable from the others); ``render`` draws a scene anti-aliased on a textured background with colour jitter and
pixel noise. The captions of a scene are ``study.data.shapes``'s grammar. A change here changes the images: bump
``study.data.shapes.GENERATOR_VERSION``, which names the cache folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# --- the world -----------------------------------------------------------------------------------------
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 40),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "white": (248, 248, 248),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "to the left of", "to the right of")  # objects[0] <relation> objects[1]


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # 'small' | 'large'
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    radius: float  # circumradius in pixels; objects never overlap


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # set for 2 different objects: objects[0] <relation> objects[1]

    def groups(self) -> list[tuple[str, str, str, int]]:
        """``(colour, shape, size, count)`` per distinct kind of object, in order of first appearance."""
        counts: dict[tuple[str, str, str], int] = {}
        for o in self.objects:
            key = (o.colour, o.shape, o.size)
            counts[key] = counts.get(key, 0) + 1
        return [(c, s, z, n) for (c, s, z), n in counts.items()]


# --- scenes --------------------------------------------------------------------------------------------
def _radius(rng: np.random.Generator, size: str, px: int) -> float:
    lo, hi = (0.07, 0.10) if size == "small" else (0.14, 0.19)
    return float(rng.uniform(lo, hi) * px)


def _sample_kinds(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """The (colour, shape, size) of each object. Repeats share colour, shape and size."""
    n = int(rng.integers(1, 4))
    # The group sizes: how many copies of each distinct kind of object.
    if n == 1:
        pattern = [1]
    elif n == 2:
        pattern = [1, 1] if rng.random() < 0.7 else [2]
    else:
        pattern = [[1, 1, 1], [2, 1], [3]][int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
    keys: list[tuple[str, str]] = []
    while len(keys) < len(pattern):  # distinct (colour, shape) per group, so groups are not confusable
        key = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if key not in keys:
            keys.append(key)
    kinds = []
    for (colour, shape), count in zip(keys, pattern):
        size = str(rng.choice(SIZES))
        kinds += [(colour, shape, size)] * count
    return kinds


def _place_relation(rng: np.random.Generator, r: tuple[float, float], relation: str,
                    px: int) -> list[tuple[float, float]]:
    """Centres for objects 0 and 1 such that 0 is clearly <relation> 1: separated along the relation's
    axis by more than both radii, and offset less along the other axis than along that one."""
    margin, gap = 0.03 * px, 0.04 * px
    r0, r1 = r
    first, second = (r0, r1) if relation in ("above", "to the left of") else (r1, r0)  # top/left one first
    lo = first + second + gap  # minimum centre distance along the axis
    a = rng.uniform(margin + first, px - margin - second - lo)
    b = rng.uniform(a + lo, px - margin - second)
    d = b - a
    # Across the axis: the first object anywhere, the second within +-0.5 d of it (kept inside the image).
    c_first = rng.uniform(margin + first, px - margin - first)
    lo2, hi2 = max(margin + second, c_first - 0.5 * d), min(px - margin - second, c_first + 0.5 * d)
    c_second = rng.uniform(lo2, hi2)
    if relation in ("above", "below"):
        p_first, p_second = (c_first, a), (c_second, b)
    else:
        p_first, p_second = (a, c_first), (b, c_second)
    return [p_first, p_second] if relation in ("above", "to the left of") else [p_second, p_first]


def _place_free(rng: np.random.Generator, radii: list[float], px: int) -> list[tuple[float, float]] | None:
    """Non-overlapping centres by rejection sampling; None if it did not fit within a few tries."""
    margin, gap = 0.03 * px, 0.04 * px
    for _ in range(200):
        pts = [(rng.uniform(margin + r, px - margin - r), rng.uniform(margin + r, px - margin - r)) for r in radii]
        if all(
            math.dist(pts[i], pts[j]) >= radii[i] + radii[j] + gap
            for i in range(len(pts))
            for j in range(i)
        ):
            return pts
    return None


def sample_scene(rng: np.random.Generator, px: int) -> Scene:
    """Draw a random scene for a ``px`` x ``px`` image."""
    while True:  # deterministic retries: a crowded draw of three large objects may not fit
        kinds = _sample_kinds(rng)
        radii = [_radius(rng, size, px) for _, _, size in kinds]
        relation = None
        if len(kinds) == 2 and kinds[0] != kinds[1]:
            relation = str(rng.choice(RELATIONS))
            pts = _place_relation(rng, (radii[0], radii[1]), relation, px)
        else:
            pts = _place_free(rng, radii, px)
            if pts is None:
                continue
        objects = tuple(
            SceneObject(shape, colour, size, float(x), float(y), r)
            for (colour, shape, size), (x, y), r in zip(kinds, pts, radii)
        )
        return Scene(objects, relation)


# --- rendering -----------------------------------------------------------------------------------------
SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled, for anti-aliased edges


def _polygon(shape: str, x: float, y: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at (x, y), rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(-np.pi / 2 + np.arange(10) * np.pi / 5)
        ]
    elif shape == "cross":
        w = 0.32  # half arm width
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
               (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]
        k = 1 / math.hypot(1, w)  # scale the arm tips (1, w) onto the unit circle
        pts = [(k * u, k * v) for u, v in pts]
    elif shape == "diamond":
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}; valid shapes: {list(SHAPES)}")
    c, s = math.cos(rot), math.sin(rot)
    return [(x + r * (c * u - s * v), y + r * (s * u + c * v)) for u, v in pts]


def _background(rng: np.random.Generator, px: int) -> np.ndarray:
    """A muted two-colour gradient with optional stripes, (px, px, 3) float32. Muted, so that every object
    colour stands out against it."""
    grey = rng.uniform(50, 165, size=(2, 1))
    ends = np.clip(grey + rng.uniform(-25, 25, size=(2, 3)), 0, 255).astype(np.float32)  # (2, 3) end colours
    u = np.arange(px, dtype=np.float32) / px  # (px,) pixel coordinate in [0, 1)
    theta = rng.uniform(0, 2 * np.pi)
    t = u[None, :] * math.cos(theta) + u[:, None] * math.sin(theta)  # (px, px) position along the gradient
    t = (t - t.min()) / (t.max() - t.min())
    img = ends[0] + (ends[1] - ends[0]) * t[..., None]  # (px, px, 3)
    if rng.random() < 0.5:
        phi, period, amp = rng.uniform(0, np.pi), rng.uniform(0.05, 0.15), rng.uniform(6, 18)
        phase = (u[None, :] * math.cos(phi) + u[:, None] * math.sin(phi)) * np.float32(2 * np.pi / period)
        img += np.float32(amp) * np.sin(phase)[..., None]
    return img


def render(scene: Scene, rng: np.random.Generator, px: int) -> Image.Image:
    """Draw ``scene`` on a textured background with a little colour jitter and pixel noise."""
    bg = _background(rng, px)
    big = px * SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for o in scene.objects:
        rgb = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-12, 13, size=3), 0, 255)
        fill = (*(int(v) for v in rgb), 255)
        x, y, r = o.x * SUPERSAMPLE, o.y * SUPERSAMPLE, o.radius * SUPERSAMPLE
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            rot = math.radians(rng.uniform(-15, 15))  # small, so a square stays a square, not a diamond
            draw.polygon(_polygon(o.shape, x, y, r, rot), fill=fill)
    fg = np.asarray(layer.reduce(SUPERSAMPLE), dtype=np.float32)  # (px, px, 4) box-filtered
    alpha = fg[..., 3:] / np.float32(255)  # (px, px, 1) coverage, soft at the edges
    img = bg + (fg[..., :3] - bg) * alpha
    sigma = np.float32(rng.uniform(3, 10))
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)  # sensor-like noise over everything
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_scene(rng: np.random.Generator, px: int) -> tuple[Image.Image, Scene]:
    """A random scene and its image."""
    scene = sample_scene(rng, px)
    return render(scene, rng, px), scene
