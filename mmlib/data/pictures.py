"""Pixel renderers of the generated world: image, depth, thermal and video.

Introduced in `00_tour.ipynb`. Shapes are drawn from signed distance functions (SDFs): for every
pixel, the distance to the shape's edge, negative inside. Coverage ``clip(0.5 - distance, 0, 1)``
(distance in pixels) is an anti-aliased edge one pixel wide, computed for a whole batch at once.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from mmlib.data.world import DIRECTIONS, TRAIL_STEP, TRAVEL, Scenes, noise

# Background light of the image by temperature: cold scenes are lit bluish, hot scenes reddish.
AMBIENT = np.array([[0.05, 0.09, 0.22], [0.12, 0.11, 0.09], [0.24, 0.07, 0.04]], dtype=np.float32)
THERMAL_LEVEL = (0.05, 0.55, 0.95)  # cold objects read darker than the room, hot ones bright
THERMAL_ROOM = 0.25
DEPTH_LEVEL = (0.55, 0.95)  # small objects stand far away (dim), large ones near (bright)
TRAIL = (0.55, 0.35, 0.18)  # opacity of the ghost copies behind a moving object in a still image


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


def _box(qx: np.ndarray, qy: np.ndarray, hx, hy) -> np.ndarray:
    """SDF of an axis-aligned box with half-sizes (hx, hy)."""
    dx, dy = np.abs(qx) - hx, np.abs(qy) - hy
    outside = _length(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _triangle(qx: np.ndarray, qy: np.ndarray, r) -> np.ndarray:
    """SDF of an upward equilateral triangle with circumradius r, centred on its centroid.

    Inigo Quilez's sdEquilateralTriangle, with y pointing up.
    """
    k = np.float32(np.sqrt(3.0))
    half_side = r * k / 2
    px = np.abs(qx) - half_side
    py = -qy + half_side / k  # image y grows downwards; the formula wants y up
    fold = px + k * py > 0
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * half_side, 0)
    return -_length(px, py) * np.sign(py)


# SDF of each shape id in local, unrotated coordinates (qx, qy) for a radius r.
SHAPE_SDFS = (
    lambda x, y, r: _length(x, y) - r,  # circle
    lambda x, y, r: _box(x, y, 0.82 * r, 0.82 * r),  # square, about a circle's area
    lambda x, y, r: _triangle(x, y, 1.15 * r),  # triangle, a little larger to read as large
    lambda x, y, r: np.minimum(_box(x, y, r, 0.34 * r), _box(x, y, 0.34 * r, r)),  # cross
)


def coverage(scenes: Scenes, size: int, offset: np.ndarray | None = None, blur: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage of each scene's object, (B, H, W) float32 in [0, 1].

    offset: (B, 2) shift of the object's center, fractions of the frame (for trails and video).
    """
    center = scenes.center if offset is None else scenes.center + offset
    pixels = np.arange(size, dtype=np.float32) + 0.5  # pixel centers
    alpha = np.empty((len(scenes), size, size), dtype=np.float32)
    shape = scenes.attributes["shape"]
    for shape_id, sdf in enumerate(SHAPE_SDFS):
        rows = np.flatnonzero(shape == shape_id)
        if rows.size == 0:
            continue
        dx = pixels[None, None, :] - center[rows, 0, None, None] * size  # (b, 1, W) in pixels
        dy = pixels[None, :, None] - center[rows, 1, None, None] * size  # (b, H, 1)
        cos = np.cos(scenes.angle[rows])[:, None, None]
        sin = np.sin(scenes.angle[rows])[:, None, None]
        qx = cos * dx + sin * dy  # rotate the pixel grid into the object's frame: (b, H, W)
        qy = cos * dy - sin * dx
        r = scenes.radius[rows, None, None] * size
        alpha[rows] = np.clip(0.5 - sdf(qx, qy, r), 0.0, 1.0)
    if blur > 0:
        alpha = gaussian_filter(alpha, sigma=(0, blur, blur), mode="constant")
    return alpha


def _paint(ambient: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`color` (B, 3) over a flat `ambient` background (B, 3) with coverage `alpha` (B, H, W)."""
    return ambient[:, :, None, None] + alpha[:, None] * (color - ambient)[:, :, None, None]  # (B, 3, H, W)


def render_image(scenes: Scenes, size: int) -> np.ndarray:
    """RGB pictures (B, 3, H, W): ambient light by temperature, ghost trail behind moving objects."""
    alpha = coverage(scenes, size)  # (B, H, W)
    direction = DIRECTIONS[scenes.attributes["motion"]]  # (B, 2), zero when still
    rows = np.flatnonzero(np.abs(direction).sum(1) > 0)
    if rows.size:
        # Ghosts share the object's color, so painting them one by one equals painting once
        # with the combined coverage 1 - prod(1 - a_k).
        moving, clear = scenes[rows], 1 - alpha[rows]
        for step, opacity in enumerate(TRAIL, start=1):
            clear *= 1 - opacity * coverage(moving, size, offset=-direction[rows] * TRAIL_STEP * step)
        alpha[rows] = 1 - clear
    return _paint(AMBIENT[scenes.attributes["temperature"]], scenes.rgb, alpha)


def render_video(scenes: Scenes, size: int, frames: int) -> np.ndarray:
    """Clips (B, T, 3, H, W): the object crosses TRAVEL of the frame, centred on its position."""
    b = len(scenes)
    direction = DIRECTIONS[scenes.attributes["motion"]]  # (B, 2)
    progress = np.linspace(-0.5, 0.5, frames, dtype=np.float32)  # mid-clip is the scene's position
    offset = direction[:, None, :] * TRAVEL * progress[None, :, None]  # (B, T, 2)
    flat = scenes[np.repeat(np.arange(b), frames)]  # (B*T) scenes, frame-major within each scene
    alpha = coverage(flat, size, offset=offset.reshape(b * frames, 2))
    clip = _paint(AMBIENT[flat.attributes["temperature"]], flat.rgb, alpha)
    return clip.reshape(b, frames, 3, size, size)  # (B, T, 3, H, W)


def _sensor_noise(scenes: Scenes, seed: int, stream: str, size: int, sigma: float) -> np.ndarray:
    """Per-pixel Gaussian noise (B, H, W), a pure function of (seed, scene, stream)."""
    return sigma * noise(seed, scenes.noise_key, stream, size * size).reshape(len(scenes), size, size)


def render_depth(scenes: Scenes, size: int, seed: int) -> np.ndarray:
    """Depth maps (B, 1, H, W): a floor that nears towards the bottom, the object at its distance."""
    floor = np.linspace(0.1, 0.35, size, dtype=np.float32)[None, :, None]  # (1, H, 1)
    level = np.asarray(DEPTH_LEVEL, dtype=np.float32)[scenes.attributes["size"]][:, None, None]
    alpha = coverage(scenes, size)
    depth = floor * (1 - alpha) + level * alpha + _sensor_noise(scenes, seed, "depth", size, 0.01)
    return np.clip(depth, 0, 1)[:, None].astype(np.float32)


def render_thermal(scenes: Scenes, size: int, seed: int) -> np.ndarray:
    """Thermal images (B, 1, H, W): a blurred silhouette whose brightness is the temperature."""
    level = np.asarray(THERMAL_LEVEL, dtype=np.float32)[scenes.attributes["temperature"]][:, None, None]
    alpha = coverage(scenes, size, blur=0.6)  # heat spreads: thermal cameras see soft edges
    heat = THERMAL_ROOM * (1 - alpha) + level * alpha + _sensor_noise(scenes, seed, "thermal", size, 0.02)
    return np.clip(heat, 0, 1)[:, None].astype(np.float32)
