"""Synthetic scenes of circles, squares and triangles where only geometry tells the classes apart.

Shared by ``hatnet seg shapes`` and ``hatnet det shapes``. A scene is a noisy, textured colour-gradient
background with 1..``max_shapes`` shapes on it. What a model could use instead of shape is taken away:

* colour: every shape gets a colour drawn uniformly from RGB, whatever its class; backgrounds are drawn
  from the same colours, so a shape's colour may occur in the background of another scene;
* size: every shape's area is drawn from one range, whatever its class (a circle and a square of a scene
  are not told apart by their pixel count);
* pose: squares are rotated by any angle, triangles have random angles and orientation.

Shapes may overlap; a shape's mask is its *visible* part, and a shape is only kept if enough of every
shape stays visible to be recognised. Shapes are drawn 4x supersampled, so their borders are blended with
what is below; pixels that no single region covers to at least :data:`IGNORE_BELOW` are marked ignored.
"""
import math
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SHAPE_CLASSES', 'Scene', 'draw_scene', 'split_scenes']

SHAPE_CLASSES = ('circle', 'square', 'triangle')   # class ids 1..3 in instance lists; 0 = background

SUPERSAMPLE = 4          # shapes are rasterised at this factor, then averaged: anti-aliased borders
IGNORE_BELOW = 0.9       # a pixel whose dominant region covers less than this of it is ambiguous
MIN_VISIBLE = 0.6        # a shape occluded so that less than this fraction stays visible is not placed
MIN_INSIDE = 0.8         # ... nor one with less than this fraction of it inside the image
MIN_CONTRAST = 80.       # RGB distance between a shape's colour and the background below it
AREA_RANGE = (0.05, 0.16)  # shape area as a fraction of the image area (the same range for every class)


@dataclass
class Scene:
    image: np.ndarray                              # H x W x 3 uint8
    instances: List[Tuple[int, np.ndarray]]        # (class id 1..3, H x W bool mask of the visible part), drawing order
    ignore: np.ndarray                             # H x W bool: blended borders between regions (masks include
                                                   # the border pixels a shape covers most of)

    def labels(self, ignore_value: int = 255) -> np.ndarray:
        """The semantic label map: 0 background, class ids 1..3, ``ignore_value`` on ignored pixels."""
        labels = np.zeros(self.ignore.shape, np.uint8)
        for class_id, mask in self.instances:
            labels[mask] = class_id
        labels[self.ignore] = ignore_value
        return labels

    def boxes(self) -> np.ndarray:
        """(N, 4) float boxes x0, y0, x1, y1 (pixel edges) around the visible part of each instance."""
        boxes = np.zeros((len(self.instances), 4), np.float32)
        for i, (_, mask) in enumerate(self.instances):
            ys, xs = np.nonzero(mask)
            boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return boxes


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two random colours, smooth random-colour blobs, stripes and pixel noise."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    start, end = rng.uniform(0, 255, (2, 3))
    gradient = start + ramp[..., None] * (end - start)
    blobs = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    mix = rng.uniform(0.2, 0.5)
    image = (1 - mix) * gradient + mix * np.asarray(blobs, np.float64)
    stripe_angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = rng.uniform(0, 20) * np.sin((xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle)) * 2 * np.pi / period)
    return image + stripes[..., None]


def _shading(rng: np.random.Generator, height: int, width: int, amplitude: float = 20.) -> np.ndarray:
    """Smooth random-colour variation of about +-``amplitude`` around zero."""
    blobs = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return (np.asarray(blobs, np.float64) - 127.5) * amplitude / 127.5


def _polygon(rng: np.random.Generator, class_id: int, area: float) -> np.ndarray:
    """Vertices (K, 2) of a shape of ``area`` pixels centred on the origin, randomly rotated."""
    if class_id == 1:
        radius = math.sqrt(area / math.pi)
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    if class_id == 2:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * math.sqrt(area) / 2
    else:
        # corners at about 120 degrees apart around the centre, each jittered: acute, obtuse and near-right
        # triangles, but no slivers (which would be lines, not triangles, at 128 px)
        angles = np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.45, 0.45, 3)
        radii = rng.uniform(0.75, 1.0, 3)
        corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        corners -= corners.mean(0)
        x, y = corners.T
        corners *= math.sqrt(area / (0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))))
    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return corners @ rotation.T


def _coverage(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """The fraction of each pixel the polygon covers, from a supersampled rasterisation."""
    canvas = Image.new('L', (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon * SUPERSAMPLE], fill=255)
    fine = np.asarray(canvas, np.float64) / 255
    return fine.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean((1, 3))


def _place(rng: np.random.Generator, class_id: int, height: int, width: int, covers: List[np.ndarray],
           tries: int = 20):
    """The coverage of a new shape that keeps every shape (itself included) visible enough, or None."""
    for _ in range(tries):
        area = rng.uniform(*AREA_RANGE) * height * width
        centre = rng.uniform([0, 0], [width, height])
        cover = _coverage(_polygon(rng, class_id, area) + centre, height, width)
        if cover.sum() < MIN_INSIDE * area:
            continue
        on_top = 1 - cover
        if all((c * on_top).sum() >= MIN_VISIBLE * c.sum() for c in covers):
            return cover
    return None


def _shape_colour(rng: np.random.Generator, below: np.ndarray, tries: int = 20) -> np.ndarray:
    """A uniformly random RGB colour, redrawn while it is too close to the background it is drawn on
    (an invisible shape teaches nothing). Depends on the background only, never on the class."""
    for _ in range(tries):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - below) >= MIN_CONTRAST:
            break
    return colour


def draw_scene(rng: np.random.Generator, height: int, width: int, max_shapes: int = 3) -> Scene:
    """A scene of 1..``max_shapes`` random shapes (each class equally likely) on a random background."""
    image = _background(rng, height, width)
    classes, covers = [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        class_id = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
        cover = _place(rng, class_id, height, width, covers)
        if cover is None:
            continue
        weight = cover[..., None]
        colour = _shape_colour(rng, (image * weight).sum((0, 1)) / weight.sum())
        # a slight smooth shading across each shape, so that a flat colour does not mark the foreground
        image = (1 - weight) * image + weight * (colour + _shading(rng, height, width))
        classes.append(class_id)
        covers.append(cover)
    image += rng.normal(0, 8, image.shape)

    # visible part of each shape: its coverage times what the later shapes leave uncovered
    visible, background = [], np.ones((height, width))
    for i, cover in enumerate(covers):
        part = cover.copy()
        for later in covers[i + 1:]:
            part *= 1 - later
        visible.append(part)
        background -= part
    shares = np.stack([background] + visible) if visible else background[None]
    ignore = shares.max(0) < IGNORE_BELOW
    owner = shares.argmax(0)
    instances = [(class_id, owner == i + 1) for i, class_id in enumerate(classes)]
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), instances, ignore)


def split_scenes(seed: int, split_index: int, count: int, size: Tuple[int, int],
                 max_shapes: int = 3) -> Iterator[Scene]:
    """``count`` scenes with sides drawn from ``size`` (min, max) for the split ``split_index`` of a generated set.

    Each split has its own random stream of ``seed``, so a split's scenes do not depend on how many the other
    splits have: sets of one seed share their validation images, and a smaller training set is the start of a
    larger one (never another set's validation images).
    """
    rng = np.random.default_rng([seed, split_index])
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        yield draw_scene(rng, height, width, max_shapes)
